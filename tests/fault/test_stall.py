"""A server frozen past the failure timeout relays nothing once it wakes: it first learns it was fenced."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tests.support import ChatClient, http_json, start_cluster, wait_until


def test_a_woken_server_never_relays_for_a_name_the_cluster_gave_away(tmp_path: Path) -> None:
    with start_cluster(tmp_path, 3) as cluster:
        alice = ChatClient.connect(cluster.client_address("s1"))
        bob = ChatClient.connect(cluster.client_address("s1"))
        carol = ChatClient.connect(cluster.client_address("s2"))
        try:
            assert alice.login("alice") and bob.login("bob")

            def alice_held() -> bool:
                clients = http_json(cluster.admin_url("s3") + "/clients")["clients"]
                return any(c["identity"] == "alice" for c in clients)

            wait_until(alice_held, 5, 0.05, "alice registered")
            cluster.stop("s1")
            wait_until(lambda: not alice_held(), 15, 0.05, "s1 declared down and alice released")
            assert carol.login("alice")  # the name now belongs to a session on s2
            alice.send({"type": "message", "content": "sent while s1 sleeps"})  # waits in s1's socket
            cluster.resume("s1")
            seen: list[dict[str, object]] = []
            with contextlib.suppress(AssertionError):  # ends when s1 closes bob's connection
                while True:
                    seen.append(bob.recv(10))
            assert {"type": "message", "identity": "alice", "content": "sent while s1 sleeps"} not in seen, seen
            assert bob.closed(1)
            cluster.wait_coordinator("s3", 15)
        finally:
            for client in (alice, bob, carol):
                client.close()
