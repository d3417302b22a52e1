"""The admin views of a running server follow membership changes (snapshots are rebuilt on change only)."""

from __future__ import annotations

from pathlib import Path

from tests.support import ChatClient, http_json, start_cluster, wait_until


def test_clients_and_room_members_follow_local_joins(tmp_path: Path) -> None:
    with start_cluster(tmp_path, 1) as cluster:
        url = cluster.admin_url("s1")
        alice = ChatClient.connect(cluster.client_address("s1"))
        bob = ChatClient.connect(cluster.client_address("s1"))
        try:
            assert alice.login("alice") and bob.login("bob")
            assert alice.recv()["type"] == "roomchange"  # her own arrival
            assert alice.recv()["identity"] == "bob"  # bob's arrival in MainHall-s1
            alice.send({"type": "createroom", "roomid": "kitchen"})
            assert alice.recv() == {"type": "createroom", "roomid": "kitchen", "approved": "true"}

            def room_of(identity: str) -> str | None:
                clients = http_json(url + "/clients")["clients"]
                return next((c["room_id"] for c in clients if c["identity"] == identity), None)

            wait_until(lambda: room_of("alice") == "kitchen", 5, what="alice in kitchen on /clients")
            assert room_of("bob") == "MainHall-s1"
            # A join between two local rooms commits nothing: only local membership changes.
            bob.send({"type": "joinroom", "roomid": "kitchen"})
            wait_until(lambda: room_of("bob") == "kitchen", 5, what="bob in kitchen on /clients")
            members = http_json(url + "/rooms/kitchen")["members"]
            assert sorted(members) == ["alice", "bob"]
            bob.send({"type": "quit"})
            wait_until(lambda: room_of("bob") is None, 5, what="bob gone from /clients")
        finally:
            alice.close()
            bob.close()


def test_servers_show_the_incarnation_heard_and_follow_a_restart(tmp_path: Path) -> None:
    """`incarnation` in /servers: each server's own, and the one of each peer's heartbeats
    heard here, so an operator (and bench.failover) can see when a restarted server is heard everywhere."""

    def views(cluster) -> dict[str, dict[str, int | None]]:
        return {
            sid: {s["server_id"]: s["incarnation"] for s in http_json(cluster.admin_url(sid) + "/servers")["servers"]}
            for sid in cluster.ids
        }

    def settled(cluster) -> bool:
        seen = views(cluster)
        return all(seen[sid][peer] == seen[peer][peer] is not None for sid in seen for peer in seen)

    with start_cluster(tmp_path, 3) as cluster:
        wait_until(lambda: settled(cluster), 20, 0.05, "every server heard every incarnation")
        before = views(cluster)["s1"]["s1"]
        cluster.kill("s1")
        cluster.start("s1")
        cluster.wait_ready("s1", 30)
        wait_until(lambda: settled(cluster), 20, 0.05, "every server heard the restarted one")
        assert views(cluster)["s2"]["s1"] != before
