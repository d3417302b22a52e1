"""The coordination channel between servers: authenticated notifications and request/response over TCP.

Theory of operation
-------------------
Each server listens on its configured coordination host:port and keeps one persistent outgoing connection
to every peer (reconnecting with exponential backoff). A server *sends* only on its outgoing connections;
replies to requests come back on the connection the request arrived on. Two connections per pair of servers
keep the roles simple: the connector writes notifications and requests, the acceptor writes replies.

Framing: JSON lines (`cluster.framing`) with a line limit. Every line is `{"a": <hmac hex>, "p": <payload>}`
where the payload is itself a JSON text, so the MAC covers exactly the bytes that were sent (no
canonicalisation). MAC = HMAC-SHA256(cluster secret, payload), checked with `hmac.compare_digest`.

Handshake, then frames: the connector sends `hello` (its id, the peer it wants, a fresh nonce Nc, a
timestamp); the acceptor checks it and answers `hello` with its own nonce Na and Nc echoed back. Every later
frame names `from`, `to`, the session `sid` = Nc+Na, a per-direction counter `seq` that must be exactly the
previous + 1, and a wall-clock `ts` within `MAX_CLOCK_SKEW_S`. So a frame recorded on one connection is
rejected on any other (different sid), replayed on the same one is rejected by its counter, and reflected
back to its sender is rejected by `from`/`to`. A frame that fails any check is logged (rate-limited) and
the connection is closed; nothing an unauthenticated peer sends reaches a handler, and nothing it sends can
crash the server.

Limits: `max_queue` frames wait per peer while it is unreachable (the oldest is dropped and logged when
full, notifications older than `MAX_QUEUE_AGE_S` are dropped when the connection comes up), at most
`MAX_BUFFERED_BYTES` sit in a connection's write buffer (beyond that, frames are dropped and logged), and
at most `MAX_HANDLERS_PER_CONNECTION` request handlers run at once per connection.

Cost: all frames produced in one loop iteration are written with one `write()` (the flush is scheduled
with `call_soon`), so a burst of small requests costs one syscall, not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bully.failure_detector import LinkEvent
from cluster.config import ClusterConfig
from cluster.framing import MAX_LINE_BYTES, FrameError, LineDecoder, LineTooLong, decode_object, encode

log = logging.getLogger("chatmesh.transport")

CONNECT_TIMEOUT_S = 1.0
HANDSHAKE_TIMEOUT_S = 2.0
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 1.0
# A connection that dies sooner than this after coming up counts as a failure for the backoff, so a peer
# that accepts and immediately closes (wrong secret) is not hammered.
STABLE_CONNECTION_S = 1.0
MAX_QUEUE_AGE_S = 2.0
# Immediate reconnect attempts after losing a connection, before the backoff resumes.
QUICK_RETRIES_AFTER_LOSS = 3
MAX_CLOCK_SKEW_S = 30.0
MAX_BUFFERED_BYTES = 1 << 20
MAX_HANDLERS_PER_CONNECTION = 1024
# Handshakes in progress at once; past this the oldest is dropped, so strangers holding idle connections
# cannot lock a real peer (whose handshake takes milliseconds) out of the port.
MAX_PENDING_HANDSHAKES = 64
MAX_SEEN_HELLOS = 4096
READ_CHUNK_BYTES = 1 << 16
COMPLAINT_INTERVAL_S = 10.0
MAX_COMPLAINT_KEYS = 256

NotifyHandler = Callable[[str, dict[str, Any]], None]
LinkEventHandler = Callable[[str, LinkEvent], None]
RequestHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class RequestFailed(Exception):
    """A request got no reply: timeout, peer unreachable, connection lost, or the peer's handler failed."""


class Transport(Protocol):
    """The coordination channel as the election and the node use it. Two implementations keep one contract
    (tests/unit/test_transport_contract.py runs the same suite against both): `TcpTransport` here, and
    `bully.memory_transport.MemoryTransport` for the simulations."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def on_notify(self, handler: NotifyHandler) -> None: ...
    def on_link_event(self, handler: LinkEventHandler) -> None: ...
    def on_request(self, kind: str, handler: RequestHandler) -> None: ...
    def send(self, peer: str, message: dict[str, Any]) -> bool: ...
    def broadcast(self, message: dict[str, Any]) -> None: ...
    async def request(self, peer: str, message: dict[str, Any], timeout: float) -> dict[str, Any]: ...
    def complain(self, key: str, text: str, level: int = logging.WARNING) -> None: ...


class AuthError(Exception):
    """A frame that is not authentic, not for us, out of order, or too old."""


# -- frames (pure functions, also used by the tests to forge and replay) ----------------------------------


def seal(secret: bytes, payload: dict[str, Any]) -> bytes:
    """One authenticated line carrying `payload`."""
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    mac = hmac.new(secret, text.encode("ascii"), hashlib.sha256).hexdigest()
    return encode({"a": mac, "p": text})


def unseal(secret: bytes, line: bytes) -> dict[str, Any]:
    """The payload of an authentic line; AuthError (or FrameError for non-JSON) otherwise."""
    outer = decode_object(line)
    mac, text = outer.get("a"), outer.get("p")
    if not isinstance(mac, str) or not isinstance(text, str):
        raise AuthError("frame without mac or payload")
    expected = hmac.new(secret, text.encode("utf-8"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, mac):
        raise AuthError("bad mac")
    return decode_object(text.encode("utf-8"))


def _fresh(ts: object) -> bool:
    return isinstance(ts, int | float) and not isinstance(ts, bool) and abs(time.time() - ts) <= MAX_CLOCK_SKEW_S


class Complaints:
    """Log each kind of complaint once, then at most once per COMPLAINT_INTERVAL_S with a count."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, key: str, text: str, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (None, 0))
        if last is not None and now - last < COMPLAINT_INTERVAL_S:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) >= MAX_COMPLAINT_KEYS:
            self._last.clear()
        self._last[key] = (now, 0)
        log.log(level, "%s%s", text, f" ({suppressed} more like it suppressed)" if suppressed else "")


# -- connections -------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    """A frame waiting for a connection to its peer."""

    queued_at: float
    body: dict[str, Any]
    future: asyncio.Future[dict[str, Any]] | None = None  # for requests


class _Channel:
    """One authenticated TCP connection: sealed frames out (coalesced per loop turn), verified frames in."""

    def __init__(
        self,
        transport: TcpTransport,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        sid: str,
        decoder: LineDecoder,
        leftover: list[bytes],
    ) -> None:
        self.transport = transport
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.sid = sid
        self.decoder = decoder
        self.leftover = leftover
        self.send_seq = 0
        self.recv_seq = 0
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self.closed = False
        self.requests: set[int] = set()  # our requests sent on this channel, awaiting replies
        self.handlers: set[asyncio.Task[None]] = set()

    def write(self, body: dict[str, Any]) -> bool:
        if self.closed:
            return False
        if self.writer.transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            self.transport.complain(f"full:{self.peer}", f"write buffer to {self.peer} full; dropping frames")
            return False
        self.send_seq += 1
        payload = dict(body)
        payload.update(
            {"from": self.transport.self_id, "to": self.peer, "sid": self.sid, "seq": self.send_seq, "ts": time.time()}
        )
        line = seal(self.transport.secret, payload)
        if len(line) > MAX_LINE_BYTES:
            self.send_seq -= 1
            self.transport.complain("too-long", f"dropping a {len(line)}-byte frame to {self.peer} (over the limit)")
            return False
        self._out.append(line)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or not self._out:
            self._out.clear()
            return
        data = b"".join(self._out)
        self._out.clear()
        try:
            self.writer.write(data)
        except (OSError, RuntimeError) as exc:  # the socket died under us; the reader notices and cleans up
            self.transport.complain(f"write:{self.peer}", f"write to {self.peer} failed: {exc}", logging.INFO)

    async def read_frames(self, on_frame: Callable[[_Channel, dict[str, Any]], None]) -> None:
        """Verify and dispatch frames until EOF or a bad frame (which closes the connection)."""
        lines, self.leftover = self.leftover, []
        while True:
            for line in lines:
                if not line:
                    continue
                try:
                    payload = unseal(self.transport.secret, line)
                    self._check(payload)
                except (AuthError, FrameError) as exc:
                    self.transport.complain(
                        f"bad:{self.peer}", f"dropping connection with {self.peer}: rejected frame ({exc})"
                    )
                    return
                on_frame(self, payload)
            data = await self.reader.read(READ_CHUNK_BYTES)
            if not data:
                return
            try:
                lines = self.decoder.feed(data)
            except LineTooLong as exc:
                self.transport.complain(f"long:{self.peer}", f"dropping connection with {self.peer}: {exc}")
                return

    def _check(self, payload: dict[str, Any]) -> None:
        if payload.get("from") != self.peer or payload.get("to") != self.transport.self_id:
            raise AuthError("frame not from our peer to us")
        if payload.get("sid") != self.sid:
            raise AuthError("frame of another session (replayed)")
        if payload.get("seq") != self.recv_seq + 1:
            raise AuthError(f"frame counter {payload.get('seq')!r} after {self.recv_seq} (replayed or lost)")
        if not _fresh(payload.get("ts")):
            raise AuthError("frame timestamp outside the allowed clock skew")
        self.recv_seq += 1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self.handlers:
            task.cancel()
        with contextlib.suppress(Exception):
            self.writer.close()


@dataclass
class _Link:
    """Our outgoing side towards one peer."""

    peer: str
    host: str
    port: int
    max_queue: int
    queue: deque[_Pending] = field(default_factory=deque)
    channel: _Channel | None = None
    unreachable: bool = False  # the last connection attempt failed
    # Set to cut a reconnection backoff short: a request is waiting, or the peer just connected to us.
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class TcpTransport:
    def __init__(self, config: ClusterConfig, self_id: str, secret: bytes, max_queue: int = 1024) -> None:
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        me = config.server(self_id)
        self.config = config
        self.self_id = self_id
        self.secret = secret
        self.host = me.host
        self.port = me.coordination_port
        self.max_queue = max_queue
        self._links: dict[str, _Link] = {
            s.server_id: _Link(s.server_id, s.host, s.coordination_port, max_queue)
            for s in config.servers
            if s.server_id != self_id
        }
        self._notify_handlers: list[NotifyHandler] = []
        self._link_handlers: list[LinkEventHandler] = []
        self._request_handlers: dict[str, RequestHandler] = {}
        self._pending: dict[int, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._request_ids = itertools.count(1)
        self._incoming: dict[str, _Channel] = {}
        # Insertion-ordered: the oldest pending handshake is the first evicted.
        self._accepting: dict[asyncio.StreamWriter, None] = {}
        # Hello nonces accepted within the clock-skew window: a replayed hello is refused.
        self._seen_hellos: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._closing = False
        self._rng = random.Random()
        self.complain = Complaints()
        self.frames_dropped = 0

    # -- lifetime ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the coordination port (OSError if it is taken) and start connecting to every peer."""
        self._server = await asyncio.start_server(
            self._on_incoming, self.host, self.port, limit=MAX_LINE_BYTES * 2, reuse_address=True
        )
        for link in self._links.values():
            self._spawn(self._run_link(link), f"link-{link.peer}")

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for link in self._links.values():
            if link.channel is not None:
                link.channel.close()
            self._fail_queue(link, "transport closed")
        for channel in list(self._incoming.values()):
            channel.close()
        for writer in list(self._accepting):
            writer.close()
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(RequestFailed("transport closed"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def _spawn(self, coroutine: Awaitable[None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- API ---------------------------------------------------------------------------------------------------

    def on_notify(self, handler: NotifyHandler) -> None:
        """Call `handler(sender, message)` for every notification (several handlers may be registered)."""
        self._notify_handlers.append(handler)

    def on_link_event(self, handler: LinkEventHandler) -> None:
        """Call `handler(peer, event)` when our connection to a peer ends or a reconnect is refused."""
        self._link_handlers.append(handler)

    def _link_event(self, peer: str, event: LinkEvent) -> None:
        for handler in self._link_handlers:
            try:
                handler(peer, event)
            except Exception:
                log.exception("link event handler failed on %s %s", event, peer)

    def on_request(self, kind: str, handler: RequestHandler) -> None:
        """Serve requests whose message has this "kind"; an exception becomes an error reply."""
        self._request_handlers[kind] = handler

    def send(self, peer: str, message: dict[str, Any]) -> bool:
        """Queue a notification; False if it was dropped (unknown peer, queue or buffer full)."""
        link = self._links.get(peer)
        if link is None:
            self.complain(f"unknown:{peer}", f"not sending to unknown server {peer!r}")
            return False
        return self._send_body(link, {"t": "n", "m": message})

    def broadcast(self, message: dict[str, Any]) -> None:
        for peer in self._links:
            self.send(peer, message)

    async def request(self, peer: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a request and await its reply; RequestFailed on timeout, unreachable peer or lost connection."""
        link = self._links.get(peer)
        if link is None:
            raise RequestFailed(f"unknown server {peer!r}")
        if self._closing:
            raise RequestFailed("transport closed")
        if link.channel is None:
            link.wake.set()  # try to connect now; a refused attempt fails this request at once
        request_id = next(self._request_ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (peer, future)
        try:
            if not self._send_body(link, {"t": "q", "id": request_id, "m": message}, future, request_id):
                raise RequestFailed(f"could not queue a request to {peer}")
            try:
                async with asyncio.timeout(timeout):
                    return await future
            except TimeoutError:
                raise RequestFailed(f"no reply from {peer} within {timeout:.2f}s") from None
        finally:
            self._pending.pop(request_id, None)
            if link.channel is not None:
                link.channel.requests.discard(request_id)

    @property
    def connected(self) -> set[str]:
        """Peers our outgoing connection currently reaches."""
        return {peer for peer, link in self._links.items() if link.channel is not None}

    # -- sending -----------------------------------------------------------------------------------------------

    def _send_body(
        self,
        link: _Link,
        body: dict[str, Any],
        future: asyncio.Future[dict[str, Any]] | None = None,
        request_id: int | None = None,
    ) -> bool:
        if self._closing:
            return False
        channel = link.channel
        if channel is not None:
            if not channel.write(body):
                self.frames_dropped += 1
                return False
            if request_id is not None:
                channel.requests.add(request_id)
            return True
        if len(link.queue) >= link.max_queue:
            oldest = link.queue.popleft()
            self.frames_dropped += 1
            if oldest.future is not None and not oldest.future.done():
                oldest.future.set_exception(RequestFailed(f"send queue to {link.peer} full"))
            self.complain(f"queue:{link.peer}", f"send queue to {link.peer} full ({link.max_queue}); dropping oldest")
        link.queue.append(_Pending(time.monotonic(), body, future))
        return True

    def _flush_queue(self, link: _Link, channel: _Channel) -> None:
        now = time.monotonic()
        while link.queue:
            item = link.queue.popleft()
            if item.future is not None:
                if item.future.done():
                    continue  # timed out while waiting for the connection
                if channel.write(item.body):
                    channel.requests.add(int(item.body["id"]))
                else:
                    item.future.set_exception(RequestFailed(f"could not send to {link.peer}"))
            elif now - item.queued_at <= MAX_QUEUE_AGE_S:
                channel.write(item.body)
            else:
                self.frames_dropped += 1

    def _fail_queue(self, link: _Link, reason: str) -> None:
        """The peer is unreachable: fail queued requests now and forget stale notifications."""
        now = time.monotonic()
        kept: deque[_Pending] = deque()
        for item in link.queue:
            if item.future is not None:
                if not item.future.done():
                    item.future.set_exception(RequestFailed(f"{link.peer}: {reason}"))
            elif now - item.queued_at <= MAX_QUEUE_AGE_S:
                kept.append(item)
        link.queue = kept

    # -- outgoing connections ----------------------------------------------------------------------------------

    async def _run_link(self, link: _Link) -> None:
        backoff = BACKOFF_INITIAL_S
        young_deaths = 0  # connections to the current peer process that died sooner than STABLE_CONNECTION_S
        quick_retries = 0  # immediate reconnects left after a loss (not refused yet)
        while not self._closing:
            try:
                channel = await self._connect(link)
            except (OSError, TimeoutError, AuthError, FrameError, LineTooLong, asyncio.IncompleteReadError) as exc:
                link.unreachable = True
                if isinstance(exc, ConnectionRefusedError) and not self._closing:
                    young_deaths = 0  # that process is gone; the next one starts afresh
                    self._link_event(link.peer, "refused")
                self._fail_queue(link, f"unreachable ({exc or type(exc).__name__})")
                reason = str(exc) or type(exc).__name__
                self.complain(f"connect:{link.peer}", f"cannot reach {link.peer}: {reason}", logging.INFO)
                if quick_retries > 0 and not isinstance(exc, ConnectionRefusedError):
                    # Just after a loss: a process being torn down can still complete a TCP handshake and then
                    # reset it; the next attempt gets the refusal that proves it gone.
                    quick_retries -= 1
                    continue
                quick_retries = 0
                await self._backoff(link, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            link.channel = channel
            link.unreachable = False
            quick_retries = 0
            self._link_event(link.peer, "up")
            log.debug("%s connected to %s", self.self_id, link.peer)
            self._flush_queue(link, channel)
            started = time.monotonic()
            try:
                await channel.read_frames(self._on_frame)
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.complain(f"lost:{link.peer}", f"connection to {link.peer} lost: {exc}", logging.INFO)
            finally:
                link.channel = None
                channel.close()
                self._fail_requests(channel, f"connection to {link.peer} lost")
            if not self._closing:
                self._link_event(link.peer, "lost")
            # Reconnect at once after losing an authenticated connection: a refusal then says the peer's process
            # is gone (the failure detector's certain evidence). Only a peer process whose connections keep
            # dying young (twice in a row, with no refusal in between) gets the backoff.
            if time.monotonic() - started >= STABLE_CONNECTION_S:
                backoff = BACKOFF_INITIAL_S
                young_deaths = 0
            else:
                young_deaths += 1
            if young_deaths <= 1:
                quick_retries = QUICK_RETRIES_AFTER_LOSS
            else:
                await self._backoff(link, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _backoff(self, link: _Link, delay: float) -> None:
        """Wait before reconnecting: jittered `delay`, cut short by `link.wake` (but never under the minimum)."""
        link.wake.clear()
        await asyncio.sleep(BACKOFF_INITIAL_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(link.wake.wait(), max(0.0, delay * (0.5 + self._rng.random()) - BACKOFF_INITIAL_S))

    async def _connect(self, link: _Link) -> _Channel:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(link.host, link.port, limit=MAX_LINE_BYTES * 2)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                nonce = secrets.token_hex(16)
                greeting = {"t": "hello", "from": self.self_id, "to": link.peer, "nonce": nonce, "ts": time.time()}
                writer.write(seal(self.secret, greeting))
                decoder = LineDecoder(MAX_LINE_BYTES)
                lines = await _read_lines(reader, decoder)
                hello = unseal(self.secret, lines[0])
                if (
                    hello.get("t") != "hello"
                    or hello.get("from") != link.peer
                    or hello.get("to") != self.self_id
                    or hello.get("echo") != nonce
                    or not isinstance(hello.get("nonce"), str)
                ):
                    raise AuthError(f"bad hello from {link.peer}")
        except BaseException:
            writer.close()
            raise
        return _Channel(self, reader, writer, link.peer, nonce + hello["nonce"], decoder, lines[1:])

    # -- incoming connections ----------------------------------------------------------------------------------

    async def _on_incoming(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        address = peername[0] if isinstance(peername, tuple) and peername else str(peername)
        if self._closing:
            writer.close()
            return
        while len(self._accepting) >= MAX_PENDING_HANDSHAKES:
            oldest = next(iter(self._accepting))
            del self._accepting[oldest]
            oldest.close()
            self.complain("handshakes", "too many pending handshakes: dropping the oldest")
        self._accepting[writer] = None
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # so close() cancels it
        channel: _Channel | None = None
        try:
            try:
                channel = await self._accept(reader, writer)
            except (OSError, TimeoutError, AuthError, FrameError, LineTooLong, asyncio.IncompleteReadError) as exc:
                self.complain(f"hello:{address}", f"rejected a connection from {address}: {exc or type(exc).__name__}")
                return
            finally:
                self._accepting.pop(writer, None)
            link = self._links.get(channel.peer)
            if link is not None and link.channel is None:
                link.wake.set()  # it is up: no need to wait out our backoff towards it
            previous = self._incoming.get(channel.peer)
            if previous is not None:
                previous.close()  # the peer reconnected; its old connection is dead or dying
            self._incoming[channel.peer] = channel
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await channel.read_frames(self._on_frame)
        except asyncio.CancelledError:
            # close() cancels this server-callback task; ending it normally keeps asyncio's stream
            # protocol from logging the cancellation as an error (Python 3.11).
            pass
        finally:
            if channel is not None:
                channel.close()
                if self._incoming.get(channel.peer) is channel:
                    del self._incoming[channel.peer]
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _remember_hello(self, nonce: str) -> None:
        """Refuse a hello seen before: a replayed one would otherwise replace the peer's live channel."""
        now = time.time()
        seen = self._seen_hellos
        # Insertion order is time order: drop from the front what fell out of the freshness window.
        while seen and (next(iter(seen.values())) < now - MAX_CLOCK_SKEW_S or len(seen) > MAX_SEEN_HELLOS):
            del seen[next(iter(seen))]
        if nonce in seen:
            raise AuthError("replayed hello")
        seen[nonce] = now

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Channel:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            decoder = LineDecoder(MAX_LINE_BYTES)
            lines = await _read_lines(reader, decoder)
            hello = unseal(self.secret, lines[0])
            peer = hello.get("from")
            if (
                hello.get("t") != "hello"
                or not isinstance(peer, str)
                or peer not in self._links
                or hello.get("to") != self.self_id
                or not isinstance(hello.get("nonce"), str)
                or not _fresh(hello.get("ts"))
            ):
                raise AuthError("bad hello")
            self._remember_hello(hello["nonce"])
            nonce = secrets.token_hex(16)
            reply = {"t": "hello", "from": self.self_id, "to": peer, "nonce": nonce, "echo": hello["nonce"]}
            reply["ts"] = time.time()
            writer.write(seal(self.secret, reply))
        return _Channel(self, reader, writer, peer, hello["nonce"] + nonce, decoder, lines[1:])

    # -- dispatch ----------------------------------------------------------------------------------------------

    def _on_frame(self, channel: _Channel, payload: dict[str, Any]) -> None:
        kind = payload.get("t")
        message = payload.get("m")
        if kind == "n" and isinstance(message, dict):
            for handler in self._notify_handlers:
                try:
                    handler(channel.peer, message)
                except Exception:
                    log.exception("notification handler failed on %s from %s", message.get("kind"), channel.peer)
        elif kind == "q" and isinstance(message, dict) and isinstance(payload.get("id"), int):
            self._serve(channel, payload["id"], message)
        elif kind == "r" and isinstance(payload.get("id"), int):
            entry = self._pending.get(payload["id"])
            if entry is None or entry[0] != channel.peer or entry[1].done():
                return  # a reply after our timeout
            error = payload.get("e")
            if error is not None or not isinstance(message, dict):
                entry[1].set_exception(RequestFailed(f"{channel.peer}: {error or 'malformed reply'}"))
            else:
                entry[1].set_result(message)
        else:
            self.complain(f"frame:{channel.peer}", f"ignoring a malformed frame from {channel.peer}")

    def _serve(self, channel: _Channel, request_id: int, message: dict[str, Any]) -> None:
        handler = self._request_handlers.get(str(message.get("kind")))
        if handler is None:
            channel.write({"t": "r", "id": request_id, "e": f"no handler for kind {message.get('kind')!r}"})
            return
        if len(channel.handlers) >= MAX_HANDLERS_PER_CONNECTION:
            channel.write({"t": "r", "id": request_id, "e": "busy"})
            return
        task = asyncio.ensure_future(self._run_handler(channel, handler, request_id, message))
        channel.handlers.add(task)
        task.add_done_callback(channel.handlers.discard)

    async def _run_handler(
        self, channel: _Channel, handler: RequestHandler, request_id: int, message: dict[str, Any]
    ) -> None:
        try:
            reply = await handler(channel.peer, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("request handler for %r from %s failed: %r", message.get("kind"), channel.peer, exc)
            channel.write({"t": "r", "id": request_id, "e": f"{type(exc).__name__}: {exc}"})
            return
        channel.write({"t": "r", "id": request_id, "m": reply})

    def _fail_requests(self, channel: _Channel, reason: str) -> None:
        for request_id in channel.requests:
            entry = self._pending.get(request_id)
            if entry is not None and not entry[1].done():
                entry[1].set_exception(RequestFailed(reason))
        channel.requests.clear()


async def _read_lines(reader: asyncio.StreamReader, decoder: LineDecoder) -> list[bytes]:
    """At least one complete line (and whatever else arrived with it)."""
    while True:
        data = await reader.read(READ_CHUNK_BYTES)
        if not data:
            raise asyncio.IncompleteReadError(b"", None)
        lines = [line for line in decoder.feed(data) if line]
        if lines:
            return lines
