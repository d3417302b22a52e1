"""The chat server's view of the cluster: what it asks the coordinator and reads from its replica.

`ChatServer` depends only on this protocol. The real implementation (`node.coordinator.ClusterDirectory`)
sends each request to the Fast Bully coordinator, which commits it through the replicated registry;
approval only ever means "committed with success". Every coroutine here returns within a bounded time
(a few seconds at most) and never raises for an operating error: a timeout, no coordinator or no quorum
is a refusal (False).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cluster.names import Identity, RoomId, ServerId


@dataclass(frozen=True, slots=True)
class RoomInfo:
    room_id: RoomId
    server_id: ServerId
    owner: str  # "" for a MainHall


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    clients_port: int


class Directory(Protocol):
    @property
    def server_id(self) -> ServerId: ...

    async def claim_identity(self, identity: Identity) -> bool:
        """Reserve `identity` for a client of this server; True only once committed."""
        ...

    async def release_identity(self, identity: Identity) -> None:
        """Free `identity` (and the room it owns, in the same command). Best effort: retried until the
        request deadline; the registry reconciler releases anything that still slips."""
        ...

    async def create_room(self, room_id: RoomId, owner: Identity) -> bool:
        """Create `room_id` hosted on this server, owned by `owner`; True only once committed."""
        ...

    async def delete_room(self, room_id: RoomId, owner: Identity) -> bool:
        """Delete a room of this server owned by `owner`; True only once committed."""
        ...

    async def begin_move(self, identity: Identity, to_server: ServerId) -> bool:
        """Mark `identity` in transit to `to_server` (a joinroom routed there)."""
        ...

    async def complete_move(self, identity: Identity) -> bool:
        """A movejoin arrived here: take `identity` if it is in transit to this server or free.
        False when it is held by a client elsewhere."""
        ...

    def room(self, room_id: str) -> RoomInfo | None:
        """The room as the local replica knows it (for joinroom routing)."""
        ...

    def rooms(self) -> list[RoomInfo]:
        """Every room of every live server, from the local replica (for list)."""
        ...

    def address(self, server_id: ServerId) -> Address:
        """Where clients reach `server_id` (for route)."""
        ...
