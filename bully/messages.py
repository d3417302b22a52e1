"""The Fast Bully vocabulary (Lee & Choi, ICOIN 2002, section 3) plus the heartbeat, and their wire codec.

Every message names its `sender` and carries an election `epoch`, so a receiver can recognise a message
that belongs to an election or a reign it has already seen superseded. The schema (the dataclasses) is kept
apart from the codec (`to_wire`/`from_wire`): the core only ever sees validated dataclasses, and
`from_wire` is the one place that judges untrusted input (it raises `ProtocolError`, never anything else).

On the wire a message is a flat JSON object with a `kind` (see `KINDS`), e.g.
`{"kind": "election", "sender": "s2", "epoch": 7}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, assert_never

from cluster.names import is_valid_server_id

# Bounds on untrusted numbers and lists: an epoch or incarnation beyond 2**63 is corruption or an attack,
# and no cluster has more servers than this.
MAX_EPOCH = 2**63 - 1
MAX_INCARNATION = 2**63 - 1
MAX_VIEW_SERVERS = 1024


class ProtocolError(ValueError):
    """A wire object that is not a valid election message; str() says why."""


@dataclass(frozen=True, slots=True)
class IamUp:
    """A starting or recovering server announces itself; every receiver replies with a `View`."""

    sender: str
    epoch: int


@dataclass(frozen=True, slots=True)
class View:
    """Reply to `IamUp`: the sender's view of the servers it believes up and of the coordinator."""

    sender: str
    epoch: int
    coordinator: str | None
    up: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Election:
    """Sent by an initiator to every higher-priority server when it starts an election at `epoch`."""

    sender: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Answer:
    """A live higher-priority server's reply to `Election` (same epoch)."""

    sender: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Nomination:
    """The initiator asks the highest answerer to become coordinator."""

    sender: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Coordinator:
    """`sender` announces itself coordinator for `epoch`."""

    sender: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Periodic liveness signal (bully/node.py, "star" schedule): which life of the sender this is, and whom
    it follows."""

    sender: str
    epoch: int
    incarnation: int
    coordinator: str | None


Message = IamUp | View | Election | Answer | Nomination | Coordinator | Heartbeat

KINDS: dict[str, type[Message]] = {
    "iamup": IamUp,
    "view": View,
    "election": Election,
    "answer": Answer,
    "nomination": Nomination,
    "coordinator": Coordinator,
    "heartbeat": Heartbeat,
}
ELECTION_KINDS = frozenset(KINDS)


def kind_of(message: Message) -> str:
    match message:
        case IamUp():
            return "iamup"
        case View():
            return "view"
        case Election():
            return "election"
        case Answer():
            return "answer"
        case Nomination():
            return "nomination"
        case Coordinator():
            return "coordinator"
        case Heartbeat():
            return "heartbeat"
        case _:
            assert_never(message)


def to_wire(message: Message) -> dict[str, Any]:
    wire: dict[str, Any] = {"kind": kind_of(message), "sender": message.sender, "epoch": message.epoch}
    match message:
        case View():
            wire["coordinator"] = message.coordinator
            wire["up"] = list(message.up)
        case Heartbeat():
            wire["incarnation"] = message.incarnation
            wire["coordinator"] = message.coordinator
        case IamUp() | Election() | Answer() | Nomination() | Coordinator():
            pass
        case _:
            assert_never(message)
    return wire


def _server_id(wire: dict[str, Any], key: str) -> str:
    value = wire.get(key)
    if not isinstance(value, str) or not is_valid_server_id(value):
        raise ProtocolError(f"{key!r} must be a server id, got {value!r:.40}")
    return value


def _optional_server_id(wire: dict[str, Any], key: str) -> str | None:
    if key not in wire:
        raise ProtocolError(f"{key!r} is missing")
    return None if wire[key] is None else _server_id(wire, key)


def _count(wire: dict[str, Any], key: str, limit: int) -> int:
    value = wire.get(key)
    # bool is an int subclass; true/false is never a valid count.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ProtocolError(f"{key!r} must be an integer in 0..{limit}, got {value!r:.40}")
    return value


def from_wire(wire: object) -> Message:
    """Validate an untrusted wire object; `ProtocolError` says what is wrong with it."""
    if not isinstance(wire, dict):
        raise ProtocolError("message is not an object")
    kind = wire.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ProtocolError(f"unknown kind {kind!r:.40}")
    sender = _server_id(wire, "sender")
    epoch = _count(wire, "epoch", MAX_EPOCH)
    cls = KINDS[kind]
    if cls is View:
        up = wire.get("up")
        if not isinstance(up, list) or len(up) > MAX_VIEW_SERVERS:
            raise ProtocolError(f"'up' must be a list of at most {MAX_VIEW_SERVERS} server ids")
        for item in up:
            if not isinstance(item, str) or not is_valid_server_id(item):
                raise ProtocolError(f"'up' holds a non server id {item!r:.40}")
        return View(sender, epoch, _optional_server_id(wire, "coordinator"), tuple(up))
    if cls is Heartbeat:
        incarnation = _count(wire, "incarnation", MAX_INCARNATION)
        return Heartbeat(sender, epoch, incarnation, _optional_server_id(wire, "coordinator"))
    if cls is IamUp:
        return IamUp(sender, epoch)
    if cls is Election:
        return Election(sender, epoch)
    if cls is Answer:
        return Answer(sender, epoch)
    if cls is Nomination:
        return Nomination(sender, epoch)
    return Coordinator(sender, epoch)
