"""`python -m node --config configuration.txt --id s1`: run one chatmesh server.

Exit status 2 with one readable line for bad configuration or missing secrets; 0 after a clean stop on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, load_config
from cluster.timings import ClusterTimings
from node import tls
from node.limits import Limits
from node.priority import CPU_NICE_ENV, apply_cpu_priority, describe, parse_cpu_priority
from node.websocket import ORIGINS_ENV

SECRET_ENV = "CHATMESH_SECRET"
# "coordinator" (default): Raft leadership follows the Fast Bully coordinator; "any": it stays where Raft put it.
RAFT_LEADER_ENV = "CHATMESH_RAFT_LEADER"
ADMIN_TOKEN_ENV = "CHATMESH_ADMIN_TOKEN"
EVENT_LOOP_ENV = "CHATMESH_EVENT_LOOP"
# asyncio's own loop, or uvloop's (pip install 'chatmesh[uvloop]'; docs/benchmarks.md has what it changes).
EVENT_LOOPS = ("asyncio", "uvloop")


class StartupError(Exception):
    """A reason the server cannot start; str() is one readable line."""


def read_secret(env_name: str, file: str | None, what: str, required: bool) -> str | None:
    if file:
        try:
            value = Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StartupError(f"cannot read {what} file {file}: {exc.strerror or exc}") from None
        if not value:
            raise StartupError(f"{what} file {file} is empty")
        return value
    value = os.environ.get(env_name, "").strip()
    if value:
        return value
    if required:
        raise StartupError(f"no {what}: set {env_name} or pass --{what.replace(' ', '-')}-file")
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m node", description="Run one chatmesh server.")
    parser.add_argument("--config", default="configuration.txt", help="cluster configuration file")
    parser.add_argument("--id", required=True, help="this server's id in the configuration")
    parser.add_argument("--data-dir", help="Raft journal and dump directory (default data/<config hash>/<id>)")
    parser.add_argument("--cluster-secret-file", help=f"file holding the cluster secret (else ${SECRET_ENV})")
    parser.add_argument("--admin-token-file", help=f"file holding the admin bearer token (else ${ADMIN_TOKEN_ENV})")
    parser.add_argument("--admin-loopback-only", action="store_true", help="serve admin reads to loopback only")
    parser.add_argument("--log-level", default=os.environ.get("CHATMESH_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--timing",
        action="append",
        default=[],
        metavar="FIELD=SECONDS",
        help="override one timing of cluster/timings.py (repeatable; after $CHATMESH_TIMING_<FIELD>)",
    )
    parser.add_argument(
        "--event-loop",
        default=os.environ.get(EVENT_LOOP_ENV) or "asyncio",
        help=f"{' or '.join(EVENT_LOOPS)} (default ${EVENT_LOOP_ENV}, else asyncio)",
    )
    parser.add_argument(
        "--cpu-nice",
        metavar="N|off",
        help=f"nice value to run at, -20..19 (default ${CPU_NICE_ENV}, else -10; off: leave it; node/priority.py)",
    )
    tls.add_arguments(parser)
    return parser.parse_args(argv)


def loop_runner(name: str) -> Callable[[Coroutine[Any, Any, int]], int]:
    """What runs the server's coroutine: asyncio.run, or uvloop's equivalent."""
    if name == "asyncio":
        return asyncio.run
    if name != "uvloop":
        raise StartupError(f"unknown event loop {name!r} (known: {', '.join(EVENT_LOOPS)})")
    try:
        import uvloop
    except ImportError:
        raise StartupError("event loop uvloop is not installed (pip install 'chatmesh[uvloop]')") from None
    run: Callable[[Coroutine[Any, Any, int]], int] = uvloop.run
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    try:
        config = load_config(args.config)
        if args.id not in config:
            raise StartupError(f"server id {args.id!r} is not in {args.config} (known: {', '.join(config.ids)})")
        secret = read_secret(SECRET_ENV, args.cluster_secret_file, "cluster secret", required=True)
        token = read_secret(ADMIN_TOKEN_ENV, args.admin_token_file, "admin token", required=False)
        limits = Limits.from_env(os.environ)
        timings = ClusterTimings.from_sources(os.environ, args.timing)
        tls_options = tls.options_from(args, os.environ)
        run_loop = loop_runner(args.event_loop)
        cpu_priority = parse_cpu_priority(args.cpu_nice, os.environ)
        raft_leader = os.environ.get(RAFT_LEADER_ENV, "coordinator")
        if raft_leader not in ("coordinator", "any"):
            raise StartupError(f"{RAFT_LEADER_ENV}={raft_leader!r}: expected coordinator or any")
    except (ConfigError, StartupError, ValueError) as exc:
        print(f"chatmesh: {exc}", file=sys.stderr)
        return 2
    assert secret is not None
    # Before any thread starts (PySyncObj's, the admin server's): threads inherit the nice value.
    priority = apply_cpu_priority(cpu_priority)
    logging.getLogger("chatmesh.node").log(
        logging.WARNING if priority.refused else logging.INFO, "%s %s", args.id, describe(priority)
    )

    from node.app import Node, NodeOptions
    from registry.replicated import default_data_dir

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir(config, args.id)
    options = NodeOptions(
        data_dir=data_dir,
        secret=secret,
        admin_token=token,
        admin_loopback_only=args.admin_loopback_only,
        limits=limits,
        timings=timings,
        tls=tls_options,
        ws_origins=os.environ.get(ORIGINS_ENV, ""),
        raft_leader_follows_coordinator=raft_leader == "coordinator",
    )
    node = Node(config, args.id, options)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.request_stop)
        return await node.run()

    try:
        return run_loop(run())
    except StartupError as exc:
        print(f"chatmesh: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
