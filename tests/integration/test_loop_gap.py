"""Nothing blocks a server's event loop: a 6-server cluster starts, elects, logs clients in and relays,
and no server's loop was ever late to its watchdog tick by more than 100 ms (issue 12).

Start-up is the part that used to block: the Raft replica's start (journal load, bind retries) and stop, the
admin app's construction and bind. Each server's loop monitor runs from the first moment of `Node.run`
and reports the largest gap since start on /status (`loop.max_gap_s`) and /metrics."""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.priority import DEFAULT_CPU_NICE, read_autogroup_nice
from tests.support import ChatClient, Cluster, start_cluster

SERVERS = 6
MAX_GAP_S = 0.1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("loop-gap"), SERVERS) as running:
        yield running


def test_no_server_loop_is_ever_blocked_for_100_ms(cluster: Cluster) -> None:
    cluster.wait_coordinator(cluster.ids[-1], 30.0)
    clients = []
    try:
        for i, server in enumerate(cluster.ids):
            client = ChatClient.connect(cluster.client_address(server))
            clients.append(client)
            assert client.login(f"gap{i}user"), f"login refused on {server}"
        for client in clients:
            client.send({"type": "message", "content": "hello"})
        gaps = {sid: cluster.status(sid)["loop"]["max_gap_s"] for sid in cluster.ids}
    finally:
        for client in clients:
            client.close()
    assert all(isinstance(g, float) for g in gaps.values()), gaps
    late = {sid: round(g, 3) for sid, g in gaps.items() if g > MAX_GAP_S}
    assert not late, f"event loops late by more than {MAX_GAP_S}s: {late} (all: {gaps})"
    with urllib.request.urlopen(cluster.admin_url(cluster.ids[0]) + "/metrics", timeout=5.0) as response:
        assert "chatmesh_loop_max_gap_seconds" in response.read().decode()


def _thread_nices(pid: int) -> dict[str, int]:
    """Each thread's nice value (field 19 of /proc/<pid>/task/<tid>/stat, counted after the command name)."""
    nices = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            nices[f"{task.name} {name}"] = int(stat[stat.rindex(")") + 2 :].split()[16])
    return nices


def test_every_server_thread_runs_at_the_raised_priority(cluster: Cluster) -> None:
    """Servers raise their CPU priority before starting a thread (node/priority.py), so PySyncObj's thread and
    the admin server's run at it too; where that is not permitted, the server says so in one line."""
    for sid in cluster.ids:
        pid = cluster.procs.procs[sid].pid
        nices = _thread_nices(pid)
        assert len(nices) >= 3, nices  # the loop, PySyncObj's tick thread, the admin server
        if os.geteuid() == 0:
            assert set(nices.values()) == {DEFAULT_CPU_NICE}, f"{sid}: {nices}"
            assert read_autogroup_nice(Path(f"/proc/{pid}/autogroup")) in (None, DEFAULT_CPU_NICE)
            assert f"{sid} CPU priority: nice {DEFAULT_CPU_NICE}" in cluster.log(sid)
        else:
            assert "not raised: nice -10 needs root or CAP_SYS_NICE" in cluster.log(sid)
