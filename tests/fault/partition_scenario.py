"""Partition 2|3 of a 5-server cluster, driven from inside the lab's hub namespace.

    ip netns exec <hub> python -m tests.fault.partition_scenario --lab lab.json --root DIR

tests/fault/test_partition.py builds the lab and runs this; it exits 0 when every check held and prints a
readable summary either way (the last line is `RESULT ok` or `RESULT FAIL`).

Story: s1..s5 up, coordinator s5; clients on every server, a room on each. Cut {s4, s5} (the coordinator's
side, a minority) from {s1, s2, s3}. The majority elects s3 and keeps approving; the minority cannot commit
so it refuses newidentity and createroom after its bounded wait, even for a name the majority approves at
the same moment. Clients on the majority keep their sessions. Heal: s5 is coordinator again, one registry
everywhere, and it matches the sessions still alive (the majority declared s4 and s5 down, so their
clients were released and disconnected: consistency over availability).
"""

from __future__ import annotations

import concurrent.futures
import sys
from pathlib import Path

from tests.fault.invariants import (
    NoReply,
    ScenarioRecord,
    Session,
    SessionLost,
    check_settled,
    coordinator_problems,
    now,
    ping_all,
)
from tests.fault.netlab import LabSpec, lab_cluster, scenario_main
from tests.support import wait_until

MINORITY = ["s4", "s5"]
MAJORITY = ["s1", "s2", "s3"]
# The majority must approve again within this long after the cut (suspicion + election + Raft leader).
MAJORITY_RECOVERY_S = 10.0
# A minority request must be refused within the coordinator's bounded wait (4 s) plus slack.
MINORITY_REFUSAL_S = 9.0


class Scenario(ScenarioRecord):
    def __init__(self, spec: LabSpec, root: Path) -> None:
        self.spec = spec
        super().__init__(lab_cluster(root, spec))

    def session(self, server: str, identity: str | None = None) -> Session:
        s = Session(server, self.cluster.client_address(server), label=server)
        self.sessions.append(s)
        if identity is not None:
            assert s.login(identity, self.ledger), f"{identity} refused on {server}"
        return s

    def fresh_login(self, server: str, identity: str) -> tuple[bool, float]:
        """A new connection asks for `identity`; (approved, seconds until the answer)."""
        started = now()
        try:
            s = self.session(server)
            return s.login(identity, self.ledger), now() - started
        except (SessionLost, NoReply, OSError) as exc:
            self.note(f"{identity}@{server}: {exc}")
            return False, now() - started

    def run(self) -> None:
        c = self.cluster
        for sid in c.ids:
            c.start(sid)
        for sid in c.ids:
            c.wait_ready(sid, 60)
        c.wait_coordinator("s5", 30)
        self.note("5 servers up, coordinator s5")

        for sid in c.ids:
            self.session(sid, f"a{sid}")
            owner = self.session(sid, f"b{sid}")
            self.check(owner.create_room(f"room{sid}", self.ledger), f"createroom room{sid} on {sid}")
        self.check(not check_settled(c, self.sessions, self.ledger, 15), "settled before the partition")

        c.lab.partition(MAJORITY, MINORITY)
        cut = now()
        self.note(f"partition {MAJORITY} | {MINORITY}")

        # Both sides at once: the majority must come back, the minority must refuse, one name on both sides.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            minority = {sid: pool.submit(self.fresh_login, sid, f"minor{sid}") for sid in MINORITY}
            contested_minor = pool.submit(self.fresh_login, "s4", "contested")
            minority_room = pool.submit(self._minority_room)
            first = self._first_majority_approval(cut)
            contested_major = self.fresh_login("s1", "contested")
            results = {sid: f.result() for sid, f in minority.items()}
            contested_minor_result = contested_minor.result()
            room_result = minority_room.result()
        self.note(f"majority approves again {first:.2f}s after the cut")
        self.check(first <= MAJORITY_RECOVERY_S, f"majority recovered in {first:.2f}s > {MAJORITY_RECOVERY_S}s")
        for sid, (approved, took) in results.items():
            self.note(f"minority newidentity on {sid}: approved={approved} after {took:.2f}s")
            self.check(not approved, f"minority server {sid} approved an identity")
            self.check(took <= MINORITY_REFUSAL_S, f"minority refusal on {sid} took {took:.2f}s")
        self.check(contested_major[0], "majority refused 'contested'")
        self.check(not contested_minor_result[0], "minority approved 'contested' (duplicate)")
        self.note(f"minority createroom approved={room_result}")
        self.check(room_result is False, "minority approved a createroom")

        self._minority_local_chat()
        for sid in MAJORITY:
            self.check(self.fresh_login(sid, f"major{sid}")[0], f"majority newidentity on {sid}")
        owner = self.session("s2", "majowner")
        self.check(owner.create_room("majroom", self.ledger), "majority createroom")
        lost = ping_all(s for s in self.sessions if s.server in MAJORITY)
        self.check(not lost, f"majority sessions lost during the partition: {lost}")
        wait_until(lambda: not coordinator_problems(c, MAJORITY), 15, 0.1, "coordinator s3 on the majority side")
        self.note("majority side agrees on coordinator s3")
        statuses = {sid: c.status(sid) for sid in c.ids}
        for sid in MINORITY:
            self.note(f"{sid} during the partition: role={statuses[sid]['role']} raft={statuses[sid]['raft']}")
        self.check(
            all(statuses[sid]["raft"]["leader"] not in MINORITY for sid in MAJORITY),
            f"majority follows a minority Raft leader: { {s: statuses[s]['raft'] for s in MAJORITY} }",
        )

        c.lab.heal()
        healed = now()
        self.note("healed")
        wait_until(lambda: not coordinator_problems(c, c.ids), 30, 0.1, "one coordinator (s5) after healing")
        self.note(f"one coordinator s5 again {now() - healed:.2f}s after healing")
        problems = check_settled(c, self.sessions, self.ledger, 30, live=c.ids, sessions_must_survive=False)
        self.check(not problems, f"after healing: {problems}")
        majority_lost = [s for s in self.sessions if s.server in MAJORITY and s.identity and s.closed]
        self.check(not majority_lost, f"majority sessions lost: {majority_lost}")
        minority_kept = [s for s in self.sessions if s.server in MINORITY and s.identity and not s.closed]
        self.note(f"minority sessions still open after healing: {minority_kept}")
        for sid in MINORITY:
            self.check(self.fresh_login(sid, f"back{sid}")[0], f"newidentity on {sid} after healing")
        self.check(not check_settled(c, self.sessions, self.ledger, 20, live=c.ids), "final settle")
        self.note(self.ledger.summary())

    def _first_majority_approval(self, cut: float) -> float:
        """Try new identities on the majority until one is approved; seconds since the cut."""
        attempt = 0
        while now() - cut < MAJORITY_RECOVERY_S + 10:
            attempt += 1
            server = MAJORITY[attempt % len(MAJORITY)]
            if self.fresh_login(server, f"probe{attempt}")[0]:
                return now() - cut
        return float("inf")

    def _minority_local_chat(self) -> None:
        """What needs no commit still works on the minority side: a local join and a message."""
        visitor = next(s for s in self.sessions if s.identity == "as4")
        owner = next(s for s in self.sessions if s.identity == "bs4")
        try:
            joined = visitor.join("rooms4", timeout=3)
            visitor.say("still here")
            got = owner.request({"type": "who"}, lambda m: m.get("type") == "roomcontents", 3)
            heard = owner.messages_seen
        except (SessionLost, NoReply) as exc:
            self.check(False, f"minority local chat failed: {exc}")
            return
        self.note(f"minority local join -> {joined.get('roomid')}, owner sees {got.get('identities')}")
        self.check(joined.get("roomid") == "rooms4", f"minority local join refused: {joined}")
        self.check(heard >= 1, "minority local message not delivered")

    def _minority_room(self) -> bool | None:
        owner = next(s for s in self.sessions if s.server == "s4" and s.owned_room is None and s.identity)
        try:
            return owner.create_room("minroom", self.ledger)
        except (SessionLost, NoReply) as exc:
            self.note(f"minority createroom: {exc}")
            return None


def main(argv: list[str] | None = None) -> int:
    return scenario_main("python -m tests.fault.partition_scenario", Scenario, argv)


if __name__ == "__main__":
    sys.exit(main())
