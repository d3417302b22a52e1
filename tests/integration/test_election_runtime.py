"""ElectionRuntime over real transports, several runtimes as tasks in one event loop: the public API the
node uses (coordinator, role, servers_up, incarnations, callbacks, operator trigger)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from bully.election import ElectionTimings
from bully.runtime import ElectionRuntime
from bully.transport import TcpTransport
from cluster.config import ClusterConfig, load_config
from tests.support import eventually, run_bounded, write_config

SECRET = b"runtime-test-secret"


# The runtime scenarios wait on real timers (T1 0.75 s, elections, reconnects).
WAIT_S = 10.0


def run(main: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    run_bounded(main, timeout)


class Server:
    """One server's transport + runtime, with every callback recorded."""

    def __init__(self, config: ClusterConfig, server_id: str, incarnation: int, can_lead: bool = True) -> None:
        self.transport = TcpTransport(config, server_id, SECRET)
        self.lead = can_lead
        self.changes: list[str | None] = []
        self.downs: list[tuple[str, int]] = []
        self.ups: list[tuple[str, int]] = []
        self.runtime = ElectionRuntime(
            config,
            server_id,
            self.transport,
            can_lead=lambda: self.lead,
            incarnation=incarnation,
            timings=ElectionTimings(),
            on_coordinator_change=self.changes.append,
            on_peer_down=lambda peer, inc, certain: self.downs.append((peer, inc)),
            on_peer_up=lambda peer, inc: self.ups.append((peer, inc)),
        )

    async def start(self) -> Server:
        await self.transport.start()
        await self.runtime.start()
        return self

    async def stop(self) -> None:
        await self.runtime.close()
        await self.transport.close()


def test_runtimes_in_one_loop_elect_fail_over_and_report_membership(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, 3))

    async def main() -> None:
        servers = {i: await Server(config, i, incarnation=100).start() for i in ("s1", "s2", "s3")}
        try:
            await eventually(lambda: all(s.runtime.coordinator == "s3" for s in servers.values()), WAIT_S, what="s3")
            s1, s3 = servers["s1"].runtime, servers["s3"].runtime
            assert s3.is_coordinator and s3.role == "coordinator" and s1.role == "member"
            await eventually(lambda: s1.servers_up == {"s1", "s2", "s3"}, WAIT_S, what="everyone up")
            assert s1.peer_incarnations == {"s2": 100, "s3": 100}
            assert ("s3", 100) in servers["s1"].ups

            await servers["s3"].stop()  # a crash, as far as the others can tell
            await eventually(lambda: s1.coordinator == "s2", WAIT_S, what="failover to s2")
            # s2 may detect the crash and announce itself before s1 has seen the evidence itself.
            await eventually(lambda: ("s3", 100) in servers["s1"].downs, WAIT_S, what="s3 down at s1")
            assert s1.servers_up == {"s1", "s2"}
            assert servers["s1"].changes[-1] == "s2"

            # It restarts as a new incarnation whose registry is not ready: it must not take over yet.
            servers["s3"] = await Server(config, "s3", incarnation=200, can_lead=False).start()
            await eventually(lambda: servers["s3"].runtime.coordinator == "s2", WAIT_S, what="s3 following s2")
            await eventually(lambda: s1.peer_incarnations.get("s3") == 200, WAIT_S, what="the new incarnation")
            assert s1.coordinator == "s2"
            servers["s3"].lead = True
            await eventually(
                lambda: all(s.runtime.coordinator == "s3" for s in servers.values()), WAIT_S, what="takeback"
            )

            # Operator trigger: an election that ends with the same coordinator at a newer epoch.
            before = (s1.elections, s1.epoch)
            s1.start_election()
            await eventually(lambda: s1.epoch > before[1] and s1.coordinator == "s3", WAIT_S, what="a newer epoch")
            assert s1.elections == before[0] + 1
        finally:
            for server in servers.values():
                await server.stop()

    run(main)


def test_a_malformed_or_impersonating_election_message_is_ignored(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, 2))

    async def main() -> None:
        s1 = await Server(config, "s1", incarnation=1).start()
        s2 = await Server(config, "s2", incarnation=1).start()
        try:
            await eventually(lambda: s1.runtime.coordinator == "s2" == s2.runtime.coordinator, WAIT_S, what="s2")
            s2.transport.send("s1", {"kind": "coordinator", "sender": "s2", "epoch": "many"})
            s2.transport.send("s1", {"kind": "election", "sender": "s1", "epoch": 50})
            s2.transport.send("s1", {"kind": "somebody-elses", "x": 1})
            await asyncio.sleep(0.3)  # absence of an effect can only be observed by waiting a little
            assert s1.runtime.coordinator == "s2" and s1.runtime.epoch < 50
        finally:
            await s1.stop()
            await s2.stop()

    run(main)
