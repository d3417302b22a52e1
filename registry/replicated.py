"""The registry replicated through PySyncObj (Raft): one SyncObj per server, all servers as partners.

Theory of operation
-------------------
Each server runs one PySyncObj node on its configured `host:raft_port` (bound there, never on all
interfaces) with every other server of the configuration as a partner. Cluster membership is fixed by the
configuration (`dynamicMembershipChange` off). Traffic is encrypted and authenticated with the cluster
secret (`password`): PySyncObj unpickles what reaches its port, so nothing unauthenticated may.

A command travels: `submit` (asyncio loop) -> PySyncObj's queue -> the Raft leader's log (a follower
forwards it) -> committed by a majority -> applied in log order on every replica by
`_RegistryLog.apply`, which runs `RegistryState.apply` under a lock in PySyncObj's tick thread -> the
submitting server's callback crosses back into its loop (registry/client.py). Reads are served from the
local replica under the same lock, so they never see a half-applied command.

Roles and what each accepts (PySyncObj's Raft): a follower forwards commands to the leader it knows; a
candidate or a node with no leader queues them until a leader appears (`commandsWaitLeader`); the leader
appends and replicates. `has_quorum()` is true on a leader connected to a majority, or on a follower that
knows a leader and is connected to it; `is_ready()` once the replica is restored and has applied
everything the leader is known to have committed.

Durability and restarts: term, vote and log are in PySyncObj's journal; at log compaction the whole state
is written to the full dump and the journal is cut. The journal is always used *together with* the dump: a
journal alone, after compaction, starts at an index the node cannot apply from, so the node never rebuilds
its state yet can still win elections (it then leads with nothing applied and every write times out).
PySyncObj loads the dump in its first tick after binding, before any election timer can fire, so a
restarted node never leads before its state is restored; `start()` refuses a data directory whose journal
was compacted but whose dump is missing, and the tick watchdog reports a replica that cannot apply.

The voter core: only the configuration's voters (`ClusterConfig.voter_ids`, by default the five
highest-priority servers) are Raft members; they vote, and a commit waits on a majority of them only. Every
other server runs a PySyncObj read-only node (`selfNode=None`): it binds no Raft port, connects to every
voter (authenticated by the same secret: PySyncObj encrypts every connection with it), receives the whole
log from the leader and applies it like a voter, serves local reads, and forwards its commands to the leader
it learned from the leader's append-entries. It never votes and is never counted in a commit. Voters do not
list read-only nodes: they accept any connection that proves the secret and announces itself read-only.

Invariants: replicas at the same applied index are identical (`RegistryState` is deterministic); a result
is reported only after its command committed; every timing lives in `RaftTimings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.journal import FileJournal
from pysyncobj.monotonic import monotonic

from cluster.config import ClusterConfig, ServerConfig
from cluster.timings import ClusterTimings
from registry import raft_wire
from registry.client import MAX_IN_FLIGHT, CommitBridge, RegistryUnavailable
from registry.fast_election import FastElection
from registry.state import Command, IdentityEntry, RegistryState, ReleaseIdentity, Result, RoomEntry

__all__ = [
    "RaftTimings",
    "RaftStatus",
    "RegistryDataError",
    "RegistryUnavailable",
    "ReplicatedRegistry",
    "default_data_dir",
    "wipe_data_dir",
]

log = logging.getLogger("chatmesh.registry")

JOURNAL_FILE = "raft.journal"  # PySyncObj adds raft.journal.meta (term, vote, commit index)
DUMP_FILE = "raft.dump"
LOCK_FILE = "lock"
# Commands PySyncObj may queue before refusing with QUEUE_FULL (its default is 100 000).
MAX_QUEUED_COMMANDS = 10_000
# Commands per log entry when several are submitted in one loop turn.
MAX_BATCH = 256
# Largest append-entries message (PySyncObj: 64 KiB). A registry command pickles to ~120 bytes, so one
# message covers every command the whole cluster can have in flight (servers x MAX_IN_FLIGHT); see
# _RewriteFilter for why a message should cover what a follower already has.
APPEND_ENTRIES_BATCH_BYTES = 1 << 20


class _RewriteFilter(logging.Filter):
    """Demote PySyncObj's "truncating already-applied log entries" to DEBUG, and count it.

    With appendEntriesUseBatch=False the leader sends every command at once; a late acknowledgement then
    moves the follower's next index back, and the leader re-sends entries the follower already has. The
    follower deletes them and appends the same entries again (same index and term, so the same entries in
    Raft), logging this at CRITICAL for every concurrent commit. A real divergence would show as replicas
    with equal applied-command counts and different states, which the integration tests check."""

    rewrites = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("truncating already-applied log entries"):
            _RewriteFilter.rewrites += 1
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("pysyncobj.syncobj").isEnabledFor(logging.DEBUG)
        return True


_rewrite_filter = _RewriteFilter()
logging.getLogger("pysyncobj.syncobj").addFilter(_rewrite_filter)


# The Raft timings' defaults come from the one table of timings (cluster/timings.py).
_DEFAULTS = ClusterTimings()


@dataclass(frozen=True, slots=True)
class RaftTimings:
    """Every PySyncObj timing in one place. Defaults favour latency on a LAN/loopback.

    PySyncObj's defaults batch appends (every synchronous write waits for the next append-entries tick:
    ~100 ms on the leader, ~200 ms from a follower), retry connections every 5 s and let a cut-off leader
    lead for 30 s; these defaults give ~1 ms commits, reconnect a restarted node within 0.5 s and make a
    leader that lost its majority step down within 2 s."""

    # Send each command to the followers at once instead of once per append-entries period.
    append_entries_use_batch: bool = False
    # Leader heartbeat; an election timeout must exceed 3 periods (PySyncObj checks).
    append_entries_period_s: float = _DEFAULTS.raft_append_entries_period_s
    # A follower (voter or read-only) with nothing new to receive gets an append-entries only this often.
    idle_heartbeat_s: float = _DEFAULTS.raft_idle_heartbeat_s
    # A follower that hears no leader for a random time in [min, max] starts an election: the fallback, see
    # cluster/timings.py (a leader declared down is replaced at once through `leader_is_gone`).
    raft_min_timeout_s: float = _DEFAULTS.raft_min_timeout_s
    raft_max_timeout_s: float = _DEFAULTS.raft_max_timeout_s
    # A connection that delivered nothing for this long is dropped (>= raft_max_timeout_s).
    connection_timeout_s: float = _DEFAULTS.raft_connection_timeout_s
    # How soon a dropped or refused connection is retried (PySyncObj: 5 s).
    connection_retry_s: float = _DEFAULTS.raft_connection_retry_s
    # A leader that heard from no majority for this long steps down (PySyncObj: 30 s).
    leader_fallback_timeout_s: float = _DEFAULTS.raft_leader_fallback_timeout_s
    # After a fast election (the leader was declared down) that produced no leader, stand again after a
    # random wait in [min, max] (registry/fast_election.py).
    election_retry_min_s: float = _DEFAULTS.raft_election_retry_min_s
    election_retry_max_s: float = _DEFAULTS.raft_election_retry_max_s
    # Longest sleep of PySyncObj's tick thread between events (timer resolution for the above).
    auto_tick_period_s: float = _DEFAULTS.raft_tick_period_s
    # Binding the Raft port: retry interval and attempts before start() gives up.
    bind_retry_s: float = 0.2
    max_bind_retries: int = 25
    # Default bound for one commit (callers pass their own to submit()).
    commit_timeout_s: float = _DEFAULTS.commit_timeout_s
    # Compact the log (write the full dump, cut the journal) after this many entries or this long.
    log_compaction_min_entries: int = 5000
    log_compaction_min_time_s: float = 300.0
    # A release (ReleaseIdentity: a client left) waits up to this long for another command to share its log
    # entry: a user who quits and the next who logs in then cost one commit, not two. Only a quit's close
    # and a re-login of the same name wait on a release, and no longer than this.
    release_defer_s: float = _DEFAULTS.raft_release_defer_s
    # Least time between two attempts to hand leadership to the preferred server (the coordinator).
    leader_hand_over_interval_s: float = _DEFAULTS.raft_hand_over_interval_s
    # How long close() waits for PySyncObj's thread to stop.
    close_timeout_s: float = 3.0

    def __post_init__(self) -> None:
        if not 3 * self.append_entries_period_s < self.raft_min_timeout_s < self.raft_max_timeout_s:
            raise ValueError("need 3 * append_entries_period_s < raft_min_timeout_s < raft_max_timeout_s")
        if self.connection_timeout_s < self.raft_max_timeout_s:
            raise ValueError("connection_timeout_s must be >= raft_max_timeout_s")
        if not self.append_entries_period_s <= self.idle_heartbeat_s < self.connection_timeout_s:
            raise ValueError("need append_entries_period_s <= idle_heartbeat_s < connection_timeout_s")
        if not 3 * self.idle_heartbeat_s < self.raft_min_timeout_s:
            raise ValueError("need 3 * idle_heartbeat_s < raft_min_timeout_s")
        if not 2 * self.append_entries_period_s < self.election_retry_min_s <= self.election_retry_max_s:
            raise ValueError("need 2 * append_entries_period_s < election_retry_min_s <= election_retry_max_s")
        if self.election_retry_max_s >= self.raft_min_timeout_s:
            raise ValueError("election_retry_max_s must be < raft_min_timeout_s")
        if self.leader_fallback_timeout_s <= self.append_entries_period_s:
            raise ValueError("leader_fallback_timeout_s must exceed append_entries_period_s")
        if self.log_compaction_min_entries < 2 or min(self.commit_timeout_s, self.auto_tick_period_s) <= 0:
            raise ValueError("log_compaction_min_entries >= 2 and positive periods required")
        if not 0 <= self.release_defer_s < self.commit_timeout_s:
            raise ValueError("need 0 <= release_defer_s < commit_timeout_s")


@dataclass(frozen=True, slots=True)
class RaftStatus:
    """What this replica knows about Raft, derived from a sample PySyncObj's thread takes after every tick."""

    started: bool = False
    role: str = "stopped"  # leader | follower | candidate | read-only | stopped
    leader: str | None = None  # server id
    term: int = 0
    commit_index: int = 0
    applied_index: int = 0
    leader_commit_index: int | None = None
    partners_connected: tuple[str, ...] = ()
    quorum: bool = False
    ready: bool = False
    stuck: bool = False  # the log starts past what was applied: the state cannot be rebuilt


@dataclass(frozen=True, slots=True)
class TickSample:
    """What PySyncObj's thread reads after each tick; `status()` derives everything else from it, on any
    thread, without touching PySyncObj's state."""

    leader: Any  # PySyncObj's node object, or None
    is_leader: bool
    term: int
    commit_index: int
    applied_index: int
    leader_commit_index: int | None
    synced: bool
    noop_index: int | None
    log_first_index: int | None


class RegistryDataError(Exception):
    """The data directory cannot be used safely (another process holds it, or it is inconsistent)."""


class RegistryBindError(OSError):
    """The Raft port could not be bound."""


def default_data_dir(config: ClusterConfig, server_id: str, root: Path = Path("data")) -> Path:
    """`root/<configuration fingerprint>/<server id>`: two clusters from different files never share state."""
    return root / config.fingerprint() / server_id


def wipe_data_dir(data_dir: Path) -> None:
    """Forget everything a server's registry stored (run_cluster.py --fresh). Only while it is stopped."""
    shutil.rmtree(data_dir, ignore_errors=True)


def journal_first_index(journal_path: Path) -> int | None:
    """Log index of the first journal entry (1 if never compacted), or None if there is no journal."""
    if not journal_path.exists() or journal_path.stat().st_size == 0:
        return None
    journal = FileJournal(str(journal_path))
    try:
        return int(journal[0][1]) if len(journal) else None
    finally:
        journal._destroy()


class _RegistryLog(SyncObjConsumer):
    """The replicated part: a RegistryState that PySyncObj applies commands to and dumps/restores.

    Attributes set before `SyncObjConsumer.__init__` are not serialised into the full dump (the lock and
    the listener hook); those set after are. `applied_commands` counts registry commands applied since the
    cluster began: replicas with the same count hold the same state (Raft no-ops do not count)."""

    def __init__(self, lock: threading.Lock, on_applied: Callable[[Command, Result], None]) -> None:
        self._lock = lock
        self._on_applied = on_applied
        super().__init__()
        self.state = RegistryState()
        self.applied_commands = 0

    @replicated
    def apply(self, command: Command) -> Result:
        return self._apply_one(command)

    @replicated
    def apply_batch(self, commands: tuple[Command, ...]) -> tuple[Result, ...]:
        """Several commands in one log entry, applied in order exactly as if logged one by one."""
        return tuple(self._apply_one(command) for command in commands)

    def _apply_one(self, command: Command) -> Result:
        with self._lock:
            try:
                result = self.state.apply(command)
            except Exception:
                # Same code, same log, same exception on every replica: refuse instead of wedging the log
                # (an exception here would stop PySyncObj from ever applying the next entry).
                log.exception("registry command raised: %r", command)
                result = Result(False, "internal-error")
            self.applied_commands += 1
        self._on_applied(command, result)
        return result

    def _deserialize(self, data: dict[str, Any]) -> None:
        with self._lock:
            super()._deserialize(data)
        log.info("registry state restored from a full dump: %s", self.state.counts())


# A message type PySyncObj does not know (it ignores it): keeps idle Raft connections up.
KEEPALIVE_MESSAGE = "chatmesh-keepalive"


class _SyncObj(SyncObj):
    """PySyncObj with the hooks this adapter needs, all on private state of the pinned version.

    `elect_now()` is what PySyncObj's own TimeoutNow handler does (zero the election deadline) without the
    leader's message: a follower that knows its leader is dead starts a Raft election at its next tick
    instead of waiting out a random 0.5-1 s. Call it on PySyncObj's thread (from a tick callback).
    `wake()` ends the tick thread's current sleep (its pipe notifier; thread-safe).
    `outlive(thread)`: the tick thread stops once the thread that created the SyncObj ends; tying it to the
    main thread lets a worker thread run the blocking start (journal load, bind retries) off the loop."""

    def __init__(self, *args: Any, idle_heartbeat_s: float, **kwargs: Any) -> None:
        # Set before PySyncObj's constructor starts its tick thread; that thread alone uses them afterwards.
        self.idle_heartbeat_s = idle_heartbeat_s
        self._periodic_sent: dict[Any, tuple[float, int, int]] = {}  # node -> (when, term, commit index)
        self._periodic_term = -1  # the term of the last periodic send
        super().__init__(*args, **kwargs)

    def elect_now(self) -> None:
        self._SyncObj__raftElectionDeadline = 0

    def wake(self) -> None:
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        if notifier is not None:
            with contextlib.suppress(OSError):
                notifier.notify()

    def outlive(self, thread: threading.Thread) -> None:
        self._SyncObj__mainThread = thread

    # Set while _checkCommandsToApply runs (PySyncObj's thread only).
    _holding_sends = False
    _sends_held = False

    def _checkCommandsToApply(self) -> None:
        """PySyncObj's leader appends every queued command to its log and, with `appendEntriesUseBatch` off,
        sends append-entries to every follower after *each* one: k commands queued since the last tick cost
        k encrypted messages per follower, k journal writes and k acknowledgements there. Here the sends
        wait until the queue is drained, then one send carries every new entry (the same entries, in the
        same order: nothing Raft sees changes but the message count). Commands queue up when the loop
        hands over several batches between two ticks (concurrent clients on a busy machine, commands
        forwarded by followers)."""
        self._holding_sends, self._sends_held = True, False
        try:
            super()._checkCommandsToApply()
        finally:
            self._holding_sends = False
        if self._sends_held:
            self._SyncObj__sendAppendEntries()

    def _SyncObj__sendAppendEntries(self) -> None:
        """PySyncObj sends append-entries to every follower *and read-only node* on every command and again
        after every commit (`appendEntriesUseBatch` off). With 19 read-only nodes that is ~80 encrypted
        messages per commit on the leader, most of them not needed for the commit. Here only the voters get
        the immediate sends; read-only nodes get everything at the append-entries period (the leader's
        heartbeat), several entries per message, so they lag the commit by at most one period.

        (This subclass's name mangles like PySyncObj's `SyncObj`, so this method replaces its private
        `__sendAppendEntries` for every caller inside PySyncObj.)"""
        if self._holding_sends:  # inside _checkCommandsToApply: one send when it is done
            self._sends_held = True
            return
        send = SyncObj._SyncObj__sendAppendEntries  # type: ignore[attr-defined]
        readonly = getattr(self, "_SyncObj__readonlyNodes", None) or set()
        voters: set[Any] = self._SyncObj__otherNodes  # type: ignore[has-type]
        due = getattr(self, "_SyncObj__newAppendEntriesTime", 0)
        periodic = monotonic() > due
        if periodic:
            idle = self._idle_nodes(readonly, voters)
            self._SyncObj__readonlyNodes, self._SyncObj__otherNodes = readonly - idle, voters - idle
        else:
            self._SyncObj__readonlyNodes = set()
        try:
            send(self)
        finally:
            self._SyncObj__readonlyNodes, self._SyncObj__otherNodes = readonly, voters
            if not periodic:
                # An immediate send must not postpone the read-only nodes' next periodic one.
                self._SyncObj__newAppendEntriesTime = due


    def _idle_nodes(self, readonly: set[Any], voters: set[Any]) -> set[Any]:
        """The followers a periodic send may skip: each has every entry (its next index is past the log),
        was last sent the current term and commit index, and less than `idle_heartbeat_s` ago. An idle
        leader of 19 read-only nodes otherwise sent 190 encrypted heartbeats a second, each decrypted and
        answered there, for nothing: read-only nodes have no election timer. A voter's election timer runs
        for `raft_min_timeout_s`, more than three idle heartbeats (a checked relation); each idle voter
        cost the leader 20 messages a second (docs/registry.md has the figures). Keep-alives hold every
        connection. Records what the others are about to be sent."""
        now = monotonic()
        sent = self._periodic_sent
        term, commit = self._SyncObj__raftCurrentTerm, self._SyncObj__raftCommitIndex
        connected = self._SyncObj__connectedNodes
        if term != self._periodic_term:
            # A new leader's first sends: voters only. The no-op entry that makes this leader ready commits
            # on the voters' answers, and 19 read-only nodes' (their decrypts, answers and wake-ups on a
            # shared machine) would compete with them; they get the log one period later.
            self._periodic_term = term
            sent.update((node, (now, term, commit)) for node in voters if node in connected)
            return set(readonly)
        last_index = self._SyncObj__getCurrentLogIndex()
        next_index = self._SyncObj__raftNextIndex
        idle = set()
        for node in readonly | voters:
            last = sent.get(node)
            if (
                last is not None
                and last[1:] == (term, commit)
                and now - last[0] < self.idle_heartbeat_s
                and next_index.get(node, 0) > last_index
            ):
                idle.add(node)
            elif node in connected:  # PySyncObj skips a node it is not connected to: due again next period
                sent[node] = (now, term, commit)
        return idle

    def store_commit_index_when_changed(self) -> None:
        """A follower hands PySyncObj's journal the commit index on every append-entries, changed or not,
        and the journal rewrites its meta file (write, then rename) in the next second whenever it was
        handed one: an idle replica wrote and renamed a file every second for nothing, a quarter of its busy
        samples at 24 servers. Hand it over only when it changed; a changed index is stored as before."""
        journal = getattr(self, "_SyncObj__raftLog", None)
        if not isinstance(journal, FileJournal):
            return
        store = journal.setRaftCommitIndex

        def store_when_changed(index: int) -> None:
            if index != journal.getRaftCommitIndex():
                store(index)

        journal.setRaftCommitIndex = store_when_changed  # type: ignore[method-assign]

    def forget_leader(self) -> None:
        """A read-only node whose leader is known dead: PySyncObj keeps following it until another leader's
        append-entries arrive (a read-only node has no election timer), and forwards commands into the void
        meanwhile. Forget it, and fail the commands waiting for its reply (LEADER_CHANGED, so the caller
        retries at once); new commands wait for the next leader (`commandsWaitLeader`). PySyncObj's thread."""
        if getattr(self, "_SyncObj__raftLeader", None) is not None:
            self._SyncObj__raftLeader = None
            self._SyncObj__onLeaderChanged()

    def keep_alive(self) -> None:
        """Send every partner a message PySyncObj ignores (an unknown type). PySyncObj drops a connection
        that delivered nothing for `connectionTimeout`, and followers never write to each other between
        elections: without this their connections are down most of the time, and a candidate's vote
        request to a follower is lost until the next reconnect (up to `connectionRetryTime`, 0.5 s), which
        is how a one-round-trip election became a 0.5-1.5 s one. Call it on PySyncObj's thread."""
        transport = self._SyncObj__transport
        if self._isLeader():
            # Its append-entries reach every partner at least every `raft_idle_heartbeat_s`, below the
            # connection timeout (a checked relation), and every answer comes back on the same connection.
            # At 24 servers its keep-alives were 23 encrypted frames out and 23 in every 1.25 s.
            return
        leader = self._getLeader()
        # Read-only nodes too: a voter that is not the leader sends them nothing else, and their side would
        # drop the connection after `connectionTimeout` and reconnect, over and over. Not the leader: its
        # append-entries and our answers keep that connection busy.
        for node in self.otherNodes | self.readonlyNodes:
            if node != leader:
                transport.send(node, {"type": KEEPALIVE_MESSAGE})


class ReplicatedRegistry:
    """One server's replica of the registry and its PySyncObj node. See the module docstring."""

    def __init__(
        self,
        config: ClusterConfig,
        self_id: str,
        data_dir: Path,
        password: str,
        timings: RaftTimings = RaftTimings(),  # noqa: B008 - frozen, shared safely
        journal: bool = True,
    ) -> None:
        if not password:
            raise ValueError("a cluster secret is required: PySyncObj unpickles whatever reaches its port")
        self.config = config
        self.server_id = self_id
        self.me = config.server(self_id)
        self.data_dir = Path(data_dir)
        self.timings = timings
        self.journal = journal
        self._password = password
        # Voters are the Raft members; a read-only node's partners are every voter (it connects to them all).
        self.voter = config.is_voter(self_id)
        self._partners = [config.server(v).raft_address for v in config.voter_ids if v != self_id]
        self._server_of = {s.raft_address: s.server_id for s in config.servers}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Command, Result], None]] = []
        self._log = _RegistryLog(self._lock, self._notify)
        self._bridge = CommitBridge(MAX_IN_FLIGHT)
        self._batch: list[tuple[Command, Callable[[object, int], None]]] = []
        # Releases waiting (release_defer_s at most) to ride along with the next batch.
        self._deferred: list[tuple[Command, Callable[[object, int], None]]] = []
        self._defer_timer: asyncio.TimerHandle | None = None
        self._preferred_leader: ServerConfig | None = None
        self._last_hand_over = 0.0
        self._sync: _SyncObj | None = None
        # A Raft leader known dead: when this replica stands (registry/fast_election.py). Fed by the loop
        # (leader_is_gone) and PySyncObj's thread (each tick), hence the lock.
        self._fast = FastElection(
            timings.election_retry_min_s,
            timings.election_retry_max_s,
            timings.raft_min_timeout_s,
            random.Random(),
        )
        self._fast_lock = threading.Lock()
        # A read-only replica cannot stand: the dead leader it forgets at its next tick (PySyncObj's thread).
        self._forget_leader: str | None = None
        self.fast_elections = 0
        self._last_keepalive = 0.0
        # Raft terms this replica moved through (each is an election somewhere) and the last (term, leader).
        self.raft_terms_seen = 0
        self._last_term_leader: tuple[int, str | None] = (0, None)
        self._partner_nodes: tuple[Any, ...] = ()
        self._lock_file: IO[bytes] | None = None
        # The last tick's sample, taken on PySyncObj's thread (see _on_tick); replaced whole, never mutated.
        self._tick: TickSample | None = None
        self._reported_stuck = False
        self._closed = False

    # -- files and configuration -------------------------------------------------------------------

    @property
    def journal_path(self) -> Path:
        return self.data_dir / JOURNAL_FILE

    @property
    def dump_path(self) -> Path:
        return self.data_dir / DUMP_FILE

    def sync_conf(self) -> SyncObjConf:
        """The PySyncObj configuration this replica runs with (exposed so tests can guard it)."""
        t = self.timings
        return SyncObjConf(
            password=self._password,
            bindAddress=self.me.raft_address,
            autoTick=True,
            autoTickPeriod=t.auto_tick_period_s,
            appendEntriesUseBatch=t.append_entries_use_batch,
            appendEntriesPeriod=t.append_entries_period_s,
            raftMinTimeout=t.raft_min_timeout_s,
            raftMaxTimeout=t.raft_max_timeout_s,
            connectionTimeout=t.connection_timeout_s,
            connectionRetryTime=t.connection_retry_s,
            leaderFallbackTimeout=t.leader_fallback_timeout_s,
            bindRetryTime=t.bind_retry_s,
            maxBindRetries=t.max_bind_retries,
            logCompactionMinEntries=t.log_compaction_min_entries,
            logCompactionMinTime=t.log_compaction_min_time_s,
            appendEntriesBatchSizeBytes=APPEND_ENTRIES_BATCH_BYTES,
            commandsQueueSize=MAX_QUEUED_COMMANDS,
            commandsWaitLeader=True,
            dynamicMembershipChange=False,
            # Journal and dump go together (module docstring); without a journal, nothing is durable.
            journalFile=str(self.journal_path) if self.journal else None,
            fullDumpFile=str(self.dump_path) if self.journal else None,
        )

    def _check_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.data_dir / LOCK_FILE, "wb")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise RegistryDataError(f"{self.data_dir} is in use by another process") from None
        self._lock_file = lock_file
        if not self.journal:
            return
        first = journal_first_index(self.journal_path)
        if first is not None and first > 1 and not self.dump_path.exists():
            self._release_lock_file()
            raise RegistryDataError(
                f"{self.journal_path} was compacted (starts at entry {first}) but {self.dump_path} is missing: "
                "the state cannot be rebuilt; wipe the data directory (run_cluster.py --fresh) to rejoin empty"
            )

    def _release_lock_file(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- lifetime ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the data directory, bind the Raft port and start PySyncObj's tick thread.

        Blocks (journal load, bind retries): servers call it on a worker thread. PySyncObj's thread is tied
        to the main thread's life. Raises RegistryDataError or RegistryBindError."""
        if self._sync is not None or self._closed:
            raise RuntimeError("start() may be called once")
        if self.journal:
            self._check_data_dir()
        raft_wire.install()  # no deflate per message (registry/raft_wire.py)
        self_node = self.me.raft_address if self.voter else None  # None: a PySyncObj read-only node
        sync = _SyncObj(
            self_node,
            self._partners,
            self.sync_conf(),
            consumers=[self._log],
            idle_heartbeat_s=self.timings.idle_heartbeat_s,
        )
        sync.outlive(threading.main_thread())
        sync.store_commit_index_when_changed()
        self._sync = sync
        self._partner_nodes = tuple(sync.otherNodes)
        sync.addOnTickCallback(self._on_tick)
        try:
            # PySyncObj's waitBinded() never returns on a read-only node (it binds nothing, and the event it
            # waits on is only set by a bind attempt).
            if self.voter:
                sync.waitBinded()
        except Exception:
            self.close()
            raise RegistryBindError(f"cannot bind the Raft port {self.me.raft_address}") from None
        if self.voter:
            log.info("%s: registry replica on %s, partners %s", self.server_id, self.me.raft_address, self._partners)
        else:
            log.info("%s: read-only registry replica (not a Raft voter), voters %s", self.server_id, self._partners)

    def close(self) -> None:
        """Stop PySyncObj (its thread flushes and closes the journal) and release the data directory."""
        if self._closed:
            return
        self._closed = True
        sync = self._sync
        if sync is not None:
            sync.destroy()
            deadline = time.monotonic() + self.timings.close_timeout_s
            while sync.tick_thread_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
        self._tick = None
        self._release_lock_file()

    # -- writes --------------------------------------------------------------------------------------------

    async def submit(self, command: Command, timeout: float) -> Result:
        """Commit `command` through Raft and return its result as applied (in log order).

        Raises RegistryUnavailable if no commit within `timeout` seconds or PySyncObj refuses the command;
        the command may still commit later (in doubt: retry with the same request id)."""
        sync = self._sync
        if sync is None:
            raise RegistryUnavailable("closed" if self._closed else "not-started")
        return await self._bridge.commit(functools.partial(self._enqueue, command), timeout)

    def _enqueue(self, command: Command, callback: Callable[[object, int], None]) -> None:
        """Queue `command` for the batch this loop turn sends (on the loop's thread); a release waits a little
        longer for company (`RaftTimings.release_defer_s`)."""
        defer_s = self.timings.release_defer_s
        if defer_s > 0 and type(command) is ReleaseIdentity:
            self._deferred.append((command, callback))
            if self._defer_timer is None:
                self._defer_timer = asyncio.get_running_loop().call_later(defer_s, self._end_deferral)
            return
        self._batch.append((command, callback))
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_soon(self._send_batch)

    def _end_deferral(self) -> None:
        self._defer_timer = None
        if self._deferred and not self._batch and not self._closed:
            self._send_batch()  # (with a batch queued, its own _send_batch is already on its way)

    def _send_batch(self) -> None:
        """Hand the commands submitted in one loop turn to PySyncObj as one log entry: one append per follower
        instead of one per command, which is what bounds commits per second under concurrent requests."""
        if self._deferred:
            # Submitted earlier, so first in the entry: a name released and claimed again is free in time.
            self._batch[:0], self._deferred = self._deferred, []
            if self._defer_timer is not None:
                self._defer_timer.cancel()
                self._defer_timer = None
        batch, self._batch = self._batch[:MAX_BATCH], self._batch[MAX_BATCH:]
        if self._batch:
            asyncio.get_running_loop().call_soon(self._send_batch)
        if not batch:
            return
        if len(batch) == 1:
            command, callback = batch[0]
            self._log.apply(command, callback=callback)
            return
        callbacks = [callback for _, callback in batch]

        def on_batch(results: object, error: int) -> None:  # PySyncObj's thread
            ok = isinstance(results, tuple) and len(results) == len(callbacks)
            for i, callback in enumerate(callbacks):
                callback(results[i] if ok else None, error)  # type: ignore[index]

        self._log.apply_batch(tuple(command for command, _ in batch), callback=on_batch)

    @property
    def in_flight(self) -> int:
        return self._bridge.in_flight

    # -- listeners -----------------------------------------------------------------------------------------

    def add_listener(self, callback: Callable[[Command, Result], None]) -> None:
        """`callback(command, result)` after every applied command, in PySyncObj's thread (cross into your
        own loop yourself). Not called for commands folded into a full dump that a replica restores."""
        self._listeners.append(callback)

    def _notify(self, command: Command, result: Result) -> None:
        for listener in list(self._listeners):
            try:
                listener(command, result)
            except Exception:
                log.exception("registry listener failed")

    # -- local reads ---------------------------------------------------------------------------------------

    def identity(self, name: str) -> IdentityEntry | None:
        with self._lock:
            return self._log.state.identity(name)

    def room(self, room_id: str) -> RoomEntry | None:
        with self._lock:
            return self._log.state.room(room_id)

    def rooms(self) -> list[RoomEntry]:
        with self._lock:
            return self._log.state.rooms()

    def identities(self) -> list[IdentityEntry]:
        with self._lock:
            return self._log.state.identities()

    def servers_up(self) -> dict[str, int]:
        with self._lock:
            return self._log.state.servers_up()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return self._log.state.counts()

    def applied_commands(self) -> int:
        """Registry commands applied so far; equal counts mean identical replicas."""
        with self._lock:
            return self._log.applied_commands

    def snapshot(self) -> dict[str, Any]:
        """The whole replica (`RegistryState.to_dict()`) and its applied-command count, read atomically."""
        with self._lock:
            return {"applied_commands": self._log.applied_commands, "state": self._log.state.to_dict()}

    # -- Raft status ---------------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return self.status().ready

    def has_quorum(self) -> bool:
        return self.status().quorum

    def status(self) -> RaftStatus:
        """Derived on demand from the last tick's sample (consistent: taken after that tick's applies)."""
        sample = self._tick
        sync = self._sync
        if sample is None or sync is None or self._closed:
            return RaftStatus()
        leader_node, is_leader, applied, leader_commit = (
            sample.leader,
            sample.is_leader,
            sample.applied_index,
            sample.leader_commit_index,
        )
        # Connection flags are single set lookups, atomic under the GIL, so reading them here is safe.
        connected = tuple(sorted(self._server_of[n.id] for n in self._partner_nodes if sync.isNodeConnected(n)))
        if is_leader:
            role = "leader"
            quorum = len(connected) + 1 > (len(self._partner_nodes) + 1) / 2
        else:
            role = "follower" if leader_node is not None else "candidate"
            if not self.voter:
                role = "read-only"
            # A follower that lost every connection never times out its leader in PySyncObj (it starts no
            # election while connected to nobody), so being connected to the leader is what tells.
            quorum = leader_node is not None and sync.isNodeConnected(leader_node)
        first = sample.log_first_index
        stuck = first is not None and first > applied + 1
        if stuck and not self._reported_stuck:
            self._reported_stuck = True
            log.critical(
                "%s: the Raft log starts at %d but only %d entries are applied: the state cannot be rebuilt",
                self.server_id,
                first,
                applied,
            )
        ready = (
            sample.synced
            and not stuck
            and leader_node is not None
            and leader_commit is not None
            and applied >= leader_commit
        )
        if is_leader:
            # A new leader knows what is committed only once an entry of its own term is (Raft section 8): its
            # commit index, restored from the journal's meta file, may lag by up to a second after a restart.
            ready = ready and sample.noop_index is not None and applied >= sample.noop_index
        return RaftStatus(
            started=True,
            role=role,
            leader=self._server_of.get(leader_node.id, leader_node.id) if leader_node is not None else None,
            term=sample.term,
            commit_index=sample.commit_index,
            applied_index=applied,
            leader_commit_index=leader_commit,
            partners_connected=connected,
            quorum=quorum and not stuck,
            ready=ready,
            stuck=stuck,
        )

    def raft_status(self) -> dict[str, Any]:
        status = self.status()
        data = asdict(status)
        data["is_leader"] = status.role == "leader"
        data["server"] = self.server_id
        data["in_flight"] = self._bridge.in_flight
        data["journal"] = self.journal
        data["log_rewrites"] = _RewriteFilter.rewrites
        return data

    def force_log_compaction(self) -> None:
        """Write the full dump and cut the journal at the next tick (tests and operators)."""
        if self._sync is not None:
            self._sync.forceLogCompaction()

    def log_first_index(self) -> int | None:
        """Index of the first entry still in the Raft log (grows after compaction), as of the last tick."""
        sample = self._tick
        return None if sample is None else sample.log_first_index

    def _on_tick(self) -> None:
        """PySyncObj's thread, after each tick applied what was committed: sample what status() derives.

        Only here may the log be read: compaction clears and refills it on this thread, so a read from the
        event loop (a length, then the first entry) could see it empty in between. Kept to a few attribute
        reads: it runs a couple of times per commit on every node."""
        sync = self._sync
        if sync is None:
            return
        # PySyncObj keeps the log, the leader's commit index and the no-op index private (pinned version).
        raft_log = getattr(sync, "_SyncObj__raftLog", None)
        sample = TickSample(
            leader=sync._getLeader(),
            is_leader=sync._isLeader(),
            term=sync.raftCurrentTerm,
            commit_index=sync.raftCommitIndex,
            applied_index=sync.raftLastApplied,
            leader_commit_index=getattr(sync, "_SyncObj__leaderCommitIndex", None),
            synced=sync.isReady(),
            noop_index=getattr(sync, "_SyncObj__noopIDx", None),
            log_first_index=int(raft_log[0][1]) if raft_log is not None and len(raft_log) else None,
        )
        self._tick = sample
        term, leader_id = sample.term, getattr(sample.leader, "id", None)
        if (term, leader_id) != self._last_term_leader:
            if term != self._last_term_leader[0]:
                self.raft_terms_seen += 1
            previous_leader = self._last_term_leader[1]
            if previous_leader is not None and previous_leader != leader_id:
                self._bridge.leader_changed()
            self._last_term_leader = (term, leader_id)
            log.info(
                "%s: Raft term %d, leader %s%s",
                self.server_id,
                term,
                self._server_of.get(leader_id, leader_id) if leader_id else None,
                " (this server)" if sample.is_leader else "",
            )
        now = time.monotonic()
        if now - self._last_keepalive >= self.timings.connection_timeout_s / 4:
            self._last_keepalive = now
            sync.keep_alive()
        forget = self._forget_leader
        if forget is not None:
            self._forget_leader = None
            if leader_id == forget:
                log.info("%s: Raft leader %s is gone: waiting for the next one", self.server_id, forget)
                sync.forget_leader()
        if self.voter:
            with self._fast_lock:
                stand = self._fast.tick(now, term, leader_id, sample.is_leader)
            if stand:
                log.info("%s: Raft leader is gone and no leader yet: standing in term %d", self.server_id, term + 1)
                self.fast_elections += 1
                sync.elect_now()
                sync.wake()
        preferred = self._preferred_leader
        if preferred is not None and sample.is_leader:
            self._hand_over(sync, preferred)

    def leader_is_gone(self, server_id: str, after_s: float = 0.0) -> None:
        """`server_id` was declared down: if this replica still follows it as Raft leader (or knows no
        leader) `after_s` from now, start a Raft election then instead of waiting out the election timeout
        (thread-safe). Survivors call it with staggered delays: the first candidate may not win (its log
        can be behind another survivor's when commits were in flight), and the next one then tries. A
        read-only replica (it cannot stand) forgets that leader instead, so its commands wait for the next
        one rather than go to the dead one."""
        sync = self._sync
        if sync is None or self._closed or server_id not in self.config:
            return
        if not self.voter:
            self._forget_leader = self.config.server(server_id).raft_address
            sync.wake()
            return
        sample = self._tick
        with self._fast_lock:
            self._fast.leader_gone(
                self.config.server(server_id).raft_address, time.monotonic(), after_s, sample.term if sample else 0
            )
        sync.wake()

    def prefer_leader(self, server_id: str | None) -> None:
        """Ask that `server_id` lead Raft when it can: the Fast Bully coordinator submits every registry
        command, and a coordinator that also leads saves a round trip on each (thread-safe)."""
        # A server that is not a voter cannot lead: no preference then, Raft keeps whichever voter leads and
        # the coordinator's commands take the forward hop (docs/registry.md, "The voter core").
        wanted = server_id is not None and server_id != self.server_id and self.config.is_voter(server_id)
        self._preferred_leader = self.config.server(server_id) if wanted and server_id else None

    def _hand_over(self, sync: _SyncObj, preferred: ServerConfig) -> None:
        """PySyncObj's thread, while leading: hand leadership to the preferred server (Raft TimeoutNow),
        at most once per interval; PySyncObj refuses while that server's log is behind."""
        now = time.monotonic()
        if now - self._last_hand_over < self.timings.leader_hand_over_interval_s:
            return
        self._last_hand_over = now
        log.info("%s: handing Raft leadership to %s", self.server_id, preferred.server_id)
        sync.transferLeadership(preferred.raft_address)
