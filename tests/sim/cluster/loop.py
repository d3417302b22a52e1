"""Deterministic event loops on one fake clock: every simulated server gets its own asyncio loop.

`SimLoop` is a real `asyncio.BaseEventLoop` (so production code runs unchanged: tasks, futures, `sleep`,
`wait_for`, `timeout`, `Event`) whose `time()` is the shared `Clock` and whose selector never waits and
never reports I/O. `Scheduler.run_until` repeatedly picks the earliest thing due (a world event, or a
server loop with a ready callback or a due timer), moves the clock there (it jumps: idle time costs
nothing) and runs exactly that: one world event, or one `_run_once` of one loop. Ties go to world events
first, then to loops in server-id order, so a run is a pure function of its seed.

A paused server (SIGSTOP) is a loop that is not stepped: its timers fall due meanwhile and all run when it
resumes, exactly as a stopped process experiences time. A crashed server's loop is closed and dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
from asyncio import events
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar, TypeVarTuple, Unpack

INF = float("inf")
_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0


class _NoSelector:
    """The loop's selector: nothing is ever ready; never sleeps (the scheduler moved the clock already)."""

    def select(self, timeout: float | None = None) -> list[Any]:
        return []

    def close(self) -> None:
        pass


class SimLoop(asyncio.BaseEventLoop):
    # BaseEventLoop's own state, which `next_at`/`step` work on directly (typeshed leaves it out).
    _ready: collections.deque[asyncio.Handle]
    _scheduled: list[asyncio.TimerHandle]
    _timer_cancelled_count: int
    _run_once: Callable[[], None]

    def __init__(self, clock: Clock, name: str, on_error: Callable[[str], None]) -> None:
        super().__init__()
        self._clock = clock
        self.name = name
        self._selector = _NoSelector()  # type: ignore[assignment]
        self._clock_resolution = 1e-9
        self.paused = False
        self._on_error = on_error
        self.set_exception_handler(self._exception)

    def time(self) -> float:
        return self._clock.now

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass

    def _exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self._on_error(f"{self.name}: {context.get('message')}: {exc!r}")

    def run_in_executor(
        self, executor: Executor | None, func: Callable[[Unpack[_Ts]], _T], *args: *_Ts
    ) -> asyncio.Future[_T]:
        """No threads in a simulation: the work (a registry start or stop, a mkdir) happens at once."""
        future: asyncio.Future[_T] = self.create_future()
        try:
            future.set_result(func(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def next_at(self) -> float:
        """When this loop next has something to run (INF if nothing)."""
        if self._ready:
            return self._clock.now
        scheduled = self._scheduled
        while scheduled and scheduled[0].cancelled():
            # Drop cancelled timers off the heap's top as BaseEventLoop._run_once does (its bookkeeping).
            self._timer_cancelled_count -= 1
            heapq.heappop(scheduled)._scheduled = False  # type: ignore[attr-defined]
        return scheduled[0].when() if scheduled else INF

    def step(self) -> None:
        events._set_running_loop(self)
        try:
            self._run_once()
        finally:
            events._set_running_loop(None)

    def discard(self) -> None:
        """The process died: nothing of it runs again. Its tasks are kept referenced until `bury`, so the
        garbage collector never runs their cleanup code at some arbitrary later moment of the run."""
        self.set_exception_handler(lambda loop, context: None)
        self._corpses = list(asyncio.all_tasks(self))
        self._ready.clear()
        self._scheduled.clear()

    def bury(self) -> None:
        """After the run: close every coroutine of this loop without running its cleanup for real."""
        self.set_exception_handler(lambda loop, context: None)
        tasks = getattr(self, "_corpses", []) + list(asyncio.all_tasks(self))
        self._ready.clear()
        self._scheduled.clear()
        for task in tasks:
            with contextlib.suppress(BaseException):
                task.get_coro().close()
        self._corpses = []


class Scheduler:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._loops: list[SimLoop] = []  # in server-id order: ties between loops go to the first
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.steps = 0

    def add_loop(self, loop: SimLoop) -> None:
        self._loops = sorted([*self._loops, loop], key=lambda lp: lp.name)

    def remove_loop(self, loop: SimLoop) -> None:
        self._loops = [lp for lp in self._loops if lp is not loop]

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (max(when, self.clock.now), next(self._seq), action))

    def after(self, delay: float, action: Callable[[], None]) -> None:
        self.at(self.clock.now + delay, action)

    def run_until(self, until: float, after_step: Callable[[], None]) -> None:
        while True:
            at = self._events[0][0] if self._events else INF
            loop: SimLoop | None = None
            for candidate in self._loops:
                if candidate.paused:
                    continue
                when = candidate.next_at()
                if when < at:
                    at, loop = when, candidate
            if at > until:
                self.clock.now = max(self.clock.now, until)
                return
            self.clock.now = max(self.clock.now, at)
            self.steps += 1
            if loop is None:
                _, _, action = heapq.heappop(self._events)
                action()
            else:
                loop.step()
            after_step()
