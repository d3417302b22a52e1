"""node/priority.py: the nice value a server runs at, rule by rule, and what start-up does with it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.__main__ import main
from node.priority import (
    CPU_NICE_ENV,
    DEFAULT_CPU_NICE,
    CpuPriority,
    PriorityOutcome,
    apply_cpu_priority,
    describe,
    parse_cpu_priority,
    read_autogroup_nice,
    target_nice,
)


def test_default_when_neither_flag_nor_environment() -> None:
    assert parse_cpu_priority(None, {}) == CpuPriority(DEFAULT_CPU_NICE, explicit=False)
    assert parse_cpu_priority(None, {CPU_NICE_ENV: "  "}) == CpuPriority(DEFAULT_CPU_NICE, explicit=False)


def test_flag_wins_over_environment() -> None:
    assert parse_cpu_priority("-5", {CPU_NICE_ENV: "3"}) == CpuPriority(-5, explicit=True)
    assert parse_cpu_priority(None, {CPU_NICE_ENV: "3"}) == CpuPriority(3, explicit=True)


def test_off_leaves_the_priority_alone() -> None:
    assert parse_cpu_priority("off", {}) == CpuPriority(None, explicit=True)
    assert target_nice(7, CpuPriority(None, explicit=True)) is None


@pytest.mark.parametrize("raw", ["-21", "20", "high", "1.5"])
def test_bad_values_name_the_setting(raw: str) -> None:
    with pytest.raises(ValueError, match=rf"{CPU_NICE_ENV}=.*-20 to 19, or off"):
        parse_cpu_priority(None, {CPU_NICE_ENV: raw})
    with pytest.raises(ValueError, match="--cpu-nice="):
        parse_cpu_priority(raw, {})


def test_default_raises_but_never_lowers_an_outside_priority() -> None:
    default = CpuPriority(-10, explicit=False)
    assert target_nice(0, default) == -10
    assert target_nice(5, default) == -10
    assert target_nice(-15, default) is None  # systemd Nice=-15 stays
    assert target_nice(-10, default) is None


def test_explicit_value_is_applied_as_asked() -> None:
    assert target_nice(-15, CpuPriority(-5, explicit=True)) == -5
    assert target_nice(0, CpuPriority(4, explicit=True)) == 4


def test_reads_the_autogroup_line(tmp_path: Path) -> None:
    group = tmp_path / "autogroup"
    group.write_text("/autogroup-5055 nice -3\n")
    assert read_autogroup_nice(group) == -3
    group.write_text("garbage\n")
    assert read_autogroup_nice(group) is None
    assert read_autogroup_nice(tmp_path / "missing") is None


class FakeProcess:
    """Stands in for the kernel's per-process nice value (the real one needs privileges to lower)."""

    def __init__(self, nice: int, allowed: bool) -> None:
        self.nice = nice
        self.allowed = allowed

    def getpriority(self, which: int, who: int) -> int:
        assert (which, who) == (os.PRIO_PROCESS, 0)
        return self.nice

    def setpriority(self, which: int, who: int, value: int) -> None:
        assert (which, who) == (os.PRIO_PROCESS, 0)
        if value < self.nice and not self.allowed:
            raise PermissionError("not permitted")
        self.nice = value


def apply(proc: FakeProcess, autogroup: Path, leads_session: bool) -> PriorityOutcome:
    return apply_cpu_priority(
        CpuPriority(-10, explicit=False),
        autogroup=autogroup,
        getpriority=proc.getpriority,
        setpriority=proc.setpriority,
        leads_session=leads_session,
    )


def test_sets_process_and_autogroup(tmp_path: Path) -> None:
    group = tmp_path / "autogroup"
    group.write_text("/autogroup-1 nice 0\n")
    proc = FakeProcess(0, allowed=True)
    outcome = apply(proc, group, leads_session=True)
    assert (outcome.nice, outcome.autogroup_nice, outcome.refused) == (-10, -10, None)
    assert proc.nice == -10 and group.read_text() == "-10"
    assert describe(outcome) == "CPU priority: nice -10, session autogroup nice -10"


def test_a_session_shared_with_the_terminal_keeps_its_group_priority(tmp_path: Path) -> None:
    """Raising the terminal's autogroup would raise everything started from it, long after the server."""
    group = tmp_path / "autogroup"
    group.write_text("/autogroup-1 nice 0\n")
    proc = FakeProcess(0, allowed=True)
    outcome = apply(proc, group, leads_session=False)
    assert (outcome.nice, outcome.autogroup_nice, outcome.shared_session) == (-10, 0, True)
    assert group.read_text() == "/autogroup-1 nice 0\n"
    assert "left alone: shared with the session" in describe(outcome)


def test_refusal_is_reported_once_and_the_server_goes_on(tmp_path: Path) -> None:
    proc = FakeProcess(0, allowed=False)
    outcome = apply(proc, tmp_path / "none", leads_session=True)
    assert (outcome.nice, outcome.autogroup_nice) == (0, None)
    assert outcome.refused == "nice -10 needs root or CAP_SYS_NICE"
    assert "Nice=-10" in describe(outcome) and "--cpu-nice off" in describe(outcome)


def test_bad_setting_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATMESH_SECRET", "test-secret")
    config = tmp_path / "configuration.txt"
    config.write_text("s1 127.0.0.1 4444 5555 1\n")
    assert main(["--config", str(config), "--id", "s1", "--cpu-nice", "-30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["chatmesh: --cpu-nice=-30: expected a nice value from -20 to 19, or off"]
