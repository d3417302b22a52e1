"""Seeded whole-cluster simulations of the Fast Bully election (see tests/sim/harness.py for the invariants).

A failure prints the scenario and seed and the command that replays it exactly:
    python -m tests.sim.replay <scenario> <seed> --trace
More seeds: CHATMESH_SIM_SEEDS=500 pytest tests/sim
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.sim.classic_bully import ClassicBully
from tests.sim.harness import Simulation
from tests.sim.scenarios import SCENARIOS, failover_bound, general_bound
from tests.support import REPO

SEEDS = int(os.environ.get("CHATMESH_SIM_SEEDS", "6"))


@pytest.mark.parametrize("seed", range(SEEDS))
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_keeps_the_invariants(name: str, seed: int) -> None:
    sim = SCENARIOS[name].run(seed)
    assert sim.settle_times, "the scenario never reached agreement"
    assert max(sim.settle_times) <= sim.settle_bound_s


def test_the_same_seed_replays_exactly() -> None:
    first = SCENARIOS["chaos"].run(11)
    second = SCENARIOS["chaos"].run(11)
    assert first.digest == second.digest and first.steps == second.steps


def test_replay_does_not_depend_on_string_hashing() -> None:
    """Sets of server ids iterate in hash order, which changes per process: the cores must never rely on it."""
    code = "from tests.sim.scenarios import SCENARIOS; print(SCENARIOS['chaos'].run(5).digest)"
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(REPO))
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_failover_settles_within_the_stated_bound() -> None:
    worst = 0.0
    for seed in range(SEEDS):
        sim = SCENARIOS["coordinator-crash"].run(seed)
        worst = max(worst, sim.settle_times[-1])
    bound = failover_bound(Simulation(3, 0).timings)
    assert worst <= bound, f"failover took {worst:.3f}s, bound {bound:.3f}s"
    assert bound < general_bound(Simulation(3, 0).timings)


def test_a_broken_rule_is_caught_and_names_its_seed() -> None:
    """The harness itself: a core that never announces must fail the settle invariant with a replay line."""

    class Mute(ClassicBully):
        def start(self, now: float) -> list:  # type: ignore[override]
            return []

    sim = Simulation(3, 42, scenario="mute", settle_bound_s=2.0, factory=Mute)
    sim.boot_all()
    with pytest.raises(AssertionError, match=r"seed 42.*\n.*replay: python -m tests.sim.replay mute 42"):
        sim.run_for(5.0)


@pytest.mark.parametrize("name", ["startup", "coordinator-crash", "recover-higher"])
def test_the_classic_bully_reference_also_keeps_the_invariants(name: str) -> None:
    sim = SCENARIOS[name].run(1, factory=ClassicBully)
    assert sim.settle_times
