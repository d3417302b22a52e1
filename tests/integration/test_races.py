"""Concurrency: many clients on a real 3-server cluster racing for the same names at the same instant.

50 raw sockets spread over the 3 servers claim 5 identities (10 contenders each) released by one barrier:
exactly one approval per identity cluster-wide, every other contender refused and closed. Then 30 distinct
identities race for 5 room ids: exactly one creator per room. Afterwards every server's view (`/status`
registry counts and local client counts, `GET /rooms`, the `list` command) agrees with the winners.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import Cluster, http_json, wait_until

CONTENDERS = 50
NAMES = 5
ROOM_RACERS = 30
REPLY_TIMEOUT_S = 15.0  # a refusal may wait for the coordinator's commit timeout; far below pytest's


@dataclass
class Conn:
    """A raw JSON-lines connection (one per racing thread)."""

    server_id: str
    sock: socket.socket
    buffer: bytes = b""

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by server")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        obj = json.loads(line)
        assert isinstance(obj, dict) and isinstance(obj.get("type"), str), line
        return obj

    def recv_type(self, kind: str) -> dict[str, Any]:
        """The next line of type `kind`, skipping broadcasts (others arriving, moving) meanwhile."""
        while True:
            obj = self.recv()
            if obj["type"] == kind:
                return obj
            assert obj["type"] == "roomchange", obj

    def at_eof(self) -> bool:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def race(count: int, prepare: Any, act: Any) -> list[Any]:
    """Run `count` threads: each `prepare(i)` (connect...), then all `act(i, prepared)` released at once."""
    barrier = threading.Barrier(count, timeout=30)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            prepared = prepare(i)
            barrier.wait()
            results[i] = act(i, prepared)
        except BaseException as exc:  # reported below, with the thread's index
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REPLY_TIMEOUT_S * 2)
    assert not errors, errors[:3]
    assert all(not t.is_alive() for t in threads), "racing threads hung"
    return results


@pytest.fixture
def conns(chat_cluster: Cluster) -> Iterator[list[Conn]]:
    opened: list[Conn] = []
    yield opened
    for conn in opened:
        conn.close()


def connect(cluster: Cluster, server_id: str, opened: list[Conn]) -> Conn:
    sock = socket.create_connection(cluster.client_address(server_id), timeout=REPLY_TIMEOUT_S)
    conn = Conn(server_id, sock)
    opened.append(conn)
    return conn


def registry_views(cluster: Cluster) -> dict[str, tuple[int, int]]:
    """Each server's (identities, rooms) counts of its registry replica."""
    views = {}
    for s in cluster.ids:
        registry = cluster.status(s)["registry"]
        views[s] = (registry["identities"], registry["rooms"])
    return views


def test_identity_and_room_races_have_exactly_one_winner_each(chat_cluster: Cluster, conns: list[Conn]) -> None:
    cluster = chat_cluster
    servers = cluster.ids
    wait_until(lambda: len(set(registry_views(cluster).values())) == 1, 5.0, 0.05, "registry views agree")
    identities0, rooms0 = next(iter(registry_views(cluster).values()))

    # -- 50 contenders, 5 identities -----------------------------------------------------------------
    names = [f"Racer{k}" for k in range(NAMES)]

    def claim(i: int, conn: Conn) -> tuple[Conn, str, str]:
        identity = names[i % NAMES]
        conn.send({"type": "newidentity", "identity": identity})
        reply = conn.recv()
        assert reply["type"] == "newidentity", reply
        return conn, identity, reply["approved"]

    claims = race(CONTENDERS, lambda i: connect(cluster, servers[i % len(servers)], conns), claim)
    winners: dict[str, Conn] = {}
    for conn, identity, approved in claims:
        assert approved in ("true", "false"), approved
        if approved == "true":
            assert identity not in winners, (
                f"{identity} approved twice ({winners[identity].server_id}, {conn.server_id})"
            )
            winners[identity] = conn
    assert sorted(winners) == names, f"identities without a winner: {set(names) - set(winners)}"
    for conn, identity, approved in claims:
        if approved == "false":
            assert conn.at_eof(), f"refused contender for {identity} on {conn.server_id} not closed"
    # Winners are in their MainHall: their own arrival is the first roomchange they get.
    for identity, conn in winners.items():
        assert conn.recv_type("roomchange") == {
            "type": "roomchange",
            "identity": identity,
            "former": "",
            "roomid": f"MainHall-{conn.server_id}",
        }

    per_server = Counter(conn.server_id for conn in winners.values())
    wait_until(
        lambda: all(cluster.status(s)["clients"] == per_server[s] for s in servers),
        5.0,
        0.05,
        f"local client counts {dict(per_server)}",
    )
    wait_until(
        lambda: set(registry_views(cluster).values()) == {(identities0 + NAMES, rooms0)},
        5.0,
        0.05,
        "registry identity counts",
    )

    # -- 30 distinct identities, 5 room ids ------------------------------------------------------------
    rooms = [f"Arena{k}" for k in range(NAMES)]

    def login(i: int) -> Conn:
        conn = connect(cluster, servers[i % len(servers)], conns)
        identity = f"Builder{i}"
        conn.send({"type": "newidentity", "identity": identity})
        assert conn.recv() == {"type": "newidentity", "approved": "true"}, identity
        return conn

    def create(i: int, conn: Conn) -> tuple[Conn, str, str, str]:
        room = rooms[i % NAMES]
        conn.send({"type": "createroom", "roomid": room})
        reply = conn.recv_type("createroom")
        assert reply["roomid"] == room, reply
        return conn, f"Builder{i}", room, reply["approved"]

    creations = race(ROOM_RACERS, login, create)
    creators: dict[str, tuple[str, str]] = {}
    for conn, identity, room, approved in creations:
        assert approved in ("true", "false"), approved
        if approved == "true":
            assert room not in creators, f"{room} created twice: {creators[room]} and {(identity, conn.server_id)}"
            creators[room] = (identity, conn.server_id)
    assert sorted(creators) == rooms, f"rooms without a creator: {set(rooms) - set(creators)}"

    # Every server agrees: registry sizes, and where each room lives and who owns it.
    wait_until(
        lambda: set(registry_views(cluster).values()) == {(identities0 + NAMES + ROOM_RACERS, rooms0 + NAMES)},
        5.0,
        0.05,
        f"registry counts {registry_views(cluster)}",
    )

    def rooms_agree() -> bool:
        for s in servers:
            listed = http_json(cluster.admin_url(s) + "/rooms")["rooms"]
            found = [(r["room_id"], r["owner"], r["server_id"]) for r in listed if r["room_id"] in creators]
            expected = [(room, owner, server) for room, (owner, server) in creators.items()]
            if sorted(found) != sorted(expected):
                return False
            assert {f"MainHall-{x}" for x in servers} <= {r["room_id"] for r in listed}
        return True

    wait_until(rooms_agree, 5.0, 0.05, f"GET /rooms agreeing with {creators}")
    for s in servers:  # /status lists the rooms hosted there
        local = set(cluster.status(s)["rooms"])
        assert {r for r, (_, server) in creators.items() if server == s} <= local, (s, local)
        assert not {r for r, (_, server) in creators.items() if server != s} & local, (s, local)
    # And the protocol's own view: a client's `list` on each server names them all.
    probes = {conn.server_id: conn for conn in winners.values()}
    for s, conn in probes.items():
        conn.send({"type": "list"})
        listed = conn.recv_type("roomlist")["rooms"]
        assert set(rooms) | {f"MainHall-{x}" for x in servers} <= set(listed), (s, listed)
