"""Drives the Fast Bully core and the failure detector over the transport, on the event loop's clock.

The runtime only moves messages and time: incoming election notifications are decoded and fed to the
detector (heartbeats) and the core; the effects the core returns are sent; one cancellable `loop.call_at`
timer is re-armed after every input to the earliest of the core's deadline, the detector's deadline and
the next heartbeat. Callbacks into the node (coordinator change, peer down/up) run on the loop and are
shielded: an exception there is logged, never allowed to stop the election.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from bully.election import Broadcast, CoordinatorChanged, Effect, ElectionTimings, FastBully, Send
from bully.failure_detector import FailureDetector, PeerDown, PeerEvent, PeerUp
from bully.messages import ELECTION_KINDS, Heartbeat, ProtocolError, from_wire, to_wire
from bully.transport import LinkEvent, Transport
from cluster.config import ClusterConfig

log = logging.getLogger("chatmesh.election")

RECENT_EVENTS = 100
# A timer firing later than this is the loop's lateness, credited to every peer's silence; below it, it is
# the loop's ordinary scheduling noise.
TIMER_SLACK_S = 0.005

Role = Literal["coordinator", "member", "electing"]


class ElectionRuntime:
    def __init__(
        self,
        config: ClusterConfig,
        self_id: str,
        transport: Transport,
        can_lead: Callable[[], bool],
        incarnation: int,
        timings: ElectionTimings | None = None,
        on_coordinator_change: Callable[[str | None], None] | None = None,
        on_peer_down: Callable[[str, int, bool], None] | None = None,
        on_peer_up: Callable[[str, int], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.self_id = self_id
        self.transport = transport
        # The node replaces this after it was fenced; heartbeats always carry the current value.
        self.incarnation = incarnation
        self.timings = timings or ElectionTimings()
        self._on_coordinator_change = on_coordinator_change
        self._on_peer_down = on_peer_down
        self._on_peer_up = on_peer_up
        priorities: dict[str, int] = {s.server_id: s.priority for s in config.servers}
        self._core = FastBully(self_id, priorities, self.timings, can_lead, rng or random.Random())
        self._detector = FailureDetector(
            [p for p in priorities if p != self_id],
            self.timings.heartbeat_interval_s,
            self.timings.suspect_after_s,
            suspect_gap_factor=self.timings.suspect_gap_factor,
            suspect_max_s=self.timings.suspect_max_s,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._next_heartbeat = 0.0
        self._running = False
        self._elections_seen = 0
        self.recent_events: deque[tuple[float, str]] = deque(maxlen=RECENT_EVENTS)

    # -- lifetime ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        self.transport.on_notify(self._on_notify)
        self.transport.on_link_event(self._on_link_event)
        now = self._loop.time()
        self._event("starting: IamUp sent")
        self._apply(self._core.start(now))
        self._next_heartbeat = now
        self._on_timer()

    async def close(self) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- observation -------------------------------------------------------------------------------------------

    @property
    def coordinator(self) -> str | None:
        return self._core.coordinator

    @property
    def is_coordinator(self) -> bool:
        return self._core.coordinator == self.self_id

    @property
    def role(self) -> Role:
        if self._core.coordinator is None:
            return "electing"
        return "coordinator" if self._core.coordinator == self.self_id else "member"

    @property
    def state(self) -> str:
        return self._core.state

    @property
    def epoch(self) -> int:
        return self._core.epoch

    @property
    def servers_up(self) -> set[str]:
        return self._detector.up() | {self.self_id}

    @property
    def elections(self) -> int:
        return self._core.elections_started

    @property
    def peer_incarnations(self) -> dict[str, int]:
        return self._detector.incarnations()

    def start_election(self) -> None:
        """Operator trigger: run an election now (call on the loop)."""
        if not self._running or self._loop is None:
            return
        self._event("election requested by an operator")
        self._apply(self._core.start_election(self._loop.time()))
        self._rearm()

    # -- inputs ------------------------------------------------------------------------------------------------

    def _on_notify(self, sender: str, wire: dict[str, Any]) -> None:
        if not self._running or self._loop is None or wire.get("kind") not in ELECTION_KINDS:
            return
        try:
            message = from_wire(wire)
        except ProtocolError as exc:
            self.transport.complain(
                f"election-msg:{sender}", f"ignoring a malformed election message from {sender}: {exc}"
            )
            return
        if message.sender != sender:
            self.transport.complain(
                f"election-sender:{sender}", f"ignoring an election message from {sender} naming {message.sender}"
            )
            return
        now = self._loop.time()
        if isinstance(message, Heartbeat):
            self._detector.heard(sender, message.incarnation, now)
        self._peer_events(self._detector.check(now), now)
        self._apply(self._core.receive(sender, message, now))
        self._rearm()

    def _on_link_event(self, peer: str, event: LinkEvent) -> None:
        """The transport's evidence: our connection to `peer` ended, or a reconnect was refused."""
        if not self._running or self._loop is None:
            return
        now = self._loop.time()
        if event != "up":
            log.info("%s: link to %s %s", self.self_id, peer, event)
        if event == "lost":
            self._detector.connection_lost(peer, now)
        elif event == "refused":
            self._detector.reconnect_refused(peer, now)
        else:
            self._detector.connection_up(peer, now)
        self._peer_events(self._detector.check(now), now)
        self._rearm()

    def _on_timer(self) -> None:
        scheduled = self._timer_at
        self._timer = None
        self._timer_at = None
        if not self._running or self._loop is None:
            return
        now = self._loop.time()
        if scheduled is not None:
            self._detector.observer_late(now - scheduled - TIMER_SLACK_S)
        if now >= self._next_heartbeat:
            self._send_heartbeat()
            self._next_heartbeat += self.timings.heartbeat_interval_s
            if self._next_heartbeat <= now:  # we were stalled: do not send a burst to catch up
                self._next_heartbeat = now + self.timings.heartbeat_interval_s
        self._peer_events(self._detector.check(now), now)
        self._apply(self._core.on_deadline(now))
        self._rearm()

    def _send_heartbeat(self) -> None:
        beat = Heartbeat(self.self_id, self._core.epoch, self.incarnation, self._core.coordinator)
        self.transport.broadcast(to_wire(beat))

    def _rearm(self) -> None:
        if not self._running or self._loop is None:
            return
        at = self._next_heartbeat
        for deadline in (self._core.next_deadline(), self._detector.next_deadline()):
            if deadline is not None and deadline < at:
                at = deadline
        at = max(at, self._loop.time())
        if self._timer is not None:
            if self._timer_at == at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    # -- outputs -----------------------------------------------------------------------------------------------

    def _peer_events(self, events: list[PeerEvent], now: float) -> None:
        for event in events:
            match event:
                case PeerDown(peer, incarnation, certain):
                    self._event(f"{peer} down (incarnation {incarnation}, {'gone' if certain else 'silent'})")
                    self._apply(self._core.peer_failed(peer, now))
                    self._callback(self._on_peer_down, peer, incarnation, certain)
                case PeerUp(peer, incarnation):
                    self._event(f"{peer} up (incarnation {incarnation})")
                    self._apply(self._core.peer_recovered(peer, now))
                    self._callback(self._on_peer_up, peer, incarnation)

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case Send(to, message):
                    self.transport.send(to, to_wire(message))
                case Broadcast(message):
                    self.transport.broadcast(to_wire(message))
                case CoordinatorChanged(coordinator):
                    self._event(f"coordinator is now {coordinator or 'unknown'} (epoch {self._core.epoch})")
                    log.info("%s: coordinator %s (epoch %d)", self.self_id, coordinator, self._core.epoch)
                    self._callback(self._on_coordinator_change, coordinator)
        if self._core.elections_started != self._elections_seen:
            self._elections_seen = self._core.elections_started
            self._event(f"election started (epoch {self._core.epoch})")

    def _callback(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("%s: election callback %r failed", self.self_id, callback)

    def _event(self, text: str) -> None:
        self.recent_events.append((time.time(), text))
