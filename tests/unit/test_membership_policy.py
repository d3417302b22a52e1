"""MembershipPolicy (node/membership.py), one test per rule; time is moved by hand."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import pytest

from node.membership import DeclareDown, MembershipPolicy, MembershipView

GRACE = 5.0
REDECLARE = 2.0
ALL = {"s1", "s2", "s3", "s4", "s5"}
REGISTERED = {"s1": 10, "s2": 20, "s3": 30, "s4": 40, "s5": 50}


def policy() -> MembershipPolicy:
    return MembershipPolicy("s1", cluster_size=5, started_at=0.0, grace_s=GRACE, redeclare_after_s=REDECLARE)


def view(
    now: float,
    alive: Collection[str] = ALL,
    *,
    coordinator: bool = True,
    quorum: bool = True,
    registered: Mapping[str, int] = REGISTERED,
    heard: Mapping[str, int] | None = None,
) -> MembershipView:
    return MembershipView(
        now=now,
        is_coordinator=coordinator,
        alive=set(alive),
        heard=dict(REGISTERED) if heard is None else heard,
        registered=registered,
        has_quorum=quorum,
    )


def settled(p: MembershipPolicy) -> float:
    """The policy has seen the whole cluster for the grace period; returns the time."""
    p.decide(view(0.0))
    return GRACE + 1.0


def test_a_registered_server_the_detector_does_not_hear_is_declared_down() -> None:
    p = policy()
    now = settled(p)
    assert p.decide(view(now, ALL - {"s5"})) == [DeclareDown("s5", 50)]


def test_servers_heard_and_this_server_itself_are_never_declared() -> None:
    p = policy()
    now = settled(p)
    assert p.decide(view(now)) == []
    assert p.decide(view(now, {"s2", "s3", "s4", "s5"})) == []  # s1 is this server


def test_only_the_coordinator_declares() -> None:
    p = policy()
    now = settled(p)
    assert p.decide(view(now, ALL - {"s5"}, coordinator=False)) == []
    assert p.decide(view(now + 0.1, ALL - {"s5"})) == [DeclareDown("s5", 50)]


def test_nothing_is_declared_within_the_grace_after_this_server_started() -> None:
    p = policy()
    p.decide(view(0.0))
    assert p.decide(view(GRACE - 0.01, ALL - {"s5"})) == []
    assert p.decide(view(GRACE, ALL - {"s5"})) == [DeclareDown("s5", 50)]


def test_a_coordinator_that_heard_no_majority_for_the_grace_declares_nothing() -> None:
    p = policy()
    now = settled(p)
    minority = {"s1", "s2"}
    assert p.decide(view(now, minority)) == []
    # The majority is back: the grace runs again from when it was first heard.
    back = ALL - {"s5"}
    assert p.decide(view(now + 1.0, back)) == []
    assert p.decide(view(now + 1.0 + GRACE - 0.01, back)) == []
    assert p.decide(view(now + 1.0 + GRACE, back)) == [DeclareDown("s5", 50)]


def test_a_majority_is_tracked_while_not_coordinator_so_a_new_coordinator_acts_at_once() -> None:
    p = policy()
    for t in (0.0, 3.0, GRACE + 1.0):
        assert p.decide(view(t, ALL - {"s5"}, coordinator=False)) == []
    assert p.decide(view(GRACE + 1.1, ALL - {"s5"})) == [DeclareDown("s5", 50)]


def test_no_declaration_without_a_raft_quorum() -> None:
    p = policy()
    now = settled(p)
    assert p.decide(view(now, ALL - {"s5"}, quorum=False)) == []
    assert p.decide(view(now + 0.1, ALL - {"s5"})) == [DeclareDown("s5", 50)]


def test_an_incarnation_never_heard_gets_the_grace_from_when_it_was_first_seen() -> None:
    p = policy()
    now = settled(p)
    registered = dict(REGISTERED, s5=51)  # s5 restarted and announced itself; not heard yet
    assert p.decide(view(now, ALL - {"s5"}, registered=registered)) == []
    assert p.decide(view(now + GRACE - 0.01, ALL - {"s5"}, registered=registered)) == []
    assert p.decide(view(now + GRACE, ALL - {"s5"}, registered=registered)) == [DeclareDown("s5", 51)]


def test_the_unheard_grace_is_settable_and_counts_from_before_this_server_coordinated() -> None:
    p = MembershipPolicy("s1", 5, started_at=0.0, grace_s=GRACE, redeclare_after_s=REDECLARE, unheard_grace_s=2.0)
    now = settled(p)
    registered = dict(REGISTERED, s5=51)
    assert p.decide(view(now, ALL - {"s5"}, coordinator=False, registered=registered)) == []
    assert p.decide(view(now + 1.99, ALL - {"s5"}, registered=registered)) == []
    assert p.decide(view(now + 2.0, ALL - {"s5"}, registered=registered)) == [DeclareDown("s5", 51)]


def test_an_incarnation_heard_before_is_declared_without_grace() -> None:
    p = policy()
    now = settled(p)
    heard = dict(REGISTERED, s5=51)
    registered = dict(REGISTERED, s5=51)
    assert p.decide(view(now, ALL - {"s5"}, registered=registered, heard=heard)) == [DeclareDown("s5", 51)]


def test_a_declaration_is_not_repeated_while_it_may_be_in_flight() -> None:
    p = policy()
    now = settled(p)
    assert p.decide(view(now, ALL - {"s5"})) == [DeclareDown("s5", 50)]
    assert p.decide(view(now + REDECLARE - 0.01, ALL - {"s5"})) == []
    # Still registered after the retry interval: it did not commit, declare again.
    assert p.decide(view(now + REDECLARE, ALL - {"s5"})) == [DeclareDown("s5", 50)]


def test_declarations_come_in_server_order() -> None:
    p = policy()
    now = settled(p)
    assert p.decide(view(now, {"s1", "s2", "s3"})) == [DeclareDown("s4", 40), DeclareDown("s5", 50)]


def test_memory_is_dropped_for_incarnations_no_longer_registered() -> None:
    p = policy()
    now = settled(p)
    registered = dict(REGISTERED, s5=51)
    p.decide(view(now, ALL - {"s5"}, registered=registered))
    gone = {k: v for k, v in REGISTERED.items() if k != "s5"}
    p.decide(view(now + 1.0, ALL - {"s5"}, registered=gone))
    # Announced again with the same incarnation: the grace starts over.
    assert p.decide(view(now + GRACE, ALL - {"s5"}, registered=registered)) == []


def test_a_declaration_the_registry_lost_is_decided_again_at_once() -> None:
    p = policy()
    now = settled(p)
    (decision,) = p.decide(view(now, ALL - {"s5"}))
    p.declaration_failed(decision)
    assert p.decide(view(now + 0.01, ALL - {"s5"})) == [decision]


def test_a_short_cut_off_is_a_break_although_the_detector_still_says_alive() -> None:
    """Rule 3: a coordinator that heard nobody recently (a partition shorter than the failure window) must
    wait the grace period again before declaring anyone down, though `alive` never lost its majority."""
    p = policy()
    t = settled(p)
    cut = MembershipView(
        now=t, is_coordinator=True, alive=set(ALL), heard=dict(REGISTERED), registered=REGISTERED,
        has_quorum=True, heard_recently={"s1"},
    )  # fmt: skip
    assert p.decide(cut) == []
    silent = {s for s in ALL if s != "s2"}
    after = MembershipView(
        now=t + 0.5, is_coordinator=True, alive=silent, heard=dict(REGISTERED), registered=REGISTERED,
        has_quorum=True, heard_recently=silent,
    )  # fmt: skip
    assert p.decide(after) == []
    assert p.decide(view(t + 0.5 + GRACE, silent)) == [DeclareDown("s2", REGISTERED["s2"])]


def test_a_coordinator_declares_only_once_a_majority_has_followed_it_for_a_while() -> None:
    """Rule 3, followers: a server cut off alone for a little less than the failure window elects itself as
    the partition heals; members accept it for a round trip and return to the live coordinator. What it
    decided in that moment must not commit: a majority must follow it for `follow_confirm_s` first, counted
    from when the majority-th of them began following, without a break."""
    confirm = 0.1
    p = MembershipPolicy("s1", 5, started_at=0.0, grace_s=GRACE, redeclare_after_s=REDECLARE, follow_confirm_s=confirm)
    t = GRACE + 1.0

    def at(now: float, followers: dict[str, float], coordinator: bool = True) -> list[DeclareDown]:
        return p.decide(
            MembershipView(
                now=now, is_coordinator=coordinator, alive=ALL - {"s5"}, heard=dict(REGISTERED),
                registered=REGISTERED, has_quorum=True, followers=followers,
            )  # fmt: skip
        )

    assert at(0.0, {}, coordinator=False) == []  # settled as a member
    elected = {"s1": t, "s2": t + 0.001, "s3": t + 0.002}
    assert at(t + 0.002, elected) == []  # a majority follows, but only since now
    assert p.confirmation_due(t + 0.002) == pytest.approx(t + 0.002 + confirm)
    assert at(t + 0.003, {"s1": t, "s2": t + 0.001}) == []  # s3 went back to the live coordinator: a break
    assert p.confirmation_due(t + 0.003) is None
    back = {"s1": t, "s2": t + 0.001, "s3": t + 0.05}
    assert at(t + 0.1, back) == []  # s3 follows again, since t + 0.05
    assert at(t + 0.05 + confirm + 1e-6, back) == [DeclareDown("s5", REGISTERED["s5"])]
    assert p.confirmation_due(t + 0.05 + confirm + 1e-6) is None


def test_a_coordinator_followed_since_long_ago_declares_at_once() -> None:
    p = MembershipPolicy("s1", 5, started_at=0.0, grace_s=GRACE, redeclare_after_s=REDECLARE, follow_confirm_s=0.1)
    followers = {s: 0.0 for s in ALL}
    t = GRACE + 1.0
    for now in (0.0, t):
        decided = p.decide(
            MembershipView(
                now=now, is_coordinator=True, alive=ALL - {"s5"} if now else ALL, heard=dict(REGISTERED),
                registered=REGISTERED, has_quorum=True, followers=followers,
            )  # fmt: skip
        )
    assert decided == [DeclareDown("s5", REGISTERED["s5"])]
