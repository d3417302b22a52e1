"""Hypothesis stateful test of RegistryState's invariants under arbitrary command sequences.

Two replicas receive the same commands (one of them is also rebuilt from its dict form now and then):
they must stay identical, and after every step no identity or room id is held twice, an owner owns at
most one room, nothing references a server that is down, and a repeated request id changes nothing.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from registry.state import (
    BeginMove,
    ClaimIdentity,
    Command,
    CompleteMove,
    CreateRoom,
    DeleteRoom,
    ExpireMove,
    RegistryState,
    ReleaseIdentity,
    ServerDown,
    ServerUp,
)

SERVERS = ["s1", "s2", "s3"]
NAMES = ["alice", "bob", "carol", "dave"]
ROOMS = ["red", "blue", "green"]

servers = st.sampled_from(SERVERS)
names = st.sampled_from(NAMES)
rooms = st.sampled_from(ROOMS)
incarnation_offsets = st.sampled_from([0] * 8 + [-1, 1])  # mostly the live incarnation, sometimes not
# Hypothesis favours the first element of a sampled_from, so the common case goes first.
rarely = st.sampled_from([False] * 3 + [True])
mostly = st.sampled_from([True, True, False])
times = st.sampled_from([1.0, 2.0, 3.0])


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = RegistryState()
        self.replica = RegistryState()
        self.counter = 0
        self.history: list[Command] = []

    def next_id(self) -> str:
        self.counter += 1
        return f"q{self.counter}"

    def inc(self, server: str, offset: int) -> int:
        """The incarnation the registry last recorded for `server` (1 if none), shifted by `offset`."""
        record = self.state.servers().get(server)
        return (record.incarnation if record else 1) + offset

    def do(self, command: Command) -> None:
        result = self.state.apply(command)
        assert self.replica.apply(command) == result
        self.history.append(command)
        if not result.ok:
            assert result.reason, result

    def aimed(self, name: str, server: str, offset: int, aim: bool) -> tuple[str, int]:
        """Mostly where `name` actually lives (so commands succeed often enough), else the drawn server."""
        entry = self.state.identity(name)
        if aim and entry is not None:
            return entry.server, entry.incarnation + offset
        return server, self.inc(server, offset)

    @initialize()
    def all_servers_up(self) -> None:
        for server in SERVERS:
            self.do(ServerUp(self.next_id(), server, 1))

    @rule(server=servers, offset=st.sampled_from([1, 1, 0, -1]), really=rarely)
    def server_up(self, server: str, offset: int, really: bool) -> None:
        """Mostly a restart (a newer incarnation); sometimes a repeated or late announcement."""
        if really:
            self.do(ServerUp(self.next_id(), server, self.inc(server, offset)))

    @rule(server=servers, offset=incarnation_offsets, really=rarely)
    def server_down(self, server: str, offset: int, really: bool) -> None:
        if really:  # rarer than the other rules, so servers stay up long enough to hold things
            self.do(ServerDown(self.next_id(), server, self.inc(server, offset)))

    @rule(name=names, server=servers, offset=incarnation_offsets)
    def claim(self, name: str, server: str, offset: int) -> None:
        self.do(ClaimIdentity(self.next_id(), name, server, self.inc(server, offset)))

    @rule(name=names, server=servers, offset=incarnation_offsets, aim=mostly)
    def release(self, name: str, server: str, offset: int, aim: bool) -> None:
        server, incarnation = self.aimed(name, server, offset, aim)
        self.do(ReleaseIdentity(self.next_id(), name, server, incarnation))

    @rule(name=names, source=servers, destination=servers, offset=incarnation_offsets, at=times, aim=mostly)
    def begin_move(self, name: str, source: str, destination: str, offset: int, at: float, aim: bool) -> None:
        source, incarnation = self.aimed(name, source, offset, aim)
        self.do(BeginMove(self.next_id(), name, source, destination, incarnation, at))

    @rule(name=names, server=servers, offset=incarnation_offsets, aim=mostly)
    def complete_move(self, name: str, server: str, offset: int, aim: bool) -> None:
        server, incarnation = self.aimed(name, server, offset, aim)
        self.do(CompleteMove(self.next_id(), name, server, incarnation))

    @rule(name=names, server=servers, since=times, aim=mostly)
    def expire_move(self, name: str, server: str, since: float, aim: bool) -> None:
        entry = self.state.identity(name)
        if aim and entry is not None:
            server, since = entry.server, entry.since
        self.do(ExpireMove(self.next_id(), name, server, since))

    @rule(room=rooms, owner=names, server=servers, offset=incarnation_offsets, aim=mostly)
    def create_room(self, room: str, owner: str, server: str, offset: int, aim: bool) -> None:
        server, incarnation = self.aimed(owner, server, offset, aim)
        self.do(CreateRoom(self.next_id(), room, server, incarnation, owner))

    @rule(room=rooms, owner=names, server=servers, offset=incarnation_offsets, aim=mostly)
    def delete_room(self, room: str, owner: str, server: str, offset: int, aim: bool) -> None:
        entry = self.state.room(room)
        if aim and entry is not None:
            owner, server, offset = entry.owner, entry.server, 0
        self.do(DeleteRoom(self.next_id(), room, server, self.inc(server, offset), owner))

    @precondition(lambda self: bool(self.history))
    @rule(data=st.data())
    def replay_a_past_request(self, data: st.DataObject) -> None:
        """A retry after a failover: same request id, stored result, no change at all."""
        command = data.draw(st.sampled_from(self.history))
        before = self.state.to_dict()
        stored = self.state.result_of(command.request_id)
        assert stored is not None
        assert self.state.apply(command) == stored
        assert self.replica.apply(command) == stored
        assert self.state.to_dict() == before

    @rule()
    def restore_replica_from_a_dump(self) -> None:
        self.replica = RegistryState.from_dict(self.state.to_dict())

    @invariant()
    def replicas_agree(self) -> None:
        assert self.state == self.replica

    @invariant()
    def invariants_hold(self) -> None:
        self.state.check_invariants()

    @invariant()
    def no_identity_or_room_twice_and_one_room_per_owner(self) -> None:
        identities = [e.identity for e in self.state.identities()]
        assert len(identities) == len(set(identities))
        room_ids = [r.room_id for r in self.state.rooms()]
        assert len(room_ids) == len(set(room_ids))
        owners = [r.owner for r in self.state.rooms() if r.owner]
        assert len(owners) == len(set(owners))

    @invariant()
    def nothing_references_a_server_that_is_down(self) -> None:
        up = self.state.servers_up()
        for entry in self.state.identities():
            assert up.get(entry.server) == entry.incarnation, entry
        for room in self.state.rooms():
            assert up.get(room.server) == room.incarnation, room


RegistryMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRegistryMachine = RegistryMachine.TestCase
