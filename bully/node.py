"""One server's whole election, pure: the Fast Bully core, the failure detector and the heartbeat schedule.

Theory of operation
-------------------
`ElectionNode` is what a server runs for the election, with no socket, timer or clock of its own. Every
input takes `now` and returns the outputs to carry out, in order:
- `Send(to, message)` / `Broadcast(message)`: election messages and heartbeats to put on the wire;
- `CoordinatorChanged(coordinator)`: the coordinator this server follows changed;
- `PeerDown(peer, incarnation)` / `PeerUp(peer, incarnation)`: the failure detector's verdicts (already
  fed to the core; the node layer purges or re-admits what that peer holds).
`next_deadline()` says when `on_deadline(now)` wants to be called: the earliest of the core's timer, the
detector's next possible verdict and the next heartbeat. A shell (`bully.runtime.ElectionRuntime` over TCP,
the simulations over their in-memory network) only decodes messages, arms one timer and carries outputs
out, so the wiring between the three parts is written once, here, and tested by the simulations.

Heartbeats: one every `heartbeat_interval_s` from the first `start`, carrying the current epoch, the
incarnation (the shell replaces it after this server was fenced) and the coordinator followed. After a
stall the schedule restarts from `now` instead of sending a burst to catch up.

Evidence for the detector besides heartbeats: the shell reports link events (`on_link_event`: our
connection to a peer was lost, or a reconnect was refused), and with each deadline the time its timer was
armed for, so the detector credits every peer's silence with the observer's own lateness beyond
`TIMER_SLACK_S` (bully/failure_detector.py).

Order inside one input: a heartbeat is reported to the detector first, then the detector's verdicts go to
the core (so a restarted peer is seen down and up again before its message is handled), then the message.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Literal, Protocol

from bully.election import Broadcast, CoordinatorChanged, Effect, ElectionTimings, FastBully, Send
from bully.failure_detector import FailureDetector, LinkEvent, PeerDown, PeerEvent, PeerUp
from bully.messages import Heartbeat, Message

Output = Effect | PeerEvent
# A timer firing later than this is the loop's lateness, credited to every peer's silence; below it, it is
# the loop's ordinary scheduling noise.
TIMER_SLACK_S = 0.005
Role = Literal["coordinator", "member", "electing"]


class ElectionCore(Protocol):
    """What `ElectionNode` needs of an election core (`FastBully`, or the classic Bully reference in tests)."""

    elections_started: int

    @property
    def coordinator(self) -> str | None: ...
    @property
    def state(self) -> str: ...
    @property
    def epoch(self) -> int: ...
    def start(self, now: float) -> list[Effect]: ...
    def receive(self, sender: str, message: Message, now: float) -> list[Effect]: ...
    def on_deadline(self, now: float) -> list[Effect]: ...
    def next_deadline(self) -> float | None: ...
    def peer_failed(self, peer: str, now: float) -> list[Effect]: ...
    def peer_recovered(self, peer: str, now: float) -> list[Effect]: ...
    def start_election(self, now: float) -> list[Effect]: ...


CoreFactory = Callable[[str, dict[str, int], ElectionTimings, Callable[[], bool], random.Random], ElectionCore]


class ElectionNode:
    def __init__(
        self,
        self_id: str,
        priorities: Mapping[str, int],
        timings: ElectionTimings,
        can_lead: Callable[[], bool],
        rng: random.Random,
        incarnation: int,
        core_factory: CoreFactory = FastBully,
    ) -> None:
        self.self_id = self_id
        self.timings = timings
        # The shell replaces this after the server was fenced; heartbeats always carry the current value.
        self.incarnation = incarnation
        self.core = core_factory(self_id, dict(priorities), timings, can_lead, rng)
        self.detector = FailureDetector(
            [p for p in sorted(priorities) if p != self_id],
            timings.heartbeat_interval_s,
            timings.suspect_after_s,
            suspect_gap_factor=timings.suspect_gap_factor,
            suspect_max_s=timings.suspect_max_s,
        )
        self._next_heartbeat: float | None = None

    # -- observation -------------------------------------------------------------------------------------------

    @property
    def coordinator(self) -> str | None:
        return self.core.coordinator

    @property
    def is_coordinator(self) -> bool:
        return self.core.coordinator == self.self_id

    @property
    def role(self) -> Role:
        if self.core.coordinator is None:
            return "electing"
        return "coordinator" if self.core.coordinator == self.self_id else "member"

    @property
    def state(self) -> str:
        return self.core.state

    @property
    def epoch(self) -> int:
        return self.core.epoch

    @property
    def elections(self) -> int:
        return self.core.elections_started

    @property
    def servers_up(self) -> set[str]:
        return self.detector.up() | {self.self_id}

    @property
    def peer_incarnations(self) -> dict[str, int]:
        return self.detector.incarnations()

    def servers_heard_within(self, now: float, span_s: float) -> set[str]:
        """This server and the peers heard in the last `span_s` seconds."""
        return self.detector.heard_within(now, span_s) | {self.self_id}

    def next_deadline(self) -> float | None:
        """When `on_deadline` must next be called (None before `start`)."""
        at = self._next_heartbeat
        if at is None:
            return None
        for deadline in (self.core.next_deadline(), self.detector.next_deadline()):
            if deadline is not None and deadline < at:
                at = deadline
        return at

    # -- inputs ------------------------------------------------------------------------------------------------

    def start(self, now: float) -> list[Output]:
        """Announce this server (IamUp); the first heartbeat is due at once."""
        self._next_heartbeat = now
        return list(self.core.start(now))

    def receive(self, sender: str, message: Message, now: float) -> list[Output]:
        """An election message or heartbeat from `sender` (already checked to be its real sender)."""
        if isinstance(message, Heartbeat):
            self.detector.heard(sender, message.incarnation, now)
        outputs = self._verdicts(now)
        outputs.extend(self.core.receive(sender, message, now))
        return outputs

    def on_link_event(self, peer: str, event: LinkEvent, now: float) -> list[Output]:
        """The shell's evidence: our connection to `peer` ended ("lost"), a reconnect was refused, or a
        connection came up again (which cancels the evidence of a loss)."""
        if event == "lost":
            self.detector.connection_lost(peer, now)
        elif event == "refused":
            self.detector.reconnect_refused(peer, now)
        else:
            self.detector.connection_up(peer, now)
        return self._verdicts(now)

    def on_deadline(self, now: float, armed_for: float | None = None) -> list[Output]:
        """The shell's timer fired; `armed_for` is the time it was set for (its lateness is evidence)."""
        if armed_for is not None:
            self.detector.observer_late(now - armed_for - TIMER_SLACK_S)
        outputs: list[Output] = []
        if self._next_heartbeat is not None and now >= self._next_heartbeat:
            outputs.append(Broadcast(Heartbeat(self.self_id, self.core.epoch, self.incarnation, self.core.coordinator)))
            self._next_heartbeat += self.timings.heartbeat_interval_s
            if self._next_heartbeat <= now:  # we were stalled: no burst to catch up
                self._next_heartbeat = now + self.timings.heartbeat_interval_s
        outputs.extend(self._verdicts(now))
        outputs.extend(self.core.on_deadline(now))
        return outputs

    def start_election(self, now: float) -> list[Output]:
        """Operator trigger: run an election now."""
        return list(self.core.start_election(now))

    def _verdicts(self, now: float) -> list[Output]:
        outputs: list[Output] = []
        for event in self.detector.check(now):
            outputs.append(event)
            match event:
                case PeerDown(peer, _, _):
                    outputs.extend(self.core.peer_failed(peer, now))
                case PeerUp(peer, _):
                    outputs.extend(self.core.peer_recovered(peer, now))
        return outputs


__all__ = [
    "Broadcast",
    "CoordinatorChanged",
    "CoreFactory",
    "ElectionCore",
    "ElectionNode",
    "Output",
    "PeerDown",
    "PeerUp",
    "Role",
    "Send",
]
