"""The Fast Bully election as a pure state machine (Lee & Choi, "The Fast Bully Algorithm", ICOIN 2002).

Theory of operation
-------------------
The core owns no socket, thread or clock: every call takes `now`, returns the effects to perform (`Send`,
`Broadcast`, `CoordinatorChanged`) and `next_deadline()` says when `on_deadline(now)` wants to be called.
Randomness (timer jitter only) comes from the injected `random.Random`.

Epochs order everything. `epoch` is the highest election epoch this server has seen; a coordinator's claim
is the pair (epoch, priority) and claims are totally ordered by it: a later epoch wins, and within one epoch
the higher priority wins. A server only ever moves to a better claim, so delayed or replayed messages of a
superseded election or reign are recognised and ignored ("stale"). A coordinator keeps its claim epoch equal
to the highest epoch it has seen (it re-announces when it sees a newer one), so its heartbeat is its claim.

States and what each accepts (paper section 3; T1..T4 in `ElectionTimings`):
- starting   `IamUp` was broadcast; collecting `View`s for T2 (paper 3.2, recovery). Then: if no server up
             outranks it, it announces itself; otherwise it adopts the best coordinator the views name, or,
             if they name none, waits T4 for a higher server to announce.
- idle       a coordinator is known (or none is needed yet); nothing pending.
- holdoff    the coordinator failed (T1, from the failure detector) and a higher server is believed alive:
             wait `holdoff_s` for that server's announcement before electing (it most likely detected the
             same failure; this turns n concurrent detections into one announcement).
- electing   `Election` sent to every higher server; collecting `Answer`s for T2 (paper 3.1). No answer: the
             initiator announces itself. Answers: it nominates the highest answerer.
- nominating `Nomination` sent; waiting T3 for the nominee's `Coordinator`. Silence: the next answerer is
             nominated, up to `max_nominees` (k); then the election restarts.
- waiting    this server answered an election (or recovered below a silent higher server); waiting T4 for a
             nomination or a coordinator, else it starts an election itself. T4 > T2 + k*T3 so an answerer
             never restarts while the initiator is still legitimately collecting answers and nominating.
- blocked    this server outranks the coordinator it knows (or there is none) but `can_lead()` is false (its
             registry replica is not ready or has no quorum); it re-checks every `lead_retry_s` and then
             runs an election. Meanwhile it keeps following the lower coordinator, if any.

Invariants: a server announces itself only while `can_lead()` is true; its epoch never decreases; a
coordinator's claim epoch equals its epoch; every set is iterated in sorted order so a seeded simulation
replays exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from bully.messages import (
    Answer,
    Coordinator,
    Election,
    Heartbeat,
    IamUp,
    Message,
    Nomination,
    View,
)
from cluster.timings import ClusterTimings

# Every default comes from the one table of timings (cluster/timings.py), where they are documented.
_DEFAULTS = ClusterTimings()

State = Literal["starting", "idle", "holdoff", "electing", "nominating", "waiting", "blocked"]


@dataclass(frozen=True, slots=True)
class ElectionTimings:
    """Every timeout of the election and failure detection, in seconds.

    The paper's four timeouts, named after what each waits for:
      T1 `suspect_after_s`       silence after which a peer is declared failed (~7 missed heartbeats: a
                                 stalled but live process on a busy 2-core machine must not trip it)
      T2 `answer_timeout_s`      answers to an election, or views after IamUp
      T3 `coordinator_timeout_s` the nominee's coordinator message
      T4 `nomination_timeout_s`  an answerer waiting for a nomination or a coordinator message
    and `max_nominees` (k), how many answerers an initiator nominates before restarting. T4 must exceed
    T2 + k*T3, or answerers start rival elections while the initiator is still nominating.
    """

    heartbeat_interval_s: float = _DEFAULTS.heartbeat_interval_s
    # Star heartbeats (bully/node.py): the rate between two servers neither of which follows the other.
    mesh_heartbeat_interval_s: float = _DEFAULTS.mesh_heartbeat_interval_s
    suspect_after_s: float = _DEFAULTS.suspect_after_s
    # Adaptive suspicion (bully/failure_detector.py): the window stretches to this many times a peer's
    # recent heartbeat gaps, up to `suspect_max_s`, plus the observer's own lateness.
    suspect_gap_factor: float = _DEFAULTS.suspect_gap_factor
    suspect_max_s: float = _DEFAULTS.suspect_max_s
    answer_timeout_s: float = _DEFAULTS.answer_timeout_s
    coordinator_timeout_s: float = _DEFAULTS.coordinator_timeout_s
    max_nominees: int = int(_DEFAULTS.max_nominees)
    nomination_timeout_s: float = _DEFAULTS.nomination_timeout_s
    # Not in the paper: how long a non-top server waits for the top survivor after the coordinator fails,
    # and how often a server blocked by its registry re-checks `can_lead()`.
    holdoff_s: float = _DEFAULTS.holdoff_s
    lead_retry_s: float = _DEFAULTS.lead_retry_s

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval_s", "suspect_after_s", "suspect_max_s", "answer_timeout_s",
                     "coordinator_timeout_s", "nomination_timeout_s", "holdoff_s", "lead_retry_s"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_nominees < 1:
            raise ValueError("max_nominees must be at least 1")
        if not self.heartbeat_interval_s <= self.mesh_heartbeat_interval_s <= self.suspect_max_s / 2:
            raise ValueError("need heartbeat_interval_s <= mesh_heartbeat_interval_s <= suspect_max_s / 2")
        if self.suspect_after_s < 2 * self.heartbeat_interval_s:
            raise ValueError("suspect_after_s must cover at least two heartbeat intervals")
        if self.suspect_max_s < self.suspect_after_s or self.suspect_gap_factor < 1:
            raise ValueError("need suspect_max_s >= suspect_after_s and suspect_gap_factor >= 1")
        budget = self.answer_timeout_s + self.max_nominees * self.coordinator_timeout_s
        if not self.nomination_timeout_s > budget:
            raise ValueError(f"T4 ({self.nomination_timeout_s}s) must exceed T2 + k*T3 ({budget}s)")


@dataclass(frozen=True, slots=True)
class Send:
    to: str
    message: Message


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Send to every other configured server."""

    message: Message


@dataclass(frozen=True, slots=True)
class CoordinatorChanged:
    coordinator: str | None


Effect = Send | Broadcast | CoordinatorChanged


class FastBully:
    def __init__(
        self,
        self_id: str,
        priorities: Mapping[str, int],
        timings: ElectionTimings,
        can_lead: Callable[[], bool],
        rng: random.Random,
    ) -> None:
        assert self_id in priorities, f"{self_id} is not configured"
        self._id = self_id
        self._priorities = dict(priorities)
        self._priority = priorities[self_id]
        self._timings = timings
        self._can_lead = can_lead
        self._rng = rng
        # Highest priority first: the order in which answerers are nominated.
        self._higher = sorted((p for p in priorities if priorities[p] > self._priority), key=self._rank)
        self._others = sorted((p for p in priorities if p != self_id), key=self._rank)

        self._epoch = 0
        self._coordinator: str | None = None
        self._coordinator_epoch = 0  # epoch of the claim we follow
        self._lost: tuple[str, int] | None = None  # the last claim we saw fail
        self._taught: dict[str, float] = {}  # when we last told a lagging peer who coordinates
        self._state: State = "idle"
        self._deadline: float | None = None  # the current state's timeout
        self._lead_retry_at: float | None = None  # only in state "blocked"
        self._alive: set[str] = set()  # heard from and not failed since
        self._down: set[str] = set()  # declared failed by the failure detector
        self._views: dict[str, View] = {}
        self._answers: set[str] = set()
        self._nominees: list[str] = []
        self._nominee: str | None = None
        self.elections_started = 0

    # -- observation --------------------------------------------------------------------------------

    @property
    def coordinator(self) -> str | None:
        return self._coordinator

    @property
    def state(self) -> State:
        return self._state

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def self_id(self) -> str:
        return self._id

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self._deadline, self._lead_retry_at) if d is not None]
        return min(deadlines) if deadlines else None

    # -- inputs ---------------------------------------------------------------------------------------

    def start(self, now: float) -> list[Effect]:
        """Paper 3.2: a (re)starting server broadcasts IamUp and collects views for T2."""
        if not self._others:
            return self._try_lead(now, self._epoch + 1)
        self._views = {}
        self._enter("starting", now + self._timings.answer_timeout_s)
        return [Broadcast(IamUp(self._id, self._epoch))]

    def receive(self, sender: str, message: Message, now: float) -> list[Effect]:
        if sender == self._id or sender not in self._priorities or message.sender != sender:
            return []
        self._down.discard(sender)
        self._alive.add(sender)
        match message:
            case Heartbeat():
                return self._on_heartbeat(sender, message, now)
            case IamUp():
                return self._on_iamup(sender, now)
            case View():
                return self._on_view(sender, message, now)
            case Election():
                return self._on_election(sender, message, now)
            case Answer():
                return self._on_answer(sender, message, now)
            case Nomination():
                return self._on_nomination(sender, message, now)
            case Coordinator():
                return self._on_claim(sender, message.epoch, now)
        return []

    def on_deadline(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            match self._state:
                case "starting":
                    effects += self._on_views_timeout(now)
                case "holdoff":
                    effects += self._on_holdoff_timeout(now)
                case "electing":
                    effects += self._on_answer_timeout(now)
                case "nominating":
                    effects += self._on_coordinator_timeout(now)
                case "waiting":
                    effects += self._on_nomination_timeout(now)
                case "idle" | "blocked":
                    pass
        if self._lead_retry_at is not None and now >= self._lead_retry_at:
            self._lead_retry_at = None
            effects += self._on_lead_retry_timeout(now)
        return effects

    def peer_failed(self, peer: str, now: float) -> list[Effect]:
        """The failure detector declared `peer` down (T1). If it was the coordinator, elect a new one."""
        if peer not in self._priorities or peer == self._id:
            return []
        self._down.add(peer)
        self._alive.discard(peer)
        effects: list[Effect] = []
        if peer == self._coordinator:
            effects += self._lose_coordinator()
            if self._state != "starting":
                effects += self._begin_failover(now)
        elif self._state == "nominating" and peer == self._nominee:
            # No point waiting T3 for a nominee known dead.
            effects += self._nominate_next(now)
        return effects

    def peer_recovered(self, peer: str, now: float) -> list[Effect]:
        """The failure detector hears `peer` again; it announces itself (IamUp, heartbeats), so just note it."""
        if peer in self._priorities and peer != self._id:
            self._down.discard(peer)
            self._alive.add(peer)
        return []

    def start_election(self, now: float) -> list[Effect]:
        """Paper 3.1: send Election to every higher server and collect answers for T2 (also the admin trigger)."""
        self.elections_started += 1
        self._epoch += 1
        self._answers = set()
        self._nominee = None
        if not self._candidates():
            # Every higher server is known down (or there is none): no answer can come, announce at once.
            return self._try_lead(now, self._epoch)
        self._enter("electing", now + self._timings.answer_timeout_s)
        return [Send(p, Election(self._id, self._epoch)) for p in self._higher]

    # -- message handlers -------------------------------------------------------------------------------

    def _on_iamup(self, sender: str, now: float) -> list[Effect]:
        effects: list[Effect] = []
        restarted_coordinator = sender == self._coordinator
        if restarted_coordinator:
            # Our coordinator restarted faster than the detector noticed: its new life coordinates nothing.
            effects += self._lose_coordinator()
        up = tuple(sorted(self._alive | {self._id}, key=self._rank))
        effects.append(Send(sender, View(self._id, self._epoch, self._coordinator, up)))
        if restarted_coordinator and self._state != "starting":
            effects += self._begin_failover(now)
        return effects

    def _on_view(self, sender: str, view: View, now: float) -> list[Effect]:
        if self._state != "starting":
            return []
        self._views[sender] = view
        if len(self._views) == len(self._others):
            # Everyone answered: no reason to wait out T2.
            self._deadline = None
            return self._on_views_timeout(now)
        return []

    def _on_election(self, sender: str, election: Election, now: float) -> list[Effect]:
        if self._priorities[sender] > self._priority:
            return []  # elections go upwards only; this one is misaddressed
        if election.epoch < self._epoch:
            # A stale initiator: if we coordinate, tell it directly instead of letting it run a dead election.
            return self._teach(sender, now)
        if not self._can_lead():
            # We could not take the role if nominated, so we do not answer; the initiator will pick someone
            # else or announce itself. A coordinator that can no longer lead steps down rather than keep a
            # claim older than the epoch it has now seen.
            effects: list[Effect] = []
            if election.epoch > self._epoch:
                self._epoch = election.epoch
                if self._coordinator == self._id:
                    effects += self._lose_coordinator()
                    effects += self._block(now)
            return effects
        effects = [Send(sender, Answer(self._id, election.epoch))]
        newer = election.epoch > self._epoch
        if newer:
            self._epoch = election.epoch
        if self._coordinator == self._id:
            if newer:
                # Keep our claim at the newest epoch: re-announce (the nomination will follow or not).
                effects += self._announce(self._epoch)
            return effects
        if self._coordinator is not None and self._coordinator_epoch >= election.epoch:
            return effects  # we already follow a coordinator of that election or a newer one
        if self._state in ("idle", "holdoff", "blocked", "waiting") or (
            newer and self._state in ("electing", "nominating")
        ):
            # A newer election supersedes ours; we are a candidate in it. Wait for its outcome (T4).
            self._enter("waiting", now + self._timings.nomination_timeout_s)
        return effects

    def _on_answer(self, sender: str, answer: Answer, now: float) -> list[Effect]:
        if self._state != "electing" or answer.epoch != self._epoch:
            return []
        self._answers.add(sender)
        candidates = self._candidates()
        if candidates and sender == candidates[0]:
            # The best possible answer is in: nominate now rather than wait out T2.
            return self._nominate(now)
        return []

    def _on_nomination(self, sender: str, nomination: Nomination, now: float) -> list[Effect]:
        if nomination.epoch < self._epoch:
            return self._teach(sender, now)
        if not self._can_lead():
            return []  # the initiator nominates the next answerer after T3
        if self._coordinator == self._id and self._coordinator_epoch >= nomination.epoch:
            return [Send(sender, Coordinator(self._id, self._coordinator_epoch))]
        return self._announce(max(self._epoch, nomination.epoch))

    def _on_heartbeat(self, sender: str, heartbeat: Heartbeat, now: float) -> list[Effect]:
        if heartbeat.coordinator == sender:
            # A coordinator's heartbeat is its claim: this repairs lost Coordinator messages within a beat.
            return self._on_claim(sender, heartbeat.epoch, now)
        if self._coordinator == self._id:
            believed = heartbeat.coordinator
            if believed is None or self._priorities.get(believed, -1) < self._priority:
                # The sender follows nobody or someone we outrank (a healed partition, a lost announcement).
                if heartbeat.epoch > self._epoch:
                    if self._can_lead():
                        return self._announce(heartbeat.epoch)
                    return []
                return self._teach(sender, now)
            return []  # it follows someone above us; that server's own heartbeat will reach us
        if sender == self._coordinator and heartbeat.coordinator is None:
            # Our coordinator no longer coordinates (it stepped down or restarted); replace it.
            effects = self._lose_coordinator()
            return effects + self._begin_failover(now)
        return []

    def _on_claim(self, claimant: str, epoch: int, now: float) -> list[Effect]:
        """`claimant` says it is coordinator for `epoch` (a Coordinator message or its heartbeat)."""
        if claimant == self._coordinator and epoch <= self._coordinator_epoch:
            return []  # nothing new (every heartbeat of the coordinator lands here)
        if self._lost is not None and claimant == self._lost[0] and epoch <= self._lost[1]:
            return []  # a late message of the reign we saw fail; only a newer announcement revives it
        better = epoch > self._epoch or (
            epoch == self._epoch
            and (
                self._coordinator is None
                or self._coordinator_epoch < epoch
                or self._priorities[claimant] >= self._priorities[self._coordinator]
            )
        )
        outranked = self._priorities[claimant] < self._priority
        if outranked and self._can_lead():
            # Bully: we outrank the claimant and can take the role.
            if self._coordinator == self._id:
                if better:
                    return self._announce(epoch)  # same epoch, higher priority: our claim wins the tie
                return self._teach(claimant, now)
            if not better:
                return []
            effects = self._adopt(claimant, epoch)  # follow it meanwhile, so requests can be routed
            if self._state == "starting":
                return effects  # the views decide at T2
            if self._state in ("electing", "nominating") and self._epoch >= epoch:
                return effects  # our running election ends with us or someone above us
            return effects + self.start_election(now)
        if not better:
            return self._teach(claimant, now)
        effects = self._adopt(claimant, epoch)
        if outranked:
            effects += self._block(now)  # we cannot lead now; take the role back once we can
        else:
            self._enter("idle", None)
        return effects

    # -- timeouts -------------------------------------------------------------------------------------------

    def _on_views_timeout(self, now: float) -> list[Effect]:
        """T2 after IamUp: decide from the views (paper 3.2)."""
        views = [self._views[s] for s in sorted(self._views, key=self._rank)]
        self._views = {}
        for view in views:
            self._epoch = max(self._epoch, view.epoch)
        up = {v.sender for v in views} | {v.coordinator for v in views if v.coordinator is not None} | self._alive
        up -= self._down | {self._id}
        claims = [
            (v.epoch, self._priorities[v.coordinator], v.coordinator)
            for v in views
            if v.coordinator is not None and v.coordinator != self._id and v.coordinator in self._priorities
            and v.coordinator not in self._down
        ]  # fmt: skip
        effects: list[Effect] = []
        if claims and self._coordinator is None:
            epoch, _, best = max(claims)
            effects += self._adopt(best, epoch)
        if all(self._priorities[s] < self._priority for s in up if s in self._priorities):
            if self._coordinator == self._id:
                self._enter("idle", None)
                return effects
            return effects + self._try_lead(now, self._epoch + 1)
        if self._coordinator is not None:
            if self._priorities[self._coordinator] < self._priority:
                # We recovered above the current coordinator (but below someone else up): bully it.
                if self._can_lead():
                    return effects + self.start_election(now)
                return effects + self._block(now)
            self._enter("idle", None)
            return effects
        # Higher servers are up but nobody coordinates yet (they are starting too): let them announce.
        self._enter("waiting", now + self._timings.nomination_timeout_s)
        return effects

    def _on_holdoff_timeout(self, now: float) -> list[Effect]:
        if self._coordinator is not None:
            self._enter("idle", None)
            return []
        return self.start_election(now)

    def _on_answer_timeout(self, now: float) -> list[Effect]:
        """T2: nominate the highest answerer; with no answer at all, announce ourselves (paper 3.1)."""
        if self._answers:
            return self._nominate(now)
        return self._try_lead(now, self._epoch)

    def _on_coordinator_timeout(self, now: float) -> list[Effect]:
        """T3: the nominee stayed silent; nominate the next highest answerer."""
        return self._nominate_next(now)

    def _on_nomination_timeout(self, now: float) -> list[Effect]:
        """T4: we answered but neither a nomination nor a coordinator came: elect ourselves."""
        return self.start_election(now)

    def _on_lead_retry_timeout(self, now: float) -> list[Effect]:
        if self._state != "blocked":
            return []
        if self._coordinator == self._id or (
            self._coordinator is not None and self._priorities[self._coordinator] > self._priority
        ):
            self._enter("idle", None)
            return []
        if self._can_lead():
            return self.start_election(now)
        return self._block(now)

    # -- steps ------------------------------------------------------------------------------------------------

    def _begin_failover(self, now: float) -> list[Effect]:
        if not self._candidates():
            return self.start_election(now)  # we are the top survivor: announces at once
        self._enter("holdoff", now + self._timings.holdoff_s)
        return []

    def _nominate(self, now: float) -> list[Effect]:
        self._nominees = sorted(self._answers, key=self._rank)[: self._timings.max_nominees]
        return self._nominate_next(now)

    def _nominate_next(self, now: float) -> list[Effect]:
        while self._nominees:
            nominee = self._nominees.pop(0)
            if nominee in self._down:
                continue
            self._nominee = nominee
            self._enter("nominating", now + self._timings.coordinator_timeout_s)
            return [Send(nominee, Nomination(self._id, self._epoch))]
        self._nominee = None
        return self.start_election(now)

    def _try_lead(self, now: float, epoch: int) -> list[Effect]:
        if self._can_lead():
            return self._announce(max(epoch, self._epoch))
        return self._block(now)

    def _announce(self, epoch: int) -> list[Effect]:
        assert epoch >= self._epoch, "an announcement never goes back in epochs"
        self._epoch = epoch
        effects = self._set_coordinator(self._id, epoch)
        self._enter("idle", None)
        effects.append(Broadcast(Coordinator(self._id, epoch)))
        return effects

    def _adopt(self, coordinator: str, epoch: int) -> list[Effect]:
        self._epoch = max(self._epoch, epoch)
        return self._set_coordinator(coordinator, epoch)

    def _block(self, now: float) -> list[Effect]:
        self._enter("blocked", None)
        # Jitter so servers blocked by the same registry do not all retry in the same instant.
        self._lead_retry_at = now + self._timings.lead_retry_s * (0.75 + 0.5 * self._rng.random())
        return []

    def _teach(self, peer: str, now: float) -> list[Effect]:
        """A peer is behind: if we coordinate, tell it directly (one message, not a broadcast).

        At most once per T2 per peer: a backlog of its stale heartbeats (after it or we were stopped) would
        otherwise draw one reply each.
        """
        if self._coordinator != self._id:
            return []
        last = self._taught.get(peer)
        if last is not None and now - last < self._timings.answer_timeout_s:
            return []
        self._taught[peer] = now
        return [Send(peer, Coordinator(self._id, self._epoch))]

    def _enter(self, state: State, deadline: float | None) -> None:
        self._state = state
        self._deadline = deadline
        if state != "blocked":
            self._lead_retry_at = None

    def _set_coordinator(self, coordinator: str | None, epoch: int) -> list[Effect]:
        self._coordinator_epoch = epoch
        if coordinator == self._coordinator:
            return []
        self._coordinator = coordinator
        return [CoordinatorChanged(coordinator)]

    def _lose_coordinator(self) -> list[Effect]:
        if self._coordinator is not None:
            self._lost = (self._coordinator, self._coordinator_epoch)
        return self._set_coordinator(None, self._coordinator_epoch)

    def _candidates(self) -> list[str]:
        """Higher servers that may still answer, best first."""
        return [p for p in self._higher if p not in self._down]

    def _rank(self, server: str) -> tuple[int, str]:
        return (-self._priorities[server], server)
