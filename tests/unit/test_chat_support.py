"""Shared by the chat core tests (no tests in this module): an in-test driver for `ChatCore`, a fake
replica view, and helpers that resolve cluster requests and flatten effects into (connection, message)
deliveries. No sockets, no time."""

from __future__ import annotations

import json
from typing import Any

from cluster.names import RoomId, ServerId
from node.chat import (
    BeginMoveRequest,
    ChatCore,
    ClaimIdentityRequest,
    CompleteMoveRequest,
    ConnId,
    CreateRoomRequest,
    DeleteRoomRequest,
    Deliver,
    Effect,
    Multicast,
    Request,
)
from node.directory import Address, RoomInfo

SERVER = ServerId("s1")
MAIN = "MainHall-s1"

REQUESTS = (ClaimIdentityRequest, CompleteMoveRequest, CreateRoomRequest, DeleteRoomRequest, BeginMoveRequest)


class FakeView:
    """The local replica as the core sees it: remote rooms, and (optionally) stale entries of ours."""

    def __init__(self) -> None:
        self.entries: dict[str, RoomInfo] = {MAIN: RoomInfo(RoomId(MAIN), SERVER, "")}
        self.addresses: dict[str, Address] = {"s1": Address("10.0.0.1", 4444), "s2": Address("10.0.0.2", 5555)}

    def add_remote(self, room_id: str, server: str = "s2", owner: str = "Zed") -> None:
        self.entries[room_id] = RoomInfo(RoomId(room_id), ServerId(server), owner)

    def room(self, room_id: str) -> RoomInfo | None:
        return self.entries.get(room_id)

    def rooms(self) -> list[RoomInfo]:
        return list(self.entries.values())

    def address(self, server_id: ServerId) -> Address:
        return self.addresses[server_id]


def deliveries(effects: list[Effect]) -> list[tuple[int, dict[str, Any]]]:
    """Every message the effects deliver, in order, one entry per receiver."""
    out: list[tuple[int, dict[str, Any]]] = []
    for e in effects:
        if isinstance(e, Deliver):
            out.append((e.conn, e.message))
        elif isinstance(e, Multicast):
            out.extend((c, e.message) for c in e.conns if c != e.exclude)
    return out


def others(effects: list[Effect]) -> list[Effect]:
    """The effects that are not deliveries (close, requests, releases)."""
    return [e for e in effects if not isinstance(e, Deliver | Multicast)]


def rc(identity: str, former: str, roomid: str) -> dict[str, str]:
    return {"type": "roomchange", "identity": identity, "former": former, "roomid": roomid}


class Driver:
    """Drives one core. `decide` answers cluster requests (default: approve); `auto` resolves them at once."""

    def __init__(self) -> None:
        self.view = FakeView()
        self.core = ChatCore(SERVER, self.view)
        self.next_conn = 1
        self.refuse: set[str] = set()  # names whose requests the "coordinator" refuses
        self.auto = True

    def connect(self) -> ConnId:
        conn = ConnId(self.next_conn)
        self.next_conn += 1
        assert self.core.connect(conn) == []
        return conn

    def decide(self, request: Request) -> bool:
        rooms = isinstance(request, CreateRoomRequest | DeleteRoomRequest)
        name = None if rooms else getattr(request, "identity", None)
        name = name or getattr(request, "room_id", "")
        return name not in self.refuse

    def settle(self, effects: list[Effect]) -> list[Effect]:
        """Resolve every request in `effects` (and in what that produces), keeping everything in order."""
        if not self.auto:
            return effects
        out: list[Effect] = []
        for e in effects:
            out.append(e)
            if isinstance(e, REQUESTS):
                out.extend(self.settle(self.core.resolve(e, self.decide(e))))
        return out

    def raw(self, conn: ConnId, line: bytes) -> list[Effect]:
        return self.settle(self.core.receive(conn, line))

    def send(self, conn: ConnId, message: dict[str, Any]) -> list[Effect]:
        return self.raw(conn, json.dumps(message).encode())

    def login(self, identity: str) -> ConnId:
        conn = self.connect()
        effects = self.send(conn, {"type": "newidentity", "identity": identity})
        assert deliveries(effects)[0] == (conn, {"type": "newidentity", "approved": "true"}), effects
        return conn

    def owner_of(self, identity: str, room: str) -> ConnId:
        conn = self.login(identity)
        effects = self.send(conn, {"type": "createroom", "roomid": room})
        assert (conn, {"type": "createroom", "roomid": room, "approved": "true"}) in deliveries(effects)
        return conn
