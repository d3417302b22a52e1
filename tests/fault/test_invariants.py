"""The duplicate detector the fault tests rely on (tests/fault/invariants.py), on hand-made timelines."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import pytest

from tests.fault import invariants
from tests.fault.invariants import Ledger


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    t = SimpleNamespace(now=100.0)
    monkeypatch.setattr(invariants, "now", lambda: t.now)
    return t


def session(key: str, server: str = "s1") -> Any:
    return SimpleNamespace(key=key, server=server, last_alive=0.0, rooms_dissolved={}, describe=lambda: key)


def test_a_name_held_by_two_live_sessions_at_once_is_a_duplicate(clock: SimpleNamespace) -> None:
    ledger, a, b = Ledger(), session("a"), session("b", "s2")
    ledger.approved("identity", "alice", a)
    clock.now = 101.0
    ledger.approved("identity", "alice", b)
    a.last_alive = 102.0  # a answered a request sent after b's approval arrived
    assert len(ledger.duplicates()) == 1


def test_a_name_taken_again_after_the_holder_quit_is_fine(clock: SimpleNamespace) -> None:
    ledger, a, b = Ledger(), session("a"), session("b")
    ledger.approved("identity", "alice", a)
    a.last_alive = 100.5
    ledger.session_released(a, 100.5)
    clock.now = 101.0
    ledger.approved("identity", "alice", b)
    assert ledger.duplicates() == []


def test_a_name_taken_again_after_its_server_was_killed_is_fine(clock: SimpleNamespace) -> None:
    ledger, a, b = Ledger(), session("a", "s3"), session("b", "s1")
    ledger.approved("room", "jokes", a)
    a.last_alive = 100.2
    clock.now = 100.3
    ledger.server_lost("s3", [a, b])
    clock.now = 101.0
    ledger.approved("room", "jokes", b)
    a.last_alive = 105.0  # a late read on the dead connection proves nothing after the kill
    assert ledger.duplicates() == []


def test_a_closure_noticed_late_is_not_a_false_alarm(clock: SimpleNamespace) -> None:
    ledger, a, b = Ledger(), session("a"), session("b")
    ledger.approved("identity", "alice", a)
    a.last_alive = 100.5  # last proof of life; the server dropped it afterwards, we only notice later
    clock.now = 103.0
    ledger.approved("identity", "alice", b)
    assert ledger.duplicates() == []


def test_a_move_keeps_one_holder(clock: SimpleNamespace) -> None:
    ledger, a, a2 = Ledger(), session("a", "s1"), session("a2", "s2")
    ledger.approved("identity", "alice", a)
    a.last_alive = 100.5
    clock.now = 101.0
    ledger.moved(a, a2)
    a2.last_alive = 102.0
    assert ledger.duplicates() == []


def test_a_frozen_server_serving_a_released_name_briefly_after_sigcont_is_a_bounded_zombie_window(
    clock: SimpleNamespace,
) -> None:
    ledger, a, b = Ledger(), session("a", "s3"), session("b", "s1")
    ledger.approved("identity", "alice", a)
    ledger.server_frozen("s3", 101.0, 104.0)  # declared down meanwhile: alice released
    clock.now = 103.0
    ledger.approved("identity", "alice", b)
    a.last_alive = 104.2  # s3 answered a before applying its own "server down"
    assert ledger.overlaps() == ([], [pytest.approx(0.2)])
    assert ledger.duplicates() == []
    a.last_alive = 104.0 + 10  # but never for long
    assert len(ledger.duplicates()) == 1


def test_a_room_its_server_dissolved_unasked_is_held_only_until_then(clock: SimpleNamespace) -> None:
    """A deleteroom refused as in doubt may commit later: the owner's server dissolves the room and moves its
    members to MainHall. Taking the name again after that is no duplicate; before it, it is."""
    ledger, a, b = Ledger(), session("a", "s4"), session("b", "s2")
    ledger.approved("room", "den", a)
    a.last_alive = 102.0
    a.rooms_dissolved["den"] = [(103.0, 102.0)]  # seen at 103, the last reply before it was sent at 102
    clock.now = 104.0
    ledger.approved("room", "den", b)
    a.last_alive = 110.0  # the owner lives on, in MainHall
    assert ledger.duplicates() == []
    clock.now = 101.0  # an approval elsewhere while it certainly still stood
    ledger.approved("room", "den", session("c", "s3"))
    assert len(ledger.duplicates()) == 1


def test_the_dissolving_roomchange_ends_ownership_and_records_when() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        s = invariants.Session("s4", listener.getsockname())
        try:
            s.identity, s.room, s.owned_room, s.last_alive = "ann", "den", "den", 50.0
            s._observe({"type": "roomchange", "identity": "bob", "former": "den", "roomid": "MainHall-s4"})
            assert s.owned_room == "den"  # someone else's move says nothing about ours
            s._observe({"type": "roomchange", "identity": "ann", "former": "den", "roomid": "MainHall-s4"})
            assert (s.owned_room, s.room) == (None, "MainHall-s4")
            assert [alive for _, alive in s.rooms_dissolved["den"]] == [50.0]
        finally:
            s.close()
