"""The reconciler: what this server releases because the registry says it holds it and no session does.

Theory of operation
-------------------
Requests can leave the registry ahead of the sessions: a release that was lost with a coordinator, a
claim that committed after its client was refused, a routed client that never arrived. Every reconcile
period each server compares the entries the registry gives it with its live sessions (`find_orphans`):

1. An identity of this incarnation that no session holds and no request is pending for: release it.
2. An identity in transit to this server that has not arrived within `move_timeout_s` (wall clock, as
   the move was stamped): expire that exact move.
3. A room of this incarnation that no session hosts and no request is pending for: delete it. Never a
   MainHall (it lives as long as the server's incarnation).
4. Entries of an older incarnation are not ours to release: "server down"/"server up" drops them.

`Reconciler.review` releases only what was orphaned in `passes` reviews in a row (2 by default): a claim
or room that has just committed has its session registered by the next pass. Its only state is the set
of orphans seen in the previous pass (bounded by what the registry holds for this server).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from cluster.names import is_mainhall
from registry.state import IdentityEntry, RoomEntry

OrphanKind = Literal["identity", "move", "room"]


@dataclass(frozen=True, slots=True)
class Orphan:
    kind: OrphanKind
    name: str  # identity or room id
    incarnation: int  # of the entry
    since: float = 0.0  # the move's stamp (kind "move")
    owner: str = ""  # the room's owner (kind "room")


def find_orphans(
    server_id: str,
    incarnation: int,
    identities: Iterable[IdentityEntry],
    rooms: Iterable[RoomEntry],
    live_identities: Iterable[str],
    live_rooms: Iterable[str],
    now_wall: float,
    move_timeout_s: float,
) -> list[Orphan]:
    """Entries the registry gives `server_id` that match no live session: `live_identities` and
    `live_rooms` include every name with a request in flight."""
    held = set(live_identities)
    hosted = set(live_rooms)
    found: list[Orphan] = []
    for entry in identities:
        if entry.server != server_id or entry.identity in held:
            continue
        if entry.in_transit:
            if now_wall - entry.since >= move_timeout_s:
                found.append(Orphan("move", entry.identity, entry.incarnation, since=entry.since))
        elif entry.incarnation == incarnation:
            found.append(Orphan("identity", entry.identity, entry.incarnation))
    for room in rooms:
        if room.server != server_id or is_mainhall(room.room_id) or room.room_id in hosted:
            continue
        if room.incarnation == incarnation:
            found.append(Orphan("room", room.room_id, room.incarnation, owner=room.owner))
    return found


class Reconciler:
    def __init__(self, passes: int = 2) -> None:
        assert passes >= 1
        self.passes = passes
        self._seen: dict[Orphan, int] = {}

    def review(self, orphans: Iterable[Orphan]) -> list[Orphan]:
        """One pass: the orphans to release now (each seen in `passes` passes in a row), in input order."""
        seen: dict[Orphan, int] = {}
        release: list[Orphan] = []
        for orphan in orphans:
            if orphan in seen:
                continue
            count = self._seen.get(orphan, 0) + 1
            seen[orphan] = count
            if count >= self.passes:
                release.append(orphan)
        self._seen = seen
        return release
