"""Many concurrent logged-in clients on one server: do they all get in, does one message reach them all,
and what does each client cost the server in memory.

    python -m bench.connections [--quick] [--clients 10000] [--out bench/results/connections.json]

One server (a one-server cluster, `python -m node`); this process opens `--clients` connections (raising
its own and the server's open-file limit first) and logs every one in with `newidentity`, at most
`--concurrency` logins in flight. Every login lands in MainHall and its roomchange goes to every member,
so the clients receive N(N+1)/2 roomchanges in all; the bench waits until every one has arrived, lets the
server settle, and reads its resident memory (VmRSS of /proc/<pid>/status). Memory per client is the RSS
growth from the idle server to the server holding every client, divided by the clients (it includes the
registry entry of each identity). Then the first client sends one message in MainHall and the bench times
its arrival at every other client.

Targets (issue 7): 10,000 clients, <= 50 KiB per client. A deadline bounds the whole run; a run that
does not finish reports how far it got.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from bench.common import (
    bench_cluster,
    bench_limits_env,
    default_out,
    finish_report,
    format_table,
    latency_summary,
    machine_info,
    node_importable,
    proc_cpu_s,
    proc_status_kib,
    raise_fd_limit,
    server_pid,
)

TARGET_CLIENTS = 10_000
TARGET_KIB_PER_CLIENT = 50.0
# Descriptors this process needs beyond one per client.
SPARE_FDS = 200
# One login (connect + approval) at most.
LOGIN_TIMEOUT_S = 30.0
# The server is considered settled when its RSS moved less than this between two reads.
SETTLE_KIB = 256
SETTLE_INTERVAL_S = 0.5
# How long the server's CPU use is sampled while it holds every client and nobody talks.
IDLE_SAMPLE_S = 2.0


class Member(asyncio.Protocol):
    """One logged-in client: reads everything (counting lines), watches for the final message."""

    __slots__ = ("bench", "transport", "head", "reply", "tail", "seen")

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.transport: asyncio.Transport | None = None
        self.head = b""  # bytes before the first newline (the newidentity reply)
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.tail = b""  # the last bytes of the previous chunk, so a marker split in two is still found
        self.seen = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        bench = self.bench
        bench.lines += data.count(b"\n")
        if not self.reply.done():
            self.head += data
            if b"\n" in self.head:
                self.reply.set_result(self.head.split(b"\n", 1)[0])
                self.head = b""
        marker = bench.marker
        if marker is not None and not self.seen:
            if marker in self.tail + data:
                self.seen = True
                bench.seen += 1
                if bench.seen >= bench.expected_seen:
                    bench.all_seen.set()
            self.tail = data[-len(marker) :]

    def connection_lost(self, exc: Exception | None) -> None:
        self.bench.lost += 1
        if not self.reply.done():
            self.reply.set_exception(ConnectionError("closed before the newidentity reply"))


class Bench:
    def __init__(self, host: str, port: int, pid: int, clients: int, concurrency: int, deadline: float) -> None:
        self.host = host
        self.port = port
        self.pid = pid
        self.clients = clients
        self.concurrency = concurrency
        self.deadline = deadline
        self.members: list[Member] = []
        self.lines = 0
        self.lost = 0
        self.marker: bytes | None = None
        self.seen = 0
        self.expected_seen = 0
        self.all_seen = asyncio.Event()
        self.login_s: list[float] = []
        self.refused = 0
        self.failed = 0
        self.rss_samples: list[tuple[int, int]] = []

    def left_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def login(self, index: int, gate: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        async with gate:
            if self.left_s() <= 0:
                self.failed += 1
                return
            member = Member(self)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(min(LOGIN_TIMEOUT_S, self.left_s())):
                    await loop.create_connection(lambda: member, self.host, self.port)
                    assert member.transport is not None
                    member.transport.write(b'{"type":"newidentity","identity":"m%05d"}\n' % index)
                    reply = json.loads(await member.reply)
            except (TimeoutError, OSError, ValueError):
                self.failed += 1
                if member.transport is not None:
                    member.transport.abort()
                return
            if reply.get("approved") != "true":
                self.refused += 1
                return
            self.login_s.append(time.perf_counter() - started)
            self.members.append(member)
            approved = len(self.members)
            if approved % 1000 == 0:
                self.rss_samples.append((approved, proc_status_kib(self.pid)))
                print(f"  {approved} clients logged in", file=sys.stderr, flush=True)

    async def settle(self, expected_lines: int) -> bool:
        """Wait until every expected line arrived and the server's RSS stopped moving."""
        while self.lines < expected_lines and self.left_s() > 0:
            await asyncio.sleep(0.1)
        previous = proc_status_kib(self.pid)
        while self.left_s() > 0:
            await asyncio.sleep(SETTLE_INTERVAL_S)
            rss = proc_status_kib(self.pid)
            if abs(rss - previous) < SETTLE_KIB:
                break
            previous = rss
        return self.lines >= expected_lines

    async def run(self) -> dict[str, Any]:
        rss_idle = proc_status_kib(self.pid)
        gate = asyncio.Semaphore(self.concurrency)
        started = time.monotonic()
        async with asyncio.TaskGroup() as tasks:
            for i in range(self.clients):
                tasks.create_task(self.login(i, gate))
        login_wall = time.monotonic() - started
        n = len(self.members)
        # One reply each (refused ones too), and each approval's roomchange to every member at the time.
        expected_lines = n + self.refused + n * (n + 1) // 2
        all_lines = await self.settle(expected_lines)
        received_lines = self.lines
        settle_wall = time.monotonic() - started - login_wall
        rss_full = proc_status_kib(self.pid)
        hwm = proc_status_kib(self.pid, "VmHWM")
        # What the server spends holding the clients while nobody says anything (timers, snapshots).
        cpu0, t0 = proc_cpu_s(self.pid), time.perf_counter()
        await asyncio.sleep(IDLE_SAMPLE_S)
        idle_cpu_pct = 100 * (proc_cpu_s(self.pid) - cpu0) / (time.perf_counter() - t0)

        fanout_s = None
        reached = 0
        if n >= 2 and self.left_s() > 0:
            self.marker = b"final-%d" % time.monotonic_ns()
            self.expected_seen = n - 1
            sender = self.members[0]
            sender.seen = True  # a message is never echoed to its sender
            assert sender.transport is not None
            sent = time.perf_counter()
            sender.transport.write(b'{"type":"message","content":"%s"}\n' % self.marker)
            try:
                async with asyncio.timeout(min(60.0, self.left_s())):
                    await self.all_seen.wait()
                fanout_s = time.perf_counter() - sent
            except TimeoutError:
                pass
            reached = self.seen
        for member in self.members:
            if member.transport is not None:
                member.transport.abort()
        return {
            "clients_wanted": self.clients,
            "clients_logged_in": n,
            "refused": self.refused,
            "failed": self.failed,
            "connections_lost": self.lost,
            "login_wall_s": login_wall,
            "logins_per_s": n / login_wall if login_wall else None,
            "login_latency": latency_summary(self.login_s),
            "roomchange_lines_expected": expected_lines,
            "roomchange_lines_received": received_lines,
            "all_roomchanges_received": all_lines,
            "settle_wall_s": settle_wall,
            "rss_idle_kib": rss_idle,
            "rss_full_kib": rss_full,
            "rss_hwm_kib": hwm,
            "kib_per_client": (rss_full - rss_idle) / n if n else None,
            "idle_cpu_pct_with_clients": idle_cpu_pct,
            "rss_samples": [{"clients": c, "rss_kib": r} for c, r in self.rss_samples],
            "final_message_reached": reached,
            "final_message_expected": max(0, n - 1),
            "final_message_fanout_ms": None if fanout_s is None else fanout_s * 1000,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 clients (a smoke run)")
    parser.add_argument("--clients", type=int, help=f"clients to log in (default {TARGET_CLIENTS}, quick 2000)")
    parser.add_argument("--concurrency", type=int, default=128, help="logins in flight at once")
    parser.add_argument("--deadline-s", type=float, default=300.0, help="give up after this long")
    parser.add_argument("--out", default=str(default_out("connections")), help="where to write the JSON results")
    args = parser.parse_args(argv)
    clients = args.clients or (2000 if args.quick else TARGET_CLIENTS)
    if (reason := node_importable()) is not None:
        print(f"bench.connections: the server cannot start in this checkout: {reason}", file=sys.stderr)
        return 1
    fds = raise_fd_limit(clients + SPARE_FDS)
    if fds < clients + SPARE_FDS:
        print(f"bench.connections: open-file limit {fds} is too low for {clients} clients", file=sys.stderr)
        return 1

    started = time.monotonic()
    env = bench_limits_env(max_clients=clients + SPARE_FDS)
    print(f"starting one server for {clients} clients (open-file limit {fds}) ...", file=sys.stderr, flush=True)
    with bench_cluster(1, env, "bench-connections-") as cluster:
        (server_id,) = cluster.ids
        host, port = cluster.client_address(server_id)
        bench = Bench(host, port, server_pid(cluster, server_id), clients, args.concurrency, started + args.deadline_s)
        result = asyncio.run(bench.run())

    n = result["clients_logged_in"]
    per_client = result["kib_per_client"]
    fanout = result["final_message_fanout_ms"]
    rows = [
        ("clients logged in", f"{n} of {clients}"),
        ("refused / failed / lost", f"{result['refused']} / {result['failed']} / {result['connections_lost']}"),
        ("logins per second", f"{result['logins_per_s']:.0f}"),
        (
            "login latency p50 / p99 ms",
            f"{result['login_latency']['p50_ms']:.1f} / {result['login_latency']['p99_ms']:.1f}",
        ),
        ("roomchanges received", f"{result['roomchange_lines_received']} of {result['roomchange_lines_expected']}"),
        ("server RSS idle -> full MiB", f"{result['rss_idle_kib'] / 1024:.1f} -> {result['rss_full_kib'] / 1024:.1f}"),
        ("memory per client KiB", "-" if per_client is None else f"{per_client:.1f}"),
        ("server CPU while all sit idle", f"{result['idle_cpu_pct_with_clients']:.0f}%"),
        ("final message reached", f"{result['final_message_reached']} of {result['final_message_expected']}"),
        ("final message fan-out ms", "-" if fanout is None else f"{fanout:.0f}"),
    ]
    print(format_table(("measure", "value"), rows))
    met = {
        "reached_10000_clients": n >= TARGET_CLIENTS,
        "every_client_approved": n == clients and result["refused"] == 0 and result["failed"] == 0,
        "message_reached_all": n >= 2 and result["final_message_reached"] == n - 1,
        "le_50_kib_per_client": per_client is not None and per_client <= TARGET_KIB_PER_CLIENT,
    }
    print("\ntargets: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in met.items()))
    report = {
        "bench": "connections",
        "command": "python -m bench.connections" + (" --quick" if args.quick else ""),
        "machine": machine_info(),
        "open_file_limit": fds,
        "concurrency": args.concurrency,
        **result,
        "targets": {"clients": TARGET_CLIENTS, "kib_per_client": TARGET_KIB_PER_CLIENT},
        "met": met,
    }
    return finish_report(args.out, report, started)


if __name__ == "__main__":
    sys.exit(main())
