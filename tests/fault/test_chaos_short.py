"""Short seeded chaos runs (tests/chaos.py) in the suite: ~35 s of faults on 5 servers, then every invariant.

One on loopback (SIGKILL, SIGSTOP, restarts) and one inside the network-namespace lab (tests/fault/netlab.py)
where partitions join the faults; the lab one skips with a reason where namespaces cannot be made."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.fault.netlab import NetLab
from tests.support import PYTHON, REPO

SEED = 20240611
LAB_SEED = 20261127
FAULT_MINUTES = 0.6
RUN_TIMEOUT_S = 180


def run_chaos(args: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        raise AssertionError(f"chaos run timed out after {RUN_TIMEOUT_S}s:\n{text[-8000:]}") from None
    print(proc.stdout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-12000:]
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["faults"] >= 3, summary
    assert summary["approved"]["identity"] > 0 and summary["operations"].get("message", 0) > 0, summary
    return summary


def test_short_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    args = [PYTHON, "-m", "tests.chaos", "--seed", str(SEED), "--minutes", str(FAULT_MINUTES), "--json", str(out)]
    run_chaos(args, out)


def test_short_chaos_run_with_partitions_keeps_every_invariant(
    make_lab: Callable[[list[str]], NetLab], tmp_path: Path
) -> None:
    lab = make_lab(["s1", "s2", "s3", "s4", "s5"])
    spec_file = tmp_path / "lab.json"
    spec_file.write_text(lab.spec.to_json())
    out = tmp_path / "chaos.json"
    args = [*lab.hub_prefix(), PYTHON, "-m", "tests.chaos", "--seed", str(LAB_SEED), "--minutes", str(FAULT_MINUTES)]
    args += ["--lab", str(spec_file), "--json", str(out)]
    summary = run_chaos(args, out)
    assert summary["partitions"] >= 1, summary
