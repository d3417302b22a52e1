"""The registry of identities, rooms and live servers: a pure, deterministic state machine.

Theory of operation
-------------------
Every server holds one `RegistryState` replica. The Raft log (registry/replicated.py) feeds every replica
the same commands in the same order, and `apply` is a pure function of (state, command), so replicas at
the same applied index are identical. Nothing here reads a clock, randomness or the environment: a
timestamp a rule needs (`BeginMove.at`) is chosen by the caller and travels inside the command.

State
    identities  name -> `IdentityEntry`. An identity is either *held* by a server (a client is connected
                there) or *in transit* to a server (the client was routed there and has not arrived yet).
                In both cases `server` is where it lives or is headed, and `incarnation` is that server's
                incarnation, so dropping a server drops what lives there and what is headed there.
    rooms       room id -> `RoomEntry` (hosting server, owner, the host's incarnation). Each server up has
                its MainHall `MainHall-<server>` with owner "".
    servers     server -> (incarnation, up). A server that restarts gets a larger incarnation (the caller
                picks it, e.g. start time in ms) and announces it with `ServerUp`.
    results     the result of each of the last `MAX_REMEMBERED_REQUESTS` request ids, oldest evicted first.

Commands and what each accepts
    ClaimIdentity   a free, valid name for a client of an up server.
    ReleaseIdentity by the server holding it (or the one it is headed to); deletes the room it owns.
    BeginMove       by the holder, to another up server; never for a room owner (it cannot leave its room).
    CompleteMove    at the server the identity is headed to; a free name is simply claimed there.
    ExpireMove      by anyone, only for the exact move (destination and `since`) it names.
    CreateRoom      a free, valid, non-MainHall id, owner held by the hosting server, one room per owner.
    DeleteRoom      by the hosting server on behalf of the owner; never a MainHall.
    ServerUp        a new (larger) incarnation: drops whatever an older incarnation left, recreates MainHall.
    ServerDown      drops everything of that incarnation or older and marks the server down.

Fencing: a command that names a server's incarnation is accepted only if that exact incarnation is
recorded and up. An older incarnation, or one declared down, gets "fenced" and changes nothing; a newer
one that has not committed its `ServerUp` yet gets "server-down".

Invariants (checked by tests/unit/test_registry_stateful.py)
    - an identity has one entry (dict keys), a room id has one entry, an owner owns at most one room;
    - every identity and room references a server that is up, with that server's current incarnation;
    - a room owner's identity is held (not in transit) on the room's server;
    - a repeated request id returns the stored result and changes nothing.
Uniqueness is decided here, in log order (check-and-set inside the applied command), never by a read on
one server followed by a write.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, assert_never

from cluster.names import is_mainhall, is_valid_name, is_valid_server_id, mainhall

# How many request ids (with their results) a replica remembers for idempotent retries. A retry arrives
# within seconds, so this bounds memory (and the full dump) while covering any realistic retry window.
MAX_REMEMBERED_REQUESTS = 100_000
# Request ids are chosen by servers; anything longer is a bug or an attack, not an id.
MAX_REQUEST_ID_LENGTH = 128


# -- commands -------------------------------------------------------------------------------------
# A command's class name is stored: PySyncObj's journal pickles it (`registry.state.<Name>`) and the
# coordination wire carries it as `"op"` (registry/codec.py). Renaming one breaks every existing journal;
# other layers name their own classes apart instead (client messages `CreateRoomMessage`, chat-core
# requests `CreateRoomRequest`, late-commit actions `SubmitRoomDelete`).


@dataclass(frozen=True, slots=True)
class ClaimIdentity:
    request_id: str
    identity: str
    server: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class ReleaseIdentity:
    request_id: str
    identity: str
    server: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class BeginMove:
    request_id: str
    identity: str
    from_server: str
    to_server: str
    incarnation: int  # of from_server
    at: float  # wall-clock seconds chosen by the caller; compared with ExpireMove.since


@dataclass(frozen=True, slots=True)
class CompleteMove:
    request_id: str
    identity: str
    server: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class ExpireMove:
    request_id: str
    identity: str
    to_server: str
    since: float


@dataclass(frozen=True, slots=True)
class CreateRoom:
    request_id: str
    room_id: str
    server: str
    incarnation: int
    owner: str


@dataclass(frozen=True, slots=True)
class DeleteRoom:
    request_id: str
    room_id: str
    server: str
    incarnation: int
    owner: str


@dataclass(frozen=True, slots=True)
class ServerUp:
    request_id: str
    server: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class ServerDown:
    request_id: str
    server: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class Barrier:
    """Changes nothing. A server that committed one has applied every entry before it: after a stall it
    proves the replica is current (a "server down" for this server, say, has been seen)."""

    request_id: str


Command = (
    ClaimIdentity
    | ReleaseIdentity
    | BeginMove
    | CompleteMove
    | ExpireMove
    | CreateRoom
    | DeleteRoom
    | ServerUp
    | ServerDown
    | Barrier
)

COMMAND_TYPES: tuple[type, ...] = (
    ClaimIdentity,
    ReleaseIdentity,
    BeginMove,
    CompleteMove,
    ExpireMove,
    CreateRoom,
    DeleteRoom,
    ServerUp,
    ServerDown,
    Barrier,
)


# -- results and entries --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    """What an applied command did. `reason` is "" on success, else one word the caller can act on:
    invalid, taken, not-held, not-holder, owner-has-room, no-such-room, not-host, not-owner, stale,
    server-down, fenced, internal-error."""

    ok: bool
    reason: str = ""
    released_identities: tuple[str, ...] = ()
    released_rooms: tuple[str, ...] = ()


OK = Result(True)


def _fail(reason: str) -> Result:
    return Result(False, reason)


@dataclass(frozen=True, slots=True)
class IdentityEntry:
    identity: str
    server: str  # where it lives, or where it is headed when in transit
    incarnation: int  # of `server`
    in_transit: bool = False
    from_server: str | None = None  # set only while in transit
    since: float = 0.0  # BeginMove.at while in transit, else 0.0


@dataclass(frozen=True, slots=True)
class RoomEntry:
    room_id: str
    server: str
    owner: str  # "" for a MainHall
    incarnation: int  # of `server`


@dataclass(frozen=True, slots=True)
class ServerRecord:
    incarnation: int
    up: bool


# -- the state machine ----------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class RegistryState:
    """See the module docstring. Not thread-safe: the replicated adapter serialises access."""

    def __init__(self) -> None:
        self._identities: dict[str, IdentityEntry] = {}
        self._rooms: dict[str, RoomEntry] = {}
        self._servers: dict[str, ServerRecord] = {}
        self._owned: dict[str, str] = {}  # owner identity -> room id (index over _rooms)
        self._results: OrderedDict[str, Result] = OrderedDict()

    # -- applying ---------------------------------------------------------------------------------

    def apply(self, command: Command) -> Result:
        """Apply one command in log order; a request id seen recently returns its stored result."""
        request_id = getattr(command, "request_id", None)
        if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID_LENGTH:
            return _fail("invalid")
        stored = self._results.get(request_id)
        if stored is not None:
            return stored
        result = self._dispatch(command)
        self._results[request_id] = result
        if len(self._results) > MAX_REMEMBERED_REQUESTS:
            self._results.popitem(last=False)
        return result

    def _dispatch(self, command: Command) -> Result:
        match command:
            case ClaimIdentity():
                return self._claim_identity(command)
            case ReleaseIdentity():
                return self._release_identity(command)
            case BeginMove():
                return self._begin_move(command)
            case CompleteMove():
                return self._complete_move(command)
            case ExpireMove():
                return self._expire_move(command)
            case CreateRoom():
                return self._create_room(command)
            case DeleteRoom():
                return self._delete_room(command)
            case ServerUp():
                return self._server_up(command)
            case ServerDown():
                return self._server_down(command)
            case Barrier():
                return OK
            case _:
                # Unpickled from a log written by other code: refuse rather than crash every replica.
                if isinstance(command, COMMAND_TYPES):
                    assert_never(command)
                return _fail("invalid")

    def _fencing(self, server: object, incarnation: object) -> str | None:
        """Why a command naming (server, incarnation) must be refused, or None if that incarnation is live."""
        if not isinstance(server, str) or not _is_int(incarnation):
            return "invalid"
        record = self._servers.get(server)
        if record is None:
            return "server-down"
        assert isinstance(incarnation, int)
        if incarnation < record.incarnation or (incarnation == record.incarnation and not record.up):
            return "fenced"
        if incarnation > record.incarnation:
            return "server-down"  # restarted but its ServerUp has not committed yet
        return None

    def _claim_identity(self, c: ClaimIdentity) -> Result:
        if not is_valid_name(c.identity):
            return _fail("invalid")
        refused = self._fencing(c.server, c.incarnation)
        if refused:
            return _fail(refused)
        if c.identity in self._identities:
            return _fail("taken")
        self._identities[c.identity] = IdentityEntry(c.identity, c.server, c.incarnation)
        return OK

    def _release_identity(self, c: ReleaseIdentity) -> Result:
        refused = self._fencing(c.server, c.incarnation)
        if refused:
            return _fail(refused)
        entry = self._identities.get(c.identity) if isinstance(c.identity, str) else None
        if entry is None:
            return _fail("not-held")
        # The server a client was routed away from must not free it: its old connection closing is no quit.
        if entry.server != c.server or entry.incarnation != c.incarnation:
            return _fail("not-holder")
        rooms = self._drop_identity(c.identity)
        return Result(True, "", (c.identity,), rooms)

    def _begin_move(self, c: BeginMove) -> Result:
        refused = self._fencing(c.from_server, c.incarnation)
        if refused:
            return _fail(refused)
        if not _is_time(c.at) or not isinstance(c.to_server, str) or c.to_server == c.from_server:
            return _fail("invalid")
        target = self._servers.get(c.to_server)
        if target is None or not target.up:
            return _fail("server-down")
        entry = self._identities.get(c.identity) if isinstance(c.identity, str) else None
        if entry is None:
            return _fail("not-held")
        if entry.in_transit or entry.server != c.from_server or entry.incarnation != c.incarnation:
            return _fail("not-holder")
        if c.identity in self._owned:
            return _fail("owner-has-room")
        self._identities[c.identity] = IdentityEntry(
            c.identity, c.to_server, target.incarnation, True, c.from_server, float(c.at)
        )
        return OK

    def _complete_move(self, c: CompleteMove) -> Result:
        if not is_valid_name(c.identity):
            return _fail("invalid")
        refused = self._fencing(c.server, c.incarnation)
        if refused:
            return _fail(refused)
        entry = self._identities.get(c.identity)
        if entry is not None and not (entry.in_transit and entry.server == c.server):
            return _fail("taken")
        # Headed here (with any incarnation of ours: ServerUp dropped older ones), or free: it lives here now.
        self._identities[c.identity] = IdentityEntry(c.identity, c.server, c.incarnation)
        return OK

    def _expire_move(self, c: ExpireMove) -> Result:
        entry = self._identities.get(c.identity) if isinstance(c.identity, str) else None
        if entry is None or not entry.in_transit or entry.server != c.to_server or entry.since != c.since:
            return _fail("stale")
        del self._identities[c.identity]
        return Result(True, "", (c.identity,), ())

    def _create_room(self, c: CreateRoom) -> Result:
        if not is_valid_name(c.room_id) or is_mainhall(c.room_id):
            return _fail("invalid")
        refused = self._fencing(c.server, c.incarnation)
        if refused:
            return _fail(refused)
        if c.room_id in self._rooms:
            return _fail("taken")
        owner = self._identities.get(c.owner) if isinstance(c.owner, str) else None
        if owner is None or owner.in_transit or owner.server != c.server or owner.incarnation != c.incarnation:
            return _fail("not-holder")
        if c.owner in self._owned:
            return _fail("owner-has-room")
        self._rooms[c.room_id] = RoomEntry(c.room_id, c.server, c.owner, c.incarnation)
        self._owned[c.owner] = c.room_id
        return OK

    def _delete_room(self, c: DeleteRoom) -> Result:
        if not isinstance(c.room_id, str) or is_mainhall(c.room_id) or not is_valid_name(c.room_id):
            return _fail("invalid")
        refused = self._fencing(c.server, c.incarnation)
        if refused:
            return _fail(refused)
        room = self._rooms.get(c.room_id)
        if room is None:
            return _fail("no-such-room")
        if room.server != c.server:
            return _fail("not-host")
        if room.owner != c.owner:
            return _fail("not-owner")
        self._drop_room(c.room_id)
        return Result(True, "", (), (c.room_id,))

    def _server_up(self, c: ServerUp) -> Result:
        if not isinstance(c.server, str) or not is_valid_server_id(c.server) or not _is_int(c.incarnation):
            return _fail("invalid")
        record = self._servers.get(c.server)
        if record is not None:
            if c.incarnation < record.incarnation or (c.incarnation == record.incarnation and not record.up):
                return _fail("fenced")
            if c.incarnation == record.incarnation:
                return OK  # announced twice with different request ids: already up, nothing stale left
        identities, rooms = self._drop_server(c.server, c.incarnation)
        self._servers[c.server] = ServerRecord(c.incarnation, True)
        hall = mainhall(c.server)
        self._rooms[hall] = RoomEntry(hall, c.server, "", c.incarnation)
        return Result(True, "", identities, rooms)

    def _server_down(self, c: ServerDown) -> Result:
        if not isinstance(c.server, str) or not is_valid_server_id(c.server) or not _is_int(c.incarnation):
            return _fail("invalid")
        record = self._servers.get(c.server)
        if record is not None and c.incarnation < record.incarnation:
            return _fail("stale")  # a newer incarnation is recorded; the older one left nothing behind
        identities, rooms = self._drop_server(c.server, c.incarnation)
        # Recorded even for a server never seen up, so that incarnation can never announce itself later.
        self._servers[c.server] = ServerRecord(c.incarnation, False)
        return Result(True, "", identities, rooms)

    # -- dropping -----------------------------------------------------------------------------------

    def _drop_identity(self, identity: str) -> tuple[str, ...]:
        del self._identities[identity]
        room_id = self._owned.get(identity)
        if room_id is None:
            return ()
        self._drop_room(room_id)
        return (room_id,)

    def _drop_room(self, room_id: str) -> None:
        room = self._rooms.pop(room_id)
        if room.owner:
            self._owned.pop(room.owner, None)

    def _drop_server(self, server: str, up_to_incarnation: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Drop identities living on or headed to `server`, and rooms hosted there, of incarnation <= given."""
        identities = tuple(
            sorted(
                name
                for name, e in self._identities.items()
                if e.server == server and e.incarnation <= up_to_incarnation
            )
        )
        for name in identities:
            del self._identities[name]
        rooms = tuple(
            sorted(
                room_id
                for room_id, r in self._rooms.items()
                if r.server == server and r.incarnation <= up_to_incarnation
            )
        )
        for room_id in rooms:
            self._drop_room(room_id)
        return identities, rooms

    # -- reads --------------------------------------------------------------------------------------

    def identity(self, name: str) -> IdentityEntry | None:
        return self._identities.get(name)

    def room(self, room_id: str) -> RoomEntry | None:
        return self._rooms.get(room_id)

    def rooms(self) -> list[RoomEntry]:
        return sorted(self._rooms.values(), key=lambda r: r.room_id)

    def identities(self) -> list[IdentityEntry]:
        return sorted(self._identities.values(), key=lambda e: e.identity)

    def servers_up(self) -> dict[str, int]:
        return {server: r.incarnation for server, r in sorted(self._servers.items()) if r.up}

    def servers(self) -> dict[str, ServerRecord]:
        """Every server ever recorded, up or down, with its last incarnation."""
        return dict(sorted(self._servers.items()))

    def owned_room(self, owner: str) -> str | None:
        return self._owned.get(owner)

    def result_of(self, request_id: str) -> Result | None:
        """The stored result of a recently applied request id."""
        return self._results.get(request_id)

    def counts(self) -> dict[str, int]:
        return {
            "identities": len(self._identities),
            "in_transit": sum(1 for e in self._identities.values() if e.in_transit),
            "rooms": len(self._rooms),
            "servers_up": sum(1 for r in self._servers.values() if r.up),
            "servers_known": len(self._servers),
            "remembered_requests": len(self._results),
        }

    # -- serialisation --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible snapshot; `from_dict(to_dict())` equals the original, request memory included."""
        return {
            "identities": [
                [e.identity, e.server, e.incarnation, e.in_transit, e.from_server, e.since]
                for e in self._identities.values()
            ],
            "rooms": [[r.room_id, r.server, r.owner, r.incarnation] for r in self._rooms.values()],
            "servers": [[s, r.incarnation, r.up] for s, r in self._servers.items()],
            "results": [
                [rid, r.ok, r.reason, list(r.released_identities), list(r.released_rooms)]
                for rid, r in self._results.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegistryState:
        state = cls()
        for identity, server, incarnation, in_transit, from_server, since in data["identities"]:
            state._identities[identity] = IdentityEntry(
                identity, server, int(incarnation), bool(in_transit), from_server, float(since)
            )
        for room_id, server, owner, incarnation in data["rooms"]:
            state._rooms[room_id] = RoomEntry(room_id, server, owner, int(incarnation))
            if owner:
                state._owned[owner] = room_id
        for server, incarnation, up in data["servers"]:
            state._servers[server] = ServerRecord(int(incarnation), bool(up))
        for rid, ok, reason, identities, rooms in data["results"]:
            state._results[rid] = Result(bool(ok), reason, tuple(identities), tuple(rooms))
        return state

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RegistryState):
            return NotImplemented
        return (
            self._identities == other._identities
            and self._rooms == other._rooms
            and self._servers == other._servers
            and list(self._results.items()) == list(other._results.items())
        )

    def check_invariants(self) -> None:
        """Assert the invariants of the module docstring (used by tests and on restore)."""
        for name, e in self._identities.items():
            assert e.identity == name, (name, e)
            record = self._servers.get(e.server)
            assert record is not None and record.up and record.incarnation == e.incarnation, (e, record)
            assert e.in_transit == (e.from_server is not None), e
        owners: dict[str, str] = {}
        for room_id, r in self._rooms.items():
            assert r.room_id == room_id, (room_id, r)
            record = self._servers.get(r.server)
            assert record is not None and record.up and record.incarnation == r.incarnation, (r, record)
            if is_mainhall(room_id):
                assert r.owner == "" and room_id == mainhall(r.server), r
                continue
            assert r.owner not in owners, (r, owners[r.owner])
            owners[r.owner] = room_id
            holder = self._identities.get(r.owner)
            assert holder is not None and not holder.in_transit and holder.server == r.server, (r, holder)
        assert owners == self._owned, (owners, self._owned)
        for server, record in self._servers.items():
            if record.up:
                hall = self._rooms.get(mainhall(server))
                assert hall is not None and hall.incarnation == record.incarnation, (server, hall)
        assert len(self._results) <= MAX_REMEMBERED_REQUESTS
