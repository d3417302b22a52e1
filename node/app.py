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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bully.election import ElectionTimings
from bully.runtime import ElectionRuntime
from bully.transport import Transport
from cluster.config import ClusterConfig
from cluster.names import Identity, RoomId, ServerId
from node.admin import Schemes, create_app
from node.coordinator import (
    RECONCILE_INTERVAL_S,
    REQUEST_KIND,
    STARTUP_GRACE_S,
    ClusterDirectory,
    CoordinatorService,
)
from node.limits import Limits
from node.server import ChatServer
from node.snapshot import build_snapshot
from node.stall import StallGuard
from node.status import EventLog, SnapshotBox
from node.tls import TlsOptions, serve_admin_app
from node.websocket import listener_for, ws_url
from registry import state as rs
from registry.replicated import RegistryUnavailable, ReplicatedRegistry

log = logging.getLogger("chatmesh.node")

# How often the coordinator compares registry membership with the failure detector.
MEMBERSHIP_INTERVAL_S = 0.1
# How often the admin snapshot is refreshed (also refreshed on every change).
SNAPSHOT_INTERVAL_S = 0.25
# One attempt to commit this server's own "server up"/"server down".
ANNOUNCE_TIMEOUT_S = 2.0
# How long a clean stop may spend telling clients and releasing entries.
SHUTDOWN_TIMEOUT_S = 5.0
# Admin actions wait this long for the loop.
ADMIN_ACTION_TIMEOUT_S = 10.0
# The stall watchdog ticks this often; a longer gap closes client input until a registry barrier commits.
STALL_TICK_S = 0.05
RETRY_AFTER_STALL_S = 0.1
# Below the failure timeout by two heartbeats: no peer can have declared this server down after a shorter
# stall than this, so shorter ones need no check.
STALL_THRESHOLD_S = ElectionTimings().suspect_after_s - 2 * ElectionTimings().heartbeat_interval_s


@dataclass(frozen=True)
class NodeOptions:
    data_dir: Path
    secret: str
    admin_token: str | None = None
    admin_loopback_only: bool = False
    limits: Limits = field(default_factory=Limits)
    tls: TlsOptions = field(default_factory=TlsOptions)
    ws_origins: str = ""  # extra browser origins allowed on the WebSocket port (CHATMESH_WS_ORIGINS)


def new_incarnation() -> int:
    """Milliseconds since the epoch: every restart of a server gets a larger number than the last."""
    return time.time_ns() // 1_000_000


class Node:
    def __init__(self, config: ClusterConfig, server_id: str, options: NodeOptions) -> None:
        self.config = config
        self.server_id = ServerId(server_id)
        self.me = config.server(server_id)
        self.options = options
        self.incarnation = new_incarnation()
        self._stop = asyncio.Event()
        self.serving = False
        self.started_at = 0.0
        self._background: set[asyncio.Task[Any]] = set()
        self._rejoining = False
        self.events = EventLog()
        self.snapshot_lists_key: tuple[int, int] | None = None

    def request_stop(self) -> None:
        self._stop.set()

    # -- lifetime ------------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.started_at = loop.time()
        self.options.data_dir.mkdir(parents=True, exist_ok=True)

        self.registry = ReplicatedRegistry(self.config, self.server_id, self.options.data_dir, self.options.secret)
        self.registry.add_listener(self._on_applied_threadsafe)
        self.transport = Transport(self.config, self.server_id, self.options.secret.encode())
        self.election = ElectionRuntime(
            self.config,
            self.server_id,
            self.transport,
            can_lead=self._can_lead,
            incarnation=self.incarnation,
            on_coordinator_change=self._on_coordinator_change,
            on_peer_down=self._on_peer_down,
            on_peer_up=self._on_peer_up,
        )
        self.service = CoordinatorService(self.registry, self.election)
        self.transport.on_request(REQUEST_KIND, self.service.handle)
        self.directory = ClusterDirectory(
            self.config, self.server_id, self.incarnation, self.registry, self.election, self.transport, self.service
        )
        self.stall_guard = StallGuard(STALL_THRESHOLD_S, self._on_stall)
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
        admin_server = None
        status = 0
        self.registry.start()
        try:
            await self.transport.start()
            await self.election.start()
            await self.chat.start()
            await self.websocket.start()
            self.publish_snapshot()
            schemes = Schemes(admin_tls=tls.admin is not None, ws_tls=tls.websocket is not None)
            app = create_app(
                self.snapshots, _AdminActions(self), self.options.admin_token, self.options.admin_loopback_only, schemes
            )
            admin_server = await serve_admin_app(app, self.me.host, self.me.admin_port, tls.admin)
            await self._serve()
        except OSError as exc:
            log.error("%s cannot start: %s", self.server_id, exc)
            print(f"chatmesh {self.server_id}: cannot start: {exc}", flush=True)
            status = 1
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
            self.registry.close()
        log.info("%s stopped", self.server_id)
        return status

    async def _serve(self) -> None:
        """Run the background duties until a stop is requested, then stop cleanly."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._announce())
                tasks.create_task(self._reconcile_loop())
                tasks.create_task(self._membership_loop())
                tasks.create_task(self._snapshot_loop())
                tasks.create_task(self._stall_watchdog())
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
            await self.registry.submit(
                rs.ServerDown(self.directory.next_request_id(), self.server_id, self.incarnation), ANNOUNCE_TIMEOUT_S
            )

    async def _announce(self) -> None:
        """Commit "server up" for this incarnation: a fresh MainHall and nothing stale from a past life."""
        attempts = 0
        while not self._stop.is_set():
            attempts += 1
            command = rs.ServerUp(self.directory.next_request_id(), self.server_id, self.incarnation)
            try:
                result = await self.registry.submit(command, ANNOUNCE_TIMEOUT_S)
            except RegistryUnavailable as exc:
                if attempts % 5 == 1:
                    log.warning("%s waiting for a Raft quorum to announce itself (%s)", self.server_id, exc)
                continue
            if result.ok:
                break
            log.error("%s could not announce itself: %s", self.server_id, result.reason)
            await asyncio.sleep(ANNOUNCE_TIMEOUT_S)
        if self._stop.is_set():
            return
        self.serving = True
        self.publish_snapshot()
        print(
            f"chatmesh {self.server_id} ready: clients {self.me.host}:{self.me.clients_port}, "
            f"websocket {ws_url(self.me, self.options.tls.websocket is not None)}, "
            f"admin {'https' if self.options.tls.admin else 'http'}://{self.me.host}:{self.me.admin_port}/ "
            f"(pid {os.getpid()})",
            flush=True,
        )

    # -- election and registry callbacks --------------------------------------------------------------

    def _can_lead(self) -> bool:
        return self.registry.is_ready() and self.registry.has_quorum()

    def _on_coordinator_change(self, coordinator: str | None) -> None:
        log.info("%s: coordinator is now %s", self.server_id, coordinator)
        self.events.record(
            time.time(), f"coordinator is now {coordinator}" if coordinator else "coordinator lost: electing"
        )
        self.directory.coordinator_changed()
        self.registry.prefer_leader(coordinator)
        self.publish_snapshot()

    def _on_peer_down(self, peer: str, incarnation: int) -> None:
        log.info("%s: %s is down", self.server_id, peer)
        self.events.record(time.time(), f"{peer} is down")
        self.publish_snapshot()

    def _on_peer_up(self, peer: str, incarnation: int) -> None:
        log.info("%s: %s is up (incarnation %d)", self.server_id, peer, incarnation)
        self.events.record(time.time(), f"{peer} is up")
        self.publish_snapshot()

    def _on_applied_threadsafe(self, command: rs.Command, result: rs.Result) -> None:
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
            # The client was already refused: undo what committed after its deadline.
            log.info("%s: releasing in-doubt %s that committed late", self.server_id, type(in_doubt).__name__)
            self._spawn(self._undo(in_doubt))

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

    async def _stall_watchdog(self) -> None:
        while True:
            await asyncio.sleep(STALL_TICK_S)
            self.stall_guard.tick(self.loop.time())

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
                await self.registry.submit(rs.Barrier(self.directory.next_request_id()), ANNOUNCE_TIMEOUT_S)
            except RegistryUnavailable as exc:
                if attempts % 5 == 1:
                    log.warning("%s: cannot confirm after the stall yet (%s); client input waits", self.server_id, exc)
                await asyncio.sleep(RETRY_AFTER_STALL_S)
                continue
            if not self._rejoining:
                self.stall_guard.reopen()
            return

    async def _undo(self, command: rs.Command) -> None:
        if isinstance(command, rs.ClaimIdentity | rs.CompleteMove) and command.identity not in set(
            self.chat.local_identities()
        ):
            await self.directory.release_identity(Identity(command.identity))
        elif isinstance(command, rs.CreateRoom):
            await self.directory.delete_room(RoomId(command.room_id), Identity(command.owner))

    def _spawn(self, coroutine: Any) -> None:
        task = self.loop.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- periodic work --------------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        """Release registry entries this server holds that match no live session (no orphans)."""
        suspects: set[tuple[str, str]] = set()
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL_S)
            if not self.serving:
                continue
            commands = self.directory.orphans(self.chat.local_identities(), self.chat.local_room_ids(), time.time())
            # Act only on what was orphaned in two passes in a row: a claim or room that just committed
            # has its session registered by then.
            keyed = [(c, (type(c).__name__, getattr(c, "identity", getattr(c, "room_id", "")))) for c in commands]
            keys = {key for _, key in keyed}
            for command, key in keyed:  # each command with its own key (a set has no order to zip with)
                if key in suspects:
                    log.info("%s: reconciling orphan %s", self.server_id, key)
                    await self.directory.request(command)
            suspects = keys

    async def _membership_loop(self) -> None:
        """While coordinator: commit "server down" for servers the failure detector sees silent.

        Only while its replica has a Raft quorum and its failure detector has heard a majority of the
        configuration for the last STARTUP_GRACE_S: a coordinator cut off on a minority side sees everyone
        else silent, and a declaration it queued would commit once the partition heals and fence the healthy
        majority (and, just after healing, its links are still reconnecting). An incarnation the failure
        detector has never heard (a server that has just re-announced itself) also gets STARTUP_GRACE_S
        before it can be declared down.
        """
        majority = len(self.config.ids) // 2 + 1
        majority_since: float | None = None
        unheard_since: dict[tuple[str, int], float] = {}
        while True:
            await asyncio.sleep(MEMBERSHIP_INTERVAL_S)
            now = self.loop.time()
            alive = self.election.servers_up
            if len(alive) < majority:
                majority_since = None
            elif majority_since is None:
                majority_since = now
            if not self.election.is_coordinator or now - self.started_at < STARTUP_GRACE_S:
                continue
            if majority_since is None or now - majority_since < STARTUP_GRACE_S or not self.registry.has_quorum():
                continue
            heard = self.election.peer_incarnations
            registered = self.registry.servers_up()
            unheard_since = {key: t for key, t in unheard_since.items() if registered.get(key[0]) == key[1]}
            for server, incarnation in registered.items():
                if server == self.server_id or server in alive:
                    continue
                if heard.get(server, -1) < incarnation:
                    first = unheard_since.setdefault((server, incarnation), now)
                    if now - first < STARTUP_GRACE_S:
                        continue
                log.warning("%s: declaring %s down (incarnation %d)", self.server_id, server, incarnation)
                command = rs.ServerDown(self.directory.next_request_id(), server, incarnation)
                with contextlib.suppress(RegistryUnavailable):
                    await self.registry.submit(command, ANNOUNCE_TIMEOUT_S)

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            self.publish_snapshot()

    def publish_snapshot(self) -> None:
        self.snapshots.publish(build_snapshot(self, self.snapshots.get()))


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
