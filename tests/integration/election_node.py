"""One election runtime as its own process, for the real-socket election tests.

    CHATMESH_SECRET=... python tests/integration/election_node.py --config FILE --id s3 [--ready-after 1.5]

Prints `STATE coordinator=<id|-> epoch=<n> role=<role>` whenever the coordinator changes (and once at
start), so a test can follow it in the log. `--ready-after` keeps `can_lead()` false for that long, like a
registry replica that is still catching up.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bully.runtime import ElectionRuntime  # noqa: E402
from bully.transport import TcpTransport  # noqa: E402
from cluster.config import load_config  # noqa: E402


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--ready-after", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"{args.id} %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    loop = asyncio.get_running_loop()
    ready_at = loop.time() + args.ready_after
    transport = TcpTransport(config, args.id, os.environ["CHATMESH_SECRET"].encode())
    runtime: ElectionRuntime

    def report(coordinator: str | None) -> None:
        print(f"STATE coordinator={coordinator or '-'} epoch={runtime.epoch} role={runtime.role}", flush=True)

    runtime = ElectionRuntime(
        config,
        args.id,
        transport,
        can_lead=lambda: loop.time() >= ready_at,
        incarnation=time.time_ns() // 1_000_000,
        on_coordinator_change=report,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await transport.start()
    await runtime.start()
    print(f"READY {args.id} pid {os.getpid()}", flush=True)
    report(runtime.coordinator)
    await stop.wait()
    await runtime.close()
    await transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
