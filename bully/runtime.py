"""Drives one server's `ElectionNode` over a `Transport`, on the event loop's clock.

The runtime only moves messages and time: incoming election notifications are decoded, checked against
their authenticated sender and handed to the node with the loop's time; the node's outputs are sent or
passed to the node layer's callbacks; one cancellable `loop.call_at` timer is re-armed after every input to
the node's next deadline. All election logic, the failure detector and the heartbeat schedule live in the
pure `bully.node.ElectionNode`, which the simulations drive too. Besides messages and its timer the
runtime hands the node the transport's link events (connection lost, reconnect refused) and the time its
timer was armed for (the loop's lateness is evidence for the failure detector). Callbacks into the node
layer (coordinator change, peer down/up) run on the loop and are shielded: an exception there is logged,
never allowed to stop the election.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from bully.election import ElectionTimings
from bully.failure_detector import LinkEvent
from bully.messages import ELECTION_KINDS, ProtocolError, from_wire, to_wire
from bully.node import Broadcast, CoordinatorChanged, ElectionNode, Output, PeerDown, PeerUp, Role, Send
from bully.transport import Transport
from cluster.config import ClusterConfig

log = logging.getLogger("chatmesh.election")


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
        self.self_id = self_id
        self.transport = transport
        self.timings = timings or ElectionTimings()
        self._on_coordinator_change = on_coordinator_change
        self._on_peer_down = on_peer_down
        self._on_peer_up = on_peer_up
        priorities: dict[str, int] = {s.server_id: s.priority for s in config.servers}
        self.node = ElectionNode(self_id, priorities, self.timings, can_lead, rng or random.Random(), incarnation)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._running = False

    # -- lifetime ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        self.transport.on_notify(self._on_notify)
        self.transport.on_link_event(self._on_link_event)
        self._apply(self.node.start(self._loop.time()))
        self._on_timer()

    async def close(self) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- observation -------------------------------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self.node.incarnation

    @incarnation.setter
    def incarnation(self, value: int) -> None:
        """The node layer starts a new life after it was fenced; heartbeats carry it from now on."""
        self.node.incarnation = value

    @property
    def coordinator(self) -> str | None:
        return self.node.coordinator

    @property
    def is_coordinator(self) -> bool:
        return self.node.is_coordinator

    @property
    def role(self) -> Role:
        return self.node.role

    @property
    def state(self) -> str:
        return self.node.state

    @property
    def epoch(self) -> int:
        return self.node.epoch

    @property
    def servers_up(self) -> set[str]:
        return self.node.servers_up

    @property
    def elections(self) -> int:
        return self.node.elections

    @property
    def peer_incarnations(self) -> dict[str, int]:
        return self.node.peer_incarnations

    def followers(self) -> dict[str, float]:
        """Since when each server has followed this one (loop time; call on the loop)."""
        return self.node.followers()

    def servers_heard_within(self, span_s: float) -> set[str]:
        """This server and the peers heard in the last `span_s` seconds (call on the loop)."""
        now = self._loop.time() if self._loop is not None else 0.0
        return self.node.servers_heard_within(now, span_s)

    def start_election(self) -> None:
        """Operator trigger: run an election now (call on the loop)."""
        if not self._running or self._loop is None:
            return
        log.info("%s: election requested by an operator", self.self_id)
        self._apply(self.node.start_election(self._loop.time()))
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
        self._apply(self.node.receive(sender, message, self._loop.time()))
        self._rearm()

    def _on_link_event(self, peer: str, event: LinkEvent) -> None:
        if not self._running or self._loop is None:
            return
        if event != "up":
            log.info("%s: link to %s %s", self.self_id, peer, event)
        self._apply(self.node.on_link_event(peer, event, self._loop.time()))
        self._rearm()

    def _on_timer(self) -> None:
        armed_for = self._timer_at
        self._timer = None
        self._timer_at = None
        if not self._running or self._loop is None:
            return
        self._apply(self.node.on_deadline(self._loop.time(), armed_for))
        self._rearm()

    def _rearm(self) -> None:
        if not self._running or self._loop is None:
            return
        at = self.node.next_deadline()
        assert at is not None, "started nodes always have a heartbeat due"
        at = max(at, self._loop.time())
        if self._timer is not None:
            if self._timer_at == at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    # -- outputs -----------------------------------------------------------------------------------------------

    def _apply(self, outputs: list[Output]) -> None:
        for output in outputs:
            match output:
                case Send(to, message):
                    self.transport.send(to, to_wire(message))
                case Broadcast(message):
                    self.transport.broadcast(to_wire(message))
                case CoordinatorChanged(coordinator):
                    log.info("%s: coordinator %s (epoch %d)", self.self_id, coordinator, self.node.epoch)
                    self._callback(self._on_coordinator_change, coordinator)
                case PeerDown(peer, incarnation, certain):
                    how = "gone" if certain else "silent"
                    log.info("%s: %s down (incarnation %d, %s)", self.self_id, peer, incarnation, how)
                    self._callback(self._on_peer_down, peer, incarnation, certain)
                case PeerUp(peer, incarnation):
                    log.info("%s: %s up (incarnation %d)", self.self_id, peer, incarnation)
                    self._callback(self._on_peer_up, peer, incarnation)

    def _callback(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("%s: election callback %r failed", self.self_id, callback)
