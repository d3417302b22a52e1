"""A deterministic whole-cluster simulation of the election (TigerBeetle-style).

N servers each run the production `bully.node.ElectionNode` (the `FastBully` core, or the classic Bully
reference, with the real `FailureDetector` and heartbeat schedule, wired exactly as `ElectionRuntime` runs
them) over an in-memory network with a fake clock that jumps from event to event. The network has per-link FIFO order
(TCP), a random delay per message, optional loss, partitions into groups, and servers can crash, restart
(a new incarnation with fresh state, its registry "not ready" for a while) and pause (SIGSTOP: nothing runs,
messages queue up, then it all arrives at once).

Everything random comes from one `random.Random(seed)`, and no set is iterated unsorted, so a seed replays
exactly; `digest` fingerprints the whole run. Invariants are checked after every step; a violation raises
`SimulationFailure` naming the scenario, the seed and the command that replays it.

Invariants:
- a server's epoch never decreases within one life;
- a server announces itself (a Coordinator message from itself) only while it can lead;
- once `settle_bound_s` has passed since the last disruption, every group of live servers that can reach
  each other agrees on one coordinator, the highest-priority server among them that can lead (and keeps
  agreeing until the next disruption).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random
from collections import Counter, deque
from dataclasses import dataclass, field

from bully.election import ElectionTimings, FastBully
from bully.messages import Coordinator, Heartbeat, Message, from_wire, to_wire
from bully.node import (
    Broadcast,
    CoordinatorChanged,
    CoreFactory,
    ElectionCore,
    ElectionNode,
    Output,
    PeerDown,
    PeerUp,
    Send,
)

INF = float("inf")

__all__ = ["CoreFactory", "ElectionCore", "Simulation", "SimulationFailure"]


class SimulationFailure(AssertionError):
    pass


@dataclass
class SimServer:
    server_id: str
    priority: int
    node: ElectionNode
    incarnation: int
    ready_at: float = 0.0
    alive: bool = True
    paused: bool = False
    last_epoch: int = 0
    backlog: list[tuple[str, Message]] = field(default_factory=list)
    coordinator_changes: int = 0

    @property
    def core(self) -> ElectionCore:
        return self.node.core


@dataclass(order=True)
class _InFlight:
    at: float
    seq: int
    src: str = field(compare=False)
    dst: str = field(compare=False)
    dst_incarnation: int = field(compare=False)
    message: Message = field(compare=False)


class Simulation:
    def __init__(
        self,
        n: int,
        seed: int,
        *,
        scenario: str = "adhoc",
        timings: ElectionTimings | None = None,
        delay_s: tuple[float, float] = (0.0005, 0.004),
        loss: float = 0.0,
        quorum: bool = False,
        factory: CoreFactory = FastBully,
        settle_bound_s: float = INF,
        check_settled: bool = True,
        codec: bool = True,
    ) -> None:
        self.n = n
        self.seed = seed
        self.scenario = scenario
        self.timings = timings or ElectionTimings()
        self.delay_s = delay_s
        self.loss = loss
        self.quorum = quorum
        self.factory = factory
        self.settle_bound_s = settle_bound_s
        self.check_settled = check_settled
        self.codec = codec
        self.rng = random.Random(seed)
        self.now = 0.0
        self.ids = [f"s{i}" for i in range(1, n + 1)]
        self.priorities = {sid: i for i, sid in enumerate(self.ids, start=1)}
        self.servers: dict[str, SimServer] = {}
        self._queue: list[_InFlight] = []
        self._seq = 0
        self._link_clock: dict[tuple[str, str], float] = {}
        self.groups: dict[str, int] = {sid: 0 for sid in self.ids}
        self.sent: Counter[str] = Counter()  # election messages (not heartbeats), per kind
        self.heartbeats_sent = 0
        self.quiet_since = 0.0
        self.agreed_since: float | None = None
        self.settle_times: list[float] = []
        self.trace: deque[str] = deque(maxlen=80)
        self.full_trace: list[str] | None = None
        self._digest = hashlib.sha256()
        self.steps = 0

    # -- scenario controls ----------------------------------------------------------------------------------

    def boot(self, server_id: str, ready_after_s: float = 0.0) -> None:
        """Start (or restart after a crash) a server: a new life with fresh state."""
        old = self.servers.get(server_id)
        assert old is None or not old.alive, f"{server_id} is running"
        incarnation = 1 if old is None else old.incarnation + 1
        core_rng = random.Random(self.rng.getrandbits(64))
        node = ElectionNode(
            server_id,
            self.priorities,
            self.timings,
            lambda: self.can_lead(server_id),
            core_rng,
            incarnation,
            core_factory=self.factory,
        )
        server = SimServer(server_id, self.priorities[server_id], node, incarnation, ready_at=self.now + ready_after_s)
        self.servers[server_id] = server
        self._disrupt(f"boot {server_id} (incarnation {incarnation}, ready after {ready_after_s:.2f}s)")
        self._apply(server, node.start(self.now))

    def boot_all(self, spread_s: float = 0.3) -> None:
        """Start every server at a random moment within `spread_s` (the order is random too)."""
        starts = sorted((self.rng.uniform(0, spread_s), sid) for sid in self.ids)
        for at, sid in starts:
            self.run_until(self.now + max(0.0, at - self.now))
            self.boot(sid)

    def crash(self, server_id: str) -> None:
        server = self.servers[server_id]
        server.alive = False
        server.backlog.clear()
        self._disrupt(f"crash {server_id}")

    def pause(self, server_id: str) -> None:
        self.servers[server_id].paused = True
        self._disrupt(f"pause {server_id}")

    def resume(self, server_id: str) -> None:
        server = self.servers[server_id]
        server.paused = False
        self._disrupt(f"resume {server_id} with {len(server.backlog)} queued messages")
        backlog, server.backlog = server.backlog, []
        self._fire_timers(server)  # the stalled loop first notices the time, then reads its sockets
        for src, message in backlog:
            if server.alive and not server.paused:
                self._deliver(server, src, message)

    def partition(self, *groups: list[str]) -> None:
        """Cut the network into groups; servers not named form one more group."""
        named = {sid for group in groups for sid in group}
        for sid in self.ids:
            self.groups[sid] = 0
        for index, group in enumerate(groups, start=1):
            for sid in group:
                self.groups[sid] = index
        assert named <= set(self.ids)
        self._disrupt(f"partition {[sorted(g) for g in groups]}")

    def heal(self) -> None:
        for sid in self.ids:
            self.groups[sid] = 0
        self._disrupt("heal")

    def start_election(self, server_id: str) -> None:
        server = self.servers[server_id]
        self._disrupt(f"admin election at {server_id}")
        self._apply(server, server.node.start_election(self.now))

    def set_ready(self, server_id: str, ready_after_s: float) -> None:
        self.servers[server_id].ready_at = self.now + ready_after_s
        self._disrupt(f"{server_id} ready after {ready_after_s:.2f}s")

    # -- observation ------------------------------------------------------------------------------------------

    def live(self) -> list[SimServer]:
        return [s for sid in self.ids if (s := self.servers.get(sid)) is not None and s.alive and not s.paused]

    def coordinators(self) -> dict[str, str | None]:
        return {s.server_id: s.core.coordinator for s in self.live()}

    def can_lead(self, server_id: str) -> bool:
        server = self.servers.get(server_id)
        if server is None or not server.alive or self.now < server.ready_at:
            return False
        if self.quorum:
            reachable = [s for s in self.live() if self.groups[s.server_id] == self.groups[server_id]]
            return len(reachable) >= self.n // 2 + 1
        return True

    def components(self) -> list[list[SimServer]]:
        by_group: dict[int, list[SimServer]] = {}
        for server in self.live():
            by_group.setdefault(self.groups[server.server_id], []).append(server)
        return [by_group[g] for g in sorted(by_group)]

    def expected(self, component: list[SimServer]) -> str | None:
        able = [s for s in component if self.can_lead(s.server_id)]
        return max(able, key=lambda s: s.priority).server_id if able else None

    def agreed(self) -> bool:
        for component in self.components():
            expected = self.expected(component)
            if expected is None:
                continue
            if any(s.core.coordinator != expected for s in component):
                return False
        return True

    @property
    def digest(self) -> str:
        return self._digest.hexdigest()[:16]

    def messages(self) -> int:
        return sum(self.sent.values())

    # -- the event loop -----------------------------------------------------------------------------------------

    def run_until(self, until: float) -> None:
        while True:
            wake_at, waking = INF, None
            for server in self.live():
                at = self._next_wake(server)
                if at < wake_at:
                    wake_at, waking = at, server
            message_at = self._queue[0].at if self._queue else INF
            at = min(wake_at, message_at)
            if at > until:
                self.now = max(self.now, until)
                self._check()
                return
            self.now = max(self.now, at)
            self.steps += 1
            if wake_at <= message_at and waking is not None:
                self._fire_timers(waking)
            else:
                flight = heapq.heappop(self._queue)
                self._arrive(flight)
            self._check()

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def _next_wake(self, server: SimServer) -> float:
        at = server.node.next_deadline()
        return INF if at is None else max(at, self.now)

    def _fire_timers(self, server: SimServer) -> None:
        self._apply(server, server.node.on_deadline(self.now))

    def _arrive(self, flight: _InFlight) -> None:
        server = self.servers[flight.dst]
        if not server.alive or server.incarnation != flight.dst_incarnation:
            return  # the connection to that life is gone
        if self.groups[flight.src] != self.groups[flight.dst]:
            return  # cut while in flight
        if server.paused:
            server.backlog.append((flight.src, flight.message))
            return
        self._deliver(server, flight.src, flight.message)

    def _deliver(self, server: SimServer, src: str, message: Message) -> None:
        if not isinstance(message, Heartbeat):
            self._log(f"{src}->{server.server_id} {_describe(message)}")
        self._apply(server, server.node.receive(src, message, self.now))

    def _apply(self, server: SimServer, outputs: list[Output]) -> None:
        for output in outputs:
            match output:
                case Send(to, message):
                    self._check_gating(server, message)
                    self._count(message)
                    self._send(server, to, message)
                case Broadcast(message):
                    self._check_gating(server, message)
                    for peer in self.ids:
                        if peer != server.server_id:
                            self._count(message)
                            self._send(server, peer, message)
                case CoordinatorChanged(coordinator):
                    server.coordinator_changes += 1
                    self._log(f"{server.server_id} follows {coordinator} (epoch {server.core.epoch})")
                case PeerDown(peer, incarnation):
                    self._log(f"{server.server_id} detects {peer} down (incarnation {incarnation})")
                case PeerUp(peer, incarnation):
                    self._log(f"{server.server_id} hears {peer} up (incarnation {incarnation})")

    def _send(self, server: SimServer, to: str, message: Message) -> None:
        if isinstance(message, Heartbeat):
            self.heartbeats_sent += 1
        elif self.codec:
            message = from_wire(to_wire(message))  # the simulation exercises the codec too
        if self.groups[server.server_id] != self.groups[to]:
            return
        if self.loss and self.rng.random() < self.loss:
            return
        target = self.servers.get(to)
        if target is None or not target.alive:
            return  # connection refused
        low, high = self.delay_s
        link = (server.server_id, to)
        at = max(self.now + self.rng.uniform(low, high), self._link_clock.get(link, 0.0) + 1e-6)
        self._link_clock[link] = at
        self._seq += 1
        heapq.heappush(self._queue, _InFlight(at, self._seq, server.server_id, to, target.incarnation, message))

    def _count(self, message: Message) -> None:
        if not isinstance(message, Heartbeat):
            self.sent[type(message).__name__] += 1

    # -- invariants ----------------------------------------------------------------------------------------------

    def _check_gating(self, server: SimServer, message: Message) -> None:
        announces = isinstance(message, Coordinator) and message.sender == server.server_id
        if announces and not self.can_lead(server.server_id):
            self._fail(f"{server.server_id} announced itself while it cannot lead")

    def _check(self) -> None:
        for server in self.live():
            if server.core.epoch < server.last_epoch:
                self._fail(f"{server.server_id} epoch went back from {server.last_epoch} to {server.core.epoch}")
            server.last_epoch = server.core.epoch
        agreed = self.agreed()
        if agreed and self.agreed_since is None:
            self.agreed_since = self.now
            self._log(f"agreed after {self.now - self.quiet_since:.3f}s: {self.coordinators()}")
        elif not agreed:
            self.agreed_since = None
            if self.check_settled and self.now >= self.quiet_since + self.settle_bound_s:
                self._fail(
                    f"not settled {self.settle_bound_s:.2f}s after the last disruption: "
                    f"expected {[self.expected(c) for c in self.components()]}, have {self.coordinators()}, "
                    f"states { {s.server_id: s.core.state for s in self.live()} }"
                )

    def finish(self) -> None:
        """End of the scenario: record how long the last phase took to settle."""
        self._disrupt("end")

    def _disrupt(self, what: str) -> None:
        if self.agreed_since is not None:
            self.settle_times.append(self.agreed_since - self.quiet_since)
        self.quiet_since = self.now
        self.agreed_since = None
        self._log(f"** {what}")

    def _log(self, line: str) -> None:
        text = f"{self.now:9.4f} {line}"
        self.trace.append(text)
        self._digest.update(text.encode())
        if self.full_trace is not None:
            self.full_trace.append(text)

    def _fail(self, what: str) -> None:
        tail = "\n".join(self.trace)
        raise SimulationFailure(
            f"[scenario {self.scenario} seed {self.seed}] t={self.now:.4f}: {what}\n"
            f"replay: python -m tests.sim.replay {self.scenario} {self.seed} --trace\n"
            f"last events:\n{tail}"
        )


def _describe(message: Message) -> str:
    text = ", ".join(f"{f.name}={getattr(message, f.name)}" for f in dataclasses.fields(message) if f.name != "sender")
    return f"{type(message).__name__}({text})"
