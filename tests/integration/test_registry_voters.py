"""The voter core (issue 16): voters commit, read-only replicas receive the log, serve reads and submit
through the leader. ReplicatedRegistry nodes in this process, loopback only, no fixed sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.config import load_config
from registry import state as rs
from registry.client import RegistryUnavailable
from registry.replicated import KEEPALIVE_MESSAGE, ReplicatedRegistry
from tests.support import port_open, wait_until, write_config

SECRET = "test-secret"


@pytest.fixture
def registries():
    started: list[ReplicatedRegistry] = []
    yield started
    for registry in started:
        registry.close()


def cluster(
    tmp_path: Path, registries: list[ReplicatedRegistry], count: int, voters: str = ""
) -> list[ReplicatedRegistry]:
    path = write_config(tmp_path, count)
    if voters:
        path.write_text(path.read_text() + f"voters = {voters}\n")
    config = load_config(path)
    nodes = [ReplicatedRegistry(config, sid, tmp_path / sid, SECRET) for sid in config.ids]
    for node in nodes:
        registries.append(node)
        node.start()
    wait_until(lambda: all(n.is_ready() and n.has_quorum() for n in nodes), 15, 0.01, "every replica ready")
    return nodes


@contextlib.contextmanager
def recorded_sends(registry: ReplicatedRegistry) -> Iterator[list[tuple[float, Any, str]]]:
    """(time, PySyncObj node, message type) of every message `registry` sends while inside."""
    sync = registry._sync
    assert sync is not None
    transport = sync._SyncObj__transport  # type: ignore[attr-defined]
    sent: list[tuple[float, Any, str]] = []
    original = transport.send

    def recording(node, message):  # PySyncObj's thread
        sent.append((time.monotonic(), node, message.get("type")))
        return original(node, message)

    transport.send = recording
    try:
        yield sent
    finally:
        transport.send = original


def read_only_appends(leader: ReplicatedRegistry, sends: list[tuple[float, Any, str]]) -> int:
    """How many of `sends` (from `recorded_sends(leader)`) are append-entries to a read-only node."""
    assert leader._sync is not None
    readonly = set(leader._sync.readonlyNodes)
    return sum(1 for _, node, kind in list(sends) if node in readonly and kind == "append_entries")


def close_the_leader(nodes: list[ReplicatedRegistry]) -> tuple[dict[str, ReplicatedRegistry], str]:
    """Close the Raft leader that s1 follows: the replicas by server id, and the closed one's id."""
    by_id = {n.server_id: n for n in nodes}
    old = by_id["s1"].status().leader
    assert old is not None
    by_id[old].close()
    return by_id, old


def submit(node: ReplicatedRegistry, command: rs.Command, timeout: float = 3.0) -> rs.Result:
    async def go() -> rs.Result:
        return await node.submit(command, timeout)

    return asyncio.run(go())


def test_read_only_replicas_receive_the_log_and_submit_through_the_leader(tmp_path: Path, registries) -> None:
    nodes = cluster(tmp_path, registries, 5, voters="s3 s4 s5")
    by_id = {n.server_id: n for n in nodes}
    assert [n.voter for n in nodes] == [False, False, True, True, True]
    # A read-only node binds no Raft port; it is never a Raft leader or candidate.
    assert not port_open("127.0.0.1", by_id["s1"].me.raft_port)
    assert port_open("127.0.0.1", by_id["s3"].me.raft_port)
    assert {by_id[s].status().role for s in ("s1", "s2")} == {"read-only"}
    leader = by_id["s5"].status().leader
    assert leader in ("s3", "s4", "s5")
    assert by_id["s1"].status().leader == leader

    assert submit(by_id["s1"], rs.ServerUp("u1", "s1", 1)).ok
    assert submit(by_id["s1"], rs.ClaimIdentity("c1", "alice", "s1", 1)).ok
    assert submit(by_id["s2"], rs.ClaimIdentity("c2", "alice", "s1", 1)).reason == "taken"
    wait_until(lambda: len({n.applied_commands() for n in nodes}) == 1, 5, 0.01, "every replica applied all")
    assert all(n.identity("alice") == rs.IdentityEntry("alice", "s1", 1) for n in nodes)


def test_commits_wait_on_a_majority_of_voters_only(tmp_path: Path, registries) -> None:
    """With both read-only nodes gone the three voters still commit; with two voters gone nothing does."""
    nodes = cluster(tmp_path, registries, 5, voters="s3 s4 s5")
    by_id = {n.server_id: n for n in nodes}
    by_id["s1"].close()
    by_id["s2"].close()
    assert submit(by_id["s5"], rs.ServerUp("u5", "s5", 1)).ok
    leader = by_id["s5"].status().leader
    assert leader is not None
    for sid in ("s3", "s4", "s5"):
        if sid != leader:
            by_id[sid].close()
    with pytest.raises(RegistryUnavailable):
        submit(by_id[leader], rs.ServerUp("u4", "s4", 1), timeout=1.0)


def test_a_read_only_replica_forgets_a_dead_leader_and_follows_the_next(tmp_path: Path, registries) -> None:
    by_id, old = close_the_leader(cluster(tmp_path, registries, 4, voters="s2 s3 s4"))
    reader = by_id["s1"]
    wait_until(lambda: not reader.has_quorum(), 5, 0.01, "the reader sees its leader's connection end")
    reader.leader_is_gone(old)
    wait_until(lambda: reader.status().leader != old, 5, 0.01, "the reader forgets the dead leader")
    for sid, node in by_id.items():
        if sid != old:
            node.leader_is_gone(old)
    wait_until(lambda: reader.has_quorum() and reader.status().leader not in (None, old), 10, 0.02, "a new leader")
    assert submit(reader, rs.ServerUp("u1", "s1", 1)).ok


def test_read_only_replicas_get_the_log_at_the_heartbeat_period_not_per_commit(tmp_path: Path, registries) -> None:
    """Only voters get the leader's immediate sends; read-only nodes get entries in batches each period."""
    nodes = cluster(tmp_path, registries, 4, voters="s2 s3 s4")
    by_id = {n.server_id: n for n in nodes}
    leader = by_id[by_id["s1"].status().leader or ""]
    assert leader._sync is not None and len(leader._sync.readonlyNodes) == 1

    async def burst() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(60):
            assert (await leader.submit(rs.ServerUp(f"u{i}", "s1", i + 1), 3.0)).ok
        return loop.time() - started

    with recorded_sends(leader) as sends:
        elapsed = asyncio.run(burst())
    periods = elapsed / leader.timings.append_entries_period_s
    # Per commit PySyncObj would send at least two (the entry, then the commit index): 120 or more.
    sent = read_only_appends(leader, sends)
    assert sent <= periods + 5, (sent, periods)
    wait_until(lambda: by_id["s1"].applied_commands() == leader.applied_commands(), 5, 0.01, "the reader catches up")


def test_an_idle_read_only_replica_gets_a_heartbeat_only_every_idle_heartbeat(tmp_path: Path, registries) -> None:
    """A read-only replica with every entry needs no heartbeat at the leader's period (it has no election
    timer); a new commit still reaches it at the next one."""
    nodes = cluster(tmp_path, registries, 4, voters="s2 s3 s4")
    by_id = {n.server_id: n for n in nodes}
    reader = by_id["s1"]
    leader = by_id[reader.status().leader or ""]
    heartbeats = leader.timings.idle_heartbeat_s
    with recorded_sends(leader) as sends:
        window = 2.5
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:  # idle: nothing submitted
            time.sleep(0.05)
        sent = read_only_appends(leader, sends)
        assert sent <= window / heartbeats + 1, (sent, window / leader.timings.append_entries_period_s)
        sends.clear()
        submitted = time.monotonic()
        assert submit(leader, rs.ServerUp("idle-commit", "s1", 7)).ok
        wait_until(lambda: reader.applied_commands() == leader.applied_commands(), 5, 0.005, "the reader has it")
        took = time.monotonic() - submitted
    assert took < heartbeats / 2, took  # the commit went out at the next period, not at the idle heartbeat


def test_idle_voters_get_a_heartbeat_only_every_idle_heartbeat_and_elect_nobody(tmp_path: Path, registries) -> None:
    """A voter with every entry gets the leader's heartbeat once per `idle_heartbeat_s`, not every period: its
    election timer runs for `raft_min_timeout_s`, more than three of them. Idle for longer than that timeout,
    nobody starts an election, and a commit afterwards still reaches every voter at once."""
    nodes = cluster(tmp_path, registries, 3)
    by_id = {n.server_id: n for n in nodes}
    leader = by_id[by_id["s1"].status().leader or ""]
    assert leader._sync is not None
    voters = set(leader._sync.otherNodes)
    term = leader.status().term
    window = leader.timings.raft_min_timeout_s + 0.5
    with recorded_sends(leader) as sends:
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:  # idle: nothing submitted
            time.sleep(0.05)
    per_voter = [sum(1 for _, n, kind in sends if n is node and kind == "append_entries") for node in voters]
    assert max(per_voter) <= window / leader.timings.idle_heartbeat_s + 2, per_voter  # not one a period: 40
    assert min(per_voter) >= window / leader.timings.idle_heartbeat_s - 2, per_voter  # but a heartbeat still
    assert all(n.status().term == term for n in nodes), [n.status().term for n in nodes]
    submitted = time.monotonic()
    assert submit(leader, rs.ServerUp("after-idle", "s1", 9)).ok
    took = time.monotonic() - submitted
    assert took < leader.timings.append_entries_period_s, took  # committed on the voters' immediate answers


def test_keep_alives_go_only_where_nothing_else_keeps_a_connection_busy(tmp_path: Path, registries) -> None:
    """PySyncObj drops a connection silent for its timeout, so followers keep theirs alive; but the leader's
    append-entries (at least every read-only heartbeat) and the answers to them keep every connection of the
    leader busy: the leader sends no keep-alive, and no follower sends the leader one. Connections stay up:
    a commit still reaches every replica after several keep-alive periods."""
    nodes = cluster(tmp_path, registries, 4, voters="s2 s3 s4")
    by_id = {n.server_id: n for n in nodes}
    leader = by_id[by_id["s1"].status().leader or ""]
    follower = next(n for n in nodes if n.server_id not in ("s1", leader.server_id))
    assert leader._sync is not None and follower._sync is not None
    leader_node = follower._sync._getLeader()  # type: ignore[attr-defined]
    partners = len(follower._sync.otherNodes | follower._sync.readonlyNodes)
    period = leader.timings.connection_timeout_s / 4  # ReplicatedRegistry's keep-alive period
    with recorded_sends(leader) as from_leader, recorded_sends(follower) as from_follower:
        deadline = time.monotonic() + 2.2 * period
        while time.monotonic() < deadline:  # idle: nothing submitted
            time.sleep(0.05)
    keep_alive = KEEPALIVE_MESSAGE
    assert not [kind for _, _, kind in from_leader if kind == keep_alive]
    to = [node for _, node, kind in from_follower if kind == keep_alive]
    assert to and leader_node not in to
    assert len(to) >= 2 * (partners - 1)  # every other partner, every period
    assert submit(leader, rs.ServerUp("after-idle", "s1", 9)).ok
    wait_until(lambda: all(n.applied_commands() == leader.applied_commands() for n in nodes), 5, 0.01, "all have it")


def test_a_new_leaders_first_append_entries_go_to_the_voters_only(tmp_path: Path, registries, monkeypatch) -> None:
    """The no-op entry that makes a new leader ready commits on the voters' answers: the read-only nodes'
    first append-entries wait one period so their answers do not compete with the voters' (a failover at
    24 servers on 2 cores was 20% faster)."""
    from pysyncobj import SyncObj

    rounds: list[tuple[object, int, frozenset]] = []  # (leader, term, read-only nodes sent to)
    original = SyncObj._SyncObj__sendAppendEntries  # type: ignore[attr-defined]

    def recording(self) -> None:  # PySyncObj's thread
        rounds.append((self, self.raftCurrentTerm, frozenset(self._SyncObj__readonlyNodes)))
        original(self)

    monkeypatch.setattr(SyncObj, "_SyncObj__sendAppendEntries", recording)
    by_id, old = close_the_leader(cluster(tmp_path, registries, 4, voters="s2 s3 s4"))
    reader = by_id["s1"]
    for sid, node in by_id.items():
        if sid != old:
            node.leader_is_gone(old)
    wait_until(lambda: reader.status().leader not in (None, old), 10, 0.02, "the reader follows a new leader")
    new = by_id[reader.status().leader or ""]
    sync = new._sync
    term = new.status().term
    mine = [sent for leader, t, sent in rounds if leader is sync and t == term]
    assert mine and mine[0] == frozenset(), mine[:3]  # the first round: voters only
    assert any(sent for sent in mine), "the read-only node got the log at a later period"
