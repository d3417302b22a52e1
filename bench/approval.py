"""Identity and room approval latency as a client sees it, against the bare Raft commit of the same run.

    python -m bench.approval [--quick] [--sizes 3,5,6] [--persistent-size 5] [--cpus 0-1]
                             [--out bench/results/approval.json]

Each approval crosses the whole cluster: the client's server asks the Fast Bully coordinator, which
commits the claim to the Raft registry (a majority of the servers) before the client hears `approved`.
For every cluster size, a bare registry of the same size (`bench.registry.registry_cluster`: PySyncObj
nodes without the chat server, journal on) runs beside the chat cluster, and blocks of its commit (one
writer at the Raft leader) are measured before, between and after the chunks of each phase. Every figure
is also given as a multiple of the commit p50 measured around it: on a shared machine that ratio is the
figure that holds. The same blocks measure the floors (a commit submitted at a follower, a client's claim
one hop from a bare replica, bare asyncio hops: `CommitProbe`, `bench.hop`) and, once per size, bare
commits with 64 writers against one; each target is then printed beside its floor (`against_floors`).
The bare nodes and hops run at the CPU priority the chat servers take (`match_server_priority`).

Modes:

- persistent (at `--persistent-size` servers): connections stay open until the end, so no release traffic
  runs during a measurement. From a client of the coordinator and of another server, `newidentity` then
  `createroom`; sequential (latency p50/p95/p99/max), then 64 concurrent clients each doing newidentity +
  createroom on several connections in turn (approvals per second, and the latencies under that load);
- login cycle (every size): what a new user does. Connect, `newidentity`, then quit (every other
  cycle) or just close, and the next client starts at once, so the release commit of one session
  competes with the next claim. Sequential, from a client of the coordinator and of another server, then
  64 concurrent cycling clients on the other server. The latency is from the connect to `approved`.

Each row also gives the chat servers' CPU per approval and, in brackets, their event loops' share (main
threads; the rest is PySyncObj's and the admin server's threads). `--cpus` pins the whole run (this process
and every server, bare node and hop it starts) to the CPUs given: with `--cpus 0` every step of a login
waits for the one core, so latency becomes the sum of the CPU each step takes (docs/benchmarks.md, seventh
round, compares one core with two).

Latency is measured in this process (asyncio, raw sockets). Targets (issue 14), client on a
non-coordinator: persistent p50 <= 1.25x the commit p50 (5 servers); login cycle p50 <= 2x and p99 <= 4x
the commit p50 (5 servers), p50 growing < 25% from 3 to 6 servers; 64 concurrent login cycles >= 5x the
sequential approvals per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import (
    ClientClosed,
    LineClient,
    bench_cluster,
    bench_limits_env,
    default_out,
    finish_report,
    format_table,
    latency_summary,
    machine_info,
    main_thread_cpu_s,
    match_server_priority,
    node_importable,
    proc_cpu_s,
    server_pid,
)
from bench.hop import HopFloor, hop_processes
from bench.registry import COMMIT_TIMEOUT_S, INCARNATION, registry_cluster, run_load
from registry import state as rs
from registry.codec import command_to_wire

CONCURRENT_CLIENTS = 64
# Targets of issue 14, as multiples of the bare commit p50 measured in the same run.
TARGET_PERSISTENT_X_COMMIT = 1.25
TARGET_LOGIN_P50_X_COMMIT = 2.0
TARGET_LOGIN_P99_X_COMMIT = 4.0
TARGET_LOGIN_GROWTH_3_TO_6 = 0.25
TARGET_CONCURRENT_X_SEQUENTIAL = 5.0
# Earlier absolute targets (issue 7), still reported.
TARGET_P50_MS = 3.0
TARGET_P99_MS = 15.0
TARGET_APPROVALS_PER_S = 1000.0
# How long a bench waits for Raft leadership to follow the coordinator after the cluster started.
LEADER_WAIT_S = 10.0
# Sequential phases run in this many chunks, with a block of bare commits before, between and after.
CHUNKS = 4
# Commits per writer when the bare registry's 64 writers are timed (enough rounds that ramp-up does not count).
BATCHING_ROUNDS = 20
# Warm-up requests per server before measuring (connections, caches, the Raft pipeline).
WARMUP = 20


class Phase:
    """Latencies and outcomes of one measured phase."""

    def __init__(self, kinds: tuple[str, ...] = ("newidentity", "createroom")) -> None:
        self.latency: dict[str, list[float]] = {kind: [] for kind in kinds}
        self.refused: dict[str, int] = {kind: 0 for kind in kinds}
        self.wall_s = 0.0
        self.cpu_s = 0.0  # CPU of the chat servers meanwhile
        self.loop_cpu_s = 0.0  # of which their event loops' (main threads)

    def record(self, kind: str, reply: dict[str, Any], seconds: float) -> None:
        if reply.get("approved") == "true":
            self.latency[kind].append(seconds)
        else:
            self.refused[kind] += 1

    @property
    def approvals(self) -> int:
        return sum(len(v) for v in self.latency.values())

    def merge(self, other: Phase) -> Phase:
        for kind in self.latency:
            self.latency[kind] += other.latency[kind]
            self.refused[kind] += other.refused[kind]
        self.wall_s += other.wall_s
        self.cpu_s += other.cpu_s
        self.loop_cpu_s += other.loop_cpu_s
        return self


async def claim(client: LineClient, identity: str, room: str, phase: Phase) -> None:
    """newidentity then createroom on one fresh connection. A connection the server closed (a server that
    stalled so long on a busy machine that the cluster fenced it disconnects its clients) counts as
    refused, so the report says so instead of the bench dying."""
    kind = "newidentity"
    try:
        reply, seconds = await client.request({"type": kind, "identity": identity}, kind)
        phase.record(kind, reply, seconds)
        if reply.get("approved") != "true":
            return
        kind = "createroom"
        reply, seconds = await client.request({"type": kind, "roomid": room}, kind)
        phase.record(kind, reply, seconds)
    except (ClientClosed, TimeoutError):
        phase.refused[kind] += 1


async def sequential(address: tuple[str, int], count: int, tag: str, keep: list[LineClient]) -> Phase:
    phase = Phase()
    started = time.perf_counter()
    for i in range(count):
        client = await LineClient.open(*address)
        keep.append(client)
        await claim(client, f"i{tag}{i}", f"r{tag}{i}", phase)
    phase.wall_s = time.perf_counter() - started
    return phase


async def concurrent(address: tuple[str, int], clients: int, rounds: int, tag: str, keep: list[LineClient]) -> Phase:
    """`clients` workers, each `rounds` times newidentity + createroom on a connection opened beforehand."""
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
    phase.wall_s = time.perf_counter() - started
    return phase


async def login_cycle(address: tuple[str, int], identity: str, quit_first: bool, phase: Phase) -> None:
    """Connect, log in, leave (quit then close, or just close): what a user who drops by does. The latency
    is from the connect to `approved`; leaving does not wait for the server, so the release commit of this
    session overlaps the next login."""
    started = time.perf_counter()
    client = await LineClient.open(*address)
    try:
        reply, _ = await client.request({"type": "newidentity", "identity": identity}, "newidentity")
        phase.record("login", reply, time.perf_counter() - started)
        if quit_first and reply.get("approved") == "true":
            client.send({"type": "quit"})
    except (ClientClosed, TimeoutError):
        phase.refused["login"] += 1
    finally:
        await client.close()


async def login_cycles(address: tuple[str, int], workers: int, per_worker: int, tag: str) -> Phase:
    """`workers` clients cycling at once, `per_worker` login cycles each, one after another."""
    phase = Phase(("login",))

    async def worker(w: int) -> None:
        for i in range(per_worker):
            await login_cycle(address, f"l{tag}{w}x{i}", i % 2 == 0, phase)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for w in range(workers):
            tasks.create_task(worker(w))
    phase.wall_s = time.perf_counter() - started
    return phase


def rows_of(where: str, mode: str, phase: Phase, commit: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for kind, seconds in phase.latency.items():
        summary = latency_summary(seconds)
        rows.append(
            {
                "client_on": where,
                "mode": mode,
                "request": kind,
                **summary,
                "refused": phase.refused[kind],
                "approvals_per_s": phase.approvals / phase.wall_s if phase.wall_s else None,
                # The bare commit measured right before, between and right after this phase's chunks.
                "commit_p50_ms": commit["p50_ms"],
                "commit_count": commit["count"],
                "p50_x_commit": summary["p50_ms"] / commit["p50_ms"],
                "p99_x_commit": summary["p99_ms"] / commit["p50_ms"],
                # CPU of all chat servers per approval, against the bare nodes' CPU per commit.
                "server_cpu_ms_per_approval": 1000.0 * phase.cpu_s / max(1, phase.approvals),
                # Of which the chat servers' event loops (the rest: their PySyncObj and admin threads).
                "server_loop_cpu_ms_per_approval": 1000.0 * phase.loop_cpu_s / max(1, phase.approvals),
                "commit_cpu_ms": commit["cpu_ms_per_commit"],
                "cpu_x_commit": 1000.0 * phase.cpu_s / max(1, phase.approvals) / commit["cpu_ms_per_commit"],
                **floor_of(where, mode, commit),
            }
        )
    return rows


def floor_of(where: str, mode: str, commit: dict[str, Any]) -> dict[str, Any]:
    """What no design that keeps the registry in Raft can beat on this machine, from the floors measured
    around the same phase (medians). The smallest whole approval is a client one hop from a process that
    holds a replica and commits the claim (`CommitProbe.client_submits`): at the Raft leader for a client
    of the coordinator; for a client of another server either at its own replica (a follower: PySyncObj
    forwards to the leader) or, one more bare hop away, at the leader, whichever is less. A login cycle
    adds a fresh connection (connect + one exchange, less one exchange on an open connection). The tail
    floor is the p99 of that smallest approval. Concurrent phases have no latency floor (their bound is
    throughput: `CommitProbe.batching_floor`)."""
    floors = commit["floors"]
    if "concurrent" in mode:
        return {}
    leader = commit["p50_ms"]
    hop1 = floors["hop1"]["p50_ms"]
    extra_hop = floors["hop2"]["p50_ms"] - hop1
    connect = floors["connect_hop1"]["p50_ms"] - hop1 if mode == "login cycle" else 0.0
    at_leader, at_follower = floors["client_leader_commit"], floors["client_follower_commit"]
    if where == "coordinator":
        floor_ms, tail_ms, via = connect + at_leader["p50_ms"], at_leader["p99_ms"], "client -> leader's replica"
    elif at_follower["p50_ms"] <= at_leader["p50_ms"] + extra_hop:
        floor_ms, tail_ms, via = connect + at_follower["p50_ms"], at_follower["p99_ms"], "client -> follower's replica"
    else:
        floor_ms, tail_ms = connect + extra_hop + at_leader["p50_ms"], extra_hop + at_leader["p99_ms"]
        via = "client -> bare hop -> leader's replica"
    return {
        "floor_p50_ms": floor_ms,
        "floor_x_commit": floor_ms / leader,
        "floor_p99_x_commit": (connect + tail_ms) / leader,
        "floor_via": via,
        "follower_commit_p50_ms": floors["follower_commit"]["p50_ms"],
        "follower_commit_x_commit": floors["follower_commit"]["p50_ms"] / leader,
        "client_leader_commit_p50_ms": at_leader["p50_ms"],
        "client_follower_commit_p50_ms": at_follower["p50_ms"],
        "hop1_p50_ms": hop1,
        "hop2_p50_ms": floors["hop2"]["p50_ms"],
        "connect_hop1_p50_ms": floors["connect_hop1"]["p50_ms"],
        "commit_p99_x_commit": commit["p99_ms"] / leader,
    }


def log_step(text: str) -> None:
    print(f"  {text} ...", file=sys.stderr, flush=True)


class CommitProbe:
    """The bare registry commit of the same size, measured in blocks between the chat phases (both clusters
    run side by side), so that a phase is compared with commits taken seconds before and after it. Also the
    CPU both sides use: the chat servers during each chunk, the bare nodes during each block (from /proc),
    which a busy machine disturbs far less than latency.

    Each block also measures the floors (`bench.hop`): the same number of commits submitted at a Raft
    follower (PySyncObj forwards them to the leader: one more hop each way), and sequential round trips
    through one and two bare asyncio processes."""

    def __init__(
        self, nodes: Any, leader: str, follower: str, per_block: int, chat_pids: list[int], hops: HopFloor
    ) -> None:
        self.nodes = nodes
        self.leader = leader
        self.follower = follower
        self.per_block = per_block
        self.chat_pids = chat_pids
        self.hops = hops
        self.node_pids = [int(proc.pid) for proc in nodes.procs.procs.values()]
        self.blocks = 0
        self.all_ms: list[float] = []
        self.all_cpu_s = 0.0
        self.all_floor: dict[str, list[float]] = {key: [] for key in FLOOR_KEYS}
        self.last: tuple[list[float], float, dict[str, list[float]]] = ([], 0.0, {})
        self.batching: dict[str, Any] = {}
        self._control: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    async def block(self) -> tuple[list[float], float, dict[str, list[float]]]:
        """One block of commits at the leader: (latencies in ms, CPU seconds the bare nodes used, the floors'
        latencies in ms: commits at a follower, one-hop and two-hop round trips)."""
        self.blocks += 1
        cpu0 = cpu_s(self.node_pids)
        result = await asyncio.to_thread(run_load, self.nodes, self.leader, self.per_block, 1, f"p{self.blocks}x", True)
        cpu = cpu_s(self.node_pids) - cpu0
        follower = await asyncio.to_thread(
            run_load, self.nodes, self.follower, self.per_block, 1, f"f{self.blocks}x", True
        )
        floor = {
            "follower_commit": list(follower["ms"]),
            "client_leader_commit": await self.client_submits(self.leader, f"cl{self.blocks}x"),
            "client_follower_commit": await self.client_submits(self.follower, f"cf{self.blocks}x"),
            "hop1": await self.hops.round_trips(1, self.per_block),
            "hop2": await self.hops.round_trips(2, self.per_block),
            "connect_hop1": await self.hops.connect_cycles(self.per_block),
        }
        self.last = (list(result["ms"]), cpu, floor)
        self.all_ms += self.last[0]
        self.all_cpu_s += cpu
        for key, values in floor.items():
            self.all_floor[key] += values
        return self.last

    async def client_submits(self, server_id: str, prefix: str) -> list[float]:
        """The smallest whole approval: a client one hop from a bare node asks it to commit a claim (the
        node's control port, `registry_node.py`), timed at the client, sequentially; in ms. The node serves
        the client from the same loop that submits, like a chat server with its replica in-process."""
        if server_id not in self._control:
            port = self.nodes.control_ports[server_id]
            self._control[server_id] = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        reader, writer = self._control[server_id]
        ms: list[float] = []
        for i in range(self.per_block):
            command = rs.ClaimIdentity(f"{prefix}-{i}", f"{prefix}{i}", server_id, INCARNATION)
            request = {"op": "submit", "command": command_to_wire(command), "timeout": COMMIT_TIMEOUT_S}
            line = json.dumps(request).encode() + b"\n"
            started = time.perf_counter()
            writer.write(line)
            reply = json.loads(await reader.readline())
            if reply.get("ok"):
                ms.append((time.perf_counter() - started) * 1000.0)
        return ms

    async def close(self) -> None:
        for _, writer in self._control.values():
            writer.close()
        self._control.clear()

    async def around(self, chunks: int, run: Callable[[int], Awaitable[Phase]]) -> tuple[Phase, dict[str, Any]]:
        """`run(i)` for each chunk, a commit block after each; the phase merged (with the chat servers' CPU)
        and the commits around it (the block before the first chunk included), with the floors."""
        merged: Phase | None = None
        ms, cpu, floor = self.last if self.last[0] else await self.block()
        commits, commit_cpu = list(ms), cpu
        floors = {key: list(values) for key, values in floor.items()}
        for i in range(chunks):
            cpu0, loops0 = cpu_s(self.chat_pids), loops_cpu_s(self.chat_pids)
            phase = await run(i)
            phase.cpu_s = cpu_s(self.chat_pids) - cpu0
            phase.loop_cpu_s = loops_cpu_s(self.chat_pids) - loops0
            merged = phase if merged is None else merged.merge(phase)
            ms, cpu, floor = await self.block()
            commits += ms
            commit_cpu += cpu
            for key, values in floor.items():
                floors[key] += values
        assert merged is not None
        summary = latency_summary([m / 1000.0 for m in commits])
        return merged, {
            **summary,
            "cpu_ms_per_commit": 1000.0 * commit_cpu / max(1, len(commits)),
            "floors": floor_summary(floors),
        }

    async def batching_floor(self, sequential: int, concurrent: int) -> dict[str, Any]:
        """Bare commits per second at the leader with CONCURRENT_CLIENTS writers against one sequential writer,
        back to back (the registry batches a loop turn's commands into one log entry): the most concurrency
        can buy when the commit is all there is, and the bare nodes' CPU per commit under that load."""
        out: dict[str, Any] = {"count": {"1": sequential, str(CONCURRENT_CLIENTS): concurrent}}
        for writers, count in ((1, sequential), (CONCURRENT_CLIENTS, concurrent)):
            cpu0 = cpu_s(self.node_pids)
            result = await asyncio.to_thread(run_load, self.nodes, self.leader, count, writers, f"b{writers}x")
            used = cpu_s(self.node_pids) - cpu0
            out[f"writers_{writers}"] = {
                "commits_per_s": result["commits_per_s"],
                "p50_ms": result["p50_ms"],
                "errors": result["errors"],
                "cpu_ms_per_commit": 1000.0 * used / max(1, result["commits"]),
            }
        one, many = out["writers_1"]["commits_per_s"], out[f"writers_{CONCURRENT_CLIENTS}"]["commits_per_s"]
        out["concurrent_x_sequential"] = many / one if one else float("nan")
        self.batching = out
        return out


FLOOR_KEYS = ("follower_commit", "client_leader_commit", "client_follower_commit", "hop1", "hop2", "connect_hop1")


def floor_summary(floors: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {key: latency_summary([m / 1000.0 for m in values]) for key, values in floors.items()}


def cpu_s(pids: list[int]) -> float:
    return sum(proc_cpu_s(pid) for pid in pids)


def loops_cpu_s(pids: list[int]) -> float:
    return sum(main_thread_cpu_s(pid) for pid in pids)


def parse_cpus(text: str) -> set[int]:
    """`0`, `0,1` or `0-3`: the CPUs to run on; ValueError naming what is wrong."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"--cpus {text!r}: expected CPU numbers like 0 or 0,1 or 0-3")
        cpus.update(range(int(first), int(last or first) + 1))
    if not cpus:
        raise ValueError(f"--cpus {text!r}: no CPU")
    return cpus


async def measure(cluster: Any, counts: dict[str, int], persistent: bool, probe: CommitProbe) -> list[dict[str, Any]]:
    coordinator = cluster.wait_coordinator()
    other = next(s for s in cluster.ids if s != coordinator)
    leader = await wait_raft_leader(cluster, coordinator)
    keep: list[LineClient] = []
    rows: list[dict[str, Any]] = []
    chunks = CHUNKS

    def add(where: str, mode: str, measured: tuple[Phase, dict[str, Any]]) -> None:
        rows.extend(rows_of(where, mode, *measured))

    try:
        for where, server_id in (("coordinator", coordinator), ("other", other)):
            address = cluster.client_address(server_id)
            tag = where[0]
            await sequential(address, WARMUP, f"w{tag}", keep)
            log_step(f"{where} ({server_id}): login cycle x{counts['login']}")
            per_chunk = max(1, counts["login"] // chunks)

            async def cycles(i: int, address: tuple[str, int] = address, tag: str = tag, n: int = per_chunk) -> Phase:
                return await login_cycles(address, 1, n, f"s{tag}{i}x")

            add(where, "login cycle", await probe.around(chunks, cycles))
            if not persistent:
                continue
            log_step(f"{where} ({server_id}): sequential x{counts['sequential']}")
            per_chunk = max(1, counts["sequential"] // chunks)

            async def claims(i: int, address: tuple[str, int] = address, tag: str = tag, n: int = per_chunk) -> Phase:
                return await sequential(address, n, f"s{tag}{i}x", keep)

            add(where, "sequential", await probe.around(chunks, claims))
            log_step(f"{where} ({server_id}): {CONCURRENT_CLIENTS} concurrent x{counts['rounds']}")

            async def many(i: int, address: tuple[str, int] = address, tag: str = tag) -> Phase:
                return await concurrent(address, CONCURRENT_CLIENTS, counts["rounds"], f"k{tag}", keep)

            add(where, f"{CONCURRENT_CLIENTS} concurrent", await probe.around(1, many))
        log_step(f"other ({other}): login cycle, {CONCURRENT_CLIENTS} concurrent x{counts['cycles']}")
        other_address = cluster.client_address(other)

        async def many_cycles(i: int) -> Phase:
            return await login_cycles(other_address, CONCURRENT_CLIENTS, counts["cycles"], "k")

        add("other", f"login cycle, {CONCURRENT_CLIENTS} concurrent", await probe.around(1, many_cycles))
        log_step(f"bare commits: {CONCURRENT_CLIENTS} writers against 1")
        await probe.batching_floor(counts["commits"] * 5, CONCURRENT_CLIENTS * BATCHING_ROUNDS)
    finally:
        await asyncio.gather(*(c.close() for c in keep), return_exceptions=True)
    for row in rows:
        row["coordinator"] = coordinator
        row["raft_leader"] = leader
        row["server"] = coordinator if row["client_on"] == "coordinator" else other
    return rows


async def wait_raft_leader(cluster: Any, coordinator: str) -> str | None:
    """Steady state: Raft leadership follows the coordinator within a hand-over interval or two of the
    election. Measure only once it has (or say who leads after LEADER_WAIT_S)."""
    deadline = time.monotonic() + LEADER_WAIT_S
    while (leader := raft_leader(cluster, coordinator)) != coordinator and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if leader != coordinator:
        print(f"  the Raft leader is {leader}, not the coordinator {coordinator}", file=sys.stderr, flush=True)
    return leader


def raft_leader(cluster: Any, server_id: str) -> str | None:
    """The Raft leader as `server_id` sees it: approvals from a coordinator that is not also the leader
    take two more hops (the forward to the leader and the commit notice back)."""
    try:
        return cluster.status(server_id, timeout=5.0).get("raft", {}).get("leader")
    except Exception:
        return None


def measure_size(size: int, counts: dict[str, int], persistent: bool, env: dict[str, str]) -> dict[str, Any]:
    """One cluster size: the bare registry and the chat cluster side by side, measured in turns."""
    print(f"starting {size} bare registry nodes and a {size}-server chat cluster ...", file=sys.stderr, flush=True)
    with (
        registry_cluster(size) as (nodes, leader, follower),
        bench_cluster(size, env, "bench-approval-") as cluster,
        hop_processes(env) as hops,
    ):
        node_pids = [int(proc.pid) for proc in nodes.procs.procs.values()]
        match_server_priority(node_pids + hops.pids, env)
        run_load(nodes, leader, 50, 1, "warm")
        run_load(nodes, follower, 50, 1, "warmf")
        chat_pids = [server_pid(cluster, s) for s in cluster.ids]
        probe = CommitProbe(nodes, leader, follower, counts["commits"], chat_pids, hops)

        async def run() -> list[dict[str, Any]]:
            try:
                return await measure(cluster, counts, persistent, probe)
            finally:
                await hops.close()
                await probe.close()

        rows = asyncio.run(run())
    commit = latency_summary([ms / 1000.0 for ms in probe.all_ms])
    commit["cpu_ms_per_commit"] = 1000.0 * probe.all_cpu_s / max(1, len(probe.all_ms))
    for row in rows:
        row["servers"] = size
    return {"servers": size, "commit": commit, "floors": floor_summary(probe.all_floor), "batching": probe.batching,
            "rows": rows}  # fmt: skip


def find(rows: list[dict[str, Any]], size: int, mode: str, request: str, where: str = "other") -> dict[str, Any] | None:
    return next(
        (r for r in rows if (r["servers"], r["mode"], r["request"], r["client_on"]) == (size, mode, request, where)),
        None,
    )


def verdicts(rows: list[dict[str, Any]], persistent_size: int) -> dict[str, bool | None]:
    """Issue 14's targets (None: not measured in this run) and issue 7's absolute ones."""
    met: dict[str, bool | None] = {}
    persistent = find(rows, persistent_size, "sequential", "newidentity")
    met["persistent_other_p50_le_1.25x_commit"] = (
        None if persistent is None else persistent["p50_x_commit"] <= TARGET_PERSISTENT_X_COMMIT
    )
    login5 = find(rows, 5, "login cycle", "login")
    met["login_other_p50_le_2x_commit"] = (
        None if login5 is None else login5["p50_x_commit"] <= TARGET_LOGIN_P50_X_COMMIT
    )
    met["login_other_p99_le_4x_commit"] = (
        None if login5 is None else login5["p99_x_commit"] <= TARGET_LOGIN_P99_X_COMMIT
    )
    login3, login6 = find(rows, 3, "login cycle", "login"), find(rows, 6, "login cycle", "login")
    met["login_p50_growth_3_to_6_lt_25pct"] = (
        None
        if login3 is None or login6 is None
        else login6["p50_ms"] < (1 + TARGET_LOGIN_GROWTH_3_TO_6) * login3["p50_ms"]
    )
    growth = []
    for size in sorted({r["servers"] for r in rows}):
        one = find(rows, size, "login cycle", "login")
        many = find(rows, size, f"login cycle, {CONCURRENT_CLIENTS} concurrent", "login")
        if one and many and one["approvals_per_s"] and many["approvals_per_s"]:
            growth.append(many["approvals_per_s"] >= TARGET_CONCURRENT_X_SEQUENTIAL * one["approvals_per_s"])
    met["login_64_concurrent_ge_5x_sequential"] = all(growth) if growth else None
    seq = [r for r in rows if r["mode"] == "sequential"]
    conc = [r for r in rows if r["mode"] == f"{CONCURRENT_CLIENTS} concurrent"]
    if seq:
        met["sequential_p50_le_3ms"] = all(r["p50_ms"] <= TARGET_P50_MS for r in seq)
        met["sequential_p99_le_15ms"] = all(r["p99_ms"] <= TARGET_P99_MS for r in seq)
    if conc:
        met["concurrent_ge_1000_approvals_per_s"] = all(
            (r["approvals_per_s"] or 0) >= TARGET_APPROVALS_PER_S for r in conc
        )
    met["no_refusals"] = all(r["refused"] == 0 for r in rows)
    return met


def against_floors(per_size: list[dict[str, Any]], persistent_size: int, cores: int) -> list[dict[str, Any]]:
    """Each issue-14 target beside what was measured and the floor measured in the same run (`floor_of`,
    `CommitProbe.batching_floor`). `reachable` is False when the floor alone is past the target: then no
    design that keeps the registry in Raft meets it on this machine."""
    rows = [row for result in per_size for row in result["rows"]]
    out: list[dict[str, Any]] = []

    def line(target: str, limit: float, measured: float | None, floor: float | None, floor_is: str) -> None:
        if measured is None or floor is None:
            return
        out.append({"target": target, "limit": limit, "measured": measured, "floor": floor, "floor_is": floor_is,
                    "reachable": floor <= limit})  # fmt: skip

    persistent = find(rows, persistent_size, "sequential", "newidentity")
    if persistent is not None:
        line(f"persistent approval p50 x commit, {persistent_size} servers, client of another server",
             TARGET_PERSISTENT_X_COMMIT, persistent["p50_x_commit"], persistent["floor_x_commit"],
             persistent["floor_via"])  # fmt: skip
    login5 = find(rows, 5, "login cycle", "login")
    if login5 is not None:
        line("login cycle p50 x commit, 5 servers", TARGET_LOGIN_P50_X_COMMIT, login5["p50_x_commit"],
             login5["floor_x_commit"], login5["floor_via"])  # fmt: skip
        line("login cycle p99 x commit, 5 servers", TARGET_LOGIN_P99_X_COMMIT, login5["p99_x_commit"],
             login5["floor_p99_x_commit"], f"p99 of {login5['floor_via']}")  # fmt: skip
    login3, login6 = find(rows, 3, "login cycle", "login"), find(rows, 6, "login cycle", "login")
    if login3 is not None and login6 is not None:
        line("login cycle p50 growth 3 -> 6 servers", TARGET_LOGIN_GROWTH_3_TO_6,
             login6["p50_ms"] / login3["p50_ms"] - 1, login6["floor_p50_ms"] / login3["floor_p50_ms"] - 1,
             "growth of the floor (bare commit + hops) from 3 to 6 nodes")  # fmt: skip
    for result in per_size:
        size = result["servers"]
        one = find(rows, size, "login cycle", "login")
        many = find(rows, size, f"login cycle, {CONCURRENT_CLIENTS} concurrent", "login")
        batching = result.get("batching") or {}
        if not (one and many and one["approvals_per_s"] and many["approvals_per_s"] and batching):
            continue
        measured = many["approvals_per_s"] / one["approvals_per_s"]
        # All cores busy with nothing but the chat servers' work per login, against the sequential rate.
        cpu_ceiling = cores / (many["server_cpu_ms_per_approval"] / 1000.0) / one["approvals_per_s"]
        line(f"login cycle {CONCURRENT_CLIENTS} concurrent x sequential, {size} servers",
             TARGET_CONCURRENT_X_SEQUENTIAL, measured, cpu_ceiling,
             f"ceiling: {cores} cores / chat servers' CPU per login, over the sequential rate; bare commits "
             f"{CONCURRENT_CLIENTS} writers / 1 writer {batching['concurrent_x_sequential']:.1f}x")  # fmt: skip
        out[-1]["batching_x"] = batching["concurrent_x_sequential"]
        out[-1]["reachable"] = cpu_ceiling >= TARGET_CONCURRENT_X_SEQUENTIAL
    return out


def format_floor(entry: dict[str, Any]) -> str:
    growth = "growth" in entry["target"]
    fmt = (lambda v: f"{v:+.0%}") if growth else (lambda v: f"{v:.2f}x")
    if growth:
        # A fixed cost per login on top of the commit dilutes its growth: a slower design can grow less than
        # the floor does, so a floor past the target only says a design *at* the floor misses it.
        verdict = "a design at the floor meets it" if entry["reachable"] else "a design at the floor misses it"
    else:
        verdict = "within reach here" if entry["reachable"] else "NOT reachable on this machine by any such design"
    return (f"  {entry['target']}: measured {fmt(entry['measured'])}, floor {fmt(entry['floor'])} "
            f"[{entry['floor_is']}], target {'<' if growth else '>=' if 'concurrent' in entry['target'] else '<='} "
            f"{fmt(entry['limit'])}: {verdict}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--sizes", default="3,5,6", help="cluster sizes for the login cycle, comma-separated")
    parser.add_argument("--persistent-size", type=int, default=5, help="cluster size of the persistent modes (0: none)")
    parser.add_argument(
        "--sequential", type=int, help="persistent sequential clients per server (default 500, quick 60)"
    )
    parser.add_argument("--rounds", type=int, help="connections per persistent concurrent client (default 12, quick 2)")
    parser.add_argument("--logins", type=int, help="sequential login cycles per server (default 400, quick 100)")
    parser.add_argument("--cycles", type=int, help="login cycles per concurrent client (default 12, quick 3)")
    parser.add_argument("--commits", type=int, help="bare commits per block between phases (default 100, quick 40)")
    parser.add_argument(
        "--cpus", help="run the whole bench (servers, bare nodes, clients) on these CPUs only, e.g. 0 or 0-1"
    )
    parser.add_argument("--out", default=str(default_out("approval")), help="where to write the JSON results")
    args = parser.parse_args(argv)
    if args.cpus:
        # Before any process starts: every server, bare node and hop inherits the affinity.
        try:
            os.sched_setaffinity(0, parse_cpus(args.cpus))
        except ValueError as exc:
            print(f"bench.approval: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            usable = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
            print(f"bench.approval: --cpus {args.cpus}: {exc.strerror} (usable here: {usable})", file=sys.stderr)
            return 2
    counts = {
        "sequential": args.sequential or (60 if args.quick else 500),
        "rounds": args.rounds or (2 if args.quick else 12),
        "login": args.logins or (100 if args.quick else 400),
        "cycles": args.cycles or (3 if args.quick else 12),
        "commits": args.commits or (40 if args.quick else 100),
    }
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.persistent_size and args.persistent_size not in sizes:
        sizes.append(args.persistent_size)
    if (reason := node_importable()) is not None:
        print(f"bench.approval: the server cannot start in this checkout: {reason}", file=sys.stderr)
        return 1

    started = time.monotonic()
    opened = WARMUP + counts["sequential"] + CONCURRENT_CLIENTS * max(counts["rounds"], counts["cycles"])
    env = bench_limits_env(max_clients=4 * opened)
    per_size = [measure_size(size, counts, size == args.persistent_size, env) for size in sorted(sizes)]
    rows = [row for result in per_size for row in result["rows"]]

    header = ("servers", "client on", "mode", "request", "n", "refused", "p50 ms", "p99 ms", "max ms",
              "p50/commit", "p99/commit", "cpu/commit", "cpu ms (loops)", "approvals/s")  # fmt: skip
    table = [
        (
            r["servers"],
            f"{r['client_on']} ({r['server']})",
            r["mode"],
            r["request"],
            r["count"],
            r["refused"],
            r["p50_ms"],
            r["p99_ms"],
            r["max_ms"],
            f"{r['p50_x_commit']:.2f}x",
            f"{r['p99_x_commit']:.2f}x",
            f"{r['cpu_x_commit']:.2f}x",
            f"{r['server_cpu_ms_per_approval']:.2f} ({r['server_loop_cpu_ms_per_approval']:.2f})",
            "-" if r["approvals_per_s"] is None else f"{r['approvals_per_s']:.0f}",
        )
        for r in rows
    ]
    print(format_table(header, table))
    print()
    for result in per_size:
        c = result["commit"]
        first = result["rows"][0]
        print(f"{result['servers']} servers: bare commit p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms "
              f"({c['count']} commits); coordinator {first['coordinator']}, "
              f"Raft leader {first['raft_leader']}")  # fmt: skip
    for result in per_size:
        f, b = result["floors"], result["batching"]
        print(f"{result['servers']} servers, floors: commit at a follower p50 {f['follower_commit']['p50_ms']:.2f} ms; "
              f"a client's claim at the leader's replica {f['client_leader_commit']['p50_ms']:.2f} ms, "
              f"at a follower's {f['client_follower_commit']['p50_ms']:.2f} ms; "
              f"one hop {f['hop1']['p50_ms']:.3f} ms, two hops {f['hop2']['p50_ms']:.3f} ms, "
              f"connect + one hop {f['connect_hop1']['p50_ms']:.3f} ms; bare commits/s 1 writer "
              f"{b['writers_1']['commits_per_s']:.0f}, {CONCURRENT_CLIENTS} writers "
              f"{b[f'writers_{CONCURRENT_CLIENTS}']['commits_per_s']:.0f} "
              f"({b['concurrent_x_sequential']:.1f}x)")  # fmt: skip
    cores = machine_info()["usable_cores"] or 1
    floors = against_floors(per_size, args.persistent_size, cores)
    print("against the floors of this run (medians):")
    for entry in floors:
        print(format_floor(entry))
    met = verdicts(rows, args.persistent_size)
    print("targets: " + ", ".join(f"{k} {'-' if v is None else 'MET' if v else 'NOT MET'}" for k, v in met.items()))
    command = "python -m bench.approval" + (" --quick" if args.quick else "")
    command += f" --cpus {args.cpus}" if args.cpus else ""
    report = {
        "bench": "approval",
        "command": command,
        "machine": machine_info(),
        "sizes": sorted(sizes),
        "persistent_size": args.persistent_size,
        "counts": counts,
        "concurrent_clients": CONCURRENT_CLIENTS,
        "commit": {str(r["servers"]): r["commit"] for r in per_size},
        "floors": {str(r["servers"]): {**r["floors"], "batching": r["batching"]} for r in per_size},
        "against_floors": floors,
        "rows": rows,
        "targets": {
            "persistent_p50_x_commit": TARGET_PERSISTENT_X_COMMIT,
            "login_p50_x_commit": TARGET_LOGIN_P50_X_COMMIT,
            "login_p99_x_commit": TARGET_LOGIN_P99_X_COMMIT,
            "login_p50_growth_3_to_6": TARGET_LOGIN_GROWTH_3_TO_6,
            "concurrent_x_sequential": TARGET_CONCURRENT_X_SEQUENTIAL,
            "sequential_p50_ms": TARGET_P50_MS,
            "sequential_p99_ms": TARGET_P99_MS,
            "concurrent_approvals_per_s": TARGET_APPROVALS_PER_S,
        },
        "met": met,
    }
    return finish_report(args.out, report, started)


if __name__ == "__main__":
    sys.exit(main())
