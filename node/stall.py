"""Hold client input after this server stalled, until it knows it still owns its sessions.

Theory of operation
-------------------
The cluster declares a server down after it has been silent for the failure timeout, and then gives its
clients' identities to others. A server that was frozen (SIGSTOP, a swapped-out VM, a long pause) cannot
tell on waking whether that happened: for a moment its sessions may use names the cluster has already
handed to someone else. So the loop watches its own clock: a tick every `tick_s`, and a gap longer than
`threshold_s` (set below the failure timeout, so no declaration can have happened without one) closes
the gate. While closed, client reads wait (nothing is relayed, nothing is lost: the bytes stay in the
socket). The node then commits a registry barrier: once it is applied here, every entry before it is
too, including any "server down" for this server, which fences the server and disconnects its clients.
Only then does the gate open again.

Client readers check the gate themselves before handling input, because on waking asyncio runs socket
callbacks before timers: the reader, not the watchdog, is often the first to see the gap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LoopMonitor:
    """The largest lateness of the event loop since start: how long after its due time a `tick_s` timer
    actually ran. Started first thing, so a blocking start-up shows too."""

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self.max_gap_s = 0.0

    async def run(self, on_tick: Callable[[float], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            self.max_gap_s = max(self.max_gap_s, now - before - self.tick_s)
            if on_tick is not None:
                on_tick(now)


class StallGuard:
    def __init__(self, threshold_s: float, on_stall: Callable[[float], None]) -> None:
        self.threshold_s = threshold_s
        self.on_stall = on_stall
        self.last_tick: float | None = None
        self._open = asyncio.Event()
        self._open.set()
        self.stalls = 0

    def tick(self, now: float) -> None:
        """Called by the watchdog every few tens of milliseconds."""
        self.check(now)
        self.last_tick = now

    def check(self, now: float) -> bool:
        """True if client input may be handled now; closes the gate when a stall is seen."""
        if self.last_tick is not None and now - self.last_tick > self.threshold_s and self._open.is_set():
            self._open.clear()
            self.stalls += 1
            gap = now - self.last_tick
            self.last_tick = now
            self.on_stall(gap)
        return self._open.is_set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def wait_open(self) -> None:
        await self._open.wait()

    def reopen(self) -> None:
        self._open.set()
