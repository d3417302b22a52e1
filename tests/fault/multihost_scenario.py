"""Six hosts as users run them (README, "Running servers on several hosts"), driven from the lab's hub.

    ip netns exec <hub> python -m tests.fault.multihost_scenario --lab lab.json --root DIR

tests/fault/test_multihost.py builds the lab (one network namespace per host, each with its own address)
and runs this; it exits 0 when every check held (last line `RESULT ok` or `RESULT FAIL`).

Each host gets its own directory holding the same `configuration.txt` (real host addresses, the same
ports on every host) and runs exactly the README's command there, with the same secret exported:

    CHATMESH_SECRET=... python -m node --config configuration.txt --id sN

(no --data-dir: each host keeps its journal under its own `data/`). With six servers the five highest
priorities are the Raft voters and s1 keeps a read-only replica.

Story: all six up, coordinator s6. From the host side, alice logs in on s1 (the read-only replica) and
creates a room, bob logs in on s3, joins alice's room (routed to s1) and they talk. The coordinator's host
s6 is cut off: s5 takes over, logins on s1 and s3 are approved again, alice and bob keep chatting. s6's
host comes back: s6 is the coordinator again everywhere, one registry, no name ever held twice.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from tests.fault.invariants import (
    NoReply,
    ScenarioRecord,
    Session,
    SessionLost,
    check_settled,
    coordinator_problems,
    move,
    now,
)
from tests.fault.netlab import LabSpec, NetLab, scenario_main
from tests.support import PYTHON, Cluster, wait_until

HOSTS = ["s1", "s2", "s3", "s4", "s5", "s6"]
# Approvals resume this long after the coordinator's host is cut off (suspicion, election, Raft leader).
RECOVERY_S = 10.0
SETTLE_S = 30.0


def write_hosts_config(root: Path, spec: LabSpec) -> str:
    """The one configuration file every host gets: each server on its host's address, the same ports."""
    lines = ["# one server per host; every host opens 4444 (clients), 5555 (coordination), 5444 (admin),"]
    lines.append("# 6555 (raft, voters only) and 6444 (ws)")
    for i, sid in enumerate(spec.servers):
        lines.append(f"{sid} {spec.address(sid)} 4444 5555 {i + 1} 5444 6555")
    return "\n".join(lines) + "\n"


class HostsCluster(Cluster):
    """One server per namespace, each started in its own host directory with the README's command."""

    def __init__(self, root: Path, spec: LabSpec) -> None:
        text = write_hosts_config(root, spec)
        (root / "configuration.txt").write_text(text)
        super().__init__(root, len(spec.servers), config_path=root / "configuration.txt")
        self.lab = NetLab(spec)
        self.host_dirs = {}
        for sid in spec.servers:
            host_dir = root / f"host-{sid}"
            host_dir.mkdir(exist_ok=True)
            (host_dir / "configuration.txt").write_text(text)
            self.host_dirs[sid] = host_dir

    def start(self, server_id: str) -> None:
        self.procs.kill(server_id)
        self.stopped.discard(server_id)
        args = [*self.lab.exec_prefix(server_id), PYTHON, "-m", "node", "--config", "configuration.txt"]
        args += ["--id", server_id]
        self.procs.start(server_id, args, self.root, env=self.env, cwd=self.host_dirs[server_id])


class Scenario(ScenarioRecord):
    def __init__(self, spec: LabSpec, root: Path) -> None:
        super().__init__(HostsCluster(root, spec))

    def session(self, server: str, identity: str) -> Session:
        s = Session(server, self.cluster.client_address(server), label=server)
        self.sessions.append(s)
        assert s.login(identity, self.ledger), f"{identity} refused on {server}"
        return s

    def server_of(self, address: tuple[str, int]) -> str:
        return next(s.server_id for s in self.cluster.config.servers if (s.host, s.clients_port) == address)

    def talk(self, speaker: Session, listener: Session, text: str) -> bool:
        before = listener.messages_seen
        speaker.say(text)
        try:
            wait_until(lambda: (listener.ping(2), listener.messages_seen > before)[1], 5, 0.05, f"{text!r} heard")
            return True
        except (AssertionError, SessionLost, NoReply):
            return False

    def first_approval(self, servers: list[str], since: float) -> float:
        attempt = 0
        while now() - since < RECOVERY_S + 10:
            attempt += 1
            server = servers[attempt % len(servers)]
            with contextlib.suppress(SessionLost, NoReply, OSError, AssertionError):
                s = Session(server, self.cluster.client_address(server), label=server)
                self.sessions.append(s)
                if s.login(f"probe{attempt}", self.ledger):
                    return now() - since
        return float("inf")

    def run(self) -> None:
        c = self.cluster
        for sid in c.ids:
            c.start(sid)
        for sid in c.ids:
            c.wait_ready(sid, 90)
        c.wait_coordinator("s6", 30)
        roles = {sid: c.status(sid)["raft"] for sid in c.ids}
        self.note(f"6 hosts up, coordinator s6, Raft leader {roles['s1']['leader']}")
        self.check(c.config.voter_ids == ("s6", "s5", "s4", "s3", "s2"), f"voters {c.config.voter_ids}")
        for sid in c.ids:
            self.check(c.log(sid).count("ready") >= 1, f"{sid} printed no ready line")
        self.check("read-only" in c.log("s1"), "s1 (not a voter) did not say it keeps a read-only registry replica")

        alice = self.session("s1", "alice")
        self.check(alice.create_room("kitchen", self.ledger), "alice creates kitchen on s1")
        bob = self.session("s3", "bob")
        route = bob.join("kitchen")
        self.check(route.get("type") == "route", f"bob on s3 is routed to s1 for kitchen: {route}")
        if route.get("type") == "route":
            bob = move(bob, route, self.server_of, self.ledger)
            self.sessions.append(bob)
        self.check(bob.server == "s1", f"bob moved to {bob.server}")
        self.check(self.talk(bob, alice, "hello alice"), "alice hears bob")
        self.check(self.talk(alice, bob, "hello bob"), "bob hears alice")
        carol = self.session("s6", "carol")
        self.check(not check_settled(c, self.sessions, self.ledger, SETTLE_S), "settled before the cut")

        others = [sid for sid in c.ids if sid != "s6"]
        c.lab.partition(others, ["s6"])
        cut = now()
        self.note("s6's host cut off")
        took = self.first_approval(["s1", "s3"], cut)
        self.note(f"approvals again {took:.2f}s after the cut")
        self.check(took <= RECOVERY_S, f"approvals resumed after {took:.2f}s > {RECOVERY_S}s")
        wait_until(lambda: not coordinator_problems(c, others), SETTLE_S, 0.1, "coordinator s5 on the majority")
        self.note(f"the others follow s5 ({now() - cut:.2f}s after the cut)")
        self.check(self.talk(alice, bob, "still here"), "alice and bob chat while s6 is away")
        # The cut-off host cannot commit: it refuses a new name (after its bounded wait), never duplicates it.
        lonely = Session("s6", c.client_address("s6"), label="s6")
        self.sessions.append(lonely)
        try:
            refused = not lonely.login("frank", self.ledger)
        except (SessionLost, NoReply):
            refused = True
        self.note(f"a login on the cut-off s6 refused: {refused}")
        self.check(refused, "the cut-off s6 approved a login")
        self.check(self.session("s2", "dave").identity == "dave", "a login on s2 while s6 is away")

        c.lab.heal()
        healed = now()
        self.note("s6's host is back")
        wait_until(lambda: not coordinator_problems(c, c.ids), SETTLE_S, 0.1, "coordinator s6 everywhere")
        self.note(f"s6 coordinator again everywhere {now() - healed:.2f}s after it came back")
        # s6 was declared down while away, so carol's session there was released: consistency first.
        self.note(f"carol's session on s6 after the cut: {'closed' if carol.closed else 'open'}")
        problems = check_settled(c, self.sessions, self.ledger, SETTLE_S, live=c.ids, sessions_must_survive=False)
        self.check(not problems, f"after s6 came back: {problems}")
        self.check(not alice.closed and not bob.closed, "alice and bob kept their sessions")
        self.check(self.session("s6", "erin").identity == "erin", "a login on s6 after it came back")
        self.check(self.talk(bob, alice, "bye"), "alice hears bob at the end")
        self.check(not self.ledger.duplicates(), f"duplicates: {self.ledger.duplicates()}")
        self.note(self.ledger.summary())


def main(argv: list[str] | None = None) -> int:
    return scenario_main("python -m tests.fault.multihost_scenario", Scenario, argv)


if __name__ == "__main__":
    sys.exit(main())
