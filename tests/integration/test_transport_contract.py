"""One contract, two transports: the same suite runs against `TcpTransport` over real loopback sockets and
`MemoryTransport`, so the in-memory twin the simulations use cannot drift from the real thing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bully.memory_transport import MemoryNetwork, MemoryTransport
from bully.transport import RequestFailed, TcpTransport, Transport
from cluster.config import load_config
from tests.support import eventually, run_bounded, write_config

SECRET = b"contract-test-secret"
TIMEOUT_S = 20.0

Factory = Callable[[str], Transport]


@pytest.fixture(params=["tcp", "memory"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Factory]:
    """A function, called inside the test's loop, returning a factory of transports s1..s3."""
    config = load_config(write_config(tmp_path, 3))

    def factory() -> Factory:
        if request.param == "tcp":
            return lambda sid: TcpTransport(config, sid, SECRET)
        network = MemoryNetwork(delay=lambda src, dst: 0.001)
        loop = asyncio.get_running_loop()
        return lambda sid: MemoryTransport(network, sid, list(config.ids), loop)

    return factory


def run(main: Callable[[], Awaitable[None]]) -> None:
    run_bounded(main, TIMEOUT_S)




async def started(factory: Factory, *ids: str) -> list[Transport]:
    transports = [factory(i) for i in ids]
    for t in transports:
        await t.start()
    return transports


async def closed(*transports: Transport) -> None:
    for t in transports:
        await t.close()


async def echo(sender: str, message: dict[str, Any]) -> dict[str, Any]:
    return {"echo": message["n"], "sender": sender}


def test_a_request_gets_its_reply_naming_the_real_sender(make: Callable[[], Factory]) -> None:
    async def main() -> None:
        a, b = await started(make(), "s1", "s2")
        b.on_request("echo", echo)
        try:
            replies = await asyncio.gather(*(a.request("s2", {"kind": "echo", "n": i}, 5.0) for i in range(20)))
            assert replies == [{"echo": i, "sender": "s1"} for i in range(20)]
        finally:
            await closed(a, b)

    run(main)


def test_notifications_reach_every_handler_in_the_order_sent(make: Callable[[], Factory]) -> None:
    async def main() -> None:
        a, b, c = await started(make(), "s1", "s2", "s3")
        got: dict[str, list[tuple[str, int]]] = {"s2": [], "s3": [], "s2-second": []}
        b.on_notify(lambda sender, m: got["s2"].append((sender, m["n"])))
        b.on_notify(lambda sender, m: got["s2-second"].append((sender, m["n"])))
        c.on_notify(lambda sender, m: got["s3"].append((sender, m["n"])))
        try:
            for i in range(50):
                a.broadcast({"kind": "x", "n": i})
            assert a.send("s2", {"kind": "x", "n": 50})
            await eventually(lambda: len(got["s2"]) == 51 and len(got["s3"]) == 50, what="every notification")
            assert got["s2"] == got["s2-second"] == [("s1", i) for i in range(51)]
            assert got["s3"] == [("s1", i) for i in range(50)]
        finally:
            await closed(a, b, c)

    run(main)


def test_unknown_servers_are_refused_at_once(make: Callable[[], Factory]) -> None:
    async def main() -> None:
        (a,) = await started(make(), "s1")
        try:
            assert a.send("nobody", {"kind": "x"}) is False
            with pytest.raises(RequestFailed):
                await a.request("nobody", {"kind": "echo", "n": 1}, 1.0)
        finally:
            await closed(a)

    run(main)


def test_a_failing_or_missing_handler_fails_the_request(make: Callable[[], Factory]) -> None:
    async def main() -> None:
        a, b = await started(make(), "s1", "s2")

        async def broken(sender: str, message: dict[str, Any]) -> dict[str, Any]:
            raise ValueError("broken handler")

        b.on_request("broken", broken)
        b.on_request("echo", echo)
        try:
            with pytest.raises(RequestFailed, match="broken handler"):
                await a.request("s2", {"kind": "broken"}, 5.0)
            with pytest.raises(RequestFailed, match="no handler"):
                await a.request("s2", {"kind": "nothing-serves-this"}, 5.0)
            assert await a.request("s2", {"kind": "echo", "n": 7}, 5.0) == {"echo": 7, "sender": "s1"}
        finally:
            await closed(a, b)

    run(main)


def test_an_unanswered_request_fails_at_its_timeout(make: Callable[[], Factory]) -> None:
    async def main() -> None:
        a, b = await started(make(), "s1", "s2")
        never = asyncio.Event()

        async def silent(sender: str, message: dict[str, Any]) -> dict[str, Any]:
            await never.wait()
            return {}

        b.on_request("silent", silent)
        try:
            with pytest.raises(RequestFailed, match="no reply"):
                await a.request("s2", {"kind": "silent"}, 0.3)
        finally:
            await closed(a, b)

    run(main)


def test_a_request_fails_when_its_peer_goes_away(make: Callable[[], Factory]) -> None:
    async def main() -> None:
        a, b = await started(make(), "s1", "s2")
        entered = asyncio.Event()

        async def hangs(sender: str, message: dict[str, Any]) -> dict[str, Any]:
            entered.set()
            await asyncio.Event().wait()
            return {}

        b.on_request("hangs", hangs)
        b.on_request("echo", echo)
        try:
            await a.request("s2", {"kind": "echo", "n": 0}, 5.0)  # connected
            asking = asyncio.ensure_future(a.request("s2", {"kind": "hangs"}, 10.0))
            await entered.wait()
            await b.close()
            with pytest.raises(RequestFailed):
                await asking
            with pytest.raises(RequestFailed):
                await a.request("s2", {"kind": "echo", "n": 1}, 1.0)  # nobody listens there now
        finally:
            await closed(a)

    run(main)


def test_a_closed_transport_refuses_requests(make: Callable[[], Factory]) -> None:
    async def main() -> None:
        a, b = await started(make(), "s1", "s2")
        b.on_request("echo", echo)
        await a.close()
        try:
            with pytest.raises(RequestFailed):
                await a.request("s2", {"kind": "echo", "n": 1}, 1.0)
        finally:
            await closed(b)

    run(main)


def test_a_peer_that_goes_away_is_reported_lost_then_refused(make: Callable[[], Factory]) -> None:
    """The failure detector's certain evidence: our connection ended, and the reconnect found nobody."""

    async def main() -> None:
        a, b = await started(make(), "s1", "s2")
        events: list[tuple[str, str]] = []
        a.on_link_event(lambda peer, event: events.append((peer, event)))
        b.on_request("echo", echo)
        try:
            await a.request("s2", {"kind": "echo", "n": 0}, 5.0)  # connected
            await b.close()
            await eventually(lambda: ("s2", "refused") in events, what="the refused reconnect")
            assert events.index(("s2", "lost")) < events.index(("s2", "refused"))
        finally:
            await closed(a)

    run(main)
