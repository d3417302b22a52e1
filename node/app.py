"""One chatmesh server: wires the registry replica, the election, the coordinator service, the chat
listener and the admin endpoints, and owns their lifetimes.

Threads: the asyncio loop owns all mutable node state. PySyncObj applies commands in its own thread and
reaches the loop only through `call_soon_threadsafe`; the admin (Flask/waitress) thread reads immutable
snapshots the loop publishes and steers through `run_coroutine_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any, Protocol, assert_never

import flask

from bully.election import ElectionTimings
from bully.runtime import ElectionRuntime
from bully.transport import TcpTransport, Transport
from cluster.config import ClusterConfig
from cluster.names import Identity, RoomId, ServerId
from cluster.timings import ClusterTimings
from node import late_commit as late
from node.admin import Schemes, create_app
from node.coordinator import REQUEST_KIND, ClusterDirectory, CoordinatorService, Registry
from node.late_commit import LateCommitAction, late_commit_actions
from node.limits import Limits
from node.membership import DeclareDown, MembershipPolicy, MembershipView
from node.reconcile import Orphan, Reconciler
from node.server import ChatServer
from node.snapshot import SnapshotBuilder
from node.stall import LoopMonitor, StallGuard
from node.status import EventLog, SnapshotBox
from node.tls import TlsOptions, serve_admin_app
from node.websocket import listener_for, ws_url
from registry import state as rs
from registry.replicated import RaftStatus, RaftTimings, RegistryDataError, RegistryUnavailable, ReplicatedRegistry

log = logging.getLogger("chatmesh.node")

# Exit status of a server that could not start (a port in use, a data directory locked): as for a bad
# configuration, the operator must change something before starting it again.
STARTUP_ERROR_STATUS = 2

# How often the admin snapshot is refreshed (also refreshed on every change).
SNAPSHOT_INTERVAL_S = 0.25
# How long a clean stop may spend telling clients and releasing entries.
SHUTDOWN_TIMEOUT_S = 5.0
# Admin actions wait this long for the loop.
ADMIN_ACTION_TIMEOUT_S = 10.0
# Pause between barrier attempts after a stall (the timings are in cluster/timings.py).
RETRY_AFTER_STALL_S = 0.1


def election_timings(t: ClusterTimings) -> ElectionTimings:
    return ElectionTimings(
        heartbeat_interval_s=t.heartbeat_interval_s,
        mesh_heartbeat_interval_s=t.mesh_heartbeat_interval_s,
        suspect_after_s=t.suspect_after_s,
        suspect_gap_factor=t.suspect_gap_factor,
        suspect_max_s=t.suspect_max_s,
        answer_timeout_s=t.answer_timeout_s,
        coordinator_timeout_s=t.coordinator_timeout_s,
        max_nominees=int(t.max_nominees),
        nomination_timeout_s=t.nomination_timeout_s,
        holdoff_s=t.holdoff_s,
        lead_retry_s=t.lead_retry_s,
    )


def raft_timings(t: ClusterTimings) -> RaftTimings:
    return RaftTimings(
        append_entries_period_s=t.raft_append_entries_period_s,
        idle_heartbeat_s=t.raft_idle_heartbeat_s,
        raft_min_timeout_s=t.raft_min_timeout_s,
        raft_max_timeout_s=t.raft_max_timeout_s,
        connection_timeout_s=t.raft_connection_timeout_s,
        connection_retry_s=t.raft_connection_retry_s,
        leader_fallback_timeout_s=t.raft_leader_fallback_timeout_s,
        election_retry_min_s=t.raft_election_retry_min_s,
        election_retry_max_s=t.raft_election_retry_max_s,
        auto_tick_period_s=t.raft_tick_period_s,
        commit_timeout_s=t.commit_timeout_s,
        leader_hand_over_interval_s=t.raft_hand_over_interval_s,
        release_defer_s=t.raft_release_defer_s,
    )


@dataclass(frozen=True)
class NodeOptions:
    data_dir: Path
    secret: str
    admin_token: str | None = None
    admin_loopback_only: bool = False
    limits: Limits = field(default_factory=Limits)
    timings: ClusterTimings = field(default_factory=ClusterTimings)
    tls: TlsOptions = field(default_factory=TlsOptions)
    ws_origins: str = ""  # extra browser origins allowed on the WebSocket port (CHATMESH_WS_ORIGINS)
    # Hand Raft leadership to the Fast Bully coordinator (one hop less per approval; docs/registry.md has
    # the measurements behind this default). False leaves it wherever Raft elected it.
    raft_leader_follows_coordinator: bool = True


class NodeRegistry(Registry, Protocol):
    """What the node needs of its registry replica: `ReplicatedRegistry`, or the simulation's Raft model."""

    def start(self) -> None: ...
    def close(self) -> None: ...
    def add_listener(self, callback: Callable[[rs.Command, rs.Result], None]) -> None: ...
    def is_ready(self) -> bool: ...
    def has_quorum(self) -> bool: ...
    def servers_up(self) -> dict[str, int]: ...
    def prefer_leader(self, server_id: str | None) -> None: ...
    def leader_is_gone(self, server_id: str, after_s: float = 0.0) -> None: ...
    def status(self) -> RaftStatus: ...
    def counts(self) -> dict[str, int]: ...
    def applied_commands(self) -> int: ...


def new_incarnation() -> int:
    """Milliseconds since the epoch: every restart of a server gets a larger number than the last."""
    return time.time_ns() // 1_000_000


class Node:
    """One server. `registry` and `transport` default to the real ones (PySyncObj, TCP); a simulation passes
    its own, and `listen=False` keeps the client and admin ports unbound (its clients are handed to
    `chat.client_protocol()` directly). `rng` drives the election's timer jitter (seeded in a simulation)."""

    def __init__(
        self,
        config: ClusterConfig,
        server_id: str,
        options: NodeOptions,
        *,
        registry: NodeRegistry | None = None,
        transport: Transport | None = None,
        listen: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.server_id = ServerId(server_id)
        self.me = config.server(server_id)
        self.options = options
        self.incarnation = new_incarnation()
        self._stop = asyncio.Event()
        self.serving = False
        self.started_at = 0.0
        # Work started from callbacks (undo, rejoin, stall confirmation, declarations) runs in the serving
        # TaskGroup, cancelled and awaited at stop; what is asked before it exists waits for it.
        self._tasks: asyncio.TaskGroup | None = None
        self._early: list[Coroutine[Any, Any, None]] = []
        self._rejoining = False
        self.events = EventLog()
        self.timings = options.timings
        self._membership_wake = asyncio.Event()
        self.registry: NodeRegistry = registry or ReplicatedRegistry(
            config, self.server_id, options.data_dir, options.secret, raft_timings(self.timings)
        )
        self.transport: Transport = transport or TcpTransport(config, self.server_id, options.secret.encode())
        self.listen = listen
        self.rng = rng or random.Random()
        # The object graph, built here with explicit arguments; run() only starts it.
        self.registry.add_listener(self._on_applied_threadsafe)
        self.election = ElectionRuntime(
            self.config,
            self.server_id,
            self.transport,
            can_lead=self._can_lead,
            incarnation=self.incarnation,
            timings=election_timings(self.timings),
            on_coordinator_change=self._on_coordinator_change,
            on_peer_down=self._on_peer_down,
            on_peer_up=self._on_peer_up,
            rng=self.rng,
        )
        self.service = CoordinatorService(self.registry, self.election, commit_timeout_s=self.timings.commit_timeout_s)
        self.transport.on_request(REQUEST_KIND, self.service.handle)
        self.directory = ClusterDirectory(
            self.config,
            self.server_id,
            self.incarnation,
            self.registry,
            self.election,
            self.transport,
            self.service,
            timings=self.timings,
        )
        self.stall_guard = StallGuard(self.timings.stall_threshold_s, self._on_stall)
        self.chat = ChatServer(
            self.server_id,
            self.directory,
            self.me.host,
            self.me.clients_port,
            self.options.limits,
            stall_guard=self.stall_guard,
            tls=self.options.tls.clients,
        )
        tls = self.options.tls
        self.websocket = listener_for(
            self.chat, self.config, self.me, tls.websocket, tls.admin is not None, self.options.ws_origins
        )
        self.snapshots = SnapshotBox()
        self._duties_started = False
        self.loop_monitor = LoopMonitor(self.timings.stall_tick_s)
        self._snapshot_builder = SnapshotBuilder(
            self.config,
            self.server_id,
            self.chat,
            self.registry,
            self.election,
            self.directory,
            self.events,
            self.loop_monitor,
            self.stall_guard,
        )

    def request_stop(self) -> None:
        self._stop.set()

    # -- lifetime ------------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.started_at = loop.time()
        log.info("%s timings: %s", self.server_id, self.timings.describe())
        # First thing, so a blocking start-up shows in the largest loop gap too; cancelled at the end.
        monitor = loop.create_task(self.loop_monitor.run(self._on_loop_tick))
        if self.listen:
            await asyncio.to_thread(self.options.data_dir.mkdir, parents=True, exist_ok=True)

        admin_server = None
        status = 0
        me = self.me
        tls = self.options.tls
        starting: str | None = f"the registry (Raft port {me.host}:{me.raft_port})"
        try:
            await asyncio.to_thread(self.registry.start)
            starting = f"the coordination listener ({me.host}:{me.coordination_port})"
            await self.transport.start()
            await self.election.start()
            starting = f"the client listener ({me.host}:{me.clients_port})"
            if self.listen:
                await self.chat.start()
                starting = f"the WebSocket listener ({me.host}:{me.ws_port})"
                await self.websocket.start()
            else:
                self.chat.open()
            self.publish_snapshot()
            starting = f"the admin listener ({me.host}:{me.admin_port})"
            if self.listen:
                app = await asyncio.to_thread(self._admin_app)
                admin_server = await serve_admin_app(app, self.me.host, self.me.admin_port, tls.admin)
            starting = None
            await self._serve()
        except (OSError, RegistryDataError) as exc:
            if starting is None:
                raise
            # Start-up errors are configuration or environment errors: one line naming what, exit status 2.
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.error("%s cannot start %s: %s", self.server_id, starting, reason)
            print(f"chatmesh {self.server_id}: cannot start {starting}: {reason}", file=sys.stderr, flush=True)
            status = STARTUP_ERROR_STATUS
        finally:
            if admin_server is not None:
                await admin_server.close()
            with contextlib.suppress(Exception):
                await self.websocket.close()
            with contextlib.suppress(Exception):
                await self.chat.close()
            with contextlib.suppress(Exception):
                await self.election.close()
            with contextlib.suppress(Exception):
                await self.transport.close()
            await asyncio.to_thread(self.registry.close)
            monitor.cancel()
        log.info("%s stopped (largest loop gap %.3fs)", self.server_id, self.loop_monitor.max_gap_s)
        return status

    def _admin_app(self) -> flask.Flask:
        """Build the admin app (a worker thread: Flask's set-up does not belong on the loop)."""
        options, tls = self.options, self.options.tls
        schemes = Schemes(admin_tls=tls.admin is not None, ws_tls=tls.websocket is not None)
        return create_app(
            self.snapshots, _AdminActions(self), options.admin_token, options.admin_loopback_only, schemes
        )

    async def _serve(self) -> None:
        """Run the background duties until a stop is requested, then stop cleanly."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._duties_started = True
                self._tasks = tasks
                early, self._early = self._early, []
                for coroutine in early:
                    tasks.create_task(self._guarded(coroutine))
                tasks.create_task(self._announce())
                tasks.create_task(self._reconcile_loop())
                tasks.create_task(self._membership_loop())
                tasks.create_task(self._snapshot_loop())
                await self._stop.wait()
                log.info("%s stopping", self.server_id)
                await self._shutdown()
                raise _Stopped
        except* _Stopped:
            pass

    async def _shutdown(self) -> None:
        """Clients get their quit roomchange, their entries are released, then the server signs off."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.chat.shutdown(), SHUTDOWN_TIMEOUT_S)
        with contextlib.suppress(RegistryUnavailable):
            command = rs.ServerDown(self.directory.next_request_id(), self.server_id, self.incarnation)
            await self.registry.submit(command, self.timings.announce_timeout_s)

    async def _announce(self) -> None:
        """Commit "server up" for this incarnation: a fresh MainHall and nothing stale from a past life."""
        attempts = 0
        while not self._stop.is_set():
            attempts += 1
            command = rs.ServerUp(self.directory.next_request_id(), self.server_id, self.incarnation)
            try:
                result = await self.registry.submit(command, self.timings.announce_timeout_s)
            except RegistryUnavailable as exc:
                if attempts % 5 == 1:
                    log.warning("%s waiting for a Raft quorum to announce itself (%s)", self.server_id, exc)
                continue
            if result.ok:
                break
            log.error("%s could not announce itself: %s", self.server_id, result.reason)
            await asyncio.sleep(self.timings.announce_timeout_s)
        if self._stop.is_set():
            return
        # The line first: whoever sees "serving" in /status (run_cluster's supervisor) finds it written.
        print(
            f"chatmesh {self.server_id} ready: clients {self.me.host}:{self.me.clients_port}, "
            f"websocket {ws_url(self.me, self.options.tls.websocket is not None)}, "
            f"admin {'https' if self.options.tls.admin else 'http'}://{self.me.host}:{self.me.admin_port}/ "
            f"(pid {os.getpid()})",
            flush=True,
        )
        self.serving = True
        self.publish_snapshot()

    # -- election and registry callbacks --------------------------------------------------------------

    def _can_lead(self) -> bool:
        return self.registry.is_ready() and self.registry.has_quorum()

    def _on_coordinator_change(self, coordinator: str | None) -> None:
        log.info("%s: coordinator is now %s", self.server_id, coordinator)
        self.events.record(
            time.time(), f"coordinator is now {coordinator}" if coordinator else "coordinator lost: electing"
        )
        self.directory.coordinator_changed(coordinator)
        self._membership_wake.set()
        if self.options.raft_leader_follows_coordinator:
            self.registry.prefer_leader(coordinator)
        self.publish_snapshot()

    def _on_peer_down(self, peer: str, incarnation: int, certain: bool = False) -> None:
        log.info("%s: %s is down (%s)", self.server_id, peer, "gone" if certain else "silent")
        self.events.record(time.time(), f"{peer} is down")
        self._membership_wake.set()
        # A dead Raft leader is replaced at once, without Raft's election timeout: the top surviving voter
        # stands first, the next voter raft_election_stagger_s later if there is still no leader (the first
        # one's log may be behind when commits were in flight), and so on; all at once would split the vote.
        # A read-only replica cannot stand: it forgets the dead leader at once (registry/replicated.py).
        if self.registry.status().leader in (peer, None):
            rank = self._surviving_voter_rank()
            self.registry.leader_is_gone(peer, 0.0 if rank is None else rank * self.timings.raft_election_stagger_s)
        self.publish_snapshot()

    def _surviving_voter_rank(self) -> int | None:
        """0 for the highest-priority voter up (the Fast Bully order among the Raft voters), 1 for the next,
        ...; None on a server that is not a voter."""
        if not self.config.is_voter(self.server_id):
            return None
        up = self.election.servers_up
        return [v for v in self.config.voter_ids if v in up or v == self.server_id].index(self.server_id)

    def _on_peer_up(self, peer: str, incarnation: int) -> None:
        log.info("%s: %s is up (incarnation %d)", self.server_id, peer, incarnation)
        self.events.record(time.time(), f"{peer} is up")
        self.publish_snapshot()

    def _on_applied_threadsafe(self, command: rs.Command, result: rs.Result) -> None:
        # PySyncObj's thread, for every command the cluster commits. Waking the loop costs a self-pipe
        # write, a loop turn and the GIL hand-offs between the two threads, on the client's server while it
        # serves the next login; only our own requests still running or in doubt, and a "server down"
        # naming us, matter (issue 14).
        if not (isinstance(command, rs.ServerDown) or self.directory.commit_may_matter(command.request_id)):
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed during shutdown
            self.loop.call_soon_threadsafe(self._on_applied, command, result)

    def _on_applied(self, command: rs.Command, result: rs.Result) -> None:
        if (
            isinstance(command, rs.ServerDown)
            and command.server == self.server_id
            and command.incarnation >= self.incarnation
            and result.ok
            and not self._stop.is_set()
        ):
            self._fenced()
        in_doubt = self.directory.take_in_doubt(command.request_id)
        if in_doubt is not None and result.ok:
            # The client was already refused: the policy decides from the local state sampled now, in
            # the same loop turn as the commit is seen (node/late_commit.py).
            actions = late_commit_actions(
                in_doubt,
                set(self.chat.local_identities()),
                set(self.chat.local_room_ids()),
                set(self.directory.pending),
            )
            log.info("%s: in-doubt %s committed late: %s", self.server_id, type(in_doubt).__name__, actions)
            for action in actions:
                # At once, in this loop turn: the room must go before anything else can see or reuse its id.
                if isinstance(action, late.DropRoomHere):
                    self.chat.room_gone_from_registry(action.room_id)
            self._spawn(self._undo(actions))

    def _fenced(self) -> None:
        """The cluster declared this incarnation dead and released its clients: start a new life."""
        self._rejoining = True
        log.warning("%s was declared down by the cluster; disconnecting clients and rejoining", self.server_id)
        self.incarnation = new_incarnation()
        self.directory.incarnation = self.incarnation
        self.election.incarnation = self.incarnation
        self.serving = False
        self._spawn(self._rejoin())

    async def _rejoin(self) -> None:
        self._rejoining = True
        try:
            await self.chat.disconnect_all()
        finally:
            self._rejoining = False
            self.stall_guard.reopen()
        await self._announce()

    def _on_loop_tick(self, now: float) -> None:
        """The loop monitor's tick feeds the stall guard once the server serves its duties."""
        if self._duties_started:
            self.stall_guard.tick(now)

    def _on_stall(self, gap_s: float) -> None:
        log.warning("%s stalled for %.2fs: holding client input until the registry confirms it", self.server_id, gap_s)
        self.events.record(time.time(), f"{self.server_id} stalled {gap_s:.1f}s")
        self._spawn(self._confirm_after_stall())

    async def _confirm_after_stall(self) -> None:
        """Commit a barrier: once applied here, so is any "server down" for this server (which fences it and
        disconnects its clients before the gate reopens)."""
        attempts = 0
        while not self._stop.is_set():
            attempts += 1
            try:
                barrier = rs.Barrier(self.directory.next_request_id())
                await self.registry.submit(barrier, self.timings.announce_timeout_s)
            except RegistryUnavailable as exc:
                if attempts % 5 == 1:
                    log.warning("%s: cannot confirm after the stall yet (%s); client input waits", self.server_id, exc)
                await asyncio.sleep(RETRY_AFTER_STALL_S)
                continue
            if not self._rejoining:
                self.stall_guard.reopen()
            return

    async def _undo(self, actions: tuple[LateCommitAction, ...]) -> None:
        """Carry out `late_commit_actions`, in order (DropRoomHere was done when the commit was seen)."""
        for action in actions:
            match action:
                case late.SubmitRelease(identity):
                    await self.directory.release_identity(Identity(identity))
                case late.SubmitRoomDelete(room_id, owner):
                    await self.directory.delete_room(RoomId(room_id), Identity(owner))
                case late.DropRoomHere():
                    pass  # done in _on_applied
                case late.EndSession(identity):
                    await self.chat.kick(identity)
                case late.Leave():
                    pass
                case _:
                    assert_never(action)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run `coroutine` in the serving TaskGroup (cancelled and awaited at stop, never forgotten)."""
        if self._tasks is None:
            self._early.append(coroutine)
        else:
            self._tasks.create_task(self._guarded(coroutine))

    async def _guarded(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """A failing piece of background work is logged; it must not stop the whole server."""
        try:
            await coroutine
        except Exception:
            log.exception("%s: background work failed", self.server_id)

    # -- periodic work --------------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        """Release registry entries this server holds that match no live session; `Reconciler` decides."""
        reconciler = Reconciler()
        while True:
            await asyncio.sleep(self.timings.reconcile_interval_s)
            if not self.serving:
                continue
            for orphan in reconciler.review(self._orphans()):
                # Each release is awaited (up to the request deadline, longer without a quorum): by the time
                # this one goes, the name may be held or claimed here again, and a release built from the
                # pass's view would free it under that session. Look again just before sending.
                if orphan not in self._orphans():
                    continue
                log.info("%s: reconciling orphan %s %s", self.server_id, orphan.kind, orphan.name)
                if orphan.kind == "identity":
                    await self.chat.release_orphan(Identity(orphan.name))
                else:
                    await self.directory.request(self.directory.release_command(orphan))

    def _orphans(self) -> list[Orphan]:
        return self.directory.orphans(self.chat.local_identities(), self.chat.local_room_ids(), time.time())

    async def _membership_loop(self) -> None:
        """Feed `MembershipPolicy` (node/membership.py) every tick and whenever a peer goes down or the
        coordinator changes, and commit the "server down" declarations it decides."""
        policy = MembershipPolicy(
            self.server_id,
            len(self.config.ids),
            self.started_at,
            self.timings.startup_grace_s,
            redeclare_after_s=self.timings.announce_timeout_s,
            unheard_grace_s=self.timings.unheard_grace_s,
            follow_confirm_s=self.timings.follow_confirm_s,
        )
        while True:
            wait_s = self.timings.membership_interval_s
            due = policy.confirmation_due(self.loop.time())
            if due is not None:
                wait_s = min(wait_s, due - self.loop.time())
            # asyncio.timeout, not wait_for: wait_for wraps Event.wait in a new task every tick (ten a second).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._membership_wake.wait()
            self._membership_wake.clear()
            view = MembershipView(
                now=self.loop.time(),
                is_coordinator=self.election.is_coordinator,
                alive=self.election.servers_up,
                heard=self.election.peer_incarnations,
                registered=self.registry.servers_up(),
                has_quorum=self.registry.has_quorum(),
                heard_recently=self.election.servers_heard_within(self.timings.suspect_after_s / 2),
                followers=self.election.followers(),
            )
            for decision in policy.decide(view):
                log.warning("%s: declaring %s down (incarnation %d)", self.server_id, *astuple(decision))
                self._spawn(self._declare_down(policy, decision))

    async def _declare_down(self, policy: MembershipPolicy, decision: DeclareDown) -> None:
        command = rs.ServerDown(self.directory.next_request_id(), decision.server, decision.incarnation)
        try:
            await self.registry.submit(command, self.timings.announce_timeout_s)
        except RegistryUnavailable as exc:
            log.info("%s: declaring %s down: %s; again at the next tick", self.server_id, decision.server, exc)
            policy.declaration_failed(decision)

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            self.publish_snapshot()

    def publish_snapshot(self) -> None:
        self.snapshots.publish(self._snapshot_builder.build(self.serving, self.snapshots.get()))


class _Stopped(Exception):
    pass


class _AdminActions:
    """Admin writes, run on the node's loop from the admin thread."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def _run(self, coroutine: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.node.loop)
        return future.result(ADMIN_ACTION_TIMEOUT_S)

    def start_election(self) -> None:
        self.node.loop.call_soon_threadsafe(self.node.election.start_election)

    def kick(self, identity: str) -> bool:
        return bool(self._run(self.node.chat.kick(identity)))

    def delete_room(self, room_id: str) -> str:
        return str(self._run(self.node.chat.operator_delete_room(room_id)))
