"""Identity and room requests: served by the Fast Bully coordinator, committed through the registry.

Theory of operation
-------------------
Every server runs a `CoordinatorService`, but it answers only while its election runtime says this server
is the coordinator; otherwise it replies "not-coordinator" and the asking server retries at whoever is
coordinator now. The service refuses at once when its replica shows the name held by another server
(cheap, and safe: a refusal never creates state), and otherwise submits the command to the replicated
registry. Approval is the committed command's own result: uniqueness is decided inside the applied
command, in log order, so two coordinators (a zombie and its successor) can never both approve a name.

`ClusterDirectory` is the chat server's side (`node.directory.Directory`). Each request gets one request
id and keeps it across retries (new coordinator, lost connection, commit timeout), so a retried command
that had in fact committed returns its stored result instead of applying twice. A request that is still
unanswered at its deadline is refused to the client and remembered as *in doubt*: if it commits later, the
registry listener releases it again. The reconciler closes the remaining gaps: every few seconds each
server releases what the registry says it holds but no session of it does, and the coordinator commits
"server down" for servers the failure detector has seen go silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from cluster.config import ClusterConfig
from cluster.names import Identity, RoomId, ServerId, is_mainhall
from node.directory import Address, RoomInfo
from node.status import LatencyRecorder
from registry import state as rs
from registry.replicated import RegistryUnavailable

log = logging.getLogger("chatmesh.coordinator")

REQUEST_KIND = "registry"
# How long a client request may wait for a coordinator and a commit before it is refused.
REQUEST_DEADLINE_S = 4.0
# One commit attempt at the coordinator; shorter than the deadline so a failover leaves time to retry.
COMMIT_TIMEOUT_S = 1.5
# One request to the coordinator over the coordination channel.
PEER_REQUEST_TIMEOUT_S = 2.0
# Pause between retries while no coordinator is known or it is unreachable.
RETRY_PAUSE_S = 0.05
# A client routed to another server must arrive there within this time or its identity is released.
MOVE_TIMEOUT_S = 10.0
# How often each server compares the registry with its live sessions.
RECONCILE_INTERVAL_S = 2.0
# A peer never heard from since this server started is declared down only after this grace period.
STARTUP_GRACE_S = 5.0
# Bound on the in-doubt set (request ids whose commit outcome is unknown).
MAX_IN_DOUBT = 10_000

_COMMANDS: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        rs.ClaimIdentity,
        rs.ReleaseIdentity,
        rs.BeginMove,
        rs.CompleteMove,
        rs.ExpireMove,
        rs.CreateRoom,
        rs.DeleteRoom,
        rs.ServerUp,
        rs.ServerDown,
    )
}


def command_to_wire(command: rs.Command) -> dict[str, Any]:
    data = dataclasses.asdict(command)
    data["op"] = type(command).__name__
    return data


def command_from_wire(data: object) -> rs.Command:
    """Rebuild a registry command from its wire form; ValueError on anything else."""
    if not isinstance(data, dict):
        raise ValueError("command is not an object")
    cls = _COMMANDS.get(data.get("op", ""))
    if cls is None:
        raise ValueError(f"unknown command {data.get('op')!r}")
    names = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k != "op"}
    if set(kwargs) != set(names):
        raise ValueError(f"{cls.__name__}: fields {sorted(kwargs)} != {sorted(names)}")
    for key, value in kwargs.items():
        if not isinstance(value, str | int | float) and value is not None:
            raise ValueError(f"{cls.__name__}.{key}: unsupported value")
    return cls(**kwargs)  # type: ignore[no-any-return]


class Registry(Protocol):
    async def submit(self, command: rs.Command, timeout: float) -> rs.Result: ...
    def identity(self, name: str) -> rs.IdentityEntry | None: ...
    def room(self, room_id: str) -> rs.RoomEntry | None: ...
    def rooms(self) -> list[rs.RoomEntry]: ...
    def identities(self) -> list[rs.IdentityEntry]: ...


class Election(Protocol):
    @property
    def coordinator(self) -> str | None: ...
    @property
    def is_coordinator(self) -> bool: ...


class Transport(Protocol):
    async def request(self, peer: str, message: dict[str, Any], timeout: float) -> dict[str, Any]: ...


class CoordinatorService:
    """Answers registry requests while this server is the coordinator."""

    def __init__(self, registry: Registry, election: Election, on_result: Callable[[bool, float], None] | None = None):
        self.registry = registry
        self.election = election
        self.on_result = on_result

    def obviously_refused(self, command: rs.Command) -> str | None:
        """A refusal the replica already proves; never an approval (that needs a commit)."""
        if isinstance(command, rs.ClaimIdentity):
            entry = self.registry.identity(command.identity)
            if entry is not None and entry.server != command.server:
                return "taken"
        elif isinstance(command, rs.CreateRoom):
            room = self.registry.room(command.room_id)
            if room is not None and room.server != command.server:
                return "taken"
        return None

    async def handle(
        self, sender: str, message: dict[str, Any], commit_timeout_s: float = COMMIT_TIMEOUT_S
    ) -> dict[str, Any]:
        if not self.election.is_coordinator:
            return {"ok": False, "reason": "not-coordinator", "coordinator": self.election.coordinator}
        try:
            command = command_from_wire(message.get("command"))
        except (ValueError, TypeError) as exc:
            log.warning("bad registry request from %s: %s", sender, exc)
            return {"ok": False, "reason": "bad-request", "final": True}
        reason = self.obviously_refused(command)
        if reason is not None:
            return {"ok": False, "reason": reason, "final": True}
        try:
            result = await self.registry.submit(command, commit_timeout_s)
        except RegistryUnavailable as exc:
            return {"ok": False, "reason": f"unavailable: {exc}"}
        return {"ok": result.ok, "reason": result.reason, "final": True}


class ClusterDirectory:
    """`node.directory.Directory` over the coordinator and the local registry replica."""

    def __init__(
        self,
        config: ClusterConfig,
        self_id: ServerId,
        incarnation: int,
        registry: Registry,
        election: Election,
        transport: Transport,
        service: CoordinatorService,
    ) -> None:
        self.config = config
        self._server_id = self_id
        self.incarnation = incarnation
        self.registry = registry
        self.election = election
        self.transport = transport
        self.service = service
        self._ids = itertools.count()
        self._id_prefix = f"{self_id}.{incarnation}.{os.getpid()}"
        self._change: asyncio.Future[None] | None = None
        self.in_doubt: dict[str, rs.Command] = {}
        self.pending: set[str] = set()  # identities and rooms with a request in flight
        self.approvals = 0
        self.refusals = 0
        self.latency = LatencyRecorder()

    @property
    def server_id(self) -> ServerId:
        return self._server_id

    def next_request_id(self) -> str:
        return f"{self._id_prefix}.{next(self._ids)}"

    def issued_here(self, request_id: str) -> bool:
        """Whether this directory made `request_id` (any thread: the prefix never changes)."""
        return request_id.startswith(self._id_prefix + ".")

    def coordinator_changed(self) -> None:
        """Called on the loop when the election runtime reports a new coordinator: wakes every waiter."""
        change, self._change = self._change, None
        if change is not None and not change.done():
            change.set_result(None)

    def _next_change(self) -> asyncio.Future[None]:
        """A future resolved at the next coordinator change (one per change, shared by all waiters)."""
        if self._change is None:
            self._change = asyncio.get_running_loop().create_future()
        return self._change

    async def _wait_coordinator_change(self, timeout: float) -> None:
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._next_change()), timeout)

    async def _ask(self, coordinator: str, wire: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The coordinator's reply, or None when another coordinator took over before it answered (the
        caller then retries there with the same request id)."""
        if coordinator == self._server_id:
            return await self.service.handle(self._server_id, wire, commit_timeout_s=min(COMMIT_TIMEOUT_S, timeout))
        asking = asyncio.ensure_future(
            self.transport.request(coordinator, wire, timeout=min(timeout, PEER_REQUEST_TIMEOUT_S))
        )
        try:
            while True:
                waiters: set[asyncio.Future[Any]] = {asking, self._next_change()}
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if asking.done():
                    return asking.result()
                if self.election.coordinator != coordinator:
                    return None
        finally:
            if not asking.done():
                asking.cancel()
                with contextlib.suppress(BaseException):
                    await asking

    async def request(self, command: rs.Command, deadline_s: float = REQUEST_DEADLINE_S) -> bool:
        """Run `command` at the coordinator until it gives a final answer or the deadline passes."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + deadline_s
        wire = {"kind": REQUEST_KIND, "command": command_to_wire(command)}
        while (remaining := deadline - loop.time()) > 0:
            coordinator = self.election.coordinator
            if coordinator is None:
                await self._wait_coordinator_change(min(remaining, 0.5))
                continue
            try:
                reply = await self._ask(coordinator, wire, remaining)
            except Exception as exc:  # RequestFailed, timeouts: the coordinator may be gone
                log.debug("request %s to %s failed: %s", command.request_id, coordinator, exc)
                reply = {"ok": False, "reason": "unreachable"}
            if reply is None:
                continue  # a new coordinator: ask it at once
            if reply.get("ok") is True:
                self.approvals += 1
                self.latency.observe(loop.time() - started)
                return True
            if reply.get("final"):
                self.refusals += 1
                return False
            # Not (or no longer) the coordinator, unreachable, or no quorum: retry with the same request id
            # (idempotent) after a short pause, sooner if the coordinator changes.
            await self._wait_coordinator_change(min(deadline - loop.time(), RETRY_PAUSE_S))
        self.refusals += 1
        self._mark_in_doubt(command)
        log.warning("request %s (%s) in doubt after %.1fs", command.request_id, type(command).__name__, deadline_s)
        return False

    def _mark_in_doubt(self, command: rs.Command) -> None:
        if isinstance(command, rs.ClaimIdentity | rs.CreateRoom | rs.CompleteMove):
            if len(self.in_doubt) >= MAX_IN_DOUBT:
                self.in_doubt.pop(next(iter(self.in_doubt)))
            self.in_doubt[command.request_id] = command

    def take_in_doubt(self, request_id: str) -> rs.Command | None:
        """The command if `request_id` was refused to the client after timing out (called on apply)."""
        return self.in_doubt.pop(request_id, None)

    # -- Directory -----------------------------------------------------------------------------------

    async def claim_identity(self, identity: Identity) -> bool:
        self.pending.add(identity)
        try:
            return await self.request(
                rs.ClaimIdentity(self.next_request_id(), identity, self._server_id, self.incarnation)
            )
        finally:
            self.pending.discard(identity)

    async def release_identity(self, identity: Identity) -> None:
        await self.request(rs.ReleaseIdentity(self.next_request_id(), identity, self._server_id, self.incarnation))

    async def create_room(self, room_id: RoomId, owner: Identity) -> bool:
        self.pending.add(room_id)
        try:
            return await self.request(
                rs.CreateRoom(self.next_request_id(), room_id, self._server_id, self.incarnation, owner)
            )
        finally:
            self.pending.discard(room_id)

    async def delete_room(self, room_id: RoomId, owner: Identity) -> bool:
        return await self.request(
            rs.DeleteRoom(self.next_request_id(), room_id, self._server_id, self.incarnation, owner)
        )

    async def begin_move(self, identity: Identity, to_server: ServerId) -> bool:
        # Wall-clock: every server compares it with its own clock when the move expires.
        return await self.request(
            rs.BeginMove(self.next_request_id(), identity, self._server_id, to_server, self.incarnation, time.time())
        )

    async def complete_move(self, identity: Identity) -> bool:
        self.pending.add(identity)
        try:
            return await self.request(
                rs.CompleteMove(self.next_request_id(), identity, self._server_id, self.incarnation)
            )
        finally:
            self.pending.discard(identity)

    def room(self, room_id: str) -> RoomInfo | None:
        entry = self.registry.room(room_id)
        if entry is None:
            return None
        return RoomInfo(RoomId(entry.room_id), ServerId(entry.server), entry.owner)

    def rooms(self) -> list[RoomInfo]:
        return [RoomInfo(RoomId(e.room_id), ServerId(e.server), e.owner) for e in self.registry.rooms()]

    def address(self, server_id: ServerId) -> Address:
        server = self.config.server(server_id)
        return Address(server.host, server.clients_port)

    # -- reconciliation -------------------------------------------------------------------------------

    def orphans(self, live_identities: Iterable[str], live_rooms: Iterable[str], now_wall: float) -> list[rs.Command]:
        """Commands releasing what the registry says this server holds but no session of it does."""
        live = set(live_identities) | self.pending
        rooms_live = set(live_rooms) | self.pending
        commands: list[rs.Command] = []
        for entry in self.registry.identities():
            if entry.server != self._server_id or entry.identity in live:
                continue
            if entry.in_transit:
                # Headed here and not arrived in time: free it (a routed client that never came).
                if now_wall - entry.since >= MOVE_TIMEOUT_S:
                    commands.append(rs.ExpireMove(self.next_request_id(), entry.identity, entry.server, entry.since))
            elif entry.incarnation == self.incarnation:
                commands.append(
                    rs.ReleaseIdentity(self.next_request_id(), entry.identity, self._server_id, self.incarnation)
                )
        for room in self.registry.rooms():
            if room.server != self._server_id or is_mainhall(room.room_id) or room.room_id in rooms_live:
                continue
            if room.incarnation == self.incarnation:
                commands.append(
                    rs.DeleteRoom(self.next_request_id(), room.room_id, self._server_id, self.incarnation, room.owner)
                )
        return commands
