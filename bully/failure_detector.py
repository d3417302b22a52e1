"""Heartbeat failure detector, pure: the caller reports heartbeats and asks for events at its deadlines.

Theory of operation
-------------------
Every server heartbeats every other one every `heartbeat_interval_s` (100 ms by default). A peer is *up*
from the first heartbeat heard and is declared *down* (`PeerDown`) once nothing has been heard from it for
`suspect_after_s` (T1, 750 ms by default: about seven missed heartbeats, so a SIGKILLed server is noticed
in under a second while a live server whose loop stalls for a few hundred milliseconds on a busy 2-core
machine is not). A heartbeat from a down peer brings it back (`PeerUp`).

Incarnations: every heartbeat carries the sender's incarnation (a number that grows with every restart).
A larger incarnation means the peer restarted, perhaps faster than T1: the detector reports `PeerDown` for
the old life (the node layer purges what that life held) followed by `PeerUp` for the new one. A smaller
incarnation is a delayed heartbeat of a dead life and is ignored.

Our own stalls: if the detector itself has not been consulted for `stall_after_s` (the process was stopped
or starved), silence proves nothing about the peers, so each up peer gets a fresh T1 window instead of all
being declared down at once.

States per peer: unknown (never heard; no event), up, down. Events come out of `check(now)` in sorted peer
order, so a seeded simulation replays exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PeerDown:
    peer: str
    incarnation: int  # the last incarnation heard from it


@dataclass(frozen=True, slots=True)
class PeerUp:
    peer: str
    incarnation: int


PeerEvent = PeerDown | PeerUp


class FailureDetector:
    def __init__(
        self,
        peers: Iterable[str],
        heartbeat_interval_s: float,
        suspect_after_s: float,
        stall_after_s: float | None = None,
    ) -> None:
        assert heartbeat_interval_s > 0 and suspect_after_s > heartbeat_interval_s
        self._peers = frozenset(peers)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.suspect_after_s = suspect_after_s
        # Our callers consult us at least every heartbeat interval (they send heartbeats on the same timer);
        # a gap several times longer means we were not running.
        self.stall_after_s = (
            stall_after_s if stall_after_s is not None else min(4 * heartbeat_interval_s, suspect_after_s / 2)
        )
        self._last_heard: dict[str, float] = {}
        self._incarnation: dict[str, int] = {}
        self._up: set[str] = set()
        self._pending: list[PeerEvent] = []
        self._last_activity: float | None = None
        # A lower bound of the earliest suspicion deadline: heard() only moves deadlines later, so a bound
        # computed once stays valid and check() can return at once until it passes.
        self._earliest: float | None = None

    def heard(self, peer: str, incarnation: int, now: float) -> None:
        """A heartbeat from `peer` arrived at `now`."""
        if peer not in self._peers:
            return
        self._observe(now)
        known = self._incarnation.get(peer)
        if known is not None and incarnation < known:
            return  # a delayed heartbeat of an earlier life
        if known is not None and incarnation > known and peer in self._up:
            self._up.discard(peer)
            self._pending.append(PeerDown(peer, known))
        self._incarnation[peer] = incarnation
        self._last_heard[peer] = now
        if peer not in self._up:
            self._up.add(peer)
            self._pending.append(PeerUp(peer, incarnation))
            if self._earliest is None or now + self.suspect_after_s < self._earliest:
                self._earliest = now + self.suspect_after_s

    def check(self, now: float) -> list[PeerEvent]:
        """Events since the last call: peers first heard, restarted, recovered, or silent for T1."""
        self._observe(now)
        events, self._pending = self._pending, []
        if self._earliest is None or now < self._earliest:
            return events
        for peer in sorted(self._up):
            if now >= self._last_heard[peer] + self.suspect_after_s:
                self._up.discard(peer)
                events.append(PeerDown(peer, self._incarnation[peer]))
        self._earliest = self._exact_earliest()
        return events

    def next_deadline(self) -> float | None:
        """When `check` may next have something to report (-inf if events are pending).

        Possibly early, never late: a call to `check` at that time re-computes the exact deadline.
        """
        if self._pending:
            return float("-inf")
        return self._earliest

    def up(self) -> set[str]:
        return set(self._up)

    def incarnations(self) -> dict[str, int]:
        """The last incarnation heard from every peer ever heard."""
        return dict(self._incarnation)

    def _exact_earliest(self) -> float | None:
        if not self._up:
            return None
        return min(self._last_heard[p] for p in self._up) + self.suspect_after_s

    def _observe(self, now: float) -> None:
        last = self._last_activity
        self._last_activity = now if last is None else max(last, now)
        if last is not None and now - last > self.stall_after_s:
            for peer in self._up:
                self._last_heard[peer] = max(self._last_heard[peer], now)
            if self._up:
                self._earliest = self._exact_earliest()
