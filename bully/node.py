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

Heartbeats ("star" schedule): a tick every `heartbeat_interval_s` from the first `start`; each beat carries
the current epoch, the incarnation (the shell replaces it after this server was fenced) and the coordinator
followed. At a tick a server beats:
- everyone, while it coordinates or follows nobody (electing, starting), and once every
  `mesh_heartbeat_interval_s` whatever its role;
- otherwise only the coordinator it follows and the servers whose last beat named it as their coordinator.
So the coordinator and its members watch each other at the full rate (n-1 beats each way per tick in the
whole cluster instead of n*(n-1)) and two members only once per mesh interval. The detector is told whose
beats to expect at the full rate (`FailureDetector.expect_fast`): the coordinator followed and the followers;
everyone else is judged on the mesh schedule. When the coordinator followed changes, the previous and the
new one get a beat at once, so each knows at once whether to expect the full rate. What does not change:
the election messages (bully/election.py), certain evidence from a closed connection and a refused
reconnect (at once, for any peer), and T1 for a silent coordinator. After a stall the schedule restarts
from `now` instead of sending a burst to catch up.

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
            slow_interval_s=timings.mesh_heartbeat_interval_s,
        )
        self._next_heartbeat: float | None = None
        self._next_mesh_heartbeat: float | None = None
        # Peers whose last heartbeat said they follow us: they get our heartbeat at the full rate.
        # (since when each has, so a new coordinator's membership policy can wait until a majority has
        # followed it for a moment: node/membership.py).
        self._followers: dict[str, float] = {}
        self._coordinating_since: float | None = None
        self._followed: str | None = None  # the last coordinator our heartbeats named
        self._beat_to_coordinator_at: float | None = None  # when our last beat to the coordinator went out

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

    def followers(self) -> dict[str, float]:
        """Since when each server has followed this one without a break: the peers it hears whose heartbeats
        name it as their coordinator, and this server itself while it coordinates."""
        up = self.detector.up()
        since = {peer: t for peer, t in self._followers.items() if peer in up}
        if self._coordinating_since is not None:
            since[self.self_id] = self._coordinating_since
        return since

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
        self._next_mesh_heartbeat = now
        return list(self.core.start(now))

    def receive(self, sender: str, message: Message, now: float) -> list[Output]:
        """An election message or heartbeat from `sender` (already checked to be its real sender)."""
        if isinstance(message, Heartbeat):
            self.detector.heard(sender, message.incarnation, now)
            if message.coordinator == self.self_id:
                self._followers.setdefault(sender, now)
            else:
                self._followers.pop(sender, None)
        outputs = self._verdicts(now)
        outputs.extend(self.core.receive(sender, message, now))
        if isinstance(message, Heartbeat) and sender == self.core.coordinator == self._followed != self.self_id:
            outputs.extend(self._answer_beat(sender, now))  # (a new coordinator gets its beat from _settle)
        return self._settle(outputs, now)

    def on_link_event(self, peer: str, event: LinkEvent, now: float) -> list[Output]:
        """The shell's evidence: our connection to `peer` ended ("lost"), a reconnect was refused, or a
        connection came up again (which cancels the evidence of a loss)."""
        if event == "lost":
            self.detector.connection_lost(peer, now)
        elif event == "refused":
            self.detector.reconnect_refused(peer, now)
        else:
            self.detector.connection_up(peer, now)
        return self._settle(self._verdicts(now), now)

    def on_deadline(self, now: float, armed_for: float | None = None) -> list[Output]:
        """The shell's timer fired; `armed_for` is the time it was set for (its lateness is evidence)."""
        if armed_for is not None:
            self.detector.observer_late(now - armed_for - TIMER_SLACK_S)
        outputs: list[Output] = []
        if self._next_heartbeat is not None and now >= self._next_heartbeat:
            outputs.extend(self._heartbeats(now))
            self._next_heartbeat += self.timings.heartbeat_interval_s
            if self._next_heartbeat <= now:  # we were stalled: no burst to catch up
                self._next_heartbeat = now + self.timings.heartbeat_interval_s
        outputs.extend(self._verdicts(now))
        outputs.extend(self.core.on_deadline(now))
        return self._settle(outputs, now)

    def start_election(self, now: float) -> list[Output]:
        """Operator trigger: run an election now."""
        return self._settle(list(self.core.start_election(now)), now)

    # -- the heartbeat schedule ----------------------------------------------------------------------------

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(self.self_id, self.core.epoch, self.incarnation, self.core.coordinator)

    def _heartbeats(self, now: float) -> list[Output]:
        """The beats due now: to everyone while this server coordinates or follows nobody, and once per
        mesh interval; otherwise only to the coordinator it follows and to the servers that follow it."""
        coordinator = self.core.coordinator
        mesh_due = self._next_mesh_heartbeat is not None and now >= self._next_mesh_heartbeat
        if mesh_due:
            self._next_mesh_heartbeat = now + self.timings.mesh_heartbeat_interval_s
        if mesh_due or coordinator is None or coordinator == self.self_id:
            if coordinator is not None and coordinator != self.self_id:
                self._beat_to_coordinator_at = now
            return [Broadcast(self._heartbeat())]
        beat = self._heartbeat()
        to = set(self._followers)
        last = self._beat_to_coordinator_at
        if last is None or now - last >= self.timings.heartbeat_interval_s - TIMER_SLACK_S:
            to.add(coordinator)  # the coordinator's beats stopped reaching us (or just began): beat it ourselves
            self._beat_to_coordinator_at = now
        return [Send(peer, beat) for peer in sorted(to - {self.self_id})]

    def _answer_beat(self, coordinator: str, now: float) -> list[Output]:
        """A beat from the coordinator we follow is answered at once with ours, instead of on our own tick:
        the coordinator then hears its n-1 members within a millisecond of its own beat, a handful of loop
        wake-ups per tick instead of n-1, and each beat carries the TCP acknowledgement of the other, with
        no bare ACK segment (at 24 servers on one machine, a quarter of the coordinator's idle CPU went to
        this: docs/election.md). Our own tick stops beating the coordinator while its beats keep arriving,
        and resumes one interval after they stop, so a silent coordinator still hears us at the full rate.
        At most one answer per half interval: two servers that each take the other for the coordinator
        cannot bounce beats back and forth."""
        interval = self.timings.heartbeat_interval_s
        last = self._beat_to_coordinator_at
        if last is not None and now - last < interval / 2:
            return []
        self._beat_to_coordinator_at = now
        if not self._followers and self._next_heartbeat is not None:
            # Nothing else is due on our tick before the next mesh beat: no wake-up for it meanwhile.
            later = now + interval
            if self._next_mesh_heartbeat is not None:
                later = min(later, self._next_mesh_heartbeat)
            self._next_heartbeat = max(self._next_heartbeat, later)
        return [Send(coordinator, self._heartbeat())]

    def _settle(self, outputs: list[Output], now: float) -> list[Output]:
        """After every input: if this server follows a new coordinator, tell the previous one and the new
        one at once (the previous one stops expecting our beats at the full rate, the new one starts),
        then tell the detector whose beats to expect at the full rate."""
        coordinator = self.core.coordinator
        # Following nobody, this server beats everyone from the next tick on anyway: only a new coordinator
        # is told at once, and with it the last one followed (perhaps before a spell of following nobody).
        if coordinator is not None and coordinator != self._followed:
            previous, self._followed = self._followed, coordinator
            beat = self._heartbeat()
            self._beat_to_coordinator_at = now
            for peer in sorted({p for p in (previous, coordinator) if p is not None and p != self.self_id}):
                outputs.append(Send(peer, beat))
        if coordinator != self.self_id:
            self._coordinating_since = None
        elif self._coordinating_since is None:
            self._coordinating_since = now
        self._expect(now)
        return outputs

    def _expect(self, now: float) -> None:
        """Tell the detector who heartbeats us at the full rate: the coordinator we follow (a coordinator
        beats everyone; after stepping down it still beats every server whose beats name it), and the
        servers whose last beat named us (a follower that switches tells us at once, see `_settle`).
        Everyone else beats us once per mesh interval: such a server is declared down by silence only
        after `suspect_gap_factor` mesh intervals (capped at `suspect_max_s`); a crashed one (closed
        connection, refused reconnect) still at once, and the coordinator after T1 as before."""
        coordinator = self.core.coordinator
        fast = set(self._followers)
        if coordinator is not None and coordinator != self.self_id:
            fast.add(coordinator)
        self.detector.expect_fast(fast, now)

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
