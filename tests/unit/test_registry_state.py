"""RegistryState, one test per rule (registry/state.py docstring). No sockets, no time."""

from __future__ import annotations

import itertools
import json
import pickle

import pytest

from registry.state import (
    MAX_REMEMBERED_REQUESTS,
    Barrier,
    BeginMove,
    ClaimIdentity,
    CompleteMove,
    CreateRoom,
    DeleteRoom,
    ExpireMove,
    IdentityEntry,
    RegistryState,
    ReleaseIdentity,
    Result,
    RoomEntry,
    ServerDown,
    ServerUp,
)

_ids = itertools.count()


def rid() -> str:
    return f"r{next(_ids)}"


def cluster(*servers: str, incarnation: int = 1) -> RegistryState:
    state = RegistryState()
    for server in servers:
        assert state.apply(ServerUp(rid(), server, incarnation)).ok
    return state


def claim(state: RegistryState, name: str, server: str = "s1", incarnation: int = 1) -> Result:
    return state.apply(ClaimIdentity(rid(), name, server, incarnation))


def create(state: RegistryState, room: str, owner: str, server: str = "s1", incarnation: int = 1) -> Result:
    return state.apply(CreateRoom(rid(), room, server, incarnation, owner))


@pytest.fixture
def state() -> RegistryState:
    return cluster("s1", "s2", "s3")


# -- servers ---------------------------------------------------------------------------------------


def test_server_up_records_incarnation_and_creates_its_mainhall() -> None:
    state = RegistryState()
    assert state.apply(ServerUp("a", "s1", 7)) == Result(True)
    assert state.servers_up() == {"s1": 7}
    assert state.room("MainHall-s1") == RoomEntry("MainHall-s1", "s1", "", 7)
    state.check_invariants()


def test_server_up_with_a_newer_incarnation_drops_what_the_old_one_held(state: RegistryState) -> None:
    claim(state, "alice")
    create(state, "room1", "alice")
    claim(state, "bob", "s2")
    assert state.apply(BeginMove(rid(), "bob", "s2", "s1", 1, 10.0)).ok  # headed to s1
    result = state.apply(ServerUp(rid(), "s1", 2))
    assert result.ok
    assert result.released_identities == ("alice", "bob")
    assert result.released_rooms == ("MainHall-s1", "room1")
    assert state.identity("alice") is None and state.identity("bob") is None and state.room("room1") is None
    assert state.room("MainHall-s1") == RoomEntry("MainHall-s1", "s1", "", 2)
    assert state.servers_up()["s1"] == 2
    state.check_invariants()


def test_server_up_repeated_for_the_same_live_incarnation_changes_nothing(state: RegistryState) -> None:
    claim(state, "alice")
    assert state.apply(ServerUp(rid(), "s1", 1)).ok
    assert state.identity("alice") is not None


def test_server_up_from_an_older_incarnation_is_fenced(state: RegistryState) -> None:
    state.apply(ServerUp(rid(), "s1", 5))
    before = state.to_dict()
    assert state.apply(ServerUp(rid(), "s1", 4)) == Result(False, "fenced")
    assert state.to_dict()["servers"] == before["servers"]


def test_server_down_drops_every_identity_and_room_of_that_incarnation(state: RegistryState) -> None:
    claim(state, "alice")
    create(state, "room1", "alice")
    claim(state, "carol", "s2")
    result = state.apply(ServerDown(rid(), "s1", 1))
    assert result.ok
    assert result.released_identities == ("alice",)
    assert result.released_rooms == ("MainHall-s1", "room1")
    assert "s1" not in state.servers_up()
    assert state.identity("carol") is not None
    state.check_invariants()


def test_server_down_drops_identities_in_transit_to_that_server(state: RegistryState) -> None:
    claim(state, "bob", "s2")
    assert state.apply(BeginMove(rid(), "bob", "s2", "s1", 1, 10.0)).ok
    assert state.apply(ServerDown(rid(), "s1", 1)).released_identities == ("bob",)
    assert state.identity("bob") is None


def test_server_down_keeps_identities_moving_away_from_that_server(state: RegistryState) -> None:
    claim(state, "bob", "s1")
    assert state.apply(BeginMove(rid(), "bob", "s1", "s2", 1, 10.0)).ok
    assert state.apply(ServerDown(rid(), "s1", 1)).ok
    entry = state.identity("bob")
    assert entry is not None and entry.server == "s2" and entry.in_transit
    state.check_invariants()


def test_commands_from_a_dead_incarnation_are_fenced_and_change_nothing(state: RegistryState) -> None:
    claim(state, "alice")
    state.apply(ServerDown(rid(), "s1", 1))
    before = state.to_dict()
    for command in (
        ClaimIdentity(rid(), "zed", "s1", 1),
        ReleaseIdentity(rid(), "alice", "s1", 1),
        CreateRoom(rid(), "room9", "s1", 1, "alice"),
        DeleteRoom(rid(), "room9", "s1", 1, "alice"),
        BeginMove(rid(), "alice", "s1", "s2", 1, 1.0),
        CompleteMove(rid(), "zed", "s1", 1),
        ServerUp(rid(), "s1", 1),
    ):
        assert state.apply(command) == Result(False, "fenced"), command
    after = state.to_dict()
    assert {k: v for k, v in after.items() if k != "results"} == {k: v for k, v in before.items() if k != "results"}


def test_commands_from_an_older_incarnation_are_fenced_after_a_restart(state: RegistryState) -> None:
    state.apply(ServerUp(rid(), "s1", 2))
    assert claim(state, "alice", "s1", 1) == Result(False, "fenced")
    assert claim(state, "alice", "s1", 2).ok


def test_a_newer_incarnation_must_announce_itself_before_claiming(state: RegistryState) -> None:
    assert claim(state, "alice", "s1", 2) == Result(False, "server-down")


def test_claims_from_a_server_never_seen_up_fail(state: RegistryState) -> None:
    assert claim(state, "alice", "s9") == Result(False, "server-down")
    assert create(state, "room1", "alice", "s9") == Result(False, "server-down")


def test_server_down_of_an_older_incarnation_is_stale_and_keeps_the_new_one(state: RegistryState) -> None:
    state.apply(ServerUp(rid(), "s1", 2))
    claim(state, "alice", "s1", 2)
    assert state.apply(ServerDown(rid(), "s1", 1)) == Result(False, "stale")
    assert state.servers_up()["s1"] == 2 and state.identity("alice") is not None


def test_server_down_for_a_server_never_seen_fences_that_incarnation() -> None:
    state = RegistryState()
    assert state.apply(ServerDown(rid(), "s1", 3)).ok
    assert state.apply(ServerUp(rid(), "s1", 3)) == Result(False, "fenced")
    assert state.apply(ServerUp(rid(), "s1", 4)).ok


def test_server_ids_are_validated() -> None:
    state = RegistryState()
    assert state.apply(ServerUp(rid(), "bad id", 1)) == Result(False, "invalid")
    assert state.apply(ServerUp(rid(), "s1", "1")) == Result(False, "invalid")  # type: ignore[arg-type]
    assert state.apply(ServerUp(rid(), "s1", True)) == Result(False, "invalid")


# -- identities ------------------------------------------------------------------------------------


def test_claim_of_a_free_valid_identity_succeeds(state: RegistryState) -> None:
    assert claim(state, "alice") == Result(True)
    assert state.identity("alice") == IdentityEntry("alice", "s1", 1)


def test_claim_of_a_taken_identity_fails_on_any_server(state: RegistryState) -> None:
    claim(state, "alice")
    assert claim(state, "alice", "s2") == Result(False, "taken")
    assert claim(state, "alice", "s1") == Result(False, "taken")  # another client on the same server


@pytest.mark.parametrize("name", ["ab", "1abc", "a" * 17, "al ice", "alice!", "", "élan", None, 42])
def test_claim_of_an_invalid_identity_fails(state: RegistryState, name: object) -> None:
    assert claim(state, name) == Result(False, "invalid")  # type: ignore[arg-type]


def test_identities_are_case_sensitive(state: RegistryState) -> None:
    assert claim(state, "Alice").ok and claim(state, "alice").ok


def test_identities_and_rooms_are_separate_namespaces(state: RegistryState) -> None:
    claim(state, "alice")
    assert create(state, "alice", "alice").ok
    assert claim(state, "bob").ok


def test_release_by_the_holder_frees_the_identity(state: RegistryState) -> None:
    claim(state, "alice")
    assert state.apply(ReleaseIdentity(rid(), "alice", "s1", 1)) == Result(True, "", ("alice",), ())
    assert state.identity("alice") is None
    assert claim(state, "alice", "s2").ok


def test_release_by_another_server_fails(state: RegistryState) -> None:
    claim(state, "alice")
    assert state.apply(ReleaseIdentity(rid(), "alice", "s2", 1)) == Result(False, "not-holder")
    assert state.apply(ReleaseIdentity(rid(), "nobody", "s1", 1)) == Result(False, "not-held")


def test_releasing_an_owner_deletes_its_room_in_the_same_command(state: RegistryState) -> None:
    claim(state, "alice")
    create(state, "room1", "alice")
    result = state.apply(ReleaseIdentity(rid(), "alice", "s1", 1))
    assert result == Result(True, "", ("alice",), ("room1",))
    assert state.room("room1") is None and state.owned_room("alice") is None
    state.check_invariants()


# -- moves -----------------------------------------------------------------------------------------


def test_begin_move_puts_the_identity_in_transit_to_the_target(state: RegistryState) -> None:
    claim(state, "alice")
    assert state.apply(BeginMove(rid(), "alice", "s1", "s2", 1, 123.5)).ok
    assert state.identity("alice") == IdentityEntry("alice", "s2", 1, True, "s1", 123.5)
    assert claim(state, "alice", "s3") == Result(False, "taken")  # still unique while in transit


def test_begin_move_by_a_room_owner_is_refused(state: RegistryState) -> None:
    claim(state, "alice")
    create(state, "room1", "alice")
    assert state.apply(BeginMove(rid(), "alice", "s1", "s2", 1, 1.0)) == Result(False, "owner-has-room")


def test_begin_move_needs_the_holder_and_a_live_target(state: RegistryState) -> None:
    claim(state, "alice")
    assert state.apply(BeginMove(rid(), "alice", "s2", "s3", 1, 1.0)) == Result(False, "not-holder")
    assert state.apply(BeginMove(rid(), "alice", "s1", "s9", 1, 1.0)) == Result(False, "server-down")
    assert state.apply(BeginMove(rid(), "alice", "s1", "s1", 1, 1.0)) == Result(False, "invalid")
    assert state.apply(BeginMove(rid(), "alice", "s1", "s2", 1, float("nan"))) == Result(False, "invalid")
    assert state.apply(BeginMove(rid(), "ghost", "s1", "s2", 1, 1.0)) == Result(False, "not-held")


def test_the_server_left_behind_cannot_release_a_moving_identity(state: RegistryState) -> None:
    claim(state, "alice")
    state.apply(BeginMove(rid(), "alice", "s1", "s2", 1, 1.0))
    assert state.apply(ReleaseIdentity(rid(), "alice", "s1", 1)) == Result(False, "not-holder")
    assert state.apply(ReleaseIdentity(rid(), "alice", "s2", 1)).ok  # the destination may


def test_complete_move_at_the_destination_settles_the_identity(state: RegistryState) -> None:
    claim(state, "alice")
    state.apply(BeginMove(rid(), "alice", "s1", "s2", 1, 1.0))
    assert state.apply(CompleteMove(rid(), "alice", "s2", 1)).ok
    assert state.identity("alice") == IdentityEntry("alice", "s2", 1)
    state.check_invariants()


def test_complete_move_of_a_free_identity_claims_it(state: RegistryState) -> None:
    assert state.apply(CompleteMove(rid(), "alice", "s2", 1)).ok
    assert state.identity("alice") == IdentityEntry("alice", "s2", 1)


def test_complete_move_fails_if_held_or_headed_elsewhere(state: RegistryState) -> None:
    claim(state, "alice", "s1")
    assert state.apply(CompleteMove(rid(), "alice", "s2", 1)) == Result(False, "taken")
    state.apply(BeginMove(rid(), "alice", "s1", "s3", 1, 1.0))
    assert state.apply(CompleteMove(rid(), "alice", "s2", 1)) == Result(False, "taken")
    assert state.apply(CompleteMove(rid(), "bad!", "s2", 1)) == Result(False, "invalid")


def test_expire_move_releases_only_the_exact_move_it_names(state: RegistryState) -> None:
    claim(state, "alice")
    state.apply(BeginMove(rid(), "alice", "s1", "s2", 1, 5.0))
    assert state.apply(ExpireMove(rid(), "alice", "s2", 4.0)) == Result(False, "stale")
    assert state.apply(ExpireMove(rid(), "alice", "s3", 5.0)) == Result(False, "stale")
    assert state.apply(ExpireMove(rid(), "alice", "s2", 5.0)) == Result(True, "", ("alice",), ())
    assert state.identity("alice") is None


def test_expire_move_after_arrival_changes_nothing(state: RegistryState) -> None:
    claim(state, "alice")
    state.apply(BeginMove(rid(), "alice", "s1", "s2", 1, 5.0))
    state.apply(CompleteMove(rid(), "alice", "s2", 1))
    assert state.apply(ExpireMove(rid(), "alice", "s2", 5.0)) == Result(False, "stale")
    assert state.identity("alice") is not None


# -- rooms -----------------------------------------------------------------------------------------


def test_create_room_by_a_holder_succeeds(state: RegistryState) -> None:
    claim(state, "alice")
    assert create(state, "room1", "alice") == Result(True)
    assert state.room("room1") == RoomEntry("room1", "s1", "alice", 1)
    assert state.owned_room("alice") == "room1"


def test_create_room_with_a_taken_id_fails_on_any_server(state: RegistryState) -> None:
    claim(state, "alice")
    claim(state, "bob", "s2")
    create(state, "room1", "alice")
    assert create(state, "room1", "bob", "s2") == Result(False, "taken")


@pytest.mark.parametrize("room", ["ab", "1room", "MainHall-s1", "MainHall-s9", "r" * 17, "", None])
def test_create_room_with_an_invalid_or_mainhall_id_fails(state: RegistryState, room: object) -> None:
    claim(state, "alice")
    assert create(state, room, "alice") == Result(False, "invalid")  # type: ignore[arg-type]


def test_an_owner_owns_at_most_one_room(state: RegistryState) -> None:
    claim(state, "alice")
    create(state, "room1", "alice")
    assert create(state, "room2", "alice") == Result(False, "owner-has-room")


def test_create_room_needs_the_owner_held_on_that_server(state: RegistryState) -> None:
    claim(state, "alice", "s2")
    assert create(state, "room1", "alice", "s1") == Result(False, "not-holder")
    assert create(state, "room1", "ghost", "s1") == Result(False, "not-holder")


def test_delete_room_by_its_owner_on_its_host(state: RegistryState) -> None:
    claim(state, "alice")
    create(state, "room1", "alice")
    assert state.apply(DeleteRoom(rid(), "room1", "s1", 1, "alice")) == Result(True, "", (), ("room1",))
    assert state.room("room1") is None
    assert create(state, "room2", "alice").ok  # no longer an owner


def test_delete_room_refusals(state: RegistryState) -> None:
    claim(state, "alice")
    claim(state, "bob")
    create(state, "room1", "alice")
    assert state.apply(DeleteRoom(rid(), "nope1", "s1", 1, "alice")) == Result(False, "no-such-room")
    assert state.apply(DeleteRoom(rid(), "room1", "s1", 1, "bob")) == Result(False, "not-owner")
    assert state.apply(DeleteRoom(rid(), "room1", "s2", 1, "alice")) == Result(False, "not-host")
    assert state.room("room1") is not None


def test_mainhalls_cannot_be_deleted_by_clients(state: RegistryState) -> None:
    assert state.apply(DeleteRoom(rid(), "MainHall-s1", "s1", 1, "")) == Result(False, "invalid")
    assert state.room("MainHall-s1") is not None


# -- idempotency and memory --------------------------------------------------------------------------


def test_a_repeated_request_id_returns_the_stored_result_without_reapplying(state: RegistryState) -> None:
    first = state.apply(ClaimIdentity("same", "alice", "s1", 1))
    assert first.ok
    assert state.apply(ClaimIdentity("same", "alice", "s1", 1)) == first  # a retry after failover: still ok
    state.apply(ReleaseIdentity("rel", "alice", "s1", 1))
    assert state.apply(ClaimIdentity("same", "alice", "s1", 1)) == first
    assert state.identity("alice") is None  # not re-applied


def test_failures_are_remembered_too(state: RegistryState) -> None:
    claim(state, "alice")
    assert state.apply(ClaimIdentity("x", "alice", "s2", 1)) == Result(False, "taken")
    state.apply(ReleaseIdentity(rid(), "alice", "s1", 1))
    assert state.apply(ClaimIdentity("x", "alice", "s2", 1)) == Result(False, "taken")


def test_request_ids_are_validated(state: RegistryState) -> None:
    assert state.apply(ClaimIdentity("", "alice", "s1", 1)) == Result(False, "invalid")
    assert state.apply(ClaimIdentity("x" * 129, "alice", "s1", 1)) == Result(False, "invalid")
    assert state.apply(ClaimIdentity(None, "alice", "s1", 1)) == Result(False, "invalid")  # type: ignore[arg-type]
    assert state.identity("alice") is None


def test_unknown_commands_are_refused_not_raised(state: RegistryState) -> None:
    class Bogus:
        request_id = "bogus"

    assert state.apply(Bogus()) == Result(False, "invalid")  # type: ignore[arg-type]


def test_request_memory_is_bounded_and_evicts_the_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import registry.state as rs

    monkeypatch.setattr(rs, "MAX_REMEMBERED_REQUESTS", 3)
    state = cluster("s1")
    for name in ("aaa", "bbb", "ccc", "ddd"):
        state.apply(ClaimIdentity(f"req-{name}", name, "s1", 1))
    assert state.result_of("req-aaa") is None or state.counts()["remembered_requests"] <= 3
    assert state.counts()["remembered_requests"] == 3
    assert state.result_of("req-ddd") == Result(True)
    assert MAX_REMEMBERED_REQUESTS == 100_000


# -- reads and serialisation ---------------------------------------------------------------------------


def test_reads_are_sorted_and_counts_add_up(state: RegistryState) -> None:
    claim(state, "bob")
    claim(state, "alice", "s2")
    create(state, "zoo", "bob")
    state.apply(BeginMove(rid(), "alice", "s2", "s3", 1, 1.0))
    assert [e.identity for e in state.identities()] == ["alice", "bob"]
    assert [r.room_id for r in state.rooms()] == ["MainHall-s1", "MainHall-s2", "MainHall-s3", "zoo"]
    counts = state.counts()
    assert counts["identities"] == 2 and counts["in_transit"] == 1 and counts["rooms"] == 4
    assert counts["servers_up"] == 3


def test_to_dict_round_trips_through_json_and_pickle(state: RegistryState) -> None:
    claim(state, "alice")
    create(state, "room1", "alice")
    claim(state, "bob", "s2")
    state.apply(BeginMove(rid(), "bob", "s2", "s3", 1, 1.25))
    state.apply(ServerDown(rid(), "s3", 1))
    copy = RegistryState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert copy == state
    assert pickle.loads(pickle.dumps(state)) == state
    copy.check_invariants()
    # The copy behaves identically, request memory included.
    assert copy.apply(ClaimIdentity("again", "carol", "s1", 1)) == state.apply(ClaimIdentity("again", "carol", "s1", 1))
    assert copy == state


def test_a_barrier_changes_nothing_and_succeeds() -> None:
    state = RegistryState()
    state.apply(ServerUp("u", "s1", 1))
    before = state.to_dict()
    assert state.apply(Barrier("b1")).ok
    after = state.to_dict()
    for key in ("identities", "rooms", "servers"):
        assert after[key] == before[key]


def test_command_names_are_the_stored_ones() -> None:
    """Journals pickle commands by module and class name, and the coordination wire sends the class name
    as "op": these names are part of the on-disk format and may not change."""
    from registry import codec
    from registry.state import COMMAND_TYPES

    stored = [
        "ClaimIdentity",
        "ReleaseIdentity",
        "BeginMove",
        "CompleteMove",
        "ExpireMove",
        "CreateRoom",
        "DeleteRoom",
        "ServerUp",
        "ServerDown",
        "Barrier",
    ]
    assert [cls.__name__ for cls in COMMAND_TYPES] == stored
    room = CreateRoom("r1", "den", "s1", 1, "alice")
    assert b"registry.state" in pickle.dumps(room) and b"CreateRoom" in pickle.dumps(room)
    assert codec.command_to_wire(room)["op"] == "CreateRoom"
