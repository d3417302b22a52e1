"""Commit latency of the replicated registry: PySyncObj nodes as separate processes on loopback.

    python -m bench.registry [--quick] [--sizes 3,5] [--out bench/results/registry.json]

For 3 and 5 nodes, journal on and off: claims submitted at the Raft leader and at a follower, one writer
at a time, 16 and 64 concurrent writers (the registry batches one loop turn's commands into one log entry;
the 64-writer rate over the 1-writer rate is what concurrency can buy when the commit is all there is).
Each latency is measured inside the node, from `submit` to the applied result. Also measures what one
journal append costs in isolation. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pysyncobj.journal import FileJournal

from bench.common import finish_report, machine_info
from registry import state as rs
from tests.integration.registry_node import RegistryNodes

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "registry.json"
CONCURRENT_WRITERS = 16
# As many writers as bench.approval's concurrent clients: the batching floor of its 64-concurrent target.
MANY_WRITERS = 64
INCARNATION = 1
COMMIT_TIMEOUT_S = 5.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def run_load(
    nodes: RegistryNodes, server_id: str, count: int, concurrency: int, prefix: str, samples: bool = False
) -> dict[str, Any]:
    reply = nodes.call(
        server_id,
        {
            "op": "load",
            "count": count,
            "concurrency": concurrency,
            "prefix": prefix,
            "timeout": COMMIT_TIMEOUT_S,
            "server": server_id,
            "incarnation": INCARNATION,
        },
    )
    ms: list[float] = reply["ms"]
    return {
        "commits": len(ms),
        "errors": reply["errors"],
        "p50_ms": percentile(ms, 0.50),
        "p99_ms": percentile(ms, 0.99),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
        "max_ms": max(ms) if ms else float("nan"),
        "commits_per_s": len(ms) / reply["wall_s"] if reply["wall_s"] else float("nan"),
        **({"ms": ms} if samples else {}),
    }


@contextlib.contextmanager
def registry_cluster(size: int, journal: bool = True) -> Iterator[tuple[RegistryNodes, str, str]]:
    """`size` bare registry nodes, every server announced up; yields (nodes, leader, a voting follower)."""
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp, RegistryNodes(Path(tmp), size, journal) as nodes:
        nodes.start_all()
        leader = nodes.wait_leader(timeout=30)
        for server_id in nodes.ids:
            reply = nodes.submit(leader, rs.ServerUp(f"up-{server_id}", server_id, INCARNATION))
            assert reply["ok"] and reply["result"]["ok"], reply
        # A voter: a read-only replica (past the five voters) hears of commits only at the append-entries
        # period, which is not what a follower-submitted commit costs.
        voters = [str(v) for v in nodes.config.voter_ids]
        yield nodes, leader, next(s for s in voters if s != leader)


def bench_cluster(size: int, journal: bool, sequential: int, concurrent: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with registry_cluster(size, journal) as (nodes, leader, follower):
        # Warm up both paths (connections, caches) before measuring.
        run_load(nodes, leader, 50, 1, "wl")
        run_load(nodes, follower, 50, 1, "wf")
        for role, server_id in (("leader", leader), ("follower", follower)):
            for writers, count in ((1, sequential), (CONCURRENT_WRITERS, concurrent), (MANY_WRITERS, concurrent)):
                result = run_load(nodes, server_id, count, writers, f"{role[0]}{writers}x")
                rows.append({"nodes": size, "journal": journal, "from": role, "writers": writers, **result})
        nodes.wait_converged(timeout=30)
    return rows


def journal_append_cost(entries: int) -> dict[str, float]:
    """One FileJournal append of a pickled registry command, in isolation (what each replica pays)."""
    import pysyncobj.pickle as pickle

    command = b"\x00" + pickle.dumps((0, (rs.ClaimIdentity("s1.1700000000000.12345.678", "someone123", "s1", 1),)))
    with tempfile.TemporaryDirectory(prefix="bench-journal-") as tmp:
        journal = FileJournal(str(Path(tmp) / "raft.journal"))
        started = time.perf_counter()
        for i in range(entries):
            journal.add(command, i + 1, 1)
            journal.setRaftCommitIndex(i + 1)
        elapsed = time.perf_counter() - started
        journal._destroy()
    return {"entries": entries, "us_per_append": elapsed / entries * 1e6, "entry_bytes": len(command)}


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("nodes", "journal", "from", "writers", "commits", "errors", "p50 ms", "p99 ms", "max ms", "commits/s")
    lines = [header]
    for r in rows:
        lines.append(
            (
                str(r["nodes"]),
                "on" if r["journal"] else "off",
                r["from"],
                str(r["writers"]),
                str(r["commits"]),
                str(r["errors"]),
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['max_ms']:.1f}",
                f"{r['commits_per_s']:.0f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def journal_costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """p50 with the journal minus p50 without, per configuration."""
    index = {(r["nodes"], r["from"], r["writers"], r["journal"]): r for r in rows}
    costs = []
    for (size, role, writers, journal), row in sorted(index.items()):
        other = index.get((size, role, writers, False))
        if journal and other is not None:
            costs.append(
                {
                    "nodes": size,
                    "from": role,
                    "writers": writers,
                    "p50_delta_ms": row["p50_ms"] - other["p50_ms"],
                    "p99_delta_ms": row["p99_ms"] - other["p99_ms"],
                }
            )
    return costs


def follower_and_batching(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: the follower-submitted commit p50 over the leader's (one writer), and the leader's
    commits/s with MANY_WRITERS over one writer."""
    index = {(r["nodes"], r["journal"], r["from"], r["writers"]): r for r in rows}
    out = []
    for size, journal in sorted({(r["nodes"], r["journal"]) for r in rows}):
        leader, follower = index.get((size, journal, "leader", 1)), index.get((size, journal, "follower", 1))
        many = index.get((size, journal, "leader", MANY_WRITERS))
        if leader and follower and many:
            out.append(
                {
                    "nodes": size,
                    "journal": journal,
                    "follower_x_leader_p50": follower["p50_ms"] / leader["p50_ms"],
                    "many_x_one_rate": many["commits_per_s"] / leader["commits_per_s"],
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer commits (a smoke run, ~30 s)")
    parser.add_argument("--sizes", default="3,5", help="cluster sizes, comma-separated")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where to write the JSON results")
    args = parser.parse_args(argv)
    sequential, concurrent = (150, 400) if args.quick else (600, 2000)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for size in sizes:
        for journal in (True, False):
            print(f"measuring {size} nodes, journal {'on' if journal else 'off'} ...", file=sys.stderr, flush=True)
            rows.extend(bench_cluster(size, journal, sequential, concurrent))
    append = journal_append_cost(20_000)
    costs = journal_costs(rows)

    print(format_table(rows))
    print(
        f"\njournal append in isolation: {append['us_per_append']:.1f} us per entry "
        f"({append['entry_bytes']} bytes, mmap, no fsync)"
    )
    for c in costs:
        print(
            f"journal cost, {c['nodes']} nodes from the {c['from']}, {c['writers']} writer(s): "
            f"p50 {c['p50_delta_ms']:+.2f} ms, p99 {c['p99_delta_ms']:+.2f} ms"
        )
    ratios = follower_and_batching(rows)
    for r in ratios:
        print(
            f"{r['nodes']} nodes, journal {'on' if r['journal'] else 'off'}: follower-submitted p50 "
            f"{r['follower_x_leader_p50']:.2f}x the leader's; {MANY_WRITERS} writers {r['many_x_one_rate']:.1f}x the "
            f"commits/s of 1 writer at the leader"
        )
    report = {
        "command": "python -m bench.registry" + (" --quick" if args.quick else ""),
        "taken_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "rows": rows,
        "journal_append": append,
        "journal_cost": costs,
        "ratios": ratios,
    }
    return finish_report(args.out, report, started)


if __name__ == "__main__":
    sys.exit(main())
