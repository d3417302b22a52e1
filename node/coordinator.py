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
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, assert_never

from bully.transport import RequestAbandoned
from cluster.config import ClusterConfig
from cluster.names import Identity, RoomId, ServerId
from cluster.timings import ClusterTimings
from node.directory import Address, RoomInfo
from node.late_commit import UNDOABLE
from node.reconcile import Orphan, find_orphans
from node.retry import Ask, Finish, RequestRetry, Wait
from node.status import LatencyRecorder
from registry import state as rs
from registry.codec import command_from_wire, command_to_wire
from registry.replicated import RegistryUnavailable

log = logging.getLogger("chatmesh.coordinator")

REQUEST_KIND = "registry"
# Request deadlines, commit timeouts and retry pauses are in cluster/timings.py (ClusterTimings).
# A client routed to another server must arrive there within this time or its identity is released.
MOVE_TIMEOUT_S = 10.0
# Bound on the in-doubt set (request ids whose commit outcome is unknown).
MAX_IN_DOUBT = 10_000


class Registry(Protocol):
    async def submit(self, command: rs.Command, timeout: float) -> rs.Result: ...
    def identity(self, name: str) -> rs.IdentityEntry | None: ...
    def room(self, room_id: str) -> rs.RoomEntry | None: ...
    def rooms(self) -> list[rs.RoomEntry]: ...
    def identities(self) -> list[rs.IdentityEntry]: ...


class ElectionView(Protocol):
    """What requests need of the election (named apart from the `bully.messages.Election` message)."""

    @property
    def coordinator(self) -> str | None: ...
    @property
    def is_coordinator(self) -> bool: ...


class RequestChannel(Protocol):
    """The one part of `bully.transport.Transport` the directory uses."""

    async def request(
        self, peer: str, message: dict[str, Any], timeout: float, abandon: asyncio.Future[Any] | None = None
    ) -> dict[str, Any]: ...


class CoordinatorService:
    """Answers registry requests while this server is the coordinator."""

    def __init__(
        self,
        registry: Registry,
        election: ElectionView,
        on_result: Callable[[bool, float], None] | None = None,
        commit_timeout_s: float = ClusterTimings().commit_timeout_s,
    ):
        self.registry = registry
        self.election = election
        self.on_result = on_result
        self.commit_timeout_s = commit_timeout_s

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
        self, sender: str, message: dict[str, Any], commit_timeout_s: float | None = None
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
            result = await self.registry.submit(
                command, self.commit_timeout_s if commit_timeout_s is None else commit_timeout_s
            )
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
        election: ElectionView,
        transport: RequestChannel,
        service: CoordinatorService,
        timings: ClusterTimings | None = None,
    ) -> None:
        self.config = config
        self.timings = timings or ClusterTimings()
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
        # Request ids of `request()` calls not finished yet. Written on the loop only; PySyncObj's thread
        # reads membership (`commit_may_matter`), atomic under the GIL.
        self.unfinished: set[str] = set()
        self.approvals = 0
        self.refusals = 0
        # Changes of this server's coordinator view (to another server or to none) once it knew one.
        self.coordinator_changes = 0
        self._knew_coordinator = False
        self.latency = LatencyRecorder()

    @property
    def server_id(self) -> ServerId:
        return self._server_id

    def next_request_id(self) -> str:
        return f"{self._id_prefix}.{next(self._ids)}"

    def coordinator_changed(self, coordinator: str | None) -> None:
        """Called on the loop when the election runtime reports a new coordinator: wakes every waiter."""
        if self._knew_coordinator:
            self.coordinator_changes += 1
        self._knew_coordinator = self._knew_coordinator or coordinator is not None
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
            commit_timeout_s = min(self.timings.commit_timeout_s, timeout)
            return await self.service.handle(self._server_id, wire, commit_timeout_s=commit_timeout_s)
        # One wait per attempt, the transport's (its timer is the attempt's deadline): `gone` makes it give
        # up when another coordinator takes over; a change that elects the same one keeps waiting.
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        hooked = self._next_change()  # shared by every waiter: the callback comes off it afterwards

        def changed(_: asyncio.Future[None]) -> None:
            nonlocal hooked
            if gone.done():
                return  # the attempt ended while this call was on its way
            if self.election.coordinator != coordinator:
                gone.set_result(None)
            else:
                hooked = self._next_change()
                hooked.add_done_callback(changed)

        hooked.add_done_callback(changed)
        try:
            return await self.transport.request(coordinator, wire, timeout, abandon=gone)
        except RequestAbandoned:
            return None
        finally:
            gone.cancel()
            hooked.remove_done_callback(changed)

    async def request(self, command: rs.Command, deadline_s: float | None = None) -> bool:
        """Run `command` at the coordinator until it gives a final answer or the deadline passes; the
        decisions are `RequestRetry`'s (node/retry.py), this only carries them out."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        t = self.timings
        deadline_s = deadline_s if deadline_s is not None else t.request_deadline_s
        retry = RequestRetry(
            command.request_id, started, deadline_s, t.peer_request_timeout_s, t.retry_pause_s, t.no_coordinator_wait_s
        )
        wire = {"kind": REQUEST_KIND, "command": command_to_wire(command)}
        self.unfinished.add(command.request_id)
        try:
            while True:
                match retry.next(loop.time(), self.election.coordinator):
                    case Finish(approved, in_doubt):
                        break
                    case Wait(timeout_s):
                        await self._wait_coordinator_change(timeout_s)
                    case Ask(coordinator, timeout_s):
                        try:
                            reply = await self._ask(coordinator, wire, timeout_s)
                        except Exception as exc:  # RequestFailed, timeouts: the coordinator may be gone
                            log.debug("request %s to %s failed: %s", command.request_id, coordinator, exc)
                            retry.failed(loop.time())
                        else:
                            retry.answered(loop.time(), reply)
            if approved:
                self.approvals += 1
                self.latency.observe(loop.time() - started)
                return True
            self._refused(command, in_doubt, why=f"after {deadline_s:.1f}s")
            return False
        except asyncio.CancelledError:
            if retry.abandoned(loop.time()).in_doubt:
                self._refused(command, in_doubt=True, why="(abandoned)")
            raise
        finally:
            # After `_refused` filed it in `in_doubt` (if it is in doubt): while its commit can matter, the id
            # is in one of the two.
            self.unfinished.discard(command.request_id)

    def _refused(self, command: rs.Command, in_doubt: bool, why: str) -> None:
        self.refusals += 1
        if not in_doubt:
            return
        log.warning("request %s (%s) in doubt %s", command.request_id, type(command).__name__, why)
        # Only what `late_commit_actions` may have to undo (node/late_commit.py).
        if isinstance(command, UNDOABLE):
            if len(self.in_doubt) >= MAX_IN_DOUBT:
                self.in_doubt.pop(next(iter(self.in_doubt)))
            self.in_doubt[command.request_id] = command

    def commit_may_matter(self, request_id: str) -> bool:
        """Whether a commit of `request_id` seen now may change anything here: only a request of this directory
        still running or refused in doubt can need its commit undone (`take_in_doubt`). Any thread: two
        membership tests, atomic under the GIL, of sets the loop alone changes."""
        return request_id in self.unfinished or request_id in self.in_doubt

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

    def orphans(self, live_identities: Iterable[str], live_rooms: Iterable[str], now_wall: float) -> list[Orphan]:
        """What the registry says this server holds but no session of it does (node/reconcile.py)."""
        return find_orphans(
            self._server_id,
            self.incarnation,
            self.registry.identities(),
            self.registry.rooms(),
            set(live_identities) | self.pending,
            set(live_rooms) | self.pending,
            now_wall,
            MOVE_TIMEOUT_S,
        )

    def release_command(self, orphan: Orphan) -> rs.Command:
        """The registry command that releases `orphan`, with a fresh request id."""
        request_id = self.next_request_id()
        match orphan.kind:
            case "identity":
                return rs.ReleaseIdentity(request_id, orphan.name, self._server_id, orphan.incarnation)
            case "move":
                return rs.ExpireMove(request_id, orphan.name, self._server_id, orphan.since)
            case "room":
                return rs.DeleteRoom(request_id, orphan.name, self._server_id, orphan.incarnation, orphan.owner)
            case _:
                assert_never(orphan.kind)
