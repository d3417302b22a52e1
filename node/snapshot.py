"""Build the immutable `node.status.Snapshot` of a running server, on its event loop."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from node.status import (
    ROLE_COORDINATOR,
    ROLE_DOWN,
    ROLE_MEMBER,
    ROLE_STARTING,
    ClientView,
    Counters,
    RaftView,
    RegistryCounts,
    RoomView,
    ServerView,
    Snapshot,
)

if TYPE_CHECKING:
    from node.app import Node
    from node.server import ChatSnapshot


def build_snapshot(node: Node, previous: Snapshot | None = None) -> Snapshot:
    """The node's state now. Room and client lists are rebuilt only when the registry applied a command
    or local membership changed since `previous`; otherwise they are shared with it."""
    chat = node.chat.snapshot()
    lists_key = (node.registry.applied_commands(), node.chat.generation)
    if previous is not None and node.snapshot_lists_key == lists_key:
        rooms, clients = previous.rooms, previous.clients
    else:
        rooms, clients = _lists(node, chat)
        node.snapshot_lists_key = lists_key
    coordinator = node.election.coordinator
    up = set(node.election.servers_up) | {node.server_id}
    servers = tuple(
        ServerView(
            server_id=s.server_id,
            host=s.host,
            clients_port=s.clients_port,
            coordination_port=s.coordination_port,
            admin_port=s.admin_port,
            raft_port=s.raft_port,
            ws_port=s.ws_port,
            priority=s.priority,
            up=s.server_id in up,
            role=ROLE_DOWN
            if s.server_id not in up
            else ROLE_COORDINATOR
            if s.server_id == coordinator
            else ROLE_MEMBER,
        )
        for s in node.config.servers
    )
    raft = node.registry.status()
    counts = node.registry.counts()
    if not node.serving:
        role = ROLE_STARTING
    elif node.election.is_coordinator:
        role = ROLE_COORDINATOR
    else:
        role = ROLE_MEMBER
    return Snapshot(
        server_id=node.server_id,
        pid=os.getpid(),
        role=role,
        coordinator=coordinator,
        servers=servers,
        servers_up=tuple(sorted(up)),
        rooms=rooms,
        clients=clients,
        local_client_count=len(chat.clients),
        raft=RaftView(
            leader=raft.leader,
            term=raft.term,
            commit_index=raft.commit_index,
            applied_index=raft.applied_index,
            is_leader=raft.role == "leader",
            quorum=raft.quorum,
        ),
        registry_counts=RegistryCounts(identities=counts.get("identities", 0), rooms=counts.get("rooms", 0)),
        counters=Counters(
            messages_relayed=chat.messages_relayed,
            deliveries=chat.deliveries,
            approvals=node.directory.approvals,
            refusals=node.directory.refusals,
            elections=node.election.elections,
            kicks=chat.counters.get("kicks", 0),
        ),
        approval_latency=node.directory.latency.freeze(),
        recent_events=node.events.freeze(),
        serving=node.serving,
        taken_at=time.time(),
        loop_max_gap_s=node.loop_monitor.max_gap_s,
        loop_stalls=node.stall_guard.stalls,
    )


def _lists(node: Node, chat: ChatSnapshot) -> tuple[tuple[RoomView, ...], tuple[ClientView, ...]]:
    members = {room.room_id: room.members for room in chat.rooms}
    local_rooms_of = {client.identity: client.room_id for client in chat.clients}
    rooms = tuple(
        RoomView(e.room_id, e.server, e.owner, members.get(e.room_id) if e.server == node.server_id else None)
        for e in sorted(node.registry.rooms(), key=lambda e: (e.server, e.room_id))
    )
    clients = tuple(
        ClientView(
            e.identity,
            e.server,
            local_rooms_of.get(e.identity) if e.server == node.server_id else None,
            e.in_transit,
        )
        for e in sorted(node.registry.identities(), key=lambda e: e.identity)
    )
    return rooms, clients
