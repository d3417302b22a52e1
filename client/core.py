"""The terminal client's core: user lines in, protocol messages out; server messages in, printed lines out.

No I/O (like h11: the shell owns the sockets and the terminal). Every call returns a list of effects the
shell applies in order: `SendMessage` on the current connection, `Show` a line on stdout, `Hint` an
explanation on stderr, `FollowRoute` / `AdoptRoute` / `AbandonRoute` for a server change, `Reconnect` after
a lost connection, `Exit` with a status. The printed lines are exactly the Java client's
(docs/protocol.md, "The Java client's view"), so a user of either feels at home.

Theory of operation
-------------------
Phases and what each accepts:

- LOGIN: `newidentity` sent on the first connection. Accepts the newidentity answer (approved: ACTIVE;
  refused: `<I> already in use.` and Exit 1) and a lost connection (Exit 3).
- ACTIVE: identified. User commands become protocol messages; every server message is rendered.
  A `route` (the answer to a join of a room on another server) moves to ROUTING.
- ROUTING: the shell opens the routed server and sends our `movejoin` (former = the room we are leaving);
  the old connection stays open until `serverchange` approves (protocol.md "movejoin": serverchange
  comes first). Approved: `<I> switches to server S`, AdoptRoute, ACTIVE. Anything else: `Server change
  failed`, AbandonRoute, and back to ACTIVE on the old server (or RECONNECTING if it died meanwhile).
- RECONNECTING: the connection dropped without a quit. The shell retakes the identity elsewhere
  (`newidentity` again: the cluster releases the name once the dead server is declared down) and reports
  back with `reconnected` (ACTIVE) or `reconnect_failed` (Exit 3). Only `#quit` is accepted meanwhile.
- QUITTING: `quit` sent. Our own `rc(I, F, "")` or the connection closing ends the session (Exit 0).
- DONE: an Exit was emitted; everything is ignored.

Invariants: `room` is the room the server last put us in ("" before the first roomchange); commands are
turned into messages only in ACTIVE; at most one command's answer is awaited (`pending`), which the shell
uses to pace scripts (`--wait-replies`) and to time out a silent server.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal, assert_never

from cluster.framing import MAX_LINE_BYTES, encode
from cluster.names import is_valid_name

EXIT_OK = 0
EXIT_IDENTITY_REFUSED = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3

HELP_LINES = (
    "Commands:",
    "  #list              list every chat room of the cluster",
    "  #who               who is in your room (the owner is starred)",
    "  #createroom ROOM   create a room you own and move into it",
    "  #joinroom ROOM     move to a room, on whichever server hosts it",
    "  #deleteroom ROOM   delete the room you own; its members go to the MainHall",
    "  #quit              leave the chat (end of input does the same)",
    "  #help              this help",
    "Any other line is a message to your room; start it with ## to send a line beginning with #.",
)
NAME_RULE = "3 to 16 ASCII letters or digits, starting with a letter"


# --- user commands ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListRooms:
    pass


@dataclass(frozen=True, slots=True)
class WhoCommand:
    pass


@dataclass(frozen=True, slots=True)
class CreateRoomCommand:
    room: str


@dataclass(frozen=True, slots=True)
class JoinRoomCommand:
    room: str


@dataclass(frozen=True, slots=True)
class DeleteRoomCommand:
    room: str


@dataclass(frozen=True, slots=True)
class QuitCommand:
    pass


@dataclass(frozen=True, slots=True)
class Help:
    pass


@dataclass(frozen=True, slots=True)
class Say:
    content: str


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: str


@dataclass(frozen=True, slots=True)
class Blank:
    pass


# What the user typed (named apart from the protocol messages in node/protocol.py that some of them send).
UserCommand = (
    ListRooms
    | WhoCommand
    | CreateRoomCommand
    | JoinRoomCommand
    | DeleteRoomCommand
    | QuitCommand
    | Help
    | Say
    | Invalid
    | Blank
)

_NO_ARGUMENT: dict[str, UserCommand] = {
    "#list": ListRooms(),
    "#who": WhoCommand(),
    "#quit": QuitCommand(),
    "#help": Help(),
}
_ROOM_ARGUMENT: dict[str, type[CreateRoomCommand | JoinRoomCommand | DeleteRoomCommand]] = {
    "#createroom": CreateRoomCommand,
    "#joinroom": JoinRoomCommand,
    "#deleteroom": DeleteRoomCommand,
}


def parse_command(line: str) -> UserCommand:
    """One line the user typed. `#word` is a command; `##...` escapes a message starting with `#`.

    Words are split on any whitespace (the Java client splits on single spaces and rejects the rest; being
    lenient here costs nothing). An empty line is ignored rather than sent as an empty message: it is almost
    always a stray Enter.
    """
    if line == "":
        return Blank()
    if line.startswith("##"):
        return Say(line[1:])
    if not line.startswith("#"):
        return Say(line)
    words = line.split()
    name = words[0] if words else "#"
    if name in _NO_ARGUMENT:
        if len(words) != 1:
            return Invalid(f"Usage: {name} (no arguments)")
        return _NO_ARGUMENT[name]
    if name in _ROOM_ARGUMENT:
        if len(words) != 2:
            return Invalid(f"Usage: {name} ROOM")
        return _ROOM_ARGUMENT[name](words[1])
    return Invalid(f"Unknown command {name}. Type #help for the commands, or ## to send a line starting with #.")


# --- effects -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendMessage:
    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Show:
    """An event line for stdout (the Java client's wording, or a connection event)."""

    line: str


@dataclass(frozen=True, slots=True)
class Hint:
    """An explanation for a person (stderr), kept apart so scripts can read stdout as events only."""

    line: str


@dataclass(frozen=True, slots=True)
class FollowRoute:
    host: str
    port: int
    movejoin: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AdoptRoute:
    """The routed connection becomes the current one; close the old one (protocol.md: the client does)."""


@dataclass(frozen=True, slots=True)
class AbandonRoute:
    """Close the routed connection if one was opened; the old connection stays current."""


@dataclass(frozen=True, slots=True)
class Reconnect:
    """The current connection is gone: retake the identity on some server."""


@dataclass(frozen=True, slots=True)
class Exit:
    status: int


Effect = SendMessage | Show | Hint | FollowRoute | AdoptRoute | AbandonRoute | Reconnect | Exit


class Phase(enum.Enum):
    LOGIN = "login"
    ACTIVE = "active"
    ROUTING = "routing"
    RECONNECTING = "reconnecting"
    QUITTING = "quitting"
    DONE = "done"


PendingKind = Literal["login", "list", "who", "createroom", "joinroom", "deleteroom", "quit"]


@dataclass(slots=True)
class Pending:
    """The answer the last command is waiting for.

    "Answered" means: the direct reply arrived and, when it implies a move of our own (an approved login,
    createroom or deleteroom), our own roomchange too; for joinroom, our own roomchange (possibly after a
    route and a server change); for list/who, the list; for quit, our own quit roomchange.
    """

    kind: PendingKind
    room: str = ""
    serial: int = 0
    reply_seen: bool = False
    approved: bool = False
    own_move_seen: bool = False

    @property
    def answered(self) -> bool:
        return self.reply_seen and (not self.approved or self.own_move_seen)

    def describe(self) -> str:
        if self.kind == "login":
            return "newidentity"
        return f"#{self.kind} {self.room}".rstrip()


class MalformedMessage(Exception):
    """A server message of a known type whose fields are missing or of the wrong type."""


def printable(text: str) -> str:
    """`text` safe for a terminal: other users' control characters (ANSI escapes, newlines, carriage
    returns) are shown escaped, so nobody can fake lines or repaint the screen."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _string(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise MalformedMessage(f"{message.get('type')}: field {key!r} is not a string")
    return value


def _strings(message: dict[str, Any], key: str) -> list[str]:
    value = message.get(key)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise MalformedMessage(f"{message.get('type')}: field {key!r} is not a list of strings")
    return value


def is_approved(message: dict[str, Any] | None, expected_type: str) -> bool:
    """True for `{"type": expected_type, "approved": "true"}`; the protocol's approved is a string."""
    return message is not None and message.get("type") == expected_type and message.get("approved") == "true"


def fits_one_line(message: dict[str, Any]) -> bool:
    """Whether the encoded message stays within the servers' line limit (they disconnect beyond it)."""
    return len(encode(message)) - 1 <= MAX_LINE_BYTES


@dataclass(slots=True)
class _Route:
    room: str
    former: str
    old_connection_lost: bool = False


@dataclass
class ClientCore:
    """One user's session across connections; see the module docstring for the phases."""

    identity: str
    server: str = ""
    phase: Phase = Phase.LOGIN
    room: str = ""
    pending: Pending | None = None
    _serial: int = 0
    _route: _Route | None = field(default=None, repr=False)
    _room_before_loss: str = field(default="", repr=False)

    # --- queries the shell uses -------------------------------------------------------------------

    @property
    def prompt(self) -> str:
        """`[room] identity> `, like the Java client; while offline the room is replaced by a state."""
        if self.phase is Phase.RECONNECTING:
            return f"[reconnecting...] {self.identity}> "
        return f"[{self.room}] {self.identity}> "

    @property
    def awaiting_reply(self) -> bool:
        return self.pending is not None

    @property
    def logged_in(self) -> bool:
        return self.phase not in (Phase.LOGIN, Phase.DONE)

    def ready_for_input(self, wait_replies: bool) -> bool:
        """Whether a user line can be processed now (else the shell holds it, in order)."""
        if self.phase is not Phase.ACTIVE:
            return False
        return not (wait_replies and self.awaiting_reply)

    def newidentity(self) -> dict[str, Any]:
        return {"type": "newidentity", "identity": self.identity}

    # --- session start and user input -------------------------------------------------------------

    def start(self) -> list[Effect]:
        """The first line of the session."""
        assert self.phase is Phase.LOGIN, self.phase
        if not is_valid_name(self.identity):
            # The server would refuse it anyway; saying why beats `<I> already in use.`
            self.phase = Phase.DONE
            return [Hint(f"Invalid identity {self.identity!r}: {NAME_RULE}."), Exit(EXIT_IDENTITY_REFUSED)]
        self._expect("login")
        return [SendMessage(self.newidentity())]

    def command(self, line: str) -> list[Effect]:
        """One line of user input (already without its newline)."""
        parsed = parse_command(line)
        if self.phase is Phase.DONE:
            return []
        if isinstance(parsed, QuitCommand) and self.phase is Phase.RECONNECTING:
            # Nobody to say goodbye to; the server side already ended the old session.
            self.phase = Phase.DONE
            return [Exit(EXIT_OK)]
        if isinstance(parsed, Blank | Invalid | Help):
            return self._local(parsed)
        if self.phase is not Phase.ACTIVE:
            return [Hint(f"Not connected right now ({self.phase.value}); {line!r} was not sent.")]
        match parsed:
            case ListRooms():
                self._expect("list")
                return [SendMessage({"type": "list"})]
            case WhoCommand():
                self._expect("who")
                return [SendMessage({"type": "who"})]
            case CreateRoomCommand(room):
                self._expect("createroom", room)
                return [SendMessage({"type": "createroom", "roomid": room})]
            case JoinRoomCommand(room):
                self._expect("joinroom", room)
                return [SendMessage({"type": "joinroom", "roomid": room})]
            case DeleteRoomCommand(room):
                self._expect("deleteroom", room)
                return [SendMessage({"type": "deleteroom", "roomid": room})]
            case QuitCommand():
                self.phase = Phase.QUITTING
                self._expect("quit")
                return [SendMessage({"type": "quit"})]
            case Say(content):
                message = {"type": "message", "content": content}
                if not fits_one_line(message):
                    return [Hint(f"Message too long: the servers accept lines up to {MAX_LINE_BYTES} bytes.")]
                # A message has no answer, so nothing is awaited.
                return [SendMessage(message)]
            case _:
                raise AssertionError(f"unhandled command {parsed!r}")

    def end_of_input(self) -> list[Effect]:
        """Stdin closed or Ctrl-D: the same as #quit."""
        return self.command("#quit")

    def _local(self, parsed: Blank | Invalid | Help) -> list[Effect]:
        match parsed:
            case Blank():
                return []
            case Invalid(reason):
                return [Hint(reason)]
            case Help():
                return [Show(line) for line in HELP_LINES]
            case _:
                assert_never(parsed)

    def _expect(self, kind: PendingKind, room: str = "") -> None:
        self._serial += 1
        self.pending = Pending(kind, room, self._serial)

    def cancel_wait(self) -> str:
        """The shell gave up waiting (timeout); returns what was awaited, for the message."""
        assert self.pending is not None
        described = self.pending.describe()
        self.pending = None
        return described

    # --- server messages --------------------------------------------------------------------------

    def receive(self, message: dict[str, Any]) -> list[Effect]:
        """One message from the current server."""
        if self.phase is Phase.DONE:
            return []
        try:
            effects = self._dispatch(message)
        except MalformedMessage as exc:
            return [Hint(f"Ignored a malformed message from the server ({exc}).")]
        if self.pending is not None and self.pending.answered:
            self.pending = None
        return effects

    def _dispatch(self, message: dict[str, Any]) -> list[Effect]:
        kind = message.get("type")
        if kind == "newidentity":
            return self._on_newidentity(message)
        if kind == "roomlist":
            rooms = _strings(message, "rooms")
            self._replied("list")
            return [Show("List of chat rooms:" + "".join(f" {room}" for room in rooms))]
        if kind == "roomcontents":
            return self._on_roomcontents(message)
        if kind == "createroom":
            return self._on_room_reply(message, "createroom", "Room {} is created.", "Create room {} failed.")
        if kind == "deleteroom":
            return self._on_room_reply(message, "deleteroom", "Room {} is deleted.", "Delete room {} failed.")
        if kind == "roomchange":
            return self._on_roomchange(message)
        if kind == "route":
            return self._on_route(message)
        if kind == "message":
            return [Show(f"{_string(message, 'identity')}: {_string(message, 'content')}")]
        if kind == "error":
            reason = message.get("reason")
            return [Hint(f"The server reported an error: {reason if isinstance(reason, str) else message}")]
        # The Java client ignores unknown types (e.g. a late serverchange); so do we.
        return []

    def _replied(self, kind: PendingKind, approved: bool = False) -> None:
        if self.pending is not None and self.pending.kind == kind:
            self.pending.reply_seen = True
            self.pending.approved = approved

    def _on_newidentity(self, message: dict[str, Any]) -> list[Effect]:
        if self.phase is not Phase.LOGIN:
            return []  # only the first connection's login is answered here; reconnects are the shell's
        if is_approved(message, "newidentity"):
            self.phase = Phase.ACTIVE
            self._replied("login", approved=True)
            return [Show("User has been approved.")]
        self.phase = Phase.DONE
        self.pending = None
        return [
            Show(f"{self.identity} already in use."),
            Hint(
                f"The server refused identity {self.identity}: another client holds it (or the cluster "
                "could not confirm it right now). Try another name, or again shortly."
            ),
            Exit(EXIT_IDENTITY_REFUSED),
        ]

    def _on_roomcontents(self, message: dict[str, Any]) -> list[Effect]:
        room = _string(message, "roomid")
        identities = _strings(message, "identities")
        owner = _string(message, "owner")
        # `who` describes the requester's own room, so it also corrects our idea of where we are.
        self.room = room
        self._replied("who")
        return [Show(f"{room} contains" + "".join(f" {i}{'*' if i == owner else ''}" for i in identities))]

    def _on_room_reply(self, message: dict[str, Any], kind: PendingKind, yes: str, no: str) -> list[Effect]:
        room = _string(message, "roomid")
        approved = is_approved(message, kind)
        self._replied(kind, approved)
        if approved:
            return [Show(yes.format(room))]
        effects: list[Effect] = [Show(no.format(room))]
        if kind == "createroom":
            effects.append(Hint(f"A room id is {NAME_RULE}, must be unused anywhere, and you can own one room."))
        else:
            effects.append(Hint("Only the owner can delete a room, and only an existing room it owns."))
        return effects

    def _on_roomchange(self, message: dict[str, Any]) -> list[Effect]:
        identity = _string(message, "identity")
        former = _string(message, "former")
        room = _string(message, "roomid")
        mine = identity == self.identity
        if room == "":
            if mine:
                # Our own quit (asked for, or the server ending the session): the session is over.
                self.phase = Phase.DONE
                self.pending = None
                return [Show(f"{identity} has quit!"), Exit(EXIT_OK)]
            return [Show(f"{identity} has quit!")]
        if former == room:
            effects: list[Effect] = [Show("room unchanged")]
            if mine and self.pending is not None and self.pending.kind == "joinroom":
                self.pending.reply_seen = True
                effects.append(
                    Hint(
                        f"Could not join {self.pending.room}: no such room, you are already there, "
                        "or you own the room you are in (delete it first)."
                    )
                )
            return effects
        if mine:
            self.room = room
            self._own_move(former, room)
        if former == "":
            return [Show(f"{identity} moves to {room}")]
        return [Show(f"{identity} moves from {former} to {room}")]

    def _own_move(self, former: str, room: str) -> None:
        pending = self.pending
        if pending is None:
            return
        if pending.kind == "joinroom":
            pending.reply_seen = True
        elif (
            pending.kind == "login"
            or (pending.kind == "createroom" and room == pending.room)
            or (pending.kind == "deleteroom" and former == pending.room)
        ):
            pending.own_move_seen = True

    def _on_route(self, message: dict[str, Any]) -> list[Effect]:
        room = _string(message, "roomid")
        host = _string(message, "host")
        port_text = _string(message, "port")
        if self.phase is not Phase.ACTIVE:
            return []
        # Routed away: the old server already took us out of our room; we keep showing it until the move.
        self.phase = Phase.ROUTING
        self._route = _Route(room=room, former=self.room)
        port = int(port_text) if port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536 else 0
        movejoin = {"type": "movejoin", "identity": self.identity, "former": self.room, "roomid": room}
        if port == 0:
            return self.route_reply(None, f"the server routed us to an invalid port {port_text!r}")
        return [Hint(f"{room} is on another server ({host}:{port}); moving there."), FollowRoute(host, port, movejoin)]

    # --- route following ----------------------------------------------------------------------------

    def route_reply(self, reply: dict[str, Any] | None, failure: str = "") -> list[Effect]:
        """The first line the routed server sent (None if we got none: `failure` says why)."""
        route = self._route
        if self.phase is not Phase.ROUTING or route is None:
            return [AbandonRoute()]
        self._route = None
        server_id = reply.get("serverid") if reply is not None else None
        if is_approved(reply, "serverchange") and isinstance(server_id, str):
            self.phase = Phase.ACTIVE
            self.server = server_id
            # Our roomchange comes next on the new connection and completes a pending #joinroom.
            return [AdoptRoute(), Show(f"{self.identity} switches to server {server_id}")]
        effects: list[Effect] = [AbandonRoute(), Show("Server change failed")]
        if reply is not None and not failure:
            failure = (
                "the new server refused the move"
                if reply.get("type") == "serverchange"
                else (f"the new server answered {reply.get('type')!r} instead of serverchange")
            )
        if failure:
            effects.append(Hint(f"Could not move to {route.room}: {failure}."))
        self.pending = None
        if route.old_connection_lost:
            self.phase = Phase.RECONNECTING
            self._room_before_loss = route.former
            return [*effects, Show(f"Lost connection to server {self.server}; reconnecting..."), Reconnect()]
        self.phase = Phase.ACTIVE
        return [*effects, Hint(f"Still connected to server {self.server}; #who shows the room you are in.")]

    # --- connection loss and reconnection -----------------------------------------------------------

    def connection_lost(self, reason: str) -> list[Effect]:
        """The current connection ended (EOF, reset, line too long) without our quit being answered."""
        match self.phase:
            case Phase.DONE:
                return []
            case Phase.QUITTING:
                self.phase = Phase.DONE
                return [Exit(EXIT_OK)]
            case Phase.LOGIN:
                self.phase = Phase.DONE
                return [
                    Show(f"Connection to server {self.server} closed before {self.identity} was approved ({reason})."),
                    Exit(EXIT_CONNECTION),
                ]
            case Phase.ROUTING:
                # Decided when the route resolves: on success the old connection is not needed.
                assert self._route is not None
                self._route.old_connection_lost = True
                return []
            case Phase.RECONNECTING:
                return []
            case Phase.ACTIVE:
                self.phase = Phase.RECONNECTING
                self.pending = None
                self._room_before_loss = self.room
                return [Show(f"Lost connection to server {self.server} ({reason}); reconnecting..."), Reconnect()]
            case _:
                assert_never(self.phase)

    def reconnected(self, server: str) -> list[Effect]:
        """The shell retook our identity on `server` (newidentity approved on a new connection)."""
        assert self.phase is Phase.RECONNECTING, self.phase
        self.phase = Phase.ACTIVE
        self.server = server
        # The server now puts us in its MainHall; wait for that roomchange like after the first login.
        self._expect("login")
        assert self.pending is not None
        self.pending.reply_seen = True
        self.pending.approved = True
        effects: list[Effect] = [Show(f"Reconnected to server {server} as {self.identity}.")]
        former = self._room_before_loss
        if former and not former.startswith("MainHall-"):
            effects.append(Hint(f"You were in {former}; if it still exists, #joinroom {former} takes you back."))
        return effects

    def reconnect_failed(self, reason: str) -> list[Effect]:
        if self.phase is not Phase.RECONNECTING:
            return []
        self.phase = Phase.DONE
        return [Show(f"Could not reconnect: {reason}."), Exit(EXIT_CONNECTION)]

    def reply_timed_out(self, seconds: float) -> list[Effect]:
        """The shell's deadline for the pending answer passed."""
        if self.pending is None:
            return []
        described = self.cancel_wait()
        if self.phase is Phase.QUITTING:
            self.phase = Phase.DONE
            return [Exit(EXIT_OK)]
        if self.phase is Phase.LOGIN:
            self.phase = Phase.DONE
            return [
                Show(f"No answer to {described} from server {self.server} within {seconds:g} s."),
                Exit(EXIT_CONNECTION),
            ]
        return [Hint(f"No answer to {described} within {seconds:g} s; going on.")]
