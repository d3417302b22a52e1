"""RequestRetry (node/retry.py), one test per rule; time is moved by hand."""

from __future__ import annotations

import pytest

from node.retry import Ask, Finish, RequestRetry, Wait

DEADLINE, ATTEMPT, PAUSE, NO_COORD = 4.0, 2.0, 0.05, 0.5


def retry(started: float = 0.0) -> RequestRetry:
    return RequestRetry("s1.7.1.0", started, DEADLINE, ATTEMPT, PAUSE, NO_COORD)


def test_the_coordinator_is_asked_at_once() -> None:
    assert retry().next(0.0, "s3") == Ask("s3", ATTEMPT)


def test_an_approval_finishes_approved() -> None:
    r = retry()
    r.next(0.0, "s3")
    r.answered(0.01, {"ok": True, "final": True})
    assert r.next(0.01, "s3") == Finish(True)


def test_a_final_refusal_finishes_refused_and_not_in_doubt() -> None:
    r = retry()
    r.next(0.0, "s3")
    r.answered(0.01, {"ok": False, "reason": "taken", "final": True})
    assert r.next(0.01, "s3") == Finish(False, in_doubt=False)


def test_no_coordinator_waits_for_one_at_most_a_bounded_time() -> None:
    r = retry()
    assert r.next(0.0, None) == Wait(NO_COORD)
    step = r.next(DEADLINE - 0.1, None)
    assert isinstance(step, Wait) and step.timeout_s == pytest.approx(0.1)


def test_a_request_never_submitted_is_refused_at_the_deadline_and_not_in_doubt() -> None:
    r = retry()
    r.next(0.0, None)
    assert r.next(DEADLINE, None) == Finish(False, in_doubt=False)
    r = retry()
    r.next(0.0, "s3")
    r.answered(0.01, {"ok": False, "reason": "not-coordinator", "coordinator": None})
    assert r.next(DEADLINE, "s3") == Finish(False, in_doubt=False)


def test_a_request_without_a_reply_is_in_doubt_at_the_deadline() -> None:
    r = retry()
    r.next(0.0, "s3")
    r.failed(2.0)
    assert r.next(DEADLINE, "s3") == Finish(False, in_doubt=True)


def test_an_unavailable_coordinator_may_have_submitted_so_the_request_is_in_doubt() -> None:
    r = retry()
    r.next(0.0, "s3")
    r.answered(1.5, {"ok": False, "reason": "unavailable: timeout"})
    assert r.maybe_submitted
    assert r.next(DEADLINE, "s3") == Finish(False, in_doubt=True)


def test_a_coordinator_change_while_asking_retries_at_once_at_the_new_one() -> None:
    r = retry()
    r.next(0.0, "s3")
    r.answered(0.3, None)
    assert r.next(0.3, "s2") == Ask("s2", ATTEMPT)
    assert r.maybe_submitted


def test_a_failed_attempt_pauses_before_retrying_the_same_coordinator() -> None:
    r = retry()
    r.next(0.0, "s3")
    r.failed(1.0)
    step = r.next(1.0, "s3")
    assert isinstance(step, Wait) and step.timeout_s == pytest.approx(PAUSE)
    assert r.next(1.0 + PAUSE, "s3") == Ask("s3", ATTEMPT)


def test_a_pause_ends_early_when_the_coordinator_changes() -> None:
    r = retry()
    r.next(0.0, "s3")
    r.answered(0.01, {"ok": False, "reason": "not-coordinator", "coordinator": "s2"})
    assert r.next(0.02, "s2") == Ask("s2", ATTEMPT)


def test_an_attempt_never_waits_past_the_deadline() -> None:
    r = retry()
    r.next(0.0, "s3")
    r.failed(3.0)
    assert r.next(3.5, "s3") == Ask("s3", DEADLINE - 3.5)
    r.failed(3.9)
    step = r.next(3.92, "s3")
    assert isinstance(step, Wait) and step.timeout_s == pytest.approx(PAUSE - 0.02)
    r2 = retry()
    r2.next(0.0, "s3")
    r2.failed(3.98)
    step = r2.next(3.99, "s3")
    assert isinstance(step, Wait) and step.timeout_s == pytest.approx(DEADLINE - 3.99)


def test_every_attempt_is_the_same_request() -> None:
    r = retry()
    asked = []
    now = 0.0
    for coordinator in ("s3", "s2", "s2"):
        step = r.next(now, coordinator)
        assert isinstance(step, Ask)
        asked.append(step.coordinator)
        r.answered(now, None)
        now += 0.1
    assert asked == ["s3", "s2", "s2"] and r.attempts == 3 and r.request_id == "s1.7.1.0"


def test_a_finished_request_stays_finished() -> None:
    r = retry()
    r.next(0.0, "s3")
    r.answered(0.01, {"ok": True})
    assert r.next(10.0, None) == Finish(True) == r.finished


def test_an_abandoned_request_with_an_attempt_in_flight_is_in_doubt() -> None:
    """Rule 7: the session's backstop cancels the request while the coordinator has it: it may commit."""
    r = retry()
    r.next(0.0, "s3")
    assert r.abandoned(1.0) == Finish(False, in_doubt=True)
    assert r.finished == Finish(False, in_doubt=True)


def test_an_abandoned_request_never_submitted_is_not_in_doubt() -> None:
    r = retry()
    r.next(0.0, None)  # waiting for a coordinator: nothing was sent
    assert r.abandoned(0.3) == Finish(False, in_doubt=False)
    r = retry()
    r.next(0.0, "s3")
    r.answered(0.01, {"ok": False, "reason": "not-coordinator", "coordinator": None})
    assert r.abandoned(0.02) == Finish(False, in_doubt=False)  # pausing after a refusal that submitted nothing


def test_an_abandoned_request_paused_after_a_lost_attempt_is_in_doubt() -> None:
    r = retry()
    r.next(0.0, "s3")
    r.failed(2.0)
    assert r.abandoned(2.01) == Finish(False, in_doubt=True)


def test_abandoning_a_finished_request_keeps_its_outcome() -> None:
    r = retry()
    r.next(0.0, "s3")
    r.answered(0.01, {"ok": True, "final": True})
    assert r.abandoned(0.02) == Finish(True)
