"""Multi-host as users run it (issue 16): one network namespace per host, each server started there with
the README's command; a client on the host side chats across servers while the coordinator's host is cut
off and comes back (tests/fault/multihost_scenario.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.fault.netlab import NetLab
from tests.support import PYTHON, REPO

SCENARIO_TIMEOUT_S = 240


def test_six_hosts_run_as_the_readme_says_and_survive_losing_the_coordinators_host(
    make_lab: Callable[[list[str]], NetLab], tmp_path: Path
) -> None:
    lab = make_lab(["s1", "s2", "s3", "s4", "s5", "s6"])
    spec_file = tmp_path / "lab.json"
    spec_file.write_text(lab.spec.to_json())
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    args = [*lab.hub_prefix(), PYTHON, "-m", "tests.fault.multihost_scenario"]
    args += ["--lab", str(spec_file), "--root", str(tmp_path)]
    try:
        proc = subprocess.run(
            args, cwd=REPO, env=env, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        raise AssertionError(f"multi-host scenario timed out after {SCENARIO_TIMEOUT_S}s:\n{out[-8000:]}") from None
    summary = proc.stdout + proc.stderr
    print(summary)
    assert proc.returncode == 0 and "RESULT ok" in proc.stdout, summary[-12000:]
