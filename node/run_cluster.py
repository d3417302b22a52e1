"""Start every server of a configuration as its own `python -m node` process and supervise them.

    chatmesh-cluster [--config FILE] [--data-root DIR] [--cluster-secret-file FILE] [--only s1,s2] [--fresh]
    python run_cluster.py ...      (in a checkout: the same, with paths relative to the checkout)

Works from any directory: the configuration, data root and secret file default to `configuration.txt`,
`data/<config hash>/` and `.cluster-secret` in the current directory (in the checkout's directory for
`run_cluster.py`). Each server's log lines are prefixed with its id. Once all are ready and agree on a
coordinator, a table of addresses is printed; Ctrl-C (or SIGTERM) stops them all cleanly. A server that
fails to start stops the whole run with a non-zero exit status and the reason. TLS settings
(`CHATMESH_*_TLS_CERT/KEY`) and limits in the environment reach every server.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from cluster.config import ClusterConfig, ConfigError, load_config
from registry.replicated import default_data_dir, wipe_data_dir

# The directory holding the `node` package: children run `python -m node` from it, installed or not.
CODE_ROOT = Path(__file__).resolve().parent.parent
SECRET_FILE_NAME = ".cluster-secret"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def local_secret(secret_file: Path) -> str:
    """The cluster secret for local runs: CHATMESH_SECRET, else `secret_file`, generated (mode 0600) and
    kept for later runs when it does not exist."""
    env = os.environ.get("CHATMESH_SECRET")
    if env:
        return env
    if not secret_file.exists():
        secret_file.parent.mkdir(parents=True, exist_ok=True)
        secret_file.touch(0o600)
        secret_file.write_text(secrets.token_urlsafe(32) + "\n")
    value = secret_file.read_text().strip()
    if not value:
        raise OSError(f"the secret file {secret_file} is empty")
    return value


def _pump(prefix: str, stream: object) -> None:
    for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
        line = raw.decode("utf-8", "replace").rstrip("\n")
        print(f"{prefix} {line}", flush=True)


def _get_json(url: str) -> dict[str, object] | None:
    # A readiness probe of the processes we started, sending nothing secret: with admin TLS on, the
    # certificate (often from a private CA) is not checked here.
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=0.5, context=context) as response:
            data = json.loads(response.read())
            return data if isinstance(data, dict) else None
    except Exception:
        return None


class Supervisor:
    def __init__(
        self,
        config: ClusterConfig,
        config_path: Path,
        ids: list[str],
        data_dirs: dict[str, Path],
        base: Path,
        admin_scheme: str,
    ) -> None:
        self.base = base
        self.admin_scheme = admin_scheme
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
            proc = subprocess.Popen(args, cwd=self.base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self.procs[server_id] = proc
            prefix = f"[{server_id:<{self.width}}]"
            threading.Thread(target=_pump, args=(prefix, proc.stdout), daemon=True).start()

    def failed(self) -> str | None:
        for server_id, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return f"server {server_id} exited with status {code} (see its log lines above)"
        return None

    def admin_url(self, server_id: str) -> str:
        s = self.config.server(server_id)
        host = f"[{s.host}]" if ":" in s.host else s.host
        return f"{self.admin_scheme}://{host}:{s.admin_port}"

    def statuses(self) -> dict[str, dict[str, object] | None]:
        return {i: _get_json(f"{self.admin_url(i)}/status") for i in self.ids}

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
        rows = [("server", "clients", "websocket", "admin", "chat page", "role")]
        for server_id in self.ids:
            s = self.config.server(server_id)
            role = str(statuses.get(server_id, {}).get("role", "?"))
            admin = self.admin_url(server_id)
            rows.append((server_id, f"{s.host}:{s.clients_port}", f"{s.host}:{s.ws_port}", f"{admin}/",
                         f"{admin}/chat", role))  # fmt: skip
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
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


def main(argv: list[str] | None = None, *, base: Path | None = None, prog: str = "chatmesh-cluster") -> int:
    """`base` is where the defaults live (the current directory unless given)."""
    base = (base or Path.cwd()).resolve()
    parser = argparse.ArgumentParser(prog=prog, description="Run a local chatmesh cluster.")
    parser.add_argument("--config", default=str(base / "configuration.txt"), help="configuration file")
    parser.add_argument("--only", help="comma-separated server ids to start (default: all)")
    parser.add_argument("--fresh", action="store_true", help="wipe the servers' data directories first")
    parser.add_argument("--data-root", help="where the servers' data directories live (default data/<hash>/)")
    parser.add_argument("--cluster-secret-file", metavar="FILE", default=str(base / SECRET_FILE_NAME),
                        help="the cluster secret, created if missing (CHATMESH_SECRET wins)")  # fmt: skip
    args = parser.parse_args(argv)

    config_path = Path(args.config).resolve()
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    ids: list[str] = list(config.ids)
    if args.only:
        wanted = [i.strip() for i in args.only.split(",") if i.strip()]
        unknown = [i for i in wanted if i not in config]
        if unknown:
            print(f"{prog}: unknown server id(s) {', '.join(unknown)} in --only", file=sys.stderr)
            return 2
        ids = wanted
    # The servers' own default (<base>/data/<configuration fingerprint>/<id>), or <data root>/<id>.
    root = Path(args.data_root).resolve() if args.data_root else None
    data_dirs = {sid: root / sid if root else default_data_dir(config, sid, base / "data") for sid in ids}
    if args.fresh:
        for data_dir in data_dirs.values():
            wipe_data_dir(data_dir)

    env = dict(os.environ)
    try:
        env["CHATMESH_SECRET"] = local_secret(Path(args.cluster_secret_file))
    except OSError as exc:
        print(f"{prog}: cannot use the cluster secret file: {exc}", file=sys.stderr)
        return 2
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(CODE_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    admin_scheme = "https" if env.get("CHATMESH_ADMIN_TLS_CERT") else "http"
    supervisor = Supervisor(config, config_path, ids, data_dirs, base, admin_scheme)
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
            print(f"{prog}: {exc}; stopping the others", file=sys.stderr)
            return 1
        print("\n" + supervisor.table(statuses) + "\n", flush=True)
        print(f"{prog}: {len(ids)} servers ready; chat at {supervisor.admin_url(ids[0])}/chat; Ctrl-C stops them all",
              flush=True)  # fmt: skip
        while not stopping.wait(0.5):
            problem = supervisor.failed()
            if problem:
                print(f"{prog}: {problem}", file=sys.stderr, flush=True)
                # Keep supervising the rest: a dead server is a fault the cluster tolerates.
                supervisor.procs = {k: p for k, p in supervisor.procs.items() if p.poll() is None}
                if not supervisor.procs:
                    return 1
        return 0
    finally:
        supervisor.stop()
        print(f"{prog}: stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
