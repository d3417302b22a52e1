"""The client listener: a thin asyncio shell that moves bytes between sockets and the pure `ChatCore`.

Theory of operation
-------------------
Each TCP connection's `ClientProtocol` hands every read to the server in the callback that read it (a
WebSocket connection's reader task does the same with its frames' lines): split into lines
(`LineDecoder`, bounded), rate-limited, each line given to the core, the core's effects applied at once.
Nothing here awaits a client: output goes to a per-connection buffer, and one flush writes each
connection's buffer to its transport in a single write (a broadcast is encoded once for all its
receivers; broadcasts that follow a flush closely wait `broadcast_coalesce_s` for more). A client
whose unsent output (our buffer plus the transport's) exceeds `max_pending_output_bytes` is aborted and
dropped as an abrupt quit, so a slow reader can neither stall its room nor grow memory.

Cluster requests (`ClaimIdentityRequest`, `CreateRoomRequest`, ...) run as tracked tasks that await the `Directory`
under a timeout and feed the answer back to the core; registry releases run the same way. Every task
this server starts is in a set it cancels and awaits on close: nothing is fire-and-forget.

A connection lives in `_conns` from accept until the core emits `Close` for it (or the server closes);
that can be after its input ended (the peer closed while a request was in flight). Connections
are counted per address and in total from accept to close.

Threads: everything runs on the loop, and nothing here is read from another thread: the admin thread
sees this server only in the node's published snapshot (`node.status.SnapshotBox`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import ssl
import types
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, assert_never, cast

from cluster.framing import LineDecoder, LineTooLong, encode
from cluster.names import Identity, RoomId, ServerId
from node import protocol as wire
from node.chat import (
    DELETED,
    REQUEST_TYPES,
    BeginMoveRequest,
    ChatCore,
    ClaimIdentityRequest,
    Close,
    CompleteMoveRequest,
    ConnId,
    CreateRoomRequest,
    DeleteRoomRequest,
    Deliver,
    Effect,
    LimitExceeded,
    Multicast,
    ReleaseIdentityRequest,
    ReleaseRoom,
    Request,
    RoomSnapshot,
)
from node.directory import Directory
from node.limits import ALLOW, Limits, RateLimiter, Verdict
from node.stall import StallGuard

log = logging.getLogger("chatmesh.server")

# Upper bound on one Directory call; it promises to return within a few seconds, this is the backstop.
DIRECTORY_TIMEOUT_S = 8.0
# Bytes asked of the socket per read (WebSocket connections; asyncio reads TCP clients' sockets).
READ_CHUNK_BYTES = 64 * 1024
# How long a graceful shutdown waits for registry releases to finish.
RELEASE_WAIT_S = 4.0
# How long close() lets reader tasks end on their own once their transports are aborted.
READER_EXIT_WAIT_S = 1.0
# Refused connections from one address are logged at most this often (a flood must not flood the log).
REJECT_LOG_INTERVAL_S = 10.0
# Addresses remembered for that throttle.
MAX_REJECT_LOG_ENTRIES = 4096
# File descriptors kept free for everything but client sockets (Raft, coordination, admin, logs).
RESERVED_FDS = 64

# operator_delete_room when the registry did not confirm the deletion.
UNAVAILABLE = "unavailable"

MetricsHook = Callable[[str, int], None]
# A client's input: the next complete lines, and after them None or why the client broke the line limit
# (an over-long line; over WebSocket also a binary or oversized frame); None at end of stream or on a reset.
LineSource = Callable[[], Awaitable[tuple[list[bytes], str | None] | None]]


@dataclass(frozen=True, slots=True)
class ClientInfo:
    identity: str
    room_id: str
    address: str


@dataclass(frozen=True, slots=True)
class ChatSnapshot:
    """What the admin thread may read: built on the loop, never mutated afterwards."""

    server_id: str
    clients: tuple[ClientInfo, ...]
    rooms: tuple[RoomSnapshot, ...]
    connections: int
    messages_relayed: int
    deliveries: int
    counters: Mapping[str, int]  # read-only view of a private copy


def write_transport(writer: asyncio.StreamWriter) -> asyncio.WriteTransport:
    """The writer's transport. uvloop's transports (CHATMESH_EVENT_LOOP=uvloop) are not subclasses of
    asyncio's classes but offer the same methods, which is all this module uses."""
    return cast(asyncio.WriteTransport, writer.transport)


class _Conn:
    __slots__ = ("cid", "transport", "address", "ip", "out", "out_bytes", "dead", "limiter", "timer", "logged")

    def __init__(self, cid: ConnId, transport: asyncio.WriteTransport, address: str, ip: str, limiter: RateLimiter):
        self.cid = cid
        self.transport = transport
        self.address = address
        self.ip = ip
        self.out: list[bytes] = []  # encoded lines not yet handed to the transport
        self.out_bytes = 0
        self.dead = False  # no more output: closed, aborted or lost
        self.limiter = limiter
        self.timer: asyncio.TimerHandle | None = None
        # Limit violations already logged for this connection; None until the first (most never have one).
        self.logged: set[str] | None = None


class ClientProtocol(asyncio.Protocol):
    """A TCP client's reading shell: each read's bytes go straight to the server's per-read work
    (`ChatServer._received`), in the callback that read them. No stream and no task per connection: a
    line is served in the loop turn its bytes arrive in, where a StreamReader would wake a task one turn
    later, and the accept runs in `connection_made`, one turn before a start_server task would start."""

    __slots__ = ("server", "transport", "conn", "decoder", "held", "ended")

    def __init__(self, server: ChatServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.conn: _Conn | None = None  # None until accepted, and when refused
        self.decoder = LineDecoder(server.limits.max_line_bytes)
        # Reads that arrived while this server was stalled, served in order once it knows it is still live;
        # None while not held. Reading is paused meanwhile, so this holds at most one read and the end.
        self.held: list[tuple[list[bytes] | None, str | None]] | None = None
        self.ended = False  # the connection is over for the core: nothing more is read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server._connected(self)

    def data_received(self, data: bytes) -> None:
        self.server._received(self, data)

    def eof_received(self) -> bool:
        self.server._received(self, b"")
        # Keep the transport open for what the core still writes (a quit's roomchange); the core closes it.
        # asyncio ignores (and warns about) True on a TLS transport, which closes itself at EOF.
        return self.server.tls is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._lost(self)


class ChatServer:
    def __init__(
        self,
        server_id: ServerId,
        directory: Directory,
        host: str,
        port: int,
        limits: Limits | None = None,
        *,
        directory_timeout_s: float = DIRECTORY_TIMEOUT_S,
        metrics_hook: MetricsHook | None = None,
        stall_guard: StallGuard | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.server_id = server_id
        self.tls = tls  # the clients port speaks TLS when given
        self.directory = directory
        self.host = host
        self.port = port  # the bound port once started (useful with port 0)
        self.limits = limits if limits is not None else Limits()
        self.directory_timeout_s = directory_timeout_s
        self.metrics_hook = metrics_hook
        self.stall_guard = stall_guard
        self.core = ChatCore(server_id, directory, self.limits.max_queued_lines)
        self.counters: Counter[str] = Counter()
        self._conns: dict[ConnId, _Conn] = {}
        self._per_ip: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._dirty: list[_Conn] = []
        # Broadcasts of this loop turn not yet expanded per receiver: (receivers, lines, each line's sender).
        # Runs of lines to the same room are joined once and shared by every receiver (see _materialize).
        self._held: list[tuple[tuple[ConnId, ...], list[bytes], list[ConnId | None]]] = []
        self._flush_scheduled = False
        # The pending flush when it waits for `broadcast_coalesce_s`, and when the last one ran (loop time).
        self._flush_timer: asyncio.TimerHandle | None = None
        self._last_flush = 0.0
        self._to_drop: list[tuple[ConnId, str]] = []
        self._applying = False
        # Reader task -> its transport, so close() can abort a transport whose graceful close is stuck
        # behind a peer that never reads.
        self._readers: dict[asyncio.Task[None], asyncio.WriteTransport] = {}
        # TCP clients' protocols until their transports are lost, so close() can abort those whose graceful
        # close is stuck behind a peer that never reads.
        self._protocols: set[ClientProtocol] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._releasing: dict[Identity, asyncio.Task[None]] = {}
        self._reject_logged: dict[str, float] = {}
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._max_clients = self.limits.max_clients
        # Bumped whenever sessions or rooms may have changed: snapshots rebuild their lists only then.
        self.generation = 0
        self._built_generation = 0
        self.latest_snapshot: ChatSnapshot = self._build_snapshot()

    # -- lifetime ------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.open()
        assert self._loop is not None
        self._server = await self._loop.create_server(self.client_protocol, self.host, self.port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("%s: accepting clients on %s:%d", self.server_id, self.host, self.port)

    def open(self) -> None:
        """Accept connections, on the running loop, without binding a port: `start` binds one; a simulation
        connects its in-memory connections to `client_protocol()`s."""
        self._loop = asyncio.get_running_loop()
        self._max_clients = self._clamp_max_clients(self.limits.max_clients)
        self._accepting = True

    @staticmethod
    def _clamp_max_clients(wanted: int) -> int:
        # Past the descriptor limit accept() fails with EMFILE and asyncio stops accepting for a while;
        # refusing cleanly with an error line is better.
        try:
            import resource  # Unix only
        except ImportError:
            return wanted
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and wanted > soft - RESERVED_FDS:
            allowed = max(1, soft - RESERVED_FDS)
            log.warning("max_clients %d exceeds the open-file limit %d; using %d", wanted, soft, allowed)
            return allowed
        return wanted

    async def shutdown(self) -> None:
        """Graceful stop: no new clients, every client gets its quit roomchange, identities released."""
        self._stop_accepting()
        self._apply(self.core.end_all(release=True))
        releases = [t for t in self._tasks if not t.done()]
        if releases:
            await asyncio.wait(releases, timeout=RELEASE_WAIT_S)
        await self.close()

    async def disconnect_all(self) -> None:
        """Tell and close every client without touching the registry (it already dropped this server's
        entries); keep serving."""
        self._apply(self.core.end_all(release=False))

    async def close(self) -> None:
        """Hard stop: abort every connection, cancel every task."""
        self._stop_accepting()
        if self._server is not None:
            await self._server.wait_closed()
        for conn in list(self._conns.values()):
            self._forget(conn, abort=True)
        # Aborted transports end their readers by themselves (EOF); cancelling a start_server handler
        # makes asyncio 3.11 log the CancelledError as an error, so that is only for stragglers.
        if self._readers:
            await asyncio.wait(list(self._readers), timeout=READER_EXIT_WAIT_S)
        for transport in [*self._readers.values(), *(p.transport for p in self._protocols if p.transport)]:
            transport.abort()
        if self._readers:
            await asyncio.wait(list(self._readers), timeout=READER_EXIT_WAIT_S)
        tasks = [*self._readers, *self._tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._publish()

    def _stop_accepting(self) -> None:
        self._accepting = False
        if self._server is not None:
            self._server.close()

    # -- operator actions and reads ------------------------------------------------------------------------

    async def kick(self, identity: str) -> bool:
        found, effects = self.core.kick(identity)
        if found:
            self._count("kicks")
        self._apply(effects)
        return found

    async def release_orphan(self, identity: Identity) -> None:
        """Release `identity` for the reconciler the way a quit's release goes: a claim of the same name
        here waits for it (`_after_release`) instead of racing it to the coordinator, where the two could
        land in either order and the release free the new session's name."""
        await self._spawn_release(identity)  # its own task: `_after_release` waits for that task to end

    async def operator_delete_room(self, room_id: str) -> str:
        """Delete a local room for an operator: "ok", "not-found", "not-local", "mainhall", or "unavailable"
        when the registry did not confirm (then nothing changed). Members move to MainHall as in deleteroom,
        once the registry deletion committed."""
        result, owner = self.core.operator_delete_check(room_id)
        if result != DELETED:
            return result
        if not await self._bounded("delete_room", self.directory.delete_room(RoomId(room_id), owner)):
            return UNAVAILABLE
        # The room may have gone meanwhile (its owner quit): the registry deletion is what was asked.
        _, effects = self.core.operator_delete_room(room_id, release=False)
        self._count("operator_room_deletions")
        self._apply(effects)
        return DELETED

    def room_gone_from_registry(self, room_id: str) -> None:
        """The registry deleted `room_id` with no client told so: a deleteroom refused as in doubt that
        committed after all. The registry is the truth, so the room goes here too, members to MainHall."""
        result, effects = self.core.operator_delete_room(room_id, release=False)
        if result == DELETED:
            log.info("%s: room %s was deleted in the registry after a refused deleteroom", self.server_id, room_id)
            self._apply(effects)

    @property
    def client_count(self) -> int:
        return self.core.client_count

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    def local_identities(self) -> list[Identity]:
        return list(self.core.local_identities())

    def local_room_ids(self) -> list[str]:
        return list(self.core.local_room_ids())

    def snapshot(self) -> ChatSnapshot:
        """Build, publish and return an immutable snapshot (call on the loop; other threads read
        `latest_snapshot`)."""
        return self._publish()

    def _publish(self) -> ChatSnapshot:
        latest = self.latest_snapshot
        if self._built_generation == self.generation:
            # Membership unchanged since the last build: only the counters moved. Rebuilding the client
            # list of 10,000 sessions several times a second would stall the loop for nothing.
            snapshot = dataclasses.replace(
                latest,
                connections=len(self._conns),
                messages_relayed=self.core.messages_relayed,
                deliveries=self.core.deliveries,
                counters=types.MappingProxyType(dict(self.counters)),
            )
        else:
            self._built_generation = self.generation
            snapshot = self._build_snapshot()
        self.latest_snapshot = snapshot
        return snapshot

    def _build_snapshot(self) -> ChatSnapshot:
        core = self.core.snapshot()
        clients = tuple(
            ClientInfo(c.identity, c.room_id, conn.address if (conn := self._conns.get(c.conn)) else "")
            for c in core.clients
        )
        return ChatSnapshot(
            self.server_id,
            clients,
            core.rooms,
            len(self._conns),
            core.messages_relayed,
            core.deliveries,
            types.MappingProxyType(dict(self.counters)),
        )

    def _count(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount
        if self.metrics_hook is not None:
            try:
                self.metrics_hook(name, amount)
            except Exception:  # a metrics bug must not take a client session down
                log.exception("metrics hook failed for %s", name)

    # -- connections ---------------------------------------------------------------------------------------

    async def serve_connection(self, transport: asyncio.WriteTransport, peer: object, source: LineSource) -> None:
        """Serve one client whose input arrives through `source` and whose output goes to `transport` (one
        JSON line per write call's line): the WebSocket adapter's connections (node/websocket.py). They
        share sessions, rooms, limits and the per-read work (`_accept`, `_serve_lines`) with the TCP
        listener's (`ClientProtocol`)."""
        task = asyncio.current_task()
        assert task is not None
        self._readers[task] = transport  # tracked so close() can end it; start_server does not
        conn: _Conn | None = None
        try:
            conn = self._accept(transport, peer)
            if conn is None:
                return
            await self._read_loop(conn, source)
        except asyncio.CancelledError:
            # Only close() cancels readers; end quietly, since asyncio 3.11's start_server callback would
            # otherwise log the cancellation as an unhandled error. Nothing awaits this task's result.
            return
        except Exception:
            self._internal_error(conn)
        finally:
            del self._readers[task]

    def client_protocol(self) -> ClientProtocol:
        """The protocol of one TCP client connection (`loop.create_server`'s factory; a simulation makes
        one per in-memory connection and calls it as asyncio would)."""
        return ClientProtocol(self)

    def _connected(self, reader: ClientProtocol) -> None:
        transport = reader.transport
        assert transport is not None
        self._protocols.add(reader)
        try:
            reader.conn = self._accept(cast(asyncio.WriteTransport, transport), transport.get_extra_info("peername"))
        except Exception:
            log.exception("%s: error accepting a client", self.server_id)
            transport.abort()
        reader.ended = reader.conn is None

    def _received(self, reader: ClientProtocol, data: bytes) -> None:
        """One read of a TCP client (b"": end of stream or reset), served at once unless this server stalled."""
        if reader.ended:
            return
        too_long = None
        try:
            lines = reader.decoder.feed(data) if data else None
        except LineTooLong as exc:
            lines, too_long = exc.lines, f"line longer than {self.limits.max_line_bytes} bytes"
        if reader.held is not None:
            reader.held.append((lines, too_long))  # behind the reads held already (an end, when paused)
            return
        assert self._loop is not None
        guard = self.stall_guard
        if guard is not None and not guard.check(self._loop.time()):
            # This server stalled: input waits until it knows it is still live (_stall_wait's rule).
            reader.held = [(lines, too_long)]
            if lines is not None and reader.transport is not None:
                reader.transport.pause_reading()
            self._spawn(self._serve_held(reader, guard))
            return
        self._serve_read(reader, lines, too_long)

    def _serve_read(self, reader: ClientProtocol, lines: list[bytes] | None, too_long: str | None) -> None:
        conn = reader.conn
        assert conn is not None
        try:
            if not self._serve_lines(conn, lines, too_long):
                reader.ended = True
        except Exception:
            reader.ended = True
            self._internal_error(conn)

    def _internal_error(self, conn: _Conn | None) -> None:
        """A bug in our code while serving `conn` (called in an except block): it ends this connection,
        never the server."""
        log.exception("%s: error serving a client", self.server_id)
        if conn is not None and self._conns.get(conn.cid) is conn:
            self._apply(self.core.drop(conn.cid, "internal error"))

    async def _serve_held(self, reader: ClientProtocol, guard: StallGuard) -> None:
        await guard.wait_open()
        held, reader.held = reader.held or [], None
        for lines, too_long in held:
            if reader.ended:
                return
            self._serve_read(reader, lines, too_long)
        if not reader.ended and reader.transport is not None and not reader.transport.is_closing():
            reader.transport.resume_reading()

    def _lost(self, reader: ClientProtocol) -> None:
        self._protocols.discard(reader)
        self._received(reader, b"")  # a reset without EOF first ends the session as an abrupt quit

    def _accept(self, transport: asyncio.WriteTransport, peer: object) -> _Conn | None:
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ip
        if not self._accepting:
            transport.abort()
            return None
        reason = None
        if len(self._conns) >= self._max_clients:
            reason = f"server full ({self._max_clients} connections)"
        elif self._per_ip[ip] >= self.limits.max_connections_per_ip:
            reason = f"too many connections from {ip} ({self.limits.max_connections_per_ip})"
        if reason is not None:
            self._count("connections_refused")
            self._log_refusal(ip, address, reason)
            transport.write(encode(wire.error(reason)))
            transport.close()
            return None
        assert self._loop is not None
        cid = ConnId(next(self._ids))
        conn = _Conn(cid, transport, address, ip, RateLimiter(self.limits, self._loop.time()))
        self._conns[cid] = conn
        self._per_ip[ip] += 1
        self._count("connections_accepted")
        conn.timer = self._loop.call_later(self.limits.idle_before_identity_s, self._on_identity_timeout, cid)
        self._apply(self.core.connect(cid))
        return conn

    def _log_refusal(self, ip: str, address: str, reason: str) -> None:
        assert self._loop is not None
        now = self._loop.time()
        last = self._reject_logged.get(ip)
        if last is not None and now - last < REJECT_LOG_INTERVAL_S:
            return
        if len(self._reject_logged) >= MAX_REJECT_LOG_ENTRIES:
            self._reject_logged.clear()
        self._reject_logged[ip] = now
        log.warning("%s: refused connection from %s: %s", self.server_id, address, reason)

    async def _read_loop(self, conn: _Conn, source: LineSource) -> None:
        while True:
            batch = await source()
            lines, too_long = (None, None) if batch is None else batch
            await self._stall_wait()
            if not self._serve_lines(conn, lines, too_long):
                return

    async def _stall_wait(self) -> None:
        assert self._loop is not None
        guard = self.stall_guard
        if guard is not None and not guard.check(self._loop.time()):
            await guard.wait_open()  # this server stalled: input waits until it knows it is still live

    def _serve_lines(self, conn: _Conn, lines: list[bytes] | None, too_long: str | None) -> bool:
        """Hand one read's lines to the core (None: end of stream or reset), then the line-limit breach
        `too_long` if any. False once the connection is over."""
        assert self._loop is not None
        loop = self._loop
        cid = conn.cid
        core = self.core
        if self._conns.get(cid) is not conn:
            return False
        if lines is None:
            # End of stream or reset: an abrupt quit, unless the core already closed it.
            self._apply(core.disconnected(cid))
            return False
        now = loop.time()
        for line in lines:
            verdict = conn.limiter.check(now)
            if verdict is ALLOW:
                self._apply(core.receive(cid, line))
            elif verdict is Verdict.EXCESS:
                self._violation(conn, "rate", "line rate limit exceeded")
                self._write_one(conn, encode(wire.error("rate limit exceeded: line dropped")))
            else:
                self._violation(conn, "rate-abuse", "kept exceeding the line rate limit; disconnecting")
                self._drop(cid, "rate limit abuse")
                return False
            if self._conns.get(cid) is not conn:
                return False  # the core closed it (quit, refused newidentity) or it was dropped
        if too_long is not None:
            self._violation(conn, "line-too-long", too_long)
            self._drop(cid, "line too long")
            return False
        return True

    def _violation(self, conn: _Conn, kind: str, detail: str) -> None:
        self._count("limit_violations")
        self._count(f"limit_violations.{kind}")
        if conn.logged is None:
            conn.logged = set()
        if kind not in conn.logged:
            conn.logged.add(kind)
            who = self.core.identity_of(conn.cid)
            log.warning("%s: client %s%s: %s", self.server_id, conn.address, f" ({who})" if who else "", detail)

    def _on_identity_timeout(self, cid: ConnId) -> None:
        conn = self._conns.get(cid)
        if conn is None:
            return
        conn.timer = None
        if self.core.awaiting_identity(cid):
            self._violation(conn, "idle", f"no newidentity within {self.limits.idle_before_identity_s:g}s")
            self._drop(cid, "idle before identity")

    def _on_routed_linger(self, cid: ConnId) -> None:
        conn = self._conns.get(cid)
        if conn is None:
            return
        conn.timer = None
        if self.core.is_routed(cid):
            log.info("%s: closing routed connection %s still open after %gs", self.server_id, conn.address,
                     self.limits.routed_linger_s)  # fmt: skip
            self._apply(self.core.drop(cid, "routed client lingered"))

    def _drop(self, cid: ConnId, reason: str) -> None:
        """End a client as an abrupt quit: once the current effects are applied, if some are."""
        self._to_drop.append((cid, reason))
        if not self._applying:
            self._apply([])

    # -- effects ---------------------------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        """Apply core effects in order. Drops found meanwhile (overflowing readers) are fed back to the core
        after the batch, so one batch's ordering is never interleaved with another's."""
        if self._applying:
            # Re-entered from a drop below: effects are already ordered after the current batch.
            self._apply_batch(effects)
            return
        for e in effects:  # a loop, not all(): this runs for every chat line
            if type(e) is not Multicast or e.message.get("type") != "message":
                self.generation += 1  # anything but chat may have changed sessions or rooms
                break
        self._applying = True
        try:
            self._apply_batch(effects)
            while self._to_drop:
                cid, reason = self._to_drop.pop(0)
                self._apply_batch(self.core.drop(cid, reason))
        finally:
            self._applying = False

    def _materialize(self) -> None:
        """Expand the broadcasts held back this turn: one join per run of lines to the same room, shared by
        every receiver; a sender gets the run without its own lines. Called before any other write, so each
        connection still sees its lines in the order the core produced them."""
        held = self._held
        if not held:
            return
        self._held = []
        conns = self._conns
        limit = self.limits.max_pending_output_bytes
        for receivers, lines, senders in held:
            joined = lines[0] if len(lines) == 1 else b"".join(lines)
            size = len(joined)
            sending = set(senders)
            for cid in receivers:
                conn = conns.get(cid)
                if conn is None or conn.dead:
                    continue
                if cid in sending:
                    data = b"".join(line for line, sender in zip(lines, senders, strict=True) if sender != cid)
                    if not data:
                        continue
                    n = len(data)
                else:
                    data, n = joined, size
                if not conn.out:
                    self._dirty.append(conn)
                conn.out.append(data)
                conn.out_bytes += n
                if conn.out_bytes > limit:
                    self._overflow(conn)

    def _apply_batch(self, effects: list[Effect]) -> None:
        conns = self._conns
        release: asyncio.Task[None] | None = None  # the last identity release of this batch
        for effect in effects:
            if type(effect) is Multicast:
                data = encode(effect.message)
                held = self._held
                # The core hands out one tuple per room membership, so `is` finds a run to the same room.
                if held and held[-1][0] is effect.conns:
                    held[-1][1].append(data)
                    held[-1][2].append(effect.exclude)
                else:
                    held.append((effect.conns, [data], [effect.exclude]))
                if not self._flush_scheduled:
                    self._schedule_flush(coalesce=True)
                continue
            self._materialize()
            if type(effect) is Deliver:
                send_to = conns.get(effect.conn)
                if send_to is not None:
                    self._write_one(send_to, encode(effect.message))
            elif type(effect) is Close:
                to_close = conns.get(effect.conn)
                if to_close is not None:
                    if release is not None and not release.done():
                        # A quit (protocol.md): release I in the registry, then close, so that a client
                        # logging in again elsewhere right after its quit finds its name free.
                        release.add_done_callback(functools.partial(self._forget_after, to_close))
                        release = None
                    else:
                        self._forget(to_close, abort=False)
            elif type(effect) is LimitExceeded:
                limited = conns.get(effect.conn)
                if limited is not None:
                    self._violation(limited, "queue", effect.reason)
            elif type(effect) is ReleaseIdentityRequest:
                release = self._spawn_release(effect.identity)
            elif type(effect) is ReleaseRoom:
                self._spawn(self._release_room(effect))
            else:
                assert isinstance(effect, REQUEST_TYPES), effect
                self._spawn(self._run_request(effect))

    def _write_one(self, conn: _Conn, data: bytes) -> None:
        if self._held:
            self._materialize()  # this line goes after the broadcasts held back
        if conn.dead:
            return
        if not conn.out:
            self._dirty.append(conn)
        if not self._flush_scheduled or self._flush_timer is not None:
            self._schedule_flush()  # a reply never waits behind coalesced broadcasts
        conn.out.append(data)
        conn.out_bytes += len(data)
        if conn.out_bytes > self.limits.max_pending_output_bytes:
            self._overflow(conn)

    def _schedule_flush(self, coalesce: bool = False) -> None:
        loop = self._loop
        assert loop is not None
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._flush_scheduled = True
        due = self._last_flush + self.limits.broadcast_coalesce_s
        if coalesce and due > loop.time():
            self._flush_timer = loop.call_at(due, self._flush)
            return
        # call_soon runs after every callback already ready in this turn: their output joins this write.
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._flush_timer = None
        assert self._loop is not None
        self._last_flush = self._loop.time()
        self._materialize()
        dirty, self._dirty = self._dirty, []
        limit = self.limits.max_pending_output_bytes
        for conn in dirty:
            if conn.dead or not conn.out:
                continue
            self._write_out(conn)
            if conn.transport.get_write_buffer_size() > limit:
                self._overflow(conn)
        if self._to_drop:
            self._apply([])

    def _write_out(self, conn: _Conn) -> None:
        out = conn.out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        conn.out_bytes = 0
        if conn.transport.is_closing():
            conn.dead = True  # lost underneath us; the reader reports the disconnect
            return
        conn.transport.write(data)

    def _overflow(self, conn: _Conn) -> None:
        """A slow reader: stop writing to it at once and drop it as an abrupt quit."""
        if conn.dead:
            return
        conn.dead = True
        conn.out.clear()
        conn.out_bytes = 0
        self._count("slow_reader_drops")
        self._violation(conn, "slow-reader", f"more than {self.limits.max_pending_output_bytes} bytes unsent")
        conn.transport.abort()
        self._to_drop.append((conn.cid, "slow reader"))

    def _forget_after(self, conn: _Conn, _release: asyncio.Task[None]) -> None:
        self._forget(conn, abort=False)

    def _forget(self, conn: _Conn, abort: bool) -> None:
        """The connection is over: flush what the core sent it last (unless aborting), close, uncount."""
        if self._conns.pop(conn.cid, None) is None:
            return
        self._per_ip[conn.ip] -= 1
        if self._per_ip[conn.ip] <= 0:
            del self._per_ip[conn.ip]
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if abort:
            conn.dead = True
            conn.transport.abort()
            return
        if not conn.dead and conn.out:
            self._write_out(conn)
        conn.dead = True
        conn.transport.close()  # sends what is buffered, then closes; the reader then sees EOF

    # -- cluster requests --------------------------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_release(self, identity: Identity) -> asyncio.Task[None]:
        return self._spawn(self._release_identity(identity))

    async def _bounded(self, what: str, call: Coroutine[Any, Any, bool], timeout_s: float | None = None) -> bool:
        """A directory answer within the timeout; False on timeout or error (never raises)."""
        try:
            async with asyncio.timeout(self.directory_timeout_s if timeout_s is None else timeout_s):
                return bool(await call)
        except TimeoutError:
            log.warning("%s: directory %s timed out after %gs", self.server_id, what, self.directory_timeout_s)
        except Exception:
            log.exception("%s: directory %s failed", self.server_id, what)
        return False

    async def _run_request(self, request: Request) -> None:
        directory = self.directory
        assert self._loop is not None
        started = self._loop.time()
        match request:
            case ClaimIdentityRequest(identity=identity):
                await self._after_release(identity)
                ok = await self._bounded("claim_identity", directory.claim_identity(identity), self._left(started))
            case CompleteMoveRequest(identity=identity):
                await self._after_release(identity)
                ok = await self._bounded("complete_move", directory.complete_move(identity), self._left(started))
            case CreateRoomRequest(room_id=room_id, owner=owner):
                ok = await self._bounded("create_room", directory.create_room(room_id, owner))
            case DeleteRoomRequest(room_id=room_id, owner=owner):
                ok = await self._bounded("delete_room", directory.delete_room(room_id, owner))
            case BeginMoveRequest(identity=identity, server_id=to_server):
                ok = await self._bounded("begin_move", directory.begin_move(identity, to_server))
            case _:
                assert_never(request)
        log.debug("%s: %s -> %s in %.3fs", self.server_id, request, ok, self._loop.time() - started)
        guard = self.stall_guard
        if ok and guard is not None and not guard.check(self._loop.time()):
            # Committed before a stall, answered after it: meanwhile the cluster may have declared this server
            # down and given the name to someone else. Answer once the registry confirms this server is still
            # live; a fenced server has disconnected the client by then instead.
            await guard.wait_open()
        self._apply(self.core.resolve(request, ok))
        if isinstance(request, BeginMoveRequest) and ok and self.core.is_routed(request.conn):
            conn = self._conns.get(request.conn)
            if conn is not None and self._loop is not None:
                if conn.timer is not None:
                    conn.timer.cancel()
                conn.timer = self._loop.call_later(self.limits.routed_linger_s, self._on_routed_linger, conn.cid)

    def _left(self, started: float) -> float:
        """What is left of one directory timeout since `started`: a login that first waited for a release
        of its name is still answered within one `directory_timeout_s`."""
        assert self._loop is not None
        return max(0.0, started + self.directory_timeout_s - self._loop.time())

    async def _after_release(self, identity: Identity) -> None:
        # A client that quits and logs in again at once must not have its claim refused because the
        # release of its previous session is still on its way to the coordinator.
        pending = self._releasing.get(identity)
        if pending is not None and not pending.done():
            await asyncio.wait([pending], timeout=self.directory_timeout_s)

    async def _release_identity(self, identity: Identity) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._releasing[identity] = task
        try:
            async with asyncio.timeout(self.directory_timeout_s):
                await self.directory.release_identity(identity)
        except TimeoutError:
            log.warning("%s: releasing %s timed out; the reconciler will retry", self.server_id, identity)
        except Exception:
            log.exception("%s: releasing %s failed; the reconciler will retry", self.server_id, identity)
        finally:
            if self._releasing.get(identity) is task:
                del self._releasing[identity]

    async def _release_room(self, effect: ReleaseRoom) -> None:
        ok = await self._bounded("delete_room", self.directory.delete_room(effect.room_id, effect.owner))
        if not ok:
            log.warning("%s: could not delete room %s from the registry; the reconciler will", self.server_id,
                        effect.room_id)  # fmt: skip
