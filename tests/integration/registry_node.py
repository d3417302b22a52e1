"""One ReplicatedRegistry in its own process, steered over a loopback control port (tests and bench).

    python tests/integration/registry_node.py --config FILE --id s1 --data-dir DIR --control-port P
        [--no-journal] [--timings JSON]      (the cluster secret comes from CHATMESH_SECRET)

Control protocol: one JSON object per line in, one per line out, on 127.0.0.1:P; each connection is served
in order, connections concurrently.
    {"op": "submit", "command": {...}, "timeout": 2.0}  -> {"ok": true, "result": {...}, "ms": 1.2}
                                                           | {"ok": false, "error": "timeout", "ms": ...}
    {"op": "status"}      -> raft_status() plus counts, applied_commands
    {"op": "snapshot"}    -> {"applied_commands": n, "state": RegistryState.to_dict()}
    {"op": "compact"}     -> forces log compaction (full dump + journal cut)
    {"op": "load", "count": N, "concurrency": C, "prefix": "x", "timeout": 2.0}
                          -> N claims from C concurrent writers, {"ms": [...], "errors": k}
The module also holds the harness the tests and the benchmark use: `RegistryNodes`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cluster.config import ClusterConfig, load_config
from registry import state as rs
from registry.codec import command_from_wire, command_to_wire
from registry.replicated import RaftTimings, RegistryUnavailable, ReplicatedRegistry

SECRET_ENV = "CHATMESH_SECRET"
# Bound on one control line, like every other line this project reads.
MAX_CONTROL_LINE_BYTES = 1 << 20

def result_to_wire(result: rs.Result) -> dict[str, Any]:
    return dataclasses.asdict(result)


# -- the node process ---------------------------------------------------------------------------------


class ControlServer:
    def __init__(self, registry: ReplicatedRegistry, port: int) -> None:
        self.registry = registry
        self.port = port
        self.stop = asyncio.Event()

    async def serve(self) -> None:
        server = await asyncio.start_server(self.on_client, "127.0.0.1", self.port, limit=MAX_CONTROL_LINE_BYTES)
        async with server:
            print(f"registry node {self.registry.server_id} control 127.0.0.1:{self.port}", flush=True)
            await self.stop.wait()

    async def on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply = await self.handle(json.loads(line))
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "submit":
            return await self.submit(command_from_wire(request["command"]), float(request.get("timeout", 2.0)))
        if op == "status":
            status = self.registry.raft_status()
            status["counts"] = self.registry.counts()
            status["applied_commands"] = self.registry.applied_commands()
            status["log_first_index"] = self.registry.log_first_index()
            status["pid"] = os.getpid()
            return status
        if op == "snapshot":
            return self.registry.snapshot()
        if op == "compact":
            self.registry.force_log_compaction()
            return {"ok": True}
        if op == "load":
            return await self.load(request)
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def submit(self, command: rs.Command, timeout: float) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            result = await self.registry.submit(command, timeout)
        except RegistryUnavailable as exc:
            return {"ok": False, "error": exc.reason, "ms": (time.perf_counter() - started) * 1000}
        return {"ok": True, "result": result_to_wire(result), "ms": (time.perf_counter() - started) * 1000}

    async def load(self, request: dict[str, Any]) -> dict[str, Any]:
        """`count` claims from `concurrency` writers, each timed from submit to applied result."""
        count, concurrency = int(request["count"]), int(request["concurrency"])
        prefix, timeout = str(request["prefix"]), float(request.get("timeout", 2.0))
        server, incarnation = str(request["server"]), int(request["incarnation"])
        latencies: list[float] = []
        errors = 0
        next_index = 0

        async def writer() -> None:
            nonlocal next_index, errors
            while next_index < count:
                i = next_index
                next_index += 1
                command = rs.ClaimIdentity(f"{prefix}-{i}", f"{prefix}{i}", server, incarnation)
                reply = await self.submit(command, timeout)
                if reply["ok"]:
                    latencies.append(reply["ms"])
                else:
                    errors += 1

        started = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for _ in range(concurrency):
                tasks.create_task(writer())
        return {"ms": latencies, "errors": errors, "wall_s": time.perf_counter() - started}


async def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        print(f"{SECRET_ENV} is not set", file=sys.stderr)
        return 2
    timings = RaftTimings(**json.loads(args.timings)) if args.timings else RaftTimings()
    registry = ReplicatedRegistry(config, args.id, Path(args.data_dir), secret, timings, journal=not args.no_journal)
    registry.start()
    control = ControlServer(registry, args.control_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, control.stop.set)
    try:
        await control.serve()
    finally:
        registry.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--no-journal", action="store_true")
    parser.add_argument("--timings", help="RaftTimings fields as a JSON object")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_run(parser.parse_args()))


# -- the harness (tests and bench) ------------------------------------------------------------------------


class Control:
    """A blocking client of one node's control port."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rwb")

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        line = self.file.readline()
        if not line:
            raise ConnectionError("control connection closed")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


class RegistryNodes:
    """N registry nodes as separate processes on loopback, each with its own data directory."""

    def __init__(self, root: Path, count: int, journal: bool = True, timings: dict[str, Any] | None = None) -> None:
        from tests.support import Processes, free_ports, write_config

        self.root = root
        self.config_path = write_config(root, count)
        self.config: ClusterConfig = load_config(self.config_path)
        self.ids: list[str] = [str(i) for i in self.config.ids]
        self.control_ports: dict[str, int] = dict(zip(self.ids, free_ports(count), strict=True))
        self.journal = journal
        self.timings = timings
        self.procs = Processes()
        self._controls: dict[str, Control] = {}

    def data_dir(self, server_id: str) -> Path:
        return self.root / "data" / server_id

    def start(self, server_id: str) -> None:
        from tests.support import PYTHON, TEST_SECRET

        self.drop_control(server_id)
        args = [
            PYTHON,
            str(Path(__file__).resolve()),
            "--config", str(self.config_path),
            "--id", server_id,
            "--data-dir", str(self.data_dir(server_id)),
            "--control-port", str(self.control_ports[server_id]),
        ]  # fmt: skip
        if not self.journal:
            args.append("--no-journal")
        if self.timings:
            args += ["--timings", json.dumps(self.timings)]
        self.procs.start(server_id, args, self.root, env={SECRET_ENV: TEST_SECRET})

    def start_all(self) -> None:
        for server_id in self.ids:
            self.start(server_id)

    def alive(self, server_id: str) -> bool:
        proc = self.procs.procs.get(server_id)
        return proc is not None and proc.poll() is None

    def control(self, server_id: str) -> Control:
        if not self.alive(server_id):
            raise AssertionError(f"{server_id} is not running:\n{self.procs.log(server_id)[-3000:]}")
        control = self._controls.get(server_id)
        if control is None:
            control = self._controls[server_id] = Control(self.control_ports[server_id])
        return control

    def drop_control(self, server_id: str) -> None:
        control = self._controls.pop(server_id, None)
        if control is not None:
            control.close()

    def call(self, server_id: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.control(server_id).call(request)
        except OSError:
            self.drop_control(server_id)
            raise

    def status(self, server_id: str) -> dict[str, Any]:
        return self.call(server_id, {"op": "status"})

    def snapshot(self, server_id: str) -> dict[str, Any]:
        return self.call(server_id, {"op": "snapshot"})

    def submit(self, server_id: str, command: rs.Command, timeout: float = 3.0) -> dict[str, Any]:
        return self.call(server_id, {"op": "submit", "command": command_to_wire(command), "timeout": timeout})

    def kill(self, server_id: str) -> None:
        self.drop_control(server_id)
        self.procs.kill(server_id)

    def live(self) -> list[str]:
        return [i for i in self.ids if self.alive(i)]

    def leader(self) -> str | None:
        """The leader every live node agrees on, once it is ready with a quorum; else None."""
        views = set()
        for server_id in self.live():
            status = self.status(server_id)
            if not (status["ready"] and status["quorum"]):
                return None
            views.add(status["leader"])
        return views.pop() if len(views) == 1 else None

    def wait_leader(self, timeout: float = 20.0) -> str:
        from tests.support import wait_until

        found: list[str] = []

        def agreed() -> bool:
            leader = self.leader()
            if leader is not None:
                found.append(leader)
            return leader is not None

        wait_until(agreed, timeout, 0.05, f"a ready leader agreed by {self.live()}")
        return found[-1]

    def wait_converged(self, server_ids: list[str] | None = None, timeout: float = 20.0) -> dict[str, Any]:
        """Every given node holds the same snapshot (same applied-command count and same state)."""
        from tests.support import wait_until

        ids = server_ids or self.live()
        found: list[dict[str, Any]] = []

        def same() -> bool:
            snapshots = [self.snapshot(i) for i in ids]
            if all(s == snapshots[0] for s in snapshots):
                found.append(snapshots[0])
                return True
            return False

        wait_until(same, timeout, 0.05, f"identical replicas on {ids}")
        return found[-1]

    def close(self) -> None:
        for server_id in list(self._controls):
            self.drop_control(server_id)
        self.procs.kill_all()

    def __enter__(self) -> RegistryNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
