"""ChatCore against docs/protocol.md, one test per rule, asserting exact effect sequences."""

from __future__ import annotations

import pytest

from cluster.names import Identity, RoomId, ServerId
from node.chat import (
    DELETED,
    NOT_FOUND,
    NOT_LOCAL,
    REFUSED_MAINHALL,
    REQUEST_TYPES,
    BeginMoveRequest,
    ClaimIdentityRequest,
    Close,
    CompleteMoveRequest,
    ConnId,
    CreateRoomRequest,
    DeleteRoomRequest,
    Deliver,
    Effect,
    LimitExceeded,
    Multicast,
    ReleaseIdentityRequest,
    ReleaseRoom,
    Request,
)
from tests.unit.test_chat_support import MAIN, Driver, deliveries, others, rc

APPROVED = {"type": "newidentity", "approved": "true"}
REFUSED = {"type": "newidentity", "approved": "false"}


@pytest.fixture
def d() -> Driver:
    return Driver()


def only_request(effects: list[Effect]) -> Request:
    [only] = effects
    assert isinstance(only, REQUEST_TYPES), effects
    return only


def error_reply(effects: list) -> bool:
    return len(effects) == 1 and isinstance(effects[0], Deliver) and effects[0].message["type"] == "error"


# -- framing and bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"",
        b"[1, 2]",
        b'"text"',
        b"{}",
        b'{"type": 5}',
        b'{"type": "dance"}',
        b'{"type": "message"}',
        b'{"type": "message", "content": 7}',
        b'{"type": "joinroom", "roomid": null}',
        b'{"type": "createroom", "roomid": ["x"]}',
        b'{"type": "message", "content": "\xff\xfe"}',
        b"1" * 5000,  # json raises a bare ValueError past Python's integer digit limit
        b"[" * 50000,  # RecursionError inside json
    ],
)
def test_bad_input_gets_an_error_line_and_the_session_goes_on(d: Driver, line: bytes) -> None:
    a = d.login("Alice")
    effects = d.raw(a, line)
    assert error_reply(effects), effects
    assert isinstance(effects[0], Deliver) and isinstance(effects[0].message["reason"], str)
    assert d.core.is_identified(a)
    assert deliveries(d.send(a, {"type": "who"}))[0][1]["type"] == "roomcontents"


@pytest.mark.parametrize(
    "message",
    [{"type": "list"}, {"type": "who"}, {"type": "message", "content": "hi"}, {"type": "quit"},
     {"type": "joinroom", "roomid": MAIN}, {"type": "createroom", "roomid": "Room1"}],
)  # fmt: skip
def test_lines_before_newidentity_get_an_error_reply_and_the_connection_stays(d: Driver, message: dict) -> None:
    c = d.connect()
    effects = d.send(c, message)
    assert error_reply(effects)
    assert d.core.awaiting_identity(c)
    assert deliveries(d.send(c, {"type": "newidentity", "identity": "Alice"}))[0] == (c, APPROVED)


def test_extra_fields_are_ignored(d: Driver) -> None:
    a = d.login("Alice")
    b = d.login("Bob")
    effects = d.send(a, {"type": "message", "content": "hi", "color": "red"})
    assert deliveries(effects) == [(b, {"type": "message", "identity": "Alice", "content": "hi"})]


# -- newidentity ----------------------------------------------------------------------------------------


def test_newidentity_valid_and_unused_reply_first_then_rc_to_every_member_of_mainhall(d: Driver) -> None:
    a = d.login("Alice")
    b = d.login("Bob")
    c = d.connect()
    effects = d.send(c, {"type": "newidentity", "identity": "Carol"})
    assert others(effects) == [ClaimIdentityRequest(c, Identity("Carol"))]
    joined = rc("Carol", "", MAIN)
    assert deliveries(effects) == [(c, APPROVED), (a, joined), (b, joined), (c, joined)]
    assert effects[0] == ClaimIdentityRequest(c, Identity("Carol"))  # nothing is sent before the approval


def test_newidentity_waits_for_the_coordinator_before_answering(d: Driver) -> None:
    d.auto = False
    c = d.connect()
    assert d.send(c, {"type": "newidentity", "identity": "Alice"}) == [ClaimIdentityRequest(c, Identity("Alice"))]
    assert "Alice" in d.core.local_identities()  # being approved counts as held, for the reconciler
    effects = d.core.identity_claimed(c, "Alice", True)
    assert deliveries(effects) == [(c, APPROVED), (c, rc("Alice", "", MAIN))]


@pytest.mark.parametrize("name", ["ab", "1abc", "a" * 17, "ab_c", "ab-c", "Zoë", "Ab c", "", "Ａbc"])
def test_newidentity_invalid_is_refused_then_closed_without_asking_the_coordinator(d: Driver, name: str) -> None:
    c = d.connect()
    effects = d.send(c, {"type": "newidentity", "identity": name})
    assert effects == [Deliver(c, REFUSED), Close(c)]


@pytest.mark.parametrize("name", ["abc", "A" * 16, "x1Y2z3"])
def test_newidentity_name_rules_accept_3_to_16_letters_and_digits_starting_with_a_letter(d: Driver, name: str) -> None:
    d.login(name)


def test_newidentity_taken_on_this_server_is_refused_then_closed(d: Driver) -> None:
    d.login("Alice")
    c = d.connect()
    assert d.send(c, {"type": "newidentity", "identity": "Alice"}) == [Deliver(c, REFUSED), Close(c)]


def test_newidentity_names_are_case_sensitive(d: Driver) -> None:
    d.login("Alice")
    d.login("alice")


def test_newidentity_being_approved_counts_as_taken(d: Driver) -> None:
    d.auto = False
    first = d.connect()
    d.send(first, {"type": "newidentity", "identity": "Alice"})
    second = d.connect()
    assert d.send(second, {"type": "newidentity", "identity": "Alice"}) == [Deliver(second, REFUSED), Close(second)]


def test_newidentity_taken_elsewhere_is_refused_then_closed(d: Driver) -> None:
    d.refuse.add("Alice")
    c = d.connect()
    effects = d.send(c, {"type": "newidentity", "identity": "Alice"})
    assert effects == [ClaimIdentityRequest(c, Identity("Alice")), Deliver(c, REFUSED), Close(c)]
    assert d.core.local_identities() == []


def test_a_second_newidentity_on_an_identified_connection_is_ignored(d: Driver) -> None:
    a = d.login("Alice")
    assert d.send(a, {"type": "newidentity", "identity": "Other"}) == []
    assert d.core.identity_of(a) == "Alice"


def test_a_second_newidentity_sent_before_the_first_is_approved_is_ignored(d: Driver) -> None:
    d.auto = False
    c = d.connect()
    d.send(c, {"type": "newidentity", "identity": "Alice"})
    assert d.send(c, {"type": "newidentity", "identity": "Other"}) == []  # queued
    effects = d.core.identity_claimed(c, "Alice", True)
    assert deliveries(effects) == [(c, APPROVED), (c, rc("Alice", "", MAIN))]
    assert others(effects) == []


# -- list ---------------------------------------------------------------------------------------------------


def test_list_names_every_room_of_every_live_server_mainhalls_included(d: Driver) -> None:
    d.view.add_remote("MainHall-s2", owner="")
    d.view.add_remote("Far", owner="Zed")
    a = d.login("Alice")
    d.owner_of("Bob", "Near")
    [(conn, reply)] = deliveries(d.send(a, {"type": "list"}))
    assert conn == a and reply["type"] == "roomlist"
    assert sorted(reply["rooms"]) == sorted([MAIN, "MainHall-s2", "Far", "Near"])


def test_list_trusts_local_state_over_a_lagging_replica_for_rooms_hosted_here(d: Driver) -> None:
    d.view.add_remote("Gone", server="s1", owner="Old")  # deleted here, the replica has not caught up
    a = d.login("Alice")
    [(_, reply)] = deliveries(d.send(a, {"type": "list"}))
    assert reply["rooms"] == [MAIN]


# -- who ----------------------------------------------------------------------------------------------------


def test_who_lists_the_members_of_the_current_room_requester_included_owner_empty_for_mainhall(d: Driver) -> None:
    a = d.login("Alice")
    d.login("Bob")
    assert deliveries(d.send(a, {"type": "who"})) == [
        (a, {"type": "roomcontents", "roomid": MAIN, "identities": ["Alice", "Bob"], "owner": ""})
    ]


def test_who_names_the_owner_of_a_created_room(d: Driver) -> None:
    o = d.owner_of("Olga", "Den")
    b = d.login("Bob")
    d.send(b, {"type": "joinroom", "roomid": "Den"})
    assert deliveries(d.send(b, {"type": "who"})) == [
        (b, {"type": "roomcontents", "roomid": "Den", "identities": ["Olga", "Bob"], "owner": "Olga"})
    ]
    assert o != b


# -- createroom ---------------------------------------------------------------------------------------------


def test_createroom_accepted_reply_first_then_rc_to_I_and_the_remaining_members_of_F(d: Driver) -> None:
    a = d.login("Alice")
    b = d.login("Bob")
    effects = d.send(a, {"type": "createroom", "roomid": "Den"})
    assert others(effects) == [CreateRoomRequest(a, RoomId("Den"), Identity("Alice"))]
    moved = rc("Alice", MAIN, "Den")
    assert deliveries(effects) == [
        (a, {"type": "createroom", "roomid": "Den", "approved": "true"}),
        (b, moved),
        (a, moved),
    ]
    assert ("Den", "Alice") in [(r.room_id, r.owner) for r in d.core.snapshot().rooms]


@pytest.mark.parametrize("room", ["ab", "1room", "Room_1", "MainHall-s1", "MainHall-s9", "r" * 17])
def test_createroom_refused_when_R_is_not_a_valid_name(d: Driver, room: str) -> None:
    a = d.login("Alice")
    assert d.send(a, {"type": "createroom", "roomid": room}) == [
        Deliver(a, {"type": "createroom", "roomid": room, "approved": "false"})
    ]


def test_createroom_refused_when_R_exists_here(d: Driver) -> None:
    d.owner_of("Olga", "Den")
    a = d.login("Alice")
    assert d.send(a, {"type": "createroom", "roomid": "Den"}) == [
        Deliver(a, {"type": "createroom", "roomid": "Den", "approved": "false"})
    ]


def test_createroom_refused_when_R_exists_on_another_server(d: Driver) -> None:
    d.view.add_remote("Far")
    a = d.login("Alice")
    assert d.send(a, {"type": "createroom", "roomid": "Far"}) == [
        Deliver(a, {"type": "createroom", "roomid": "Far", "approved": "false"})
    ]


def test_createroom_refused_when_R_is_pending_here(d: Driver) -> None:
    a = d.login("Alice")
    b = d.login("Bob")
    d.auto = False
    pending = d.send(a, {"type": "createroom", "roomid": "Den"})
    assert others(pending) == [CreateRoomRequest(a, RoomId("Den"), Identity("Alice"))]
    assert d.send(b, {"type": "createroom", "roomid": "Den"}) == [
        Deliver(b, {"type": "createroom", "roomid": "Den", "approved": "false"})
    ]
    assert "Den" in d.core.local_room_ids()


def test_createroom_refused_when_I_already_owns_a_room(d: Driver) -> None:
    o = d.owner_of("Olga", "Den")
    assert d.send(o, {"type": "createroom", "roomid": "Den2"}) == [
        Deliver(o, {"type": "createroom", "roomid": "Den2", "approved": "false"})
    ]


def test_createroom_refused_by_the_coordinator_sends_nothing_else(d: Driver) -> None:
    a = d.login("Alice")
    d.login("Bob")
    d.refuse.add("Den")
    effects = d.send(a, {"type": "createroom", "roomid": "Den"})
    assert deliveries(effects) == [(a, {"type": "createroom", "roomid": "Den", "approved": "false"})]
    assert "Den" not in d.core.local_room_ids()


# -- joinroom -----------------------------------------------------------------------------------------------


def test_joinroom_refused_when_R_does_not_exist_anywhere_roomchange_with_former_equal_roomid(d: Driver) -> None:
    a = d.login("Alice")
    assert d.send(a, {"type": "joinroom", "roomid": "Nowhere"}) == [Deliver(a, rc("Alice", MAIN, MAIN))]


def test_joinroom_refused_when_R_is_the_current_room(d: Driver) -> None:
    a = d.login("Alice")
    assert d.send(a, {"type": "joinroom", "roomid": MAIN}) == [Deliver(a, rc("Alice", MAIN, MAIN))]


def test_joinroom_refused_when_I_owns_F_an_owner_cannot_leave_its_room(d: Driver) -> None:
    o = d.owner_of("Olga", "Den")
    assert d.send(o, {"type": "joinroom", "roomid": MAIN}) == [Deliver(o, rc("Olga", "Den", "Den"))]


def test_joinroom_refused_for_a_room_the_lagging_replica_places_here_but_that_is_gone(d: Driver) -> None:
    d.view.add_remote("Gone", server="s1")
    a = d.login("Alice")
    assert d.send(a, {"type": "joinroom", "roomid": "Gone"}) == [Deliver(a, rc("Alice", MAIN, MAIN))]


def test_joinroom_on_this_server_sends_rc_to_members_of_F_members_of_R_and_I(d: Driver) -> None:
    o = d.owner_of("Olga", "Den")
    b = d.login("Bob")
    c = d.login("Carol")
    effects = d.send(b, {"type": "joinroom", "roomid": "Den"})
    moved = rc("Bob", MAIN, "Den")
    assert effects == [Multicast((c, o, b), moved)]
    assert sorted(deliveries(effects)) == sorted([(c, moved), (o, moved), (b, moved)])


def test_joinroom_back_to_mainhall(d: Driver) -> None:
    o = d.owner_of("Olga", "Den")
    b = d.login("Bob")
    d.send(b, {"type": "joinroom", "roomid": "Den"})
    effects = d.send(b, {"type": "joinroom", "roomid": MAIN})
    back = rc("Bob", "Den", MAIN)
    assert sorted(deliveries(effects)) == sorted([(o, back), (b, back)])


def test_joinroom_on_another_server_sends_I_only_the_route_and_rc_to_the_remaining_members_of_F(d: Driver) -> None:
    d.view.add_remote("Far", server="s2")
    a = d.login("Alice")
    b = d.login("Bob")
    effects = d.send(a, {"type": "joinroom", "roomid": "Far"})
    assert others(effects) == [BeginMoveRequest(a, Identity("Alice"), ServerId("s2"), RoomId("Far"), "10.0.0.2", 5555)]
    assert deliveries(effects) == [
        (a, {"type": "route", "roomid": "Far", "host": "10.0.0.2", "port": "5555"}),
        (b, rc("Alice", MAIN, "Far")),
    ]
    assert "Alice" not in d.core.local_identities()
    assert d.core.is_routed(a)


def test_joinroom_remote_sends_no_roomchange_to_I_before_the_route_while_the_move_is_pending(d: Driver) -> None:
    d.view.add_remote("Far", server="s2")
    a = d.login("Alice")
    d.auto = False
    [move] = d.send(a, {"type": "joinroom", "roomid": "Far"})
    assert isinstance(move, BeginMoveRequest)
    effects = d.core.move_begun(a, "Alice", True)
    assert deliveries(effects)[0][1]["type"] == "route"


def test_joinroom_remote_refused_when_the_move_is_not_approved(d: Driver) -> None:
    d.view.add_remote("Far", server="s2")
    a = d.login("Alice")
    d.refuse.add("Alice")
    effects = d.send(a, {"type": "joinroom", "roomid": "Far"})
    assert deliveries(effects) == [(a, rc("Alice", MAIN, MAIN))]
    assert d.core.is_identified(a)


def test_routed_client_closing_its_old_connection_is_not_a_quit(d: Driver) -> None:
    d.view.add_remote("Far", server="s2")
    a = d.login("Alice")
    d.login("Bob")
    d.send(a, {"type": "joinroom", "roomid": "Far"})
    assert d.core.disconnected(a) == [Close(a)]


def test_lines_a_routed_client_still_sends_are_ignored(d: Driver) -> None:
    d.view.add_remote("Far", server="s2")
    a = d.login("Alice")
    d.send(a, {"type": "joinroom", "roomid": "Far"})
    assert d.send(a, {"type": "message", "content": "hi"}) == []
    assert d.send(a, {"type": "quit"}) == []


def test_joinroom_with_a_server_of_unknown_address_is_refused(d: Driver) -> None:
    d.view.add_remote("Far", server="s7")
    a = d.login("Alice")
    assert d.send(a, {"type": "joinroom", "roomid": "Far"}) == [Deliver(a, rc("Alice", MAIN, MAIN))]


# -- movejoin -----------------------------------------------------------------------------------------------


def movejoin(identity: str, former: str, roomid: str) -> dict[str, str]:
    return {"type": "movejoin", "identity": identity, "former": former, "roomid": roomid}


def test_movejoin_sends_serverchange_first_then_rc_to_the_members_of_R_I_included(d: Driver) -> None:
    o = d.owner_of("Olga", "Den")
    c = d.connect()
    effects = d.send(c, movejoin("Mover", "Far", "Den"))
    assert others(effects) == [CompleteMoveRequest(c, Identity("Mover"))]
    arrived = rc("Mover", "Far", "Den")
    assert deliveries(effects) == [
        (c, {"type": "serverchange", "approved": "true", "serverid": "s1"}),
        (o, arrived),
        (c, arrived),
    ]
    assert d.core.is_identified(c)


def test_movejoin_to_a_room_not_here_puts_I_in_mainhall(d: Driver) -> None:
    a = d.login("Alice")
    c = d.connect()
    effects = d.send(c, movejoin("Mover", "Far", "Vanished"))
    arrived = rc("Mover", "Far", MAIN)
    assert deliveries(effects)[1:] == [(a, arrived), (c, arrived)]


def test_movejoin_refused_when_the_identity_is_held_elsewhere_then_closed(d: Driver) -> None:
    d.refuse.add("Mover")
    c = d.connect()
    effects = d.send(c, movejoin("Mover", "Far", "Den"))
    assert effects == [
        CompleteMoveRequest(c, Identity("Mover")),
        Deliver(c, {"type": "serverchange", "approved": "false", "serverid": "s1"}),
        Close(c),
    ]


def test_movejoin_refused_when_the_identity_is_a_client_here(d: Driver) -> None:
    d.login("Alice")
    c = d.connect()
    assert d.send(c, movejoin("Alice", "Far", MAIN)) == [
        Deliver(c, {"type": "serverchange", "approved": "false", "serverid": "s1"}),
        Close(c),
    ]


def test_movejoin_refused_for_an_invalid_identity(d: Driver) -> None:
    c = d.connect()
    assert d.send(c, movejoin("x", "Far", MAIN)) == [
        Deliver(c, {"type": "serverchange", "approved": "false", "serverid": "s1"}),
        Close(c),
    ]


def test_movejoin_on_an_identified_connection_is_ignored(d: Driver) -> None:
    a = d.login("Alice")
    assert d.send(a, movejoin("Bob", "Far", MAIN)) == []


# -- deleteroom ---------------------------------------------------------------------------------------------


def test_deleteroom_accepted_moves_every_member_to_mainhall_and_tells_every_member_of_mainhall(d: Driver) -> None:
    o = d.owner_of("Olga", "Den")
    b = d.login("Bob")
    c = d.login("Carol")
    d.send(b, {"type": "joinroom", "roomid": "Den"})
    effects = d.send(o, {"type": "deleteroom", "roomid": "Den"})
    assert others(effects) == [DeleteRoomRequest(o, RoomId("Den"), Identity("Olga"))]
    assert deliveries(effects)[0] == (o, {"type": "deleteroom", "roomid": "Den", "approved": "true"})
    hall_after = [c, o, b]
    expected = [(x, rc("Olga", "Den", MAIN)) for x in hall_after] + [(x, rc("Bob", "Den", MAIN)) for x in hall_after]
    assert deliveries(effects)[1:] == expected
    assert "Den" not in d.core.local_room_ids()
    # The former owner may create a room again.
    assert (o, {"type": "createroom", "roomid": "Den2", "approved": "true"}) in deliveries(
        d.send(o, {"type": "createroom", "roomid": "Den2"})
    )


def test_deleteroom_refused_when_I_does_not_own_R(d: Driver) -> None:
    d.owner_of("Olga", "Den")
    b = d.login("Bob")
    assert d.send(b, {"type": "deleteroom", "roomid": "Den"}) == [
        Deliver(b, {"type": "deleteroom", "roomid": "Den", "approved": "false"})
    ]


@pytest.mark.parametrize("room", ["Nowhere", MAIN, "MainHall-s2", "Far"])
def test_deleteroom_refused_unless_R_exists_here_and_is_not_a_mainhall(d: Driver, room: str) -> None:
    d.view.add_remote("Far", server="s2", owner="Alice")
    a = d.login("Alice")
    assert d.send(a, {"type": "deleteroom", "roomid": room}) == [
        Deliver(a, {"type": "deleteroom", "roomid": room, "approved": "false"})
    ]


def test_deleteroom_refused_by_the_coordinator_keeps_the_room(d: Driver) -> None:
    o = d.owner_of("Olga", "Den")
    d.refuse.add("Den")
    effects = d.send(o, {"type": "deleteroom", "roomid": "Den"})
    assert deliveries(effects) == [(o, {"type": "deleteroom", "roomid": "Den", "approved": "false"})]
    assert "Den" in d.core.local_room_ids()


# -- message ------------------------------------------------------------------------------------------------


def test_message_goes_to_every_other_member_of_F_never_echoed(d: Driver) -> None:
    a = d.login("Alice")
    b = d.login("Bob")
    c = d.login("Carol")
    d.owner_of("Olga", "Den")  # in another room: must not receive it
    effects = d.send(a, {"type": "message", "content": "hello"})
    text = {"type": "message", "identity": "Alice", "content": "hello"}
    assert effects == [Multicast((a, b, c), text, exclude=a)]
    assert deliveries(effects) == [(b, text), (c, text)]
    snap = d.core.snapshot()
    assert (snap.messages_relayed, snap.deliveries) == (1, 2)


def test_message_with_empty_content_is_relayed(d: Driver) -> None:
    a = d.login("Alice")
    b = d.login("Bob")
    assert deliveries(d.send(a, {"type": "message", "content": ""})) == [
        (b, {"type": "message", "identity": "Alice", "content": ""})
    ]


def test_message_alone_in_a_room_delivers_nothing(d: Driver) -> None:
    a = d.login("Alice")
    assert d.send(a, {"type": "message", "content": "echo?"}) == []


# -- quit and abrupt disconnect -------------------------------------------------------------------------------


def test_quit_sends_rc_to_I_and_the_other_members_of_F_releases_I_and_closes(d: Driver) -> None:
    a = d.login("Alice")
    b = d.login("Bob")
    effects = d.send(a, {"type": "quit"})
    gone = rc("Alice", MAIN, "")
    assert effects == [Multicast((a, b), gone), ReleaseIdentityRequest(Identity("Alice")), Close(a)]
    assert d.core.local_identities() == ["Bob"]


def test_quit_of_an_owner_dissolves_its_room_as_in_deleteroom(d: Driver) -> None:
    o = d.owner_of("Olga", "Den")
    b = d.login("Bob")
    c = d.login("Carol")
    d.send(b, {"type": "joinroom", "roomid": "Den"})
    effects = d.send(o, {"type": "quit"})
    assert deliveries(effects) == [
        (o, rc("Olga", "Den", "")),
        (b, rc("Olga", "Den", "")),
        (c, rc("Bob", "Den", MAIN)),
        (b, rc("Bob", "Den", MAIN)),
    ]
    # One registry command releases the identity and its room.
    assert others(effects) == [ReleaseIdentityRequest(Identity("Olga")), Close(o)]
    assert "Den" not in d.core.local_room_ids()


def test_abrupt_disconnect_is_the_same_quit_for_the_others(d: Driver) -> None:
    a = d.login("Alice")
    b = d.login("Bob")
    assert d.core.disconnected(a) == [
        Multicast((a, b), rc("Alice", MAIN, "")),
        ReleaseIdentityRequest(Identity("Alice")),
        Close(a),
    ]


def test_disconnect_before_newidentity_just_closes(d: Driver) -> None:
    c = d.connect()
    assert d.core.disconnected(c) == [Close(c)]
    assert d.core.session_count == 0


def test_identity_can_be_used_again_after_quit(d: Driver) -> None:
    a = d.login("Alice")
    d.send(a, {"type": "quit"})
    d.login("Alice")


# -- a client's lines are processed in order ---------------------------------------------------------------------


def test_lines_sent_while_a_cluster_request_is_in_flight_wait_and_run_in_order(d: Driver) -> None:
    a = d.login("Alice")
    b = d.login("Bob")
    d.auto = False
    create = only_request(d.send(a, {"type": "createroom", "roomid": "Den"}))
    assert d.send(a, {"type": "message", "content": "in den"}) == []
    assert d.raw(a, b"garbage") == []
    effects = d.core.resolve(create, True)
    assert deliveries(effects) == [
        (a, {"type": "createroom", "roomid": "Den", "approved": "true"}),
        (b, rc("Alice", MAIN, "Den")),
        (a, rc("Alice", MAIN, "Den")),
        (a, {"type": "error", "reason": "line is not valid JSON"}),
    ]  # the message went to Den, where Alice is alone


def test_a_queued_line_that_starts_a_request_waits_for_its_own_answer(d: Driver) -> None:
    d.auto = False
    c = d.connect()
    claim = only_request(d.send(c, {"type": "newidentity", "identity": "Alice"}))
    d.send(c, {"type": "createroom", "roomid": "Den"})
    d.send(c, {"type": "who"})
    effects = d.core.resolve(claim, True)
    assert effects[-1] == CreateRoomRequest(c, RoomId("Den"), Identity("Alice"))
    effects = d.core.room_created(c, "Den", True)
    assert deliveries(effects)[-1] == (
        c,
        {"type": "roomcontents", "roomid": "Den", "identities": ["Alice"], "owner": "Alice"},
    )


def test_peer_close_while_a_request_is_in_flight_runs_after_the_answer(d: Driver) -> None:
    a = d.login("Alice")
    b = d.login("Bob")
    d.auto = False
    create = only_request(d.send(a, {"type": "createroom", "roomid": "Den"}))
    assert d.core.disconnected(a) == []
    effects = d.core.resolve(create, True)
    assert deliveries(effects)[-1] == (a, rc("Alice", "Den", ""))
    assert others(effects) == [ReleaseIdentityRequest(Identity("Alice")), Close(a)]
    assert d.core.local_room_ids() == [MAIN]
    assert b in [conn for conn, _ in deliveries(effects)]


def test_forced_drop_during_a_claim_releases_the_late_approval(d: Driver) -> None:
    d.auto = False
    c = d.connect()
    claim = only_request(d.send(c, {"type": "newidentity", "identity": "Alice"}))
    assert d.core.drop(c, "slow reader") == [Close(c)]
    assert d.core.resolve(claim, True) == [ReleaseIdentityRequest(Identity("Alice"))]
    assert d.core.local_identities() == []


def test_forced_drop_during_a_refused_claim_leaves_nothing(d: Driver) -> None:
    d.auto = False
    c = d.connect()
    claim = only_request(d.send(c, {"type": "newidentity", "identity": "Alice"}))
    d.core.drop(c, "kick")
    assert d.core.resolve(claim, False) == []


def test_forced_drop_during_createroom_releases_the_late_room(d: Driver) -> None:
    a = d.login("Alice")
    d.auto = False
    create = only_request(d.send(a, {"type": "createroom", "roomid": "Den"}))
    dropped = d.core.drop(a, "line too long")
    assert others(dropped) == [ReleaseIdentityRequest(Identity("Alice")), Close(a)]
    assert d.core.resolve(create, True) == [ReleaseRoom(RoomId("Den"), Identity("Alice"))]


def test_forced_drop_during_a_move_completion_releases_the_late_approval(d: Driver) -> None:
    d.auto = False
    c = d.connect()
    complete = only_request(d.send(c, movejoin("Mover", "Far", MAIN)))
    d.core.drop(c, "kick")
    assert d.core.resolve(complete, True) == [ReleaseIdentityRequest(Identity("Mover"))]


def test_too_many_lines_queued_behind_a_request_drops_the_client(d: Driver) -> None:
    a = d.login("Alice")
    b = d.login("Bob")
    d.auto = False
    d.send(a, {"type": "createroom", "roomid": "Den"})
    for _ in range(d.core.max_queued_lines):
        assert d.send(a, {"type": "who"}) == []
    effects = d.send(a, {"type": "who"})
    assert isinstance(effects[0], LimitExceeded)
    assert effects[1:] == [
        Multicast((a, b), rc("Alice", MAIN, "")),
        ReleaseIdentityRequest(Identity("Alice")),
        Close(a),
    ]


# -- operator actions ---------------------------------------------------------------------------------------


def test_kick_disconnects_as_an_abrupt_quit(d: Driver) -> None:
    a = d.login("Alice")
    b = d.login("Bob")
    found, effects = d.core.kick("Alice")
    assert found
    assert effects == [Multicast((a, b), rc("Alice", MAIN, "")), ReleaseIdentityRequest(Identity("Alice")), Close(a)]
    assert d.core.kick("Alice") == (False, [])


def test_operator_delete_room_moves_members_to_mainhall_and_deletes_it_from_the_registry(d: Driver) -> None:
    o = d.owner_of("Olga", "Den")
    a = d.login("Alice")
    result, effects = d.core.operator_delete_room("Den")
    assert result == DELETED
    assert deliveries(effects) == [(a, rc("Olga", "Den", MAIN)), (o, rc("Olga", "Den", MAIN))]
    assert others(effects) == [ReleaseRoom(RoomId("Den"), Identity("Olga"))]
    d.core.check_invariants()
    # The owner's own deleteroom after that: the room is not here any more.
    assert deliveries(d.send(o, {"type": "deleteroom", "roomid": "Den"}))[0][1]["approved"] == "false"


def test_operator_delete_room_refuses_mainhalls_unknown_and_remote_rooms(d: Driver) -> None:
    d.view.add_remote("Far", server="s2")
    d.view.add_remote("MainHall-s2", server="s2", owner="")
    assert d.core.operator_delete_room(MAIN) == (REFUSED_MAINHALL, [])
    assert d.core.operator_delete_room("MainHall-s2") == (REFUSED_MAINHALL, [])
    assert d.core.operator_delete_room("Nowhere") == (NOT_FOUND, [])
    assert d.core.operator_delete_room("Far") == (NOT_LOCAL, [])


def test_operator_delete_without_release_leaves_the_registry_to_the_caller(d: Driver) -> None:
    o = d.owner_of("Olga", "Den")
    assert d.core.operator_delete_check("Den") == (DELETED, "Olga")
    result, effects = d.core.operator_delete_room("Den", release=False)
    assert result == DELETED and others(effects) == []
    assert deliveries(effects) == [(o, rc("Olga", "Den", MAIN))]


def test_operator_delete_while_the_owner_deletes_answers_the_owner_once(d: Driver) -> None:
    o = d.owner_of("Olga", "Den")
    d.auto = False
    delete = only_request(d.send(o, {"type": "deleteroom", "roomid": "Den"}))
    d.core.operator_delete_room("Den")
    assert deliveries(d.core.resolve(delete, True)) == [
        (o, {"type": "deleteroom", "roomid": "Den", "approved": "true"})
    ]
    d.core.check_invariants()


def test_end_all_tells_each_client_its_own_quit_and_releases_it(d: Driver) -> None:
    a = d.login("Alice")
    o = d.owner_of("Olga", "Den")
    c = d.connect()
    effects = d.core.end_all(release=True)
    assert effects == [
        Deliver(a, rc("Alice", MAIN, "")),
        ReleaseIdentityRequest(Identity("Alice")),
        Close(a),
        Deliver(o, rc("Olga", "Den", "")),
        ReleaseIdentityRequest(Identity("Olga")),
        Close(o),
        Close(c),
    ]
    assert d.core.local_room_ids() == [MAIN] and d.core.session_count == 0
    d.login("Alice")  # still serving


def test_end_all_without_release_leaves_the_registry_alone(d: Driver) -> None:
    a = d.login("Alice")
    assert d.core.end_all(release=False) == [Deliver(a, rc("Alice", MAIN, "")), Close(a)]


def test_snapshot_lists_clients_rooms_and_counters(d: Driver) -> None:
    d.owner_of("Olga", "Den")
    a = d.login("Alice")
    d.login("Bob")
    d.send(a, {"type": "message", "content": "x"})
    snap = d.core.snapshot()
    assert {(c.identity, c.room_id) for c in snap.clients} == {("Olga", "Den"), ("Alice", MAIN), ("Bob", MAIN)}
    assert {(r.room_id, r.owner, r.members) for r in snap.rooms} == {
        (MAIN, "", ("Alice", "Bob")),
        ("Den", "Olga", ("Olga",)),
    }
    assert (snap.messages_relayed, snap.deliveries) == (1, 1)


def test_connection_ids_are_never_reused(d: Driver) -> None:
    d.core.connect(ConnId(99))
    with pytest.raises(AssertionError):
        d.core.connect(ConnId(99))


def test_end_all_answers_a_login_still_waiting_for_the_cluster_before_closing() -> None:
    from node.chat import ChatCore, ClaimIdentityRequest, Close, CompleteMoveRequest, Deliver
    from tests.unit.test_chat_support import SERVER, FakeView

    core = ChatCore(SERVER, FakeView())
    core.connect(ConnId(1))
    core.connect(ConnId(2))
    assert isinstance(core.receive(ConnId(1), b'{"type":"newidentity","identity":"alice"}')[0], ClaimIdentityRequest)
    move = b'{"type":"movejoin","identity":"bob","former":"MainHall-s2","roomid":"r"}'
    assert isinstance(core.receive(ConnId(2), move)[0], CompleteMoveRequest)
    effects = core.end_all(release=False)
    assert effects == [
        Deliver(ConnId(1), {"type": "newidentity", "approved": "false"}),
        Close(ConnId(1)),
        Deliver(ConnId(2), {"type": "serverchange", "approved": "false", "serverid": SERVER}),
        Close(ConnId(2)),
    ]
