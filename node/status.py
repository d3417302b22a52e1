"""Immutable snapshots of one server, published by its event loop and read by the admin thread.

Theory of operation. The asyncio loop owns every piece of mutable node state. A few times a second, and
on every change it cares about (coordinator change, peer up/down, serving), the loop builds a `Snapshot`
from that state and calls `SnapshotBox.publish`. The admin (Flask/waitress) threads only ever call
`SnapshotBox.get` and read the frozen object they got back, so they can never observe a half-updated
state and never touch the loop's objects. Publishing is one reference assignment, which is atomic in
CPython: no lock is needed, and a reader that got the previous snapshot keeps a consistent one.

Everything in a snapshot is a frozen dataclass, a tuple or a plain scalar. Every field has a default so a
test can build exactly the snapshot it needs: `Snapshot(server_id="s1", coordinator="s3", ...)`.

Two small mutable recorders live here too, `LatencyRecorder` and `EventLog`. They are owned by the loop
(never shared with a thread) and `freeze()` into the immutable values a snapshot carries. They take the
time as an argument, so they read no clock themselves.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from registry.replicated import RaftStatus

# Upper bounds (seconds) of the approval-latency histogram buckets: a registry commit on loopback takes a
# few milliseconds, an approval during an election can take seconds before it is refused.
APPROVAL_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# How many recent events a snapshot carries (the dashboard shows the newest ones).
MAX_RECENT_EVENTS = 50

ROLE_COORDINATOR = "coordinator"
ROLE_MEMBER = "member"
ROLE_DOWN = "down"
ROLE_STARTING = "starting"


@dataclass(frozen=True, slots=True)
class ServerView:
    """One configured server as this server sees it (`up` is this server's failure detector's view)."""

    server_id: str
    host: str = "127.0.0.1"
    clients_port: int = 0
    coordination_port: int = 0
    admin_port: int = 0
    raft_port: int = 0
    priority: int = 0
    up: bool = False
    # "coordinator", "member", "down" or "starting" (free text, shown as is).
    role: str = ROLE_MEMBER
    ws_port: int = 0
    # The incarnation of that server's heartbeats last heard here (this server's own, for itself): a server
    # restarted or fenced is "settled" once every peer has heard its new incarnation (until then the
    # coordinator gives it `unheard_grace_s` before declaring it down).
    incarnation: int | None = None


@dataclass(frozen=True, slots=True)
class RoomView:
    """A room cluster-wide; `members` only for rooms hosted here (None when not local)."""

    room_id: str
    server_id: str
    owner: str = ""
    members: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ClientView:
    """An identity cluster-wide; `room_id` only for clients connected here."""

    identity: str
    server_id: str
    room_id: str | None = None
    in_transit: bool = False


@dataclass(frozen=True, slots=True)
class RaftView:
    """The Raft (PySyncObj) replica of the registry; `leader` is a server id, not a Raft address.

    The one description of these fields: `/status` serialises them as they are (`dataclasses.asdict`) and
    `/metrics` exports every field that names a gauge in its metadata, so a new field is one line here."""

    leader: str | None = None
    term: int = field(default=0, metadata={"gauge": "raft_term", "help": "Current Raft term of the registry replica"})
    commit_index: int = field(
        default=0, metadata={"gauge": "raft_commit_index", "help": "Raft commit index of the registry replica"}
    )
    applied_index: int = field(
        default=0, metadata={"gauge": "raft_applied_index", "help": "Raft index applied to the registry state"}
    )
    is_leader: bool = field(
        default=False, metadata={"gauge": "raft_is_leader", "help": "1 while this server is the Raft leader"}
    )
    quorum: bool = field(
        default=False,
        metadata={"gauge": "raft_has_quorum", "help": "1 while this replica is connected to a Raft majority"},
    )

    @classmethod
    def of(cls, status: RaftStatus) -> RaftView:
        """The view of the replica's status: every field of the same name, and `is_leader` from its role."""
        names = {f.name for f in fields(cls)} - {"is_leader"}
        return cls(**{name: getattr(status, name) for name in names}, is_leader=status.role == "leader")


@dataclass(frozen=True, slots=True)
class RegistryCounts:
    """Sizes of the replicated registry (cluster-wide)."""

    identities: int = 0
    rooms: int = 0


@dataclass(frozen=True, slots=True)
class Counters:
    """Monotonic counts since this process started: `/status` serialises them as they are, `/metrics`
    exports each as a Prometheus counter of the same name with its `help`."""

    messages_relayed: int = field(
        default=0, metadata={"help": "Chat messages received from local clients and relayed to their room"}
    )
    deliveries: int = field(default=0, metadata={"help": "Lines queued to client connections"})
    approvals: int = field(default=0, metadata={"help": "Identity and room requests approved"})
    refusals: int = field(default=0, metadata={"help": "Identity and room requests refused"})
    elections: int = field(default=0, metadata={"help": "Elections this server started"})
    kicks: int = field(default=0, metadata={"help": "Clients disconnected by an operator"})
    coordinator_changes: int = field(
        default=0, metadata={"help": "Times this server's view of the coordinator changed after it first knew one"}
    )


@dataclass(frozen=True, slots=True)
class LatencyHistogram:
    """Approval latencies: `counts[i]` observations fell in bucket i (not cumulative); the last bucket
    is +Inf, so `len(counts) == len(bounds) + 1`."""

    bounds: tuple[float, ...] = APPROVAL_LATENCY_BUCKETS_S
    counts: tuple[int, ...] = (0,) * (len(APPROVAL_LATENCY_BUCKETS_S) + 1)
    total_s: float = 0.0

    def __post_init__(self) -> None:
        assert len(self.counts) == len(self.bounds) + 1, "one count per bound plus +Inf"
        assert list(self.bounds) == sorted(self.bounds), "bounds must be increasing"

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        """(upper bound, observations <= bound) pairs ending with (inf, count): Prometheus' shape."""
        running = 0
        out: list[tuple[float, int]] = []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return tuple(out)

    @classmethod
    def of(cls, samples_s: Iterable[float], bounds: tuple[float, ...] = APPROVAL_LATENCY_BUCKETS_S) -> LatencyHistogram:
        """A histogram of raw samples (handy in tests)."""
        recorder = LatencyRecorder(bounds)
        for sample in samples_s:
            recorder.observe(sample)
        return recorder.freeze()


class Event(NamedTuple):
    """Something an operator wants to see happen: election, coordinator change, server down/up."""

    wall_time: float  # seconds since the epoch
    text: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    server_id: str
    pid: int = 0
    role: str = ROLE_STARTING
    coordinator: str | None = None
    servers: tuple[ServerView, ...] = ()
    servers_up: tuple[str, ...] = ()
    rooms: tuple[RoomView, ...] = ()
    clients: tuple[ClientView, ...] = ()
    local_client_count: int = 0
    raft: RaftView = field(default_factory=RaftView)
    registry_counts: RegistryCounts = field(default_factory=RegistryCounts)
    counters: Counters = field(default_factory=Counters)
    approval_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    recent_events: tuple[Event, ...] = ()  # oldest first
    serving: bool = False
    taken_at: float = 0.0  # wall time (seconds since the epoch) the loop built this snapshot
    # The longest the event loop was late to its watchdog tick since the process started (a blocking call
    # on the loop, or the process not being scheduled), and how many stalls closed client input.
    loop_max_gap_s: float = 0.0
    loop_stalls: int = 0

    @property
    def local_rooms(self) -> tuple[RoomView, ...]:
        return tuple(r for r in self.rooms if r.server_id == self.server_id)

    @property
    def local_clients(self) -> tuple[ClientView, ...]:
        return tuple(c for c in self.clients if c.server_id == self.server_id)

    def room(self, room_id: str) -> RoomView | None:
        return next((r for r in self.rooms if r.room_id == room_id), None)

    def client(self, identity: str) -> ClientView | None:
        return next((c for c in self.clients if c.identity == identity), None)

    def server(self, server_id: str) -> ServerView | None:
        return next((s for s in self.servers if s.server_id == server_id), None)


class SnapshotBox:
    """The one place a snapshot crosses from the loop to the admin threads.

    `publish` is called by the loop only; `get` by anyone. A single attribute assignment is atomic,
    so readers see either the previous or the new snapshot, never a mix.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # One tuple, so the snapshot and its publish time are swapped together.
        self._latest: tuple[Snapshot, float] | None = None

    def publish(self, snapshot: Snapshot) -> None:
        self._latest = (snapshot, self._clock())

    def get(self) -> Snapshot | None:
        latest = self._latest
        return None if latest is None else latest[0]

    def age_s(self) -> float | None:
        """Seconds since the last publish (None before the first): a wedged loop stops publishing."""
        latest = self._latest
        return None if latest is None else max(0.0, self._clock() - latest[1])


class LatencyRecorder:
    """Mutable approval-latency histogram, owned by the loop; `freeze()` for a snapshot."""

    def __init__(self, bounds: tuple[float, ...] = APPROVAL_LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total_s = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a sample equal to a bound belongs to that bound's bucket (Prometheus "le").
        self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self._total_s += seconds

    def freeze(self) -> LatencyHistogram:
        return LatencyHistogram(self.bounds, tuple(self._counts), self._total_s)


class EventLog:
    """Bounded log of recent events, owned by the loop; `freeze()` for a snapshot (oldest first)."""

    def __init__(self, limit: int = MAX_RECENT_EVENTS) -> None:
        self._events: deque[Event] = deque(maxlen=limit)

    def record(self, wall_time: float, text: str) -> None:
        self._events.append(Event(wall_time, text))

    def freeze(self) -> tuple[Event, ...]:
        return tuple(self._events)
