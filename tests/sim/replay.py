"""Replay one simulation exactly: python -m tests.sim.replay <scenario> <seed> [--trace] [--classic]"""

from __future__ import annotations

import argparse
import sys

from tests.sim.classic_bully import ClassicBully
from tests.sim.harness import SimulationFailure
from tests.sim.scenarios import SCENARIOS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("seed", type=int)
    parser.add_argument("--trace", action="store_true", help="print every event (heartbeats excluded)")
    parser.add_argument("--classic", action="store_true", help="run the classic Bully reference instead")
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    sim = scenario.build(args.seed, ClassicBully if args.classic else None)
    sim.full_trace = []
    status = 0
    try:
        scenario.drive(sim)
        sim.finish()
    except (SimulationFailure, AssertionError) as exc:
        print(exc, file=sys.stderr)
        status = 1
    if args.trace:
        for line in sim.full_trace:
            print(line)
    print(
        f"scenario {args.scenario} seed {args.seed}: {'FAILED' if status else 'ok'}, digest {sim.digest}, "
        f"settle times {[round(t, 3) for t in sim.settle_times]}, election messages {dict(sim.sent)}"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
