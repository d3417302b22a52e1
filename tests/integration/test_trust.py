"""Server-to-server trust (issue 8): a process without the cluster secret gets nothing past a server.

Against a real cluster of s1..s3 (s3 is the coordinator) whose configuration also names a server "ghost"
that never runs, so the tests can speak as a configured peer without displacing a live one:
- the coordination channel (bully/transport.py, HMAC-SHA256 over each frame): a forged `coordinator`
  announcement and a forged registry request from a process without the secret are rejected and logged and
  change nothing; an authentic frame replayed is rejected and logged;
- the Raft port (PySyncObj, encrypted and authenticated with the cluster password): a client with the wrong
  password gets no status and gets no command applied, while the same client with the right password does
  (the positive control that keeps the negative meaningful); an unencrypted pickle never reaches
  `pickle.loads`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pickle
import secrets
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.config import FAIL_REASON
from pysyncobj.utility import TcpUtility, UtilityException

from bully.transport import seal, unseal
from cluster.config import load_config
from cluster.framing import LineDecoder
from registry import state as rs
from registry.replicated import _RegistryLog
from tests.support import TEST_SECRET, ChatClient, Cluster, free_ports, http_json, wait_until

pytestmark = pytest.mark.timeout(120)

WRONG_SECRET = "not-the-cluster-secret"


GHOST = "ghost"  # configured, never started: the tests impersonate it without displacing a live server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """s1..s3 running (s3 coordinator), plus a configured member of the lowest priority that never runs."""
    running = Cluster(tmp_path_factory.mktemp("trust"), 3)
    try:
        ports = free_ports(4)
        with running.config_path.open("a") as config:
            config.write(f"{GHOST} 127.0.0.1 {ports[0]} {ports[1]} 0 {ports[2]} {ports[3]}\n")
        running.config = load_config(running.config_path)
        live = [i for i in running.ids if i != GHOST]
        for server_id in live:
            running.start(server_id)
        for server_id in live:
            running.wait_ready(server_id, 60)
        running.wait_coordinator("s3", 60)
        yield running
    finally:
        running.close()


@pytest.fixture(autouse=True)
def servers_stay_healthy(cluster: Cluster) -> Iterator[None]:
    yield
    for server_id in LIVE:
        assert cluster.alive(server_id), f"{server_id} died:\n{cluster.log(server_id)[-3000:]}"
        assert "Traceback" not in cluster.log(server_id), cluster.log(server_id)[-5000:]
    assert cluster.wait_coordinator("s3", timeout=10) == "s3"


LIVE = ("s1", "s2", "s3")


def registry_identities(cluster: Cluster, server_id: str = "s3") -> set[str]:
    clients = http_json(cluster.admin_url(server_id) + "/clients")
    items = clients["clients"] if isinstance(clients, dict) else clients
    return {c["identity"] for c in items}


def login_and_quit(cluster: Cluster, identity: str, server_id: str = "s1") -> bool:
    client = ChatClient.connect(cluster.client_address(server_id))
    try:
        approved = client.login(identity)
        if approved:
            client.send({"type": "quit"})
            assert client.closed()
        return approved
    finally:
        client.close()


# -- the coordination channel ------------------------------------------------------------------------------

SECRET = TEST_SECRET.encode()
_sources = itertools.count(1)


def new_source() -> str:
    """A loopback address of its own for each stranger, so each rejection is logged (they are rate-limited
    per address)."""
    return f"127.0.77.{next(_sources)}"


class Wire:
    """A raw TCP connection to a server's coordination port, speaking whatever we make it speak."""

    def __init__(self, cluster: Cluster, target: str, source: str | None = None) -> None:
        server = cluster.config.server(target)
        self.target = target
        self.source = source or new_source()
        self.sock = socket.create_connection((server.host, server.coordination_port), 3, (self.source, 0))
        self.decoder = LineDecoder()
        self.lines: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self, timeout: float = 3.0) -> bytes | None:
        """The next line, or None once the server closed the connection."""
        self.sock.settimeout(timeout)
        while not self.lines:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.lines.extend(line for line in self.decoder.feed(data) if line)
        return self.lines.pop(0)

    def closed_without_reply(self, timeout: float = 3.0) -> bool:
        return self.read_line(timeout) is None

    def close(self) -> None:
        self.sock.close()


class Session:
    """An authentic session opened with the cluster secret, as `as_id`: what a captured or insider peer
    could send. Frames are built exactly as bully.transport builds them."""

    def __init__(self, cluster: Cluster, target: str, as_id: str = GHOST, hello: bytes | None = None) -> None:
        self.wire = Wire(cluster, target)
        self.as_id = as_id
        self.nonce = secrets.token_hex(16)
        self.hello = hello or seal(
            SECRET, {"t": "hello", "from": as_id, "to": target, "nonce": self.nonce, "ts": time.time()}
        )
        self.wire.send(self.hello)
        line = self.wire.read_line()
        assert line is not None, f"{target} refused an authentic hello"
        reply = unseal(SECRET, line)
        assert reply["t"] == "hello" and reply["from"] == target, reply
        self.sid = unseal(SECRET, self.hello)["nonce"] + reply["nonce"]
        self.seq = 0

    def frame(self, body: dict[str, Any]) -> bytes:
        self.seq += 1
        payload = {**body, "from": self.as_id, "to": self.wire.target, "sid": self.sid, "seq": self.seq}
        return seal(SECRET, {**payload, "ts": time.time()})

    def probe(self) -> tuple[bytes, bytes]:
        """Send a request the server answers at once (no handler for its kind): (our frame, its reply line)."""
        frame = self.frame({"t": "q", "id": self.seq + 1, "m": {"kind": "trust-probe"}})
        self.wire.send(frame)
        line = self.wire.read_line()
        assert line is not None, "no reply to an authentic request"
        reply = unseal(SECRET, line)
        assert reply["t"] == "r" and reply["from"] == self.wire.target and "no handler" in reply["e"], reply
        return frame, line + b"\n"


def forged(payload: dict[str, Any]) -> bytes:
    """A frame sealed by someone without the secret."""
    return seal(WRONG_SECRET.encode(), payload)


def logged(cluster: Cluster, server_id: str, *fragments: str) -> bool:
    return any(all(f in line for f in fragments) for line in cluster.log(server_id).splitlines())


def wait_logged(cluster: Cluster, server_id: str, *fragments: str) -> None:
    wait_until(lambda: logged(cluster, server_id, *fragments), 5, 0.05, f"{server_id} to log {fragments}")


def election_view(cluster: Cluster) -> dict[str, tuple[Any, Any]]:
    return {i: (s["coordinator"], s["counters"]["elections"]) for i in LIVE for s in [cluster.status(i)]}


def test_forged_coordinator_announcements_are_rejected_and_logged(cluster: Cluster) -> None:
    before = election_view(cluster)
    # Each server is told by a stranger that a lower-priority server now coordinates, with a huge epoch.
    for target, claimed in (("s3", "s1"), ("s2", "s1"), ("s1", "s2")):
        announcement = {"kind": "coordinator", "sender": claimed, "epoch": 2**40}
        hello = {"t": "hello", "from": claimed, "to": target, "nonce": secrets.token_hex(16), "ts": time.time()}
        body = {"t": "n", "m": announcement, "from": claimed, "to": target, "sid": "x", "seq": 1, "ts": time.time()}
        attempts = [
            forged(hello) + forged(body),  # a wrong key all along
            forged(body),  # no handshake at all
            json.dumps(announcement).encode() + b"\n",  # the bare election message
            json.dumps({"a": "0" * 64, "p": json.dumps(body)}).encode() + b"\n",  # a made-up MAC
            json.dumps({"p": json.dumps(hello)}).encode() + b"\n" + forged(body),  # no MAC
        ]
        for attempt in attempts:
            wire = Wire(cluster, target)
            wire.send(attempt)
            assert wire.closed_without_reply(), f"{target} answered a stranger"
            wire.close()
            wait_logged(cluster, target, f"rejected a connection from {wire.source}")
    assert election_view(cluster) == before, "a forged announcement changed someone's view"


def test_a_forged_registry_request_is_rejected_logged_and_nothing_is_committed(cluster: Cluster) -> None:
    command = {"op": "ClaimIdentity", "request_id": "forged.1", "identity": "Forged1", "server": "s1",
               "incarnation": 1}  # fmt: skip
    request = {"t": "q", "id": 1, "m": {"kind": "registry", "command": command}}
    hello = {"t": "hello", "from": "s1", "to": "s3", "nonce": secrets.token_hex(16), "ts": time.time()}
    framed = {**request, "from": "s1", "to": "s3", "sid": "x", "seq": 1, "ts": time.time()}
    for attempt in (forged(hello) + forged(framed), forged(framed), json.dumps(request).encode() + b"\n"):
        wire = Wire(cluster, "s3")  # the coordinator
        wire.send(attempt)
        assert wire.closed_without_reply(), "the coordinator answered a stranger"
        wire.close()
        wait_logged(cluster, "s3", f"rejected a connection from {wire.source}")
    assert all("Forged1" not in registry_identities(cluster, i) for i in LIVE)
    assert login_and_quit(cluster, "Forged1"), "a forged claim must not hold the name"


def test_a_replayed_frame_on_the_same_connection_is_rejected_and_logged(cluster: Cluster) -> None:
    session = Session(cluster, "s2")
    frame, _ = session.probe()  # the positive control: authentic frames are served
    session.wire.send(frame)  # the same bytes again
    assert session.wire.closed_without_reply(), "a replayed frame was served"
    wait_logged(cluster, "s2", f"dropping connection with {GHOST}", "replayed")


def test_a_frame_replayed_on_another_connection_is_rejected_and_logged(cluster: Cluster) -> None:
    first = Session(cluster, "s3")
    frame, _ = first.probe()
    first.wire.close()
    second = Session(cluster, "s3")
    second.wire.send(frame)  # seq 1 as the new session expects, but sealed for the first session
    assert second.wire.closed_without_reply(), "a frame of another session was served"
    wait_logged(cluster, "s3", f"dropping connection with {GHOST}", "another session")


def test_a_frame_reflected_back_to_its_sender_is_rejected_and_logged(cluster: Cluster) -> None:
    session = Session(cluster, "s1")
    _, reply = session.probe()
    # s1's own reply (from s1 to us, seq 1 in its direction, as our next frame expects) sent back to s1.
    session.wire.send(reply)
    assert session.wire.closed_without_reply(), "a reflected frame was served"
    wait_logged(cluster, "s1", f"dropping connection with {GHOST}", "not from our peer")


def test_a_replayed_hello_does_not_let_a_stranger_send_anything(cluster: Cluster) -> None:
    # A hello captured from a live peer (s2 to s3) is replayed by a stranger, followed by a forged request.
    captured = Session(cluster, "s3", as_id="s2")
    captured.wire.close()
    wire = Wire(cluster, "s3")
    command = {"op": "ClaimIdentity", "request_id": "replay.1", "identity": "Replayed1", "server": "s2",
               "incarnation": 1}  # fmt: skip
    wire.send(captured.hello + forged({"t": "q", "id": 1, "m": {"kind": "registry", "command": command},
                                       "from": "s2", "to": "s3", "sid": "x", "seq": 1, "ts": time.time()}))  # fmt: skip
    # Either the replayed hello is refused, or it is answered and the forged frame then ends the connection.
    line = wire.read_line()
    if line is not None:
        assert unseal(SECRET, line)["t"] == "hello", line
        assert wire.closed_without_reply(), "a forged frame after a replayed hello was served"
    wait_logged(cluster, "s3", "rejected", "bad mac")
    assert all("Replayed1" not in registry_identities(cluster, i) for i in LIVE)
    cluster.wait_coordinator("s3", 10)


def test_idle_strangers_cannot_lock_peers_out_of_the_coordination_port(cluster: Cluster) -> None:
    server = cluster.config.server("s1")
    address = (server.host, server.coordination_port)
    strangers = [socket.create_connection(address, 3, ("127.0.88.1", 0)) for _ in range(64)]
    try:
        time.sleep(0.2)  # let the server accept them all
        Session(cluster, "s1")  # a peer (re)connecting meanwhile must still get in
    finally:
        for stranger in strangers:
            stranger.close()


# -- the Raft port -------------------------------------------------------------------------------------


def raft_addresses(cluster: Cluster) -> list[str]:
    return [cluster.config.server(i).raft_address for i in LIVE]


def utility_status(address: str, password: str) -> Any:
    try:
        return TcpUtility(password=password, timeout=3).executeCommand(address, ["status"])
    except UtilityException as exc:
        return exc


class ReadonlyReplica:
    """A PySyncObj read-only node (no vote, no port of its own) with the registry's own consumer: with the
    right password it receives the log and may submit commands, like any partner."""

    def __init__(self, partners: list[str], password: str) -> None:
        self.lock = threading.Lock()
        self.log = _RegistryLog(self.lock, lambda command, result: None)
        conf = SyncObjConf(password=password, dynamicMembershipChange=False, autoTick=True, connectionRetryTime=0.3)
        self.sync = SyncObj(None, partners, conf, consumers=[self.log])

    def servers_up(self) -> dict[str, int]:
        with self.lock:
            return self.log.state.servers_up()

    def submit(self, command: rs.Command, timeout: float) -> tuple[Any, Any] | None:
        """(result, error) from the cluster, or None if nothing came back within `timeout`."""
        done = threading.Event()
        answer: list[tuple[Any, Any]] = []

        def callback(result: Any, error: Any) -> None:
            answer.append((result, error))
            done.set()

        self.log.apply(command, callback=callback)
        done.wait(timeout)
        return answer[0] if answer else None

    def close(self) -> None:
        self.sync.destroy()


@contextlib.contextmanager
def readonly_replica(cluster: Cluster, password: str) -> Iterator[ReadonlyReplica]:
    replica = ReadonlyReplica(raft_addresses(cluster), password)
    try:
        yield replica
    finally:
        replica.close()


def test_raft_status_needs_the_cluster_password(cluster: Cluster) -> None:
    address = cluster.config.server("s1").raft_address
    status = utility_status(address, TEST_SECRET)
    assert isinstance(status, dict) and status.get("self") is not None, status  # the positive control
    refused = utility_status(address, WRONG_SECRET)
    assert not isinstance(refused, dict), f"a wrong password got a status: {refused}"
    no_password = utility_status(address, None)  # type: ignore[arg-type]
    assert not isinstance(no_password, dict), f"no password got a status: {no_password}"


def test_a_raft_client_with_the_wrong_password_gets_nothing_applied(cluster: Cluster) -> None:
    # Positive control: with the right password a stranger process can replicate the registry and commit.
    with readonly_replica(cluster, TEST_SECRET) as insider:
        wait_until(lambda: "s1" in insider.servers_up(), 10, 0.05, "the log to reach a read-only node")
        incarnation = insider.servers_up()["s1"]
        command = rs.ClaimIdentity("trust-test.insider", "Insider1", "s1", incarnation)
        answer = insider.submit(command, timeout=10)
        assert answer is not None and answer[1] == FAIL_REASON.SUCCESS and answer[0].ok, answer
    wait_until(lambda: "Insider1" in registry_identities(cluster), 5, what="the insider's claim")

    # The same, with the wrong password: never connected, nothing applied.
    with readonly_replica(cluster, WRONG_SECRET) as outsider:
        command = rs.ClaimIdentity("trust-test.outsider", "Outsider1", "s1", incarnation)
        answer = outsider.submit(command, timeout=4)
        assert answer is None or answer[1] != FAIL_REASON.SUCCESS, f"the wrong password got an answer: {answer}"
        assert outsider.servers_up() == {}, "the wrong password received the registry"
        assert not any(outsider.sync.isNodeConnected(node) for node in outsider.sync.otherNodes)
    assert "Outsider1" not in registry_identities(cluster)
    assert "Outsider1" not in registry_identities(cluster, "s1")
    assert login_and_quit(cluster, "Outsider1"), "the name must still be free"


class _Marker:
    """Unpickling this creates a file: proof that bytes from the network reached pickle.loads."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def pickle_frames(marker: Path) -> list[bytes]:
    payload = zlib.compress(pickle.dumps(_Marker(str(marker))))
    return [struct.pack("i", len(payload)) + payload, payload, b"\x00" * 64]  # PySyncObj's plaintext framing first


def test_without_a_password_the_same_pickle_would_run(tmp_path: Path) -> None:
    """The control for the test below: a PySyncObj node without a password unpickles these very bytes."""
    marker = tmp_path / "unpickled"
    port, partner = free_ports(2)
    node = SyncObj(f"127.0.0.1:{port}", [f"127.0.0.1:{partner}"], SyncObjConf(autoTick=True))
    try:
        node.waitBinded()
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            sock.sendall(pickle_frames(marker)[0])
            wait_until(marker.exists, 5, 0.02, "the unpickled marker")
    finally:
        node.destroy()


def test_an_unencrypted_pickle_sent_to_the_raft_port_is_never_unpickled(cluster: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    host, port = cluster.config.server("s1").raft_address.rsplit(":", 1)
    for frame in pickle_frames(marker):
        with socket.create_connection((host, int(port)), timeout=3) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(frame)
            sock.settimeout(1.5)  # a frame cut short keeps the server waiting for the rest: fine too
            with contextlib.suppress(OSError):
                assert sock.recv(4096) == b"", "the raft port answered a stranger"
    time.sleep(0.5)  # the only way to show something did *not* happen; the marker would appear at once
    assert not marker.exists(), "PySyncObj unpickled unauthenticated bytes"
    cluster.wait_ready("s1", 5)
