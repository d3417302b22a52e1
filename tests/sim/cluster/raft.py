"""A model of the Raft log under the real `RegistryState`, standing in for PySyncObj in the simulation.

What it keeps of Raft (and what the node layer depends on):
- One log. A leader appends; an entry is committed once a majority of servers hold it, which needs the
  leader to reach a majority. Every replica applies committed entries in log order to its own
  `RegistryState` and tells its listeners (the node's `_on_applied`), on its own loop.
- Leadership changes: when the leader dies, freezes or loses its majority, it stays leader (nothing
  commits) until the followers' election timeout (`ClusterTimings.raft_min/max_timeout_s`), or until the
  node layer declares it down (`leader_is_gone`); then a new leader is chosen among the servers that can
  reach a majority; it keeps the entries it holds and drops the uncommitted ones it does not (so an entry
  the old leader had may vanish, or commit later).
  `prefer_leader` (the coordinator asks to lead Raft) hands leadership over to a caught-up server.
- A submitted command waits for a leader (PySyncObj's commandsWaitLeader), however long: a command whose
  submitter gave up (`RegistryUnavailable` after its timeout) may still commit later. A dead life's queued
  commands die with it.
- Readiness and quorum as `ReplicatedRegistry.status()` reports them: ready once caught up with the
  leader's commit index; quorum = leader reaching a majority, or follower connected to the leader.
- A restarted server rebuilds its replica from the committed log (its journal), without listener calls.

Time: the model advances in ticks of `TICK_S`, a world event of the simulation; every decision draws on
the simulation's one seeded random generator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from registry import state as rs
from registry.replicated import RaftStatus, RegistryUnavailable

TICK_S = 0.05
MAX_WAITING = 1000


@dataclass
class Entry:
    term: int
    command: rs.Command
    origin: SimRegistry | None  # the replica whose submit awaits it (None once that life ended)
    key: int  # that submit's key
    submitter: str  # the server that submitted it


@dataclass
class Replica:
    """One server's durable Raft state: what survives a crash (its journal)."""

    server_id: str
    held: int = 0  # log prefix this server holds
    known_commit: int = 0


@dataclass
class RaftModel:
    ids: list[str]
    rng: random.Random
    reachable: Callable[[str, str], bool]  # both alive, not frozen, same side of every cut
    live: Callable[[str], bool]  # alive and not frozen
    election_timeout_s: tuple[float, float]  # a follower without a leader elects after a random time in it
    log: list[Entry] = field(default_factory=list)
    commit: int = 0
    term: int = 0
    leader: str | None = None
    leaderless_until: float = 0.0
    replicas: dict[str, Replica] = field(default_factory=dict)
    registries: dict[str, SimRegistry] = field(default_factory=dict)
    preferred: dict[str, str | None] = field(default_factory=dict)
    leader_changes: int = 0
    leader_lost_at: float | None = None  # when the leader stopped reaching a majority
    on_commit: Callable[[Entry, rs.Result], None] | None = None
    committed: rs.RegistryState = field(default_factory=rs.RegistryState)  # the log's committed prefix

    def __post_init__(self) -> None:
        self.replicas = {sid: Replica(sid) for sid in self.ids}

    @property
    def majority(self) -> int:
        return len(self.ids) // 2 + 1

    def component(self, server: str) -> list[str]:
        return [s for s in self.ids if s == server or self.reachable(server, s)]

    def has_majority(self, server: str) -> bool:
        return self.live(server) and len(self.component(server)) >= self.majority

    # -- the tick -------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self._elect(now)
        leader = self.leader
        if leader is not None:
            self._hand_over(leader)
            leader = self.leader
        if leader is not None:
            for sid in self.ids:
                registry = self.registries.get(sid)
                if registry is not None and registry.waiting and (sid == leader or self.reachable(sid, leader)):
                    for command, origin, key in registry.waiting:
                        self.log.append(Entry(self.term, command, origin, key, sid))
                    registry.waiting.clear()
            holders = [sid for sid in self.component(leader)]
            for sid in holders:
                self.replicas[sid].held = len(self.log)
            count = sum(1 for sid in self.ids if self.replicas[sid].held >= len(self.log))
            if count >= self.majority:
                for entry in self.log[self.commit :]:
                    result = self.committed.apply(entry.command)
                    if self.on_commit is not None:
                        self.on_commit(entry, result)
                self.commit = len(self.log)
            for sid in holders:
                self.replicas[sid].known_commit = self.commit
        for sid in self.ids:
            registry = self.registries.get(sid)
            if registry is not None and self.live(sid):
                registry.catch_up(self.replicas[sid].known_commit)

    def _elect(self, now: float) -> None:
        if self.leader is not None and self.has_majority(self.leader):
            self.leader_lost_at = None
            return
        if self.leader is not None:
            # Cut off, frozen or dead: it stays leader (nothing commits) until the followers' election
            # timeout, unless the node layer declares it down first (`SimRegistry.leader_is_gone`).
            if self.leader_lost_at is None:
                self.leader_lost_at = now
                self.leaderless_until = now + self.rng.uniform(*self.election_timeout_s)
            if now < self.leaderless_until:
                return
            self.leader = None
        if now < self.leaderless_until:
            return
        # Raft's election restriction: only a server holding every committed entry can win.
        candidates = [s for s in self.ids if self.has_majority(s) and self.replicas[s].held >= self.commit]
        if not candidates:
            return
        best = max(self.replicas[s].held for s in candidates)
        self._install(self.rng.choice([s for s in candidates if self.replicas[s].held == best]))

    def _hand_over(self, leader: str) -> None:
        preferred = self.preferred.get(leader)
        if preferred is None or preferred == leader or not self.reachable(leader, preferred):
            return
        if self.replicas[preferred].held < len(self.log):
            return  # PySyncObj refuses while that server's log is behind; the next tick it holds it all
        self._install(preferred)

    def _install(self, leader: str) -> None:
        held = self.replicas[leader].held
        if held < len(self.log):
            # Uncommitted entries the new leader never received are overwritten: their submitters time out.
            del self.log[held:]
            for replica in self.replicas.values():
                replica.held = min(replica.held, held)
        self.term += 1
        self.leader = leader
        self.leader_lost_at = None
        self.leader_changes += 1


class SimRegistry:
    """One life's replica: the surface `Node` uses (`node.app.NodeRegistry`), over `RaftModel`."""

    def __init__(self, model: RaftModel, server_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.model = model
        self.server_id = server_id
        self.loop = loop
        self.state = rs.RegistryState()
        self.applied = 0
        self.waiting: list[tuple[rs.Command, SimRegistry, int]] = []
        self._keys = itertools.count()
        self._futures: dict[int, asyncio.Future[rs.Result]] = {}
        self._listeners: list[Callable[[rs.Command, rs.Result], None]] = []
        self.started = False
        self.closed = False

    # -- lifetime ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self.started = True
        model = self.model
        model.registries[self.server_id] = self
        # The journal: the committed prefix this server holds, replayed into a fresh state.
        upto = min(model.replicas[self.server_id].known_commit, model.commit)
        for entry in model.log[:upto]:
            self.state.apply(entry.command)
        self.applied = upto

    def close(self) -> None:
        self.end_of_life()

    def end_of_life(self) -> None:
        """The process died (or stopped): its queued commands and its waiters go with it."""
        self.closed = True
        self.waiting.clear()
        for entry in self.model.log:
            if entry.origin is self:
                entry.origin = None
        if self.model.registries.get(self.server_id) is self:
            del self.model.registries[self.server_id]

    # -- writes -----------------------------------------------------------------------------------------

    async def submit(self, command: rs.Command, timeout: float) -> rs.Result:
        if not self.started or self.closed:
            raise RegistryUnavailable("closed" if self.closed else "not-started")
        if len(self.waiting) >= MAX_WAITING:
            raise RegistryUnavailable("too many commands waiting for a leader")
        future: asyncio.Future[rs.Result] = self.loop.create_future()
        key = next(self._keys)
        self._futures[key] = future
        self.waiting.append((command, self, key))
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise RegistryUnavailable(f"no commit within {timeout:.2f}s") from None
        finally:
            self._futures.pop(key, None)

    def catch_up(self, commit: int) -> None:
        """Apply committed entries up to `commit` (the model's tick; hands results to the loop)."""
        log = self.model.log
        while self.applied < commit:
            entry = log[self.applied]
            self.applied += 1
            result = self.state.apply(entry.command)
            self.loop.call_soon(self._applied, entry, result)

    def _applied(self, entry: Entry, result: rs.Result) -> None:
        for listener in list(self._listeners):
            listener(entry.command, result)
        if entry.origin is self:
            future = self._futures.pop(entry.key, None)
            if future is not None and not future.done():
                future.set_result(result)

    def add_listener(self, callback: Callable[[rs.Command, rs.Result], None]) -> None:
        # Production listeners cross threads with call_soon_threadsafe; here everything is on the loop.
        self._listeners.append(callback)

    # -- reads --------------------------------------------------------------------------------------------

    def identity(self, name: str) -> rs.IdentityEntry | None:
        return self.state.identity(name)

    def room(self, room_id: str) -> rs.RoomEntry | None:
        return self.state.room(room_id)

    def rooms(self) -> list[rs.RoomEntry]:
        return self.state.rooms()

    def identities(self) -> list[rs.IdentityEntry]:
        return self.state.identities()

    def servers_up(self) -> dict[str, int]:
        return self.state.servers_up()

    def counts(self) -> dict[str, int]:
        return self.state.counts()

    def applied_commands(self) -> int:
        return self.applied

    def prefer_leader(self, server_id: str | None) -> None:
        self.model.preferred[self.server_id] = server_id

    def leader_is_gone(self, server_id: str, after_s: float = 0.0) -> None:
        """`server_id` was declared down: a Raft election starts at once (the model elects its one leader
        without a vote split, so the survivors' stagger `after_s` does not apply)."""
        model = self.model
        # As ReplicatedRegistry: when it still leads, or no leader is known yet (the model drops a frozen or
        # cut-off leader at once and would otherwise wait out the whole election timeout).
        if model.leader in (server_id, None) and not model.reachable(self.server_id, server_id):
            model.leader = None
            model.leaderless_until = min(model.leaderless_until, self.loop.time())

    # -- status ---------------------------------------------------------------------------------------------

    def _leader_reachable(self) -> bool:
        leader = self.model.leader
        return leader is not None and (leader == self.server_id or self.model.reachable(self.server_id, leader))

    def is_ready(self) -> bool:
        return self.status().ready

    def has_quorum(self) -> bool:
        return self.status().quorum

    def status(self) -> RaftStatus:
        if not self.started or self.closed:
            return RaftStatus()
        model = self.model
        leader = model.leader
        connected = self._leader_reachable()
        known = model.replicas[self.server_id].known_commit
        if leader == self.server_id:
            role, quorum = "leader", model.has_majority(self.server_id)
        else:
            role, quorum = ("follower" if leader is not None else "candidate"), connected
        return RaftStatus(
            started=True,
            role=role,
            leader=leader,
            term=model.term,
            commit_index=known,
            applied_index=self.applied,
            leader_commit_index=model.commit if connected else None,
            partners_connected=tuple(
                s for s in model.ids if s != self.server_id and model.reachable(self.server_id, s)
            ),
            quorum=quorum,
            ready=connected and self.applied >= model.commit,
            stuck=False,
        )


def describe(command: rs.Command) -> str:
    """A command without its request id (ids embed the process id, which a replay does not share)."""
    fields = [f"{f.name}={getattr(command, f.name)}" for f in dataclasses.fields(command) if f.name != "request_id"]
    return f"{type(command).__name__}({', '.join(fields)})"
