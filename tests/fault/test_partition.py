"""Partition 2|3 of 5 real servers in network namespaces (tests/fault/netlab.py): the minority refuses,
the majority keeps working, and after healing there is one coordinator and one registry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.fault.netlab import NetLab, run_lab_scenario
from tests.support import REPO


def test_partition_minority_refuses_majority_serves_heal_converges(
    make_lab: Callable[[list[str]], NetLab], tmp_path: Path
) -> None:
    lab = make_lab(["s1", "s2", "s3", "s4", "s5"])
    run_lab_scenario(lab, "tests.fault.partition_scenario", tmp_path, REPO)
