"""Simulated chat clients: they speak the client protocol (/work/shared/protocol.md) over in-memory
connections handed to the production `ChatServer`, and check that every request gets exactly one answer.

A client does one request at a time: newidentity, createroom, joinroom (following a `route` with a
movejoin on the new server), deleteroom, list, who, message, quit, or an abrupt disconnect. What counts as
the answer to each request:
- newidentity: the `newidentity` reply; movejoin: the `serverchange` reply;
- createroom / deleteroom: the reply naming the same room;
- joinroom R: a `route` to R, or a roomchange of the client itself into R (moved) or with former ==
  roomid (refused);
- list / who: `roomlist` / `roomcontents`; quit: its own roomchange to "".
A typed reply nobody asked for is a violation (two answers to one request). A connection that ends while a
request is open ends that request (the server crashed, was fenced, or closed the session); only a login
(newidentity or movejoin) must never be closed unanswered by a server that is still running, unless the
cluster declared that server down meanwhile (fenced, it drops every connection as a crash would).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.sim.cluster.world import SimServer, World

# Link delay between a client and a server (seconds, uniform).
CLIENT_DELAY_S = (0.0005, 0.003)
ORDER_STEP_S = 1e-6
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
ROOMS = ["lobby", "garden", "cellar", "attic"]


class ClientTransport(asyncio.Transport):
    """The server's end of an in-memory client connection: writes go to the simulated client; reads come
    from it into the server's `ClientProtocol`, as asyncio's socket transport delivers them (in order,
    held while reading is paused, then `connection_lost` once closed)."""

    def __init__(self, connection: Connection) -> None:
        super().__init__()
        self.connection = connection
        self._closing = False
        self._paused: list[Callable[[], object]] | None = None  # reads held while paused

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self.connection.to_client(bytes(data))

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.connection.to_client(b"")
            self.connection.server.loop.call_soon(self.connection.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        if self._paused is None:
            self._paused = []

    def resume_reading(self) -> None:
        held, self._paused = self._paused or [], None
        for read in held:
            self.read(read)

    def is_reading(self) -> bool:
        return self._paused is None

    def read(self, action: Callable[[], object]) -> None:
        """Hand the protocol one read (or the end of the stream), unless reading is paused or closed."""
        if self._paused is not None:
            self._paused.append(action)
        elif not self._closing:
            action()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return (f"10.0.0.{self.connection.client.index}", 40000 + self.connection.number)
        return default


@dataclass
class Pending:
    kind: str
    detail: str
    sent_at: float
    paused_before: float  # the server's total frozen time when sent (frozen time does not count)
    incarnation: int  # the server's incarnation when sent (a fenced server starts a new one)


class Connection:
    def __init__(self, client: SimClient, server: SimServer, number: int) -> None:
        self.client = client
        self.server = server
        self.number = number
        self.world = client.world
        self.closed_by_client = False
        self.open = True
        self._to_server_at = float("-inf")
        self._to_client_at = float("-inf")
        self._buffer = b""
        self.transport = ClientTransport(self)
        self.protocol = server.node.chat.client_protocol()
        server.loop.call_soon(self.protocol.connection_made, self.transport)  # as asyncio's accept does

    def _delay(self) -> float:
        return self.world.rng.uniform(*CLIENT_DELAY_S)

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        self._to_server(lambda: self.protocol.data_received(data))

    def close(self) -> None:
        """The client closes its end (quit done, route followed, or an abrupt disconnect)."""
        if not self.open:
            return
        self.open = False
        self.closed_by_client = True
        self._to_server(self.protocol.eof_received)

    def _to_server(self, action: Callable[[], object]) -> None:
        if not self.server.alive:
            return
        at = max(self.world.clock.now + self._delay(), self._to_server_at + ORDER_STEP_S)
        self._to_server_at = at
        server = self.server

        def deliver() -> None:
            if server.alive:
                self.transport.read(action)

        server.loop.call_at(at, deliver)

    def to_client(self, data: bytes) -> None:
        """Bytes from the server (b"" = the server closed the connection)."""
        at = max(self.world.clock.now + self._delay(), self._to_client_at + ORDER_STEP_S)
        self._to_client_at = at
        self.world.scheduler.at(at, lambda: self.client.on_data(self, data))

    def reset(self) -> None:
        """The server's process died: the client sees the connection reset."""
        self.world.scheduler.after(self._delay(), lambda: self.client.on_data(self, b""))


class SimClient:
    def __init__(self, world: World, index: int) -> None:
        self.world = world
        self.index = index
        self.conn: Connection | None = None
        self.identity: str | None = None
        self.room: str | None = None
        self.owns: str | None = None
        self.pending: Pending | None = None
        self.answers = 0
        self.route: tuple[str, str, str] | None = None  # (server, former, room) while moving
        self.last_login: tuple[str, str] | None = None  # (server, identity) of the last session
        self._connections = 0

    # -- acting -----------------------------------------------------------------------------------------

    def act(self) -> None:
        """One random step (a world event)."""
        world = self.world
        rng = world.rng
        if self.pending is not None:
            return
        if self.conn is None:
            servers = [s for s in world.servers_alive()]
            if not servers or rng.random() < 0.2:
                return
            last = self.last_login
            if last is not None and rng.random() < 0.5 and world.servers[last[0]].alive:
                # Churn: log in again at once, same name, same server (a client that reconnects).
                server, name = world.servers[last[0]], last[1]
            else:
                server, name = rng.choice(servers), rng.choice(NAMES)
            self._connect(server)
            self._request("newidentity", name, {"type": "newidentity", "identity": ""})
            return
        if self.identity is None:
            return
        roll = rng.random()
        if roll < 0.2:
            room = rng.choice(ROOMS)
            self._request("createroom", room, {"type": "createroom", "roomid": room})
        elif roll < 0.5:
            targets = ROOMS + [f"MainHall-{sid}" for sid in world.ids]
            room = rng.choice(targets)
            self._request("joinroom", room, {"type": "joinroom", "roomid": room})
        elif roll < 0.6:
            room = self.owns if self.owns and rng.random() < 0.8 else rng.choice(ROOMS)
            self._request("deleteroom", room, {"type": "deleteroom", "roomid": room})
        elif roll < 0.7:
            self._request("list", "", {"type": "list"})
        elif roll < 0.78:
            self._request("who", "", {"type": "who"})
        elif roll < 0.88:
            self.conn.send({"type": "message", "content": f"hi from {self.identity}"})
        elif roll < 0.94:
            self._request("quit", "", {"type": "quit"})
        else:
            self.world.log(f"c{self.index} {self.identity} disconnects abruptly")
            where = (self.conn.server.server_id, self.identity)
            self._end_session()
            self._maybe_relogin(where)

    def _maybe_relogin(self, where: tuple[str, str | None]) -> None:
        """The churn scenario: a user who quit or dropped logs in again at once, same name, same server
        (a reconnect, or someone else grabbing the name that just came free)."""
        world = self.world
        sid, name = where
        if not world.options.churn or name is None:
            return

        def relogin() -> None:
            server = world.servers.get(sid)
            if not world.chaos or self.conn is not None or server is None or not server.alive:
                return
            self._connect(server)
            self._request("newidentity", name, {"type": "newidentity", "identity": ""})

        world.scheduler.after(world.rng.uniform(0.0, 0.02), relogin)

    def _connect(self, server: SimServer) -> None:
        self._connections += 1
        self.conn = Connection(self, server, self._connections)
        self.identity = self.room = self.owns = None

    def _request(self, kind: str, detail: str, message: dict[str, Any]) -> None:
        assert self.conn is not None
        if kind == "newidentity":
            message["identity"] = detail
        server = self.conn.server
        self.pending = Pending(kind, detail, self.world.clock.now, server.paused_total, server.node.incarnation)
        self.world.log(f"c{self.index} {self.identity or '-'}@{self.conn.server.server_id} {kind} {detail}".rstrip())
        self.conn.send(message)

    def _end_session(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.identity = self.room = self.owns = None
        self.pending = None
        self.route = None

    # -- what arrives ---------------------------------------------------------------------------------

    def on_data(self, conn: Connection, data: bytes) -> None:
        if conn is not self.conn:
            return  # an old connection: the client stopped listening to it
        if not data:
            self._on_closed(conn)
            return
        conn._buffer += data
        *lines, conn._buffer = conn._buffer.split(b"\n")
        for line in lines:
            if self.conn is not conn:
                return
            self._on_message(conn, json.loads(line))

    def _answered(self, what: str) -> None:
        self.answers += 1
        self.world.log(f"c{self.index} <- {what}")
        self.pending = None

    def _unsolicited(self, message: dict[str, Any]) -> None:
        self.world.fail(f"client c{self.index} ({self.identity}) got a reply nobody asked for: {message}")

    def _on_message(self, conn: Connection, m: dict[str, Any]) -> None:
        kind = m.get("type")
        p = self.pending
        if kind == "newidentity":
            if p is None or p.kind != "newidentity":
                return self._unsolicited(m)
            self._answered(f"newidentity {p.detail} {m['approved']}")
            if m["approved"] == "true":
                self.identity, self.room = p.detail, f"MainHall-{conn.server.server_id}"
                self.last_login = (conn.server.server_id, p.detail)
        elif kind == "serverchange":
            if p is None or p.kind != "movejoin":
                return self._unsolicited(m)
            self._answered(f"serverchange {m['approved']}")
            if m["approved"] == "true":
                self.identity = p.detail
        elif kind in ("createroom", "deleteroom"):
            if p is None or p.kind != kind or p.detail != m.get("roomid"):
                return self._unsolicited(m)
            self._answered(f"{kind} {p.detail} {m['approved']}")
            if m["approved"] == "true":
                self.owns = p.detail if kind == "createroom" else None
        elif kind == "route":
            if p is None or p.kind != "joinroom" or p.detail != m.get("roomid"):
                return self._unsolicited(m)
            self._answered(f"route {p.detail} to port {m['port']}")
            self._follow_route(conn, m)
        elif kind == "roomlist":
            if p is None or p.kind != "list":
                return self._unsolicited(m)
            self._answered("roomlist")
        elif kind == "roomcontents":
            if p is None or p.kind != "who":
                return self._unsolicited(m)
            self._answered("roomcontents")
        elif kind == "roomchange" and m.get("identity") == self.identity:
            former, room = m.get("former"), m.get("roomid")
            if p is not None and p.kind == "joinroom" and (room == p.detail or former == room):
                self._answered(f"roomchange {former} -> {room}")
            elif p is not None and p.kind == "quit" and room == "":
                self._answered("quit")
                where = (conn.server.server_id, self.identity)
                self._end_session()
                self._maybe_relogin(where)
                return
            if room:
                self.room = room
            if self.owns is not None and former == self.owns and room != self.owns:
                self.owns = None  # its room was deleted under it (an operator, or a fence)

    def _follow_route(self, conn: Connection, m: dict[str, Any]) -> None:
        target = self.world.server_by_port(int(m["port"]))
        identity, former, room = self.identity, self.room or "", str(m["roomid"])
        conn.close()
        self.conn = None
        if target is None or identity is None:
            self._end_session()
            return
        self._connect(target)
        self.pending = Pending("movejoin", identity, self.world.clock.now, target.paused_total, target.node.incarnation)
        self.world.log(f"c{self.index} {identity}@{target.server_id} movejoin {former} -> {room}")
        assert self.conn is not None
        self.conn.send({"type": "movejoin", "identity": identity, "former": former, "roomid": room})

    def _on_closed(self, conn: Connection) -> None:
        p = self.pending
        fenced = conn.server.node.incarnation != (p.incarnation if p is not None else None)
        if p is not None and p.kind in ("newidentity", "movejoin") and conn.server.alive and not fenced:
            self.world.fail(f"client c{self.index}: {conn.server.server_id} closed a {p.kind} {p.detail} unanswered")
        self.world.log(f"c{self.index} connection to {conn.server.server_id} closed")
        self.conn = None
        self.identity = self.room = self.owns = None
        self.pending = None

    # -- invariants -------------------------------------------------------------------------------------

    def overdue(self, now: float, bound_s: float) -> str | None:
        p = self.pending
        if p is None or self.conn is None:
            return None
        server = self.conn.server
        waited = now - p.sent_at - (server.paused_total - p.paused_before)
        if server.paused:
            return None
        if waited > bound_s:
            return f"client c{self.index}: {p.kind} {p.detail} to {server.server_id} unanswered for {waited:.2f}s"
        return None
