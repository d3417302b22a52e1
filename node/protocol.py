"""The client wire schema (docs/protocol.md): what clients send, and constructors for what we answer.

Schema only, no codec: `cluster.framing` turns lines into dicts and dicts into ASCII lines. `from_wire`
validates a decoded object and returns one frozen dataclass per client message, or raises `ProtocolError`
with a reason fit to send back in an error line. Extra fields are ignored (older and newer clients add
some); missing or wrong-typed fields are errors.

The reply constructors are the only place server messages are built, so the rules that keep the classic
Java client alive hold by construction: every object has a string "type", `approved` is the string
"true"/"false" (a JSON boolean crashes the client) and `route.port` is a string of digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ProtocolError(Exception):
    """A decoded JSON object that is not a valid client message; str() is the reason for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- client messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewIdentity:
    identity: str


@dataclass(frozen=True, slots=True)
class List:
    pass


@dataclass(frozen=True, slots=True)
class Who:
    pass


@dataclass(frozen=True, slots=True)
class CreateRoomMessage:
    roomid: str


@dataclass(frozen=True, slots=True)
class JoinRoom:
    roomid: str


@dataclass(frozen=True, slots=True)
class MoveJoin:
    identity: str
    former: str
    roomid: str


@dataclass(frozen=True, slots=True)
class DeleteRoomMessage:
    roomid: str


# Not frozen, unlike every other message: a frozen dataclass's __init__ sets each field through
# object.__setattr__, twice the cost, and this one is built for every chat line (issue 14). Nothing
# mutates it; the chat core only reads `content`.
@dataclass(slots=True)
class Message:
    content: str


@dataclass(frozen=True, slots=True)
class Quit:
    pass


ClientMessage = NewIdentity | List | Who | CreateRoomMessage | JoinRoom | MoveJoin | DeleteRoomMessage | Message | Quit

# Stateless messages are singletons: no allocation per list/who/quit line.
_LIST = List()
_WHO = Who()
_QUIT = Quit()

# Longest type name echoed back in an error reason; the rest of a hostile value is not worth repeating.
_MAX_ECHO = 32


def _text(obj: dict[str, Any], field: str, kind: str) -> str:
    value = obj.get(field)
    if isinstance(value, str):
        return value
    if value is None and field not in obj:
        raise ProtocolError(f"{kind}: missing field '{field}'")
    raise ProtocolError(f"{kind}: field '{field}' must be a string")


def from_wire(obj: dict[str, Any]) -> ClientMessage:
    """The client message `obj` encodes; ProtocolError on an unknown type or a missing/wrong-typed field."""
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("missing field 'type'" if "type" not in obj else "field 'type' must be a string")
    # Ordered by frequency: chat traffic is almost all "message".
    if kind == "message":
        return Message(_text(obj, "content", kind))
    if kind == "list":
        return _LIST
    if kind == "who":
        return _WHO
    if kind == "joinroom":
        return JoinRoom(_text(obj, "roomid", kind))
    if kind == "createroom":
        return CreateRoomMessage(_text(obj, "roomid", kind))
    if kind == "deleteroom":
        return DeleteRoomMessage(_text(obj, "roomid", kind))
    if kind == "newidentity":
        return NewIdentity(_text(obj, "identity", kind))
    if kind == "movejoin":
        return MoveJoin(_text(obj, "identity", kind), _text(obj, "former", kind), _text(obj, "roomid", kind))
    if kind == "quit":
        return _QUIT
    shown = kind if len(kind) <= _MAX_ECHO else kind[:_MAX_ECHO] + "..."
    raise ProtocolError(f"unknown type {shown!r}")


# -- server messages ----------------------------------------------------------------------------------


def _flag(approved: bool) -> str:
    return "true" if approved else "false"


def newidentity_reply(approved: bool) -> dict[str, Any]:
    return {"type": "newidentity", "approved": _flag(approved)}


def roomlist(rooms: list[str]) -> dict[str, Any]:
    return {"type": "roomlist", "rooms": rooms}


def roomcontents(roomid: str, identities: list[str], owner: str) -> dict[str, Any]:
    return {"type": "roomcontents", "roomid": roomid, "identities": identities, "owner": owner}


def createroom_reply(roomid: str, approved: bool) -> dict[str, Any]:
    return {"type": "createroom", "roomid": roomid, "approved": _flag(approved)}


def deleteroom_reply(roomid: str, approved: bool) -> dict[str, Any]:
    return {"type": "deleteroom", "roomid": roomid, "approved": _flag(approved)}


def roomchange(identity: str, former: str, roomid: str) -> dict[str, Any]:
    """rc(X, A, B); former "" = joined the server, roomid "" = quit, former == roomid = refused join."""
    return {"type": "roomchange", "identity": identity, "former": former, "roomid": roomid}


def route(roomid: str, host: str, port: int) -> dict[str, Any]:
    # The Java client parses the port with Integer.parseInt on a string; a JSON number crashes it.
    assert isinstance(port, int) and 0 < port < 65536, port
    return {"type": "route", "roomid": roomid, "host": host, "port": str(port)}


def serverchange(approved: bool, serverid: str) -> dict[str, Any]:
    return {"type": "serverchange", "approved": _flag(approved), "serverid": serverid}


def message(identity: str, content: str) -> dict[str, Any]:
    return {"type": "message", "identity": identity, "content": content}


def error(reason: str) -> dict[str, Any]:
    """Our reply to bad input; the Java client ignores types it does not know."""
    return {"type": "error", "reason": reason}
