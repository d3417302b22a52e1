"""Conformance of a real 3-server cluster to the client protocol (docs/protocol.md), over TCP.

Every message type and its reply, every refusal, every broadcast and exactly its receivers, the orderings the
spec fixes, remote joins in both directions, owner quit, abrupt disconnect, identity reuse, bad input, and
the wire rules that keep the classic Java client alive (checked on *every* line any test receives, by
`Client.recv`).

One cluster per module (`chat_cluster`); each test uses identities and room ids of its own (`uniq`) and
leaves no client behind (`Net` quits them all and waits until every server reports no clients), so a test
only ever sees its own broadcasts and can assert them exactly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import ChatClient, Cluster, wait_until

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{2,15}$")
NOTHING = 0.3  # window for "this client receives nothing" checks
REPLICA_WAIT = 5.0  # bound on a remote replica catching up with a committed change

_seq = itertools.count(1)


def uniq(prefix: str) -> str:
    """A name no other test uses (the cluster is shared by the module)."""
    name = f"{prefix}{next(_seq)}"
    assert NAME.match(name), name
    return name


def hall(server_id: str) -> str:
    return f"MainHall-{server_id}"


def rc(identity: str, former: str, roomid: str) -> dict[str, str]:
    return {"type": "roomchange", "identity": identity, "former": former, "roomid": roomid}


def check_line(line: bytes) -> dict[str, Any]:
    """The framing rules of the spec for one server line; the decoded object."""
    assert line.isascii(), f"server line is not ASCII-only: {line!r}"
    obj = json.loads(line)
    assert isinstance(obj, dict), f"server line is not a JSON object: {line!r}"
    assert isinstance(obj.get("type"), str), f"server line without a string type: {line!r}"
    if "approved" in obj:
        assert obj["approved"] in ("true", "false"), f"approved must be the string true/false: {line!r}"
    if obj["type"] == "route":
        assert isinstance(obj.get("port"), str) and obj["port"].isdigit(), f"route.port must be a string: {line!r}"
    return obj


class Client(ChatClient):
    """`ChatClient` that checks every line it receives against the framing rules (`check_line`)."""

    finished = False

    def recv(self, timeout: float | None = None) -> dict:
        self.sock.settimeout(timeout if timeout is not None else self.timeout)
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError("timed out waiting for a message") from None
            if not chunk:
                raise AssertionError("connection closed by server")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return check_line(line)

    def recv_n(self, count: int) -> list[dict]:
        return [self.recv() for _ in range(count)]

    def ask(self, message: dict) -> dict:
        self.send(message)
        return self.recv()

    def closed(self, timeout: float = 5.0) -> bool:
        done = super().closed(timeout)
        if done:
            self.finished = True
            for line in self.buffer.split(b"\n"):
                if line:
                    check_line(line)
        return done

    def close(self) -> None:
        self.finished = True
        super().close()

    def reset(self) -> None:
        """Abrupt disconnect with a TCP reset (SO_LINGER 0) instead of an orderly FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()


class Net:
    """The clients of one test; all quit (and the servers empty again) at teardown."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.clients: list[Client] = []

    def connect(self, server_id: str) -> Client:
        client = Client.connect(self.cluster.client_address(server_id))
        self.clients.append(client)  # type: ignore[arg-type]
        return client  # type: ignore[return-value]

    def login(self, server_id: str, identity: str) -> Client:
        """A new client on `server_id`: approved, then rc(I, "", M) to itself (reply first)."""
        client = self.connect(server_id)
        client.send({"type": "newidentity", "identity": identity})
        assert client.recv() == {"type": "newidentity", "approved": "true"}, identity
        assert client.recv() == rc(identity, "", hall(server_id))
        return client

    def hall(self, server_id: str, *identities: str) -> list[Client]:
        """Log in several clients on one server; each earlier one sees each later one arrive."""
        clients: list[Client] = []
        for identity in identities:
            client = self.login(server_id, identity)
            for earlier in clients:
                assert earlier.recv() == rc(identity, "", hall(server_id))
            clients.append(client)
        return clients

    def create(self, owner: Client, identity: str, room: str, former: str, others: tuple[Client, ...] = ()) -> None:
        """`owner` creates `room`: reply first, then rc(I, F, R) to I and to `others` (the rest of F)."""
        owner.send({"type": "createroom", "roomid": room})
        assert owner.recv() == {"type": "createroom", "roomid": room, "approved": "true"}
        assert owner.recv() == rc(identity, former, room)
        for other in others:
            assert other.recv() == rc(identity, former, room)

    def refused(self, server_id: str, identity: Any) -> None:
        """newidentity is refused on `server_id`, and the connection closed."""
        client = self.connect(server_id)
        client.send({"type": "newidentity", "identity": identity})
        assert client.recv() == {"type": "newidentity", "approved": "false"}, identity
        assert client.closed(), f"connection not closed after refusing {identity!r}"

    def finish(self) -> None:
        for client in self.clients:
            if client.finished:
                continue
            with contextlib.suppress(OSError, AssertionError):
                client.send({"type": "quit"})
                client.closed(2.0)
            client.close()
        # Every quit is processed before the next test starts (its clients must not see ours leave).
        for server_id in self.cluster.ids:
            wait_until(
                lambda s=server_id: self.cluster.status(s)["clients"] == 0, 5.0, 0.05, f"{server_id} without clients"
            )


@pytest.fixture
def net(chat_cluster: Cluster) -> Iterator[Net]:
    group = Net(chat_cluster)
    try:
        yield group
    finally:
        group.finish()


def roomlist(client: Client) -> list[str]:
    reply = client.ask({"type": "list"})
    assert reply["type"] == "roomlist" and isinstance(reply["rooms"], list), reply
    assert all(isinstance(r, str) for r in reply["rooms"]), reply
    return reply["rooms"]


def wait_listed(client: Client, room: str, present: bool = True, timeout: float = REPLICA_WAIT) -> None:
    """Until `client`'s server lists `room` (or no longer lists it): replicas may lag a commit."""
    deadline = time.monotonic() + timeout
    while (room in roomlist(client)) != present:
        assert time.monotonic() < deadline, f"{room} {'never listed' if present else 'still listed'}"
        time.sleep(0.05)


def who(client: Client) -> dict:
    reply = client.ask({"type": "who"})
    assert reply["type"] == "roomcontents", reply
    return reply


def contents(roomid: str, identities: list[str], owner: str) -> dict:
    return {"type": "roomcontents", "roomid": roomid, "identities": sorted(identities), "owner": owner}


def sorted_who(client: Client) -> dict:
    reply = who(client)
    return {**reply, "identities": sorted(reply["identities"])}


def silent(*clients: Client, within: float = NOTHING) -> None:
    """None of `clients` receives anything (one shared window, not one per client)."""
    deadline = time.monotonic() + within
    for client in clients:
        client.expect_nothing(max(0.01, deadline - time.monotonic()))


# -- newidentity -------------------------------------------------------------------------------------


def test_newidentity_reply_then_roomchange_to_every_mainhall_member(net: Net) -> None:
    a, b = uniq("Ann"), uniq("Bob")
    ca, cb = net.hall("s1", a, b)  # reply first, then rc(I, "", M) to every member, I included
    other = net.login("s2", uniq("Cid"))  # another server's MainHall: nobody on s1 hears of it
    silent(ca, cb, other)
    assert sorted_who(ca) == contents(hall("s1"), [a, b], "")


@pytest.mark.parametrize(
    "identity",
    [
        "ab",  # too short
        "a" * 17,  # too long
        "1abc",  # digit first
        "abc_d",
        "abc-d",
        "abc d",
        "",
        "Ab\u00e7d",  # non-ASCII letter
        "MainHall-s1",
        " abcd",
        "abcd\n",
    ],
)
def test_invalid_identity_refused_and_closed(net: Net, identity: str) -> None:
    net.refused("s1", identity)


def test_name_boundaries_accepted(net: Net) -> None:
    net.login("s1", "Xq7")  # 3 characters (no other test uses these two names)
    net.login("s2", "Yz" + "0123456789abcd")  # 16 characters


def test_taken_identity_refused_on_every_server(net: Net) -> None:
    a = uniq("Taken")
    holder = net.login("s2", a)
    for server_id in ("s1", "s2", "s3"):
        net.refused(server_id, a)
    silent(holder)  # the refused ones never entered a MainHall
    # Case-sensitive: another spelling is another identity.
    net.login("s1", a.swapcase())
    assert who(holder)["identities"] == [a]


def test_identities_and_room_ids_are_separate_namespaces(net: Net) -> None:
    a, room = uniq("Nsa"), uniq("Nsr")
    ca = net.login("s1", a)
    net.create(ca, a, a, hall("s1"))  # a room named like an identity
    cr = net.login("s2", room)
    net.create(cr, room, room, hall("s2"))
    net.refused("s3", a)  # ... but the identity itself is still taken


def test_second_newidentity_is_ignored(net: Net) -> None:
    a, b, c = uniq("Once"), uniq("Twice"), uniq("Watch")
    ca, cw = net.hall("s1", a, c)
    ca.send({"type": "newidentity", "identity": b})
    ca.send({"type": "newidentity", "identity": a})
    silent(ca, cw)
    assert sorted_who(ca) == contents(hall("s1"), [a, c], "")
    net.login("s3", b)  # never claimed


# -- list / who ---------------------------------------------------------------------------------------


def test_list_shows_every_mainhall_and_created_rooms_and_drops_deleted(net: Net) -> None:
    owners = {sid: uniq("Lst") for sid in ("s1", "s2", "s3")}
    rooms = {sid: uniq("Lroom") for sid in ("s1", "s2", "s3")}
    clients = {}
    for sid, identity in owners.items():
        clients[sid] = net.login(sid, identity)
        net.create(clients[sid], identity, rooms[sid], hall(sid))
    everything = {hall("s1"), hall("s2"), hall("s3"), *rooms.values()}
    for sid, client in clients.items():
        assert rooms[sid] in roomlist(client)  # its own server lists it at once
        deadline = time.monotonic() + REPLICA_WAIT
        while not everything <= set(listed := roomlist(client)):
            assert time.monotonic() < deadline, (sid, listed)
            time.sleep(0.05)
        assert len(listed) == len(set(listed)), f"duplicates in {listed}"
    c1 = clients["s1"]
    c1.send({"type": "deleteroom", "roomid": rooms["s1"]})
    assert sorted(c1.recv_n(2), key=str) == sorted(
        [{"type": "deleteroom", "roomid": rooms["s1"], "approved": "true"}, rc(owners["s1"], rooms["s1"], hall("s1"))],
        key=str,
    )
    assert rooms["s1"] not in roomlist(c1)
    for sid in ("s2", "s3"):
        wait_listed(clients[sid], rooms["s1"], present=False)


def test_who_in_mainhall_and_in_an_owned_room(net: Net) -> None:
    a, b, room = uniq("Who"), uniq("Whom"), uniq("Wroom")
    ca, cb = net.hall("s2", a, b)
    assert sorted_who(cb) == contents(hall("s2"), [a, b], "")
    net.create(ca, a, room, hall("s2"), (cb,))
    assert who(ca) == {"type": "roomcontents", "roomid": room, "identities": [a], "owner": a}
    cb.send({"type": "joinroom", "roomid": room})
    assert cb.recv() == rc(b, hall("s2"), room)
    assert ca.recv() == rc(b, hall("s2"), room)
    assert sorted_who(cb) == contents(room, [a, b], a)
    assert sorted_who(ca) == contents(room, [a, b], a)


# -- createroom ---------------------------------------------------------------------------------------


def test_createroom_reply_first_then_roomchange_to_former_room(net: Net) -> None:
    a, b, room = uniq("Cra"), uniq("Crb"), uniq("Croom")
    ca, cb = net.hall("s1", a, b)
    elsewhere = net.login("s3", uniq("Crc"))
    net.create(ca, a, room, hall("s1"), (cb,))
    silent(ca, cb, elsewhere)


def test_createroom_refusals(net: Net) -> None:
    a, b, room = uniq("Crf"), uniq("Crg"), uniq("Crr")
    ca, cb = net.hall("s1", a, b)
    fo, remote = uniq("Crh"), uniq("Crs")
    far = net.login("s2", fo)
    net.create(ca, a, room, hall("s1"), (cb,))
    net.create(far, fo, remote, hall("s2"))
    near = net.login("s2", uniq("Cri"))  # a non-owner on the other server
    wait_listed(cb, remote)
    wait_listed(near, room)

    def refuse(client: Client, roomid: Any) -> None:
        assert client.ask({"type": "createroom", "roomid": roomid}) == {
            "type": "createroom",
            "roomid": roomid,
            "approved": "false",
        }

    for bad in ["ab", "r" * 17, "1room", "room-1", "room_1", "", "r\u00f6om", "MainHall-s1", "MainHall-s2", "My room"]:
        refuse(cb, bad)
    refuse(cb, room)  # exists here
    refuse(cb, remote)  # exists on another server
    refuse(cb, hall("s1"))
    refuse(ca, uniq("Second"))  # one owned room per client
    refuse(near, room)  # exists on another server
    refuse(near, remote)  # exists on this server
    silent(ca, cb, far, near)  # refusals send nothing else
    assert sorted_who(cb) == contents(hall("s1"), [b], "")
    assert sorted_who(ca) == contents(room, [a], a)
    assert sorted_who(far) == contents(remote, [fo], fo)


# -- joinroom -----------------------------------------------------------------------------------------


def test_joinroom_local_roomchange_to_former_room_new_room_and_requester(net: Net) -> None:
    o, j, w = uniq("Jlo"), uniq("Jlj"), uniq("Jlw")
    room = uniq("Jlroom")
    co, cj, cw = net.hall("s3", o, j, w)
    net.create(co, o, room, hall("s3"), (cj, cw))
    elsewhere = net.login("s1", uniq("Jlx"))
    cj.send({"type": "joinroom", "roomid": room})
    for client in (cj, cw, co):  # I, the remaining members of F, the members of R: once each
        assert client.recv() == rc(j, hall("s3"), room)
    silent(co, cj, cw, elsewhere)
    # And back to MainHall.
    cj.send({"type": "joinroom", "roomid": hall("s3")})
    for client in (cj, cw, co):
        assert client.recv() == rc(j, room, hall("s3"))
    silent(co, cj, cw)


def test_joinroom_refusals_answer_only_the_requester(net: Net) -> None:
    o, j = uniq("Jro"), uniq("Jrj")
    room = uniq("Jrroom")
    co, cj = net.hall("s1", o, j)
    net.create(co, o, room, hall("s1"), (cj,))
    far = net.login("s2", uniq("Jrf"))
    remote = uniq("Jrremote")
    net.create(far, who(far)["identities"][0], remote, hall("s2"))

    def refused(client: Client, identity: str, current: str, roomid: str) -> None:
        reply = client.ask({"type": "joinroom", "roomid": roomid})
        assert reply["type"] == "roomchange" and reply["identity"] == identity, reply
        assert reply["former"] == reply["roomid"] in (current, roomid), reply

    refused(cj, j, hall("s1"), uniq("Nosuch"))  # exists nowhere
    refused(cj, j, hall("s1"), "bad name!")
    refused(cj, j, hall("s1"), hall("s1"))  # already there
    refused(co, o, room, room)  # already there
    refused(co, o, room, hall("s1"))  # an owner cannot leave its room
    wait_listed(co, remote)
    refused(co, o, room, remote)  # ... not even for another server
    silent(co, cj, far)
    assert sorted_who(co) == contents(room, [o], o)
    assert sorted_who(cj) == contents(hall("s1"), [j], "")


@pytest.mark.parametrize(("src", "dst"), [("s1", "s2"), ("s2", "s1"), ("s3", "s2")])
def test_remote_join_route_movejoin_serverchange(net: Net, src: str, dst: str) -> None:
    o, j, w = uniq("Rjo"), uniq("Rjj"), uniq("Rjw")
    room = uniq("Rjroom")
    co = net.login(dst, o)
    net.create(co, o, room, hall(dst))
    cj, cw = net.hall(src, j, w)
    wait_listed(cj, room)

    cj.send({"type": "joinroom", "roomid": room})
    host, port = net.cluster.client_address(dst)
    # Only the route, no roomchange before (or after) it on the old connection.
    assert cj.recv() == {"type": "route", "roomid": room, "host": host, "port": str(port)}
    assert cw.recv() == rc(j, hall(src), room)  # the remaining members of F
    silent(cj, cw, co)
    cj.close()  # the client closes the old connection itself: not a quit
    silent(cw)
    third = next(s for s in ("s1", "s2", "s3") if s not in (src, dst))
    net.refused(third, j)  # in transit, the identity is still reserved

    moved = net.connect(dst)
    moved.send({"type": "movejoin", "identity": j, "former": hall(src), "roomid": room})
    assert moved.recv() == {"type": "serverchange", "approved": "true", "serverid": dst}  # first
    assert moved.recv() == rc(j, hall(src), room)
    assert co.recv() == rc(j, hall(src), room)
    silent(cw, moved, co)
    assert sorted_who(moved) == contents(room, [o, j], o)
    assert sorted_who(cw) == contents(hall(src), [w], "")

    # It is a full member over there; and its identity now lives there (still taken everywhere).
    moved.send({"type": "message", "content": "arrived"})
    assert co.recv() == {"type": "message", "identity": j, "content": "arrived"}
    net.refused(third, j)
    net.refused(src, j)

    # And back again, the other direction, into the old server's MainHall.
    moved.send({"type": "joinroom", "roomid": hall(src)})
    host, port = net.cluster.client_address(src)
    assert moved.recv() == {"type": "route", "roomid": hall(src), "host": host, "port": str(port)}
    assert co.recv() == rc(j, room, hall(src))
    moved.close()
    back = net.connect(src)
    back.send({"type": "movejoin", "identity": j, "former": room, "roomid": hall(src)})
    assert back.recv() == {"type": "serverchange", "approved": "true", "serverid": src}
    assert back.recv() == rc(j, room, hall(src))
    assert cw.recv() == rc(j, room, hall(src))
    silent(back, cw, co)


def test_movejoin_to_a_room_deleted_meanwhile_lands_in_mainhall(net: Net) -> None:
    o, j = uniq("Mdo"), uniq("Mdj")
    room = uniq("Mdroom")
    co = net.login("s2", o)
    net.create(co, o, room, hall("s2"))
    cj = net.login("s1", j)
    wait_listed(cj, room)
    cj.send({"type": "joinroom", "roomid": room})
    assert cj.recv()["type"] == "route"
    cj.close()
    co.send({"type": "deleteroom", "roomid": room})
    assert sorted(co.recv_n(2), key=str) == sorted(
        [{"type": "deleteroom", "roomid": room, "approved": "true"}, rc(o, room, hall("s2"))], key=str
    )
    moved = net.connect("s2")
    moved.send({"type": "movejoin", "identity": j, "former": hall("s1"), "roomid": room})
    assert moved.recv() == {"type": "serverchange", "approved": "true", "serverid": "s2"}
    assert moved.recv() == rc(j, hall("s1"), hall("s2"))
    assert co.recv() == rc(j, hall("s1"), hall("s2"))
    assert sorted_who(moved) == contents(hall("s2"), [o, j], "")


def test_movejoin_of_an_unknown_identity_to_no_room_is_accepted_into_mainhall(net: Net) -> None:
    j = uniq("Mnj")
    watcher = net.login("s3", uniq("Mnw"))
    moved = net.connect("s3")
    moved.send({"type": "movejoin", "identity": j, "former": hall("s1"), "roomid": uniq("Nowhere")})
    assert moved.recv() == {"type": "serverchange", "approved": "true", "serverid": "s3"}
    assert moved.recv() == rc(j, hall("s1"), hall("s3"))
    assert watcher.recv() == rc(j, hall("s1"), hall("s3"))
    net.refused("s1", j)  # recorded in the registry as living on s3


def test_movejoin_for_an_identity_held_elsewhere_is_refused_and_closed(net: Net) -> None:
    a = uniq("Mha")
    holder = net.login("s1", a)
    for server_id in ("s2", "s1"):
        intruder = net.connect(server_id)
        intruder.send({"type": "movejoin", "identity": a, "former": hall("s1"), "roomid": hall(server_id)})
        reply = intruder.recv()
        assert reply["type"] == "serverchange" and reply["approved"] == "false", reply
        assert intruder.closed()
    silent(holder)
    assert who(holder)["identities"] == [a]


# -- deleteroom ---------------------------------------------------------------------------------------


def test_deleteroom_moves_every_member_to_mainhall(net: Net) -> None:
    o, m, w = uniq("Dlo"), uniq("Dlm"), uniq("Dlw")
    room = uniq("Dlroom")
    co, cm, cw = net.hall("s1", o, m, w)
    net.create(co, o, room, hall("s1"), (cm, cw))
    cm.send({"type": "joinroom", "roomid": room})
    for client in (cm, cw, co):
        assert client.recv() == rc(m, hall("s1"), room)
    elsewhere = net.login("s2", uniq("Dlx"))

    co.send({"type": "deleteroom", "roomid": room})
    moves = [rc(o, room, hall("s1")), rc(m, room, hall("s1"))]
    reply = {"type": "deleteroom", "roomid": room, "approved": "true"}
    got = co.recv_n(3)
    assert reply in got, got  # either order of the reply and the roomchanges
    assert sorted([x for x in got if x != reply], key=str) == sorted(moves, key=str)
    for client in (cm, cw):  # every member of MainHall after the move
        assert sorted(client.recv_n(2), key=str) == sorted(moves, key=str)
    silent(co, cm, cw, elsewhere)
    assert sorted_who(cw) == contents(hall("s1"), [o, m, w], "")
    assert room not in roomlist(co)
    wait_listed(elsewhere, room, present=False)
    # No longer an owner: it may move, and create again (even the same name).
    net.create(co, o, room, hall("s1"), (cm, cw))


def test_deleteroom_refusals(net: Net) -> None:
    o, m = uniq("Dro"), uniq("Drm")
    room = uniq("Drroom")
    co, cm = net.hall("s1", o, m)
    net.create(co, o, room, hall("s1"), (cm,))
    cm.send({"type": "joinroom", "roomid": room})
    assert cm.recv() == rc(m, hall("s1"), room)
    assert co.recv() == rc(m, hall("s1"), room)
    fo = uniq("Drf")
    far = net.login("s2", fo)
    remote = uniq("Drremote")
    net.create(far, fo, remote, hall("s2"))
    wait_listed(co, remote)

    def refuse(client: Client, roomid: str) -> None:
        assert client.ask({"type": "deleteroom", "roomid": roomid}) == {
            "type": "deleteroom",
            "roomid": roomid,
            "approved": "false",
        }

    refuse(cm, room)  # not the owner (a member)
    refuse(co, remote)  # not hosted here (and not its own)
    refuse(far, room)  # not hosted there
    refuse(co, hall("s1"))
    refuse(co, hall("s2"))
    refuse(far, hall("s2"))
    refuse(co, uniq("Nosuch"))
    refuse(co, "bad name!")
    silent(co, cm, far)
    assert sorted_who(cm) == contents(room, [o, m], o)
    assert room in roomlist(cm)


# -- message ------------------------------------------------------------------------------------------


def test_message_goes_to_the_others_in_the_room_only(net: Net) -> None:
    a, b, c, d = uniq("Msa"), uniq("Msb"), uniq("Msc"), uniq("Msd")
    room = uniq("Msroom")
    ca, cb, cc, cd = net.hall("s2", a, b, c, d)
    net.create(cd, d, room, hall("s2"), (ca, cb, cc))
    elsewhere = net.login("s1", uniq("Mse"))
    for content in ["hello", "", "h\u00e9llo \u2603 \U0001f600", 'quote " and \\ and\nnewline', " " * 3]:
        ca.send({"type": "message", "content": content})
        for client in (cb, cc):
            assert client.recv() == {"type": "message", "identity": a, "content": content}
    silent(ca, cb, cc, cd, elsewhere)  # never echoed; not to other rooms or servers
    cd.send({"type": "message", "content": "alone"})
    silent(ca, cb, cc, cd)


# -- quit and abrupt disconnect ----------------------------------------------------------------------


def test_quit_roomchange_to_self_and_room_then_close_and_reuse(net: Net) -> None:
    a, b = uniq("Qa"), uniq("Qb")
    ca, cb = net.hall("s1", a, b)
    ca.send({"type": "quit"})
    assert ca.recv() == rc(a, hall("s1"), "")
    assert ca.closed()
    assert cb.recv() == rc(a, hall("s1"), "")
    silent(cb)
    net.login("s2", a)  # released: reusable at once, on any server


def test_identity_and_room_free_on_any_server_as_soon_as_quit_closes(net: Net) -> None:
    """quit: "Release I (and its room) in the registry; close the connection", in that order. A client
    that sees its quit connection close and logs in elsewhere at once must find its name (and room) free."""
    for src, dst in [("s1", "s2"), ("s2", "s3"), ("s3", "s1")]:
        a, room = uniq("Again"), uniq("Agroom")
        ca = net.login(src, a)
        net.create(ca, a, room, hall(src))
        ca.send({"type": "quit"})
        assert ca.recv() == rc(a, room, "")
        assert ca.closed()
        again = net.connect(dst)
        again.send({"type": "newidentity", "identity": a})
        assert again.recv() == {"type": "newidentity", "approved": "true"}, f"{a} refused on {dst} after quit"
        assert again.recv() == rc(a, "", hall(dst))
        net.create(again, a, room, hall(dst))


def test_owner_quit_dissolves_its_room(net: Net) -> None:
    o, m, w = uniq("Oqo"), uniq("Oqm"), uniq("Oqw")
    room = uniq("Oqroom")
    co, cm, cw = net.hall("s3", o, m, w)
    net.create(co, o, room, hall("s3"), (cm, cw))
    cm.send({"type": "joinroom", "roomid": room})
    for client in (cm, cw, co):
        assert client.recv() == rc(m, hall("s3"), room)
    co.send({"type": "quit"})
    assert co.recv() == rc(o, room, "")
    assert co.closed()
    assert cm.recv_n(2) == [rc(o, room, ""), rc(m, room, hall("s3"))]
    assert cw.recv() == rc(m, room, hall("s3"))
    silent(cm, cw)
    assert sorted_who(cm) == contents(hall("s3"), [m, w], "")
    assert room not in roomlist(cm)
    # The name and the room id are free again.
    co2 = net.login("s1", o)
    net.create(co2, o, room, hall("s1"))


@pytest.mark.parametrize("how", ["eof", "reset"])
def test_abrupt_disconnect_is_a_quit_for_the_others(net: Net, how: str) -> None:
    o, m, w = uniq("Abo"), uniq("Abm"), uniq("Abw")
    room = uniq("Abroom")
    co, cm, cw = net.hall("s2", o, m, w)
    net.create(co, o, room, hall("s2"), (cm, cw))
    cm.send({"type": "joinroom", "roomid": room})
    for client in (cm, cw, co):
        assert client.recv() == rc(m, hall("s2"), room)
    co.reset() if how == "reset" else co.close()
    assert cm.recv_n(2) == [rc(o, room, ""), rc(m, room, hall("s2"))]
    assert cw.recv() == rc(m, room, hall("s2"))
    silent(cm, cw)
    assert sorted_who(cm) == contents(hall("s2"), [m, w], "")
    # A member leaving abruptly: the same quit roomchange.
    cw.reset() if how == "reset" else cw.close()
    assert cm.recv() == rc(w, hall("s2"), "")
    # Both names are free again (the release is asynchronous: allow it a moment).
    for identity in (o, w):
        wait_until(lambda i=identity: _try_login(net, "s1", i), REPLICA_WAIT, 0.1, f"{identity} released")


def _try_login(net: Net, server_id: str, identity: str) -> bool:
    client = net.connect(server_id)
    client.send({"type": "newidentity", "identity": identity})
    if client.recv() == {"type": "newidentity", "approved": "true"}:
        assert client.recv() == rc(identity, "", hall(server_id))
        return True
    assert client.closed()
    return False


# -- bad input ----------------------------------------------------------------------------------------

BAD_LINES = [
    b"not json",
    b"{",
    b"[1, 2]",
    b"42",
    b'"a string"',
    b"null",
    b"\xff\xfe garbage",
    b'{"no": "type"}',
    b'{"type": "bogus"}',
    b'{"type": 5}',
    b'{"type": null}',
    b'{"type": ["list"]}',
    b'{"type": "joinroom", "roomid": 5}',
    b'{"type": "joinroom"}',
    b'{"type": "createroom", "roomid": null}',
    b'{"type": "deleteroom", "roomid": {"a": 1}}',
    b'{"type": "message", "content": null}',
    b'{"type": "message", "content": ["x"]}',
    b'{"type": "message"}',
    b'{"type": "newidentity", "identity": 123}',
    b'{"type": "movejoin", "identity": "Abcdef"}',
]


def _error(client: Client) -> None:
    reply = client.recv()
    assert reply["type"] == "error" and isinstance(reply.get("reason"), str), reply


def test_bad_input_gets_an_error_and_the_session_goes_on(net: Net) -> None:
    a, b = uniq("Bad"), uniq("Bystand")
    ca, cb = net.hall("s1", a, b)
    for line in BAD_LINES:
        ca.send_raw(line + b"\n")
        _error(ca)
    silent(ca, cb)
    assert sorted_who(ca) == contents(hall("s1"), [a, b], "")
    ca.send({"type": "message", "content": "still here"})
    assert cb.recv() == {"type": "message", "identity": a, "content": "still here"}


def test_bad_input_before_login_gets_an_error_and_login_still_works(net: Net) -> None:
    a = uniq("Early")
    client = net.connect("s2")
    for line in BAD_LINES[:12]:
        client.send_raw(line + b"\n")
        _error(client)
    client.send({"type": "newidentity", "identity": a})
    assert client.recv() == {"type": "newidentity", "approved": "true"}
    assert client.recv() == rc(a, "", hall("s2"))


def test_extra_fields_are_ignored_and_crlf_accepted(net: Net) -> None:
    a = uniq("Extra")
    ca = net.login("s3", a)
    ca.send({"type": "who", "extra": [1, 2, 3]})
    assert ca.recv()["type"] == "roomcontents"
    ca.send_raw(b'{"type":"list"}\r\n')
    assert ca.recv()["type"] == "roomlist"


def test_overlong_line_disconnects_as_an_abrupt_quit(net: Net) -> None:
    a, b = uniq("Long"), uniq("Short")
    ca, cb = net.hall("s2", a, b)
    with contextlib.suppress(OSError):
        ca.send_raw(b'{"type":"message","content":"' + b"x" * (1024 * 1024) + b'"}\n')
    assert cb.recv() == rc(a, hall("s2"), "")
    assert ca.closed()
    silent(cb)
