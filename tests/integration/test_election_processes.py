"""Real sockets, real processes: 3 and 6 election runtimes on loopback elect the highest priority, fail
over when the coordinator is SIGKILLed or SIGSTOPped, and hand the role back when it returns (only once it
can lead)."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from cluster.config import load_config
from tests.support import PYTHON, REPO, Processes, wait_until, write_config

SCRIPT = str(REPO / "tests" / "integration" / "election_node.py")
ENV = {"CHATMESH_SECRET": "election-test-secret"}
STATE = re.compile(r"^STATE coordinator=(\S+) epoch=(\d+) role=(\S+)$", re.M)
# Generous for a loaded 2-core machine; the typical failover is T1 (0.75 s) plus a few milliseconds.
SETTLE_S = 15.0


class ElectionCluster:
    def __init__(self, root: Path, count: int, procs: Processes) -> None:
        self.root = root
        self.config_path = write_config(root, count)
        self.ids: list[str] = [str(i) for i in load_config(self.config_path).ids]
        self.procs = procs

    def start(self, server_id: str, ready_after: float = 0.0) -> None:
        args = [PYTHON, SCRIPT, "--config", str(self.config_path), "--id", server_id]
        if ready_after:
            args += ["--ready-after", str(ready_after)]
        self.procs.start(server_id, args, self.root, env=ENV)

    def history(self, server_id: str) -> list[str]:
        """Every coordinator this server's current life reported, in order."""
        log = self.procs.log(server_id)
        life = log.rsplit("READY ", 1)[-1] if "READY " in log else ""
        return [m.group(1) for m in STATE.finditer(life)]

    def coordinator(self, server_id: str) -> str | None:
        proc = self.procs.procs[server_id]
        assert proc.poll() is None, f"{server_id} exited:\n{self.procs.log(server_id)[-2000:]}"
        history = self.history(server_id)
        return history[-1] if history else None

    def wait_agreement(self, on: str, among: list[str], timeout: float = SETTLE_S) -> float:
        begun = time.monotonic()
        wait_until(
            lambda: all(self.coordinator(i) == on for i in among),
            timeout,
            0.02,
            f"{among} to follow {on}; now { {i: self.coordinator(i) for i in among} }",
        )
        return time.monotonic() - begun


def test_three_processes_elect_the_highest_fail_over_on_sigkill_and_take_the_role_back(tmp_path: Path) -> None:
    with Processes() as procs:
        c = ElectionCluster(tmp_path, 3, procs)
        for server_id in c.ids:
            c.start(server_id)
        c.wait_agreement("s3", c.ids)
        procs.kill("s3")
        failover = c.wait_agreement("s2", ["s1", "s2"])
        print(f"3 processes: failover after SIGKILL observed within {failover:.2f}s")
        c.start("s3")
        c.wait_agreement("s3", c.ids)


def test_six_processes_survive_sigstop_and_a_slow_recovery_of_the_coordinator(tmp_path: Path) -> None:
    with Processes() as procs:
        c = ElectionCluster(tmp_path, 6, procs)
        for server_id in c.ids:
            c.start(server_id)
        c.wait_agreement("s6", c.ids)
        others = c.ids[:-1]

        procs.signal("s6", signal.SIGSTOP)  # frozen, still believing it coordinates
        failover = c.wait_agreement("s5", others)
        print(f"6 processes: failover after SIGSTOP observed within {failover:.2f}s")
        procs.signal("s6", signal.SIGCONT)
        c.wait_agreement("s6", c.ids)

        # A restart whose registry needs 2 s to catch up: it follows s5 meanwhile, then takes the role back.
        procs.kill("s6")
        c.wait_agreement("s5", others)
        c.start("s6", ready_after=2.0)
        c.wait_agreement("s6", c.ids)
        assert c.history("s6")[-2:] == ["s5", "s6"], c.history("s6")
        assert all(c.history(i)[-2:] == ["s5", "s6"] for i in others), {i: c.history(i) for i in others}
