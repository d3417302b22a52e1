"""Start every server of a configuration as its own `python -m node` process and supervise them.

    python run_cluster.py [--config FILE] [--only s1,s2] [--fresh]

Each server's log lines are prefixed with its id. Once all are ready and agree on a coordinator, a table of
addresses is printed; Ctrl-C (or SIGTERM) stops them all cleanly. A server that fails to start stops the
whole run with a non-zero exit status and the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from cluster.config import ClusterConfig, ConfigError, load_config
from registry.replicated import default_data_dir, wipe_data_dir

HERE = Path(__file__).resolve().parent
SECRET_FILE = HERE / ".cluster-secret"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def local_secret() -> str:
    """The cluster secret for local runs: CHATMESH_SECRET, else a generated file kept for later runs."""
    env = os.environ.get("CHATMESH_SECRET")
    if env:
        return env
    if not SECRET_FILE.exists():
        SECRET_FILE.write_text(secrets.token_urlsafe(32) + "\n")
        SECRET_FILE.chmod(0o600)
    return SECRET_FILE.read_text().strip()


def _pump(prefix: str, stream: object) -> None:
    for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
        line = raw.decode("utf-8", "replace").rstrip("\n")
        print(f"{prefix} {line}", flush=True)


def _get_json(url: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            data = json.loads(response.read())
            return data if isinstance(data, dict) else None
    except Exception:
        return None


class Supervisor:
    def __init__(self, config: ClusterConfig, config_path: Path, ids: list[str], data_dirs: dict[str, Path]) -> None:
        self.config = config
        self.config_path = config_path
        self.ids = ids
        self.data_dirs = data_dirs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.width = max(len(i) for i in ids)

    def start(self, env: dict[str, str]) -> None:
        for server_id in self.ids:
            args = [
                sys.executable, "-m", "node",
                "--config", str(self.config_path),
                "--id", server_id,
                "--data-dir", str(self.data_dirs[server_id]),
            ]  # fmt: skip
            # Same process group as the supervisor: Ctrl-C reaches every server, and killing the group
            # (as a test or an init system does) leaves no orphan behind.
            proc = subprocess.Popen(args, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self.procs[server_id] = proc
            prefix = f"[{server_id:<{self.width}}]"
            threading.Thread(target=_pump, args=(prefix, proc.stdout), daemon=True).start()

    def failed(self) -> str | None:
        for server_id, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return f"server {server_id} exited with status {code} (see its log lines above)"
        return None

    def statuses(self) -> dict[str, dict[str, object] | None]:
        return {
            i: _get_json(f"http://{self.config.server(i).host}:{self.config.server(i).admin_port}/status")
            for i in self.ids
        }

    def wait_ready(self, timeout: float) -> dict[str, dict[str, object]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            problem = self.failed()
            if problem:
                raise RuntimeError(problem)
            statuses = self.statuses()
            if all(s is not None and s.get("serving") is not False for s in statuses.values()):
                coordinators = {s.get("coordinator") for s in statuses.values() if s}
                if len(coordinators) == 1 and None not in coordinators:
                    return {k: v for k, v in statuses.items() if v is not None}
            time.sleep(0.1)
        missing = [i for i, s in self.statuses().items() if s is None]
        raise RuntimeError(
            f"cluster not ready after {timeout:.0f}s"
            + (f" (no answer from {', '.join(missing)})" if missing else " (no agreement on a coordinator)")
        )

    def table(self, statuses: dict[str, dict[str, object]]) -> str:
        rows = [("server", "clients", "admin", "role")]
        for server_id in self.ids:
            s = self.config.server(server_id)
            role = str(statuses.get(server_id, {}).get("role", "?"))
            rows.append((server_id, f"{s.host}:{s.clients_port}", f"http://{s.host}:{s.admin_port}/", role))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local chatmesh cluster.")
    parser.add_argument("--config", default=str(HERE / "configuration.txt"), help="configuration file")
    parser.add_argument("--only", help="comma-separated server ids to start (default: all)")
    parser.add_argument("--fresh", action="store_true", help="wipe the servers' data directories first")
    parser.add_argument("--data-root", help="where the servers' data directories live")
    args = parser.parse_args(argv)

    config_path = Path(args.config).resolve()
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"run_cluster: {exc}", file=sys.stderr)
        return 2
    ids: list[str] = list(config.ids)
    if args.only:
        wanted = [i.strip() for i in args.only.split(",") if i.strip()]
        unknown = [i for i in wanted if i not in config]
        if unknown:
            print(f"run_cluster: unknown server id(s) {', '.join(unknown)} in --only", file=sys.stderr)
            return 2
        ids = wanted
    # The servers' own default (data/<configuration fingerprint>/<id>), or <data root>/<id>.
    data_dirs = {
        sid: Path(args.data_root) / sid if args.data_root else default_data_dir(config, sid, HERE / "data")
        for sid in ids
    }
    if args.fresh:
        for data_dir in data_dirs.values():
            wipe_data_dir(data_dir)

    env = dict(os.environ)
    env["CHATMESH_SECRET"] = local_secret()
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    supervisor = Supervisor(config, config_path, ids, data_dirs)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    supervisor.start(env)
    try:
        try:
            statuses = supervisor.wait_ready(STARTUP_TIMEOUT_S)
        except RuntimeError as exc:
            print(f"run_cluster: {exc}; stopping the others", file=sys.stderr)
            return 1
        print("\n" + supervisor.table(statuses) + "\n", flush=True)
        print(f"run_cluster: {len(ids)} servers ready; Ctrl-C stops them all", flush=True)
        while not stopping.wait(0.5):
            problem = supervisor.failed()
            if problem:
                print(f"run_cluster: {problem}", file=sys.stderr, flush=True)
                # Keep supervising the rest: a dead server is a fault the cluster tolerates.
                supervisor.procs = {k: p for k, p in supervisor.procs.items() if p.poll() is None}
                if not supervisor.procs:
                    return 1
        return 0
    finally:
        supervisor.stop()
        print("run_cluster: stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
