"""What a server does when a command it gave up on as in doubt commits after all.

Theory of operation
-------------------
A request whose deadline passed while it may have been submitted (`RequestRetry` says "in doubt") is
refused to its client, and the command is remembered. If the registry later applies it with success,
the registry and this server's chat core disagree: the client was told "no" but the cluster says "yes".
The registry is the truth for other servers, so this server must bring the two back together without
ever leaving a name held twice. `late_commit_actions` decides how, from the command and a sample of the
local state taken on the loop when the commit is applied here; the shell (node/app.py) carries it out.

Rules, per registry command (the registry serialises every check, so a release issued here can only
free what this server itself holds: any later claim of the same name by this server fails "taken" until
the release commits, and a name in flight here is left to the outcome of that request):

ClaimIdentity / CompleteMove
    The name now lives here. A local session holds it (a later movejoin or newidentity got it through
    another request): keep it. A request for it is in flight here (a movejoin bringing it back): leave
    it; that request's outcome decides and the reconciler releases what no session ends up holding.
    Otherwise: release it.
CreateRoom
    The room now exists here with nobody told. A local session hosts it or a request for it is in
    flight: leave it (the reconciler deletes a room no session hosts). Otherwise: delete it.
DeleteRoom
    The room is gone cluster-wide but its owner was told "false". If this server still hosts it, it
    goes here too (members to MainHall); keeping it would let another server create the same id.
BeginMove
    The identity is now in transit to another server but its client was told "room unchanged" and was
    never routed. If the client is still here it is disconnected (it cannot keep a name the registry
    says is leaving; taking it back is two commands with a gap another claim could fill). The name stays
    in transit until the destination's reconciler expires that exact move (`MOVE_TIMEOUT_S`, 10 s), not
    at once: the disconnected session's own release (refused, "not-holder") may still be in flight, and
    were the name freed now, that release could land after a new claim of the name here and free it.
ReleaseIdentity, ExpireMove, ServerUp, ServerDown, Barrier
    Nothing: a release or expiry that lands late is what was wanted; membership commands are not
    client requests.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import assert_never

import registry.state as rs


@dataclass(frozen=True, slots=True)
class SubmitRelease:
    """Submit a registry `ReleaseIdentity` for `identity` (undoes a claim nobody here holds)."""

    identity: str


@dataclass(frozen=True, slots=True)
class SubmitRoomDelete:
    """Submit a registry `DeleteRoom` for the room (undoes a creation nobody here hosts)."""

    room_id: str
    owner: str


@dataclass(frozen=True, slots=True)
class DropRoomHere:
    """Remove the room from the local chat core only (the registry has already deleted it)."""

    room_id: str


@dataclass(frozen=True, slots=True)
class EndSession:
    """Disconnect the local client holding `identity`, as an abrupt quit."""

    identity: str


@dataclass(frozen=True, slots=True)
class Leave:
    """Do nothing now; `reason` is logged."""

    reason: str


LateCommitAction = SubmitRelease | SubmitRoomDelete | DropRoomHere | EndSession | Leave

# The commands worth remembering when they end in doubt: the others get `Leave` whatever happens.
UNDOABLE = (rs.ClaimIdentity, rs.CompleteMove, rs.CreateRoom, rs.DeleteRoom, rs.BeginMove)


def late_commit_actions(
    command: rs.Command, local_identities: Set[str], local_rooms: Set[str], pending: Set[str]
) -> tuple[LateCommitAction, ...]:
    """What to do now that `command`, refused to its client as in doubt, has committed with success.
    `local_identities`/`local_rooms`: held/hosted by this server's sessions; `pending`: names with a
    request in flight here."""
    match command:
        case rs.ClaimIdentity(identity=name) | rs.CompleteMove(identity=name):
            if name in local_identities:
                return (Leave("held by a session here"),)
            if name in pending:
                return (Leave("a request for it is in flight here"),)
            return (SubmitRelease(name),)
        case rs.CreateRoom(room_id=room_id, owner=owner):
            if room_id in local_rooms:
                return (Leave("hosted by a session here"),)
            if room_id in pending:
                return (Leave("a request for it is in flight here"),)
            return (SubmitRoomDelete(room_id, owner),)
        case rs.DeleteRoom(room_id=room_id):
            if room_id in local_rooms:
                return (DropRoomHere(room_id),)
            return (Leave("not hosted here"),)
        case rs.BeginMove(identity=name):
            if name in local_identities:
                return (EndSession(name),)
            return (Leave("its client left; the destination expires the move"),)
        case rs.ReleaseIdentity() | rs.ExpireMove() | rs.ServerUp() | rs.ServerDown() | rs.Barrier():
            return (Leave("nothing to undo"),)
        case _:
            assert_never(command)
