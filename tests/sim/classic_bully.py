"""The classic Bully algorithm (Garcia-Molina, 1982): a reference for tests and the message-count bench only.

Same interface and timings as `FastBully`, same failure detector, no epochs (every message carries 0):
- an election sends `Election` to every higher server and waits T2; with no `Answer` the initiator announces
  `Coordinator` to all; with an answer it waits T4 for the announcement and otherwise starts over;
- every server receiving `Election` from a lower one answers and starts its own election (the cascade that
  makes the classic algorithm O(n^2) messages in the worst case);
- a recovering server starts an election; a `Coordinator` from a lower server is answered by an election.
Announcing is gated on `can_lead()` like the Fast Bully core (retry every `lead_retry_s`), so the two can
run in the same simulations.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from bully.election import Broadcast, CoordinatorChanged, Effect, ElectionTimings, Send
from bully.messages import Answer, Coordinator, Election, Message


class ClassicBully:
    def __init__(
        self,
        self_id: str,
        priorities: Mapping[str, int],
        timings: ElectionTimings,
        can_lead: Callable[[], bool],
        rng: random.Random,
    ) -> None:
        self._id = self_id
        self._priorities = dict(priorities)
        self._priority = priorities[self_id]
        self._timings = timings
        self._can_lead = can_lead
        self._higher = sorted((p for p in priorities if priorities[p] > self._priority), key=lambda p: -priorities[p])
        self._coordinator: str | None = None
        self._state = "idle"
        self._deadline: float | None = None
        self.elections_started = 0

    @property
    def coordinator(self) -> str | None:
        return self._coordinator

    @property
    def state(self) -> str:
        return self._state

    @property
    def epoch(self) -> int:
        return 0

    def next_deadline(self) -> float | None:
        return self._deadline

    def start(self, now: float) -> list[Effect]:
        return self.start_election(now)

    def start_election(self, now: float) -> list[Effect]:
        self.elections_started += 1
        if not self._higher:
            return self._announce(now)
        self._state, self._deadline = "electing", now + self._timings.answer_timeout_s
        return [Send(p, Election(self._id, 0)) for p in self._higher]

    def receive(self, sender: str, message: Message, now: float) -> list[Effect]:
        match message:
            case Election() if self._priorities[sender] < self._priority:
                effects: list[Effect] = [Send(sender, Answer(self._id, 0))]
                if self._state not in ("electing", "waiting"):
                    effects += self.start_election(now)
                return effects
            case Answer() if self._state == "electing":
                self._state, self._deadline = "waiting", now + self._timings.nomination_timeout_s
            case Coordinator():
                if self._priorities[sender] < self._priority:
                    effects = self._follow(sender)
                    if self._state not in ("electing", "waiting"):
                        effects += self.start_election(now)
                    return effects
                self._state, self._deadline = "idle", None
                return self._follow(sender)
        return []

    def on_deadline(self, now: float) -> list[Effect]:
        if self._deadline is None or now < self._deadline:
            return []
        self._deadline = None
        if self._state == "electing":
            return self._announce(now)
        if self._state in ("waiting", "blocked"):
            return self.start_election(now)
        return []

    def peer_failed(self, peer: str, now: float) -> list[Effect]:
        if peer != self._coordinator:
            return []
        return self._follow(None) + self.start_election(now)

    def peer_recovered(self, peer: str, now: float) -> list[Effect]:
        return []

    def _announce(self, now: float) -> list[Effect]:
        if not self._can_lead():
            self._state, self._deadline = "blocked", now + self._timings.lead_retry_s
            return []
        self._state, self._deadline = "idle", None
        return self._follow(self._id) + [Broadcast(Coordinator(self._id, 0))]

    def _follow(self, coordinator: str | None) -> list[Effect]:
        if coordinator == self._coordinator:
            return []
        self._coordinator = coordinator
        return [CoordinatorChanged(coordinator)]
