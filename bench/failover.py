"""Failover time: SIGKILL the coordinator, time until a newidentity is approved on a survivor.

    python -m bench.failover [--rounds 10] [--sizes 3,5] [--out bench/results/failover.json]

For each cluster size, a real cluster of `python -m node` processes on loopback. Each round: wait until
every server serves and agrees on the highest-priority coordinator, SIGKILL it, and at once open client
connections to the survivors asking for fresh identities (round-robin) until one is approved. The figure is
the time from the kill to the approval reply reaching the client: failure detection, the Fast Bully
election, a Raft leader election when the coordinator also led Raft, and the commit. Also recorded: when
every survivor agreed on the new coordinator, and whether the killed server was the Raft leader too. The
killed server is then restarted from its data directory and takes the coordinator role back before the
next round. Prints a table and writes JSON. Target on loopback: median <= 1 s, max <= 2 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import finish_report, machine_info
from tests.fault.invariants import Clients, now, probe_login
from tests.support import Cluster

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "failover.json"
TARGET_MEDIAN_S = 1.0
TARGET_MAX_S = 2.0
# Bounds: one failover, one (re)start, the wait for the coordinator to be back.
FAILOVER_TIMEOUT_S = 20.0
START_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.01


def _agreement_time(cluster: Cluster, survivors: list[str], expected: str, t0: float, out: dict[str, float]) -> None:
    """Poll the survivors' /status until all name `expected` as coordinator; store the time since t0."""
    deadline = t0 + FAILOVER_TIMEOUT_S
    while now() < deadline:
        try:
            if all(cluster.status(sid, 0.5).get("coordinator") == expected for sid in survivors):
                out["agreed_s"] = now() - t0
                return
        except Exception:
            pass
        time.sleep(POLL_INTERVAL_S)


def one_round(cluster: Cluster, clients: Clients, index: int) -> dict[str, Any]:
    ids = cluster.ids
    victim, successor = ids[-1], ids[-2]
    cluster.wait_coordinator(victim, START_TIMEOUT_S)
    survivors = ids[:-1]
    # The cluster is settled and committing: one approval before the kill.
    warm, _, _ = probe_login(clients.connect, survivors, f"warm{index}x", clients.ledger, now(), START_TIMEOUT_S)
    assert warm < START_TIMEOUT_S, "the cluster does not approve identities before the kill"
    raft_leader = cluster.status(victim)["raft"]["leader"]

    timing: dict[str, float] = {}
    t0 = now()
    cluster.kill(victim)
    clients.server_killed(victim)
    watcher = threading.Thread(target=_agreement_time, args=(cluster, survivors, successor, t0, timing), daemon=True)
    watcher.start()
    took, _, attempts = probe_login(clients.connect, survivors, f"r{index}x", clients.ledger, t0, FAILOVER_TIMEOUT_S)
    watcher.join(FAILOVER_TIMEOUT_S)

    cluster.start(victim)
    cluster.wait_ready(victim, START_TIMEOUT_S)
    return {
        "round": index,
        "approved_s": took,
        "coordinator_agreed_s": timing.get("agreed_s"),
        "killed_raft_leader": raft_leader == victim,
        "attempts": attempts,
    }


def bench_size(size: int, rounds: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"chatmesh-failover-{size}-"))
    cluster = Cluster(root, size)
    clients = Clients(cluster)
    try:
        for sid in cluster.ids:
            cluster.start(sid)
        for sid in cluster.ids:
            cluster.wait_ready(sid, START_TIMEOUT_S)
        results = []
        for i in range(rounds):
            row = one_round(cluster, clients, i)
            print(
                f"  {size} servers, round {i + 1}/{rounds}: approved after {row['approved_s']:.3f} s"
                f" (coordinator agreed {_fmt(row['coordinator_agreed_s'])}, "
                f"raft leader killed too: {row['killed_raft_leader']})",
                file=sys.stderr,
                flush=True,
            )
            results.append(row)
            clients.close()
            clients.sessions.clear()
    finally:
        clients.close()
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    times = [r["approved_s"] for r in results]
    agreed = [r["coordinator_agreed_s"] for r in results if r["coordinator_agreed_s"] is not None]
    return {
        "servers": size,
        "rounds": rounds,
        "median_s": statistics.median(times),
        "max_s": max(times),
        "min_s": min(times),
        "median_agreed_s": statistics.median(agreed) if agreed else None,
        "raft_leader_killed_too": sum(r["killed_raft_leader"] for r in results),
        "meets_target": statistics.median(times) <= TARGET_MEDIAN_S and max(times) <= TARGET_MAX_S,
        "per_round": results,
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "servers  rounds  median    max       min       coordinator agreed (median)  raft leader killed too  target",
        "-------  ------  --------  --------  --------  ---------------------------  ----------------------  ------",
    ]
    for r in rows:
        lines.append(
            f"{r['servers']:>7}  {r['rounds']:>6}  {r['median_s']:>6.3f} s  {r['max_s']:>6.3f} s  {r['min_s']:>6.3f} s"
            f"  {_fmt(r['median_agreed_s']):>27}  {r['raft_leader_killed_too']:>22}  "
            f"{'met' if r['meets_target'] else 'MISSED'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="kills per cluster size")
    parser.add_argument("--sizes", default="3,5", help="cluster sizes, comma-separated")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where to write the JSON results")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.rounds < 1 or any(s < 3 for s in sizes):
        parser.error("need --rounds >= 1 and sizes >= 3")

    started = time.monotonic()
    rows = []
    for size in sizes:
        print(f"measuring {size} servers, {args.rounds} rounds ...", file=sys.stderr, flush=True)
        rows.append(bench_size(size, args.rounds))
    print(format_table(rows))
    print(f"\ntarget on loopback: median <= {TARGET_MEDIAN_S} s, max <= {TARGET_MAX_S} s")
    command = "python -m bench.failover" + (f" --rounds {args.rounds}" if args.rounds != 10 else "")
    command += f" --sizes {args.sizes}" if args.sizes != "3,5" else ""
    report = {
        "command": command,
        "taken_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "target": {"median_s": TARGET_MEDIAN_S, "max_s": TARGET_MAX_S},
        "rows": rows,
    }
    return finish_report(args.out, report, started)


if __name__ == "__main__":
    sys.exit(main())
