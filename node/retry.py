"""How one identity/room request is retried until the coordinator answers: a pure policy, `now` passed in.

Theory of operation
-------------------
A request carries one request id for its whole life: the registry remembers each id's result, so a
retry of a command that did commit returns the stored result instead of applying twice. The caller loops
`step = retry.next(now, coordinator)` and carries the step out:

- `Ask(coordinator, timeout_s)`: send the request (always the same request id) and report the outcome with
  `answered(now, reply)` or `failed(now)` (no reply: timeout, connection lost, coordinator unreachable);
  `answered(now, None)` says another coordinator took over before this one replied.
- `Wait(timeout_s)`: wait that long, or less if the coordinator changes (then call `next` again).
- `Finish(approved, in_doubt)`: the answer for the client.

Rules, in order:
1. An approval (`ok`) finishes approved; a final refusal (`final`, e.g. "taken") finishes refused.
2. At the deadline (`deadline_s` after the start) the request finishes refused.
3. It is *in doubt* when some attempt may have been submitted without its outcome being known (no reply,
   "unavailable", or a coordinator change while asking): it may still commit, and the caller undoes it if
   it does. A request that was never submitted (no coordinator, or only "not-coordinator" replies) cannot
   commit and is not in doubt.
4. No coordinator known: wait for one, at most `no_coordinator_wait_s` at a time.
5. A non-final refusal or no reply pauses `retry_pause_s` before the next attempt, unless the coordinator
   changes meanwhile (the new one is asked at once); a coordinator change while asking retries at once.
6. One attempt waits at most `attempt_timeout_s` (and never past the deadline).
7. A request its caller gives up on before it finished (`abandoned(now)`: the session's own backstop, a
   closed connection, shutdown) finishes refused, and in doubt under rule 3, counting an attempt still in
   flight: its command may have reached the coordinator and may commit later (found by the cluster
   simulation: a server frozen past its 8 s backstop never undid a deleteroom that committed after).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NOT_COORDINATOR = "not-coordinator"


@dataclass(frozen=True, slots=True)
class Ask:
    coordinator: str
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Wait:
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Finish:
    approved: bool
    in_doubt: bool = False


Step = Ask | Wait | Finish


class RequestRetry:
    def __init__(
        self,
        request_id: str,
        started: float,
        deadline_s: float,
        attempt_timeout_s: float,
        retry_pause_s: float,
        no_coordinator_wait_s: float,
    ) -> None:
        assert deadline_s > 0 and attempt_timeout_s > 0 and retry_pause_s >= 0 and no_coordinator_wait_s > 0
        self.request_id = request_id
        self.started = started
        self.deadline = started + deadline_s
        self.attempt_timeout_s = attempt_timeout_s
        self.retry_pause_s = retry_pause_s
        self.no_coordinator_wait_s = no_coordinator_wait_s
        self.attempts = 0
        self.maybe_submitted = False
        self._asking: str | None = None
        self._pause_until: float | None = None
        self._paused_on: str | None = None
        self._finished: Finish | None = None

    def next(self, now: float, coordinator: str | None) -> Step:
        if self._finished is not None:
            return self._finished
        assert self._asking is None, "report the outcome of the last Ask first"
        remaining = self.deadline - now
        if remaining <= 0:
            return self._finish(Finish(False, in_doubt=self.maybe_submitted))
        if self._pause_until is not None:
            if now < self._pause_until and coordinator == self._paused_on:
                return Wait(min(self._pause_until - now, remaining))
            self._pause_until = self._paused_on = None
        if coordinator is None:
            return Wait(min(remaining, self.no_coordinator_wait_s))
        self.attempts += 1
        self._asking = coordinator
        return Ask(coordinator, min(remaining, self.attempt_timeout_s))

    def answered(self, now: float, reply: Mapping[str, Any] | None) -> None:
        """The asked coordinator's reply, or None when another coordinator took over before it replied."""
        asked, self._asking = self._asking, None
        assert asked is not None, "answered() without an Ask"
        if reply is None:
            self.maybe_submitted = True
            return
        if reply.get("ok") is True:
            self._finish(Finish(True))
        elif reply.get("final"):
            self._finish(Finish(False))
        else:
            if reply.get("reason") != NOT_COORDINATOR:
                self.maybe_submitted = True  # e.g. "unavailable": submitted, commit not seen in time
            self._pause(now, asked)

    def failed(self, now: float) -> None:
        """The asked coordinator gave no reply (timeout, connection lost, unreachable)."""
        asked, self._asking = self._asking, None
        assert asked is not None, "failed() without an Ask"
        self.maybe_submitted = True
        self._pause(now, asked)

    def abandoned(self, now: float) -> Finish:
        """The caller stopped waiting; the outcome it must act on (rule 7)."""
        if self._finished is not None:
            return self._finished
        in_flight, self._asking = self._asking is not None, None
        return self._finish(Finish(False, in_doubt=self.maybe_submitted or in_flight))

    @property
    def finished(self) -> Finish | None:
        return self._finished

    def _pause(self, now: float, coordinator: str) -> None:
        self._pause_until = now + self.retry_pause_s
        self._paused_on = coordinator

    def _finish(self, finish: Finish) -> Finish:
        self._finished = finish
        return finish
