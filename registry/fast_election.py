"""When a replica that knows its Raft leader is dead stands for leader: `FastElection`, pure, `now` passed in.

Theory of operation
-------------------
Raft's own election timeout (3.5-4.5 s here) is only a fallback. When the failure detector declares the
Raft leader down, every survivor calls `leader_gone` with a delay that grows with its rank (the top
survivor 0, the next `raft_election_stagger_s`, ...), and `tick` (called after every PySyncObj tick with
the replica's term and leader) says when to stand:

1. Done as soon as a leader other than the dead one is known (or this replica leads), or when the
   fallback would fire anyway (`give_up_after_s`, Raft's minimum election timeout): Raft takes over.
2. Not before the rank's delay.
3. If the term moved since this replica last looked, someone else stands (or stood) in an election that
   may still succeed: do not disrupt it (a second candidate in the next term cancels the first one's
   votes). Look again after a random wait in [`retry_min_s`, `retry_max_s`].
4. Otherwise (the term is where it was and there is still no leader): stand now, expect the term to
   move by one, and look again after a random wait.

Rule 3 is what keeps a loaded machine from splitting the vote: PySyncObj's tick thread can run a few
hundred milliseconds late, so the ranked delays alone do not order the candidates. Rule 4 with the random
wait is Raft's own remedy for a split vote, on a window ten times shorter than its fallback: an election
that produced no leader (votes split, or the candidate's log was behind) is retried within
`retry_max_s`, by whichever survivor's wait ends first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class _Pending:
    against: str  # the dead leader's Raft node id
    at: float  # do not look before this
    term: int  # the term last seen (or expected after standing)
    until: float  # give up: Raft's own timer handles it from here


class FastElection:
    def __init__(self, retry_min_s: float, retry_max_s: float, give_up_after_s: float, rng: random.Random) -> None:
        if not 0 < retry_min_s <= retry_max_s < give_up_after_s:
            raise ValueError("need 0 < retry_min_s <= retry_max_s < give_up_after_s")
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.give_up_after_s = give_up_after_s
        self._rng = rng
        self._pending: _Pending | None = None
        self.stood = 0  # elections this replica started through here
        self.deferred = 0  # times it saw someone else's election and waited for it

    @property
    def active(self) -> bool:
        return self._pending is not None

    def leader_gone(self, against: str, now: float, after_s: float, term: int) -> None:
        """The Raft leader `against` was declared down; stand `after_s` from `now` unless a leader appears or
        someone else stands first. `term`: this replica's current term."""
        self._pending = _Pending(against, now + after_s, term, now + after_s + self.give_up_after_s)

    def tick(self, now: float, term: int, leader: str | None, is_leader: bool) -> bool:
        """After a PySyncObj tick: True when this replica should start a Raft election now."""
        p = self._pending
        if p is None:
            return False
        if is_leader or (leader is not None and leader != p.against) or now >= p.until:
            self._pending = None
            return False
        if now < p.at:
            return False
        retry_at = now + self._rng.uniform(self.retry_min_s, self.retry_max_s)
        if term > p.term:
            self.deferred += 1
            self._pending = _Pending(p.against, retry_at, term, p.until)
            return False
        self.stood += 1
        self._pending = _Pending(p.against, retry_at, term + 1, p.until)
        return True
