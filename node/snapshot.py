"""Build the immutable `node.status.Snapshot` of a running server, on its event loop.

`SnapshotBuilder` is given the parts it reads when the node is built (explicit arguments, no reference to
the node itself) and keeps its own state: the key of the room and client lists it built last.
"""

from __future__ import annotations

import os
import time
from typing import Protocol

from bully.runtime import ElectionRuntime
from cluster.config import ClusterConfig
from node.coordinator import ClusterDirectory
from node.server import ChatServer, ChatSnapshot
from node.stall import LoopMonitor, StallGuard
from node.status import (
    ROLE_COORDINATOR,
    ROLE_DOWN,
    ROLE_MEMBER,
    ROLE_STARTING,
    ClientView,
    Counters,
    EventLog,
    RaftView,
    RegistryCounts,
    RoomView,
    ServerView,
    Snapshot,
)
from registry.replicated import RaftStatus
from registry.state import IdentityEntry, RoomEntry


class RegistryReads(Protocol):
    """What a snapshot reads of the registry replica."""

    def applied_commands(self) -> int: ...
    def status(self) -> RaftStatus: ...
    def counts(self) -> dict[str, int]: ...
    def rooms(self) -> list[RoomEntry]: ...
    def identities(self) -> list[IdentityEntry]: ...


class SnapshotBuilder:
    def __init__(
        self,
        config: ClusterConfig,
        server_id: str,
        chat: ChatServer,
        registry: RegistryReads,
        election: ElectionRuntime,
        directory: ClusterDirectory,
        events: EventLog,
        loop_monitor: LoopMonitor,
        stall_guard: StallGuard,
    ) -> None:
        self.config = config
        self.server_id = server_id
        self.chat = chat
        self.registry = registry
        self.election = election
        self.directory = directory
        self.events = events
        self.loop_monitor = loop_monitor
        self.stall_guard = stall_guard
        self._lists_key: tuple[int, int] | None = None

    def build(self, serving: bool, previous: Snapshot | None = None) -> Snapshot:
        """The node's state now. Room and client lists are rebuilt only when the registry applied a command
        or local membership changed since `previous`; otherwise they are shared with it."""
        chat = self.chat.snapshot()
        lists_key = (self.registry.applied_commands(), self.chat.generation)
        if previous is not None and self._lists_key == lists_key:
            rooms, clients = previous.rooms, previous.clients
        else:
            rooms, clients = self._lists(chat)
            self._lists_key = lists_key
        return self._snapshot(serving, chat, rooms, clients)

    def _snapshot(
        self, serving: bool, chat: ChatSnapshot, rooms: tuple[RoomView, ...], clients: tuple[ClientView, ...]
    ) -> Snapshot:
        coordinator = self.election.coordinator
        up = set(self.election.servers_up) | {self.server_id}
        heard = {**self.election.peer_incarnations, self.server_id: self.election.incarnation}
        servers = tuple(
            ServerView(
                server_id=s.server_id,
                host=s.host,
                clients_port=s.clients_port,
                coordination_port=s.coordination_port,
                admin_port=s.admin_port,
                raft_port=s.raft_port,
                ws_port=s.ws_port,
                incarnation=heard.get(s.server_id),
                priority=s.priority,
                up=s.server_id in up,
                role=ROLE_DOWN
                if s.server_id not in up
                else ROLE_COORDINATOR
                if s.server_id == coordinator
                else ROLE_MEMBER,
            )
            for s in self.config.servers
        )
        raft = self.registry.status()
        counts = self.registry.counts()
        if not serving:
            role = ROLE_STARTING
        elif self.election.is_coordinator:
            role = ROLE_COORDINATOR
        else:
            role = ROLE_MEMBER
        return Snapshot(
            server_id=self.server_id,
            pid=os.getpid(),
            role=role,
            coordinator=coordinator,
            servers=servers,
            servers_up=tuple(sorted(up)),
            rooms=rooms,
            clients=clients,
            local_client_count=len(chat.clients),
            raft=RaftView.of(raft),
            registry_counts=RegistryCounts(identities=counts.get("identities", 0), rooms=counts.get("rooms", 0)),
            counters=Counters(
                messages_relayed=chat.messages_relayed,
                deliveries=chat.deliveries,
                approvals=self.directory.approvals,
                refusals=self.directory.refusals,
                elections=self.election.elections,
                kicks=chat.counters.get("kicks", 0),
                coordinator_changes=self.directory.coordinator_changes,
            ),
            approval_latency=self.directory.latency.freeze(),
            recent_events=self.events.freeze(),
            serving=serving,
            taken_at=time.time(),
            loop_max_gap_s=self.loop_monitor.max_gap_s,
            loop_stalls=self.stall_guard.stalls,
        )

    def _lists(self, chat: ChatSnapshot) -> tuple[tuple[RoomView, ...], tuple[ClientView, ...]]:
        members = {room.room_id: room.members for room in chat.rooms}
        local_rooms_of = {client.identity: client.room_id for client in chat.clients}
        rooms = tuple(
            RoomView(e.room_id, e.server, e.owner, members.get(e.room_id) if e.server == self.server_id else None)
            for e in sorted(self.registry.rooms(), key=lambda e: (e.server, e.room_id))
        )
        clients = tuple(
            ClientView(
                e.identity,
                e.server,
                local_rooms_of.get(e.identity) if e.server == self.server_id else None,
                e.in_transit,
            )
            for e in sorted(self.registry.identities(), key=lambda e: e.identity)
        )
        return rooms, clients
