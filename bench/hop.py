"""The bare loopback hop: the least a request costs to cross one asyncio process and come back.

    python -m bench.hop --port P [--forward PORT]

A process that reads newline-delimited JSON on 127.0.0.1:P and answers each line: parsed and dumped again
(`json.loads` + `json.dumps`, the least any chat or coordination hop does with a line), one write per
line. With `--forward`, each connection opens one connection to 127.0.0.1:PORT (another hop process) and
relays every line there and every reply back, so client -> relay -> echo -> relay -> client has the shape
of a claim from a non-coordinator (client -> its server -> the coordinator and back) without a commit.

`HopFloor` (used by bench.approval) starts an echo and a relay process with the environment the chat
servers get (`CHATMESH_EVENT_LOOP=uvloop` runs them on uvloop too) and times sequential round trips from
the bench's own loop: one hop (client <-> echo) and two hops (client <-> relay <-> echo).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Bound on one line, like every other line this project reads.
MAX_LINE_BYTES = 1 << 16
EVENT_LOOP_ENV = "CHATMESH_EVENT_LOOP"
START_TIMEOUT_S = 15.0


def answer(line: bytes) -> bytes:
    message = json.loads(line)
    message["ok"] = True
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def serve_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(answer(line))
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def serve_relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream_port: int) -> None:
    """Every line to the upstream hop (parsed and dumped on the way, as a server would), every reply back;
    TCP keeps both directions in order, so no request ids are needed."""
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port, limit=MAX_LINE_BYTES)

    async def back() -> None:
        while line := await up_reader.readline():
            writer.write(answer(line))

    replies = asyncio.get_running_loop().create_task(back())
    try:
        while line := await reader.readline():
            up_writer.write(answer(line))
    except (ConnectionError, ValueError):
        pass
    finally:
        replies.cancel()
        up_writer.close()
        writer.close()


async def run(port: int, forward: int | None) -> None:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if forward is None:
            await serve_echo(reader, writer)
        else:
            await serve_relay(reader, writer, forward)

    server = await asyncio.start_server(on_client, "127.0.0.1", port, limit=MAX_LINE_BYTES)
    async with server:
        print(f"hop on 127.0.0.1:{port}" + (f" -> {forward}" if forward else ""), flush=True)
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--forward", type=int, help="relay every line to this port on 127.0.0.1")
    args = parser.parse_args(argv)
    if os.environ.get(EVENT_LOOP_ENV) == "uvloop":
        import uvloop  # type: ignore[import-not-found]

        uvloop.run(run(args.port, args.forward))
    else:
        asyncio.run(run(args.port, args.forward))
    return 0


class HopFloor:
    """An echo process and a relay in front of it, and the bench's sequential round trips through them."""

    def __init__(self, procs: object, echo_port: int, relay_port: int) -> None:
        self.procs = procs
        self.echo_port = echo_port
        self.relay_port = relay_port
        self.pids: list[int] = []
        self._streams: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    async def round_trips(self, hops: int, count: int) -> list[float]:
        """`count` sequential request/reply exchanges through `hops` (1: echo, 2: relay -> echo), in ms."""
        port = self.echo_port if hops == 1 else self.relay_port
        if port not in self._streams:
            self._streams[port] = await asyncio.open_connection("127.0.0.1", port, limit=MAX_LINE_BYTES)
        reader, writer = self._streams[port]
        ms: list[float] = []
        for i in range(count):
            line = json.dumps({"type": "newidentity", "identity": f"hop{i}"}, separators=(",", ":")).encode()
            started = time.perf_counter()
            writer.write(line + b"\n")
            reply = await reader.readline()
            ms.append((time.perf_counter() - started) * 1000.0)
            if not reply:
                raise ConnectionError("hop process closed the connection")
        return ms

    async def connect_cycles(self, count: int) -> list[float]:
        """`count` times: connect to the echo, one exchange, close (what a login cycle does besides its
        commits), timed from the connect to the reply, in ms."""
        ms: list[float] = []
        line = json.dumps({"type": "newidentity", "identity": "hop"}, separators=(",", ":")).encode() + b"\n"
        for _ in range(count):
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", self.echo_port, limit=MAX_LINE_BYTES)
            writer.write(line)
            reply = await reader.readline()
            ms.append((time.perf_counter() - started) * 1000.0)
            writer.transport.abort()
            if not reply:
                raise ConnectionError("hop process closed the connection")
        return ms

    async def close(self) -> None:
        for _, writer in self._streams.values():
            writer.close()
        self._streams.clear()


@contextlib.contextmanager
def hop_processes(env: dict[str, str] | None = None) -> Iterator[HopFloor]:
    """An echo and a relay process (killed on exit), started like the chat servers (same environment)."""
    from tests.support import PYTHON, Processes, free_ports, port_open, wait_until

    echo_port, relay_port = free_ports(2)
    with tempfile.TemporaryDirectory(prefix="bench-hop-") as tmp, Processes() as procs:
        procs.start("echo", [PYTHON, "-m", "bench.hop", "--port", str(echo_port)], Path(tmp), env=env)
        wait_until(lambda: port_open("127.0.0.1", echo_port), START_TIMEOUT_S, 0.02, "the echo hop")
        relay = [PYTHON, "-m", "bench.hop", "--port", str(relay_port), "--forward", str(echo_port)]
        procs.start("relay", relay, Path(tmp), env=env)
        wait_until(lambda: port_open("127.0.0.1", relay_port), START_TIMEOUT_S, 0.02, "the relay hop")
        floor = HopFloor(procs, echo_port, relay_port)
        floor.pids = [int(p.pid) for p in procs.procs.values()]
        yield floor


if __name__ == "__main__":
    sys.exit(main())
