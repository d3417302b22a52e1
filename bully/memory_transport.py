"""The coordination channel in memory: the same contract as `TcpTransport`, for tests and simulations.

Theory of operation
-------------------
A `MemoryNetwork` links `MemoryTransport`s by server id. Every frame is JSON-encoded and decoded on the
way (what does not survive the wire fails here as it would over TCP) and is delivered by the receiving
transport's own event loop (`loop.call_at`), so a simulation that gives every server its own loop on one
fake clock decides when each frame arrives. Per pair of servers frames arrive in the order they were sent
(TCP's order), each later than the previous by at least `ORDER_STEP_S`.

What the network does to a frame is asked of two hooks, which a simulation overrides:
- `delay(src, dst)`: seconds in flight, or None when the frame is lost (lost frames of a request make it
  time out, as a cut TCP link does);
- `reachable(src, dst)`: asked again on arrival; a frame in flight across a link cut meanwhile is dropped.

Failures, as the TCP transport shows them to its callers: a request to an unknown server, to a server with
no transport attached (connection refused), or from a closed transport fails at once with `RequestFailed`;
when a transport is detached (its process died) every request waiting on it fails at once (the peer reset
the connection), and every transport that could reach it reports the link event "lost" and then
"refused" (the reconnect finds nothing listening), as `TcpTransport` does; a request nobody answers
fails after its timeout; a handler's exception or a missing
handler comes back as `RequestFailed`. Notifications to unreachable or absent servers are dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Callable
from typing import Any

from bully.failure_detector import LinkEvent
from bully.transport import Complaints, LinkEventHandler, NotifyHandler, RequestFailed, RequestHandler

log = logging.getLogger("chatmesh.transport")

ORDER_STEP_S = 1e-6
# Bound on request handlers running at once per transport (TcpTransport bounds them per connection).
MAX_HANDLERS = 1024

Frame = dict[str, Any]


class MemoryNetwork:
    def __init__(
        self,
        delay: Callable[[str, str], float | None] | None = None,
        reachable: Callable[[str, str], bool] | None = None,
    ) -> None:
        self._delay = delay or (lambda src, dst: 0.0)
        self._reachable = reachable or (lambda src, dst: True)
        self.transports: dict[str, MemoryTransport] = {}
        self._link_clock: dict[tuple[str, str], float] = {}
        self.frames = 0

    def attach(self, transport: MemoryTransport) -> None:
        old = self.transports.get(transport.self_id)
        if old is not None and old is not transport:
            self.detach(old)
        self.transports[transport.self_id] = transport

    def detach(self, transport: MemoryTransport) -> None:
        """The server's process ended: its connections reset, requests waiting on it fail."""
        if self.transports.get(transport.self_id) is transport:
            del self.transports[transport.self_id]
        for other in list(self.transports.values()):
            connected = self._reachable(other.self_id, transport.self_id)
            other.peer_gone(transport.self_id, connected)

    def carry(self, src: MemoryTransport, dst_id: str, frame: Frame) -> bool:
        """Put a frame on the wire; False when nobody listens at `dst_id` (connection refused)."""
        dst = self.transports.get(dst_id)
        if dst is None:
            return False
        self.frames += 1
        if not self._reachable(src.self_id, dst_id):
            return True
        delay = self._delay(src.self_id, dst_id)
        if delay is None:
            return True
        text = json.dumps(frame, separators=(",", ":"))
        loop = dst.loop
        link = (src.self_id, dst_id)
        at = max(loop.time() + delay, self._link_clock.get(link, float("-inf")) + ORDER_STEP_S)
        self._link_clock[link] = at
        loop.call_at(at, self._arrive, src.self_id, dst, text)
        return True

    def _arrive(self, src_id: str, dst: MemoryTransport, text: str) -> None:
        if self.transports.get(dst.self_id) is not dst or not self._reachable(src_id, dst.self_id):
            return
        dst.on_frame(src_id, json.loads(text))


class MemoryTransport:
    def __init__(self, network: MemoryNetwork, self_id: str, peers: list[str], loop: asyncio.AbstractEventLoop):
        self.network = network
        self.self_id = self_id
        self.peers = [p for p in peers if p != self_id]
        self.loop = loop
        self._notify_handlers: list[NotifyHandler] = []
        self._link_handlers: list[LinkEventHandler] = []
        self._request_handlers: dict[str, RequestHandler] = {}
        self._pending: dict[int, tuple[str, asyncio.Future[Frame]]] = {}
        self._request_ids = itertools.count(1)
        self._handlers: set[asyncio.Task[None]] = set()
        self._closed = False
        self.complain = Complaints()

    async def start(self) -> None:
        self.network.attach(self)

    async def close(self) -> None:
        self._closed = True
        self.network.detach(self)
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(RequestFailed("transport closed"))
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    def on_notify(self, handler: NotifyHandler) -> None:
        self._notify_handlers.append(handler)

    def on_link_event(self, handler: LinkEventHandler) -> None:
        self._link_handlers.append(handler)

    def on_request(self, kind: str, handler: RequestHandler) -> None:
        self._request_handlers[kind] = handler

    def send(self, peer: str, message: dict[str, Any]) -> bool:
        if peer not in self.peers:
            self.complain(f"unknown:{peer}", f"not sending to unknown server {peer!r}")
            return False
        if self._closed:
            return False
        self.network.carry(self, peer, {"t": "n", "m": message})
        return True

    def broadcast(self, message: dict[str, Any]) -> None:
        for peer in self.peers:
            self.send(peer, message)

    async def request(self, peer: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        if peer not in self.peers:
            raise RequestFailed(f"unknown server {peer!r}")
        if self._closed:
            raise RequestFailed("transport closed")
        request_id = next(self._request_ids)
        future: asyncio.Future[Frame] = self.loop.create_future()
        self._pending[request_id] = (peer, future)
        try:
            if not self.network.carry(self, peer, {"t": "q", "id": request_id, "m": message}):
                raise RequestFailed(f"{peer}: connection refused")
            try:
                async with asyncio.timeout(timeout):
                    return await future
            except TimeoutError:
                raise RequestFailed(f"no reply from {peer} within {timeout:.2f}s") from None
        finally:
            self._pending.pop(request_id, None)

    def peer_gone(self, peer: str, connected: bool) -> None:
        """`peer`'s process ended; `connected`: our link to it worked, so we see the reset and the refusal."""
        for request_id, (to, future) in list(self._pending.items()):
            if to == peer and not future.done():
                future.set_exception(RequestFailed(f"connection to {peer} lost"))
                del self._pending[request_id]
        if connected and not self._closed and peer in self.peers:
            self.loop.call_soon(self._link_event, peer, "lost")
            self.loop.call_soon(self._link_event, peer, "refused")

    def _link_event(self, peer: str, event: LinkEvent) -> None:
        if self._closed:
            return
        for handler in self._link_handlers:
            try:
                handler(peer, event)
            except Exception:
                log.exception("link event handler failed on %s %s", event, peer)

    # -- arrival -----------------------------------------------------------------------------------------------

    def on_frame(self, sender: str, frame: Frame) -> None:
        if self._closed:
            return
        kind, message = frame.get("t"), frame.get("m")
        if kind == "n" and isinstance(message, dict):
            for handler in self._notify_handlers:
                try:
                    handler(sender, message)
                except Exception:
                    log.exception("notification handler failed on %s from %s", message.get("kind"), sender)
        elif kind == "q" and isinstance(message, dict):
            self._serve(sender, frame["id"], message)
        elif kind == "r":
            entry = self._pending.get(frame["id"])
            if entry is None or entry[0] != sender or entry[1].done():
                return  # a reply after our timeout
            error = frame.get("e")
            if error is not None or not isinstance(message, dict):
                entry[1].set_exception(RequestFailed(f"{sender}: {error or 'malformed reply'}"))
            else:
                entry[1].set_result(message)

    def _serve(self, sender: str, request_id: int, message: Frame) -> None:
        handler = self._request_handlers.get(str(message.get("kind")))
        if handler is None:
            error = f"no handler for kind {message.get('kind')!r}"
            self.network.carry(self, sender, {"t": "r", "id": request_id, "e": error})
            return
        if len(self._handlers) >= MAX_HANDLERS:
            self.network.carry(self, sender, {"t": "r", "id": request_id, "e": "busy"})
            return
        task = self.loop.create_task(self._run_handler(sender, handler, request_id, message))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _run_handler(self, sender: str, handler: RequestHandler, request_id: int, message: Frame) -> None:
        try:
            reply = await handler(sender, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("request handler for %r from %s failed: %r", message.get("kind"), sender, exc)
            self.network.carry(self, sender, {"t": "r", "id": request_id, "e": f"{type(exc).__name__}: {exc}"})
            return
        if not self._closed:
            self.network.carry(self, sender, {"t": "r", "id": request_id, "m": reply})
