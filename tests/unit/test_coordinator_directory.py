"""node/coordinator.py: request ids across retries, in-doubt requests, orphans, the command codec.

The directory runs over the real RegistryState (for reads) and an in-memory coordination link."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bully.transport import RequestAbandoned, RequestFailed, await_reply
from cluster.config import parse_config
from cluster.names import Identity, RoomId, ServerId
from node import coordinator as co
from registry import codec
from registry import state as rs

CONFIG = parse_config("s1 127.0.0.1 4000 6500 1\ns2 127.0.0.1 4001 6501 2\ns3 127.0.0.1 4002 6502 3\n")


class Election:
    def __init__(self, coordinator: str | None) -> None:
        self.coordinator = coordinator

    @property
    def is_coordinator(self) -> bool:
        return self.coordinator == "s1"


class Link:
    """The coordination channel: each coordinator's answer, recorded requests, failures on demand."""

    def __init__(self, registry: rs.RegistryState, down: set[str], silent: frozenset[str] = frozenset()) -> None:
        self.registry = registry
        self.down = down
        self.silent = silent  # peers that take the request and never reply
        self.asked: list[tuple[str, str]] = []  # (coordinator, request id)

    async def request(
        self, peer: str, message: dict[str, Any], timeout: float, abandon: asyncio.Future[Any] | None = None
    ) -> dict[str, Any]:
        command = codec.command_from_wire(message["command"])
        self.asked.append((peer, command.request_id))
        if peer in self.down:
            raise ConnectionError(f"{peer} unreachable")
        if peer in self.silent:  # waits the way bully.transport does: timer, abandon, no reply
            return await await_reply(asyncio.get_running_loop().create_future(), peer, timeout, abandon)  # type: ignore[no-any-return]
        result = self.registry.apply(command)
        return {"ok": result.ok, "reason": result.reason, "final": True}


class Replica:
    """The coordinator's registry: the real state machine, committing at once."""

    def __init__(self, state: rs.RegistryState) -> None:
        self.state = state

    async def submit(self, command: rs.Command, timeout: float) -> rs.Result:
        return self.state.apply(command)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.state, name)


def directory(state: rs.RegistryState, election: Election, link: Link) -> co.ClusterDirectory:
    replica = Replica(state)
    service = co.CoordinatorService(replica, election)
    return co.ClusterDirectory(CONFIG, ServerId("s1"), 7, replica, election, link, service)


def up(state: rs.RegistryState) -> rs.RegistryState:
    for server, incarnation in (("s1", 7), ("s2", 1), ("s3", 1)):
        assert state.apply(rs.ServerUp(f"up-{server}", server, incarnation)).ok
    return state


def test_a_retry_at_a_new_coordinator_keeps_the_request_id() -> None:
    state = up(rs.RegistryState())
    election = Election("s3")
    link = Link(state, down={"s3"})
    d = directory(state, election, link)

    async def scenario() -> bool:
        claim = asyncio.ensure_future(d.claim_identity(Identity("alice")))
        await asyncio.sleep(0.02)
        election.coordinator = "s2"
        d.coordinator_changed("s2")
        return await claim

    assert asyncio.run(scenario())
    ids = {request_id for _, request_id in link.asked}
    assert len(ids) == 1 and {peer for peer, _ in link.asked} == {"s3", "s2"}
    assert state.identity("alice") is not None and state.identity("alice").server == "s1"  # type: ignore[union-attr]


def test_a_new_coordinator_ends_the_wait_for_a_silent_one_at_once() -> None:
    state = up(rs.RegistryState())
    election = Election("s3")
    link = Link(state, down=set(), silent=frozenset({"s3"}))
    d = directory(state, election, link)

    async def scenario() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        claim = asyncio.ensure_future(d.claim_identity(Identity("alice")))
        await asyncio.sleep(0.02)
        d.coordinator_changed("s3")  # the same coordinator again: keep waiting for it
        await asyncio.sleep(0.02)
        assert not claim.done() and [peer for peer, _ in link.asked] == ["s3"]
        election.coordinator = "s2"
        d.coordinator_changed("s2")
        approved = await claim
        return approved, loop.time() - started

    approved, took = asyncio.run(scenario())
    assert approved and took < d.timings.peer_request_timeout_s  # not the attempt's timeout
    assert [peer for peer, _ in link.asked] == ["s3", "s2"] and len({r for _, r in link.asked}) == 1
    assert d.in_doubt == {}


def test_await_reply_times_out_or_is_abandoned_and_a_reply_wins() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(RequestFailed) as failed:
            await await_reply(loop.create_future(), "s2", 0.01, None)
        assert not isinstance(failed.value, RequestAbandoned)
        abandon: asyncio.Future[None] = loop.create_future()
        loop.call_later(0.01, abandon.set_result, None)
        with pytest.raises(RequestAbandoned):
            await await_reply(loop.create_future(), "s2", 5.0, abandon)
        reply: asyncio.Future[dict[str, Any]] = loop.create_future()
        reply.set_result({"ok": True})
        abandon = loop.create_future()
        assert await await_reply(reply, "s2", 5.0, abandon) == {"ok": True}
        abandon.set_result(None)  # too late to matter, and no callback left on it
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_a_request_unanswered_at_its_deadline_is_refused_and_in_doubt() -> None:
    state = up(rs.RegistryState())
    link = Link(state, down={"s3"})
    d = directory(state, Election("s3"), link)

    async def scenario() -> bool:
        return await d.request(rs.ClaimIdentity("r1", "alice", "s1", 7), deadline_s=0.2)

    assert asyncio.run(scenario()) is False
    assert d.refusals == 1
    assert d.take_in_doubt("r1") == rs.ClaimIdentity("r1", "alice", "s1", 7)
    assert d.take_in_doubt("r1") is None


def test_a_commit_matters_while_its_request_runs_or_is_in_doubt_only() -> None:
    # The node wakes its loop for a commit of its own only then (node/app.py `_on_applied_threadsafe`).
    state = up(rs.RegistryState())
    link = Link(state, down=set(), silent=frozenset({"s3"}))
    d = directory(state, Election("s2"), link)

    async def scenario() -> None:
        assert await d.request(rs.ClaimIdentity("r1", "alice", "s1", 7))
        assert not d.commit_may_matter("r1")  # approved: nothing left to undo
        d.election.coordinator = "s3"  # type: ignore[attr-defined]
        running = asyncio.ensure_future(d.request(rs.ClaimIdentity("r2", "bob", "s1", 7), deadline_s=0.2))
        await asyncio.sleep(0.02)
        assert d.commit_may_matter("r2") and not running.done()
        assert await running is False
        assert d.commit_may_matter("r2")  # refused in doubt: a late commit must be undone
        assert d.take_in_doubt("r2") is not None and not d.commit_may_matter("r2")

    asyncio.run(scenario())
    assert not d.commit_may_matter("never-issued")


def test_a_final_refusal_is_not_in_doubt() -> None:
    state = up(rs.RegistryState())
    assert state.apply(rs.ClaimIdentity("x", "alice", "s2", 1)).ok
    d = directory(state, Election("s2"), Link(state, down=set()))
    assert asyncio.run(d.claim_identity(Identity("alice"))) is False
    assert not d.in_doubt


def test_the_local_coordinator_serves_its_own_requests() -> None:
    state = up(rs.RegistryState())
    link = Link(state, down=set())
    d = directory(state, Election("s1"), link)
    assert asyncio.run(d.create_room(RoomId("kitchen"), Identity("alice"))) is False  # alice holds no name
    assert asyncio.run(d.claim_identity(Identity("alice")))
    assert asyncio.run(d.create_room(RoomId("kitchen"), Identity("alice")))
    assert link.asked == [] and d.approvals == 2


def test_orphans_release_what_no_session_of_this_server_backs() -> None:
    state = up(rs.RegistryState())
    for command in (
        rs.ClaimIdentity("a", "alice", "s1", 7),
        rs.CreateRoom("k", "kitchen", "s1", 7, "alice"),
        rs.ClaimIdentity("b", "bob", "s1", 7),
        rs.ClaimIdentity("c", "carol", "s2", 1),
        rs.BeginMove("m", "carol", "s2", "s1", 1, 100.0),
        rs.ClaimIdentity("d", "dave", "s2", 1),
    ):
        assert state.apply(command).ok, command
    d = directory(state, Election("s3"), Link(state, down=set()))
    d.pending.add("erin")
    orphans = d.orphans(["bob", "erin"], ["MainHall-s1"], now_wall=100.0 + co.MOVE_TIMEOUT_S)
    commands = [d.release_command(orphan) for orphan in orphans]
    kinds = sorted((type(c).__name__, getattr(c, "identity", getattr(c, "room_id", ""))) for c in commands)
    assert kinds == [("DeleteRoom", "kitchen"), ("ExpireMove", "carol"), ("ReleaseIdentity", "alice")]
    for command in commands:
        state.apply(command)
    assert [e.identity for e in state.identities()] == ["bob", "dave"]
    assert {r.room_id for r in state.rooms()} == {"MainHall-s1", "MainHall-s2", "MainHall-s3"}
    # A move still within its time is left alone.
    assert not d.orphans(["bob"], ["MainHall-s1"], now_wall=100.0)


@pytest.mark.parametrize(
    "command",
    [
        rs.ClaimIdentity("r", "alice", "s1", 7),
        rs.ReleaseIdentity("r", "alice", "s1", 7),
        rs.BeginMove("r", "alice", "s1", "s2", 7, 12.5),
        rs.CompleteMove("r", "alice", "s2", 1),
        rs.ExpireMove("r", "alice", "s2", 12.5),
        rs.CreateRoom("r", "kitchen", "s1", 7, "alice"),
        rs.DeleteRoom("r", "kitchen", "s1", 7, "alice"),
        rs.ServerUp("r", "s1", 7),
        rs.ServerDown("r", "s1", 7),
    ],
)
def test_commands_survive_the_wire(command: rs.Command) -> None:
    assert codec.command_from_wire(codec.command_to_wire(command)) == command


@pytest.mark.parametrize(
    "wire",
    [None, [], {"op": "Nope"}, {"op": "ServerUp", "request_id": "r", "server": "s1"},
     {"op": "ServerUp", "request_id": "r", "server": "s1", "incarnation": [1]}],
)  # fmt: skip
def test_bad_wire_commands_are_refused(wire: object) -> None:
    with pytest.raises(ValueError):
        codec.command_from_wire(wire)


def test_coordinator_changes_count_only_after_a_first_coordinator() -> None:
    state = rs.RegistryState()
    d = directory(state, Election("s3"), Link(state, down=set()))
    d.coordinator_changed(None)
    d.coordinator_changed("s3")
    assert d.coordinator_changes == 0
    d.coordinator_changed(None)
    d.coordinator_changed("s2")
    assert d.coordinator_changes == 2
