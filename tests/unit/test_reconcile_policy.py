"""The reconciler (node/reconcile.py): what is an orphan, and the two passes; one test per rule."""

from __future__ import annotations

from node.reconcile import Orphan, Reconciler, find_orphans
from registry.state import IdentityEntry, RoomEntry

ME, INC, MOVE = "s1", 7, 10.0


def orphans(
    identities: list[IdentityEntry],
    rooms: list[RoomEntry],
    live_ids: set[str] | None = None,
    live_rooms: set[str] | None = None,
    now: float = 100.0,
) -> list[Orphan]:
    return find_orphans(ME, INC, identities, rooms, live_ids or set(), live_rooms or set(), now, MOVE)


def test_an_identity_of_this_incarnation_without_a_session_is_released() -> None:
    found = orphans([IdentityEntry("alice", ME, INC), IdentityEntry("bob", ME, INC)], [], live_ids={"bob"})
    assert found == [Orphan("identity", "alice", INC)]


def test_entries_of_other_servers_and_of_older_incarnations_are_left_alone() -> None:
    found = orphans(
        [IdentityEntry("carol", "s2", 1), IdentityEntry("old", ME, INC - 1)], [RoomEntry("r", "s2", "x", 1)]
    )
    assert found == []


def test_a_move_to_this_server_is_expired_only_after_the_move_timeout() -> None:
    entry = IdentityEntry("dave", ME, INC, in_transit=True, from_server="s2", since=100.0)
    assert orphans([entry], [], now=100.0 + MOVE - 0.01) == []
    assert orphans([entry], [], now=100.0 + MOVE) == [Orphan("move", "dave", INC, since=100.0)]


def test_a_room_without_a_session_is_deleted_but_never_a_mainhall() -> None:
    rooms = [
        RoomEntry("MainHall-s1", ME, "", INC),
        RoomEntry("kitchen", ME, "alice", INC),
        RoomEntry("den", ME, "b", INC),
    ]
    assert orphans([], rooms, live_rooms={"den"}) == [Orphan("room", "kitchen", INC, owner="alice")]


def test_identities_and_rooms_are_matched_separately() -> None:
    # A live room named like an orphaned identity does not keep the identity.
    assert orphans([IdentityEntry("kitchen", ME, INC)], [], live_rooms={"kitchen"}) == [
        Orphan("identity", "kitchen", INC)
    ]


def test_an_orphan_is_released_only_when_seen_in_two_passes_in_a_row() -> None:
    r = Reconciler()
    alice = Orphan("identity", "alice", INC)
    assert r.review([alice]) == []
    assert r.review([alice]) == [alice]


def test_an_orphan_that_recovered_between_passes_starts_over() -> None:
    r = Reconciler()
    alice = Orphan("identity", "alice", INC)
    r.review([alice])
    r.review([])  # its session registered
    assert r.review([alice]) == []


def test_a_release_that_did_not_commit_is_released_again_next_pass() -> None:
    r = Reconciler()
    alice = Orphan("identity", "alice", INC)
    r.review([alice])
    assert r.review([alice]) == [alice]
    assert r.review([alice]) == [alice]


def test_an_entry_that_changed_is_a_new_orphan() -> None:
    r = Reconciler()
    r.review([Orphan("move", "dave", INC, since=1.0)])
    assert r.review([Orphan("move", "dave", INC, since=2.0)]) == []


def test_the_number_of_passes_is_settable() -> None:
    r = Reconciler(passes=1)
    alice = Orphan("identity", "alice", INC)
    assert r.review([alice, alice]) == [alice]
