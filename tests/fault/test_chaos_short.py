"""A short seeded chaos run (tests/chaos.py) in the suite: ~35 s of faults on 5 servers, then every invariant."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.support import PYTHON, REPO

SEED = 20240611
FAULT_MINUTES = 0.6
RUN_TIMEOUT_S = 180


def test_short_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    args = [PYTHON, "-m", "tests.chaos", "--seed", str(SEED), "--minutes", str(FAULT_MINUTES), "--json", str(out)]
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
