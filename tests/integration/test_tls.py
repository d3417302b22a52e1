"""Optional TLS on a real 2-server cluster, with certificates made by trustme: the clients port (our
terminal client with --tls --ca, and a raw TLS socket), the WebSocket port (wss, routes name wss URLs) and
the admin port (https through the in-process TLS relay); plain connections get nowhere; half a
configuration is refused at startup."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.tls import RealPeer
from tests.support import PYTHON, REPO, TEST_SECRET, Cluster, WsChatClient, http_json, start_cluster, write_config

ANSWER_S = 5.0


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    trustme = pytest.importorskip("trustme")
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    paths = Pki(root / "ca.pem", root / "server.pem", root / "server.key", ssl.create_default_context())
    ca.cert_pem.write_to_path(str(paths.ca))
    issued.cert_chain_pems[0].write_to_path(str(paths.cert))
    issued.private_key_pem.write_to_path(str(paths.key))
    ca.configure_trust(paths.client)
    return paths


def tls_env(pki: Pki) -> dict[str, str]:
    env = {}
    for port in ("CLIENTS", "WS", "ADMIN"):
        env[f"CHATMESH_{port}_TLS_CERT"] = str(pki.cert)
        env[f"CHATMESH_{port}_TLS_KEY"] = str(pki.key)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("tls"), 2, env=tls_env(pki), admin_tls=pki.client) as running:
        yield running


def wss_url(cluster: Cluster, server_id: str) -> str:
    return cluster.ws_url(server_id).replace("ws://", "wss://")


class TlsLines:
    """A raw JSON-lines client over TLS (what the Java client would need a TLS wrapper for)."""

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext) -> None:
        raw = socket.create_connection(address, timeout=ANSWER_S)
        self.sock = context.wrap_socket(raw, server_hostname=address[0])
        self.file = self.sock.makefile("rwb")

    def send(self, message: dict) -> None:
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()

    def recv(self) -> dict:
        line = self.file.readline()
        assert line, "connection closed"
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


def test_clients_port_websocket_and_admin_speak_tls(cluster: Cluster, pki: Pki) -> None:
    tcp = TlsLines(cluster.client_address("s1"), pki.client)
    web = WsChatClient(wss_url(cluster, "s1"), ANSWER_S, ssl=pki.client)
    try:
        tcp.send({"type": "newidentity", "identity": "TlsTcp"})
        assert tcp.recv() == {"type": "newidentity", "approved": "true"}
        assert web.login("TlsWeb")
        tcp.send({"type": "message", "content": "secret"})
        assert web.recv_until(lambda m: m["type"] == "message") == {
            "type": "message", "identity": "TlsTcp", "content": "secret"}  # fmt: skip
        # A route to a WebSocket client names the other server's wss address.
        servers = http_json(cluster.admin_url("s1") + "/servers", ANSWER_S, pki.client)["servers"]
        assert {s["server_id"]: s["ws_url"] for s in servers} == {i: wss_url(cluster, i) for i in cluster.ids}
        assert all(s["admin_url"].startswith("https://") for s in servers)
        web.send({"type": "joinroom", "roomid": "MainHall-s2"})
        route = web.recv_until(lambda m: m["type"] == "route")
        assert route["wsurl"] == wss_url(cluster, "s2")
        # The chat page comes over https, allowed to talk to the cluster's wss ports only.
        with urllib.request.urlopen(cluster.admin_url("s2") + "/chat", timeout=ANSWER_S, context=pki.client) as page:
            policy = page.headers["Content-Security-Policy"]
            assert b"chat.js" in page.read()
        assert wss_url(cluster, "s1").rstrip("/") in policy and "ws://" not in policy
    finally:
        tcp.close()
        web.close()


def test_plain_connections_to_tls_ports_get_nowhere(cluster: Cluster) -> None:
    with socket.create_connection(cluster.client_address("s1"), timeout=ANSWER_S) as plain:
        plain.sendall(b'{"type":"newidentity","identity":"PlainText"}\n')
        plain.settimeout(ANSWER_S)
        try:
            answer = plain.recv(4096)
        except (ConnectionResetError, TimeoutError):
            answer = b""
        assert b"approved" not in answer
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(cluster.admin_url("s1").replace("https://", "http://") + "/health", timeout=ANSWER_S)


def test_terminal_client_with_tls_and_ca(cluster: Cluster, pki: Pki) -> None:
    host, port = cluster.client_address("s2")
    watcher = WsChatClient(wss_url(cluster, "s2"), ANSWER_S, ssl=pki.client)
    try:
        assert watcher.login("TlsWatch")
        args = [PYTHON, "-m", "client", "-h", host, "-p", str(port), "-i", "TlsTerm", "--batch", "--wait-replies"]
        done = subprocess.run([*args, "--tls", "--ca", str(pki.ca)], input="hello over tls\n#quit\n", cwd=REPO,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "User has been approved." in done.stdout
        assert watcher.recv_until(lambda m: m["type"] == "message") == {
            "type": "message", "identity": "TlsTerm", "content": "hello over tls"}  # fmt: skip
        untrusted = subprocess.run([*args, "--tls"], input="", cwd=REPO, capture_output=True, text=True, timeout=60)
        assert untrusted.returncode == 3
        assert "TLS failed" in untrusted.stdout + untrusted.stderr
    finally:
        watcher.close()


def test_half_a_tls_configuration_stops_the_server_with_one_line(tmp_path: Path, pki: Pki) -> None:
    config = write_config(tmp_path, 1)
    base = [PYTHON, "-m", "node", "--config", str(config), "--id", "s1", "--data-dir", str(tmp_path / "d")]
    env = {"CHATMESH_SECRET": TEST_SECRET, "PATH": "/usr/bin:/bin"}
    only_cert = subprocess.run([*base, "--ws-tls-cert", str(pki.cert)], env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=30)  # fmt: skip
    assert only_cert.returncode == 2
    assert only_cert.stderr.strip().count("\n") == 0 and "--ws-tls-key" in only_cert.stderr
    swapped = subprocess.run([*base, "--admin-tls-cert", str(pki.key), "--admin-tls-key", str(pki.ca)], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert swapped.returncode == 2 and "cannot use TLS certificate" in swapped.stderr


def test_the_admin_app_behind_the_relay_sees_the_real_peer() -> None:
    seen: dict[str, str] = {}

    def app(environ: dict, start_response: object) -> list[bytes]:
        seen.update(addr=environ["REMOTE_ADDR"], scheme=environ["wsgi.url_scheme"])
        return [b""]

    wrapped = RealPeer(app, {40001: "203.0.113.9"})
    wrapped({"REMOTE_PORT": "40001", "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http"}, None)
    assert seen == {"addr": "203.0.113.9", "scheme": "https"}
    wrapped({"REMOTE_PORT": "40002", "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http"}, None)
    assert seen == {"addr": "127.0.0.1", "scheme": "http"}  # not the relay's: its own address
