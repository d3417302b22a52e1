"""The bare heartbeat hub: the least the coordinator's side of the star heartbeat schedule costs.

    python -m bench.beat_hub --peers 23 [--interval 0.1] [--window 10] [--own-ticks]

Two processes on loopback, with no protocol logic: a hub that writes one heartbeat line to each of its
peers every `--interval` seconds (one timer, one write per peer) and parses every line it reads
(`json.loads`, the least any hop does with a line; bench/hop.py), and one process holding all the peers'
connections. By default each peer answers every hub beat at once, as members answer their coordinator's
beat (bully/node.py, "Members answer the coordinator's beat"); with `--own-ticks` each peer beats on its
own timer at a random phase instead, the schedule before that change. The lines are the size of a real
sealed heartbeat frame. The hub's CPU over the window, from /proc, is the floor for what the coordinator
spends on heartbeats at this cluster size on this machine: no HMAC, no detector, no election, only the
sockets, the event loop's wake-ups and one JSON parse per line.

`hub_floor` is what `bench.scale` runs beside each cluster size, so the coordinator's idle CPU can be read
against the bare floor of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from typing import Any

from bench.common import proc_cpu_s
from tests.support import free_ports, port_open, wait_until

HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0
WARM_UP_S = 1.0
# A heartbeat frame as the coordination channel carries it: {"a": <64 hex digits>, "p": <payload text>}.
_PAYLOAD = json.dumps(
    {
        "t": "n",
        "m": {"type": "heartbeat", "sender": "s01", "epoch": 12, "incarnation": 1764250000000, "coordinator": "s24"},
        "from": "s01",
        "to": "s24",
        "sid": "0123456789abcdef0123456789abcdef",
        "seq": 123456,
        "ts": 1764250000.123456,
    },
    separators=(",", ":"),
)
BEAT = json.dumps({"a": "0" * 64, "p": _PAYLOAD}, separators=(",", ":")).encode() + b"\n"


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Lines(asyncio.Protocol):
    """Parse every line read; `on_line` after each."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._partial = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            json.loads(line)
            self.on_line()

    def on_line(self) -> None:
        pass


async def run_hub(port: int, interval_s: float) -> None:
    peers: list[_Lines] = []

    def accept() -> _Lines:
        peer = _Lines()
        peers.append(peer)
        return peer

    loop = asyncio.get_running_loop()
    server = await loop.create_server(accept, HOST, port)

    def beat() -> None:
        for peer in peers:
            if peer.transport is not None and not peer.transport.is_closing():
                peer.transport.write(BEAT)
        loop.call_later(interval_s, beat)

    beat()
    async with server:
        await server.serve_forever()


class _Peer(_Lines):
    def __init__(self, interval_s: float, own_ticks: bool) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.own_ticks = own_ticks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.own_ticks:
            asyncio.get_running_loop().call_later(random.random() * self.interval_s, self._tick)

    def _tick(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(BEAT)
            asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def on_line(self) -> None:
        if not self.own_ticks and self.transport is not None:
            self.transport.write(BEAT)


async def run_peers(port: int, count: int, interval_s: float, own_ticks: bool) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(count):
        await loop.create_connection(lambda: _Peer(interval_s, own_ticks), HOST, port)
    print("connected", flush=True)  # hub_floor waits for this line
    await asyncio.Event().wait()


def hub_floor(peers: int, interval_s: float, window_s: float, own_ticks: bool = False) -> dict[str, Any]:
    """Start a bare hub and `peers` peers, let them settle for two intervals' worth of beats, and measure the
    hub's CPU over `window_s`: a share of one core, in percent."""
    (port,) = free_ports(1)
    base = [sys.executable, "-m", "bench.beat_hub", "--port", str(port), "--interval", str(interval_s)]
    hub = subprocess.Popen([*base, "--serve-hub"])
    crowd: subprocess.Popen[bytes] | None = None
    try:
        # The hub's first connection is this readiness probe: it gets beats too, and closes at once.
        wait_until(lambda: port_open(HOST, port), START_TIMEOUT_S, 0.05, f"the bare hub listening on {port}")
        crowd = subprocess.Popen(
            [*base, "--serve-peers", str(peers), *(["--own-ticks"] if own_ticks else [])], stdout=subprocess.PIPE
        )
        assert crowd.stdout is not None
        ready, _, _ = select.select([crowd.stdout], [], [], START_TIMEOUT_S)
        if not ready or crowd.stdout.readline().strip() != b"connected":
            raise RuntimeError(f"the {peers} peers did not connect within {START_TIMEOUT_S}s")
        time.sleep(WARM_UP_S)  # every peer connected: let the beats find their phases before measuring
        cpu0, t0 = proc_cpu_s(hub.pid), time.monotonic()
        time.sleep(window_s)
        cpu1, t1 = proc_cpu_s(hub.pid), time.monotonic()
    finally:
        for proc in (crowd, hub):
            if proc is not None:
                proc.kill()
                proc.wait()
    return {
        "peers": peers,
        "interval_s": interval_s,
        "schedule": "own ticks" if own_ticks else "answers",
        "hub_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
        "window_s": window_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=23)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between two beats of the hub")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of CPU measurement")
    parser.add_argument("--own-ticks", action="store_true", help="peers beat on their own timers")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-hub", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-peers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_hub:
        asyncio.run(run_hub(args.port, args.interval))
        return 0
    if args.serve_peers is not None:
        asyncio.run(run_peers(args.port, args.serve_peers, args.interval, args.own_ticks))
        return 0
    result = hub_floor(args.peers, args.interval, args.window, args.own_ticks)
    print(json.dumps({**result, "load_avg_1m": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
