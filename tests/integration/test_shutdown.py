"""A server stopped with SIGTERM tells its clients and releases what they held, then exits 0."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.support import ChatClient, http_json, start_cluster, wait_until


def test_sigterm_sends_quit_roomchanges_releases_entries_and_exits_cleanly(tmp_path: Path) -> None:
    with start_cluster(tmp_path, 2) as cluster:
        alice = ChatClient.connect(cluster.client_address("s1"))
        try:
            assert alice.login("alice")
            assert alice.recv() == {"type": "roomchange", "identity": "alice", "former": "", "roomid": "MainHall-s1"}
            alice.send({"type": "createroom", "roomid": "attic"})
            assert alice.recv()["approved"] == "true"
            assert alice.recv()["roomid"] == "attic"
            cluster.procs.signal("s1", signal.SIGTERM)
            assert alice.recv() == {"type": "roomchange", "identity": "alice", "former": "attic", "roomid": ""}
            assert alice.closed()
            assert cluster.procs.procs["s1"].wait(15) == 0
            survivor = cluster.admin_url("s2")

            def released() -> bool:
                clients = http_json(survivor + "/clients")["clients"]
                rooms = {r["room_id"] for r in http_json(survivor + "/rooms")["rooms"]}
                return not clients and rooms == {"MainHall-s2"}

            wait_until(released, 10, what="alice, attic and MainHall-s1 released on s2")
        finally:
            alice.close()
