"""Every timing of a chatmesh server in one frozen value, with the relations between them checked.

Theory of operation
-------------------
Failure detection, the Fast Bully election, Raft, client requests, the membership and reconcile loops and
the stall guard all wait on clocks, and their waits only work together in certain orders (a request must
outlive a failover, the stall guard must trip before any peer can have declared this server down, Raft's
election timeout must exceed three heartbeats...). They live here, with their units in their names, and
`ClusterTimings.__post_init__` refuses a combination that breaks a relation, naming the values.

The defaults suit a LAN or loopback (all servers within a millisecond of each other) on a machine that
may be busy. Every server of a cluster should run with the same values.

Override at start-up, later wins: `CHATMESH_TIMING_<FIELD>` in the environment (upper case), then
`--timing field=value` on the command line (repeatable), e.g. `--timing suspect_after_s=1.5`. The server
logs the effective values at start-up (`describe()`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ENV_PREFIX = "CHATMESH_TIMING_"


@dataclass(frozen=True, slots=True)
class ClusterTimings:
    # -- failure detection (bully/failure_detector.py) -------------------------------------------------
    # The coordinator heartbeats every server this often, and every server the coordinator it follows (a
    # server that follows nobody heartbeats everyone) (bully/node.py, "star" heartbeats).
    heartbeat_interval_s: float = 0.1
    # Any other two servers heartbeat each other only this often, so heartbeat traffic grows with n at the
    # full rate and with n*n only at this one. Such a peer, silent, is declared down after suspect_gap_factor
    # times this (capped at suspect_max_s); a crashed one (closed connection, refused reconnect) still at
    # once; the coordinator, and a server following this one, after T1 as before.
    mesh_heartbeat_interval_s: float = 1.0
    # T1: silence after which a peer is declared down while its heartbeats have been regular and this server
    # was on time (about seven missed heartbeats). A peer whose connection closed and refuses a reconnect is
    # declared down at once instead: only silence needs a timeout.
    suspect_after_s: float = 0.75
    # Silence suspicion adapts: a peer is suspected after `suspect_gap_factor` times the largest gap between
    # its recent heartbeats when that is longer than T1, plus however late this server's own loop was
    # meanwhile, but never after more than `suspect_max_s`.
    suspect_gap_factor: float = 3.0
    suspect_max_s: float = 3.0
    # -- the Fast Bully election (bully/election.py): T2..T4, k, hold-off -----------------------------------
    # T2: answers to an election, or views after IamUp.
    answer_timeout_s: float = 0.3
    # T3: the nominee's coordinator message.
    coordinator_timeout_s: float = 0.3
    # k: answerers nominated before an election restarts.
    max_nominees: int = 2
    # T4: an answerer waiting for a nomination or a coordinator message (> T2 + k*T3).
    nomination_timeout_s: float = 1.2
    # A non-top server waits this long for the top survivor's announcement before electing.
    holdoff_s: float = 0.1
    # A server that should lead but whose registry has no quorum yet re-checks this often (a cheap check;
    # after a Raft leader's death the new leader is ready within milliseconds of the failure).
    lead_retry_s: float = 0.02
    # -- Raft (registry/replicated.py, PySyncObj) -------------------------------------------------------
    # Leader heartbeat (append entries); Raft's election timeout must exceed three of them. Commands and
    # commits reach the voters at once whatever this is; read-only replicas get the log at this period, so
    # their reads (`list`) lag a commit by at most this. 10 Hz, not 20: at 24 servers the leader's idle
    # heartbeats to 23 partners were a third of its CPU, and each partner's answers a share of its own.
    raft_append_entries_period_s: float = 0.1
    # A follower that hears no leader for a random time in [min, max] starts an election. This is only the
    # fallback: when the failure detector declares the Raft leader down (at once on certain evidence, after
    # its adaptive silence window otherwise) the top survivor starts a Raft election at once, alone. Raft's
    # own timer is set above the longest silence window so that it never races that election (two
    # candidates in one term split the vote) and so that a machine starved for a few seconds, where the
    # detector stretches its windows, does not churn through Raft elections either.
    raft_min_timeout_s: float = 3.5
    raft_max_timeout_s: float = 4.5
    # After the Raft leader is declared down, the top survivor stands for Raft leader at once, the next one
    # this much later if there is still no leader, and so on.
    raft_election_stagger_s: float = 0.1
    # A survivor that sees someone else's Raft election under way waits for its outcome; one that stood
    # and still has no leader stands again. Either looks again after a random wait in [min, max]: Raft's
    # remedy for a split vote (load can make the staggered candidacies coincide), ten times faster than
    # its fallback. The minimum exceeds two append-entries periods so a winner is heard first.
    raft_election_retry_min_s: float = 0.25
    raft_election_retry_max_s: float = 0.55
    # A follower (voter or read-only replica) that has every entry and the current commit index is sent an
    # (empty) append-entries only this often: a read-only replica has no election timer to feed, a voter's
    # runs for raft_min_timeout_s (more than three of these), and keep-alives hold the connections. New
    # entries, a new commit index or a new term still reach it at the next heartbeat; commands and commits
    # reach the voters at once.
    raft_idle_heartbeat_s: float = 1.0
    # A Raft connection that delivered nothing for this long is dropped (>= raft_max_timeout_s; idle
    # connections carry a keep-alive, see registry/replicated.py).
    raft_connection_timeout_s: float = 5.0
    # How soon a dropped or refused Raft connection is retried.
    raft_connection_retry_s: float = 0.5
    # A Raft leader that heard from no majority for this long steps down.
    raft_leader_fallback_timeout_s: float = 5.0
    # Longest sleep of PySyncObj's tick thread between events: the resolution of its timers (heartbeats,
    # staggered candidacies, reconnects). Socket events and commands wake it at once, so commits do not wait
    # for it; an idle server wakes this often for nothing, which at 20 Hz cost 0.3 points of a core each.
    raft_tick_period_s: float = 0.1
    # Least time between two attempts to hand Raft leadership to the coordinator.
    raft_hand_over_interval_s: float = 1.0
    # A release (a client left) waits this long at most for another command to share its Raft log entry.
    raft_release_defer_s: float = 0.005
    # -- client requests (node/coordinator.py, node/retry.py) ---------------------------------------------
    # How long a client request may wait for a coordinator and a commit before it is refused (in doubt).
    request_deadline_s: float = 4.0
    # One commit attempt at the coordinator; shorter than a peer request so its "unavailable" arrives.
    commit_timeout_s: float = 1.5
    # One request to the coordinator over the coordination channel.
    peer_request_timeout_s: float = 2.0
    # Pause between attempts while the coordinator is unreachable or refuses for now.
    retry_pause_s: float = 0.05
    # Longest single wait for a coordinator to be elected.
    no_coordinator_wait_s: float = 0.5
    # -- membership, reconcile, stall guard (node/app.py, node/membership.py, node/stall.py) --------------
    # How often the coordinator compares registry membership with the failure detector (also at once on
    # every peer-down and coordinator change).
    membership_interval_s: float = 0.1
    # A server's first seconds, a fresh majority and an incarnation never heard: no "server down" yet.
    startup_grace_s: float = 5.0
    # A server whose new incarnation is registered but not heard yet (just restarted or fenced, its links
    # connecting) is not declared down before this, counted from when it was first seen registered.
    unheard_grace_s: float = 2.0
    # A coordinator declares a server down only once a majority (itself included) has followed it without
    # a break for this long (node/membership.py, rule 3): a member that accepted a coordinator elected by
    # mistake (cut off alone for a little less than T1) returns to the live one within a round trip. At
    # least one heartbeat interval, so every follower's next beat, naming whom it follows, is in.
    follow_confirm_s: float = 0.1
    # One attempt to commit this server's own "server up"/"server down" or a declaration.
    announce_timeout_s: float = 2.0
    # How often each server compares the registry with its live sessions.
    reconcile_interval_s: float = 2.0
    # The stall watchdog's tick, and the loop gap that closes client input until a registry barrier
    # commits: at most T1 minus two heartbeats, so no peer can have declared this server down after a
    # stall the guard did not see.
    # A coarser tick only makes the guard close on slightly shorter stalls (a gap is measured from the last
    # tick, so it is never under-estimated); 10 Hz, as each wake-up of an idle server costs.
    stall_tick_s: float = 0.1
    stall_threshold_s: float = 0.55

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value) or value <= 0:
                raise ValueError(f"timing {f.name} must be a positive number, not {value!r}")
        if self.max_nominees != int(self.max_nominees):
            raise ValueError(f"max_nominees must be a whole number, not {self.max_nominees}")
        self._need(
            self.suspect_after_s >= 2 * self.heartbeat_interval_s,
            "suspect_after_s >= 2 * heartbeat_interval_s",
            "suspect_after_s",
            "heartbeat_interval_s",
        )
        self._need(
            self.mesh_heartbeat_interval_s >= self.heartbeat_interval_s,
            "mesh_heartbeat_interval_s >= heartbeat_interval_s",
            "mesh_heartbeat_interval_s",
            "heartbeat_interval_s",
        )
        self._need(
            self.suspect_max_s >= 2 * self.mesh_heartbeat_interval_s,
            "suspect_max_s >= 2 * mesh_heartbeat_interval_s",
            "suspect_max_s",
            "mesh_heartbeat_interval_s",
        )
        self._need(
            self.suspect_max_s >= self.suspect_after_s,
            "suspect_max_s >= suspect_after_s",
            "suspect_max_s",
            "suspect_after_s",
        )
        self._need(self.suspect_gap_factor >= 1, "suspect_gap_factor >= 1", "suspect_gap_factor")
        self._need(
            self.follow_confirm_s >= self.heartbeat_interval_s,
            "follow_confirm_s >= heartbeat_interval_s",
            "follow_confirm_s",
            "heartbeat_interval_s",
        )
        budget = self.answer_timeout_s + self.max_nominees * self.coordinator_timeout_s
        self._need(
            self.nomination_timeout_s > budget,
            "nomination_timeout_s (T4) > T2 + k * T3",
            "nomination_timeout_s",
            "answer_timeout_s",
            "max_nominees",
            "coordinator_timeout_s",
        )
        self._need(
            3 * self.raft_append_entries_period_s < self.raft_min_timeout_s < self.raft_max_timeout_s,
            "3 * raft_append_entries_period_s < raft_min_timeout_s < raft_max_timeout_s",
            "raft_append_entries_period_s",
            "raft_min_timeout_s",
            "raft_max_timeout_s",
        )
        self._need(
            self.raft_min_timeout_s > self.suspect_max_s,
            "raft_min_timeout_s > suspect_max_s",
            "raft_min_timeout_s",
            "suspect_max_s",
        )
        self._need(
            2 * self.raft_append_entries_period_s
            < self.raft_election_retry_min_s
            <= self.raft_election_retry_max_s
            < self.raft_min_timeout_s,
            "2 * raft_append_entries_period_s < raft_election_retry_min_s <= raft_election_retry_max_s"
            " < raft_min_timeout_s",
            "raft_append_entries_period_s",
            "raft_election_retry_min_s",
            "raft_election_retry_max_s",
            "raft_min_timeout_s",
        )
        self._need(
            self.raft_tick_period_s <= self.raft_append_entries_period_s,
            "raft_tick_period_s <= raft_append_entries_period_s",
            "raft_tick_period_s",
            "raft_append_entries_period_s",
        )
        self._need(
            3 * self.raft_idle_heartbeat_s < self.raft_min_timeout_s,
            "3 * raft_idle_heartbeat_s < raft_min_timeout_s",
            "raft_idle_heartbeat_s",
            "raft_min_timeout_s",
        )
        self._need(
            self.raft_append_entries_period_s <= self.raft_idle_heartbeat_s < self.raft_connection_timeout_s,
            "raft_append_entries_period_s <= raft_idle_heartbeat_s < raft_connection_timeout_s",
            "raft_append_entries_period_s",
            "raft_idle_heartbeat_s",
            "raft_connection_timeout_s",
        )
        self._need(
            self.raft_connection_timeout_s >= self.raft_max_timeout_s,
            "raft_connection_timeout_s >= raft_max_timeout_s",
            "raft_connection_timeout_s",
            "raft_max_timeout_s",
        )
        self._need(
            self.raft_leader_fallback_timeout_s > self.raft_append_entries_period_s,
            "raft_leader_fallback_timeout_s > raft_append_entries_period_s",
            "raft_leader_fallback_timeout_s",
            "raft_append_entries_period_s",
        )
        self._need(
            self.raft_release_defer_s < self.commit_timeout_s,
            "raft_release_defer_s < commit_timeout_s",
            "raft_release_defer_s",
            "commit_timeout_s",
        )
        self._need(
            self.commit_timeout_s < self.peer_request_timeout_s <= self.request_deadline_s,
            "commit_timeout_s < peer_request_timeout_s <= request_deadline_s",
            "commit_timeout_s",
            "peer_request_timeout_s",
            "request_deadline_s",
        )
        self._need(
            self.retry_pause_s < self.request_deadline_s and self.no_coordinator_wait_s <= self.request_deadline_s,
            "retry_pause_s < request_deadline_s and no_coordinator_wait_s <= request_deadline_s",
            "retry_pause_s",
            "no_coordinator_wait_s",
            "request_deadline_s",
        )
        # A request must outlive a failover: detection (at most the longest silence window) and an election
        # of the Fast Bully (the Raft election the detector starts takes milliseconds).
        self._need(
            self.request_deadline_s > self.suspect_max_s + self.answer_timeout_s,
            "request_deadline_s > suspect_max_s + answer_timeout_s",
            "request_deadline_s",
            "suspect_max_s",
            "answer_timeout_s",
        )
        self._need(
            self.stall_threshold_s + 2 * self.heartbeat_interval_s <= self.suspect_after_s,
            "stall_threshold_s + 2 * heartbeat_interval_s <= suspect_after_s",
            "stall_threshold_s",
            "heartbeat_interval_s",
            "suspect_after_s",
        )
        self._need(
            self.stall_tick_s < self.stall_threshold_s,
            "stall_tick_s < stall_threshold_s",
            "stall_tick_s",
            "stall_threshold_s",
        )
        self._need(
            self.membership_interval_s < self.suspect_after_s,
            "membership_interval_s < suspect_after_s",
            "membership_interval_s",
            "suspect_after_s",
        )
        self._need(
            self.unheard_grace_s >= 2 * self.suspect_after_s,
            "unheard_grace_s >= 2 * suspect_after_s",
            "unheard_grace_s",
            "suspect_after_s",
        )
        self._need(
            self.startup_grace_s >= 2 * self.suspect_after_s,
            "startup_grace_s >= 2 * suspect_after_s",
            "startup_grace_s",
            "suspect_after_s",
        )

    def _need(self, holds: bool, relation: str, *names: str) -> None:
        if not holds:
            values = ", ".join(f"{name}={getattr(self, name)}" for name in names)
            raise ValueError(f"timings must satisfy {relation} (have {values})")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_sources(cls, environ: Mapping[str, str], assignments: Iterable[str] = ()) -> ClusterTimings:
        """The defaults, then every `CHATMESH_TIMING_<FIELD>` of `environ`, then each `field=value` of
        `assignments` (the command line). ValueError naming the variable or argument on a bad value, an
        unknown timing or a broken relation."""
        changes: dict[str, float] = {}
        for key, raw in environ.items():
            if key.startswith(ENV_PREFIX):
                changes[_known(key[len(ENV_PREFIX) :].lower(), key)] = _number(raw, key)
        for assignment in assignments:
            name, sep, raw = assignment.partition("=")
            if not sep:
                raise ValueError(f"--timing {assignment!r}: expected field=value")
            changes[_known(name.strip(), f"--timing {name.strip()}")] = _number(raw, f"--timing {assignment}")
        if "max_nominees" in changes and changes["max_nominees"].is_integer():
            changes["max_nominees"] = int(changes["max_nominees"])
        return dataclasses.replace(cls(), **changes)  # type: ignore[arg-type]

    def describe(self) -> str:
        """One line with every effective value, for the start-up log."""
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


def _known(name: str, where: str) -> str:
    if name not in ClusterTimings.field_names():
        raise ValueError(f"{where}: unknown timing (known: {', '.join(ClusterTimings.field_names())})")
    return name


def _number(raw: str, where: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{where}={raw!r} is not a number") from None
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{where}={raw!r} is not a finite number")
    return value
