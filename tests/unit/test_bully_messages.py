"""The election wire codec: every message round-trips; untrusted input fails only with ProtocolError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bully.messages import (
    ELECTION_KINDS,
    Answer,
    Coordinator,
    Election,
    Heartbeat,
    IamUp,
    Message,
    Nomination,
    ProtocolError,
    View,
    from_wire,
    to_wire,
)

EVERY_KIND: list[Message] = [
    IamUp("s1", 0),
    View("s2", 3, "s5", ("s5", "s2")),
    View("s2", 3, None, ()),
    Election("s1", 4),
    Answer("s4", 4),
    Nomination("s1", 4),
    Coordinator("s4", 4),
    Heartbeat("s3", 9, 1_700_000_000_000, "s4"),
    Heartbeat("s3", 9, 1, None),
]


@pytest.mark.parametrize("message", EVERY_KIND, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_json(message: Message) -> None:
    wire = json.loads(json.dumps(to_wire(message)))
    assert from_wire(wire) == message


def test_every_kind_has_a_wire_name() -> None:
    assert {to_wire(m)["kind"] for m in EVERY_KIND} == ELECTION_KINDS


BAD: list[tuple[str, Any]] = [
    ("not an object", ["election"]),
    ("no kind", {"sender": "s1", "epoch": 1}),
    ("unknown kind", {"kind": "ping", "sender": "s1", "epoch": 1}),
    ("bad sender", {"kind": "election", "sender": "s 1", "epoch": 1}),
    ("missing sender", {"kind": "election", "epoch": 1}),
    ("negative epoch", {"kind": "election", "sender": "s1", "epoch": -1}),
    ("bool epoch", {"kind": "election", "sender": "s1", "epoch": True}),
    ("float epoch", {"kind": "election", "sender": "s1", "epoch": 1.5}),
    ("huge epoch", {"kind": "election", "sender": "s1", "epoch": 2**64}),
    ("view without up", {"kind": "view", "sender": "s1", "epoch": 1, "coordinator": None}),
    ("view up not a list", {"kind": "view", "sender": "s1", "epoch": 1, "coordinator": None, "up": "s1"}),
    ("view up bad id", {"kind": "view", "sender": "s1", "epoch": 1, "coordinator": None, "up": [1]}),
    ("view up too long", {"kind": "view", "sender": "s1", "epoch": 1, "coordinator": None, "up": ["s1"] * 2000}),
    ("view without coordinator", {"kind": "view", "sender": "s1", "epoch": 1, "up": []}),
    ("heartbeat bad coordinator", {"kind": "heartbeat", "sender": "s1", "epoch": 1, "incarnation": 1,
                                   "coordinator": 5}),
    ("heartbeat no incarnation", {"kind": "heartbeat", "sender": "s1", "epoch": 1, "coordinator": None}),
]  # fmt: skip


@pytest.mark.parametrize(("why", "wire"), BAD, ids=[b[0] for b in BAD])
def test_invalid_wire_objects_raise_protocol_error(why: str, wire: Any) -> None:
    with pytest.raises(ProtocolError):
        from_wire(wire)


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(
    st.fixed_dictionaries(
        {"kind": st.sampled_from(sorted(ELECTION_KINDS)) | st.text(max_size=5)},
        optional={
            "sender": st.sampled_from(["s1", "s2"]) | json_values,
            "epoch": st.integers(min_value=-2, max_value=5) | json_values,
            "incarnation": st.integers(min_value=-1, max_value=3) | json_values,
            "coordinator": st.none() | st.just("s2") | json_values,
            "up": st.lists(st.sampled_from(["s1", "s2"])) | json_values,
        },
    )
)
def test_arbitrary_objects_either_decode_or_raise_protocol_error(wire: dict[str, Any]) -> None:
    try:
        message = from_wire(wire)
    except ProtocolError:
        return
    assert from_wire(to_wire(message)) == message
