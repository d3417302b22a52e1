"""When the coordinator commits "server down": a pure policy, `now` passed in.

Theory of operation
-------------------
The registry lists the servers that are up (`registered`: server -> incarnation). The failure detector
says which peers it hears now (`alive`) and the last incarnation it ever heard from each (`heard`). A
registered server that is not alive is declared down (`DeclareDown`), which frees everything its
incarnation held. A wrong declaration fences a live server (it drops its clients and rejoins), so the
policy declares only when its own view can be trusted:

1. Only the coordinator declares; every server still tracks its majority (rule 3) so a new coordinator
   can act at once.
2. Not within `grace_s` of this server's own start: its links are still connecting.
3. Only once it has heard a majority of the configuration without a break for `grace_s`: a coordinator
   cut off on a minority side sees everyone else silent, and a declaration it queued would commit once
   the partition heals and fence the healthy majority (just after healing, links are still reconnecting).
   A break is also a moment when fewer than a majority were heard *recently* (`heard_recently`): the
   failure detector's `alive` lags a cut-off by its whole window, so a coordinator cut off for a little
   less than that window kept a majority "alive" throughout, and declared the majority-side peer whose
   silence happened to reach the window just after the heal (found by the cluster simulation).
   And only once a majority of the configuration (itself included) has *followed* it (their latest
   heartbeats name it as coordinator) without a break for `follow_confirm_s`, one heartbeat interval: a
   server cut off alone for a little less than the failure window declares its coordinator down just as
   the partition heals, elects itself, and the members that accept it flip back to the live coordinator
   within a round trip, before their next beat. In that moment the two rules above still held (a member
   on the mesh schedule shows no break), and the declaration it queued fenced the live coordinator (found
   by the cluster simulation). A coordinator that has led for a while is followed since long ago and
   declares at once. The time counts from when the majority-th follower began following (the caller
   tracks since when each has), and `confirmation_due` tells the caller when to decide again.
4. Only while its registry replica has a Raft quorum.
5. Never itself, never a server it hears.
6. An incarnation the detector has never heard (a server that has just announced itself, its links still
   connecting) gets `unheard_grace_s` from when the policy first saw it registered and unheard. Every
   server tracks this on every call, coordinator or not, so a new coordinator does not start the wait
   over.
7. One declaration per (server, incarnation) per `redeclare_after_s`: the caller submits it to the
   registry, and a declaration still in flight is not repeated; one that did not commit is, at the next
   decision after the caller reports it failed (`declaration_failed`), or after `redeclare_after_s`.

States: when the majority was last continuously heard since, the first time each unheard incarnation was
seen, the last declaration of each (server, incarnation). All bounded by the configuration's size: entries
for incarnations no longer registered are dropped on every call.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DeclareDown:
    server: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MembershipView:
    """What the caller observed at `now`."""

    now: float
    is_coordinator: bool
    alive: Collection[str]  # servers the failure detector hears now, this one included
    heard: Mapping[str, int]  # the last incarnation heard from each peer ever heard
    registered: Mapping[str, int]  # servers the registry lists as up, with their incarnation
    has_quorum: bool
    # Servers heard within the last fraction of a failure window, this one included; None: use `alive`.
    heard_recently: Collection[str] | None = None
    # Since when each server has followed this one without a break (its heartbeats name this one as their
    # coordinator; this one itself since it coordinates), on the clock of `now`; None: not tracked, every
    # server alive counts as following since ever.
    followers: Mapping[str, float] | None = None


class MembershipPolicy:
    def __init__(
        self,
        self_id: str,
        cluster_size: int,
        started_at: float,
        grace_s: float,
        redeclare_after_s: float,
        unheard_grace_s: float | None = None,
        follow_confirm_s: float = 0.0,
    ) -> None:
        assert cluster_size >= 1 and grace_s >= 0 and redeclare_after_s > 0 and follow_confirm_s >= 0
        self.self_id = self_id
        self.majority = cluster_size // 2 + 1
        self.started_at = started_at
        self.grace_s = grace_s
        self.redeclare_after_s = redeclare_after_s
        self.unheard_grace_s = grace_s if unheard_grace_s is None else unheard_grace_s
        self.follow_confirm_s = follow_confirm_s
        self._majority_since: float | None = None
        self._confirmed_at: float | None = None  # when the majority following this coordinator is confirmed
        self._unheard_since: dict[tuple[str, int], float] = {}
        self._declared_at: dict[tuple[str, int], float] = {}

    def confirmation_due(self, now: float) -> float | None:
        """When the majority following this coordinator will have done so for `follow_confirm_s`, if that is
        still ahead: the caller decides again then rather than at its next tick, so a failover's
        declarations wait the confirmation and no more."""
        due = self._confirmed_at
        return due if due is not None and due > now else None

    def declaration_failed(self, decision: DeclareDown) -> None:
        """The registry refused or lost `decision` (e.g. the Raft leader changed): decide it again."""
        self._declared_at.pop((decision.server, decision.incarnation), None)

    def decide(self, view: MembershipView) -> list[DeclareDown]:
        """The servers to declare down now, in sorted order."""
        now = view.now
        recent = view.alive if view.heard_recently is None else view.heard_recently
        if len(view.alive) < self.majority or len(recent) < self.majority:
            self._majority_since = None
        elif self._majority_since is None:
            self._majority_since = now
        self._confirmed_at = None
        if view.is_coordinator:
            if view.followers is None:
                self._confirmed_at = float("-inf") if len(view.alive) >= self.majority else None
            elif len(view.followers) >= self.majority:
                # The moment the majority-th follower joined, plus the confirmation.
                self._confirmed_at = sorted(view.followers.values())[self.majority - 1] + self.follow_confirm_s
        registered = view.registered
        self._unheard_since = {k: t for k, t in self._unheard_since.items() if registered.get(k[0]) == k[1]}
        self._declared_at = {k: t for k, t in self._declared_at.items() if registered.get(k[0]) == k[1]}
        for server, incarnation in registered.items():
            if server != self.self_id and view.heard.get(server, -1) < incarnation:
                self._unheard_since.setdefault((server, incarnation), now)
        if not view.is_coordinator or now - self.started_at < self.grace_s:
            return []
        if self._majority_since is None or now - self._majority_since < self.grace_s or not view.has_quorum:
            return []
        if self._confirmed_at is None or now < self._confirmed_at:
            return []
        decisions: list[DeclareDown] = []
        for server in sorted(registered):
            incarnation = registered[server]
            if server == self.self_id or server in view.alive:
                continue
            key = (server, incarnation)
            if view.heard.get(server, -1) < incarnation and now - self._unheard_since[key] < self.unheard_grace_s:
                continue
            last = self._declared_at.get(key)
            if last is not None and now - last < self.redeclare_after_s:
                continue
            self._declared_at[key] = now
            decisions.append(DeclareDown(server, incarnation))
        return decisions
