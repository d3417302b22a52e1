"""`late_commit_actions` rule by rule (node/late_commit.py), one registry command type at a time."""

from __future__ import annotations

import registry.state as rs
from node.late_commit import (
    UNDOABLE,
    DropRoomHere,
    EndSession,
    Leave,
    SubmitRelease,
    SubmitRoomDelete,
    late_commit_actions,
)

NONE: frozenset[str] = frozenset()


def decide(command: rs.Command, identities=NONE, rooms=NONE, pending=NONE):  # type: ignore[no-untyped-def]
    return late_commit_actions(command, identities, rooms, pending)


def test_claim_nobody_holds_is_released() -> None:
    assert decide(rs.ClaimIdentity("r1", "alice", "s1", 1)) == (SubmitRelease("alice"),)


def test_claim_held_by_a_local_session_is_kept() -> None:
    (action,) = decide(rs.ClaimIdentity("r1", "alice", "s1", 1), identities={"alice"})
    assert isinstance(action, Leave)


def test_claim_with_a_request_in_flight_is_left_to_it() -> None:
    (action,) = decide(rs.ClaimIdentity("r1", "alice", "s1", 1), pending={"alice"})
    assert isinstance(action, Leave)


def test_complete_move_follows_the_claim_rules() -> None:
    command = rs.CompleteMove("r1", "bob", "s2", 3)
    assert decide(command) == (SubmitRelease("bob"),)
    assert isinstance(decide(command, identities={"bob"})[0], Leave)
    assert isinstance(decide(command, pending={"bob"})[0], Leave)
    # Another name held or pending changes nothing.
    assert decide(command, identities={"alice"}, pending={"carol"}) == (SubmitRelease("bob"),)


def test_create_room_nobody_hosts_is_deleted() -> None:
    assert decide(rs.CreateRoom("r1", "den", "s1", 1, "alice")) == (SubmitRoomDelete("den", "alice"),)


def test_create_room_hosted_or_pending_is_left() -> None:
    command = rs.CreateRoom("r1", "den", "s1", 1, "alice")
    assert isinstance(decide(command, rooms={"den"})[0], Leave)
    assert isinstance(decide(command, pending={"den"})[0], Leave)


def test_delete_room_still_hosted_goes_here_too() -> None:
    assert decide(rs.DeleteRoom("r1", "den", "s1", 1, "alice"), rooms={"den"}) == (DropRoomHere("den"),)


def test_delete_room_not_hosted_needs_nothing() -> None:
    (action,) = decide(rs.DeleteRoom("r1", "den", "s1", 1, "alice"))
    assert isinstance(action, Leave)


def test_begin_move_with_client_still_here_ends_its_session() -> None:
    command = rs.BeginMove("r1", "alice", "s1", "s2", 1, 1234.5)
    assert decide(command, identities={"alice"}) == (EndSession("alice"),)


def test_begin_move_whose_client_left_is_left_to_the_destinations_expiry() -> None:
    (action,) = decide(rs.BeginMove("r1", "alice", "s1", "s2", 1, 1234.5))
    assert isinstance(action, Leave)


def test_releases_expiries_and_membership_need_nothing() -> None:
    for command in (
        rs.ReleaseIdentity("r1", "alice", "s1", 1),
        rs.ExpireMove("r1", "alice", "s2", 1.0),
        rs.ServerUp("r1", "s1", 2),
        rs.ServerDown("r1", "s1", 2),
        rs.Barrier("r1"),
    ):
        (action,) = decide(command, identities={"alice"}, rooms={"den"}, pending={"alice"})
        assert isinstance(action, Leave)
        assert not isinstance(command, UNDOABLE)


def test_every_undoable_command_can_produce_an_action() -> None:
    samples: list[rs.Command] = [
        rs.ClaimIdentity("r", "a", "s1", 1),
        rs.CompleteMove("r", "a", "s1", 1),
        rs.CreateRoom("r", "den", "s1", 1, "a"),
        rs.DeleteRoom("r", "den", "s1", 1, "a"),
        rs.BeginMove("r", "a", "s1", "s2", 1, 1.0),
    ]
    assert {type(c) for c in samples} == set(UNDOABLE)
    for command in samples:
        actions = decide(
            command,
            identities={"a"} if isinstance(command, rs.BeginMove) else NONE,
            rooms={"den"} if isinstance(command, rs.DeleteRoom) else NONE,
        )
        assert not all(isinstance(a, Leave) for a in actions)
