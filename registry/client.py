"""The asyncio side of a registry commit: one PySyncObj callback crossed back into the caller's loop.

PySyncObj calls a command's callback in its own tick thread, once, with `(result, fail_reason)`. A
`CommitBridge` turns that into an awaitable with a deadline: the callback only schedules the future's
completion on the loop (`call_soon_threadsafe`), so no loop state is touched from PySyncObj's thread.
A semaphore caps the commands this server has in flight: an unbounded burst from a follower mostly failed
with LEADER_CHANGED when tried, and each waiting command holds a future and a queue slot.

A command that timed out may still commit later (it sits in PySyncObj's queue or in the leader's log):
callers treat a `RegistryUnavailable` as "in doubt", retry with the same request id (idempotent), or
release what a late commit granted.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable

from pysyncobj import FAIL_REASON

from registry.state import Result

# Commands one server may have waiting for a commit at once; the next one waits for a free slot
# (within its own timeout).
MAX_IN_FLIGHT = 256

_FAIL_NAMES = {
    FAIL_REASON.QUEUE_FULL: "queue-full",
    FAIL_REASON.MISSING_LEADER: "missing-leader",
    FAIL_REASON.DISCARDED: "discarded",
    FAIL_REASON.NOT_LEADER: "not-leader",
    FAIL_REASON.LEADER_CHANGED: "leader-changed",
    FAIL_REASON.REQUEST_DENIED: "request-denied",
    FAIL_REASON.UNKNOWN_OUTCOME: "unknown-outcome",
}

# The callback PySyncObj calls with (result, fail_reason) in its own thread.
CommitCallback = Callable[[object, int], None]


class RegistryUnavailable(Exception):
    """No commit within the timeout, or PySyncObj refused the command. `reason` is one word
    (timeout, not-started, closed, leader-changed, missing-leader, ...). The command may still commit."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def fail_reason_name(code: int) -> str:
    return _FAIL_NAMES.get(code, f"fail-{code}")


class CommitBridge:
    """Awaitable commits with a timeout and a cap on commands in flight (one semaphore per event loop)."""

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        assert max_in_flight > 0
        self.max_in_flight = max_in_flight
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self.in_flight = 0
        # Commands whose callback has not come, with the leader generation they were submitted in.
        self._pending: dict[asyncio.Future[Result], int] = {}
        self._generation = 0
        self._loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

    def leader_changed(self) -> None:
        """The Raft leader this replica followed is gone (thread-safe). A command a follower forwarded to it
        and that has no answer yet is lost with it (PySyncObj never answers it), so each one still waiting is
        failed now with "leader-changed" instead of at its timeout: the caller retries at once with the same
        request id. It may still have committed, as after any RegistryUnavailable."""
        self._generation += 1
        generation = self._generation
        for loop in list(self._loops):
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(self._fail_before, generation)

    def _fail_before(self, generation: int) -> None:
        for future, submitted in list(self._pending.items()):
            if submitted < generation and not future.done():
                future.set_exception(RegistryUnavailable("leader-changed"))

    def _semaphore(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            semaphore = self._semaphores[loop] = asyncio.Semaphore(self.max_in_flight)
        return semaphore

    async def commit(self, send: Callable[[CommitCallback], None], timeout: float) -> Result:
        """Call `send(callback)` (which hands the command to PySyncObj) and await the callback.

        Raises RegistryUnavailable on timeout (slot wait included) or any PySyncObj failure."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                async with self._semaphore(loop):
                    future: asyncio.Future[Result] = loop.create_future()

                    def on_commit(result: object, error: int) -> None:  # PySyncObj's thread
                        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                            loop.call_soon_threadsafe(_settle, future, result, error)

                    self.in_flight += 1
                    self._loops.add(loop)
                    self._pending[future] = self._generation
                    try:
                        send(on_commit)
                        return await future
                    finally:
                        self.in_flight -= 1
                        self._pending.pop(future, None)
        except TimeoutError:
            raise RegistryUnavailable("timeout") from None


def _settle(future: asyncio.Future[Result], result: object, error: int) -> None:
    if future.done():  # timed out or cancelled: the caller has moved on
        return
    if error != FAIL_REASON.SUCCESS:
        future.set_exception(RegistryUnavailable(fail_reason_name(error)))
    elif not isinstance(result, Result):
        future.set_exception(RegistryUnavailable("no-result"))
    else:
        future.set_result(result)
