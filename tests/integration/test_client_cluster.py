"""The terminal client against a real 3-server cluster (`python -m node` processes on loopback).

Every command, a cross-server join (the route followed), a message round trip between two client processes,
and a client whose server is killed reconnecting elsewhere under the same identity. Clients run as
`python -m client --batch` processes, exactly as scripts use them; a raw protocol client (`ChatClient`)
checks what the servers saw.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from client.core import HELP_LINES
from tests.integration.test_client_shell import BatchClient, batch_client, run_script
from tests.support import ChatClient, Cluster, start_cluster

# Long enough for the cluster to declare a killed server down and release its identities (and elect a new
# coordinator if it was the one that died); the client's own window is longer still.
RECONNECT_S = 45.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("client-cluster"), 3) as running:
        yield running


def at(cluster: Cluster, server_id: str) -> list[str]:
    host, port = cluster.client_address(server_id)
    return ["-h", host, "-p", str(port)]


def label(cluster: Cluster, server_id: str) -> str:
    host, port = cluster.client_address(server_id)
    return f"{server_id} ({host}:{port})"


def test_every_command_in_one_script(cluster: Cluster) -> None:
    script = (
        "#help\n#list\n#who\n#createroom cmdroom\n#who\n#createroom cmdsecond\n#joinroom cmdroom\n"
        "#joinroom nosuchroom\n#deleteroom MainHall-s1\n#deleteroom cmdroom\n#list\n#bogus\n#quit\n"
    )
    result = run_script([*at(cluster, "s1"), "-i", "CmdUser", "--wait-replies"], script, timeout=60)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[:2] == ["User has been approved.", "CmdUser moves to MainHall-s1"]
    answers = lines[lines.index(HELP_LINES[-1]) + 1 :]
    listed = answers[0].split()
    assert listed[:4] == ["List", "of", "chat", "rooms:"]
    assert {"MainHall-s1", "MainHall-s2", "MainHall-s3"} <= set(listed[4:])
    assert answers[1:8] == [
        "MainHall-s1 contains CmdUser",
        "Room cmdroom is created.",
        "CmdUser moves from MainHall-s1 to cmdroom",
        "cmdroom contains CmdUser*",
        "Create room cmdsecond failed.",  # one owned room per client
        "room unchanged",  # already in cmdroom
        "room unchanged",  # no such room
    ]
    assert answers[8] == "Delete room MainHall-s1 failed."
    # The deleteroom reply and the roomchanges of the members may come in either order.
    assert sorted(answers[9:11]) == ["CmdUser moves from cmdroom to MainHall-s1", "Room cmdroom is deleted."]
    assert "cmdroom" not in answers[11].split()
    assert answers[12:] == ["CmdUser has quit!"]
    assert "Unknown command #bogus" in result.stderr


def test_refused_identity_exits_1(cluster: Cluster) -> None:
    holder = ChatClient.connect(cluster.client_address("s2"))
    try:
        assert holder.login("Taken")
        result = run_script([*at(cluster, "s1"), "-i", "Taken"], "#list\n", timeout=60)
        assert result.returncode == 1
        assert result.stdout.splitlines() == ["Taken already in use."]
    finally:
        holder.close()


def test_message_round_trip_between_two_clients(cluster: Cluster) -> None:
    with batch_client(*at(cluster, "s2"), "-i", "Ping") as ping:
        ping.expect("Ping moves to MainHall-s2", 30)  # before Pong starts, so that Ping sees Pong arrive
        with batch_client(*at(cluster, "s2"), "-i", "Pong") as pong:
            pong.expect("Pong moves to MainHall-s2", 30)
            ping.expect("Pong moves to MainHall-s2")
            ping.send("ping from Ping")
            pong.expect("Ping: ping from Ping")
            pong.send("pong from Pong")
            ping.expect("Pong: pong from Pong")
            pong.close_stdin()
            assert pong.wait() == 0
            ping.expect("Pong has quit!")
        ping.close_stdin()
        assert ping.wait() == 0


def test_cross_server_join_follows_the_route(cluster: Cluster) -> None:
    observer = ChatClient.connect(cluster.client_address("s3"))
    try:
        assert observer.login("Watcher")
        with (
            batch_client(*at(cluster, "s1"), "-i", "Owner", "--wait-replies") as owner,
            batch_client(*at(cluster, "s3"), "-i", "Mover", "--wait-replies") as mover,
        ):
            owner.expect("Owner moves to MainHall-s1", 30)
            owner.send("#createroom lounge")
            owner.expect("Owner moves from MainHall-s1 to lounge")
            mover.expect("Mover moves to MainHall-s3", 30)
            mover.send("#joinroom lounge")
            mover.expect("Mover switches to server s1")
            mover.expect("Mover moves from MainHall-s3 to lounge")
            owner.expect("Mover moves from MainHall-s3 to lounge")
            mover.send("#who")
            _expect_contents(mover, "lounge", "Owner")
            mover.send("arrived")
            owner.expect("Mover: arrived")
        # The members of the room left behind saw the move too.
        wanted = {"type": "roomchange", "identity": "Mover", "former": "MainHall-s3", "roomid": "lounge"}
        seen = []
        while wanted not in seen:
            seen.append(observer.recv(timeout=10))
    finally:
        observer.close()


def _expect_contents(client: BatchClient, room: str, owner: str) -> None:
    """`<room> contains ...` in any member order, the owner starred."""
    for _ in range(20):
        line = client.lines.get(timeout=15)
        assert line is not None, "client ended"
        if line.startswith(f"{room} contains "):
            members = line.split()[2:]
            assert f"{owner}*" in members, line
            return
    raise AssertionError(f"no '{room} contains' line")


def test_server_killed_client_reconnects_elsewhere_and_retakes_its_identity(cluster: Cluster) -> None:
    config = str(cluster.config_path)
    with (
        batch_client(
            *at(cluster, "s1"), "-i", "Survivor", "--config", config, "--reconnect-timeout", str(RECONNECT_S)
        ) as survivor,
        batch_client(*at(cluster, "s2"), "-i", "Friend") as friend,
    ):
        survivor.expect("Survivor moves to MainHall-s1", 30)
        friend.expect("Friend moves to MainHall-s2", 30)
        cluster.kill("s1")
        # "(closed by the server)" or "(connection reset)", depending on what the kernel sent for the dead process.
        survivor.expect(f"Lost connection to server {label(cluster, 's1')} (", prefix=True)
        # s2 follows s1 in the configuration, so it is tried first.
        survivor.expect(f"Reconnected to server {label(cluster, 's2')} as Survivor.", RECONNECT_S + 5)
        survivor.expect("Survivor moves to MainHall-s2")
        friend.expect("Survivor moves to MainHall-s2")
        survivor.send("still here")
        friend.expect("Survivor: still here")
        # The identity is really ours again: nobody else can take it.
        other = ChatClient.connect(cluster.client_address("s3"))
        try:
            assert not other.login("Survivor")
        finally:
            other.close()
        survivor.close_stdin()
        assert survivor.wait() == 0
        friend.expect("Survivor has quit!")


def test_a_refused_join_is_explained(cluster: Cluster) -> None:
    live = cluster.live()
    assert live, "the previous test leaves servers running"
    server_id = live[0]
    result = run_script([*at(cluster, server_id), "-i", "Clarity", "--wait-replies"], "#joinroom nowhere\n", 60)
    assert result.returncode == 0
    assert "room unchanged" in result.stdout.splitlines()
    assert "Could not join nowhere" in result.stderr
