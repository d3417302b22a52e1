"""Limits (defaults, overrides, validation) and the per-client rate limiter, with time moved by hand."""

from __future__ import annotations

import pytest

from node.limits import Limits, RateLimiter, Verdict


def test_documented_defaults() -> None:
    limits = Limits()
    assert limits.max_line_bytes == 64 * 1024
    assert limits.max_pending_output_bytes == 1024 * 1024
    assert limits.idle_before_identity_s == 10.0
    assert limits.message_rate_per_s > 0 and limits.message_burst >= 1


def test_from_env_overrides_named_limits_and_ignores_other_variables() -> None:
    limits = Limits.from_env(
        {"CHATMESH_LIMIT_MAX_CLIENTS": "5", "CHATMESH_LIMIT_MESSAGE_RATE_PER_S": "0", "HOME": "/root"}
    )
    assert limits.max_clients == 5 and limits.message_rate_per_s == 0.0
    assert limits.max_line_bytes == Limits().max_line_bytes


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CHATMESH_LIMIT_MAX_CLIENTZ": "5"}, "unknown limit"),
        ({"CHATMESH_LIMIT_MAX_CLIENTS": "many"}, "is not a number"),
        ({"CHATMESH_LIMIT_MAX_CLIENTS": "0"}, "at least 1"),
        ({"CHATMESH_LIMIT_IDLE_BEFORE_IDENTITY_S": "-1"}, "non-negative"),
        ({"CHATMESH_LIMIT_IDLE_BEFORE_IDENTITY_S": "nan"}, "non-negative"),
    ],
)
def test_from_env_rejects_bad_values_with_a_readable_reason(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limits.from_env(environ)


def test_burst_then_steady_rate() -> None:
    limiter = RateLimiter(Limits(message_rate_per_s=2, message_burst=3, max_excess_lines=100), now=0.0)
    assert [limiter.check(0.0) for _ in range(3)] == [Verdict.ALLOW] * 3
    assert limiter.check(0.0) is Verdict.EXCESS
    assert limiter.check(0.5) is Verdict.ALLOW  # one token per 0.5 s
    assert limiter.check(0.6) is Verdict.EXCESS
    assert [limiter.check(10.0) for _ in range(4)] == [Verdict.ALLOW] * 3 + [Verdict.EXCESS]  # refill capped


def test_persistent_excess_within_the_window_is_abuse() -> None:
    limiter = RateLimiter(Limits(message_rate_per_s=1, message_burst=1, max_excess_lines=3, excess_window_s=10), 0.0)
    assert limiter.check(0.0) is Verdict.ALLOW
    assert [limiter.check(0.1) for _ in range(4)] == [Verdict.EXCESS] * 3 + [Verdict.ABUSE]


def test_occasional_excess_in_separate_windows_is_not_abuse() -> None:
    limiter = RateLimiter(Limits(message_rate_per_s=1, message_burst=1, max_excess_lines=2, excess_window_s=1), 0.0)
    now = 0.0
    for _ in range(20):
        assert limiter.check(now) is Verdict.ALLOW
        assert limiter.check(now) is Verdict.EXCESS
        now += 1.5


def test_rate_zero_means_unlimited() -> None:
    limiter = RateLimiter(Limits(message_rate_per_s=0), 0.0)
    assert all(limiter.check(0.0) is Verdict.ALLOW for _ in range(100_000))
