"""Messages per election: Fast Bully vs the classic Bully algorithm, counted in the seeded simulation.

    python -m bench.election_messages [--seeds 5] [--sizes 3,6,12,24]

For each cluster size n the cluster boots and settles, then (heartbeats are not counted, only election
messages: IamUp, View, Election, Answer, Nomination, Coordinator):
- worst:    the coordinator crashes and the lowest-priority server alone notices first (it starts the
            election at once, before anyone else's failure detector fires): the paper's worst case;
- typical:  the coordinator crashes and every server's failure detector notices it (all at about the same
            time, as every server watches the coordinator at the full heartbeat rate): mean and max over the seeds;
- recovery: the crashed coordinator restarts and takes the role back.
Prints a table and writes bench/results/election_messages.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bully.election import ElectionTimings, FastBully
from tests.sim.classic_bully import ClassicBully
from tests.sim.harness import CoreFactory, Simulation
from tests.sim.scenarios import general_bound

RESULTS = Path(__file__).resolve().parent / "results" / "election_messages.json"
ALGORITHMS: dict[str, CoreFactory] = {"fast": FastBully, "classic": ClassicBully}


def _booted(n: int, seed: int, factory: CoreFactory) -> Simulation:
    timings = ElectionTimings()
    sim = Simulation(n, seed, scenario=f"bench-{n}", timings=timings, factory=factory,
                     settle_bound_s=general_bound(timings))  # fmt: skip
    sim.boot_all()
    sim.run_for(general_bound(timings))
    return sim


def _settle(sim: Simulation, seconds: float) -> None:
    sim.run_for(seconds)
    assert sim.agreed(), f"not settled: {sim.coordinators()}"


def measure(n: int, seed: int, factory: CoreFactory) -> dict[str, int]:
    window = general_bound(ElectionTimings()) + 1.0
    top, lowest = f"s{n}", "s1"

    sim = _booted(n, seed, factory)
    before = sim.messages()
    sim.crash(top)
    sim.start_election(lowest)  # the lowest notices first, alone
    _settle(sim, window)
    worst = sim.messages() - before

    sim = _booted(n, seed, factory)
    before = sim.messages()
    sim.crash(top)
    _settle(sim, window)
    typical = sim.messages() - before
    before = sim.messages()
    sim.boot(top)
    _settle(sim, window)
    recovery = sim.messages() - before
    return {"worst": worst, "typical": typical, "recovery": recovery}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sizes", default="3,6,12,24")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    begun = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for n in sizes:
        row: dict[str, Any] = {"n": n}
        for name, factory in ALGORITHMS.items():
            runs = [measure(n, seed, factory) for seed in range(args.seeds)]
            row[name] = {
                "worst": max(r["worst"] for r in runs),
                "typical_mean": round(statistics.mean(r["typical"] for r in runs), 1),
                "typical_max": max(r["typical"] for r in runs),
                "recovery": max(r["recovery"] for r in runs),
            }
        rows.append(row)

    header = (
        "| n | Fast Bully worst | classic worst | Fast Bully typical (mean / max) | classic typical (mean / max) "
        "| Fast Bully recovery | classic recovery |"
    )
    print(header)
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        fast, classic = row["fast"], row["classic"]
        print(
            f"| {row['n']} | {fast['worst']} | {classic['worst']} "
            f"| {fast['typical_mean']} / {fast['typical_max']} | {classic['typical_mean']} / {classic['typical_max']} "
            f"| {fast['recovery']} | {classic['recovery']} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "what": "election messages (heartbeats excluded) per election, seeded simulation",
                "seeds": args.seeds,
                "timings": ElectionTimings().__repr__(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS} "
          f"in {time.perf_counter() - begun:.1f}s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
