"""ReplicatedRegistry in this process: its PySyncObj configuration, data directory rules, the asyncio
bridge, a one-node cluster, and a lone node of three (a minority). Loopback only, no fixed sleeps."""

from __future__ import annotations

import asyncio
import pickle
import socket
import threading
import time
from pathlib import Path

import pytest
from pysyncobj.journal import FileJournal

from cluster.config import ClusterConfig, load_config
from registry import state as rs
from registry.client import CommitBridge, RegistryUnavailable
from registry.replicated import (
    RaftTimings,
    RegistryBindError,
    RegistryDataError,
    ReplicatedRegistry,
    default_data_dir,
    journal_first_index,
    wipe_data_dir,
)
from tests.support import write_config

SECRET = "test-secret"


def make_config(tmp_path: Path, count: int) -> ClusterConfig:
    return load_config(write_config(tmp_path, count))


@pytest.fixture
def registries():
    started: list[ReplicatedRegistry] = []
    yield started
    for registry in started:
        registry.close()


def start(registries: list[ReplicatedRegistry], registry: ReplicatedRegistry) -> ReplicatedRegistry:
    registries.append(registry)
    registry.start()
    return registry


def wait_for(predicate, timeout: float = 10.0) -> None:
    from tests.support import wait_until

    wait_until(predicate, timeout, 0.01)


# -- configuration guards ------------------------------------------------------------------------------


def test_journal_is_always_used_together_with_the_full_dump(tmp_path: Path) -> None:
    """Journal alone: after compaction a restarted node never rebuilds its state yet can lead (issue 2)."""
    config = make_config(tmp_path, 3)
    registry = ReplicatedRegistry(config, "s1", tmp_path / "d", SECRET)
    conf = registry.sync_conf()
    assert conf.journalFile == str(tmp_path / "d" / "raft.journal")
    assert conf.fullDumpFile == str(tmp_path / "d" / "raft.dump")
    memory_only = ReplicatedRegistry(config, "s1", tmp_path / "d", SECRET, journal=False).sync_conf()
    assert memory_only.journalFile is None and memory_only.fullDumpFile is None


def test_raft_traffic_is_encrypted_bound_to_the_configured_host_and_membership_is_fixed(tmp_path: Path) -> None:
    config = make_config(tmp_path, 3)
    registry = ReplicatedRegistry(config, "s2", tmp_path / "d", SECRET)
    conf = registry.sync_conf()
    me = config.server("s2")
    assert conf.password == SECRET
    assert conf.bindAddress == f"{me.host}:{me.raft_port}"  # PySyncObj would bind 0.0.0.0 otherwise
    assert conf.dynamicMembershipChange is False
    assert conf.appendEntriesUseBatch is False
    with pytest.raises(ValueError, match="secret"):
        ReplicatedRegistry(config, "s1", tmp_path / "d", "")


def test_the_raft_port_listens_on_the_configured_address_only(tmp_path: Path, registries) -> None:
    config = make_config(tmp_path, 1)
    me = config.server("s1")
    start(registries, ReplicatedRegistry(config, "s1", tmp_path / "d", SECRET))
    socket.create_connection((me.host, me.raft_port), timeout=1).close()
    with pytest.raises(OSError):  # another loopback address: refused unless bound to all interfaces
        socket.create_connection(("127.0.0.2", me.raft_port), timeout=1).close()


def test_timings_are_validated() -> None:
    with pytest.raises(ValueError):
        RaftTimings(raft_min_timeout_s=0.1, append_entries_period_s=0.05)
    with pytest.raises(ValueError):
        RaftTimings(connection_timeout_s=0.5, raft_max_timeout_s=1.0)
    with pytest.raises(ValueError):
        RaftTimings(leader_fallback_timeout_s=0.01)


def test_default_data_dir_keeps_clusters_from_different_configurations_apart(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = make_config(tmp_path / "a", 2), make_config(tmp_path / "b", 2)
    root = tmp_path / "data"
    assert default_data_dir(first, "s1", root) == root / first.fingerprint() / "s1"
    assert default_data_dir(first, "s1", root) != default_data_dir(second, "s1", root)
    assert default_data_dir(first, "s1") == Path("data") / first.fingerprint() / "s1"
    target = default_data_dir(first, "s1", root)
    target.mkdir(parents=True)
    (target / "raft.journal").write_bytes(b"x")
    wipe_data_dir(target)
    assert not target.exists()


def test_start_refuses_a_compacted_journal_without_its_dump(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    journal = FileJournal(str(data_dir / "raft.journal"))
    journal.add(b"\x01", 41, 3)  # what compaction leaves: the log starts at entry 41
    journal.add(b"\x01", 42, 3)
    journal._destroy()
    assert journal_first_index(data_dir / "raft.journal") == 41
    registry = ReplicatedRegistry(make_config(tmp_path, 1), "s1", data_dir, SECRET)
    with pytest.raises(RegistryDataError, match="compacted"):
        registry.start()
    registry.close()


def test_a_data_directory_is_used_by_one_process_at_a_time(tmp_path: Path, registries) -> None:
    config = make_config(tmp_path, 1)
    start(registries, ReplicatedRegistry(config, "s1", tmp_path / "d", SECRET))
    second = ReplicatedRegistry(config, "s1", tmp_path / "d", SECRET)
    with pytest.raises(RegistryDataError, match="in use"):
        second.start()
    second.close()


def test_a_busy_raft_port_fails_start_within_the_bind_retries(tmp_path: Path) -> None:
    config = make_config(tmp_path, 1)
    me = config.server("s1")
    blocker = socket.socket()
    blocker.bind((me.host, me.raft_port))
    blocker.listen()
    try:
        timings = RaftTimings(bind_retry_s=0.05, max_bind_retries=3)
        registry = ReplicatedRegistry(config, "s1", tmp_path / "d", SECRET, timings)
        started = time.monotonic()
        with pytest.raises(RegistryBindError):
            registry.start()
        assert time.monotonic() - started < 5
        registry.close()
    finally:
        blocker.close()


# -- the asyncio bridge ------------------------------------------------------------------------------


def test_commands_in_flight_are_capped_and_a_full_cap_waits_within_the_timeout() -> None:
    bridge = CommitBridge(max_in_flight=2)
    callbacks: list = []

    async def scenario() -> None:
        stuck = [asyncio.create_task(bridge.commit(callbacks.append, 5.0)) for _ in range(2)]
        await asyncio.sleep(0)
        assert bridge.in_flight == 2 and len(callbacks) == 2
        with pytest.raises(RegistryUnavailable, match="timeout"):
            await bridge.commit(callbacks.append, 0.05)
        assert len(callbacks) == 2  # the third never reached PySyncObj
        # A callback from another thread completes the awaiting command on its loop.
        threading.Thread(target=callbacks[0], args=(rs.Result(True), 0)).start()
        assert await stuck[0] == rs.Result(True)
        threading.Thread(target=callbacks[1], args=(None, 5)).start()
        with pytest.raises(RegistryUnavailable, match="leader-changed"):
            await stuck[1]
        assert bridge.in_flight == 0

    asyncio.run(scenario())


def test_submit_before_start_and_after_close_is_refused(tmp_path: Path) -> None:
    registry = ReplicatedRegistry(make_config(tmp_path, 1), "s1", tmp_path / "d", SECRET)
    command = rs.ServerUp("r", "s1", 1)
    with pytest.raises(RegistryUnavailable, match="not-started"):
        asyncio.run(registry.submit(command, 1.0))
    registry.close()
    with pytest.raises(RegistryUnavailable, match="closed"):
        asyncio.run(registry.submit(command, 1.0))


# -- a one-node cluster ------------------------------------------------------------------------------


def test_a_single_node_commits_notifies_listeners_and_serves_reads(tmp_path: Path, registries) -> None:
    registry = ReplicatedRegistry(make_config(tmp_path, 1), "s1", tmp_path / "d", SECRET)
    applied: list[tuple[rs.Command, rs.Result, str]] = []
    registry.add_listener(lambda c, r: applied.append((c, r, threading.current_thread().name)))

    def broken(command: rs.Command, result: rs.Result) -> None:
        raise RuntimeError("a failing listener must not stop the others or the log")

    registry.add_listener(broken)
    start(registries, registry)
    wait_for(lambda: registry.is_ready() and registry.has_quorum())

    async def scenario() -> list[rs.Result]:
        return [
            await registry.submit(rs.ServerUp("u", "s1", 1), 2.0),
            await registry.submit(rs.ClaimIdentity("c1", "alice", "s1", 1), 2.0),
            await registry.submit(rs.ClaimIdentity("c2", "alice", "s1", 1), 2.0),
            await registry.submit(rs.ClaimIdentity("c1", "alice", "s1", 1), 2.0),  # retry: stored result
        ]

    results = asyncio.run(scenario())
    assert [r.ok for r in results] == [True, True, False, True]
    assert results[2].reason == "taken"
    assert [(type(c).__name__, r.ok) for c, r, _ in applied][:3] == [
        ("ServerUp", True),
        ("ClaimIdentity", True),
        ("ClaimIdentity", False),
    ]
    assert all(thread != threading.main_thread().name for _, _, thread in applied)
    assert registry.identity("alice") == rs.IdentityEntry("alice", "s1", 1)
    assert [r.room_id for r in registry.rooms()] == ["MainHall-s1"]
    assert registry.room("MainHall-s1") is not None and registry.servers_up() == {"s1": 1}
    assert [e.identity for e in registry.identities()] == ["alice"]
    assert registry.counts()["identities"] == 1
    status = registry.raft_status()
    assert status["is_leader"] and status["leader"] == "s1" and status["quorum"] and status["ready"]
    assert status["applied_index"] == status["commit_index"] >= 4
    assert registry.applied_commands() == 4


def test_a_single_node_restarted_after_compaction_rebuilds_its_state(tmp_path: Path, registries) -> None:
    config = make_config(tmp_path, 1)
    registry = start(registries, ReplicatedRegistry(config, "s1", tmp_path / "d", SECRET))
    wait_for(registry.is_ready)

    async def claims(names: list[str]) -> None:
        for name in names:
            assert (await registry.submit(rs.ClaimIdentity("c-" + name, name, "s1", 1), 2.0)).ok

    asyncio.run(registry.submit(rs.ServerUp("u", "s1", 1), 2.0))
    asyncio.run(claims([f"early{i}" for i in range(10)]))
    registry.force_log_compaction()
    wait_for(lambda: (registry.log_first_index() or 0) > 2 and registry.dump_path.exists())
    asyncio.run(claims(["late1", "late2"]))
    before = registry.snapshot()
    registry.close()

    again = start(registries, ReplicatedRegistry(config, "s1", tmp_path / "d", SECRET))
    wait_for(again.is_ready)
    assert again.snapshot() == before
    assert not again.status().stuck


# -- a minority -------------------------------------------------------------------------------------


def test_a_lone_node_of_three_refuses_writes_within_the_timeout(tmp_path: Path, registries) -> None:
    registry = start(registries, ReplicatedRegistry(make_config(tmp_path, 3), "s1", tmp_path / "d", SECRET))
    wait_for(lambda: registry.status().started)

    async def attempt() -> float:
        began = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="timeout"):
            await registry.submit(rs.ServerUp("u", "s1", 1), 0.3)
        return time.monotonic() - began

    assert asyncio.run(attempt()) < 1.0
    assert not registry.is_ready() and not registry.has_quorum()
    assert registry.raft_status()["leader"] is None
    assert registry.counts()["servers_up"] == 0  # nothing applied


def test_commands_submitted_in_one_loop_turn_share_a_log_entry_and_keep_their_order(
    tmp_path: Path, registries
) -> None:
    registry = ReplicatedRegistry(make_config(tmp_path, 1), "s1", tmp_path / "d", SECRET)
    start(registries, registry)
    wait_for(lambda: registry.is_ready() and registry.has_quorum())

    async def scenario() -> list[rs.Result]:
        await registry.submit(rs.ServerUp("u", "s1", 1), 2.0)
        before = registry.raft_status()["commit_index"]
        claims = [registry.submit(rs.ClaimIdentity(f"c{i}", f"name{i % 10}", "s1", 1), 2.0) for i in range(100)]
        results = await asyncio.gather(*claims)
        entries = registry.raft_status()["commit_index"] - before
        assert entries < 10, f"{entries} log entries for 100 commands submitted at once"
        return list(results)

    results = asyncio.run(scenario())
    # In submission order: the first claim of each name wins, every later one is refused.
    assert [r.ok for r in results] == [i < 10 for i in range(100)]
    assert registry.applied_commands() == 101


def three_replicas(
    tmp_path: Path, registries: list[ReplicatedRegistry]
) -> tuple[list[ReplicatedRegistry], ReplicatedRegistry]:
    """Three started replicas, ready with a quorum, and their leader."""
    config = make_config(tmp_path, 3)
    nodes = [ReplicatedRegistry(config, f"s{i}", tmp_path / f"d{i}", SECRET) for i in (1, 2, 3)]
    for node in nodes:
        start(registries, node)
    wait_for(lambda: all(n.is_ready() and n.has_quorum() for n in nodes))
    return nodes, next(n for n in nodes if n.raft_status()["is_leader"])


def test_raft_leadership_moves_to_the_preferred_server(tmp_path: Path, registries) -> None:
    nodes, leader = three_replicas(tmp_path, registries)
    target = next(n for n in nodes if n is not leader)
    for node in nodes:
        node.prefer_leader(target.server_id)
    wait_for(lambda: all(n.raft_status()["leader"] == target.server_id for n in nodes), timeout=10)

    async def commit() -> rs.Result:
        return await leader.submit(rs.ServerUp("u", "s1", 1), 2.0)

    assert asyncio.run(commit()).ok  # the old leader still commits, through the new one


def test_an_idle_follower_does_not_rewrite_its_journal_meta_file(tmp_path: Path, registries) -> None:
    """PySyncObj's follower handed the journal its (unchanged) commit index on every heartbeat, and the
    journal rewrote and renamed its meta file every second: on an idle server, for nothing."""
    nodes, leader = three_replicas(tmp_path, registries)
    follower = next(n for n in nodes if n is not leader)

    async def commit() -> rs.Result:
        return await leader.submit(rs.ServerUp("u", "s1", 1), 2.0)

    assert asyncio.run(commit()).ok
    meta = Path(str(follower.journal_path) + ".meta")
    # The commit index reaches the follower with the next heartbeat and is stored within a second.
    wait_for(lambda: meta.exists() and follower.raft_status()["commit_index"] == leader.raft_status()["commit_index"])
    wait_for(lambda: pickle.loads(meta.read_bytes()).get("raftCommitIndex") == follower.raft_status()["commit_index"])
    inode = meta.stat().st_ino  # the journal writes a new file and renames it over the old one
    deadline = time.monotonic() + 2.5  # two of the journal's one-second timers, and 25 heartbeats
    while time.monotonic() < deadline:
        assert meta.stat().st_ino == inode, "the meta file was rewritten although nothing changed"
        time.sleep(0.05)


def test_a_release_waits_for_the_next_command_and_shares_its_log_entry(tmp_path: Path, registries) -> None:
    registry = ReplicatedRegistry(make_config(tmp_path, 1), "s1", tmp_path / "d", SECRET)
    start(registries, registry)
    wait_for(lambda: registry.is_ready() and registry.has_quorum())
    defer_s = registry.timings.release_defer_s

    async def next_tick_sample() -> None:
        # The status is sampled on PySyncObj's thread at the end of each tick, after the commit callbacks
        # of that tick: a sample taken since now reflects the commits already answered. (Reading the
        # commit index right after an answer could see the sample before it, and count one entry too many.)
        sample = registry._tick
        async with asyncio.timeout(2.0):
            while registry._tick is sample:
                await asyncio.sleep(0.005)

    async def scenario() -> tuple[int, float, list[rs.Result]]:
        await registry.submit(rs.ServerUp("u", "s1", 1), 2.0)
        await registry.submit(rs.ClaimIdentity("c1", "ana", "s1", 1), 2.0)
        await next_tick_sample()
        before = registry.raft_status()["commit_index"]
        release = asyncio.ensure_future(registry.submit(rs.ReleaseIdentity("r1", "ana", "s1", 1), 2.0))
        await asyncio.sleep(defer_s / 5)  # the next user logs in meanwhile, under the released name
        claim = asyncio.ensure_future(registry.submit(rs.ClaimIdentity("c2", "ana", "s1", 1), 2.0))
        results = list(await asyncio.gather(release, claim))
        await next_tick_sample()
        shared = registry.raft_status()["commit_index"] - before
        # A release with nobody after it still goes out once its wait is over.
        started = asyncio.get_running_loop().time()
        alone = await registry.submit(rs.ReleaseIdentity("r2", "ana", "s1", 1), 2.0)
        return shared, asyncio.get_running_loop().time() - started, [*results, alone]

    shared, alone_s, results = asyncio.run(scenario())
    assert [r.ok for r in results] == [True, True, True]  # released first, so claimed again, then released
    assert shared == 1, f"the release and the next claim took {shared} log entries"
    assert defer_s <= alone_s < 1.0
