"""Heartbeat failure detector, pure: the caller reports heartbeats and connection events and asks for
events at its deadlines.

Theory of operation
-------------------
A peer heartbeats us every `heartbeat_interval_s` (100 ms by default) if the caller says so
(`expect_fast`: in bully/node.py's star schedule, the coordinator and the servers following us), every
`slow_interval_s` otherwise (1 s; None: every peer at the full rate). A peer is *up* from the first
heartbeat heard and is declared *down* (`PeerDown`) on one of two kinds of evidence:

Certain: the caller reports that its connection to the peer ended (`connection_lost`: EOF or RST) and that
a reconnect was then refused (`reconnect_refused`: nothing listens on the peer's port). The process is gone
while its host is up: the peer is down at once (`PeerDown.certain`), with no timeout. A refused connect
alone, without a lost connection before it, proves nothing (the peer may never have been reached); a
successful reconnect (`connection_up`) or a new incarnation cancels the loss. A heartbeat of the same
incarnation does not: it may have been sent before the death and read after it.

Silence: a frozen (SIGSTOP) or cut-off peer closes nothing, so only a timeout tells. A peer is declared
down once nothing has been heard from it for its *suspicion window*, which adapts to what is observed:
- the base is `suspect_after_s` (T1, 750 ms by default: about seven heartbeats);
- a peer whose recent heartbeats came in gaps of g seconds (its own loop is late: a busy machine) gets
  `suspect_gap_factor` * g when that is longer (the largest of its last `GAP_HISTORY` gaps);
- a peer on the slow schedule gets `suspect_gap_factor` * `slow_interval_s` when that is longer;
- the window never exceeds `suspect_max_s`;
- a peer moved to the full rate gets a whole window from that moment (its last heartbeat may be most of a
  slow interval old), and its gap history starts over;
- and the observer's own lateness is added on top: when the caller's timer fires late by `lag` seconds
  (`observer_late`), every up peer's silence is credited `lag` (up to `suspect_max_s`), because heartbeats
  that arrived meanwhile are still waiting to be read. The credit is cleared by the next heartbeat.
A starved machine therefore stretches its deadlines instead of declaring healthy peers dead, while a peer
frozen on a quiet machine is still declared down after T1.

Incarnations: every heartbeat carries the sender's incarnation (a number that grows with every restart).
A larger incarnation means the peer restarted, perhaps faster than T1: the detector reports `PeerDown` for
the old life (the node layer purges what that life held) followed by `PeerUp` for the new one. A smaller
incarnation is a delayed heartbeat of a dead life and is ignored. A heartbeat from a down peer brings it
back (`PeerUp`).

Our own stalls: if the detector itself has not been consulted for `stall_after_s` (the process was stopped
or starved), silence proves nothing about the peers, so each up peer gets a fresh window instead of all
being declared down at once.

States per peer: unknown (never heard; no event), up, down. Events come out of `check(now)` in sorted peer
order, so a seeded simulation replays exactly.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

# Evidence about a peer's process from the caller's transport: our connection to it ended ("lost"), a
# connection attempt was refused ("refused": nothing listens on its port), or it is established ("up").
LinkEvent = Literal["lost", "refused", "up"]

# Heartbeat gaps remembered per peer for its suspicion window.
GAP_HISTORY = 8


@dataclass(frozen=True, slots=True)
class PeerDown:
    peer: str
    incarnation: int  # the last incarnation heard from it
    certain: bool = False  # a closed connection and a refused reconnect, not silence


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
        suspect_gap_factor: float = 3.0,
        suspect_max_s: float | None = None,
        slow_interval_s: float | None = None,
    ) -> None:
        assert heartbeat_interval_s > 0 and suspect_after_s > heartbeat_interval_s and suspect_gap_factor >= 1
        self._peers = frozenset(peers)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.suspect_after_s = suspect_after_s
        self.suspect_gap_factor = suspect_gap_factor
        self.suspect_max_s = suspect_max_s if suspect_max_s is not None else 4 * suspect_after_s
        assert self.suspect_max_s >= suspect_after_s
        # Our callers consult us at least every heartbeat interval (they send heartbeats on the same timer);
        # a gap several times longer means we were not running.
        self.stall_after_s = (
            stall_after_s if stall_after_s is not None else min(4 * heartbeat_interval_s, suspect_after_s / 2)
        )
        # Star heartbeats (bully/node.py): only the peers in `_fast` heartbeat us every interval; the others
        # every `slow_interval_s`, so their window starts at `suspect_gap_factor` of those (capped).
        self.slow_interval_s = slow_interval_s
        self._fast: frozenset[str] = frozenset()
        self._since: dict[str, float] = {}  # silence counts from here, not from before the schedule changed
        self._last_heard: dict[str, float] = {}
        self._incarnation: dict[str, int] = {}
        self._gaps: dict[str, deque[float]] = {}
        self._credit: dict[str, float] = {}  # observer lateness since the peer was last heard
        self._lost: set[str] = set()  # up peers whose connection ended since they were last heard
        self._up: set[str] = set()
        self._pending: list[PeerEvent] = []
        self._last_activity: float | None = None
        self._earliest: float | None = None  # the earliest suspicion deadline of an up peer
        # (deadline, peer) of every up peer, plus entries made stale since (their peer's deadline moved or it
        # went down), which `_top` drops when they come first: `heard` costs O(log n), not a scan.
        self._deadlines: list[tuple[float, str]] = []
        self.certain_downs = 0
        self.silent_downs = 0

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
            self._gaps.pop(peer, None)
        previous = self._last_heard.get(peer)
        if peer in self._up and previous is not None and now > previous:
            self._gaps.setdefault(peer, deque(maxlen=GAP_HISTORY)).append(now - previous)
        self._incarnation[peer] = incarnation
        self._last_heard[peer] = now
        self._since.pop(peer, None)
        self._credit.pop(peer, None)
        if known is not None and incarnation > known:
            self._lost.discard(peer)
        if peer not in self._up:
            self._up.add(peer)
            self._pending.append(PeerUp(peer, incarnation))
        # The coordinator hears every member ten times a second, and the member heard is nearly always the
        # one with the earliest deadline: rescanning every peer then made its cost grow as n*n. Only this
        # peer's deadline moved, so it goes on the heap; its old entry is dropped once it reaches the top.
        heapq.heappush(self._deadlines, (self._deadline(peer), peer))
        if len(self._deadlines) > 2 * len(self._up) + 8:
            self._rebuild()
        else:
            self._earliest = self._top()

    def connection_lost(self, peer: str, now: float) -> None:
        """Our connection to `peer` ended (EOF or reset): a refused reconnect now proves it is gone."""
        if peer in self._up:
            self._observe(now)
            self._lost.add(peer)

    def connection_up(self, peer: str, now: float) -> None:
        """Our connection to `peer` is (again) established: whatever was lost is not evidence any more."""
        self._lost.discard(peer)

    def reconnect_refused(self, peer: str, now: float) -> None:
        """A connection attempt to `peer` was refused (nothing listens on its port)."""
        if peer not in self._lost or peer not in self._up:
            return
        self._observe(now)
        self._lost.discard(peer)
        self._up.discard(peer)
        self.certain_downs += 1
        self._pending.append(PeerDown(peer, self._incarnation[peer], certain=True))
        self._earliest = self._top()

    def observer_late(self, lag_s: float) -> None:
        """The caller's own timer fired `lag_s` late: credit every up peer's silence with it."""
        if lag_s <= 0:
            return
        for peer in self._up:
            self._credit[peer] = min(self._credit.get(peer, 0.0) + lag_s, self.suspect_max_s)
        self._rebuild()

    def expect_fast(self, peers: Iterable[str], now: float) -> None:
        """Only `peers` heartbeat us every `heartbeat_interval_s` from now on; the rest every `slow_interval_s`.

        A peer whose schedule changes starts a fresh record: its gaps on the old schedule say nothing about
        the new one, and a peer moved to the full rate gets a whole window from `now` (its last heartbeat
        may be most of a slow interval old without anything being wrong)."""
        fast = frozenset(peers) & self._peers
        if fast == self._fast:
            return
        self._observe(now)
        for peer in fast ^ self._fast:
            self._gaps.pop(peer, None)
            if peer in fast and peer in self._up:
                self._since[peer] = now
        self._fast = fast
        self._rebuild()

    def window(self, peer: str) -> float:
        """How long `peer` may be silent before it is declared down (the adaptive suspicion window)."""
        gaps = self._gaps.get(peer)
        base = self.suspect_after_s
        if self.slow_interval_s is not None and peer not in self._fast:
            base = max(base, self.suspect_gap_factor * self.slow_interval_s)
        if gaps:
            base = max(base, self.suspect_gap_factor * max(gaps))
        return min(base, self.suspect_max_s) + self._credit.get(peer, 0.0)

    def check(self, now: float) -> list[PeerEvent]:
        """Events since the last call: peers first heard, restarted, recovered, gone, or silent too long."""
        self._observe(now)
        events, self._pending = self._pending, []
        if self._earliest is None or now < self._earliest:
            return events
        for peer in sorted(self._up):
            if now >= self._deadline(peer):
                self._up.discard(peer)
                self._lost.discard(peer)
                self.silent_downs += 1
                events.append(PeerDown(peer, self._incarnation[peer]))
        self._earliest = self._top()
        return events

    def next_deadline(self) -> float | None:
        """When `check` next has something to report (-inf if events are pending)."""
        if self._pending:
            return float("-inf")
        return self._earliest

    def up(self) -> set[str]:
        return set(self._up)

    def heard_within(self, now: float, span_s: float) -> set[str]:
        """Up peers heard in the last `span_s` seconds: unlike `up()`, which lags a break by a whole
        suspicion window, this shows a short cut-off (a partition that heals before anyone is declared). A
        peer on the slow schedule (`expect_fast`) is allowed the longer spacing of its heartbeats on top."""
        return {peer for peer in self._up if now - self._last_heard[peer] <= span_s + self._schedule_slack(peer)}

    def _schedule_slack(self, peer: str) -> float:
        """How much longer than a full-rate peer's a slow peer's heartbeats may be apart on schedule."""
        if self.slow_interval_s is None or peer in self._fast:
            return 0.0
        return self.slow_interval_s - self.heartbeat_interval_s

    def _silent_since(self, peer: str) -> float:
        since = self._since.get(peer)
        last = self._last_heard[peer]
        return last if since is None or since < last else since

    def incarnations(self) -> dict[str, int]:
        """The last incarnation heard from every peer ever heard."""
        return dict(self._incarnation)

    def _deadline(self, peer: str) -> float:
        return self._silent_since(peer) + self.window(peer)

    def _rebuild(self) -> None:
        """Every up peer's deadline moved (or may have): a fresh heap."""
        self._deadlines = [(self._deadline(p), p) for p in self._up]
        heapq.heapify(self._deadlines)
        self._earliest = self._top()

    def _top(self) -> float | None:
        heap = self._deadlines
        while heap:
            deadline, peer = heap[0]
            if peer in self._up and deadline == self._deadline(peer):
                return deadline
            heapq.heappop(heap)
        return None

    def _observe(self, now: float) -> None:
        last = self._last_activity
        self._last_activity = now if last is None else max(last, now)
        if last is not None and now - last > self.stall_after_s:
            for peer in self._up:
                self._last_heard[peer] = max(self._last_heard[peer], now)
                self._credit.pop(peer, None)
            if self._up:
                self._rebuild()
