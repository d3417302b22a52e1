"""WebSocket clients on a real 2-server cluster: every message type, shared rooms with TCP clients, routes
that carry the WebSocket address, bad, over-long and binary frames, origins, and a flood that leaves the
others unaffected."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ChatClient, Cluster, WsChatClient, http_json, start_cluster, wait_until

# Generous enough for a loaded 2-core machine; a healthy server answers in milliseconds.
ANSWER_S = 5.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("ws"), 2) as running:
        yield running


def ws(cluster: Cluster, server_id: str = "s1", origin: str | None = None) -> WsChatClient:
    return WsChatClient(cluster.ws_url(server_id), ANSWER_S, origin=origin)


def rc(identity: str, former: str, roomid: str) -> dict:
    return {"type": "roomchange", "identity": identity, "former": former, "roomid": roomid}


def test_every_message_type_over_websocket_shared_with_tcp(cluster: Cluster) -> None:
    alice = ws(cluster)
    bob = ChatClient.connect(cluster.client_address("s1"))
    carol = ws(cluster, "s2")
    try:
        assert alice.login("WsAlice")
        assert alice.recv() == rc("WsAlice", "", "MainHall-s1")
        assert bob.login("TcpBob")
        assert alice.recv() == rc("TcpBob", "", "MainHall-s1")
        assert bob.recv() == rc("TcpBob", "", "MainHall-s1")
        assert carol.login("WsCarol")
        assert carol.recv() == rc("WsCarol", "", "MainHall-s2")

        alice.send({"type": "list"})
        assert set(alice.recv()["rooms"]) >= {"MainHall-s1", "MainHall-s2"}
        alice.send({"type": "who"})
        who = alice.recv()
        assert who["type"] == "roomcontents" and set(who["identities"]) == {"WsAlice", "TcpBob"}

        alice.send({"type": "createroom", "roomid": "wsroom"})
        assert alice.recv() == {"type": "createroom", "roomid": "wsroom", "approved": "true"}
        assert alice.recv() == rc("WsAlice", "MainHall-s1", "wsroom")
        assert bob.recv() == rc("WsAlice", "MainHall-s1", "wsroom")

        bob.send({"type": "joinroom", "roomid": "wsroom"})
        assert bob.recv() == rc("TcpBob", "MainHall-s1", "wsroom")
        assert alice.recv() == rc("TcpBob", "MainHall-s1", "wsroom")

        bob.send({"type": "message", "content": "hello from tcp"})
        assert alice.recv() == {"type": "message", "identity": "TcpBob", "content": "hello from tcp"}
        alice.send({"type": "message", "content": "hello from ws <b>"})
        assert bob.recv() == {"type": "message", "identity": "WsAlice", "content": "hello from ws <b>"}
        alice.send({"type": "who"})
        assert alice.recv() == {"type": "roomcontents", "roomid": "wsroom", "identities": ["WsAlice", "TcpBob"],
                                "owner": "WsAlice"}  # fmt: skip

        # A remote join: the WebSocket client's route names the target's WebSocket address too.
        carol.send({"type": "createroom", "roomid": "farroom"})
        assert carol.recv()["approved"] == "true"
        carol.recv()
        rooms_on_s1 = cluster.admin_url("s1") + "/rooms/farroom"
        wait_until(lambda: http_json(rooms_on_s1)["server_id"] == "s2", ANSWER_S, what="s1's replica to see farroom")
        s2 = cluster.config.server("s2")
        bob.send({"type": "joinroom", "roomid": "farroom"})
        tcp_route = bob.recv()
        assert tcp_route == {"type": "route", "roomid": "farroom", "host": s2.host, "port": str(s2.clients_port)}
        bob.close()
        assert alice.recv() == rc("TcpBob", "wsroom", "farroom")

        alice.send({"type": "deleteroom", "roomid": "wsroom"})
        assert alice.recv_until(lambda m: m["type"] == "deleteroom") == {
            "type": "deleteroom", "roomid": "wsroom", "approved": "true"}  # fmt: skip
        alice.send({"type": "joinroom", "roomid": "farroom"})
        route = alice.recv_until(lambda m: m["type"] == "route")
        assert route == {**tcp_route, "wsurl": cluster.ws_url("s2")}

        moved = WsChatClient(route["wsurl"], ANSWER_S)
        try:
            moved.send({"type": "movejoin", "identity": "WsAlice", "former": "MainHall-s1", "roomid": "farroom"})
            assert moved.recv() == {"type": "serverchange", "approved": "true", "serverid": "s2"}
            assert moved.recv() == rc("WsAlice", "MainHall-s1", "farroom")
            assert carol.recv_until(lambda m: m["type"] == "roomchange") == rc("WsAlice", "MainHall-s1", "farroom")
            moved.send({"type": "quit"})
            assert moved.recv() == rc("WsAlice", "farroom", "")
            assert moved.closed() is not None
        finally:
            moved.close()
        assert carol.recv() == rc("WsAlice", "farroom", "")
    finally:
        for client in (alice, bob, carol):
            client.close()


def test_bad_frames_get_an_error_and_the_session_goes_on(cluster: Cluster) -> None:
    client = ws(cluster)
    try:
        client.send_frame("not json")
        assert client.recv()["type"] == "error"
        client.send_frame("[1, 2]")
        assert client.recv()["type"] == "error"
        client.send_frame('{"type": "nosuchtype"}')
        assert client.recv()["type"] == "error"
        client.send_frame('{"type": "list"}\n{"type": "who"}')  # two messages in one frame: not one message
        assert client.recv()["type"] == "error"
        client.send_frame("")
        assert client.recv()["type"] == "error"
        assert client.login("WsBadFrames")
        client.send_frame('{"type": "joinroom", "roomid": 7}')
        assert client.recv_until(lambda m: m["type"] == "error")["reason"]
        client.send({"type": "who"})
        assert client.recv_until(lambda m: m["type"] == "roomcontents")["identities"] == ["WsBadFrames"]
    finally:
        client.close()


def _watched_drop(cluster: Cluster, name: str, offend: object) -> tuple[int | None, dict]:
    """`name` logs in next to a watcher and `offend(client)`s; returns its close code and what the
    watcher saw."""
    watcher = ws(cluster)
    offender = ws(cluster)
    try:
        assert watcher.login(f"Watch{name}")
        assert offender.login(name)
        watcher.recv_until(lambda m: m.get("identity") == name)
        offend(offender)  # type: ignore[operator]
        code = offender.closed()
        seen = watcher.recv_until(lambda m: m["type"] == "roomchange" and m["identity"] == name)
        watcher.send({"type": "who"})  # the watcher's session is unaffected
        assert watcher.recv_until(lambda m: m["type"] == "roomcontents")["identities"] == [f"Watch{name}"]
        return code, seen
    finally:
        watcher.close()
        offender.close()


def test_an_over_long_frame_is_an_abrupt_quit(cluster: Cluster) -> None:
    code, seen = _watched_drop(cluster, "WsTooLong", lambda c: c.send_frame("x" * (64 * 1024 + 1)))
    assert code == 1009  # message too big
    assert seen == rc("WsTooLong", "MainHall-s1", "")


def test_a_frame_at_the_limit_is_served(cluster: Cluster) -> None:
    client = ws(cluster)
    try:
        assert client.login("WsAtLimit")
        body = '{"type":"message","content":"'
        client.send_frame(body + "y" * (64 * 1024 - len(body) - 2) + '"}')
        client.send({"type": "who"})
        assert client.recv_until(lambda m: m["type"] == "roomcontents")["identities"] == ["WsAtLimit"]
    finally:
        client.close()


def test_a_binary_frame_is_an_abrupt_quit(cluster: Cluster) -> None:
    code, seen = _watched_drop(cluster, "WsBinary", lambda c: c.send_frame(b'{"type":"list"}'))
    assert code is not None
    assert seen == rc("WsBinary", "MainHall-s1", "")


def test_invalid_utf8_in_a_text_frame_ends_the_connection(cluster: Cluster) -> None:
    code, seen = _watched_drop(cluster, "WsBadUtf", lambda c: c.send_frame(b"\xff\xfe{", text=True))
    assert code == 1007  # invalid frame payload data (RFC 6455)
    assert seen == rc("WsBadUtf", "MainHall-s1", "")


def test_a_foreign_origin_is_refused_and_the_clusters_chat_page_is_accepted(cluster: Cluster) -> None:
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        ws(cluster, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    page = cluster.admin_url("s2")  # any server's chat page may talk to any server
    client = ws(cluster, "s1", origin=page)
    try:
        assert client.login("WsFromPage")
    finally:
        client.close()


def test_a_flood_from_one_websocket_client_leaves_the_others_unaffected(cluster: Cluster) -> None:
    quiet = ws(cluster)
    tcp = ChatClient.connect(cluster.client_address("s1"))
    flooder = ws(cluster)
    try:
        assert quiet.login("WsQuiet")
        assert tcp.login("TcpQuiet")
        assert flooder.login("WsFlood")
        quiet.recv_until(lambda m: m.get("identity") == "WsFlood")
        line = '{"type":"message","content":"' + "f" * 200 + '"}'
        started = time.monotonic()
        flooded = 0
        try:
            while time.monotonic() - started < 3.0 and flooded < 5000:
                flooder.send_frame(line)
                flooded += 1
        except Exception:
            pass  # the server dropped the flooder mid-flood: that is the point
        # The others are answered at once, and the flooder was cut off by the rate limit.
        seen: list[dict] = []
        for _ in range(3):
            asked = time.monotonic()
            quiet.send({"type": "list"})
            quiet.recv_until(lambda m: seen.append(m) or m["type"] == "roomlist")  # type: ignore[func-returns-value]
            assert time.monotonic() - asked < 1.0
        assert flooder.closed(10) is not None
        left = rc("WsFlood", "MainHall-s1", "")
        if left not in seen:
            assert quiet.recv_until(lambda m: m["type"] == "roomchange" and m["identity"] == "WsFlood") == left
        tcp.send({"type": "who"})
        deadline = time.monotonic() + ANSWER_S
        while (reply := tcp.recv())["type"] != "roomcontents":
            assert time.monotonic() < deadline
        assert set(reply["identities"]) == {"WsQuiet", "TcpQuiet"}
        assert "rate" in cluster.log("s1")
    finally:
        for client in (quiet, tcp, flooder):
            client.close()


def test_a_plain_http_request_to_the_websocket_port_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(cluster.ws_url("s1").replace("ws://", "http://"), timeout=ANSWER_S)
    assert answer.value.code == 426  # Upgrade Required
