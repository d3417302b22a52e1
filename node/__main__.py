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
from pathlib import Path

from cluster.config import ConfigError, load_config
from cluster.timings import ClusterTimings
from node.limits import Limits

SECRET_ENV = "CHATMESH_SECRET"
# "coordinator" (default): Raft leadership follows the Fast Bully coordinator; "any": it stays where Raft put it.
RAFT_LEADER_ENV = "CHATMESH_RAFT_LEADER"
ADMIN_TOKEN_ENV = "CHATMESH_ADMIN_TOKEN"


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
    return parser.parse_args(argv)


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
        raft_leader = os.environ.get(RAFT_LEADER_ENV, "coordinator")
        if raft_leader not in ("coordinator", "any"):
            raise StartupError(f"{RAFT_LEADER_ENV}={raft_leader!r}: expected coordinator or any")
    except (ConfigError, StartupError, ValueError) as exc:
        print(f"chatmesh: {exc}", file=sys.stderr)
        return 2
    assert secret is not None

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
        raft_leader_follows_coordinator=raft_leader == "coordinator",
    )
    node = Node(config, args.id, options)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.request_stop)
        return await node.run()

    try:
        return asyncio.run(run())
    except StartupError as exc:
        print(f"chatmesh: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
