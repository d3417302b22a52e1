"""The client core (client/core.py): commands -> protocol messages, server messages -> the Java client's lines.

Named after the rules of docs/protocol.md ("The Java client's view") and the client issue. No sockets.
"""

from __future__ import annotations

from typing import Any

import pytest

from client.core import (
    EXIT_CONNECTION,
    EXIT_IDENTITY_REFUSED,
    EXIT_OK,
    HELP_LINES,
    AbandonRoute,
    AdoptRoute,
    Blank,
    ClientCore,
    CreateRoomCommand,
    DeleteRoomCommand,
    Effect,
    Exit,
    FollowRoute,
    Help,
    Hint,
    Invalid,
    JoinRoomCommand,
    ListRooms,
    Phase,
    QuitCommand,
    Reconnect,
    Say,
    SendMessage,
    Show,
    WhoCommand,
    parse_command,
)
from cluster.framing import MAX_LINE_BYTES
from tests.support import REPO
from tests.unit.test_layering import IO_MODULES, imported_roots


def rc(identity: str, former: str, roomid: str) -> dict[str, Any]:
    return {"type": "roomchange", "identity": identity, "former": former, "roomid": roomid}


def shown(effects: list[Effect]) -> list[str]:
    return [e.line for e in effects if isinstance(e, Show)]


def sent(effects: list[Effect]) -> list[dict[str, Any]]:
    return [e.message for e in effects if isinstance(e, SendMessage)]


def hints(effects: list[Effect]) -> list[str]:
    return [e.line for e in effects if isinstance(e, Hint)]


def exits(effects: list[Effect]) -> list[int]:
    return [e.status for e in effects if isinstance(e, Exit)]


def logged_in(identity: str = "Adel", server: str = "s1") -> ClientCore:
    core = ClientCore(identity, server=server)
    core.start()
    core.receive({"type": "newidentity", "approved": "true"})
    core.receive(rc(identity, "", f"MainHall-{server}"))
    assert core.phase is Phase.ACTIVE and core.pending is None
    return core


# --- purity ---------------------------------------------------------------------------------------


def test_the_client_core_does_no_io() -> None:
    assert not imported_roots(REPO / "client" / "core.py") & IO_MODULES


def test_the_client_imports_only_cluster_among_our_packages() -> None:
    for path in (REPO / "client").glob("*.py"):
        ours = imported_roots(path) & {"registry", "bully", "node"}
        assert not ours, f"{path.name} imports {ours}"


# --- commands -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("#list", ListRooms()),
        ("#who", WhoCommand()),
        ("#createroom comp90015", CreateRoomCommand("comp90015")),
        ("#joinroom comp90015", JoinRoomCommand("comp90015")),
        ("#deleteroom comp90015", DeleteRoomCommand("comp90015")),
        ("#quit", QuitCommand()),
        ("#help", Help()),
        ("hello world", Say("hello world")),
        ("  leading spaces kept", Say("  leading spaces kept")),
        ("##hashtag", Say("#hashtag")),
        ("#joinroom   spaced  ", JoinRoomCommand("spaced")),
        ("", Blank()),
    ],
)
def test_parse_command_recognises_every_command(line: str, command: object) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize("line", ["#createroom", "#joinroom a b", "#list now", "#nosuch", "#"])
def test_malformed_or_unknown_commands_are_explained_not_sent(line: str) -> None:
    assert isinstance(parse_command(line), Invalid)
    core = logged_in()
    effects = core.command(line)
    assert not sent(effects) and hints(effects)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("#list", {"type": "list"}),
        ("#who", {"type": "who"}),
        ("#createroom jokes", {"type": "createroom", "roomid": "jokes"}),
        ("#joinroom jokes", {"type": "joinroom", "roomid": "jokes"}),
        ("#deleteroom jokes", {"type": "deleteroom", "roomid": "jokes"}),
        ("#quit", {"type": "quit"}),
        ("Hi there", {"type": "message", "content": "Hi there"}),
    ],
)
def test_each_command_sends_its_protocol_message(line: str, message: dict[str, Any]) -> None:
    assert sent(logged_in().command(line)) == [message]


def test_help_is_local() -> None:
    effects = logged_in().command("#help")
    assert shown(effects) == list(HELP_LINES) and not sent(effects)


def test_an_empty_line_is_not_sent() -> None:
    assert logged_in().command("") == []


def test_a_message_over_the_line_limit_is_refused_locally() -> None:
    effects = logged_in().command("x" * MAX_LINE_BYTES)
    assert not sent(effects) and "too long" in hints(effects)[0]


def test_a_message_is_not_awaited() -> None:
    core = logged_in()
    core.command("hello")
    assert not core.awaiting_reply


# --- login ----------------------------------------------------------------------------------------


def test_login_sends_newidentity_first() -> None:
    core = ClientCore("Adel")
    assert sent(core.start()) == [{"type": "newidentity", "identity": "Adel"}]
    assert core.phase is Phase.LOGIN and core.awaiting_reply


def test_approved_identity_prints_user_has_been_approved_then_moves_to_mainhall() -> None:
    core = ClientCore("Adel")
    core.start()
    assert shown(core.receive({"type": "newidentity", "approved": "true"})) == ["User has been approved."]
    assert core.awaiting_reply, "the login is complete with our roomchange into the MainHall"
    assert shown(core.receive(rc("Adel", "", "MainHall-s1"))) == ["Adel moves to MainHall-s1"]
    assert core.room == "MainHall-s1" and core.prompt == "[MainHall-s1] Adel> " and not core.awaiting_reply


def test_refused_identity_prints_already_in_use_and_exits_1() -> None:
    core = ClientCore("Adel")
    core.start()
    effects = core.receive({"type": "newidentity", "approved": "false"})
    assert shown(effects) == ["Adel already in use."]
    assert exits(effects) == [EXIT_IDENTITY_REFUSED] and core.phase is Phase.DONE


def test_approved_must_be_the_string_true() -> None:
    core = ClientCore("Adel")
    core.start()
    assert exits(core.receive({"type": "newidentity", "approved": True})) == [EXIT_IDENTITY_REFUSED]


def test_an_invalid_identity_is_refused_before_connecting() -> None:
    effects = ClientCore("ab").start()
    assert not sent(effects) and exits(effects) == [EXIT_IDENTITY_REFUSED] and "Invalid identity" in hints(effects)[0]


def test_connection_closed_during_login_exits_3() -> None:
    core = ClientCore("Adel", server="s1")
    core.start()
    effects = core.connection_lost("closed by the server")
    assert exits(effects) == [EXIT_CONNECTION] and "before Adel was approved" in shown(effects)[0]


# --- every server message -> the Java client's line -------------------------------------------------


@pytest.mark.parametrize(
    ("message", "line"),
    [
        ({"type": "roomlist", "rooms": ["MainHall-s1", "jokes"]}, "List of chat rooms: MainHall-s1 jokes"),
        ({"type": "roomlist", "rooms": []}, "List of chat rooms:"),
        (
            {"type": "roomcontents", "roomid": "jokes", "identities": ["Adel", "Chenhao", "Maria"], "owner": "Adel"},
            "jokes contains Adel* Chenhao Maria",
        ),
        (
            {"type": "roomcontents", "roomid": "MainHall-s1", "identities": ["Adel", "Bob"], "owner": ""},
            "MainHall-s1 contains Adel Bob",
        ),
        ({"type": "message", "identity": "Bob", "content": "hi"}, "Bob: hi"),
        ({"type": "message", "identity": "Bob", "content": ""}, "Bob: "),
        ({"type": "createroom", "roomid": "jokes", "approved": "true"}, "Room jokes is created."),
        ({"type": "createroom", "roomid": "jokes", "approved": "false"}, "Create room jokes failed."),
        ({"type": "deleteroom", "roomid": "jokes", "approved": "true"}, "Room jokes is deleted."),
        ({"type": "deleteroom", "roomid": "jokes", "approved": "false"}, "Delete room jokes failed."),
        (rc("Bob", "", "MainHall-s1"), "Bob moves to MainHall-s1"),
        (rc("Bob", "MainHall-s1", "jokes"), "Bob moves from MainHall-s1 to jokes"),
        (rc("Bob", "jokes", "jokes"), "room unchanged"),
        (rc("Bob", "jokes", ""), "Bob has quit!"),
    ],
)
def test_server_message_is_printed_as_the_java_client_does(message: dict[str, Any], line: str) -> None:
    assert shown(logged_in().receive(message)) == [line]


def test_refused_createroom_and_deleteroom_explain_why_on_stderr() -> None:
    core = logged_in()
    assert hints(core.receive({"type": "createroom", "roomid": "jokes", "approved": "false"}))
    assert hints(core.receive({"type": "deleteroom", "roomid": "jokes", "approved": "false"}))


def test_unknown_types_are_ignored_like_the_java_client() -> None:
    assert logged_in().receive({"type": "serverchange", "approved": "true", "serverid": "s9"}) == []
    assert logged_in().receive({"type": "somethingnew"}) == []


def test_error_messages_become_hints() -> None:
    assert hints(logged_in().receive({"type": "error", "reason": "bad json"})) == [
        "The server reported an error: bad json"
    ]


@pytest.mark.parametrize(
    "message",
    [
        {"type": "roomlist", "rooms": "jokes"},
        {"type": "roomlist", "rooms": [1, 2]},
        {"type": "roomcontents", "roomid": "x", "identities": ["a"]},
        {"type": "message", "identity": "Bob"},
        {"type": "roomchange", "identity": "Bob", "former": None, "roomid": "x"},
        {"type": "route", "roomid": "x", "host": "h", "port": 4444},
    ],
)
def test_malformed_server_messages_are_ignored_with_a_hint(message: dict[str, Any]) -> None:
    core = logged_in()
    effects = core.receive(message)
    assert not shown(effects) and "malformed" in hints(effects)[0] and core.phase is Phase.ACTIVE


# --- room tracking and the prompt --------------------------------------------------------------------


def test_own_roomchange_updates_the_room_and_prompt() -> None:
    core = logged_in()
    core.receive(rc("Adel", "MainHall-s1", "jokes"))
    assert core.room == "jokes" and core.prompt == "[jokes] Adel> "


def test_others_roomchanges_do_not_move_us() -> None:
    core = logged_in()
    core.receive(rc("Bob", "MainHall-s1", "jokes"))
    assert core.room == "MainHall-s1"


def test_roomcontents_corrects_our_room() -> None:
    core = logged_in()
    core.receive({"type": "roomcontents", "roomid": "jokes", "identities": ["Adel"], "owner": ""})
    assert core.room == "jokes"


def test_createroom_is_answered_after_the_reply_and_our_move() -> None:
    core = logged_in()
    core.command("#createroom jokes")
    core.receive({"type": "createroom", "roomid": "jokes", "approved": "true"})
    assert core.awaiting_reply
    core.receive(rc("Adel", "MainHall-s1", "jokes"))
    assert not core.awaiting_reply and core.room == "jokes"


def test_refused_createroom_is_answered_by_the_reply_alone() -> None:
    core = logged_in()
    core.command("#createroom jokes")
    core.receive({"type": "createroom", "roomid": "jokes", "approved": "false"})
    assert not core.awaiting_reply


@pytest.mark.parametrize("reply_first", [True, False])
def test_deleteroom_is_answered_by_the_reply_and_our_move_in_either_order(reply_first: bool) -> None:
    core = logged_in()
    core.command("#createroom jokes")
    core.receive({"type": "createroom", "roomid": "jokes", "approved": "true"})
    core.receive(rc("Adel", "MainHall-s1", "jokes"))
    core.command("#deleteroom jokes")
    reply = {"type": "deleteroom", "roomid": "jokes", "approved": "true"}
    move = rc("Adel", "jokes", "MainHall-s1")
    first, second = (reply, move) if reply_first else (move, reply)
    core.receive(first)
    assert core.awaiting_reply
    core.receive(second)
    assert not core.awaiting_reply and core.room == "MainHall-s1"


def test_refused_join_prints_room_unchanged_and_is_answered() -> None:
    core = logged_in()
    core.command("#joinroom nosuch")
    effects = core.receive(rc("Adel", "MainHall-s1", "MainHall-s1"))
    assert shown(effects) == ["room unchanged"] and hints(effects) and not core.awaiting_reply
    assert core.room == "MainHall-s1"


def test_local_join_is_answered_by_our_roomchange() -> None:
    core = logged_in()
    core.command("#joinroom jokes")
    assert core.awaiting_reply and core.ready_for_input(wait_replies=False)
    assert not core.ready_for_input(wait_replies=True)
    assert shown(core.receive(rc("Adel", "MainHall-s1", "jokes"))) == ["Adel moves from MainHall-s1 to jokes"]
    assert not core.awaiting_reply and core.ready_for_input(wait_replies=True)


def test_list_and_who_are_answered_by_their_reply() -> None:
    core = logged_in()
    core.command("#list")
    core.receive({"type": "roomlist", "rooms": []})
    assert not core.awaiting_reply
    core.command("#who")
    core.receive({"type": "roomcontents", "roomid": "MainHall-s1", "identities": ["Adel"], "owner": ""})
    assert not core.awaiting_reply


# --- quit -----------------------------------------------------------------------------------------


def test_quit_ends_with_our_own_quit_roomchange_and_exit_0() -> None:
    core = logged_in()
    assert sent(core.command("#quit")) == [{"type": "quit"}]
    assert core.phase is Phase.QUITTING
    effects = core.receive(rc("Adel", "MainHall-s1", ""))
    assert shown(effects) == ["Adel has quit!"] and exits(effects) == [EXIT_OK]


def test_end_of_input_is_quit() -> None:
    assert sent(logged_in().end_of_input()) == [{"type": "quit"}]


def test_connection_closed_after_quit_is_a_clean_exit() -> None:
    core = logged_in()
    core.command("#quit")
    assert exits(core.connection_lost("closed")) == [EXIT_OK]


def test_an_unanswered_quit_times_out_into_a_clean_exit() -> None:
    core = logged_in()
    core.command("#quit")
    assert exits(core.reply_timed_out(5)) == [EXIT_OK]


def test_other_timeouts_only_stop_waiting() -> None:
    core = logged_in()
    core.command("#list")
    effects = core.reply_timed_out(15)
    assert "No answer to #list within 15 s" in hints(effects)[0] and not core.awaiting_reply
    assert core.phase is Phase.ACTIVE


def test_an_unanswered_login_times_out_with_exit_3() -> None:
    core = ClientCore("Adel", server="s1")
    core.start()
    assert exits(core.reply_timed_out(15)) == [EXIT_CONNECTION]


# --- route following ------------------------------------------------------------------------------

ROUTE = {"type": "route", "roomid": "jokes", "host": "127.0.0.1", "port": "4446"}


def routed() -> ClientCore:
    core = logged_in()
    core.command("#joinroom jokes")
    return core


def test_route_follows_with_movejoin_naming_the_room_we_leave() -> None:
    core = routed()
    effects = core.receive(ROUTE)
    follow = [e for e in effects if isinstance(e, FollowRoute)]
    assert follow == [
        FollowRoute(
            "127.0.0.1", 4446, {"type": "movejoin", "identity": "Adel", "former": "MainHall-s1", "roomid": "jokes"}
        )
    ]
    assert core.phase is Phase.ROUTING and core.awaiting_reply
    assert not shown(effects), "the Java client prints nothing for the route itself"
    assert not core.ready_for_input(wait_replies=False), "input waits until we are on the new server"


def test_serverchange_adopts_the_new_connection_then_our_roomchange_completes_the_join() -> None:
    core = routed()
    core.receive(ROUTE)
    effects = core.route_reply({"type": "serverchange", "approved": "true", "serverid": "s3"})
    assert effects == [AdoptRoute(), Show("Adel switches to server s3")]
    assert core.phase is Phase.ACTIVE and core.server == "s3" and core.awaiting_reply
    assert shown(core.receive(rc("Adel", "MainHall-s1", "jokes"))) == ["Adel moves from MainHall-s1 to jokes"]
    assert core.room == "jokes" and not core.awaiting_reply


@pytest.mark.parametrize(
    ("reply", "failure"),
    [
        ({"type": "serverchange", "approved": "false", "serverid": "s3"}, ""),
        ({"type": "roomchange", "identity": "Adel", "former": "x", "roomid": "y"}, ""),
        (None, "cannot connect to 127.0.0.1:4446: connection refused"),
        (None, "no answer from 127.0.0.1:4446 within 15 s"),
    ],
)
def test_a_failed_server_change_falls_back_to_the_old_server_and_says_so(
    reply: dict[str, Any] | None, failure: str
) -> None:
    core = routed()
    core.receive(ROUTE)
    effects = core.route_reply(reply, failure)
    assert effects[0] == AbandonRoute()
    assert shown(effects) == ["Server change failed"]
    assert any("Still connected to server s1" in h for h in hints(effects))
    assert core.phase is Phase.ACTIVE and core.room == "MainHall-s1" and not core.awaiting_reply


def test_old_connection_lost_while_routing_matters_only_if_the_route_fails() -> None:
    core = routed()
    core.receive(ROUTE)
    assert core.connection_lost("closed") == []
    effects = core.route_reply({"type": "serverchange", "approved": "true", "serverid": "s3"})
    assert AdoptRoute() in effects and core.phase is Phase.ACTIVE

    core = routed()
    core.receive(ROUTE)
    core.connection_lost("closed")
    effects = core.route_reply(None, "connection refused")
    assert shown(effects)[0] == "Server change failed" and Reconnect() in effects
    assert core.phase is Phase.RECONNECTING


def test_a_route_to_an_invalid_port_fails_without_connecting() -> None:
    core = routed()
    effects = core.receive({**ROUTE, "port": "99999"})
    assert not any(isinstance(e, FollowRoute) for e in effects)
    assert "Server change failed" in shown(effects) and core.phase is Phase.ACTIVE


def test_a_late_route_reply_is_abandoned() -> None:
    core = logged_in()
    assert core.route_reply({"type": "serverchange", "approved": "true", "serverid": "s3"}) == [AbandonRoute()]


# --- losing the server and reconnecting ----------------------------------------------------------------


def test_a_lost_connection_says_so_and_reconnects() -> None:
    core = logged_in()
    core.command("#createroom jokes")
    core.receive({"type": "createroom", "roomid": "jokes", "approved": "true"})
    core.receive(rc("Adel", "MainHall-s1", "jokes"))
    effects = core.connection_lost("connection reset")
    assert shown(effects) == ["Lost connection to server s1 (connection reset); reconnecting..."]
    assert effects[-1] == Reconnect()
    assert core.phase is Phase.RECONNECTING and core.prompt == "[reconnecting...] Adel> "
    assert not core.ready_for_input(wait_replies=False)

    effects = core.reconnected("s2 (127.0.0.1:4445)")
    assert shown(effects) == ["Reconnected to server s2 (127.0.0.1:4445) as Adel."]
    assert "#joinroom jokes" in hints(effects)[0]
    assert core.phase is Phase.ACTIVE and core.awaiting_reply
    assert shown(core.receive(rc("Adel", "", "MainHall-s2"))) == ["Adel moves to MainHall-s2"]
    assert core.room == "MainHall-s2" and not core.awaiting_reply


def test_quit_while_reconnecting_exits_at_once() -> None:
    core = logged_in()
    core.connection_lost("closed")
    assert core.command("#quit") == [Exit(EXIT_OK)]


def test_other_commands_while_reconnecting_are_not_sent() -> None:
    core = logged_in()
    core.connection_lost("closed")
    assert not sent(core.command("#list"))


def test_giving_up_reconnecting_exits_3() -> None:
    core = logged_in()
    core.connection_lost("closed")
    effects = core.reconnect_failed("s2 refused")
    assert shown(effects) == ["Could not reconnect: s2 refused."] and exits(effects) == [EXIT_CONNECTION]


def test_a_second_newidentity_answer_is_ignored_once_logged_in() -> None:
    core = logged_in()
    assert core.receive({"type": "newidentity", "approved": "false"}) == []
    assert core.phase is Phase.ACTIVE


def test_being_quit_by_the_server_ends_the_session() -> None:
    core = logged_in()
    effects = core.receive(rc("Adel", "MainHall-s1", ""))
    assert shown(effects) == ["Adel has quit!"] and exits(effects) == [EXIT_OK]


def test_printable_escapes_other_users_control_characters() -> None:
    from client.core import printable

    assert printable("bob: hi") == "bob: hi"
    assert printable("héllo ☃") == "héllo ☃"
    assert printable("x\nalice: fake") == "x\\nalice: fake"
    assert printable("\x1b[2Jgone") == "\\x1b[2Jgone"
    assert printable("a\rb\x07") == "a\\rb\\x07"
