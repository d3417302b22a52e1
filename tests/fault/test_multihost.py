"""Multi-host as users run it (issue 16): one network namespace per host, each server started there with
the README's command; a client on the host side chats across servers while the coordinator's host is cut
off and comes back (tests/fault/multihost_scenario.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.fault.netlab import NetLab, run_lab_scenario
from tests.support import REPO


def test_six_hosts_run_as_the_readme_says_and_survive_losing_the_coordinators_host(
    make_lab: Callable[[list[str]], NetLab], tmp_path: Path
) -> None:
    lab = make_lab(["s1", "s2", "s3", "s4", "s5", "s6"])
    run_lab_scenario(lab, "tests.fault.multihost_scenario", tmp_path, REPO)
