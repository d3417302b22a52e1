"""Identity and room approval latency as a client sees it, on a 5-server loopback cluster.

    python -m bench.approval [--quick] [--servers 5] [--out bench/results/approval.json]

Each approval crosses the whole cluster: the client's server asks the Fast Bully coordinator, which
commits the claim to the Raft registry (a majority of the servers) before the client hears `approved`.
Measured from a client of the coordinator and from a client of another server, for `newidentity` and
then `createroom` (each client claims one identity and creates one room):

- sequential: one client at a time, one request at a time (latency p50/p95/p99/max);
- concurrent: 64 clients at once, each doing newidentity + createroom on several connections in turn
  (approvals per second over the whole phase, and the latencies under that load).

Latency is from writing the request to reading its reply, in this process. Every connection stays open
until the end, so no release traffic runs during a measurement. Targets (issue 7): p50 <= 3 ms and
p99 <= 15 ms sequential; >= 1,000 approvals/s concurrent.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from bench.common import (
    LineClient,
    bench_cluster,
    bench_limits_env,
    default_out,
    finish_report,
    format_table,
    latency_summary,
    machine_info,
    node_importable,
)

CONCURRENT_CLIENTS = 64
TARGET_P50_MS = 3.0
TARGET_P99_MS = 15.0
TARGET_APPROVALS_PER_S = 1000.0
# Warm-up requests per server before measuring (connections, caches, the Raft pipeline).
WARMUP = 20


class Phase:
    """Latencies and outcomes of one measured phase."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {"newidentity": [], "createroom": []}
        self.refused: dict[str, int] = {"newidentity": 0, "createroom": 0}

    def record(self, kind: str, reply: dict[str, Any], seconds: float) -> None:
        if reply.get("approved") == "true":
            self.latency[kind].append(seconds)
        else:
            self.refused[kind] += 1

    @property
    def approvals(self) -> int:
        return sum(len(v) for v in self.latency.values())


async def claim(client: LineClient, identity: str, room: str, phase: Phase) -> None:
    """newidentity then createroom on one fresh connection."""
    reply, seconds = await client.request({"type": "newidentity", "identity": identity}, "newidentity")
    phase.record("newidentity", reply, seconds)
    if reply.get("approved") != "true":
        return
    reply, seconds = await client.request({"type": "createroom", "roomid": room}, "createroom")
    phase.record("createroom", reply, seconds)


async def sequential(address: tuple[str, int], count: int, tag: str, keep: list[LineClient]) -> Phase:
    phase = Phase()
    for i in range(count):
        client = await LineClient.open(*address)
        keep.append(client)
        await claim(client, f"i{tag}{i}", f"r{tag}{i}", phase)
    return phase


async def concurrent(
    address: tuple[str, int], clients: int, rounds: int, tag: str, keep: list[LineClient]
) -> tuple[Phase, float]:
    """`clients` workers, each `rounds` times newidentity + createroom on a connection opened beforehand.
    Returns the phase and its wall time."""
    phase = Phase()
    connections = [await LineClient.open(*address) for _ in range(clients * rounds)]
    keep.extend(connections)

    async def worker(w: int) -> None:
        for r in range(rounds):
            n = w * rounds + r
            await claim(connections[n], f"c{tag}{n}", f"q{tag}{n}", phase)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for w in range(clients):
            tasks.create_task(worker(w))
    return phase, time.perf_counter() - started


def rows_of(where: str, mode: str, phase: Phase, wall_s: float | None) -> list[dict[str, Any]]:
    rows = []
    for kind, seconds in phase.latency.items():
        rows.append(
            {
                "client_on": where,
                "mode": mode,
                "request": kind,
                **latency_summary(seconds),
                "refused": phase.refused[kind],
                "approvals_per_s": (phase.approvals / wall_s) if wall_s else None,
            }
        )
    return rows


async def measure(cluster: Any, sequential_count: int, rounds: int) -> list[dict[str, Any]]:
    coordinator = cluster.wait_coordinator()
    other = next(s for s in cluster.ids if s != coordinator)
    leader = raft_leader(cluster, coordinator)
    keep: list[LineClient] = []
    rows: list[dict[str, Any]] = []
    try:
        for where, server_id in (("coordinator", coordinator), ("other", other)):
            address = cluster.client_address(server_id)
            await sequential(address, WARMUP, f"w{where[0]}", keep)
            print(f"  {where} ({server_id}): sequential x{sequential_count} ...", file=sys.stderr, flush=True)
            phase = await sequential(address, sequential_count, f"s{where[0]}", keep)
            rows += rows_of(where, "sequential", phase, None)
            print(
                f"  {where} ({server_id}): {CONCURRENT_CLIENTS} concurrent x{rounds} ...", file=sys.stderr, flush=True
            )
            phase, wall = await concurrent(address, CONCURRENT_CLIENTS, rounds, f"k{where[0]}", keep)
            rows += rows_of(where, f"{CONCURRENT_CLIENTS} concurrent", phase, wall)
    finally:
        await asyncio.gather(*(c.close() for c in keep), return_exceptions=True)
    for row in rows:
        row["coordinator"] = coordinator
        row["raft_leader"] = leader
        row["server"] = coordinator if row["client_on"] == "coordinator" else other
    return rows


def raft_leader(cluster: Any, server_id: str) -> str | None:
    """The Raft leader as `server_id` sees it: approvals from a coordinator that is not also the leader
    take two more hops (the forward to the leader and the commit notice back)."""
    try:
        return cluster.status(server_id, timeout=5.0).get("raft", {}).get("leader")
    except Exception:
        return None


def verdicts(rows: list[dict[str, Any]]) -> dict[str, bool]:
    seq = [r for r in rows if r["mode"] == "sequential"]
    conc = [r for r in rows if r["mode"] != "sequential"]
    return {
        "sequential_p50_le_3ms": all(r["p50_ms"] <= TARGET_P50_MS for r in seq),
        "sequential_p99_le_15ms": all(r["p99_ms"] <= TARGET_P99_MS for r in seq),
        "concurrent_ge_1000_approvals_per_s": all((r["approvals_per_s"] or 0) >= TARGET_APPROVALS_PER_S for r in conc),
        "no_refusals": all(r["refused"] == 0 for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--servers", type=int, default=5, help="cluster size")
    parser.add_argument("--sequential", type=int, help="sequential clients per server (default 500, quick 60)")
    parser.add_argument("--rounds", type=int, help="connections per concurrent client (default 12, quick 2)")
    parser.add_argument("--out", default=str(default_out("approval")), help="where to write the JSON results")
    args = parser.parse_args(argv)
    sequential_count = args.sequential or (60 if args.quick else 500)
    rounds = args.rounds or (2 if args.quick else 12)
    if (reason := node_importable()) is not None:
        print(f"bench.approval: the server cannot start in this checkout: {reason}", file=sys.stderr)
        return 1

    started = time.monotonic()
    env = bench_limits_env(max_clients=4 * (WARMUP + sequential_count + CONCURRENT_CLIENTS * rounds))
    print(f"starting a {args.servers}-server cluster ...", file=sys.stderr, flush=True)
    with bench_cluster(args.servers, env, "bench-approval-") as cluster:
        rows = asyncio.run(measure(cluster, sequential_count, rounds))

    header = ("client on", "mode", "request", "n", "refused", "p50 ms", "p95 ms", "p99 ms", "max ms", "approvals/s")
    table = [
        (
            f"{r['client_on']} ({r['server']})",
            r["mode"],
            r["request"],
            r["count"],
            r["refused"],
            r["p50_ms"],
            r["p95_ms"],
            r["p99_ms"],
            r["max_ms"],
            "-" if r["approvals_per_s"] is None else f"{r['approvals_per_s']:.0f}",
        )
        for r in rows
    ]
    print(format_table(header, table))
    print(f"\ncoordinator {rows[0]['coordinator']}, Raft leader {rows[0]['raft_leader']}")
    met = verdicts(rows)
    print("targets: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in met.items()))
    report = {
        "bench": "approval",
        "command": "python -m bench.approval" + (" --quick" if args.quick else ""),
        "machine": machine_info(),
        "servers": args.servers,
        "sequential_per_server": sequential_count,
        "concurrent_clients": CONCURRENT_CLIENTS,
        "rounds_per_client": rounds,
        "rows": rows,
        "targets": {
            "sequential_p50_ms": TARGET_P50_MS,
            "sequential_p99_ms": TARGET_P99_MS,
            "concurrent_approvals_per_s": TARGET_APPROVALS_PER_S,
        },
        "met": met,
    }
    return finish_report(args.out, report, started)


if __name__ == "__main__":
    sys.exit(main())
