"""ChatServer over real loopback sockets, with an honest in-memory single-server Directory.

Each test runs its own event loop (`asyncio.run`); waits are on messages with timeouts, never fixed sleeps
(except `expect_nothing`, whose point is that nothing arrives)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from cluster.names import Identity, RoomId, ServerId
from node.directory import Address, RoomInfo
from node.limits import Limits
from node.server import ChatServer
from node.stall import StallGuard

MAIN = "MainHall-s1"
pytestmark = pytest.mark.timeout(60)
# The tests send faster than a human: no rate limit unless a test sets one.
FAST = Limits(message_rate_per_s=0)


def rc(identity: str, former: str, roomid: str) -> dict[str, str]:
    return {"type": "roomchange", "identity": identity, "former": former, "roomid": roomid}


class MemoryDirectory:
    """The cluster as one server sees it, honest and in memory; a server s2 exists for remote rooms."""

    def __init__(self, server_id: str = "s1", shared: MemoryDirectory | None = None) -> None:
        self._server_id = ServerId(server_id)
        # With `shared`, this is another server's view of the same registry.
        self.identities: dict[str, str] = shared.identities if shared else {}  # "->sX" while in transit
        self.room_table: dict[str, RoomInfo] = shared.room_table if shared else {}
        self.ports: dict[str, int] = shared.ports if shared else {}
        hall = f"MainHall-{server_id}"
        self.room_table[hall] = RoomInfo(RoomId(hall), self._server_id, "")
        self.delay_s = 0.0
        self.hang = False
        self.explode = False
        self.calls: list[tuple[str, str]] = []

    @property
    def server_id(self) -> ServerId:
        return self._server_id

    async def _call(self, call: str, name: str) -> None:
        self.calls.append((call, name))
        if self.explode:
            raise RuntimeError("directory bug")
        if self.hang:
            await asyncio.Event().wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

    async def claim_identity(self, identity: Identity) -> bool:
        await self._call("claim", identity)
        if identity in self.identities:
            return False
        self.identities[identity] = self._server_id
        return True

    async def release_identity(self, identity: Identity) -> None:
        await self._call("release", identity)
        self.identities.pop(identity, None)
        for room_id, info in list(self.room_table.items()):
            if info.owner == identity:
                del self.room_table[room_id]

    async def create_room(self, room_id: RoomId, owner: Identity) -> bool:
        await self._call("create", room_id)
        if room_id in self.room_table:
            return False
        self.room_table[room_id] = RoomInfo(room_id, self._server_id, owner)
        return True

    async def delete_room(self, room_id: RoomId, owner: Identity) -> bool:
        await self._call("delete", room_id)
        info = self.room_table.get(room_id)
        if info is None or info.owner != owner:
            return False
        del self.room_table[room_id]
        return True

    async def begin_move(self, identity: Identity, to_server: ServerId) -> bool:
        await self._call("begin_move", identity)
        self.identities[identity] = "->" + to_server
        return True

    async def complete_move(self, identity: Identity) -> bool:
        await self._call("complete_move", identity)
        where = self.identities.get(identity)
        if where is not None and where != "->" + self._server_id:
            return False
        self.identities[identity] = self._server_id
        return True

    def room(self, room_id: str) -> RoomInfo | None:
        return self.room_table.get(room_id)

    def rooms(self) -> list[RoomInfo]:
        return list(self.room_table.values())

    def address(self, server_id: ServerId) -> Address:
        return Address("127.0.0.1", self.ports.get(server_id, 4999))


class Client:
    """A protocol-level test client on asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, rcvbuf: int | None = None) -> Client:
        if rcvbuf is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        else:
            # A small receive window set before connecting, so a reader that stops reading backs up fast.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(message).encode() + b"\n")

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise AssertionError("connection closed by server")
        assert line.endswith(b"\n")
        line.decode("ascii")  # the server writes ASCII only
        message = json.loads(line)
        assert isinstance(message.get("type"), str), message
        return message  # type: ignore[no-any-return]

    async def expect_nothing(self, within: float = 0.2) -> None:
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(self.reader.readline(), within)
            raise AssertionError(f"unexpected: {line!r}")

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (whatever was still unread is discarded)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    async def login(self, identity: str) -> None:
        await self.send({"type": "newidentity", "identity": identity})
        assert await self.recv() == {"type": "newidentity", "approved": "true"}
        assert await self.recv() == rc(identity, "", MAIN)

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def serving(limits: Limits = FAST, directory: MemoryDirectory | None = None, **kwargs: Any
                  ) -> AsyncIterator[tuple[ChatServer, MemoryDirectory]]:  # fmt: skip
    directory = directory if directory is not None else MemoryDirectory()
    server = ChatServer(ServerId("s1"), directory, "127.0.0.1", 0, limits, **kwargs)
    await server.start()
    try:
        yield server, directory
    finally:
        await server.close()


async def alice_and_bob(server: ChatServer) -> tuple[Client, Client]:
    """Alice and then Bob logged in to MainHall; Alice has seen Bob arrive."""
    a = await Client.connect(server.port)
    await a.login("Alice")
    b = await Client.connect(server.port)
    await b.login("Bob")
    assert await a.recv() == rc("Bob", "", MAIN)
    return a, b


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# -- the protocol over sockets ---------------------------------------------------------------------------


def test_newidentity_then_broadcast_to_mainhall_and_messages_to_others() -> None:
    async def scenario() -> None:
        async with serving() as (server, directory):
            a, b = await alice_and_bob(server)
            await a.send({"type": "message", "content": "héllo ☃"})
            assert await b.recv() == {"type": "message", "identity": "Alice", "content": "héllo ☃"}
            await a.expect_nothing()  # never echoed
            assert server.client_count == 2 and directory.identities == {"Alice": "s1", "Bob": "s1"}

    run(scenario)


def test_refused_newidentity_is_answered_false_then_closed() -> None:
    async def scenario() -> None:
        async with serving() as (server, directory):
            directory.identities["Alice"] = "s2"
            c = await Client.connect(server.port)
            await c.send({"type": "newidentity", "identity": "Alice"})
            assert await c.recv() == {"type": "newidentity", "approved": "false"}
            assert await c.closed()
            await eventually(lambda: server.connection_count == 0)

    run(scenario)


def test_quit_sends_own_roomchange_closes_and_releases_and_the_name_is_free_again() -> None:
    async def scenario() -> None:
        async with serving() as (server, directory):
            directory.delay_s = 0.05  # the release is still on its way when the same name logs in again
            a = await Client.connect(server.port)
            await a.login("Alice")
            b = await Client.connect(server.port)
            await b.login("Bob")
            await a.recv()
            await a.send({"type": "quit"})
            assert await a.recv() == rc("Alice", MAIN, "")
            assert await a.closed()
            assert await b.recv() == rc("Alice", MAIN, "")
            again = await Client.connect(server.port)
            await again.login("Alice")
            assert directory.identities["Alice"] == "s1"

    run(scenario)


def test_abrupt_disconnect_is_a_quit_for_the_others() -> None:
    async def scenario() -> None:
        async with serving() as (server, directory):
            a = await Client.connect(server.port)
            await a.login("Alice")
            b = await Client.connect(server.port)
            await b.login("Bob")
            await a.recv()
            b.writer.transport.abort()  # reset, no quit
            assert await a.recv() == rc("Bob", MAIN, "")
            await eventually(lambda: "Bob" not in directory.identities)

    run(scenario)


def test_createroom_joinroom_who_list_deleteroom_over_the_wire() -> None:
    async def scenario() -> None:
        async with serving() as (server, _):
            o = await Client.connect(server.port)
            await o.login("Olga")
            b = await Client.connect(server.port)
            await b.login("Bob")
            await o.recv()
            await o.send({"type": "createroom", "roomid": "Den"})
            assert await o.recv() == {"type": "createroom", "roomid": "Den", "approved": "true"}
            assert await o.recv() == rc("Olga", MAIN, "Den")
            assert await b.recv() == rc("Olga", MAIN, "Den")
            await b.send({"type": "joinroom", "roomid": "Den"})
            assert await b.recv() == rc("Bob", MAIN, "Den")
            assert await o.recv() == rc("Bob", MAIN, "Den")
            await b.send({"type": "who"})
            assert await b.recv() == {"type": "roomcontents", "roomid": "Den", "identities": ["Olga", "Bob"],
                                      "owner": "Olga"}  # fmt: skip
            await b.send({"type": "list"})
            assert sorted((await b.recv())["rooms"]) == ["Den", MAIN]
            await o.send({"type": "deleteroom", "roomid": "Den"})
            assert await o.recv() == {"type": "deleteroom", "roomid": "Den", "approved": "true"}
            for client in (o, b):
                assert await client.recv() == rc("Olga", "Den", MAIN)
                assert await client.recv() == rc("Bob", "Den", MAIN)

    run(scenario)


def test_route_to_another_server_then_closing_the_old_connection_is_not_a_quit() -> None:
    async def scenario() -> None:
        async with serving() as (server, directory):
            directory.room_table["Far"] = RoomInfo(RoomId("Far"), ServerId("s2"), "Zed")
            a = await Client.connect(server.port)
            await a.login("Alice")
            b = await Client.connect(server.port)
            await b.login("Bob")
            await a.recv()
            await a.send({"type": "joinroom", "roomid": "Far"})
            assert await a.recv() == {"type": "route", "roomid": "Far", "host": "127.0.0.1", "port": "4999"}
            assert await b.recv() == rc("Alice", MAIN, "Far")
            a.close()
            await b.expect_nothing(0.3)
            assert directory.identities["Alice"] == "->s2"
            assert ("release", "Alice") not in directory.calls

    run(scenario)


def test_movejoin_answers_serverchange_first() -> None:
    async def scenario() -> None:
        async with serving() as (server, directory):
            directory.identities["Mover"] = "->s1"
            m = await Client.connect(server.port)
            await m.send({"type": "movejoin", "identity": "Mover", "former": "Far", "roomid": "Gone"})
            assert await m.recv() == {"type": "serverchange", "approved": "true", "serverid": "s1"}
            assert await m.recv() == rc("Mover", "Far", MAIN)

    run(scenario)


def test_lines_sent_together_with_newidentity_are_answered_after_it_in_order() -> None:
    async def scenario() -> None:
        async with serving() as (server, directory):
            directory.delay_s = 0.1
            c = await Client.connect(server.port)
            await c.send_raw(b'{"type":"newidentity","identity":"Alice"}\n{"type":"who"}\nnot json\n')
            assert (await c.recv())["approved"] == "true"
            assert await c.recv() == rc("Alice", "", MAIN)
            assert (await c.recv())["type"] == "roomcontents"
            assert (await c.recv())["type"] == "error"

    run(scenario)


# -- bad input ------------------------------------------------------------------------------------------


def test_invalid_utf8_and_other_bad_lines_get_an_error_and_the_session_goes_on() -> None:
    async def scenario() -> None:
        async with serving() as (server, _):
            a = await Client.connect(server.port)
            await a.login("Alice")
            for bad in (b'{"type":"message","content":"\xff\xfe"}', b"[]", b'{"type":"fly"}', b"1" * 6000, b""):
                await a.send_raw(bad + b"\n")
                reply = await a.recv()
                assert reply["type"] == "error" and isinstance(reply["reason"], str), reply
            await a.send({"type": "who"})
            assert (await a.recv())["type"] == "roomcontents"

    run(scenario)


def test_line_too_long_disconnects_as_an_abrupt_quit_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with serving(Limits(message_rate_per_s=0, max_line_bytes=1024)) as (server, directory):
            a = await Client.connect(server.port)
            await a.login("Alice")
            b = await Client.connect(server.port)
            await b.login("Bob")
            await a.recv()
            await b.send_raw(b'{"type":"message","content":"' + b"x" * 5000)
            assert await b.closed()
            assert await a.recv() == rc("Bob", MAIN, "")
            await eventually(lambda: "Bob" not in directory.identities)

    with caplog.at_level(logging.WARNING, logger="chatmesh.server"):
        run(scenario)
    assert [r for r in caplog.records if "line longer than 1024" in r.getMessage() and "127.0.0.1:" in r.getMessage()]


# -- limits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["close", "reset"])
def test_input_read_while_the_server_stalled_waits_for_the_guard_and_keeps_its_order(ending: str) -> None:
    """A TCP client's reads after a stall are held, with reading paused, until the stall guard reopens
    (the server then knows it is still live); then every line and the end (a close, or a reset that
    arrives while held) are served in order."""

    async def scenario() -> None:
        guard = StallGuard(threshold_s=0.05, on_stall=lambda gap: None)
        async with serving(stall_guard=guard) as (server, _):
            loop = asyncio.get_running_loop()
            a, b = await alice_and_bob(server)
            guard.last_tick = loop.time() - 1.0  # the watchdog last ran a second ago: the next read sees a stall
            await a.send({"type": "message", "content": "one"})
            await a.send({"type": "message", "content": "two"})
            if ending == "close":
                a.close()
            await b.expect_nothing(0.3)
            assert not guard.is_open
            held = [p for p in server._protocols if p.held is not None]
            assert len(held) == 1 and held[0].transport is not None and not held[0].transport.is_reading()
            if ending == "reset":
                sock = a.writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                a.writer.transport.abort()  # an RST, which a paused transport notices at its next write
                transport = held[0].transport

                def lost() -> bool:
                    if not transport.is_closing():
                        transport.write(b"\n")  # as a reply or a broadcast to Alice would
                    return held[0].held is not None and held[0].held[-1] == (None, None)

                await eventually(lost)
            guard.last_tick = None  # no watchdog in this test: no further stall is seen
            guard.reopen()
            assert await b.recv() == {"type": "message", "identity": "Alice", "content": "one"}
            assert await b.recv() == {"type": "message", "identity": "Alice", "content": "two"}
            assert await b.recv() == rc("Alice", MAIN, "")
            await eventually(lambda: server.client_count == 1)

    run(scenario)


def test_slow_reader_is_disconnected_without_stalling_the_room() -> None:
    async def scenario() -> None:
        limits = Limits(message_rate_per_s=0, max_pending_output_bytes=64 * 1024)
        async with serving(limits) as (server, _):
            sender = await Client.connect(server.port)
            await sender.login("Sender")
            fast = await Client.connect(server.port)
            await fast.login("Fast")
            slow = await Client.connect(server.port, rcvbuf=4096)
            await slow.login("Slow")  # then never reads again
            assert await sender.recv() == rc("Fast", "", MAIN)
            assert await sender.recv() == rc("Slow", "", MAIN)
            assert await fast.recv() == rc("Slow", "", MAIN)
            # The sender keeps a window of messages in flight towards the fast reader (as a room whose readers
            # keep up); the slow reader's backlog grows past the kernel buffers and the output limit.
            text = "x" * 4000
            window, rounds = 8, 250  # 8 MB in all
            slow_gone = False
            for _ in range(rounds):
                for _ in range(window):
                    await sender.send({"type": "message", "content": text})
                got = 0
                while got < window:
                    message = await fast.recv()
                    if message == rc("Slow", MAIN, ""):
                        slow_gone = True
                        continue
                    assert message == {"type": "message", "identity": "Sender", "content": text}
                    got += 1
            assert slow_gone
            assert await sender.recv() == rc("Slow", MAIN, "")
            assert server.counters["slow_reader_drops"] == 1
            assert server.client_count == 2

    run(scenario)


def test_max_connections_per_address_refuses_with_an_error_line() -> None:
    async def scenario() -> None:
        async with serving(Limits(message_rate_per_s=0, max_connections_per_ip=2)) as (server, _):
            first = await Client.connect(server.port)
            second = await Client.connect(server.port)
            third = await Client.connect(server.port)
            assert (await third.recv())["type"] == "error"
            assert await third.closed()
            await first.login("Alice")
            second.close()
            await eventually(lambda: server.connection_count == 1)
            fourth = await Client.connect(server.port)
            await fourth.login("Bob")

    run(scenario)


def test_max_clients_refuses_with_an_error_line() -> None:
    async def scenario() -> None:
        async with serving(Limits(message_rate_per_s=0, max_clients=1)) as (server, _):
            first = await Client.connect(server.port)
            await first.login("Alice")
            second = await Client.connect(server.port)
            reply = await second.recv()
            assert reply["type"] == "error" and "full" in reply["reason"]
            assert await second.closed()

    run(scenario)


def test_a_connection_that_never_sends_newidentity_is_closed(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with serving(Limits(message_rate_per_s=0, idle_before_identity_s=0.5)) as (server, _):
            active = await Client.connect(server.port)
            await active.login("Alice")
            idle = await Client.connect(server.port)
            await idle.send({"type": "list"})  # any line but newidentity does not count
            assert (await idle.recv())["type"] == "error"
            assert await idle.closed(5)
            await active.expect_nothing(0.2)  # identified in time: stays
            await active.send({"type": "who"})
            assert (await active.recv())["identities"] == ["Alice"]

    with caplog.at_level(logging.WARNING, logger="chatmesh.server"):
        run(scenario)
    assert [r for r in caplog.records if "no newidentity within 0.5s" in r.getMessage()]


def test_rate_limit_excess_gets_an_error_line_and_abuse_disconnects(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        # A refill every 100 s: no token comes back while the test runs, however slow the machine.
        limits = Limits(message_rate_per_s=0.01, message_burst=3, max_excess_lines=4)
        async with serving(limits) as (server, _):
            a = await Client.connect(server.port)
            await a.login("Alice")  # one token
            b = await Client.connect(server.port)
            await b.login("Bob")
            await a.recv()
            await a.send({"type": "message", "content": "1"})
            await a.send({"type": "message", "content": "2"})
            assert (await b.recv())["content"] == "1"
            assert (await b.recv())["content"] == "2"
            await a.send({"type": "message", "content": "3"})
            assert (await a.recv()) == {"type": "error", "reason": "rate limit exceeded: line dropped"}
            await a.send_raw(b'{"type":"message","content":"x"}\n' * 10)
            assert await a.closed()
            assert await b.recv() == rc("Alice", MAIN, "")

    with caplog.at_level(logging.WARNING, logger="chatmesh.server"):
        run(scenario)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("line rate limit exceeded" in m for m in messages) == 1  # logged once per connection
    assert sum("kept exceeding" in m for m in messages) == 1


# -- the directory misbehaving --------------------------------------------------------------------------


def test_a_directory_that_never_answers_is_a_refusal_after_the_timeout() -> None:
    async def scenario() -> None:
        async with serving(directory_timeout_s=0.2) as (server, directory):
            directory.hang = True
            c = await Client.connect(server.port)
            await c.send({"type": "newidentity", "identity": "Alice"})
            assert await c.recv() == {"type": "newidentity", "approved": "false"}
            assert await c.closed()

    run(scenario)


def test_a_directory_that_raises_is_a_refusal() -> None:
    async def scenario() -> None:
        async with serving() as (server, directory):
            c = await Client.connect(server.port)
            await c.login("Alice")
            directory.explode = True
            await c.send({"type": "createroom", "roomid": "Den"})
            assert await c.recv() == {"type": "createroom", "roomid": "Den", "approved": "false"}
            await c.send({"type": "who"})
            assert (await c.recv())["identities"] == ["Alice"]

    run(scenario)


# -- operator actions, shutdown, lifetime ---------------------------------------------------------------------


def test_kick_operator_delete_and_snapshot() -> None:
    async def scenario() -> None:
        async with serving() as (server, directory):
            o = await Client.connect(server.port)
            await o.login("Olga")
            await o.send({"type": "createroom", "roomid": "Den"})
            await o.recv()
            await o.recv()
            b = await Client.connect(server.port)
            await b.login("Bob")
            snap = server.snapshot()
            assert {(c.identity, c.room_id) for c in snap.clients} == {("Olga", "Den"), ("Bob", MAIN)}
            assert all(c.address.startswith("127.0.0.1:") for c in snap.clients)
            assert server.latest_snapshot is snap
            assert await server.operator_delete_room(MAIN) == "mainhall"
            assert await server.operator_delete_room("Nowhere") == "not-found"
            directory.room_table["Far"] = RoomInfo(RoomId("Far"), ServerId("s2"), "Zed")
            assert await server.operator_delete_room("Far") == "not-local"
            directory.explode = True
            assert await server.operator_delete_room("Den") == "unavailable"
            directory.explode = False
            await o.expect_nothing(0.05)
            assert await server.operator_delete_room("Den") == "ok"
            assert "Den" not in directory.room_table
            assert await o.recv() == rc("Olga", "Den", MAIN)
            assert await b.recv() == rc("Olga", "Den", MAIN)
            assert await server.kick("Bob")
            assert await b.recv() == rc("Bob", MAIN, "")
            assert await b.closed()
            assert await o.recv() == rc("Bob", MAIN, "")
            assert not await server.kick("Bob")
            assert server.snapshot().counters["kicks"] == 1
            with pytest.raises(TypeError):
                snap.counters["kicks"] = 5  # type: ignore[index]

    run(scenario)


def test_a_room_the_registry_deleted_after_a_refused_deleteroom_goes_here_too() -> None:
    async def scenario() -> None:
        async with serving() as (server, directory):
            o = await Client.connect(server.port)
            await o.login("Olga")
            await o.send({"type": "createroom", "roomid": "Den"})
            await o.recv()
            await o.recv()
            b = await Client.connect(server.port)
            await b.login("Bob")
            await b.send({"type": "joinroom", "roomid": "Den"})
            assert await b.recv() == rc("Bob", MAIN, "Den")
            assert await o.recv() == rc("Bob", MAIN, "Den")
            server.room_gone_from_registry("Nowhere")  # not here: nothing happens
            server.room_gone_from_registry(MAIN)  # never dissolved
            await o.expect_nothing(0.05)
            server.room_gone_from_registry("Den")
            assert await o.recv() == rc("Olga", "Den", MAIN)
            assert await o.recv() == rc("Bob", "Den", MAIN)
            assert {(c.identity, c.room_id) for c in server.snapshot().clients} == {("Olga", MAIN), ("Bob", MAIN)}
            await o.send({"type": "list"})
            assert "Den" not in (await o.recv())["rooms"]

    run(scenario)


def test_graceful_shutdown_tells_every_client_and_releases_them() -> None:
    async def scenario() -> None:
        directory = MemoryDirectory()
        server = ChatServer(ServerId("s1"), directory, "127.0.0.1", 0, FAST)
        await server.start()
        a = await Client.connect(server.port)
        await a.login("Alice")
        b = await Client.connect(server.port)
        await b.login("Bob")
        await server.shutdown()
        assert await a.recv() == rc("Bob", "", MAIN)
        assert await a.recv() == rc("Alice", MAIN, "")
        assert await b.recv() == rc("Bob", MAIN, "")
        assert await a.closed() and await b.closed()
        assert directory.identities == {}
        with pytest.raises(OSError):
            await Client.connect(server.port)

    run(scenario)


def test_close_leaves_no_tasks_behind() -> None:
    async def scenario() -> None:
        before = asyncio.all_tasks()
        async with serving(directory_timeout_s=5) as (server, directory):
            clients = [await Client.connect(server.port) for _ in range(5)]
            for i, c in enumerate(clients[:3]):
                await c.login(f"User{i}")
            directory.hang = True
            await clients[3].send({"type": "newidentity", "identity": "Hanging"})
            await eventually(lambda: ("claim", "Hanging") in directory.calls)
        # `serving` closed the server: nothing it started is left.
        assert asyncio.all_tasks() == before

    run(scenario)


def test_many_clients_connecting_and_quitting_leave_nothing_behind() -> None:
    async def scenario() -> None:
        async with serving() as (server, directory):
            for round_ in range(100):
                c = await Client.connect(server.port)
                await c.login(f"Churn{round_ % 7}")
                await c.send({"type": "quit"})
                await c.recv()
                assert await c.closed()
            await eventually(lambda: server.connection_count == 0 and not directory.identities)
            assert server.core.session_count == 0 and not server._tasks

    run(scenario)


def test_a_client_routed_to_another_server_moves_there_with_movejoin() -> None:
    async def scenario() -> None:
        d1 = MemoryDirectory("s1")
        d2 = MemoryDirectory("s2", shared=d1)
        s1 = ChatServer(ServerId("s1"), d1, "127.0.0.1", 0, FAST)
        s2 = ChatServer(ServerId("s2"), d2, "127.0.0.1", 0, FAST)
        await s1.start()
        await s2.start()
        d1.ports.update(s1=s1.port, s2=s2.port)
        try:
            b = await Client.connect(s2.port)
            await b.send({"type": "newidentity", "identity": "Bob"})
            assert (await b.recv())["approved"] == "true"
            assert await b.recv() == rc("Bob", "", "MainHall-s2")
            await b.send({"type": "createroom", "roomid": "Den"})
            assert (await b.recv())["approved"] == "true"
            assert await b.recv() == rc("Bob", "MainHall-s2", "Den")
            a = await Client.connect(s1.port)
            await a.login("Alice")
            await a.send({"type": "list"})
            assert sorted((await a.recv())["rooms"]) == ["Den", MAIN, "MainHall-s2"]
            await a.send({"type": "joinroom", "roomid": "Den"})
            route = await a.recv()
            assert route == {"type": "route", "roomid": "Den", "host": "127.0.0.1", "port": str(s2.port)}
            a.close()
            moved = await Client.connect(int(route["port"]))
            await moved.send({"type": "movejoin", "identity": "Alice", "former": MAIN, "roomid": "Den"})
            assert await moved.recv() == {"type": "serverchange", "approved": "true", "serverid": "s2"}
            assert await moved.recv() == rc("Alice", MAIN, "Den")
            assert await b.recv() == rc("Alice", MAIN, "Den")
            assert d1.identities["Alice"] == "s2"
            await moved.send({"type": "message", "content": "hi Bob"})
            assert await b.recv() == {"type": "message", "identity": "Alice", "content": "hi Bob"}
            # The owner quits: Alice is moved to s2's MainHall and told so.
            await b.send({"type": "quit"})
            assert await b.recv() == rc("Bob", "Den", "")
            assert await moved.recv() == rc("Bob", "Den", "")
            assert await moved.recv() == rc("Alice", "Den", "MainHall-s2")
            await eventually(lambda: "Bob" not in d1.identities and "Den" not in d1.room_table)
            assert s1.local_identities() == [] and s2.local_identities() == ["Alice"]
            # A movejoin for a client held elsewhere is refused, then closed.
            c = await Client.connect(s1.port)
            await c.login("Carol")
            thief = await Client.connect(s2.port)
            await thief.send({"type": "movejoin", "identity": "Carol", "former": MAIN, "roomid": "Den"})
            assert await thief.recv() == {"type": "serverchange", "approved": "false", "serverid": "s2"}
            assert await thief.closed()
        finally:
            await s1.close()
            await s2.close()

    run(scenario)


def test_disconnect_all_tells_clients_without_releasing_and_keeps_serving() -> None:
    async def scenario() -> None:
        events: list[tuple[str, int]] = []
        async with serving(metrics_hook=lambda name, n: events.append((name, n))) as (server, directory):
            a = await Client.connect(server.port)
            await a.login("Alice")
            await server.disconnect_all()
            assert await a.recv() == rc("Alice", MAIN, "")
            assert await a.closed()
            assert ("release", "Alice") not in directory.calls
            directory.identities.clear()  # what the cluster did when it declared this server down
            again = await Client.connect(server.port)
            await again.login("Alice")
        assert events.count(("connections_accepted", 1)) == 2

    run(scenario)


def test_a_login_waits_for_the_reconcilers_release_of_its_name() -> None:
    """The reconciler's release of an orphan name goes first; a login of that name here waits for it
    instead of racing it to the coordinator (which the release could reach last and free the new name)."""

    async def scenario() -> None:
        async with serving() as (server, directory):
            directory.identities["Alice"] = "s1"  # registered here, no session: an orphan
            directory.delay_s = 0.5
            release = asyncio.ensure_future(server.release_orphan(Identity("Alice")))
            await eventually(lambda: ("release", "Alice") in directory.calls)
            directory.delay_s = 0.0  # a claim sent now would be answered at once, "taken"
            c = await Client.connect(server.port)
            await c.login("Alice")
            await release
            assert directory.calls[-2:] == [("release", "Alice"), ("claim", "Alice")]
            assert directory.identities == {"Alice": "s1"}

    run(scenario)


def test_broadcasts_right_after_a_flush_are_coalesced_but_replies_never_wait() -> None:
    """`broadcast_coalesce_s`: the first line after a quiet moment goes out at once; a line that follows a
    write closely waits for the rest of the window, so a busy room's lines leave in fewer writes; a reply
    to the client's own request is written at once, and takes any waiting broadcast with it."""
    window = 0.4  # far above any scheduling jitter, so the test is about the rule, not the clock

    async def scenario() -> None:
        async with serving(Limits(message_rate_per_s=0, broadcast_coalesce_s=window)) as (server, _):
            loop = asyncio.get_running_loop()
            a, b = await alice_and_bob(server)
            await asyncio.sleep(window)  # a quiet moment (the login's writes are older than the window)
            sent = loop.time()
            await a.send({"type": "message", "content": "one"})
            assert await b.recv(window / 2) == {"type": "message", "identity": "Alice", "content": "one"}
            assert loop.time() - sent < window / 2
            await a.send({"type": "message", "content": "two"})
            await b.expect_nothing(window / 4)  # held: it follows the last write closely
            assert await b.recv(window) == {"type": "message", "identity": "Alice", "content": "two"}
            await a.send({"type": "message", "content": "three"})
            asked = loop.time()
            await a.send({"type": "list"})
            assert (await a.recv(window / 2))["type"] == "roomlist"
            assert loop.time() - asked < window / 2  # the reply did not wait
            assert await b.recv(window / 2) == {"type": "message", "identity": "Alice", "content": "three"}

    run(scenario)
