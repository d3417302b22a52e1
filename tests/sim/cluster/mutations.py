"""Bugs this project once fixed, re-introduced on demand, to show the simulation finds them.

Each mutation patches the production code for the length of a `with mutated(name)` block and nothing
else: the simulation runs the real code with exactly that bug back in. The patched methods are the
production methods as they were before the fix (from `git log -p node/app.py`), not models of them.

- `reconciler-pairing` (fixed in 6f42e0b): the reconciler zipped its orphan commands with a *set* of their
  keys, so a command was issued when some other command's key had been a suspect in the previous pass:
  an entry orphaned for only one pass (a session that just ended) was released by a command built from a
  stale view, which can land after the name was claimed again on the same server. A set's order depends
  on string hashing; the mutation pairs with the keys in sorted order instead, which is as wrong and
  replays the same in every process.
- `minority-server-down` (fixed in 637cc99): the membership loop declared every silent server down
  without checking that its replica had a Raft quorum and that it had heard a majority: a coordinator cut
  off on a minority side queued "server down" for the whole majority, which committed when the partition
  healed and fenced the healthy servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from unittest import mock

from node import app
from node.app import Node
from registry import state as rs
from registry.replicated import RegistryUnavailable


async def _reconcile_loop_with_pairing_bug(self: Node) -> None:
    suspects: set[tuple[str, str]] = set()
    while True:
        await asyncio.sleep(app.RECONCILE_INTERVAL_S)
        if not self.serving:
            continue
        commands = self.directory.orphans(self.chat.local_identities(), self.chat.local_room_ids(), time.time())
        keys = {(type(c).__name__, getattr(c, "identity", getattr(c, "room_id", ""))) for c in commands}
        for command, key in zip(commands, sorted(keys), strict=False):
            if key in suspects:
                await self.directory.request(command)
        suspects = keys


async def _membership_loop_without_quorum_check(self: Node) -> None:
    while True:
        await asyncio.sleep(app.MEMBERSHIP_INTERVAL_S)
        if not self.election.is_coordinator or self.loop.time() - self.started_at < app.STARTUP_GRACE_S:
            continue
        alive = self.election.servers_up
        for server, incarnation in self.registry.servers_up().items():
            if server == self.server_id or server in alive:
                continue
            command = rs.ServerDown(self.directory.next_request_id(), server, incarnation)
            with contextlib.suppress(RegistryUnavailable):
                await self.registry.submit(command, app.ANNOUNCE_TIMEOUT_S)


def _patch(name: str, replacement: object) -> Callable[[], contextlib.AbstractContextManager[object]]:
    return lambda: mock.patch.object(Node, name, replacement)


MUTATIONS: dict[str, Callable[[], contextlib.AbstractContextManager[object]]] = {
    "reconciler-pairing": _patch("_reconcile_loop", _reconcile_loop_with_pairing_bug),
    "minority-server-down": _patch("_membership_loop", _membership_loop_without_quorum_check),
}


@contextlib.contextmanager
def mutated(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    with MUTATIONS[name]():
        yield
