"""Scale: start-up, idle cost, logins, races and failover from 5 to 24 servers (issue 16).

    python -m bench.scale [--sizes 5,6,12,24] [--logins 200] [--races 5] [--failover-rounds 5]
                          [--idle-window 10] [--quick] [--out bench/results/scale.json]

Real `python -m node` processes on loopback, started as users start them (`tests.support.Cluster`), one
size after the other in the same run, so every ratio compares figures taken minutes apart:

- start-up: from the first process start until every server answers /health and all name the
  highest-priority server as coordinator (target at 24: within 30 s);
- idle: after start-up grace, CPU per server (from /proc) and bytes sent per second on the coordination
  and Raft ports (from `ss -ti` byte counters of every established loopback socket), over a window with no
  clients (target at 24: <= 2% of a core per server);
- logins (smallest and largest size): sequential login cycles (connect, newidentity, quit) on the
  lowest-priority server, a non-coordinator and at the largest size a read-only replica; p50 at the
  largest size <= 1.5x that at the smallest;
- races (largest size): one client per server, all ask for the same identity at once, then (logged in
  under distinct names) create the same room at once: exactly one winner each time, every answer within 1 s;
- failover (`bench.failover`'s SIGKILL rounds at the smallest and largest size): median at 24 <= 1.5x
  the 5-server median.
Prints tables and writes JSON with the machine and its load average at every step.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.approval import login_cycles
from bench.beat_hub import hub_floor
from bench.common import LineClient, default_out, finish_report, latency_summary, machine_info, proc_cpu_s
from cluster.timings import ClusterTimings
from tests.support import Cluster, wait_until

TARGETS = {
    "startup_s_at_24": 30.0,
    "idle_cpu_percent_per_server_at_24": 2.0,
    "login_p50_ratio_largest_vs_smallest": 1.5,
    "failover_median_ratio_largest_vs_smallest": 1.5,
    "race_answer_max_s": 1.0,
}
START_TIMEOUT_S = 120.0
RACE_REPLY_S = 5.0
# The probes log in far faster than an interactive client may.
ENV = {"CHATMESH_LIMIT_MESSAGE_RATE_PER_S": "0", "CHATMESH_LIMIT_MAX_CONNECTIONS_PER_IP": "100000"}
_SS_PORTS = re.compile(r"^\S+\s+\S+\s+\S*:(\d+)\s+\S*:(\d+)")
_SS_SENT = re.compile(r"bytes_sent:(\d+)")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def log_step(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load()}] {text}", file=sys.stderr, flush=True)


# -- start-up ----------------------------------------------------------------------------------------------


def start_timed(root: Path, size: int, env: dict[str, str]) -> tuple[Cluster, float]:
    cluster = Cluster(root, size, env=env)
    top = max(cluster.config.servers, key=lambda s: s.priority).server_id
    t0 = time.monotonic()
    try:
        for sid in cluster.ids:
            cluster.start(sid)
        wait_until(lambda: all(cluster.healthy(s) for s in cluster.ids), START_TIMEOUT_S, 0.1, "every server ready")
        cluster.wait_coordinator(top, START_TIMEOUT_S)
    except BaseException:
        cluster.close()
        raise
    return cluster, time.monotonic() - t0


# -- idle cost -----------------------------------------------------------------------------------------------


def socket_bytes_sent() -> dict[tuple[int, int], int]:
    """bytes_sent of every established TCP socket on this machine, keyed by (local port, peer port)."""
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True, text=True, check=True).stdout
    sent: dict[tuple[int, int], int] = {}
    key: tuple[int, int] | None = None
    for line in out.splitlines():
        ports = _SS_PORTS.match(line)
        if ports:
            key = (int(ports.group(1)), int(ports.group(2)))
            continue
        match = _SS_SENT.search(line)
        if key is not None and match:
            sent[key] = int(match.group(1))
            key = None
    return sent


def idle_cost(cluster: Cluster, window_s: float) -> dict[str, Any]:
    """CPU per server and coordination/Raft bytes per second over `window_s` with no client."""
    config = cluster.config
    coordination = {s.coordination_port for s in config.servers}
    raft = {s.raft_port for s in config.servers}
    pids = {sid: int(cluster.procs.procs[sid].pid) for sid in cluster.ids}
    cpu0 = {sid: proc_cpu_s(pid) for sid, pid in pids.items()}
    sent0 = socket_bytes_sent()
    t0 = time.monotonic()
    load0 = load()
    time.sleep(window_s)
    elapsed = time.monotonic() - t0
    cpu = {sid: 100.0 * (proc_cpu_s(pid) - cpu0[sid]) / elapsed for sid, pid in pids.items()}
    sent1 = socket_bytes_sent()
    by_kind = {"coordination": 0, "raft": 0}
    for key, value in sent1.items():
        delta = value - sent0.get(key, 0)
        if key[0] in coordination or key[1] in coordination:
            by_kind["coordination"] += delta
        elif key[0] in raft or key[1] in raft:
            by_kind["raft"] += delta
    statuses = {sid: cluster.status(sid) for sid in cluster.ids}
    coordinator = statuses[cluster.ids[0]]["coordinator"]
    leader = statuses[cluster.ids[0]]["raft"]["leader"]
    n = len(cluster.ids)
    return {
        "window_s": round(elapsed, 2),
        "load_avg_1m": [load0, load()],
        "cpu_percent": {sid: round(v, 2) for sid, v in cpu.items()},
        "cpu_percent_median": round(statistics.median(cpu.values()), 2),
        "cpu_percent_max": round(max(cpu.values()), 2),
        "cpu_percent_busiest": max(cpu, key=lambda s: cpu[s]),
        "cpu_percent_coordinator": round(cpu.get(coordinator or "", float("nan")), 2),
        "cpu_percent_raft_leader": round(cpu.get(leader or "", float("nan")), 2),
        "coordinator": coordinator,
        "raft_leader": leader,
        "voters": list(config.voter_ids),
        "coordination_bytes_per_s_per_server": round(by_kind["coordination"] / elapsed / n),
        "raft_bytes_per_s_per_server": round(by_kind["raft"] / elapsed / n),
    }


# -- logins and races ----------------------------------------------------------------------------------------


def login_p50(cluster: Cluster, server_id: str, count: int, tag: str) -> dict[str, Any]:
    """Sequential login cycles on `server_id`, and the CPU the whole cluster spent per login meanwhile (every
    replica applies every commit: on 2 cores that CPU, not the network, bounds a commit's latency)."""
    pids = [int(cluster.procs.procs[sid].pid) for sid in cluster.ids]
    cpu0 = sum(proc_cpu_s(pid) for pid in pids)
    t0 = time.monotonic()
    phase = asyncio.run(login_cycles(cluster.client_address(server_id), 1, count, tag))
    wall = time.monotonic() - t0
    cluster_cpu = sum(proc_cpu_s(pid) for pid in pids) - cpu0
    summary = latency_summary(phase.latency["login"])
    return {
        "server": server_id,
        "refused": phase.refused["login"],
        "load_avg_1m": load(),
        "cluster_cpu_ms_per_login": round(1000 * cluster_cpu / max(count, 1), 2),
        "cluster_cores_busy": round(cluster_cpu / wall, 2),
        **summary,
    }


async def _race(cluster: Cluster, rounds: int) -> list[dict[str, Any]]:
    results = []
    for r in range(rounds):
        clients = [await LineClient.open(*cluster.client_address(sid)) for sid in cluster.ids]
        try:
            name = f"race{r}"
            replies = await asyncio.gather(
                *(c.request({"type": "newidentity", "identity": name}, "newidentity", RACE_REPLY_S) for c in clients),
                return_exceptions=True,
            )
            identity = _tally(replies)
            # Everyone logged in under a distinct name (a winner of the race keeps its name) ...
            # (a refused client is disconnected by its server, so it connects again).
            for i, (sid, reply) in enumerate(zip(cluster.ids, replies, strict=True)):
                if isinstance(reply, BaseException) or reply[0].get("approved") != "true":
                    await clients[i].close()
                    clients[i] = await LineClient.open(*cluster.client_address(sid))
                    login = {"type": "newidentity", "identity": f"r{r}u{i}"}
                    await clients[i].request(login, "newidentity", RACE_REPLY_S)
            # ... then every one of them creates the same room at once.
            replies = await asyncio.gather(
                *(
                    c.request({"type": "createroom", "roomid": f"raceroom{r}"}, "createroom", RACE_REPLY_S)
                    for c in clients
                ),
                return_exceptions=True,
            )
            room = _tally(replies)
            results.append({"round": r, "identity": identity, "room": room, "load_avg_1m": load()})
        finally:
            for client in clients:
                await client.close()
    return results


def _tally(replies: list[Any]) -> dict[str, Any]:
    answered = [r for r in replies if not isinstance(r, BaseException)]
    return {
        "winners": sum(1 for reply, _ in answered if reply.get("approved") == "true"),
        "answers": len(answered),
        "max_answer_s": round(max((took for _, took in answered), default=float("inf")), 4),
        "errors": [repr(r) for r in replies if isinstance(r, BaseException)],
    }


def timing_env(assignments: list[str]) -> dict[str, str]:
    """`--timing field=value` as the servers' CHATMESH_TIMING_<FIELD> variables (cluster/timings.py)."""
    env = {}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        env[f"CHATMESH_TIMING_{name.strip().upper()}"] = value.strip()
    return env


# -- one size ------------------------------------------------------------------------------------------------


def measure_size(size: int, args: argparse.Namespace, full: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"chatmesh-scale-{size}-"))
    row: dict[str, Any] = {"servers": size}
    try:
        log_step(f"{size} servers: starting")
        cluster, startup_s = start_timed(root, size, {**ENV, **timing_env(args.timing)})
        try:
            row["startup_s"] = round(startup_s, 2)
            row["voters"] = list(cluster.config.voter_ids)
            log_step(f"{size} servers: ready and agreed in {startup_s:.1f} s; idle window")
            # A server declares nobody down in its first startup_grace_s: measure the steady state.
            time.sleep(ClusterTimings().startup_grace_s)
            row["idle"] = idle_cost(cluster, args.idle_window)
            log_step(
                f"{size} servers: idle CPU median {row['idle']['cpu_percent_median']}%, max "
                f"{row['idle']['cpu_percent_max']}% ({row['idle']['cpu_percent_busiest']})"
            )
            # The floor of the coordinator's heartbeats at this size, measured right after (bench.beat_hub).
            interval = ClusterTimings.from_sources({}, args.timing).heartbeat_interval_s
            row["hub_floor"] = hub_floor(size - 1, interval, args.idle_window)
            log_step(f"{size} servers: bare heartbeat hub, {size - 1} peers: {row['hub_floor']['hub_cpu_percent']}%")
            if full:
                lowest = cluster.ids[0]  # lowest priority: never the coordinator, a read-only replica beyond 5
                row["login"] = login_p50(cluster, lowest, args.logins, f"s{size}")
                # What the logins cost beyond the idle burn measured just before (the cluster's idle cores
                # times the phase's wall time, per login).
                idle_cores = sum(row["idle"]["cpu_percent"].values()) / 100
                per_login_s = row["login"]["cluster_cpu_ms_per_login"] / 1000
                wall_per_login = per_login_s / max(row["login"]["cluster_cores_busy"], 1e-9)
                row["login"]["idle_cluster_cores"] = round(idle_cores, 2)
                row["login"]["marginal_cpu_ms_per_login"] = round(1000 * (per_login_s - idle_cores * wall_per_login), 2)
                log_step(
                    f"{size} servers: login p50 {row['login']['p50_ms']:.1f} ms on {lowest}, cluster CPU per login "
                    f"{row['login']['cluster_cpu_ms_per_login']} ms"
                )
                if args.races:
                    row["races"] = asyncio.run(_race(cluster, args.races))
                    winners = [(r["identity"]["winners"], r["room"]["winners"]) for r in row["races"]]
                    log_step(f"{size} servers: races, winners (identity, room) {winners}")
        finally:
            cluster.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if full and args.failover_rounds:
        from bench.failover import bench_size

        log_step(f"{size} servers: failover, {args.failover_rounds} SIGKILL rounds")
        try:
            (failover,) = bench_size(size, args.failover_rounds, ["kill"])
        except AssertionError as exc:  # e.g. the killed server did not come back within bench.failover's bound
            log_step(f"{size} servers: failover run failed: {exc}")
            row["failover_error"] = str(exc)
        else:
            keep = ("approved", "names_freed", "rooms_gone", "problems", "median_load_avg_1m")
            row["failover"] = {k: failover[k] for k in keep}
            row["failover"]["approved_per_round_s"] = [r["approved_s"] for r in failover["per_round"]]
    return row


def verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    small, large = rows[0], rows[-1]
    out: dict[str, Any] = {}
    if large["servers"] >= 24:
        out["startup_s_at_24"] = large["startup_s"] <= TARGETS["startup_s_at_24"]
        # Every server, the busiest too (the coordinator: the star's hub and the Raft leader); the median
        # alongside, as the figure for a member.
        out["idle_cpu_percent_per_server_at_24"] = (
            large["idle"]["cpu_percent_max"] <= TARGETS["idle_cpu_percent_per_server_at_24"]
        )
        out["idle_cpu_percent_median_at_24_met"] = (
            large["idle"]["cpu_percent_median"] <= TARGETS["idle_cpu_percent_per_server_at_24"]
        )
        # The coordinator does what every member does, and its side of the star on top: on this machine it
        # cannot go below the member median plus the bare hub of the same run (bench/beat_hub.py).
        if "hub_floor" in large:
            floor = large["idle"]["cpu_percent_median"] + large["hub_floor"]["hub_cpu_percent"]
            out["coordinator_floor_cpu_percent_at_24"] = round(floor, 2)
            out["coordinator_over_floor_at_24"] = round(large["idle"]["cpu_percent_coordinator"] / floor, 2)
    if "login" in small and "login" in large:
        ratio = large["login"]["p50_ms"] / small["login"]["p50_ms"]
        out["login_p50_ratio"] = round(ratio, 2)
        out["login_p50_ratio_met"] = ratio <= TARGETS["login_p50_ratio_largest_vs_smallest"]
    if "failover" in small and "failover" in large:
        a, b = small["failover"]["approved"]["median_s"], large["failover"]["approved"]["median_s"]
        if a and b:
            out["failover_median_ratio"] = round(b / a, 2)
            out["failover_median_ratio_met"] = b / a <= TARGETS["failover_median_ratio_largest_vs_smallest"]
    if "races" in large:
        races = large["races"]
        out["races_one_winner_every_time"] = all(
            r[k]["winners"] == 1 and r[k]["answers"] == large["servers"] for r in races for k in ("identity", "room")
        )
        worst = max(r[k]["max_answer_s"] for r in races for k in ("identity", "room"))
        out["race_answer_max_s"] = worst
        out["race_answer_max_met"] = worst <= TARGETS["race_answer_max_s"]
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "servers  voters  start s  idle cpu% med/max (busiest)  coord cpu%  bare hub cpu%  coord B/s/srv"
        "  raft B/s/srv  login p50/p99 ms  failover med/max ms"
    ]
    for r in rows:
        i = r["idle"]
        login = f"{r['login']['p50_ms']:.1f} / {r['login']['p99_ms']:.1f}" if "login" in r else "-"
        f = r.get("failover")
        fo = f"{f['approved']['median_s'] * 1000:.0f} / {f['approved']['max_s'] * 1000:.0f}" if f else "-"
        hub = r.get("hub_floor", {}).get("hub_cpu_percent", float("nan"))
        lines.append(
            f"{r['servers']:>7}  {len(r['voters']):>6}  {r['startup_s']:>7.1f}  "
            f"{i['cpu_percent_median']:>6.2f} / {i['cpu_percent_max']:>5.2f} ({i['cpu_percent_busiest']:>3})"
            f"  {i['cpu_percent_coordinator']:>10.2f}  {hub:>13.2f}"
            f"  {i['coordination_bytes_per_s_per_server']:>13}"
            f"  {i['raft_bytes_per_s_per_server']:>12}  {login:>16}  {fo:>19}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5,6,12,24", help="cluster sizes, comma-separated, ascending")
    parser.add_argument("--logins", type=int, default=200, help="sequential login cycles (smallest, largest)")
    parser.add_argument("--races", type=int, default=5, help="identity and room races (largest size)")
    parser.add_argument("--failover-rounds", type=int, default=5, help="SIGKILL rounds (smallest, largest)")
    parser.add_argument("--idle-window", type=float, default=10.0, help="seconds of idle CPU measurement")
    parser.add_argument("--timing", action="append", default=[], help="field=value for every server (repeatable)")
    parser.add_argument("--no-failover", dest="failover_rounds", action="store_const", const=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 and 12 servers, few of everything")
    parser.add_argument("--out", default=str(default_out("scale")))
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.logins, args.races, args.failover_rounds, args.idle_window = "5,12", 30, 2, 1, 3.0
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    if not sizes or sizes[0] < 3:
        parser.error("sizes must be >= 3")
    started = time.monotonic()
    rows = [measure_size(size, args, full=size in (sizes[0], sizes[-1])) for size in sizes]
    print(format_table(rows))
    checks = verdicts(rows)
    for key, value in checks.items():
        print(f"{key}: {value}")
    report = {
        "command": "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "taken_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        # Timings every server inherited from this process's environment (cluster/timings.py), and --timing.
        "timings": {k: v for k, v in os.environ.items() if k.startswith("CHATMESH_TIMING_")} | timing_env(args.timing),
        "targets": TARGETS,
        "verdicts": checks,
        "rows": rows,
    }
    return finish_report(args.out, report, started)


if __name__ == "__main__":
    raise SystemExit(main())
