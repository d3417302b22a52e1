"""`FastElection` (registry/fast_election.py) rule by rule, on a fake clock."""

from __future__ import annotations

import random

import pytest

from registry.fast_election import FastElection

DEAD = "10.0.0.5:6555"
LIVE = "10.0.0.2:6555"


def policy(seed: int = 1) -> FastElection:
    return FastElection(retry_min_s=0.15, retry_max_s=0.45, give_up_after_s=3.5, rng=random.Random(seed))


def test_nothing_pending_never_stands() -> None:
    p = policy()
    assert not p.tick(0.0, 2, None, False)
    assert not p.active


def test_top_survivor_stands_at_once_when_the_term_has_not_moved() -> None:
    p = policy()
    p.leader_gone(DEAD, now=10.0, after_s=0.0, term=2)
    assert p.tick(10.0, 2, DEAD, False)  # still following the dead leader
    assert p.stood == 1


def test_ranked_survivor_waits_its_delay() -> None:
    p = policy()
    p.leader_gone(DEAD, now=10.0, after_s=0.2, term=2)
    assert not p.tick(10.19, 2, None, False)
    assert p.tick(10.2, 2, None, False)


def test_a_new_leader_ends_it() -> None:
    p = policy()
    p.leader_gone(DEAD, now=10.0, after_s=0.2, term=2)
    assert not p.tick(10.1, 3, LIVE, False)
    assert not p.active
    assert not p.tick(11.0, 3, None, False)


def test_leading_ends_it() -> None:
    p = policy()
    p.leader_gone(DEAD, now=10.0, after_s=0.0, term=2)
    assert not p.tick(10.0, 3, None, True)
    assert not p.active


def test_someone_elses_election_is_not_disrupted() -> None:
    """The split vote seen under load: a lower-ranked survivor's late tick stood first (term 3); the others
    must wait for its outcome instead of standing in term 4."""
    p = policy()
    p.leader_gone(DEAD, now=10.0, after_s=0.1, term=2)
    assert not p.tick(10.3, 3, None, False)
    assert p.deferred == 1 and p.stood == 0
    assert p.active


def test_an_election_that_produced_no_leader_is_retried_within_the_random_window() -> None:
    p = policy()
    p.leader_gone(DEAD, now=10.0, after_s=0.1, term=2)
    assert not p.tick(10.3, 3, None, False)  # someone stands in term 3
    # No leader came of it and the term stayed 3: stand within [0.15, 0.45] s, not after Raft's 3.5 s.
    stood_at = None
    t = 10.3
    while t < 10.3 + 0.46:
        t += 0.01
        if p.tick(t, 3, None, False):
            stood_at = t
            break
    assert stood_at is not None and 10.3 + 0.15 <= stood_at <= 10.3 + 0.46


def test_a_candidate_without_a_leader_stands_again() -> None:
    p = policy()
    p.leader_gone(DEAD, now=10.0, after_s=0.0, term=2)
    assert p.tick(10.0, 2, None, False)  # stands: term 3 expected
    assert not p.tick(10.01, 3, None, False)  # its own term: waits for votes
    assert p.tick(10.5, 3, None, False)  # no leader after the longest wait: again
    assert p.stood == 2


def test_waits_are_randomised() -> None:
    first = []
    for seed in range(20):
        p = policy(seed)
        p.leader_gone(DEAD, now=0.0, after_s=0.0, term=2)
        assert p.tick(0.0, 2, None, False)
        t = 0.0
        while not p.tick(t, 3, None, False):
            t = round(t + 0.01, 2)
        first.append(t)
    assert len(set(first)) > 5
    assert min(first) >= 0.15 and max(first) <= 0.46


def test_gives_up_when_rafts_own_timer_would_fire() -> None:
    p = policy()
    p.leader_gone(DEAD, now=10.0, after_s=0.2, term=2)
    assert not p.tick(10.2 + 3.5, 2, None, False)
    assert not p.active


def test_a_live_leader_of_the_same_term_is_not_challenged() -> None:
    p = policy()
    p.leader_gone(DEAD, now=10.0, after_s=0.0, term=2)
    assert not p.tick(10.0, 2, LIVE, False)
    assert not p.active


@pytest.mark.parametrize(("lo", "hi", "give_up"), [(0.0, 0.4, 3.5), (0.5, 0.4, 3.5), (0.2, 4.0, 3.5)])
def test_bad_windows_are_refused(lo: float, hi: float, give_up: float) -> None:
    with pytest.raises(ValueError):
        FastElection(lo, hi, give_up, random.Random(0))
