"""Malformed and hostile client input against real servers (issue 8, protocol.md "Bad input").

A 2-server cluster of `python -m node` processes with small limits. Every kind of bad input gets the
protocol's answer (`{"type":"error",...}`, a negative answer, or a clean disconnect), the server keeps
serving the others, and no traceback ever reaches a server's log. Each test connects from its own loopback
source address (127.0.N.x), so the per-address limit of one test never touches another.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import ChatClient, Cluster, start_cluster, wait_until

pytestmark = pytest.mark.timeout(180)

PER_IP = 4
MAX_CLIENTS = 12
IDLE_S = 1.5
LIMITS_ENV = {
    "CHATMESH_LIMIT_MAX_CONNECTIONS_PER_IP": str(PER_IP),
    "CHATMESH_LIMIT_MAX_CLIENTS": str(MAX_CLIENTS),
    "CHATMESH_LIMIT_IDLE_BEFORE_IDENTITY_S": str(IDLE_S),
}
LINE_LIMIT = 64 * 1024  # the default
S1_HALL = "MainHall-s1"

_subnets = itertools.count(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("bad-input"), 2, env=LIMITS_ENV) as running:
        yield running


@pytest.fixture(autouse=True)
def no_traceback_in_logs(cluster: Cluster) -> Iterator[None]:
    yield
    for server_id in cluster.ids:
        log = cluster.log(server_id)
        assert "Traceback" not in log, f"{server_id} logged a traceback:\n{log[-5000:]}"
        assert cluster.alive(server_id), f"{server_id} died:\n{log[-3000:]}"


class Source:
    """Clients of one test, from loopback addresses of their own: 127.0.<test>.<n>."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.subnet = next(_subnets)
        self.clients: list[ChatClient] = []

    def ip(self, host: int = 1) -> str:
        return f"127.0.{self.subnet}.{host}"

    def connect(self, server_id: str = "s1", host: int = 1, timeout: float = 5.0) -> ChatClient:
        address = self.cluster.client_address(server_id)
        client = ChatClient.__new__(ChatClient)
        client.sock = socket.create_connection(address, timeout=timeout, source_address=(self.ip(host), 0))
        client.timeout = timeout
        client.buffer = b""
        self.clients.append(client)
        return client

    def login(self, identity: str, server_id: str = "s1", host: int = 1) -> ChatClient:
        client = self.connect(server_id, host)
        assert client.login(identity), f"{identity} was refused"
        assert client.recv() == rc(identity, "", f"MainHall-{server_id}")
        return client

    def close(self) -> None:
        """Close every client and wait until the server has closed its side too, so the next test starts
        with none of these counted against the server's limits."""
        for client in self.clients:
            with contextlib.suppress(OSError):
                client.sock.shutdown(socket.SHUT_WR)
        for client in self.clients:
            with contextlib.suppress(OSError):
                client.closed(timeout=3)
            client.close()


@pytest.fixture
def source(cluster: Cluster) -> Iterator[Source]:
    s = Source(cluster)
    yield s
    s.close()


def rc(identity: str, former: str, roomid: str) -> dict[str, str]:
    return {"type": "roomchange", "identity": identity, "former": former, "roomid": roomid}


def refusal_at_accept(client: ChatClient, within: float = 0.1) -> dict[str, Any] | None:
    """The error line a server sends a connection it refuses at accept, or None if it sends nothing.

    Checked before sending anything: a server that closes a socket with unread input resets it, and the
    reset can destroy the error line before the client reads it."""
    client.sock.settimeout(within)
    try:
        chunk = client.sock.recv(65536)
    except TimeoutError:
        return None
    client.buffer += chunk
    return client.recv() if chunk else {"type": "eof"}


def expect_error(client: ChatClient) -> dict[str, Any]:
    reply = client.recv()
    assert reply.get("type") == "error" and isinstance(reply.get("reason"), str) and reply["reason"], reply
    return reply


def assert_serving(source: Source, name: str, server_id: str = "s1") -> None:
    """A fresh client can still log in, ask who is in its room and quit."""
    client = source.login(name, server_id, host=200)
    client.send({"type": "who"})
    reply = client.recv()
    assert reply["type"] == "roomcontents" and name in reply["identities"], reply
    client.send({"type": "quit"})
    assert client.recv() == rc(name, f"MainHall-{server_id}", "")
    assert client.closed()


BAD_LINES: list[bytes] = [
    b"hello\n",  # not JSON
    b"\n",  # empty line
    b"   \r\n",
    b"{\"type\":\"message\"\n",  # truncated JSON
    b"[1,2]\n",  # not an object
    b"\"text\"\n",
    b"42\n",
    b"null\n",
    b"{}\n",  # no type
    b"{\"kind\":\"message\"}\n",
    b"{\"type\":\"nope\"}\n",  # unknown type
    b"{\"type\":5}\n",
    b"{\"type\":null}\n",
    b"{\"type\":\"" + b"x" * 5000 + b"\"}\n",  # a huge unknown type
    b"{\"type\":\"joinroom\"}\n",  # missing field
    b"{\"type\":\"createroom\",\"roomid\":7}\n",  # wrong-typed fields
    b"{\"type\":\"message\",\"content\":null}\n",
    b"{\"type\":\"message\",\"content\":[\"a\"]}\n",
    b"{\"type\":\"deleteroom\",\"roomid\":{\"a\":1}}\n",
    b"{\"type\":\"message\",\"content\":\"\xff\xfe\"}\n",  # invalid UTF-8
    b"\xc0\xaf\n",
    b"[" * 20000 + b"\n",  # deep nesting
    b"{\"type\":\"message\",\"content\":" + b"9" * 6000 + b"}\n",  # an int past Python's digit limit
    b"{\"type\":\"message\",\"content\":NaN}\n",
]


def test_bad_lines_after_newidentity_get_an_error_each_and_the_session_goes_on(source: Source) -> None:
    observer = source.login("BadObs1")
    client = source.login("BadLines1")
    assert observer.recv() == rc("BadLines1", "", S1_HALL)
    for line in BAD_LINES:
        client.send_raw(line)
        expect_error(client)
    # All at once, in one write: one error per line, in order, then a normal request still works.
    client.send_raw(b"".join(BAD_LINES[:8]) + b'{"type":"who"}\n')
    for _ in BAD_LINES[:8]:
        expect_error(client)
    reply = client.recv()
    assert reply["type"] == "roomcontents" and set(reply["identities"]) == {"BadObs1", "BadLines1"}, reply
    client.send({"type": "message", "content": "still here"})
    assert observer.recv() == {"type": "message", "identity": "BadLines1", "content": "still here"}
    observer.expect_nothing()  # the bad lines reached nobody else


def test_lines_before_newidentity_get_an_error_and_newidentity_still_works(source: Source) -> None:
    client = source.connect()
    for message in (
        {"type": "list"},
        {"type": "who"},
        {"type": "message", "content": "hi"},
        {"type": "createroom", "roomid": "Early1"},
        {"type": "joinroom", "roomid": S1_HALL},
        {"type": "deleteroom", "roomid": "Early1"},
        {"type": "quit"},
    ):
        client.send(message)
        expect_error(client)
    for line in BAD_LINES[:6]:
        client.send_raw(line)
        expect_error(client)
    assert client.login("Early1")
    assert client.recv() == rc("Early1", "", S1_HALL)


@pytest.mark.parametrize(
    "message",
    [
        {"type": "newidentity"},
        {"type": "newidentity", "identity": None},
        {"type": "newidentity", "identity": ["Alice"]},
        {"type": "newidentity", "identity": 12345},
        {"type": "movejoin", "identity": "Mover1"},
        {"type": "movejoin", "identity": "Mover1", "former": 1, "roomid": "x"},
    ],
)
def test_malformed_newidentity_and_movejoin_get_an_error_not_a_session(source: Source, message: dict) -> None:
    client = source.connect()
    client.send(message)
    expect_error(client)
    assert client.login("Malformed" + str(source.subnet))


@pytest.mark.parametrize("identity", ["x", "", "1abc", "a" * 17, "Zoë1", "has space"])
def test_invalid_identity_is_refused_then_closed(source: Source, identity: str) -> None:
    client = source.connect()
    client.send({"type": "newidentity", "identity": identity})
    assert client.recv() == {"type": "newidentity", "approved": "false"}
    assert client.closed()


def test_movejoin_for_a_free_identity_never_routed_is_accepted_as_the_protocol_says(source: Source) -> None:
    # protocol.md: only a movejoin whose identity is held elsewhere is refused.
    client = source.connect()
    client.send({"type": "movejoin", "identity": "Stray1", "former": "MainHall-s2", "roomid": "NoSuchRoom"})
    assert client.recv() == {"type": "serverchange", "approved": "true", "serverid": "s1"}
    assert client.recv() == rc("Stray1", "MainHall-s2", S1_HALL)
    client.send({"type": "quit"})
    assert client.recv() == rc("Stray1", S1_HALL, "")


def test_movejoin_for_an_identity_held_on_another_server_is_refused_and_closed(source: Source) -> None:
    holder = source.login("Held1", server_id="s2")
    impostor = source.connect("s1")
    impostor.send({"type": "movejoin", "identity": "Held1", "former": "MainHall-s2", "roomid": S1_HALL})
    reply = impostor.recv()
    assert reply["type"] == "serverchange" and reply["approved"] == "false", reply
    assert impostor.closed()
    holder.send({"type": "who"})  # the real holder is untouched
    reply = holder.recv()
    assert reply["type"] == "roomcontents" and reply["identities"] == ["Held1"], reply
    # And on the same server: an identity held by a local client.
    local = source.login("Held2")
    again = source.connect("s1", host=2)
    again.send({"type": "movejoin", "identity": "Held2", "former": "MainHall-s2", "roomid": S1_HALL})
    assert again.recv() == {"type": "serverchange", "approved": "false", "serverid": "s1"}
    assert again.closed()
    local.send({"type": "who"})
    assert local.recv()["identities"] == ["Held2"]


@pytest.mark.parametrize("with_newline", [False, True])
def test_over_long_line_disconnects_as_an_abrupt_quit_and_is_logged(
    source: Source, cluster: Cluster, with_newline: bool
) -> None:
    suffix = "N" if with_newline else "P"
    observer = source.login("LongObs" + suffix)
    client = source.login("Longer" + suffix)
    assert observer.recv() == rc("Longer" + suffix, "", S1_HALL)
    payload = b'{"type":"message","content":"' + b"a" * (LINE_LIMIT + 10) + b'"}'
    with contextlib.suppress(OSError):  # the server may reset the connection while we are still sending
        client.send_raw(payload + (b"\n" if with_newline else b""))
    assert client.closed(), "an over-long line must disconnect"
    assert observer.recv() == rc("Longer" + suffix, S1_HALL, "")
    observer.send({"type": "message", "content": "after"})  # the others are served as before
    observer.send({"type": "who"})
    assert observer.recv()["identities"] == ["LongObs" + suffix]
    wait_until(lambda: f"line longer than {LINE_LIMIT} bytes" in cluster.log("s1"), 5, what="the limit logged")
    assert_serving(source, "LongOk" + suffix)


def test_a_line_of_exactly_the_limit_is_served(source: Source) -> None:
    client = source.login("Exact1")
    prefix, suffix = b'{"type":"message","content":"', b'"}'
    line = prefix + b"b" * (LINE_LIMIT - len(prefix) - len(suffix)) + suffix
    assert len(line) == LINE_LIMIT
    client.send_raw(line + b"\n")
    client.send({"type": "who"})
    assert client.recv()["type"] == "roomcontents"


def test_slowloris_before_newidentity_is_closed_after_the_idle_limit(source: Source, cluster: Cluster) -> None:
    observer = source.login("Patient1")
    silent = source.connect(host=2)
    dribbler = source.connect(host=3)
    started = time.monotonic()
    # The dribbler sends a byte now and then, never a whole line: that does not count as identifying.
    while time.monotonic() - started < IDLE_S + 4:
        try:
            dribbler.send_raw(b"{")
        except OSError:
            break
        if dribbler.closed(timeout=0.3):
            break
    assert silent.closed(timeout=IDLE_S + 3)
    assert dribbler.closed(timeout=1)
    assert time.monotonic() - started < IDLE_S + 4
    log = cluster.log("s1")
    for ip in (source.ip(2), source.ip(3)):
        assert any(ip in line and "no newidentity within" in line for line in log.splitlines()), ip
    # An identified client idle for longer than that is not affected.
    observer.send({"type": "who"})
    assert observer.recv()["identities"] == ["Patient1"]


def test_connections_per_address_are_limited_and_other_addresses_are_not(source: Source, cluster: Cluster) -> None:
    clients = [source.login(f"PerIp{i}", host=1) for i in range(PER_IP)]
    refused = source.connect(host=1)
    reply = expect_error(refused)
    assert "too many connections" in reply["reason"], reply
    assert refused.closed()
    # Another address is served, and the full one is served again once one of its clients leaves.
    assert_serving(source, "PerIpOther")
    clients[0].send({"type": "quit"})
    assert clients[0].closed()

    def accepted_again() -> bool:
        client = source.connect(host=1)
        try:
            return refusal_at_accept(client) is None and client.login("PerIpAgain")
        finally:
            client.close()

    wait_until(accepted_again, 5, 0.1, "the address to be served again")
    assert any(source.ip(1) in line and "too many connections" in line for line in cluster.log("s1").splitlines())


def test_max_clients_refuses_with_an_error_line_then_serves_again(source: Source, cluster: Cluster) -> None:
    # Fill the server from several addresses (PER_IP each). Connections of earlier tests may still be
    # closing, so try until exactly MAX_CLIENTS get in before the refusal.
    deadline = time.monotonic() + 10
    while True:
        accepted: list[ChatClient] = []
        refusal: dict[str, Any] | None = None
        for n in itertools.count():
            client = source.connect(host=10 + n // PER_IP)
            refusal = refusal_at_accept(client)
            if refusal is not None:
                assert client.closed()
                break
            assert client.login(f"Full{n}")
            accepted.append(client)
        if len(accepted) == MAX_CLIENTS or time.monotonic() > deadline:
            break
        for client in accepted:
            client.close()
        time.sleep(0.2)
    assert refusal is not None and "server full" in refusal["reason"], refusal
    assert len(accepted) == MAX_CLIENTS
    assert "server full" in cluster.log("s1")
    # The clients already in are served; once one leaves, a newcomer gets in.
    accepted[0].send({"type": "who"})
    while (reply := accepted[0].recv())["type"] == "roomchange":
        pass
    assert reply["type"] == "roomcontents" and len(reply["identities"]) == MAX_CLIENTS
    accepted[-1].send({"type": "quit"})
    assert accepted[-1].closed()

    def newcomer_served() -> bool:
        client = source.connect(host=100)
        try:
            return refusal_at_accept(client) is None and client.login("FullLate")
        finally:
            client.close()

    wait_until(newcomer_served, 5, 0.1, "a free slot")


def test_garbage_that_is_not_even_text_at_high_volume_does_not_hurt_others(source: Source) -> None:
    observer = source.login("Volume1")
    noisy = source.connect(host=2)
    # Random binary without newlines, in pieces below the line limit, then a newline: one error.
    noisy.send_raw(bytes(range(256)).replace(b"\n", b"") * 100 + b"\n")
    expect_error(noisy)
    # Many bad lines in one go are each answered (within the rate limit's burst).
    noisy.send_raw(b"\x00\x01\x02\n" * 50)
    for _ in range(50):
        expect_error(noisy)
    observer.send({"type": "who"})
    assert observer.recv()["identities"] == ["Volume1"]
    observer.expect_nothing()


def test_every_reply_to_bad_input_is_one_json_object_with_a_string_type(source: Source) -> None:
    client = source.connect()
    client.send_raw(b"".join(BAD_LINES) + b'{"type":"newidentity","identity":"Typed1"}\n')
    replies = [client.recv() for _ in range(len(BAD_LINES) + 2)]
    for reply in replies:
        assert isinstance(reply.get("type"), str), reply
        json.dumps(reply).encode("ascii")
    assert replies[-2:] == [{"type": "newidentity", "approved": "true"}, rc("Typed1", "", S1_HALL)]
