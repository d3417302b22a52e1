"""A partition lab made of Linux network namespaces, created and destroyed by the test itself.

Theory of operation
-------------------
PySyncObj knows its peers by their configured address, so a TCP proxy in front of the ports cannot cut a
link: the servers must really be unable to reach each other. The lab builds, for one run:

    hub namespace  (ip forwarding off)
      br0 ── vs1 ─── eth0 in namespace s1 (10.213.X.1/24)
          ── vs2 ─── eth0 in namespace s2 (10.213.X.2/24)
      br1 ── (empty until a partition moves veths onto it)

Each server has its own address in a private /24 that exists only inside these namespaces; nothing is
added to the root namespace and no traffic can leave them. The hub has an address on each bridge (.254 on
br0, .253 on br1; both bridges share one MAC so neighbour caches stay valid when a server moves) and a /32
host route per server pointing at the bridge that server is on, so the hub (where the test driver runs)
can always reach every server, while ip forwarding off keeps the two bridges apart.
`partition(a, b)` moves group b's veths onto br1 (and its host routes with them); `heal()` moves everything
back to br0. A cut link drops packets silently, like a pulled cable: established TCP
connections hang, new ones time out.

States: created -> (partitioned <-> healed)* -> destroyed. Invariants: every namespace name carries this
run's prefix (pid + random), so concurrent runs never meet; `destroy()` kills every process left in the
namespaces (`ip netns pids`) and deletes them, and is safe to call twice or after a failed `create()`.
Stale namespaces of dead runs (their pid gone) are removed on the next `create()`.

The lab is described by a `LabSpec` (JSON), so a driver started inside the hub namespace
(`ip netns exec <hub> python -m ...`) can rebuild the same view and partition and heal itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

# Every namespace of every run starts with this, then the creating pid, then a random tag.
NS_PREFIX = "cmf"
# How long one `ip` command may take.
IP_TIMEOUT_S = 10.0
# Host part of the hub's address on br0 and br1.
HUB_HOST_BR0 = 254
HUB_HOST_BR1 = 253
# Servers get host parts 1..MAX_SERVERS.
MAX_SERVERS = 32


class LabUnavailable(Exception):
    """This machine cannot build the lab (not root, no `ip`, namespaces refused); str() says why."""


class LabError(Exception):
    """An `ip` command failed while the lab existed."""


def _ip(args: Sequence[str], check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def unavailable_reason() -> str | None:
    """None if the lab can be built here, else a readable reason (for pytest.skip)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the partition lab needs root (it creates network namespaces)"
    if shutil.which("ip") is None:
        return "the partition lab needs iproute2 (`ip`)"
    probe = f"{NS_PREFIX}{os.getpid()}probe{random.randrange(1 << 16):04x}"
    proc = _ip(["netns", "add", probe], check=False)
    if proc.returncode != 0:
        return f"`ip netns add` failed: {proc.stderr.strip()}"
    try:
        link = _ip(["-n", probe, "link", "add", "br0", "type", "bridge"], check=False)
        if link.returncode != 0:
            return f"cannot create a bridge in a namespace: {link.stderr.strip()}"
        veth = _ip(["-n", probe, "link", "add", "va", "type", "veth", "peer", "name", "vb"], check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair in a namespace: {veth.stderr.strip()}"
    finally:
        _ip(["netns", "del", probe], check=False)
    return None


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def list_namespaces() -> list[str]:
    proc = _ip(["netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def kill_namespace_processes(ns: str) -> None:
    """SIGCONT then SIGKILL every process in `ns` (stopped ones included), by pid."""
    for _ in range(5):
        proc = _ip(["netns", "pids", ns], check=False)
        pids = [int(p) for p in proc.stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.02)


def remove_stale_namespaces() -> list[str]:
    """Delete lab namespaces whose creating process is gone (a run killed before its teardown)."""
    removed = []
    pattern = re.compile(rf"^{NS_PREFIX}(\d+)[a-z]")
    for ns in list_namespaces():
        match = pattern.match(ns)
        if match and not _pid_alive(int(match.group(1))):
            kill_namespace_processes(ns)
            _ip(["netns", "del", ns], check=False)
            removed.append(ns)
    return removed


@dataclasses.dataclass(frozen=True)
class LabSpec:
    """Everything needed to use a lab from another process: names and addresses."""

    prefix: str
    hub: str
    subnet: str  # "10.213.X" (a /24)
    servers: dict[str, str]  # server id -> namespace
    hosts: dict[str, int]  # server id -> host part of its address

    def address(self, server_id: str) -> str:
        return f"{self.subnet}.{self.hosts[server_id]}"

    @property
    def namespaces(self) -> list[str]:
        return [*self.servers.values(), self.hub]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LabSpec:
        data = json.loads(text)
        return cls(data["prefix"], data["hub"], data["subnet"], dict(data["servers"]), dict(data["hosts"]))


class NetLab:
    """One lab: create with `NetLab.create(ids)`, or attach to an existing one with `NetLab(spec)`."""

    def __init__(self, spec: LabSpec) -> None:
        self.spec = spec
        self.side: dict[str, int] = {sid: 0 for sid in spec.servers}  # which bridge each server is on

    # -- building and tearing down --------------------------------------------------------------------

    @classmethod
    def create(cls, server_ids: Iterable[str], rng: random.Random | None = None) -> NetLab:
        ids = list(server_ids)
        if not 1 <= len(ids) <= MAX_SERVERS:
            raise ValueError(f"1..{MAX_SERVERS} servers, not {len(ids)}")
        reason = unavailable_reason()
        if reason is not None:
            raise LabUnavailable(reason)
        remove_stale_namespaces()
        rng = rng or random.Random()
        prefix = f"{NS_PREFIX}{os.getpid()}{''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(4))}"
        spec = LabSpec(
            prefix=prefix,
            hub=f"{prefix}-hub",
            subnet=f"10.213.{rng.randrange(256)}",
            servers={sid: f"{prefix}-{sid}" for sid in ids},
            hosts={sid: i + 1 for i, sid in enumerate(ids)},
        )
        lab = cls(spec)
        try:
            lab._build()
        except BaseException:
            lab.destroy()
            raise
        return lab

    def _build(self) -> None:
        spec = self.spec
        hub = spec.hub
        _ip(["netns", "add", hub])
        for ns in spec.servers.values():
            _ip(["netns", "add", ns])
        # The hub never forwards between its bridges (a new namespace starts with forwarding off; make sure).
        subprocess.run(
            ["ip", "netns", "exec", hub, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"],
            capture_output=True,
            timeout=IP_TIMEOUT_S,
            check=False,
        )
        # Both bridges carry the same MAC: a server moved to the other bridge keeps its cached neighbour entry
        # for the hub's address, so the driver's established connections to it survive a partition.
        mac = f"02:00:0a:d5:{int(spec.subnet.rsplit('.', 1)[1]):02x}:fe"
        batch = [
            "link set lo up",
            f"link add br0 address {mac} type bridge",
            f"link add br1 address {mac} type bridge",
            f"addr add {spec.subnet}.{HUB_HOST_BR0}/24 dev br0",
            f"addr add {spec.subnet}.{HUB_HOST_BR1}/32 dev br1",
            "link set br0 up",
            "link set br1 up",
        ]
        _ip(["-n", hub, "-batch", "-"], stdin="\n".join(batch) + "\n")
        for sid, ns in spec.servers.items():
            veth = self._veth(sid)
            _ip(["-n", hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _ip(
                ["-n", ns, "-batch", "-"],
                stdin=f"link set lo up\naddr add {spec.address(sid)}/24 dev eth0\nlink set eth0 up\n",
            )
            _ip(
                ["-n", hub, "-batch", "-"],
                stdin=f"link set {veth} master br0\nlink set {veth} up\nroute replace {spec.address(sid)}/32 dev br0\n",
            )

    def destroy(self) -> None:
        """Kill every process in the lab's namespaces and delete them; idempotent."""
        existing = set(list_namespaces())
        for ns in self.spec.namespaces:
            if ns in existing:
                kill_namespace_processes(ns)
        for ns in self.spec.namespaces:
            if ns in existing:
                _ip(["netns", "del", ns], check=False)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- using it --------------------------------------------------------------------------------------

    @staticmethod
    def _veth(server_id: str) -> str:
        name = f"v{server_id}"
        assert len(name) <= 15 and re.fullmatch(r"[A-Za-z0-9_.-]+", name), name
        return name

    def exec_prefix(self, server_id: str) -> list[str]:
        """Prepend to a command to run it in `server_id`'s namespace."""
        return ["ip", "netns", "exec", self.spec.servers[server_id]]

    def hub_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.spec.hub]

    def _move(self, server_ids: Iterable[str], bridge: int) -> None:
        lines = []
        for sid in server_ids:
            lines.append(f"link set {self._veth(sid)} master br{bridge}")
            lines.append(f"route replace {self.spec.address(sid)}/32 dev br{bridge}")
            self.side[sid] = bridge
        if lines:
            _ip(["-n", self.spec.hub, "-batch", "-"], stdin="\n".join(lines) + "\n")

    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        """Servers of `group_a` reach each other, those of `group_b` each other, never across."""
        a, b = set(group_a), set(group_b)
        if a & b:
            raise ValueError(f"{sorted(a & b)} in both groups")
        unknown = (a | b) - set(self.spec.servers)
        if unknown:
            raise ValueError(f"unknown servers {sorted(unknown)}")
        self._move(sorted(a), 0)
        self._move(sorted(b), 1)

    def heal(self) -> None:
        self._move([sid for sid, side in self.side.items() if side != 0], 0)

    def pids(self) -> dict[str, list[int]]:
        out = {}
        for ns in self.spec.namespaces:
            proc = _ip(["netns", "pids", ns], check=False)
            out[ns] = [int(p) for p in proc.stdout.split() if p.isdigit()]
        return out


def write_lab_config(directory: Path, spec: LabSpec) -> Path:
    """A configuration for the lab's servers: each on its own address, so the ports can be the same."""
    lines = ["# generated by tests.fault.netlab"]
    for i, sid in enumerate(spec.servers):
        lines.append(f"{sid} {spec.address(sid)} 4444 5555 {i + 1} 5444 6555")
    path = directory / "configuration.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- tiny TCP tools to check the lab without chat servers (`python -m tests.fault.netlab ...`) ----------


def _echo_server(host: str, port: int) -> None:
    import socketserver

    class Echo(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line)

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server((host, port), Echo) as server:
        print("listening", flush=True)
        server.serve_forever()


def _echo_once(sock: object, payload: bytes, timeout: float) -> bool:
    import socket

    assert isinstance(sock, socket.socket)
    sock.settimeout(timeout)
    try:
        sock.sendall(payload + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                return False
            data += chunk
        return data == payload + b"\n"
    except OSError:
        return False


def _reach(host: str, port: int, timeout: float) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return _echo_once(sock, b"ping", timeout)
    except OSError:
        return False


def _hold(host: str, port: int, timeout: float) -> None:
    """Keep one connection; for each stdin line, echo it through and print ok/fail."""
    import socket
    import sys

    sock = socket.create_connection((host, port), timeout=timeout)
    print("ok" if _echo_once(sock, b"hello", timeout) else "fail", flush=True)
    for line in sys.stdin:
        print("ok" if _echo_once(sock, line.strip().encode() or b"x", timeout) else "fail", flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.fault.netlab")
    parser.add_argument("tool", choices=["echo", "reach", "hold"])
    parser.add_argument("targets", nargs="+", help="HOST:PORT (reach takes several and prints one 0/1 each)")
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args(argv)
    addresses = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in args.targets]
    if args.tool == "echo":
        _echo_server(*addresses[0])
        return 0
    if args.tool == "reach":
        print(" ".join("1" if _reach(host, port, args.timeout) else "0" for host, port in addresses), flush=True)
        return 0
    _hold(*addresses[0], args.timeout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def lab_cluster(root: Path, spec: LabSpec, env: dict[str, str] | None = None) -> Any:
    """A `tests.support.Cluster` whose servers each run in their own namespace of the lab.

    Use it from inside the hub namespace (the only place that reaches every server)."""
    from tests.support import Cluster

    class LabCluster(Cluster):
        def __init__(self) -> None:
            super().__init__(root, len(spec.servers), env, config_path=write_lab_config(root, spec))
            self.lab = NetLab(spec)

        def command_prefix(self, server_id: str) -> list[str]:
            return self.lab.exec_prefix(server_id)

    return LabCluster()


# -- scenarios: a driver module run inside the hub namespace, and the test that starts it -------------------

SCENARIO_TIMEOUT_S = 240


class LabScenario(Protocol):
    """What `scenario_main` drives: a scenario over a lab cluster that notes what it saw and what failed."""

    notes: list[str]
    failures: list[str]
    cluster: Any  # tests.support.Cluster: `ids` and `log(sid)`

    def run(self) -> None: ...
    def close(self) -> None: ...


def scenario_main(prog: str, make: Callable[[LabSpec, Path], LabScenario], argv: list[str] | None = None) -> int:
    """The `python -m tests.fault.<scenario> --lab spec.json --root DIR` entry point: run the scenario, print
    its summary (and the servers' log tails on failure) and a last line `RESULT ok` or `RESULT FAIL`."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--lab", required=True, help="the lab's LabSpec as JSON (a file)")
    parser.add_argument("--root", required=True, help="directory for the configuration, data and logs")
    args = parser.parse_args(argv)
    scenario = make(LabSpec.from_json(Path(args.lab).read_text()), Path(args.root))
    crashed = None
    try:
        scenario.run()
    except Exception:
        crashed = traceback.format_exc()
    finally:
        with contextlib.suppress(Exception):
            scenario.close()
    print("---- summary ----")
    for line in scenario.notes:
        print(line)
    if crashed:
        print(f"scenario crashed:\n{crashed}")
    for failure in scenario.failures:
        print(f"FAILED: {failure}")
    ok = crashed is None and not scenario.failures
    if not ok:
        for sid in scenario.cluster.ids:
            print(f"---- {sid} log (tail) ----\n{scenario.cluster.log(sid)[-4000:]}")
    print("RESULT ok" if ok else "RESULT FAIL", flush=True)
    return 0 if ok else 1


def run_lab_scenario(lab: NetLab, module: str, root: Path, repo: Path, timeout_s: float = SCENARIO_TIMEOUT_S) -> None:
    """Run `python -m <module>` (a `scenario_main`) inside the lab's hub namespace; AssertionError with its
    summary unless it ends `RESULT ok`."""
    spec_file = root / "lab.json"
    spec_file.write_text(lab.spec.to_json())
    env = dict(os.environ, PYTHONPATH=str(repo), PYTHONUNBUFFERED="1")
    args = [*lab.hub_prefix(), sys.executable, "-m", module, "--lab", str(spec_file), "--root", str(root)]
    try:
        proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        raise AssertionError(f"{module} timed out after {timeout_s:.0f}s:\n{out[-8000:]}") from None
    summary = proc.stdout + proc.stderr
    print(summary)
    assert proc.returncode == 0 and "RESULT ok" in proc.stdout, summary[-12000:]
