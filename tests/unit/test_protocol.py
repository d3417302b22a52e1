"""The client wire schema: from_wire validation and the Java-client rules of every server message."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.framing import encode
from node import protocol as p


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"type": "newidentity", "identity": "Alice"}, p.NewIdentity("Alice")),
        ({"type": "list"}, p.List()),
        ({"type": "who"}, p.Who()),
        ({"type": "createroom", "roomid": "Den"}, p.CreateRoomMessage("Den")),
        ({"type": "joinroom", "roomid": "Den"}, p.JoinRoom("Den")),
        ({"type": "movejoin", "identity": "A1b", "former": "F", "roomid": "R"}, p.MoveJoin("A1b", "F", "R")),
        ({"type": "deleteroom", "roomid": "Den"}, p.DeleteRoomMessage("Den")),
        ({"type": "message", "content": ""}, p.Message("")),
        ({"type": "quit"}, p.Quit()),
        ({"type": "quit", "extra": [1, 2]}, p.Quit()),  # extra fields are ignored
    ],
)
def test_from_wire_builds_each_client_message(obj: dict, expected: p.ClientMessage) -> None:
    assert p.from_wire(obj) == expected


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({}, "missing field 'type'"),
        ({"type": None}, "field 'type' must be a string"),
        ({"type": 1}, "field 'type' must be a string"),
        ({"type": "shout"}, "unknown type 'shout'"),
        ({"type": "newidentity"}, "newidentity: missing field 'identity'"),
        ({"type": "newidentity", "identity": None}, "newidentity: field 'identity' must be a string"),
        ({"type": "message", "content": 5}, "message: field 'content' must be a string"),
        ({"type": "joinroom", "roomid": True}, "joinroom: field 'roomid' must be a string"),
        ({"type": "movejoin", "identity": "Abc", "roomid": "R"}, "movejoin: missing field 'former'"),
        ({"type": "createroom", "roomid": {"a": 1}}, "createroom: field 'roomid' must be a string"),
        ({"type": "deleteroom"}, "deleteroom: missing field 'roomid'"),
    ],
)
def test_from_wire_rejects_unknown_types_and_missing_or_wrong_typed_fields(obj: dict, reason: str) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.from_wire(obj)
    assert info.value.reason == reason == str(info.value)


def test_an_unknown_type_is_echoed_truncated() -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.from_wire({"type": "x" * 1000})
    assert len(info.value.reason) < 60


@given(st.dictionaries(st.sampled_from(["type", "identity", "roomid", "content", "former"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                                 st.sampled_from(["message", "newidentity", "movejoin", "joinroom"]))))  # fmt: skip
def test_from_wire_either_returns_a_message_or_raises_protocol_error(obj: dict) -> None:
    try:
        message = p.from_wire(obj)
    except p.ProtocolError as exc:
        assert exc.reason
    else:
        assert obj["type"] in ("message", "newidentity", "movejoin", "joinroom") and message is not None


SERVER_MESSAGES = [
    p.newidentity_reply(True),
    p.newidentity_reply(False),
    p.roomlist(["MainHall-s1", "Den"]),
    p.roomcontents("Den", ["Alice", "Bob"], "Alice"),
    p.createroom_reply("Den", True),
    p.deleteroom_reply("Den", False),
    p.roomchange("Alice", "", "MainHall-s1"),
    p.route("Far", "10.0.0.2", 4445),
    p.serverchange(True, "s2"),
    p.message("Alice", "héllo ☃"),
    p.error("bad line"),
]


@pytest.mark.parametrize("message", SERVER_MESSAGES, ids=lambda m: m["type"])
def test_every_server_message_has_a_string_type_and_encodes_as_ascii(message: dict) -> None:
    assert isinstance(message["type"], str)
    line = encode(message)
    line.decode("ascii")
    assert json.loads(line) == message


def test_approved_is_the_string_true_or_false_never_a_boolean() -> None:
    assert p.newidentity_reply(True)["approved"] == "true"
    assert p.createroom_reply("Den", False)["approved"] == "false"
    assert p.deleteroom_reply("Den", True)["approved"] == "true"
    assert p.serverchange(False, "s1")["approved"] == "false"


def test_route_port_is_a_string_of_digits() -> None:
    assert p.route("Far", "h", 4445) == {"type": "route", "roomid": "Far", "host": "h", "port": "4445"}
    with pytest.raises(AssertionError):
        p.route("Far", "h", 0)


def test_exact_reply_shapes() -> None:
    assert p.roomchange("I", "F", "") == {"type": "roomchange", "identity": "I", "former": "F", "roomid": ""}
    assert p.roomcontents("R", ["a"], "") == {"type": "roomcontents", "roomid": "R", "identities": ["a"], "owner": ""}
    assert p.serverchange(True, "s2") == {"type": "serverchange", "approved": "true", "serverid": "s2"}
    assert p.message("I", "C") == {"type": "message", "identity": "I", "content": "C"}
    assert p.roomlist([]) == {"type": "roomlist", "rooms": []}
