"""The replicated registry as separate processes on loopback: 3 and 5 PySyncObj nodes.

Each node is tests/integration/registry_node.py (one ReplicatedRegistry with its own data directory),
steered over a control port. Nothing waits on a fixed sleep: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from registry import state as rs
from tests.integration.registry_node import RegistryNodes
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)

_ids = itertools.count()
INCARNATION = 1


def rid(tag: str) -> str:
    return f"{tag}-{next(_ids)}"


def announce_all(nodes: RegistryNodes) -> None:
    leader = nodes.wait_leader()
    for server_id in nodes.ids:
        reply = nodes.submit(leader, rs.ServerUp(rid("up"), server_id, INCARNATION))
        assert reply["ok"] and reply["result"]["ok"], reply


def claim_everywhere_at_once(nodes: RegistryNodes, name: str, servers: list[str]) -> dict[str, dict]:
    """Every given node submits a claim of `name` (for its own server) at the same moment."""
    with ThreadPoolExecutor(len(servers)) as pool:
        futures = {
            s: pool.submit(nodes.submit, s, rs.ClaimIdentity(rid(f"claim-{s}"), name, s, INCARNATION), 5.0)
            for s in servers
        }
        return {s: f.result() for s, f in futures.items()}


def assert_exactly_one_winner(nodes: RegistryNodes, name: str, replies: dict[str, dict]) -> str:
    assert all(r["ok"] for r in replies.values()), replies  # every submit got a committed result
    winners = [s for s, r in replies.items() if r["result"]["ok"]]
    assert len(winners) == 1, replies
    assert all(r["result"]["reason"] == "taken" for s, r in replies.items() if s != winners[0]), replies
    return winners[0]


@pytest.fixture
def three(tmp_path: Path):
    with RegistryNodes(tmp_path, 3) as nodes:
        nodes.start_all()
        announce_all(nodes)
        yield nodes


def test_concurrent_claims_from_every_node_exactly_one_wins_and_all_replicas_agree(three: RegistryNodes) -> None:
    names = [f"name{i}" for i in range(8)]
    for name in names:
        winner = assert_exactly_one_winner(three, name, claim_everywhere_at_once(three, name, three.ids))
        assert three.status(winner)["ready"]
    snapshot = three.wait_converged()
    holders = {entry[0]: entry[1] for entry in snapshot["state"]["identities"]}
    assert set(holders) == set(names)


def test_a_restarted_node_rebuilds_its_state_after_log_compaction(three: RegistryNodes) -> None:
    """Journal + full dump: after compaction the journal alone cannot rebuild the state (issue 2)."""
    leader = three.wait_leader()
    for i in range(30):
        assert three.submit(leader, rs.ClaimIdentity(rid("c"), f"user{i}", leader, INCARNATION))["ok"]
    at_compaction = three.wait_converged()
    for server_id in three.ids:
        three.call(server_id, {"op": "compact"})
    wait_until(lambda: all((three.status(s)["log_first_index"] or 0) > 2 for s in three.ids), 15, what="log compaction")
    assert all((three.data_dir(s) / "raft.dump").exists() for s in three.ids)
    # A few more entries after the dump, so a restart needs the dump *and* the journal's tail.
    for i in range(5):
        assert three.submit(leader, rs.ClaimIdentity(rid("c"), f"late{i}", leader, INCARNATION))["ok"]
    before = three.wait_converged()

    # The whole cluster restarts: whoever leads first must lead with its state restored.
    for server_id in three.ids:
        three.kill(server_id)
    three.start_all()
    samples: list[dict] = []

    def sample_until_a_leader() -> bool:
        for server_id in three.ids:
            samples.append(three.status(server_id))
        return any(s["is_leader"] for s in samples)

    wait_until(sample_until_a_leader, 20, 0.02, "a leader after the restart")
    leading = [s for s in samples if s["is_leader"]]
    # Restored before leading: a leader holds at least what the dump holds. (The entries after the dump
    # apply once the new leader commits in its term: the commit index on disk may lag by up to a second.)
    assert all(s["applied_commands"] >= at_compaction["applied_commands"] for s in leading), leading
    ready_leaders = [s for s in samples if s["is_leader"] and s["ready"]]
    assert all(s["applied_commands"] >= before["applied_commands"] for s in ready_leaders), ready_leaders
    leader = three.wait_leader()
    reply = three.submit(leader, rs.ClaimIdentity(rid("c"), "afterRestart", leader, INCARNATION), 3.0)
    assert reply["ok"] and reply["result"]["ok"], reply
    after = three.wait_converged()
    assert after["applied_commands"] == before["applied_commands"] + 1
    names = {e[0] for e in after["state"]["identities"]}
    assert names == {e[0] for e in before["state"]["identities"]} | {"afterRestart"}


def test_five_nodes_leader_kill_restart_catch_up_and_majority_loss(tmp_path: Path) -> None:
    with RegistryNodes(tmp_path, 5) as nodes:
        nodes.start_all()
        announce_all(nodes)

        # Concurrent claims of one name from all five nodes: exactly one wins, all replicas agree.
        for name in ("alpha", "bravo", "charlie"):
            assert_exactly_one_winner(nodes, name, claim_everywhere_at_once(nodes, name, nodes.ids))
        nodes.wait_converged()

        # SIGKILL the Raft leader: the survivors elect another and keep committing.
        old_leader = nodes.wait_leader()
        nodes.kill(old_leader)
        survivors = nodes.live()
        new_leader = nodes.wait_leader(timeout=15)
        assert new_leader != old_leader
        for i, server_id in enumerate(survivors):
            reply = nodes.submit(server_id, rs.ClaimIdentity(rid("k"), f"survivor{i}", server_id, INCARNATION))
            assert reply["ok"] and reply["result"]["ok"], reply
        before_restart = nodes.wait_converged(survivors)

        # The killed node restarts from its data directory and catches up to the same state.
        nodes.start(old_leader)
        converged = nodes.wait_converged(nodes.ids, timeout=20)
        assert converged["applied_commands"] == before_restart["applied_commands"]
        wait_until(lambda: nodes.status(old_leader)["ready"], 10, what=f"{old_leader} ready")

        # Kill a majority: the two left cannot commit; writes fail cleanly within the timeout.
        leader = nodes.wait_leader()
        doomed = [leader] + [s for s in nodes.ids if s != leader][:2]
        for server_id in doomed:
            nodes.kill(server_id)
        minority = nodes.live()
        assert len(minority) == 2
        nodes.wait_converged(minority)
        before = {s: nodes.snapshot(s) for s in minority}
        timeout = 1.0
        for server_id in minority:
            started = time.monotonic()
            command = rs.ClaimIdentity("doubt-" + server_id, "minority" + server_id, server_id, INCARNATION)
            reply = nodes.submit(server_id, command, timeout)
            elapsed = time.monotonic() - started
            # "timeout", or "leader-changed" when the dead leader's connection drops first.
            assert not reply["ok"] and reply["error"] in ("timeout", "leader-changed"), reply
            assert elapsed < timeout + 1.0, elapsed
        # Nothing half-applied: the minority's replicas are unchanged and identical.
        wait_until(lambda: not any(nodes.status(s)["quorum"] for s in minority), 10, what="minority sees no quorum")
        after = {s: nodes.snapshot(s) for s in minority}
        assert after == before
        assert after[minority[0]] == after[minority[1]]

        # The majority returns: the cluster recovers and converges; the refused writes are in doubt
        # (they may commit late), but either everywhere or nowhere.
        for server_id in doomed:
            nodes.start(server_id)
        leader = nodes.wait_leader(timeout=20)
        reply = nodes.submit(leader, rs.ClaimIdentity(rid("back"), "recovered", leader, INCARNATION), 3.0)
        assert reply["ok"] and reply["result"]["ok"], reply
        final = nodes.wait_converged(nodes.ids)
        assert "recovered" in {e[0] for e in final["state"]["identities"]}
