"""What the bench scripts share: statistics, tables, JSON reports, the machine, limits and clusters.

Every bench script prints a table and writes one JSON report under `bench/results/`; `bench.all` gathers
them into `bench/results/latest.json`. Servers are real `python -m node` processes started through
`tests.support`, with the per-client limits that protect an interactive server from one client raised
or switched off (a load generator drives hundreds of clients from one address, as fast as it can).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"

# How long a bench waits for a cluster to start and agree on its coordinator.
CLUSTER_START_TIMEOUT_S = 60.0
# One request/reply exchange with a chat server, at most.
REPLY_TIMEOUT_S = 10.0


# -- statistics ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of `values` (`fraction` in 0..1); NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Count and p50/p95/p99/max/mean in milliseconds of latencies given in seconds."""
    ms = sorted(s * 1000.0 for s in seconds)
    nan = float("nan")
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 0.50),
        "p95_ms": percentile(ms, 0.95),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": ms[-1] if ms else nan,
        "mean_ms": statistics.fmean(ms) if ms else nan,
    }


# -- output ----------------------------------------------------------------------------------------


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A right-aligned plain-text table; floats printed with two decimals unless pre-formatted."""
    lines = [tuple(header)] + [tuple(_cell(c) for c in row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_total_mib() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return None


def machine_info() -> dict[str, Any]:
    """The machine a result was measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    try:
        import uvloop  # type: ignore[import-not-found]  # noqa: F401

        has_uvloop = True
    except ImportError:
        has_uvloop = False
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_mib": memory_total_mib(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "uvloop_installed": has_uvloop,
        # Other work on the machine when the bench started (the figures are only as quiet as the machine).
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def finish_report(path: str | Path, report: dict[str, Any], started: float) -> int:
    """A bench script's last step: record its duration (since monotonic `started`), write the report,
    say where; returns the script's exit status."""
    report["duration_s"] = time.monotonic() - started
    out = write_report(path, report)
    print(f"\nwritten {out} in {report['duration_s']:.0f} s", file=sys.stderr)
    return 0


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write `report` as indented JSON (creating the directory); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return out


def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


# -- processes and limits --------------------------------------------------------------------------


def raise_fd_limit(wanted: int | None = None) -> int:
    """Raise this process's soft RLIMIT_NOFILE to `wanted` (default: the hard limit); children started
    afterwards inherit it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def bench_limits_env(max_clients: int = 5000, **overrides: float) -> dict[str, str]:
    """`CHATMESH_LIMIT_*` for benchmark servers: no per-client line rate, one address may open every
    connection, clients may take their time to log in. Other limits stay at their defaults unless
    overridden (`max_pending_output_bytes=...`)."""
    limits: dict[str, float] = {
        "message_rate_per_s": 0,
        "max_clients": max_clients,
        "max_connections_per_ip": max_clients,
        "idle_before_identity_s": 600,
    }
    limits.update(overrides)
    return {f"CHATMESH_LIMIT_{name.upper()}": _number(value) for name, value in limits.items()}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def proc_status_kib(pid: int, field: str = "VmRSS") -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, ...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def _stat_cpu_s(stat: str) -> float:
    """User + system CPU seconds from a /proc stat file (a process's or one thread's)."""
    raw = Path(stat).read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15 of stat)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used, all its threads."""
    return _stat_cpu_s(f"/proc/{pid}/stat")


def main_thread_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process's main thread, where a chat server runs its event loop (the
    rest of `proc_cpu_s` is PySyncObj's thread and the admin server's)."""
    return _stat_cpu_s(f"/proc/{pid}/task/{pid}/stat")


def machine_busy_s() -> float:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def match_server_priority(pids: Sequence[int], env: dict[str, str]) -> int | None:
    """Give processes that stand beside the chat servers as their baseline (bare registry nodes, bare hops)
    the CPU priority a server takes at start (node/priority.py: its nice value, every thread's, and its
    session autogroup's), so that on a busy machine both sides of a same-run ratio wait alike. Returns the
    nice value applied, or None when the servers leave theirs alone; without the privilege the servers
    are refused too, so both keep the normal priority."""
    from node.priority import parse_cpu_priority

    wanted = parse_cpu_priority(None, {**os.environ, **env})
    if wanted.nice is None:
        return None
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, int(tid), wanted.nice)
        # Only a process leading its own session has an autogroup of its own (node/priority.py).
        with contextlib.suppress(OSError):
            if os.getsid(pid) == pid:
                Path(f"/proc/{pid}/autogroup").write_text(str(wanted.nice), encoding="ascii")
    return wanted.nice


def node_importable() -> str | None:
    """None when `python -m node` can be imported in this checkout, else the reason it cannot."""
    try:
        import node.app  # noqa: F401
    except Exception as exc:  # ImportError while the servers are still being integrated
        return f"{type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def bench_cluster(count: int, env: dict[str, str], prefix: str = "chatmesh-bench-") -> Iterator[Any]:
    """`count` real servers (`tests.support.start_cluster`) in a temporary directory, every one serving
    and agreed on its coordinator; killed on exit. The fd limit is raised first so servers inherit it."""
    from tests.support import start_cluster

    raise_fd_limit()
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as tmp,
        start_cluster(Path(tmp), count, env=env, timeout=CLUSTER_START_TIMEOUT_S) as cluster,
    ):
        yield cluster


def server_pid(cluster: Any, server_id: str) -> int:
    return int(cluster.procs.procs[server_id].pid)


# -- a protocol-level asyncio client ---------------------------------------------------------------


class ClientClosed(Exception):
    """The server closed the connection while a reply was awaited."""


class LineClient:
    """One chat connection over asyncio streams. A pump task reads every line the server sends (so the
    server never sees a slow reader) and hands replies of awaited types to their waiters; other lines
    (roomchanges, messages) are counted and dropped."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.lines_received = 0
        self._waiters: defaultdict[str, deque[asyncio.Future[dict[str, Any]]]] = defaultdict(deque)
        self._closed = False
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = REPLY_TIMEOUT_S) -> LineClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return cls(reader, writer)

    def send(self, message: dict[str, Any]) -> None:
        self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def expect(self, reply_type: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next line of `reply_type` (register before sending the request)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(ClientClosed("connection closed"))
        else:
            self._waiters[reply_type].append(future)
        return future

    async def request(
        self, message: dict[str, Any], reply_type: str, timeout: float = REPLY_TIMEOUT_S
    ) -> tuple[dict[str, Any], float]:
        """Send `message`, await the reply of `reply_type`; (reply, seconds from write to reply)."""
        future = self.expect(reply_type)
        started = time.perf_counter()
        self.send(message)
        reply = await asyncio.wait_for(future, timeout)
        return reply, time.perf_counter() - started

    async def _pump(self) -> None:
        waiters = self._waiters
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                self.lines_received += 1
                if not waiters:
                    continue
                message = json.loads(line)
                queue = waiters.get(message.get("type"))
                if queue:
                    future = queue.popleft()
                    if not queue:
                        del waiters[message["type"]]
                    if not future.done():
                        future.set_result(message)
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            self._closed = True
            for queue in waiters.values():
                for future in queue:
                    if not future.done():
                        future.set_exception(ClientClosed("connection closed"))
            waiters.clear()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()
        self._pump_task.cancel()
        with contextlib.suppress(BaseException):
            await self._pump_task
