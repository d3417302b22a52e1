"""Run or replay whole-cluster simulations (docs/simulation.md).

    python -m tests.sim.cluster run [--seeds 100] [--first 0] [--mutation NAME] [--jobs 1]
    python -m tests.sim.cluster replay SEED [--trace] [--mutation NAME]

`run` prints one line per failing seed (with the command that replays it) and, at the end, how many seeds
ran per second; it exits 1 if any seed failed. `replay` runs one seed again, bit for bit, and prints its
digest (with --trace, every event of the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
import time

from cluster.timings import ClusterTimings
from tests.sim.cluster.mutations import MUTATIONS, mutated
from tests.sim.cluster.world import FAULT_MIXES, Options, SimulationFailure, World


def run_seed(seed: int, options: Options) -> tuple[int, str | None, str]:
    world = World(seed, options)
    try:
        with mutated(options.mutation):
            world.run()
    except SimulationFailure as exc:
        return seed, str(exc), world.digest
    return seed, None, world.digest


def _run_one(args: tuple[int, Options]) -> tuple[int, str | None, str]:
    return run_seed(*args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim.cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run many seeds")
    run.add_argument("--seeds", type=int, default=100)
    run.add_argument("--first", type=int, default=0)
    run.add_argument("--jobs", type=int, default=1, help="worker processes")
    replay = sub.add_parser("replay", help="run one seed again, exactly")
    replay.add_argument("seed", type=int)
    replay.add_argument("--trace", action="store_true", help="print every event")
    for p in (run, replay):
        p.add_argument("--servers", type=int, default=Options.servers)
        p.add_argument("--clients", type=int, default=Options.clients)
        p.add_argument("--mutation", choices=sorted(MUTATIONS), help="re-introduce a known bug")
        p.add_argument("--quiet", action="store_true")
        p.add_argument("--churn", action="store_true", help="clients log in again at once after a quit or drop")
        p.add_argument("--faults", choices=FAULT_MIXES, default=Options.faults, help="the fault mix")
        p.add_argument("--reconcile-interval", type=float, default=ClusterTimings().reconcile_interval_s)
    args = parser.parse_args(argv)
    options = Options(
        servers=args.servers,
        clients=args.clients,
        mutation=args.mutation,
        churn=args.churn,
        faults=args.faults,
        timings=dataclasses.replace(ClusterTimings(), reconcile_interval_s=args.reconcile_interval),
    )

    if args.command == "replay":
        world = World(args.seed, options)
        world.full_trace = []
        status = 0
        try:
            with mutated(options.mutation):
                world.run()
        except SimulationFailure as exc:
            print(exc, file=sys.stderr)
            status = 1
        if args.trace:
            print("\n".join(world.full_trace))
        print(f"seed {args.seed}: {'FAILED' if status else 'ok'}, digest {world.digest}, steps {world.scheduler.steps}")
        return status

    started = time.perf_counter()
    seeds = range(args.first, args.first + args.seeds)
    failures = 0
    work = [(seed, options) for seed in seeds]
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = list(pool.imap_unordered(_run_one, work, chunksize=4))
    else:
        results = [_run_one(w) for w in work]
    for _seed, failure, _digest in sorted(results):
        if failure is not None:
            failures += 1
            first_line = failure.splitlines()[0]
            replay_line = next(line for line in failure.splitlines() if line.startswith("replay:"))
            print(f"FAIL {first_line}\n     {replay_line}")
    elapsed = time.perf_counter() - started
    print(
        f"{args.seeds} seeds, {failures} failed, {elapsed:.1f}s, {args.seeds / elapsed:.1f} seeds/s"
        f" ({args.jobs} process{'es' if args.jobs > 1 else ''})"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
