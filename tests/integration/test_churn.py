"""Churn (issue 8): 20,000 connect/login/quit cycles against one server leave its memory and file
descriptors where they started, and every identity released in the registry.

A 1-server cluster (`python -m node`, so every login and quit is a real Raft commit) with the per-address
and rate limits raised, driven by many concurrent asyncio clients from the test process. The server is
measured from outside (/proc/<pid>): resident memory and open descriptors after a warm-up, then after the
churn once it has settled. Bounds are generous: they catch a per-connection leak (a task, a socket, a
session or a registry entry kept per cycle: 20,000 of anything shows), not allocator noise.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Cluster, start_cluster, wait_until

pytestmark = pytest.mark.timeout(240)

CYCLES = 20_000
WARMUP_CYCLES = 2_000
CONCURRENCY = 32
CYCLE_TIMEOUT_S = 15.0
# Growth allowed between the warm-up and the end of the churn.
MAX_RSS_GROWTH_BYTES = 24 * 1024 * 1024
MAX_FD_GROWTH = 8

CHURN_ENV = {
    "CHATMESH_LIMIT_MAX_CONNECTIONS_PER_IP": "100000",
    "CHATMESH_LIMIT_MESSAGE_RATE_PER_S": "0",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("churn"), 1, env=CHURN_ENV) as running:
        yield running


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def one_cycle(host: str, port: int, identity: str, hall: str) -> None:
    """connect, newidentity, quit; the server answers each as the protocol says and closes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(json.dumps({"type": "newidentity", "identity": identity}).encode() + b"\n")
        reply = json.loads(await reader.readline())
        assert reply == {"type": "newidentity", "approved": "true"}, (identity, reply)
        writer.write(b'{"type":"quit"}\n')
        # Other clients' roomchanges arrive meanwhile; ours come, then the server closes.
        own_quit = {"type": "roomchange", "identity": identity, "former": hall, "roomid": ""}
        seen_quit = False
        while line := await reader.readline():
            seen_quit = seen_quit or json.loads(line) == own_quit
        assert seen_quit, f"{identity}: no quit roomchange before the close"
    finally:
        writer.close()
        await writer.wait_closed()


async def churn(address: tuple[str, int], hall: str, first: int, count: int) -> None:
    host, port = address
    numbers = iter(range(first, first + count))
    failures: list[BaseException] = []

    async def worker() -> None:
        for n in numbers:
            try:
                await asyncio.wait_for(one_cycle(host, port, f"Ch{n}", hall), CYCLE_TIMEOUT_S)
            except (AssertionError, OSError, TimeoutError) as exc:
                failures.append(exc)
                if len(failures) > 5:
                    return

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    assert not failures, f"{len(failures)} cycles failed, first: {failures[0]!r}"


def settled(cluster: Cluster, pid: int, fds: int) -> bool:
    status = cluster.status("s1")
    return status["clients"] == 0 and status["registry"]["identities"] == 0 and open_fds(pid) <= fds


def test_twenty_thousand_cycles_leave_memory_and_descriptors_where_they_started(cluster: Cluster) -> None:
    address = cluster.client_address("s1")
    hall = "MainHall-s1"
    pid = cluster.status("s1")["pid"]

    asyncio.run(churn(address, hall, 0, WARMUP_CYCLES))
    wait_until(lambda: settled(cluster, pid, 10**6), 15, 0.1, "the warm-up to settle")
    rss_before, fds_before = rss_bytes(pid), open_fds(pid)

    started = time.monotonic()
    asyncio.run(churn(address, hall, WARMUP_CYCLES, CYCLES))
    elapsed = time.monotonic() - started

    # Every client gone, every identity released, the descriptors back.
    wait_until(lambda: settled(cluster, pid, fds_before + MAX_FD_GROWTH), 20, 0.1, "the churn to settle")
    rss_after, fds_after = rss_bytes(pid), open_fds(pid)
    report = (
        f"{CYCLES} cycles in {elapsed:.1f}s ({CYCLES / elapsed:.0f}/s); "
        f"RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB; fds {fds_before} -> {fds_after}"
    )
    print(report)
    assert fds_after <= fds_before + MAX_FD_GROWTH, report
    assert rss_after <= rss_before + MAX_RSS_GROWTH_BYTES, report
    assert cluster.alive("s1") and "Traceback" not in cluster.log("s1"), cluster.log("s1")[-3000:]
    # Still serving as before.
    asyncio.run(churn(address, hall, WARMUP_CYCLES + CYCLES, 10))
