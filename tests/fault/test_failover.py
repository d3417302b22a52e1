"""Crashes of real servers on loopback: the coordinator, a member, a restart, and a frozen ("zombie")
coordinator. Every test records each approval its clients receive (tests/fault/invariants.py) and ends with
the settled-cluster checks: one coordinator (the highest-priority live server), identical registries that
match the live sessions, no name approved to two live sessions, and surviving sessions still alive."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.fault.invariants import Clients, NoReply, Session, SessionLost, now, registry_view
from tests.support import start_cluster, wait_until

# Failover budget: the target is "about a second"; allow a loaded 2-core CI machine some slack.
FAILOVER_LIMIT_S = 3.0


def _populate(clients: Clients, ids: list[str]) -> None:
    """Two clients on every server, one of them owning a room there."""
    for sid in ids:
        clients.login(sid, f"a{sid}")
        owner = clients.login(sid, f"b{sid}")
        assert owner.create_room(f"room{sid}", clients.ledger)


def _holds_nothing_of(clients: Clients, live: list[str], dead: str) -> bool:
    for sid in live:
        identities, rooms = registry_view(clients.cluster, sid)
        if any(server == dead for _, server, _ in identities) or any(server == dead for _, server, _ in rooms):
            return False
    return True


def _race_logins(
    clients: Clients, servers: list[str], names: list[str]
) -> tuple[threading.Barrier, list[threading.Thread], list]:
    """Connections that all send newidentity when the returned barrier opens; results land in the list."""
    sessions = [clients.connect(servers[i % len(servers)]) for i in range(len(names))]
    barrier = threading.Barrier(len(names) + 1)
    results: list = []

    def run(session: Session, name: str) -> None:
        barrier.wait()
        try:
            results.append((name, session.server, session.login(name, clients.ledger)))
        except (SessionLost, NoReply) as exc:
            results.append((name, session.server, exc))

    threads = [threading.Thread(target=run, args=(s, n), daemon=True) for s, n in zip(sessions, names, strict=True)]
    for t in threads:
        t.start()
    return barrier, threads, results


def test_coordinator_killed_next_highest_takes_over_and_restart_takes_back(tmp_path: Path) -> None:
    with start_cluster(tmp_path, 3) as cluster:
        clients = Clients(cluster)
        try:
            _populate(clients, cluster.ids)
            clients.settled()

            # Requests in flight at the crash, two per name from different servers: one answer each, at most
            # one approval per name.
            names = [f"race{i // 2}" for i in range(8)]
            barrier, threads, results = _race_logins(clients, ["s1", "s2"], names)
            barrier.wait()
            killed_at = now()
            cluster.kill("s3")
            clients.server_killed("s3")
            took = clients.probe(["s1", "s2"], "after", killed_at)
            print(f"newidentity approved {took:.3f}s after the coordinator was killed")
            assert took <= FAILOVER_LIMIT_S, f"failover took {took:.2f}s"

            for t in threads:
                t.join(15)
            assert len(results) == len(names), f"in-flight requests without an answer: {results}"
            assert not [r for r in results if not isinstance(r[2], bool)], f"in-flight requests failed: {results}"
            for name in set(names):
                assert sum(1 for n, _, ok in results if n == name and ok) <= 1, f"{name} approved twice: {results}"

            assert cluster.wait_coordinator("s2", 10) == "s2"
            wait_until(lambda: _holds_nothing_of(clients, ["s1", "s2"], "s3"), 10, 0.05, "s3's names released")
            listed = clients.on("s1")[0].list_rooms()
            assert "MainHall-s3" not in listed and "rooms3" not in listed, listed
            clients.settled(live=["s1", "s2"])

            # The killed server comes back from its data directory: empty but for its MainHall, coordinator again.
            cluster.start("s3")
            cluster.wait_ready("s3")
            assert cluster.wait_coordinator("s3", 15) == "s3"
            status = cluster.status("s3")
            assert status["rooms"] == ["MainHall-s3"] and status["clients"] == 0, status
            back = clients.login("s3", "as3")  # the name its dead client held is free again
            assert back.create_room("rooms3", clients.ledger)
            clients.settled()
        finally:
            clients.close()


def test_member_killed_its_names_are_released_everywhere(tmp_path: Path) -> None:
    with start_cluster(tmp_path, 5) as cluster:
        clients = Clients(cluster)
        try:
            _populate(clients, cluster.ids)
            visitor = clients.login("s2", "visitor")
            assert visitor.join("rooms2")["roomid"] == "rooms2"
            clients.settled()
            status_before = cluster.status("s5")

            cluster.kill("s2")
            clients.server_killed("s2")
            live = [sid for sid in cluster.ids if sid != "s2"]
            wait_until(lambda: _holds_nothing_of(clients, live, "s2"), 10, 0.05, "s2's names released")
            for sid in live:
                listed = clients.on(sid)[0].list_rooms()
                assert "rooms2" not in listed and "MainHall-s2" not in listed, (sid, listed)
            assert cluster.wait_coordinator("s5", 5) == "s5"
            assert cluster.status("s5")["raft"]["term"] >= status_before["raft"]["term"]
            # What the dead server's clients held can be taken again, once, elsewhere.
            again = clients.login("s1", "as2")
            assert again.create_room("rooms2", clients.ledger)
            assert not clients.connect("s3").login("as2", clients.ledger)
            clients.settled(live=live)
        finally:
            clients.close()


def test_frozen_coordinator_resumes_without_duplicates_and_one_coordinator(tmp_path: Path) -> None:
    with start_cluster(tmp_path, 3) as cluster:
        clients = Clients(cluster)
        try:
            _populate(clients, cluster.ids)
            zombie_client = clients.login("s3", "zed")
            pending = clients.connect("s3")  # connected, will ask while s3 is frozen
            clients.settled()

            cluster.stop("s3")
            pending.send({"type": "newidentity", "identity": "contested"})  # queued in the kernel for s3
            assert cluster.wait_coordinator("s2", 10) == "s2"
            assert clients.login("s1", "contested")
            # s2 declares s3 down: everything s3's clients held is released, so "zed" may be taken again.
            wait_until(lambda: _holds_nothing_of(clients, ["s1", "s2"], "s3"), 10, 0.05, "s3 declared down")
            clients.login("s2", "zed")

            cluster.resume("s3")
            # Refused, or dropped unanswered with the rest of the zombie's clients when it learns it was fenced.
            try:
                reply: dict | None = pending.recv(10)
            except SessionLost:
                reply = None
            assert reply in (None, {"type": "newidentity", "approved": "false"}), reply
            clients.ledger.refused("identity", "contested", pending)
            pending.close()
            assert cluster.wait_coordinator("s3", 20) == "s3"
            # The zombie's clients were released while it was frozen, so it must have dropped them.
            assert zombie_client.closed or _closed_soon(zombie_client), "s3 kept a session the cluster released"
            clients.settled(sessions_must_survive=False)
            lost = [s for s in clients.sessions if s.server != "s3" and s.identity and s.closed]
            assert not lost, f"sessions on s1/s2 lost: {lost}"
            assert clients.login("s3", "fresh")
            clients.settled()
        finally:
            clients.close()


def _closed_soon(session: Session, timeout: float = 10.0) -> bool:
    """Wait, without sending anything, for the server to close the session."""
    deadline = now() + timeout
    while now() < deadline:
        try:
            session.recv(max(deadline - now(), 0.01))
        except SessionLost:
            return True
        except NoReply:
            return False
    return False
