"""The whole-cluster simulation: N complete production servers, their clients and a hostile world, in one
deterministic process (in the spirit of TigerBeetle's VOPR and FoundationDB's simulator).

Each server is the production `node.app.Node` (ChatCore behind ChatServer, CoordinatorService,
ClusterDirectory, the membership and reconcile loops, the stall guard, fencing and rejoin, ElectionRuntime
over ElectionNode) on its own `SimLoop`. What stands in for the outside world:
- the coordination network: `bully.memory_transport.MemoryTransport`s on one `MemoryNetwork` with a random
  delay per frame and partitions;
- PySyncObj: `tests.sim.cluster.raft` (a Raft log model over the real `RegistryState`);
- client sockets: in-memory connections to `ChatServer.client_protocol()` (`tests.sim.cluster.clients`);
- the wall clock: `time.time`/`time.time_ns` read the fake clock during a run (incarnations, move expiry).
One `random.Random(seed)` draws everything: delays, faults, client behaviour, election jitter.

A run: boot every server, then a chaos phase where clients act and faults strike one at a time (a crash
and restart, a freeze and thaw, a partition and heal; or, with `faults="outage"`, a quorum lost for
seconds or a frozen coordinator), then everything heals and the cluster settles.

Invariants, after every step:
- no identity is held by active sessions on two servers whose incarnations the committed registry shows
  up, and no room is hosted by two such servers;
- every client request gets one answer (a typed reply nobody asked for fails at once), within
  `ANSWER_BOUND_S` of time the server was not frozen; a login is never closed unanswered;
- no committed ReleaseIdentity frees a name that a session of that same server life still holds;
- no committed "server down" names a server life that was alive, unfrozen and on a majority side for the
  whole last `HEALTHY_S` (a healthy server is never fenced);
- each ChatCore's own invariants hold; no production callback or task raises;
- every reconciler pass keeps the reconciler's rule: it releases only what it found at this look and the
  one before (`_checked_review`).
After the heal and settle: one coordinator everywhere (the highest priority), every replica identical to
the committed log, and no orphan either way (each registry entry backed by a live session or room of its
server, each session and room registered, every server registered with its current incarnation).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import random
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from bully.memory_transport import MemoryNetwork, MemoryTransport
from cluster.config import ClusterConfig, parse_config
from cluster.names import is_mainhall
from cluster.timings import ClusterTimings
from node.app import Node, NodeOptions
from node.reconcile import Orphan, Reconciler
from node.server import DIRECTORY_TIMEOUT_S, ChatServer
from registry import state as rs
from tests.sim.cluster.clients import SimClient
from tests.sim.cluster.loop import Clock, Scheduler, SimLoop
from tests.sim.cluster.raft import TICK_S, Entry, RaftModel, SimRegistry, describe

# A request is answered within the directory's backstop plus delivery (frozen time excluded).
ANSWER_BOUND_S = DIRECTORY_TIMEOUT_S + 1.0
HEALTHY_S = 3.0
OVERDUE_CHECK_S = 0.05
SETTLE_PROBE_S = 2.5
MIN_SETTLE_S = 7.5
OUTAGE_SHARE = 0.5
FAULT_MIXES = ("mixed", "outage")
# The fake wall clock starts here (2026-01-01), so incarnations look like real ones.
WALL_EPOCH_S = 1_767_225_600.0
NETWORK_DELAY_S = (0.0005, 0.004)


class SimulationFailure(AssertionError):
    pass


@dataclass
class Options:
    servers: int = 3
    clients: int = 5
    chaos_s: float = 15.0
    # Long enough for a routed client that never arrived to expire (MOVE_TIMEOUT_S, 10 s of wall clock)
    # and for the reconciler's two passes after that.
    settle_s: float = 18.0
    mutation: str | None = None
    # The churn scenario: a client that quits or drops logs in again within 20 ms with the same name on
    # the same server (see `SimClient._maybe_relogin`).
    churn: bool = False
    # The fault mix: "mixed" (crashes, freezes and partitions, one at a time) or "outage" (the pairing
    # scenario, `World._outage_fault`: quorum lost for seconds, and coordinator freezes).
    faults: str = "mixed"
    # Production timings, except what a test sets (every timing is settable: cluster/timings.py).
    timings: ClusterTimings = field(default_factory=ClusterTimings)


@dataclass
class SimServer:
    """One life of one server (a restart is a new SimServer)."""

    server_id: str
    life: int
    loop: SimLoop
    node: Node
    registry: SimRegistry
    transport: MemoryTransport
    alive: bool = True
    paused: bool = False
    paused_total: float = 0.0
    paused_since: float = 0.0
    connections: list[object] = field(default_factory=list)


class World:
    def __init__(self, seed: int, options: Options | None = None) -> None:
        self.seed = seed
        self.options = options or Options()
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.scheduler = Scheduler(self.clock)
        self.ids = [f"s{i}" for i in range(1, self.options.servers + 1)]
        self.config = _config(self.ids)
        self.groups: dict[str, int] = {sid: 0 for sid in self.ids}
        self.servers: dict[str, SimServer] = {}
        self.lives: dict[str, int] = {sid: 0 for sid in self.ids}
        self.network = MemoryNetwork(delay=self._frame_delay, reachable=self._connected)
        t = self.options.timings
        self.raft = RaftModel(
            self.ids,
            self.rng,
            reachable=self._raft_reachable,
            live=self._live,
            election_timeout_s=(t.raft_min_timeout_s, t.raft_max_timeout_s),
        )
        self.raft.on_commit = self._on_commit
        self.clients = [SimClient(self, i) for i in range(1, self.options.clients + 1)]
        self.healthy_since: dict[str, float | None] = {sid: None for sid in self.ids}
        self.trace: deque[str] = deque(maxlen=200)
        self.full_trace: list[str] | None = None
        self._digest = hashlib.sha256()
        self.chaos = True
        self.faults = 0
        self._change_key: int | None = None
        self._next_overdue_check = 0.0
        self.errors: list[str] = []
        self.dead_loops: list[SimLoop] = []
        self.released: dict[str, tuple[str, int]] = {}  # name -> (server, incarnation) of the release that freed it
        self.deleted_rooms: set[tuple[str, str, int]] = set()  # (room, server, incarnation) of ok DeleteRooms
        self._running: list[SimServer] = []  # the live servers, as of the last topology change
        self._chats: list[ChatServer] = []  # their chat servers (`_check` reads them after every step)

    # -- topology -------------------------------------------------------------------------------------------

    def _live(self, sid: str) -> bool:
        server = self.servers.get(sid)
        return server is not None and server.alive and not server.paused

    def _connected(self, a: str, b: str) -> bool:
        """A coordination link works (a frozen process's socket still takes bytes)."""
        sa, sb = self.servers.get(a), self.servers.get(b)
        return sa is not None and sb is not None and sa.alive and sb.alive and self.groups[a] == self.groups[b]

    def _raft_reachable(self, a: str, b: str) -> bool:
        return self._live(a) and self._live(b) and self.groups[a] == self.groups[b]

    def _frame_delay(self, src: str, dst: str) -> float | None:
        return self.rng.uniform(*NETWORK_DELAY_S)

    def servers_alive(self) -> list[SimServer]:
        return [s for sid in self.ids if (s := self.servers.get(sid)) is not None and s.alive]

    def server_by_port(self, port: int) -> SimServer | None:
        for s in self.config.servers:
            if s.clients_port == port:
                server = self.servers.get(s.server_id)
                return server if server is not None and server.alive else None
        return None

    def _topology_changed(self, what: str) -> None:
        self.log(f"** {what}")
        self._running = self.servers_alive()
        self._chats = [server.node.chat for server in self._running]
        self._change_key = None
        now = self.clock.now
        for sid in self.ids:
            healthy = self._live(sid) and len(self.raft.component(sid)) >= self.raft.majority
            if not healthy:
                self.healthy_since[sid] = None
            elif self.healthy_since[sid] is None:
                self.healthy_since[sid] = now

    # -- servers --------------------------------------------------------------------------------------------

    def boot(self, sid: str) -> None:
        self.lives[sid] += 1
        loop = SimLoop(self.clock, f"{sid}#{self.lives[sid]}", self._loop_error)
        registry = SimRegistry(self.raft, sid, loop)
        transport = MemoryTransport(self.network, sid, self.ids, loop)
        options = NodeOptions(
            data_dir=Path(f"/nonexistent/sim/{sid}"), secret="simulation", timings=self.options.timings
        )
        node = Node(
            self.config,
            sid,
            options,
            registry=registry,
            transport=transport,
            listen=False,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        server = SimServer(sid, self.lives[sid], loop, node, registry, transport)
        self.servers[sid] = server
        self.scheduler.add_loop(loop)
        loop.create_task(node.run())
        self._topology_changed(f"boot {sid} life {server.life} incarnation {node.incarnation}")

    def crash(self, sid: str) -> None:
        server = self.servers[sid]
        server.alive = False
        self.scheduler.remove_loop(server.loop)
        self.network.detach(server.transport)
        server.registry.end_of_life()
        server.loop.discard()
        self.dead_loops.append(server.loop)
        for client in self.clients:
            if client.conn is not None and client.conn.server is server:
                client.conn.reset()
        self._topology_changed(f"crash {sid}")

    def pause(self, sid: str) -> None:
        server = self.servers[sid]
        server.paused = True
        server.loop.paused = True
        server.paused_since = self.clock.now
        self._topology_changed(f"freeze {sid}")

    def resume(self, sid: str) -> None:
        server = self.servers[sid]
        if not server.alive or not server.paused:
            return
        server.paused = False
        server.loop.paused = False
        server.paused_total += self.clock.now - server.paused_since
        self._topology_changed(f"thaw {sid} after {self.clock.now - server.paused_since:.2f}s")

    def partition(self, minority: list[str]) -> None:
        for sid in self.ids:
            self.groups[sid] = 1 if sid in minority else 0
        self._topology_changed(f"partition {sorted(minority)} | {sorted(set(self.ids) - set(minority))}")

    def heal(self) -> None:
        for sid in self.ids:
            self.groups[sid] = 0
        self._topology_changed("heal")

    # -- the run ----------------------------------------------------------------------------------------------

    def run(self) -> World:
        with _simulated_process(self):
            for sid in self.ids:
                self.scheduler.at(self.rng.uniform(0, 0.3), functools.partial(self.boot, sid))
            self._every(TICK_S, lambda: self.raft.tick(self.clock.now))
            for client in self.clients:
                self._client_loop(client)
            self.scheduler.at(self.rng.uniform(2.0, 4.0), self._fault)
            self.scheduler.run_until(self.options.chaos_s, self._check)
            self.chaos = False
            self._heal_all()
            self._settle()
            self._check_settled()
        return self

    def _settle(self) -> None:
        """Run the heal-and-settle phase until the cluster has been settled at two looks in a row
        `SETTLE_PROBE_S` apart (longer than a reconcile and a membership period: a steady state) and
        `MIN_SETTLE_S` have passed (a healed server counts as healthy after `HEALTHY_S`: a wrong "server
        down" after the heal still has time to show), or until `settle_s` is over. Most seeds settle
        within seconds; simulating the rest of the 18 s would repeat the same heartbeats."""
        end = self.options.chaos_s + self.options.settle_s
        at = self.options.chaos_s + SETTLE_PROBE_S
        settled_before = False
        while at < end:
            self.scheduler.run_until(at, self._check)
            settled = self._is_settled()
            if settled and settled_before and at - self.options.chaos_s >= MIN_SETTLE_S:
                return
            settled_before = settled
            at += SETTLE_PROBE_S
        self.scheduler.run_until(end, self._check)

    def _is_settled(self) -> bool:
        try:
            self._check_settled()
        except SimulationFailure:
            return False
        return True

    def _every(self, interval: float, action: Callable[[], None]) -> None:
        def tick() -> None:
            action()
            self.scheduler.after(interval, tick)

        self.scheduler.after(interval, tick)

    def _client_loop(self, client: SimClient) -> None:
        def act() -> None:
            if not self.chaos:
                return
            client.act()
            self.scheduler.after(self.rng.uniform(0.05, 0.8), act)

        self.scheduler.after(self.rng.uniform(0.5, 1.5), act)

    def _fault(self) -> None:
        if not self.chaos:
            return
        self.faults += 1
        if self.options.faults == "outage":
            self._outage_fault()
            return
        roll = self.rng.random()
        victim = self.rng.choice(self.ids)
        if roll < 0.3:
            self.crash(victim)
            self.scheduler.after(self.rng.uniform(0.3, 3.0), lambda: self._restart(victim))
            span = 3.0
        elif roll < 0.6:
            self.pause(victim)
            span = self.rng.uniform(0.2, 2.5)
            self.scheduler.after(span, lambda: self.resume(victim))
        else:
            size = self.rng.randint(1, (len(self.ids) - 1) // 2)
            minority = sorted(self.rng.sample(self.ids, size))
            self.partition(minority)
            span = self.rng.uniform(0.5, 6.0)
            self.scheduler.after(span, self.heal)
        self.scheduler.after(span + self.rng.uniform(1.0, 4.0), self._fault)

    def _outage_fault(self) -> None:
        """The "outage" mix: all servers but one frozen for longer than a request's deadline (no quorum:
        releases fail, so the running server's clients leave orphans behind one by one, of different ages),
        or the coordinator frozen for a moment (the coordinator changes under the reconciler's releases)."""
        if self.rng.random() < OUTAGE_SHARE:
            keep = self.rng.choice(self.ids)
            frozen = [sid for sid in self.ids if sid != keep and self._live(sid)]
            span = self.options.timings.request_deadline_s + self.rng.uniform(2.0, 6.0)
        else:
            # The coordinator most servers follow (sorted: a set's order differs between processes).
            coordinators = [c for s in self._running if not s.paused and (c := s.node.election.coordinator)]
            top = max(sorted(set(coordinators)), key=coordinators.count, default=None)
            frozen = [top] if top is not None and self._live(top) else []
            span = self.rng.uniform(0.5, 2.5)
        for sid in frozen:
            self.pause(sid)
            self.scheduler.after(span, functools.partial(self.resume, sid))
        self.scheduler.after(span + self.rng.uniform(0.5, 2.0), self._fault)

    def _restart(self, sid: str) -> None:
        server = self.servers.get(sid)
        if server is None or not server.alive:
            self.boot(sid)

    def _heal_all(self) -> None:
        self.heal()
        for sid in self.ids:
            server = self.servers.get(sid)
            if server is None or not server.alive:
                self.boot(sid)
            elif server.paused:
                self.resume(sid)

    # -- invariants --------------------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.errors:
            self.fail(self.errors[0])
        now = self.clock.now
        if now >= self._next_overdue_check:
            # Answers are bounded in seconds: looking every OVERDUE_CHECK_S of simulated time (not every
            # step) finds every late one, at most that much later.
            self._next_overdue_check = now + OVERDUE_CHECK_S
            for client in self.clients:
                overdue = client.overdue(now, ANSWER_BOUND_S)
                if overdue is not None:
                    self.fail(overdue)
        key = self.raft.commit
        for chat in self._chats:
            key = key * 31 + chat.generation
        if key == self._change_key:
            return
        self._change_key = key
        up = self.raft.committed.servers_up()
        holders: dict[str, str] = {}
        hosts: dict[str, str] = {}
        registered = {entry.identity: entry for entry in self.raft.committed.identities()}
        for server in self._running:
            core = server.node.chat.core
            core.check_invariants()
            if up.get(server.server_id) != server.node.incarnation:
                continue  # declared down (or not yet back): its sessions are being closed
            snapshot = core.snapshot()
            for session in snapshot.clients:
                other = holders.setdefault(session.identity, server.server_id)
                if other != server.server_id:
                    self.fail(f"identity {session.identity} is held by sessions on {other} and {server.server_id}")
                # A session's name commits before the session exists; if this server's own release freed it
                # since, the registry lost a live session's name (a release built from a stale view: the
                # reconciler acting on an entry orphaned for a moment, as in the pairing bug).
                if session.identity not in registered and self.released.get(session.identity) == (
                    server.server_id,
                    server.node.incarnation,
                ):
                    self.fail(f"{server.server_id} released {session.identity} while a session of it holds that name")
            for room in snapshot.rooms:
                if (room.room_id, server.server_id, server.node.incarnation) in self.deleted_rooms:
                    continue  # deleted from the registry first, then from the server (maybe frozen meanwhile)
                other = hosts.setdefault(room.room_id, server.server_id)
                if other != server.server_id:
                    self.fail(f"room {room.room_id} is hosted by {other} and {server.server_id}")

    def _on_commit(self, entry: Entry, result: rs.Result) -> None:
        command = entry.command
        self.log(f"commit {describe(command)} from {entry.submitter} -> {'ok' if result.ok else result.reason}")
        if result.ok:
            # Which release last freed each name (cleared when the name is taken again or dropped otherwise).
            for name in result.released_identities:
                self.released.pop(name, None)
            if isinstance(command, rs.ClaimIdentity | rs.BeginMove | rs.CompleteMove):
                self.released.pop(command.identity, None)
            if isinstance(command, rs.DeleteRoom):
                self.deleted_rooms.add((command.room_id, command.server, command.incarnation))
            if isinstance(command, rs.CreateRoom):
                self.deleted_rooms.discard((command.room_id, command.server, command.incarnation))
            if isinstance(command, rs.ReleaseIdentity):
                self.released[command.identity] = (command.server, command.incarnation)
                self._change_key = None  # look at the sessions again at the next step
                self._check_release(command)
        if isinstance(command, rs.ServerDown) and result.ok:
            server = self.servers.get(command.server)
            since = self.healthy_since.get(command.server)
            if (
                server is not None
                and server.alive
                and server.node.incarnation == command.incarnation
                and since is not None
                and self.clock.now - since >= HEALTHY_S
            ):
                self.fail(
                    f"{command.server} (incarnation {command.incarnation}) was declared down although it has been "
                    f"up and on a majority side for {self.clock.now - since:.2f}s"
                )

    def _check_release(self, command: rs.ReleaseIdentity) -> None:
        """A release that commits must not free a name a session of that same server life still holds:
        the session's claim came earlier in the log, so the registry would lose it under a live session.
        (A room is different: `deleteroom` deletes it from the registry first, then from the server.)"""
        server = self.servers.get(command.server)
        if server is None or not server.alive or server.node.incarnation != command.incarnation:
            return
        if any(c.identity == command.identity for c in server.node.chat.core.snapshot().clients):
            self.fail(f"{command.server} released {command.identity} while a session of it holds that name")

    def _check_settled(self) -> None:
        live = self.servers_alive()
        coordinators = {s.server_id: s.node.election.coordinator for s in live}
        top = max(self.ids, key=lambda sid: self.config.server(sid).priority)
        if set(coordinators.values()) != {top}:
            self.fail(f"after settling, coordinators are {coordinators}; expected {top} everywhere")
        committed = self.raft.committed
        for server in live:
            if server.registry.state != committed:
                self.fail(f"{server.server_id}'s replica differs from the committed log after settling")
        expected_up = {s.server_id: s.node.incarnation for s in live}
        if committed.servers_up() != expected_up:
            self.fail(f"registered servers {committed.servers_up()} != running {expected_up}")
        sessions = {(c.identity, s.server_id) for s in live for c in s.node.chat.core.snapshot().clients}
        registered = {(e.identity, e.server) for e in committed.identities()}
        if sessions != registered:
            self.fail(
                f"orphans after settling: registered without a session {sorted(registered - sessions)}, "
                f"sessions without a registration {sorted(sessions - registered)}"
            )
        rooms = {(r.room_id, s.server_id) for s in live for r in s.node.chat.core.snapshot().rooms}
        registered_rooms = {(r.room_id, r.server) for r in committed.rooms()}
        if rooms != registered_rooms:
            self.fail(
                f"orphan rooms after settling: registered only {sorted(registered_rooms - rooms)}, "
                f"hosted only {sorted(rooms - registered_rooms)}"
            )
        for client in self.clients:
            if client.pending is not None:
                self.fail(f"client c{client.index}'s {client.pending.kind} is still unanswered after settling")
        _ = is_mainhall

    # -- reporting ----------------------------------------------------------------------------------------------

    def _loop_error(self, text: str) -> None:
        self.errors.append(f"unhandled error in production code: {text}")

    def log(self, line: str) -> None:
        text = f"{self.clock.now:9.4f} {line}"
        self.trace.append(text)
        self._digest.update(text.encode())
        if self.full_trace is not None:
            self.full_trace.append(text)

    @property
    def digest(self) -> str:
        return self._digest.hexdigest()[:16]

    def replay_command(self) -> str:
        o = self.options
        parts = [f"python -m tests.sim.cluster replay {self.seed}"]
        if o.servers != Options.servers:
            parts.append(f"--servers {o.servers}")
        if o.clients != Options.clients:
            parts.append(f"--clients {o.clients}")
        if o.mutation:
            parts.append(f"--mutation {o.mutation}")
        if o.churn:
            parts.append("--churn")
        if o.faults != Options.faults:
            parts.append(f"--faults {o.faults}")
        if o.timings.reconcile_interval_s != ClusterTimings().reconcile_interval_s:
            parts.append(f"--reconcile-interval {o.timings.reconcile_interval_s}")
        return " ".join(parts)

    def fail(self, what: str) -> None:
        tail = "\n".join(self.trace)
        raise SimulationFailure(
            f"[cluster simulation seed {self.seed}] t={self.clock.now:.4f}: {what}\n"
            f"replay: {self.replay_command()} --trace\n"
            f"last events:\n{tail}"
        )


def _config(ids: list[str]) -> ClusterConfig:
    lines = [
        f"{sid} 127.0.0.1 {4000 + i} {5000 + i} {i} {6000 + i} {7000 + i} {8000 + i}" for i, sid in enumerate(ids, 1)
    ]
    return parse_config("\n".join(lines), source="<simulation>")


class _RecordErrors(logging.Handler):
    """Production code logs an exception only for a bug it survived: in a simulation that is a failure."""

    def __init__(self, world: World) -> None:
        super().__init__(logging.ERROR)
        self.world = world

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.world.errors.append(f"logged exception in production code: {record.getMessage()}")


@contextlib.contextmanager
def _simulated_process(world: World) -> Iterator[None]:
    """The process-wide parts of the world: the wall clock reads the fake clock, logs stay quiet except
    for exceptions (which fail the run), and the servers' readiness lines are swallowed."""
    real_time, real_time_ns = time.time, time.time_ns
    chatmesh = logging.getLogger("chatmesh")
    saved = (chatmesh.level, chatmesh.propagate, list(chatmesh.handlers))
    handler = _RecordErrors(world)
    time.time = lambda: WALL_EPOCH_S + world.clock.now  # type: ignore[assignment]
    time.time_ns = lambda: int((WALL_EPOCH_S + world.clock.now) * 1e9)  # type: ignore[assignment]
    chatmesh.setLevel(logging.ERROR)
    chatmesh.propagate = False
    chatmesh.handlers = [handler]
    reviewing = mock.patch.object(Reconciler, "review", _checked_review(world, Reconciler.review))
    reviewing.start()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for loop in [*world.dead_loops, *(s.loop for s in world.servers.values() if s.alive)]:
            loop.bury()
        reviewing.stop()
        time.time, time.time_ns = real_time, real_time_ns  # type: ignore[assignment]
        chatmesh.setLevel(saved[0])
        chatmesh.propagate = saved[1]
        chatmesh.handlers = saved[2]


def _checked_review(
    world: World, review: Callable[[Reconciler, Iterable[Orphan]], list[Orphan]]
) -> Callable[[Reconciler, Iterable[Orphan]], list[Orphan]]:
    """`Reconciler.review` (whichever is in force, a mutation's too) with its rule checked on the real
    inputs of every pass: it releases only what it was given at this look and at the look before (with
    `passes` = 2, as every server runs it). Found orphans are rare and short-lived, so a release made one look
    early is otherwise harmless today (names stay live while their release is in flight, and a login waits
    for a release of its name), which is why no end-to-end invariant sees it (docs/simulation.md)."""
    previous: weakref.WeakKeyDictionary[Reconciler, frozenset[Orphan]] = weakref.WeakKeyDictionary()

    def checked(self: Reconciler, orphans: Iterable[Orphan]) -> list[Orphan]:
        found = list(orphans)
        released = review(self, found)
        before = previous.get(self, frozenset())
        previous[self] = frozenset(found)
        if self.passes == 2:
            for orphan in released:
                if orphan not in before or orphan not in found:
                    world.errors.append(
                        f"the reconciler released {orphan.kind} {orphan.name}, not orphaned at two looks in a row"
                    )
        return released

    return checked
