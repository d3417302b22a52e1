"""Bugs this project once fixed, re-introduced on demand, to show the simulation finds them.

Each mutation patches the production code for the length of a `with mutated(name)` block and nothing
else: the simulation runs the real code with exactly that bug back in. The patched methods are the pure
policies (node/reconcile.py, node/membership.py) with the fix taken out again (`git log -p node/app.py`
shows the loops as they were).

- `reconciler-pairing` (fixed in 6f42e0b): the reconciler zipped its orphan commands with a *set* of their
  keys, so a command was issued when some other command's key had been a suspect in the previous pass:
  an entry orphaned for only one pass (a session that just ended) was released by a command built from a
  stale view, which can land after the name was claimed again on the same server. A set's order depends
  on string hashing; the mutation pairs with the keys in sorted order instead, which is as wrong and
  replays the same in every process.
- `reconciler-release-race` (found by the "outage" fault mix, fixed with it): the reconciler sent its
  identity releases straight to the directory, so a login of the same name on the same server did not
  wait for them; with no coordinator both waited, and when one appeared the claim could go first and the
  release, built when the name was an orphan, freed the new session's name.
- `minority-server-down` (fixed in 637cc99): the membership loop declared every silent server down
  without checking that its replica had a Raft quorum and that it had heard a majority: a coordinator cut
  off on a minority side queued "server down" for the whole majority, which committed when the partition
  healed and fenced the healthy servers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from unittest import mock

from cluster.names import Identity
from node.membership import DeclareDown, MembershipPolicy, MembershipView
from node.reconcile import Orphan, Reconciler
from node.server import ChatServer


def _review_with_pairing_bug(self: Reconciler, orphans: Iterable[Orphan]) -> list[Orphan]:
    """`Reconciler.review` as the loop was before 6f42e0b: each orphan paired with a key from a set."""
    found = list(orphans)
    keys = set(found)
    suspects = set(self._seen)
    release = [orphan for orphan, key in zip(found, sorted(keys, key=repr), strict=False) if key in suspects]
    self._seen = {key: 1 for key in keys}
    return release


async def _release_orphan_unordered(self: ChatServer, identity: Identity) -> None:
    """`ChatServer.release_orphan` as the reconciler's release was before: straight to the directory."""
    await self.directory.release_identity(identity)


def _decide_without_quorum_check(self: MembershipPolicy, view: MembershipView) -> list[DeclareDown]:
    """`MembershipPolicy.decide` as the loop was before 637cc99: rules 3 and 4 (a majority heard for the
    grace period, a Raft quorum) missing."""
    now = view.now
    registered = view.registered
    self._declared_at = {k: t for k, t in self._declared_at.items() if registered.get(k[0]) == k[1]}
    if not view.is_coordinator or now - self.started_at < self.grace_s:
        return []
    decisions: list[DeclareDown] = []
    for server in sorted(registered):
        incarnation = registered[server]
        if server == self.self_id or server in view.alive:
            continue
        key = (server, incarnation)
        last = self._declared_at.get(key)
        if last is not None and now - last < self.redeclare_after_s:
            continue
        self._declared_at[key] = now
        decisions.append(DeclareDown(server, incarnation))
    return decisions


MUTATIONS: dict[str, Callable[[], contextlib.AbstractContextManager[object]]] = {
    "reconciler-pairing": lambda: mock.patch.object(Reconciler, "review", _review_with_pairing_bug),
    "reconciler-release-race": lambda: mock.patch.object(ChatServer, "release_orphan", _release_orphan_unordered),
    "minority-server-down": lambda: mock.patch.object(MembershipPolicy, "decide", _decide_without_quorum_check),
}


@contextlib.contextmanager
def mutated(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    with MUTATIONS[name]():
        yield
