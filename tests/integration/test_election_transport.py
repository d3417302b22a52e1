"""The coordination transport over real loopback sockets: request/response, notifications, authentication,
replay rejection, reconnection, bounds and throughput."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bully.transport import RequestFailed, TcpTransport, seal, unseal
from cluster.config import ClusterConfig, load_config
from cluster.framing import LineDecoder
from tests.support import eventually, run_bounded, write_config

SECRET = b"transport-test-secret"
TIMEOUT_S = 20.0


def cluster(tmp_path: Path, count: int = 3) -> ClusterConfig:
    return load_config(write_config(tmp_path, count))


def run(main: Callable[[], Awaitable[None]]) -> None:
    run_bounded(main, TIMEOUT_S)




async def started(config: ClusterConfig, *ids: str, secret: bytes = SECRET) -> list[TcpTransport]:
    transports = [TcpTransport(config, i, secret) for i in ids]
    for t in transports:
        await t.start()
    return transports


async def echo(sender: str, message: dict[str, Any]) -> dict[str, Any]:
    return {"echo": message["n"], "sender": sender}


def test_requests_get_their_replies_many_in_flight(tmp_path: Path) -> None:
    config = cluster(tmp_path)

    async def main() -> None:
        a, b = await started(config, "s1", "s2")
        try:
            b.on_request("echo", echo)
            replies = await asyncio.gather(*(a.request("s2", {"kind": "echo", "n": i}, 5.0) for i in range(200)))
            assert replies == [{"echo": i, "sender": "s1"} for i in range(200)]
        finally:
            await a.close()
            await b.close()

    run(main)


def test_handler_errors_and_unknown_kinds_become_request_failures(tmp_path: Path) -> None:
    config = cluster(tmp_path)

    async def boom(sender: str, message: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("no such thing")

    async def main() -> None:
        a, b = await started(config, "s1", "s2")
        try:
            b.on_request("boom", boom)
            with pytest.raises(RequestFailed, match="KeyError"):
                await a.request("s2", {"kind": "boom"}, 5.0)
            with pytest.raises(RequestFailed, match="no handler"):
                await a.request("s2", {"kind": "nope"}, 5.0)
            with pytest.raises(RequestFailed, match="unknown server"):
                await a.request("s9", {"kind": "echo"}, 5.0)
        finally:
            await a.close()
            await b.close()

    run(main)


def test_a_slow_handler_times_out_as_request_failed(tmp_path: Path) -> None:
    config = cluster(tmp_path)

    async def slow(sender: str, message: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(30)
        return {}

    async def main() -> None:
        a, b = await started(config, "s1", "s2")
        try:
            b.on_request("slow", slow)
            begun = time.monotonic()
            with pytest.raises(RequestFailed, match="no reply"):
                await a.request("s2", {"kind": "slow"}, 0.2)
            assert time.monotonic() - begun < 2.0
        finally:
            await a.close()
            await b.close()

    run(main)


def test_notifications_arrive_with_the_authenticated_sender(tmp_path: Path) -> None:
    config = cluster(tmp_path)

    async def main() -> None:
        a, b, c = await started(config, "s1", "s2", "s3")
        got: list[tuple[str, dict[str, Any]]] = []
        b.on_notify(lambda sender, message: got.append((sender, message)))
        try:
            a.broadcast({"kind": "hello", "n": 1})
            c.send("s2", {"kind": "hello", "n": 2})
            await eventually(lambda: len(got) == 2, what="two notifications")
            assert sorted(got, key=lambda g: g[0]) == [
                ("s1", {"kind": "hello", "n": 1}),
                ("s3", {"kind": "hello", "n": 2}),
            ]
            assert a.send("s9", {"kind": "x"}) is False
        finally:
            for t in (a, b, c):
                await t.close()

    run(main)


FORGER = r"""
import json, socket, sys, time, hmac, hashlib
host, port = sys.argv[1], int(sys.argv[2])
def seal(key, payload):
    text = json.dumps(payload)
    return (json.dumps({"a": hmac.new(key, text.encode(), hashlib.sha256).hexdigest(), "p": text}) + "\n").encode()
s = socket.create_connection((host, port), timeout=5)
wrong = b"not-the-cluster-secret"
s.sendall(seal(wrong, {"t": "hello", "from": "s2", "to": "s1", "nonce": "00", "ts": time.time()}))
s.sendall(seal(wrong, {"t": "n", "from": "s2", "to": "s1", "sid": "00", "seq": 1, "ts": time.time(),
                       "m": {"kind": "coordinator", "sender": "s2", "epoch": 99}}))
try:
    print("closed" if s.recv(100) == b"" else "answered")
except OSError:
    print("closed")
"""


def test_a_process_without_the_secret_is_rejected(tmp_path: Path) -> None:
    config = cluster(tmp_path)

    async def main() -> None:
        (a,) = await started(config, "s1")
        got: list[Any] = []
        a.on_notify(lambda sender, message: got.append(message))
        try:
            me = config.server("s1")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", FORGER, me.host, str(me.coordination_port), stdout=subprocess.PIPE
            )
            out, _ = await proc.communicate()
            assert out.decode().strip() == "closed"
            # A transport configured with another secret gets nowhere either.
            (intruder,) = await started(config, "s2", secret=b"wrong")
            intruder.send("s1", {"kind": "coordinator", "sender": "s2", "epoch": 99})
            await asyncio.sleep(0.3)  # absence can only be checked by waiting a little
            await intruder.close()
            assert got == []
        finally:
            await a.close()

    run(main)


async def handshake(host: str, port: int, me: str, peer: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Complete a legitimate handshake by hand (a peer that knows the secret, or a recording of one)."""
    reader, writer = await asyncio.open_connection(host, port)
    nonce = secrets.token_hex(16)  # fresh, as a real peer's: a repeated hello is refused as a replay
    writer.write(seal(SECRET, {"t": "hello", "from": me, "to": peer, "nonce": nonce, "ts": time.time()}))
    line = await reader.readline()
    hello = unseal(SECRET, line.rstrip(b"\n"))
    return reader, writer, nonce + hello["nonce"]


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(100), 5.0) == b""
    except ConnectionError:
        return True


def test_replayed_frames_are_rejected(tmp_path: Path) -> None:
    config = cluster(tmp_path)

    async def main() -> None:
        (a,) = await started(config, "s1")
        got: list[dict[str, Any]] = []
        a.on_notify(lambda sender, message: got.append(message))
        me = config.server("s1")
        try:
            reader, writer, sid = await handshake(me.host, me.coordination_port, "s2", "s1")
            frame = seal(
                SECRET,
                {"t": "n", "from": "s2", "to": "s1", "sid": sid, "seq": 1, "ts": time.time(), "m": {"kind": "x"}},
            )
            writer.write(frame)
            await eventually(lambda: len(got) == 1, what="the genuine frame")
            writer.write(frame)  # the same frame again on the same connection: counter check
            assert await closed_by_peer(reader)
            writer.close()
            # The recording replayed on a fresh connection: the session id no longer matches.
            reader, writer, _ = await handshake(me.host, me.coordination_port, "s2", "s1")
            writer.write(frame)
            assert await closed_by_peer(reader)
            writer.close()
            # A frame reflected back with from/to swapped does not verify as the other direction either.
            assert len(got) == 1
            # And a tampered payload under the original MAC is refused.
            reader, writer, sid = await handshake(me.host, me.coordination_port, "s2", "s1")
            good = json.loads(
                seal(SECRET, {"t": "n", "from": "s2", "to": "s1", "sid": sid, "seq": 1, "ts": time.time(), "m": {}})
            )
            good["p"] = good["p"].replace("{}", '{"kind":"evil"}')
            writer.write(json.dumps(good).encode() + b"\n")
            assert await closed_by_peer(reader)
            writer.close()
            assert got == [{"kind": "x"}]
        finally:
            await a.close()

    run(main)


def test_garbage_and_overlong_lines_are_dropped_without_harm(tmp_path: Path) -> None:
    config = cluster(tmp_path)

    async def main() -> None:
        a, b = await started(config, "s1", "s2")
        b.on_request("echo", echo)
        me = config.server("s2")
        try:
            for junk in (b"\xff\xfe not json\n", b"[1,2,3]\n", b'{"a": 1}\n', b"x" * 200_000):
                reader, writer = await asyncio.open_connection(me.host, me.coordination_port)
                writer.write(junk)
                assert await closed_by_peer(reader)
                writer.close()
            assert await a.request("s2", {"kind": "echo", "n": 5}, 5.0) == {"echo": 5, "sender": "s1"}
        finally:
            await a.close()
            await b.close()

    run(main)


def test_a_peer_that_restarts_is_reconnected_and_requests_fail_fast_meanwhile(tmp_path: Path) -> None:
    config = cluster(tmp_path)

    async def main() -> None:
        a, b = await started(config, "s1", "s2")
        b.on_request("echo", echo)
        try:
            assert await a.request("s2", {"kind": "echo", "n": 1}, 5.0) == {"echo": 1, "sender": "s1"}
            await b.close()
            await eventually(lambda: "s2" not in a.connected, what="the connection drop")
            begun = time.monotonic()
            with pytest.raises(RequestFailed):
                await a.request("s2", {"kind": "echo", "n": 2}, 5.0)
            assert time.monotonic() - begun < 4.0
            (b,) = await started(config, "s2")
            b.on_request("echo", echo)
            await eventually(lambda: "s2" in a.connected, timeout=5.0, what="reconnection")
            assert await a.request("s2", {"kind": "echo", "n": 3}, 5.0) == {"echo": 3, "sender": "s1"}
        finally:
            await a.close()
            await b.close()

    run(main)


def test_the_queue_to_an_unreachable_peer_is_bounded(tmp_path: Path) -> None:
    config = cluster(tmp_path)

    async def main() -> None:
        a = TcpTransport(config, "s1", SECRET, max_queue=10)
        await a.start()
        try:
            for i in range(25):
                assert a.send("s2", {"kind": "x", "n": i})
            assert a.frames_dropped == 15
        finally:
            await a.close()

    run(main)


def test_it_serves_thousands_of_small_requests_per_second(tmp_path: Path) -> None:
    config = cluster(tmp_path)

    async def main() -> None:
        a, b = await started(config, "s1", "s2")
        b.on_request("echo", echo)
        try:
            await a.request("s2", {"kind": "echo", "n": 0}, 5.0)  # connected
            total, in_flight = 6000, 300
            begun = time.perf_counter()
            for batch in range(0, total, in_flight):
                numbers = range(batch, batch + in_flight)
                await asyncio.gather(*(a.request("s2", {"kind": "echo", "n": i}, 10.0) for i in numbers))
            rate = total / (time.perf_counter() - begun)
            print(f"transport: {rate:.0f} requests/s on loopback")
            assert rate > 2000
        finally:
            await a.close()
            await b.close()

    run(main)


def test_the_line_decoder_limit_matches_the_transport_frame_limit() -> None:
    # A frame the transport accepts to send must fit the decoder the receiver uses.
    from bully import transport as t

    assert LineDecoder().max_line_bytes == t.MAX_LINE_BYTES
