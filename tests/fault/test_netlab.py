"""The partition lab itself, checked with plain TCP echo processes (no chat servers needed)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from tests.fault.netlab import NetLab, list_namespaces
from tests.support import PYTHON, REPO, wait_until

PORT = 7007


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _target(lab: NetLab, sid: str) -> str:
    return f"{lab.spec.address(sid)}:{PORT}"


def _start_echo(lab: NetLab, sid: str) -> subprocess.Popen[bytes]:
    args = [*lab.exec_prefix(sid), PYTHON, "-m", "tests.fault.netlab", "echo", _target(lab, sid)]
    return subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _reach_all(prefix: list[str], lab: NetLab, targets: list[str], timeout: float = 0.5) -> list[bool]:
    """One process in the namespace of `prefix` tries every target."""
    args = [*prefix, PYTHON, "-m", "tests.fault.netlab", "reach", *(_target(lab, t) for t in targets)]
    out = subprocess.run([*args, "--timeout", str(timeout)], cwd=REPO, env=_env(), capture_output=True, text=True)
    return [flag == "1" for flag in out.stdout.split()]


def _reach(prefix: list[str], lab: NetLab, target: str) -> bool:
    return _reach_all(prefix, lab, [target]) == [True]


def _matrix(lab: NetLab, ids: list[str]) -> dict[tuple[str, str], bool]:
    matrix = {}
    for a in ids:
        others = [b for b in ids if b != a]
        matrix.update({(a, b): ok for b, ok in zip(others, _reach_all(lab.exec_prefix(a), lab, others), strict=True)})
    return matrix


def test_partition_cuts_only_across_groups_and_heal_restores(make_lab: Callable[[list[str]], NetLab]) -> None:
    ids = ["s1", "s2", "s3"]
    lab = make_lab(ids)
    for sid in ids:
        _start_echo(lab, sid)
    wait_until(lambda: all(_reach_all(lab.hub_prefix(), lab, ids)), 10, 0.1, "echo on every server")
    assert all(_matrix(lab, ids).values())

    # A connection the hub holds to a server that moves to the other bridge keeps working.
    hold = subprocess.Popen(
        [*lab.hub_prefix(), PYTHON, "-m", "tests.fault.netlab", "hold", _target(lab, "s3")],
        cwd=REPO, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert hold.stdout is not None and hold.stdin is not None
    try:
        assert hold.stdout.readline().strip() == "ok"
        lab.partition(["s1", "s2"], ["s3"])
        matrix = _matrix(lab, ids)
        assert matrix[("s1", "s2")] and matrix[("s2", "s1")]
        for a, b in [("s1", "s3"), ("s3", "s1"), ("s2", "s3"), ("s3", "s2")]:
            assert not matrix[(a, b)], f"{a} reaches {b} across the partition"
        assert all(_reach_all(lab.hub_prefix(), lab, ids)), "the hub cannot reach every server during the partition"
        hold.stdin.write("during\n")
        hold.stdin.flush()
        assert hold.stdout.readline().strip() == "ok"

        lab.heal()
        assert all(_matrix(lab, ids).values())
        hold.stdin.write("after\n")
        hold.stdin.flush()
        assert hold.stdout.readline().strip() == "ok"
    finally:
        hold.kill()
        hold.wait()


def test_destroy_kills_processes_and_removes_namespaces(make_lab: Callable[[list[str]], NetLab]) -> None:
    lab = make_lab(["s1", "s2"])
    echo = _start_echo(lab, "s1")
    wait_until(lambda: _reach(lab.hub_prefix(), lab, "s1"), 10, 0.1, "echo on s1")
    assert echo.pid in lab.pids()[lab.spec.servers["s1"]]
    lab.destroy()
    assert echo.wait(timeout=5) != 0
    assert not set(lab.spec.namespaces) & set(list_namespaces())
    lab.destroy()  # idempotent


def test_nothing_is_added_to_the_root_namespace(make_lab: Callable[[list[str]], NetLab]) -> None:
    before = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    lab = make_lab(["s1", "s2"])
    assert subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout == before
    assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout == links_before
    assert lab.spec.subnet not in before
