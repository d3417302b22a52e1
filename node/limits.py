"""Client input limits (issue 8): one frozen value per server, with documented defaults, plus the rate
limiter the server applies to each client's lines.

Every limit protects the other clients of the server from one client (or one address): nothing a client
sends may make the server block, slow down for others or grow memory without bound. Defaults fit an
interactive chat service; benchmarks and load tests that drive many clients from one host or send as fast
as they can must raise `max_connections_per_ip` and `message_rate_per_s` (or set the rate to 0).

Override at startup with `Limits.from_env(os.environ)`: `CHATMESH_LIMIT_<FIELD>` in upper case, e.g.
`CHATMESH_LIMIT_MESSAGE_RATE_PER_S=0` disables the rate limit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from cluster.framing import MAX_LINE_BYTES

ENV_PREFIX = "CHATMESH_LIMIT_"


@dataclass(frozen=True, slots=True)
class Limits:
    # Longest line a client may send (bytes, newline excluded); longer is an abrupt quit.
    max_line_bytes: int = MAX_LINE_BYTES
    # Output queued to one client and not yet taken by its socket (bytes): a reader that slow is
    # disconnected as an abrupt quit instead of stalling its room or growing memory.
    max_pending_output_bytes: int = 1024 * 1024
    # Open client connections per server (identified or not); the next one gets an error line and is closed.
    max_clients: int = 1000
    # Open client connections per source address.
    max_connections_per_ip: int = 256
    # A connection must send newidentity or movejoin within this time (slowloris).
    idle_before_identity_s: float = 10.0
    # Lines per second per client, steady rate (0 = unlimited), and the burst allowed on top.
    message_rate_per_s: float = 20.0
    message_burst: int = 100
    # Lines refused by the rate limit within `excess_window_s` before the client is disconnected.
    max_excess_lines: int = 50
    excess_window_s: float = 10.0
    # Lines one client may have waiting while one of its cluster requests is in flight.
    max_queued_lines: int = 256
    # A client routed to another server that keeps its old connection open is closed after this time.
    routed_linger_s: float = 30.0
    # Chat broadcasts that follow another flush this closely wait for the rest of this time, so a busy
    # room's lines leave in fewer, larger writes (one send per receiver per flush). The first line after a
    # quiet moment, and every direct reply, still go out in the loop turn that made them (0 = never wait).
    broadcast_coalesce_s: float = 0.002

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value) or value < 0:
                raise ValueError(f"limit {f.name} must be a non-negative number, not {value!r}")
        for name in ("max_line_bytes", "max_pending_output_bytes", "max_clients", "max_connections_per_ip"):
            if getattr(self, name) < 1:
                raise ValueError(f"limit {name} must be at least 1")
        if self.message_rate_per_s > 0 and self.message_burst < 1:
            raise ValueError("limit message_burst must be at least 1 when a message rate is set")

    @classmethod
    def from_env(cls, environ: Mapping[str, str], base: Limits | None = None) -> Limits:
        """`base` (default: the defaults) with every `CHATMESH_LIMIT_<FIELD>` of `environ` applied;
        ValueError naming the variable on a bad value or an unknown limit."""
        base = base if base is not None else cls()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changes: dict[str, int | float] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in fields:
                raise ValueError(f"{key}: unknown limit (known: {', '.join(sorted(fields))})")
            try:
                changes[name] = int(raw) if isinstance(getattr(base, name), int) else float(raw)
            except ValueError:
                raise ValueError(f"{key}={raw!r} is not a number") from None
        try:
            return dataclasses.replace(base, **changes)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"{ENV_PREFIX}*: {exc}") from None


class Verdict(Enum):
    ALLOW = "allow"
    EXCESS = "excess"  # refuse this line with an error reply
    ABUSE = "abuse"  # disconnect the client


# Looking up an Enum member on its class costs 0.14 us on Python 3.11 (a descriptor call), a global 0.02:
# check() runs for every line a client sends, and its caller compares with ALLOW.
ALLOW = Verdict.ALLOW


class RateLimiter:
    """Token bucket (burst, then a steady rate) plus a count of refused lines per window. Pure: the caller
    passes the loop's clock, so tests move time by hand."""

    __slots__ = ("_rate", "_burst", "_tokens", "_last", "_max_excess", "_window", "_excess", "_window_start")

    def __init__(self, limits: Limits, now: float) -> None:
        self._rate = limits.message_rate_per_s
        self._burst = float(limits.message_burst)
        self._tokens = self._burst
        self._last = now
        self._max_excess = limits.max_excess_lines
        self._window = limits.excess_window_s
        self._excess = 0
        self._window_start = now

    def check(self, now: float) -> Verdict:
        """Account for one line arriving at `now`."""
        if self._rate <= 0:
            return ALLOW
        tokens = self._tokens
        if tokens < self._burst:
            tokens = min(self._burst, tokens + (now - self._last) * self._rate)
        self._last = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return ALLOW
        self._tokens = tokens
        if now - self._window_start > self._window:
            self._window_start = now
            self._excess = 0
        self._excess += 1
        return Verdict.ABUSE if self._excess > self._max_excess else Verdict.EXCESS
