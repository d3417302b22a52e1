"""node/stall.py: the gate closes on a gap longer than the threshold, once, until reopened."""

from __future__ import annotations

from node.stall import StallGuard


def test_ticks_within_the_threshold_keep_the_gate_open() -> None:
    gaps: list[float] = []
    guard = StallGuard(0.5, gaps.append)
    for now in (0.0, 0.05, 0.1, 0.5, 0.9):
        guard.tick(now)
    assert guard.is_open and gaps == []


def test_a_long_gap_closes_the_gate_once_and_reports_it() -> None:
    gaps: list[float] = []
    guard = StallGuard(0.5, gaps.append)
    guard.tick(1.0)
    assert not guard.check(3.0)  # a reader wakes first and sees the gap
    guard.tick(3.05)
    guard.tick(10.0)  # still closed: no second report while the first is being confirmed
    assert gaps == [2.0] and not guard.is_open and guard.stalls == 1
    guard.reopen()
    assert guard.check(10.05)


def test_nothing_is_a_stall_before_the_first_tick() -> None:
    guard = StallGuard(0.5, lambda gap: None)
    assert guard.check(1000.0)
