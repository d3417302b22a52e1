"""The heartbeat failure detector, one test per rule; time is moved by hand."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bully.failure_detector import FailureDetector, PeerDown, PeerUp

PERIOD = 0.1
T1 = 0.75


def detector() -> FailureDetector:
    return FailureDetector(["s2", "s3"], PERIOD, T1)


def beat(fd: FailureDetector, peer: str, incarnation: int, start: float, until: float) -> float:
    """Heartbeats from `peer` every PERIOD in [start, until); returns the time of the last one."""
    now = start
    last = start
    while now < until:
        fd.heard(peer, incarnation, now)
        fd.check(now)
        last = now
        now += PERIOD
    return last


def tick(fd: FailureDetector, start: float, until: float) -> list[PeerDown | PeerUp]:
    """Consult the detector every PERIOD from `start` through `until`, as the runtime's timer does."""
    events: list[PeerDown | PeerUp] = []
    now = start
    while now < until:
        events += fd.check(now)
        now += PERIOD
    return events + fd.check(until)


def test_a_peer_is_up_from_its_first_heartbeat() -> None:
    fd = detector()
    assert fd.up() == set()
    fd.heard("s2", 7, 1.0)
    assert fd.check(1.0) == [PeerUp("s2", 7)]
    assert fd.up() == {"s2"}


def test_a_peer_never_heard_is_never_reported() -> None:
    fd = detector()
    assert fd.check(100.0) == []
    assert fd.next_deadline() is None


def test_regular_heartbeats_keep_a_peer_up() -> None:
    fd = detector()
    fd.heard("s2", 1, 0.0)
    fd.check(0.0)
    last = beat(fd, "s2", 1, 0.0, 5.0)
    assert fd.check(last + T1 - 0.01) == []
    assert fd.up() == {"s2"}


def test_a_peer_silent_for_t1_is_declared_down_with_its_last_incarnation() -> None:
    fd = detector()
    last = beat(fd, "s2", 4, 0.0, 1.0)
    deadline = fd.next_deadline()
    assert deadline is not None and deadline <= last + T1  # possibly early: never late
    assert tick(fd, last, last + T1 - 0.01) == []
    assert fd.check(last + T1) == [PeerDown("s2", 4)]
    assert fd.up() == set()


def test_a_few_missed_heartbeats_are_not_a_failure() -> None:
    fd = detector()
    last = beat(fd, "s2", 1, 0.0, 1.0)
    for missed in range(1, 7):
        assert fd.check(last + missed * PERIOD) == []  # six in a row lost or late
    assert fd.up() == {"s2"}


def test_a_down_peer_heard_again_is_up() -> None:
    fd = detector()
    fd.heard("s2", 1, 0.0)
    fd.check(0.0)
    assert tick(fd, 0.0, T1) == [PeerDown("s2", 1)]
    fd.heard("s2", 1, 2.0)
    assert fd.check(2.0) == [PeerUp("s2", 1)]


def test_a_new_incarnation_reports_the_old_life_down_and_the_new_one_up() -> None:
    fd = detector()
    fd.heard("s2", 1, 0.0)
    fd.check(0.0)
    fd.heard("s2", 2, 0.2)
    assert fd.check(0.2) == [PeerDown("s2", 1), PeerUp("s2", 2)]
    assert fd.incarnations() == {"s2": 2}


def test_a_heartbeat_of_an_earlier_life_is_ignored() -> None:
    fd = detector()
    fd.heard("s2", 5, 0.0)
    fd.check(0.0)
    tick(fd, 0.0, 0.7)
    fd.heard("s2", 4, 0.7)
    assert tick(fd, 0.7, T1) == [PeerDown("s2", 5)]


def test_our_own_stall_gives_every_peer_a_fresh_window() -> None:
    fd = detector()
    fd.heard("s2", 1, 0.0)
    fd.heard("s3", 1, 0.0)
    fd.check(0.0)
    # Nothing ran for 5 s (SIGSTOP, starved loop): silence proves nothing about the peers.
    assert fd.check(5.0) == []
    assert fd.up() == {"s2", "s3"}
    fd.heard("s2", 1, 5.05)
    assert tick(fd, 5.0, 5.0 + T1) == [PeerDown("s3", 1)]


def test_events_are_reported_in_peer_order() -> None:
    fd = FailureDetector(["s3", "s2", "s4"], PERIOD, T1)
    for peer in ("s4", "s2", "s3"):
        fd.heard(peer, 1, 0.0)
    fd.check(0.0)
    assert [e.peer for e in tick(fd, 0.0, T1)] == ["s2", "s3", "s4"]


def test_pending_events_make_the_deadline_immediate() -> None:
    fd = detector()
    fd.heard("s2", 1, 0.0)
    assert fd.next_deadline() == float("-inf")
    fd.check(0.0)
    assert fd.next_deadline() == T1


def test_unknown_peers_are_ignored() -> None:
    fd = detector()
    fd.heard("s9", 1, 0.0)
    assert fd.check(0.0) == [] and fd.up() == set()


# -- evidence by kind --------------------------------------------------------------------------------------


def test_a_lost_connection_and_a_refused_reconnect_mean_down_at_once() -> None:
    fd = detector()
    fd.heard("s2", 3, 0.0)
    fd.check(0.0)
    fd.connection_lost("s2", 0.05)
    assert fd.check(0.05) == []  # a lost connection alone proves nothing: the peer may be reconnecting
    fd.reconnect_refused("s2", 0.051)
    assert fd.next_deadline() == float("-inf")
    assert fd.check(0.051) == [PeerDown("s2", 3, certain=True)]
    assert fd.up() == set() and fd.certain_downs == 1


def test_a_refused_connect_without_a_lost_connection_proves_nothing() -> None:
    fd = detector()
    fd.heard("s2", 3, 0.0)
    fd.check(0.0)
    fd.reconnect_refused("s2", 0.01)
    assert fd.check(0.01) == [] and fd.up() == {"s2"}


def test_a_reconnect_after_the_lost_connection_cancels_the_evidence() -> None:
    fd = detector()
    fd.heard("s2", 3, 0.0)
    fd.check(0.0)
    fd.connection_lost("s2", 0.05)
    fd.connection_up("s2", 0.06)
    fd.reconnect_refused("s2", 0.11)
    assert fd.check(0.11) == [] and fd.up() == {"s2"}


def test_a_heartbeat_read_after_the_loss_does_not_cancel_it() -> None:
    # Sent before the death, read after it: the other connection's buffer still held it.
    fd = detector()
    fd.heard("s2", 3, 0.0)
    fd.check(0.0)
    fd.connection_lost("s2", 0.05)
    fd.heard("s2", 3, 0.051)
    fd.reconnect_refused("s2", 0.052)
    assert fd.check(0.052) == [PeerDown("s2", 3, certain=True)]


def test_a_new_incarnation_cancels_the_loss_of_the_old_one() -> None:
    fd = detector()
    fd.heard("s2", 3, 0.0)
    fd.check(0.0)
    fd.connection_lost("s2", 0.05)
    fd.heard("s2", 4, 0.06)
    fd.check(0.06)
    fd.reconnect_refused("s2", 0.07)
    assert fd.check(0.07) == [] and fd.up() == {"s2"}


def test_a_peer_never_heard_is_not_declared_on_evidence() -> None:
    fd = detector()
    fd.connection_lost("s2", 0.0)
    fd.reconnect_refused("s2", 0.01)
    assert fd.check(0.01) == []


def test_a_peer_whose_heartbeats_come_late_gets_a_longer_window() -> None:
    fd = detector()
    for i in range(5):  # its loop is starved: a heartbeat every 0.4 s instead of 0.1 s; ours ticks every 0.1 s
        fd.heard("s2", 1, i * 0.4)
        tick(fd, i * 0.4, i * 0.4 + 0.3)
    last = 4 * 0.4
    assert fd.window("s2") == pytest.approx(3 * 0.4)
    assert tick(fd, last, last + 1.19) == []
    assert fd.check(last + 1.21) == [PeerDown("s2", 1)]


def test_the_window_never_exceeds_its_maximum() -> None:
    fd = FailureDetector(["s2"], PERIOD, T1, suspect_max_s=1.0)
    fd.heard("s2", 1, 0.0)
    fd.heard("s2", 1, 0.15)  # one gap; the stall rule (0.375 s) does not apply
    fd.heard("s2", 1, 0.5)
    assert fd.window("s2") == pytest.approx(1.0)


def test_regular_heartbeats_keep_the_base_window() -> None:
    fd = detector()
    beat(fd, "s2", 1, 0.0, 2.0)
    assert fd.window("s2") == pytest.approx(T1)


def test_the_observers_own_lateness_is_credited_to_every_peers_silence() -> None:
    fd = detector()
    last = beat(fd, "s2", 1, 0.0, 1.0)
    now = last
    for _ in range(5):  # our timer fires 0.2 s late each time (starved loop, below the stall rule)
        now += 0.3
        fd.observer_late(0.2)
        assert fd.check(now) == []
    assert fd.window("s2") == pytest.approx(T1 + 1.0)
    assert fd.check(last + T1 + 1.0) == [PeerDown("s2", 1)]


def test_the_credit_ends_with_the_next_heartbeat() -> None:
    fd = detector()
    fd.heard("s2", 1, 0.0)
    fd.observer_late(0.3)
    fd.heard("s2", 1, 0.1)
    assert fd.window("s2") == pytest.approx(T1)


def ticks(d: FailureDetector, start: float, end: float) -> list[tuple[float, PeerDown | PeerUp]]:
    """`check` every 50 ms (as the node's timer does) from `start` to `end`: the events and when."""
    out = []
    for i in range(int(round((end - start) / 0.05)) + 1):
        now = start + i * 0.05
        out += [(round(now, 2), e) for e in d.check(now)]
    return out


def test_peers_off_the_full_rate_get_the_mesh_window_and_a_promoted_peer_a_fresh_one() -> None:
    """Star heartbeats (bully/node.py): only the peers in `expect_fast` beat us every interval; the others
    once per slow interval, so their silence is judged on that schedule. A peer moved to the full rate is
    not declared down for the slow silence before the change."""
    d = FailureDetector(["a", "b"], 0.1, 0.75, suspect_gap_factor=3.0, suspect_max_s=3.0, slow_interval_s=1.0)
    d.heard("a", 1, 0.0)
    d.heard("b", 1, 0.0)
    d.check(0.0)
    d.expect_fast(["a"], 0.0)
    assert d.window("a") == 0.75 and d.window("b") == 3.0
    assert d.heard_within(0.9, 0.375) == {"b"}  # b is on schedule 0.9 s after its last beat, a is not
    assert ticks(d, 0.05, 2.0) == [(0.75, PeerDown("a", 1))]
    d.heard("a", 1, 2.0)
    d.expect_fast(["b"], 2.0)  # b silent for 2 s but only now expected at the full rate
    assert ticks(d, 2.05, 3.0) == [(2.05, PeerUp("a", 1)), (2.75, PeerDown("b", 1))]  # a: now slow


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["heard", "heard", "heard", "lost", "refused", "gone", "late", "fast", "check"]),
            st.sampled_from(["a", "b", "c", "d"]),
            st.integers(1, 3),
            st.sampled_from([0.0, 0.05, 0.1, 0.1, 0.2, 0.3, 1.0]),  # 1 s: a stall of the observer
        ),
        max_size=80,
    ),
    st.booleans(),
)
def test_the_earliest_deadline_kept_per_heartbeat_equals_a_full_scan(
    ops: list[tuple[str, str, int, float]], star: bool
) -> None:
    """`heard` updates the earliest suspicion deadline from the one peer it moved instead of rescanning every
    peer; whatever happens in between, it must equal the scan (a later one misses a silent peer)."""
    d = FailureDetector(["a", "b", "c", "d"], 0.1, 0.75, suspect_max_s=3.0, slow_interval_s=1.0 if star else None)
    now = 0.0
    for op, peer, incarnation, step in ops:
        now += step
        if op == "heard":
            d.heard(peer, incarnation, now)
        elif op == "lost":
            d.connection_lost(peer, now)
        elif op == "refused":
            d.reconnect_refused(peer, now)
        elif op == "gone":
            d.connection_lost(peer, now)
            d.reconnect_refused(peer, now)
        elif op == "late":
            d.observer_late(step)
        elif op == "fast":
            d.expect_fast([peer], now)
        else:
            d.check(now)
        scan = min((d._deadline(peer) for peer in d.up()), default=None)
        assert d._earliest == scan
