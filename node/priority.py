"""CPU priority: a chat server needs little CPU but needs it at once; give it first claim on the CPU.

Theory of operation
-------------------
A server spends most of its time asleep and wakes for a heartbeat, a Raft message or a client line. Next
to processes that poll (many threads spinning for a few milliseconds, then sleeping for one), every wake-up
waits behind them in the run queue, and a server has two threads that hand Python's GIL to each other (the
event loop and PySyncObj's), so one late wake-up delays the other as well. On this 2-core machine, next to
four such neighbours, the servers' loops ran seconds late: the stall guard closed client input, Raft
commits took over 4 s, a fifth of logins were refused (docs/benchmarks.md, noisy neighbour). A plain
asyncio process next to the same neighbours ran at most 30 ms late.

The remedy is the one etcd's tuning guide gives for the same reason (a latency-bound Raft member next to
busy neighbours): a lower nice value, so that the scheduler runs the server first when it wakes. The
server uses so little CPU that this costs the neighbours almost nothing.

`--cpu-nice N` (or `$CHATMESH_CPU_NICE`), -20..19, default -10; `off` leaves the priority alone. At start,
before any thread exists (threads inherit it):
- the process's nice value is set to N (`setpriority`), unless it already runs at a higher priority set
  from outside (systemd `Nice=`, `nice -n`) and N is only the default;
- on Linux with autogroup scheduling (`/proc/sys/kernel/sched_autogroup_enabled`), CPU time is shared
  between sessions first, and a thread's nice value only counts inside its session's group: there the
  group's nice value is the one that counts, so it is set as well (`/proc/self/autogroup`), but only by a
  server that leads its own session (started by an init system, `setsid`, or the test and bench harness).
  A server started from a terminal or by `make run` shares the terminal's session: raising that group
  would raise every process of the terminal, for as long as it stays open (found when a bench's polling
  neighbours, started from the same session as an earlier `run_cluster` test, ran at the servers'
  priority). Such a server leaves the group alone and says so.

Lowering a nice value needs root or CAP_SYS_NICE. Without it the server logs one line saying so and runs at
its normal priority; under systemd, `Nice=-10` (or `CPUWeight=` for the service's cgroup) does the same
without privileges in the server. In a container, the container's CPU weight (`--cpu-shares`) decides
between containers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

CPU_NICE_ENV = "CHATMESH_CPU_NICE"
DEFAULT_CPU_NICE = -10
NICE_RANGE = range(-20, 20)
AUTOGROUP_FILE = Path("/proc/self/autogroup")


@dataclass(frozen=True, slots=True)
class CpuPriority:
    """The requested nice value (None: leave it alone), and whether the operator asked for it."""

    nice: int | None
    explicit: bool


@dataclass(frozen=True, slots=True)
class PriorityOutcome:
    """What start-up did, for the one log line: the nice value now, and the autogroup's (None: no autogroup)."""

    nice: int
    autogroup_nice: int | None
    refused: str | None  # why a change was not allowed, else None
    shared_session: bool = False  # the autogroup is the starting session's: left alone


def parse_cpu_priority(flag: str | None, env: Mapping[str, str]) -> CpuPriority:
    """`--cpu-nice` wins over the environment; ValueError names the setting for exit status 2."""
    raw, source = (flag, "--cpu-nice") if flag is not None else (env.get(CPU_NICE_ENV), CPU_NICE_ENV)
    if raw is None or not raw.strip():
        return CpuPriority(DEFAULT_CPU_NICE, explicit=False)
    raw = raw.strip()
    if raw == "off":
        return CpuPriority(None, explicit=True)
    try:
        nice = int(raw)
    except ValueError:
        raise ValueError(f"{source}={raw!r}: expected a nice value from -20 to 19, or off") from None
    if nice not in NICE_RANGE:
        raise ValueError(f"{source}={nice}: expected a nice value from -20 to 19, or off")
    return CpuPriority(nice, explicit=True)


def target_nice(current: int, wanted: CpuPriority) -> int | None:
    """The nice value to set, or None to leave `current` as it is: the default never lowers a priority
    the process was given from outside; an explicit value is applied as asked."""
    if wanted.nice is None or wanted.nice == current:
        return None
    if not wanted.explicit and current < wanted.nice:
        return None
    return wanted.nice


def read_autogroup_nice(path: Path) -> int | None:
    """The autogroup's nice value ("/autogroup-42 nice 0"), or None where there is no autogroup."""
    try:
        fields = path.read_text(encoding="ascii").split()
    except OSError:
        return None
    if len(fields) != 3 or fields[1] != "nice":
        return None
    try:
        return int(fields[2])
    except ValueError:
        return None


def apply_cpu_priority(
    wanted: CpuPriority,
    *,
    autogroup: Path = AUTOGROUP_FILE,
    getpriority: Callable[[int, int], int] = os.getpriority,
    setpriority: Callable[[int, int, int], None] = os.setpriority,
    leads_session: bool | None = None,
) -> PriorityOutcome:
    """Set this process's (and its autogroup's) nice value as `wanted` says. Call before starting threads."""
    current = getpriority(os.PRIO_PROCESS, 0)
    refused: str | None = None
    new = target_nice(current, wanted)
    if new is not None:
        try:
            setpriority(os.PRIO_PROCESS, 0, new)
            current = new
        except PermissionError:
            refused = f"nice {new} needs root or CAP_SYS_NICE"
    group = read_autogroup_nice(autogroup)
    if leads_session is None:
        leads_session = os.getsid(0) == os.getpid()
    shared = group is not None and not leads_session
    if group is not None and not shared:
        new_group = target_nice(group, wanted)
        if new_group is not None:
            try:
                autogroup.write_text(str(new_group), encoding="ascii")
                group = new_group
            except PermissionError:
                refused = refused or f"autogroup nice {new_group} needs root or CAP_SYS_NICE"
            except OSError as exc:
                refused = refused or f"cannot set the autogroup's nice value: {exc.strerror or exc}"
    return PriorityOutcome(nice=current, autogroup_nice=group, refused=refused, shared_session=shared)


def describe(outcome: PriorityOutcome) -> str:
    group = "" if outcome.autogroup_nice is None else f", session autogroup nice {outcome.autogroup_nice}"
    if outcome.shared_session:
        group += " (left alone: shared with the session that started this server; run each server in its own"
        group += " session, e.g. under systemd or with setsid, for it to count)"
    text = f"CPU priority: nice {outcome.nice}{group}"
    if outcome.refused:
        text += (
            f" (not raised: {outcome.refused}; on a busy machine this server may stall. Under systemd set Nice=-10"
            " or CPUWeight=, or pass --cpu-nice off to keep the priority as it is)"
        )
    return text
