"""Property tests of ChatCore: any sequence of client lines (valid, hostile or random bytes), disconnects,
forced drops, operator actions and cluster answers in any order: no exception escapes, the core's
invariants hold after every step, and every effect is something the shell can apply and the Java client
can read."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cluster.framing import encode
from node.chat import (
    ChatCore,
    Close,
    ConnId,
    Deliver,
    Effect,
    LimitExceeded,
    Multicast,
    ReleaseIdentityRequest,
    ReleaseRoom,
    Request,
)
from tests.unit.test_chat_support import MAIN, REQUESTS, SERVER, FakeView

# Mostly valid names, so that sessions, rooms and moves actually happen; a few invalid ones.
NAMES = ["Alice", "Bob", "Carol", "Dave", "x", "Zoë"]
ROOMS = ["Den", "Den", "Den", "Lab", "Lab", "Far", MAIN, MAIN, "MainHall-s2", "no"]

name = st.sampled_from(NAMES)
room = st.sampled_from(ROOMS)
room_message = st.one_of(
    st.builds(lambda r: {"type": "createroom", "roomid": r}, room),
    st.builds(lambda r: {"type": "joinroom", "roomid": r}, room),
    st.builds(lambda r: {"type": "deleteroom", "roomid": r}, room),
    st.just({"type": "message", "content": "hi"}),
    st.just({"type": "quit"}),
)
client_message = st.one_of(
    room_message,
    st.builds(lambda n: {"type": "newidentity", "identity": n}, name),
    st.builds(lambda n, f, r: {"type": "movejoin", "identity": n, "former": f, "roomid": r}, name, room, room),
    st.just({"type": "list"}),
    st.just({"type": "who"}),
    st.builds(lambda r: {"type": "createroom", "roomid": r}, room),
    st.builds(lambda r: {"type": "joinroom", "roomid": r}, room),
    st.builds(lambda r: {"type": "deleteroom", "roomid": r}, room),
    st.builds(lambda c: {"type": "message", "content": c}, st.text(max_size=20)),
    st.just({"type": "quit"}),
    st.builds(lambda t, v: {"type": t, "identity": v, "roomid": v, "content": v},
              st.sampled_from(["message", "newidentity", "joinroom", "nope", 3]),
              st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=2), st.booleans())),  # fmt: skip
)
valid_line = client_message.map(lambda m: json.dumps(m).encode())
line = st.one_of(
    valid_line,
    valid_line,
    valid_line,
    valid_line,
    st.binary(max_size=40),
    st.sampled_from([b"", b"{", b"[]", b"null", b'{"type":"message","content":"\xff"}', b"9" * 5000]),
)
slot = st.integers(min_value=0, max_value=7)
approve = st.sampled_from([True, True, True, False])


class Harness:
    def __init__(self) -> None:
        self.view = FakeView()
        self.view.add_remote("Far", server="s2")
        self.view.add_remote("MainHall-s2", server="s2", owner="")
        self.core = ChatCore(SERVER, self.view, max_queued_lines=4)
        self.conns: list[ConnId] = []
        self.closed: set[ConnId] = set()
        self.pending: list[Request] = []
        self.next_id = 1

    def conn(self, index: int) -> ConnId:
        # Mostly a live connection (that is where the rules are); sometimes a closed or unknown one.
        live = [c for c in self.conns if c not in self.closed]
        if index == 7 or not live:
            return self.conns[index % len(self.conns)] if self.conns else ConnId(999)
        return live[index % len(live)]

    def check(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Deliver | Multicast):
                targets = [e.conn] if isinstance(e, Deliver) else [c for c in e.conns if c != e.exclude]
                for target in targets:
                    assert target not in self.closed, f"{e} after Close({target})"
                check_message(e.message)
            elif isinstance(e, Close):
                assert e.conn not in self.closed, f"closed twice: {e.conn}"
                self.closed.add(e.conn)
            elif isinstance(e, REQUESTS):
                assert e not in self.pending
                self.pending.append(e)
            else:
                assert isinstance(e, ReleaseIdentityRequest | ReleaseRoom | LimitExceeded), e
        self.core.check_invariants()
        identities = self.core.local_identities()
        assert len(identities) == len(set(identities))

    def run(self, op: tuple[Any, ...]) -> None:
        core = self.core
        match op:
            case ("connect",):
                conn = ConnId(self.next_id)
                self.next_id += 1
                self.conns.append(conn)
                self.check(core.connect(conn))
            case ("line", index, data):
                self.check(core.receive(self.conn(index), data))
            case ("disconnect", index):
                self.check(core.disconnected(self.conn(index)))
            case ("drop", index):
                self.check(core.drop(self.conn(index), "test"))
            case ("resolve", index, ok):
                if self.pending:
                    request = self.pending.pop(index % len(self.pending))
                    self.check(core.resolve(request, ok))
            case ("settle", ok):
                # Answer everything in flight, including what the answers start.
                while self.pending:
                    self.check(core.resolve(self.pending.pop(0), ok))
            case ("kick", identity):
                self.check(core.kick(identity)[1])
            case ("delete", room_id):
                self.check(core.operator_delete_room(room_id)[1])
            case ("end_all", release):
                self.check(core.end_all(release))
            case _:
                raise AssertionError(op)


def check_message(message: dict[str, Any]) -> None:
    """What keeps the Java client alive: a string type, string approved, a digit-string port, ASCII JSON."""
    assert isinstance(message.get("type"), str)
    if "approved" in message:
        assert message["approved"] in ("true", "false")
    if message["type"] == "route":
        assert isinstance(message["port"], str) and message["port"].isdigit()
    encode(message).decode("ascii")


class ChatCoreMachine(RuleBasedStateMachine):
    """Random clients against one core; `login` and `settle` keep it moving into interesting states."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness()

    @rule()
    def connect(self) -> None:
        self.h.run(("connect",))

    @rule(identity=name)
    def login(self, identity: str) -> None:
        self.h.run(("connect",))
        line = json.dumps({"type": "newidentity", "identity": identity}).encode()
        self.h.check(self.h.core.receive(self.h.conns[-1], line))
        self.h.run(("settle", True))

    @rule(index=slot, data=line)
    def send(self, index: int, data: bytes) -> None:
        self.h.run(("line", index, data))

    @rule(index=slot, message=client_message)
    def send_valid(self, index: int, message: dict[str, Any]) -> None:
        self.h.run(("line", index, json.dumps(message).encode()))

    @rule(index=slot, message=client_message)
    def send_and_settle(self, index: int, message: dict[str, Any]) -> None:
        self.h.run(("line", index, json.dumps(message).encode()))
        self.h.run(("settle", True))

    @rule(index=slot, message=room_message, ok=approve)
    def identified_client_acts(self, index: int, message: dict[str, Any], ok: bool) -> None:
        identified = [c for c in self.h.conns if self.h.core.is_identified(c)]
        if identified:
            conn = identified[index % len(identified)]
            self.h.check(self.h.core.receive(conn, json.dumps(message).encode()))
            self.h.run(("settle", ok))

    @rule(first=slot, second=slot, room_id=st.sampled_from(["Den", "Lab"]))
    def create_then_join(self, first: int, second: int, room_id: str) -> None:
        identified = [c for c in self.h.conns if self.h.core.is_identified(c)]
        if len(identified) >= 2:
            for conn, kind in ((identified[first % len(identified)], "createroom"),
                               (identified[second % len(identified)], "joinroom")):  # fmt: skip
                self.h.check(self.h.core.receive(conn, json.dumps({"type": kind, "roomid": room_id}).encode()))
                self.h.run(("settle", True))

    @rule(identity=name)
    def claim_refused(self, identity: str) -> None:
        self.h.run(("connect",))
        line = json.dumps({"type": "newidentity", "identity": identity}).encode()
        self.h.check(self.h.core.receive(self.h.conns[-1], line))
        self.h.run(("settle", False))

    @rule(index=st.integers(min_value=0, max_value=7), ok=approve)
    def resolve_one(self, index: int, ok: bool) -> None:
        self.h.run(("resolve", index, ok))

    @rule(ok=approve)
    def settle(self, ok: bool) -> None:
        self.h.run(("settle", ok))

    @rule(index=slot)
    def disconnect(self, index: int) -> None:
        self.h.run(("disconnect", index))

    @rule(index=slot)
    def drop(self, index: int) -> None:
        self.h.run(("drop", index))

    @rule(identity=name)
    def kick(self, identity: str) -> None:
        self.h.run(("kick", identity))

    @rule(room_id=room)
    def operator_delete(self, room_id: str) -> None:
        self.h.run(("delete", room_id))

    @precondition(lambda self: len(self.h.conns) > 6)
    @rule(release=st.booleans())
    def end_all(self, release: bool) -> None:
        self.h.run(("end_all", release))

    @invariant()
    def consistent(self) -> None:
        self.h.core.check_invariants()

    def teardown(self) -> None:
        # Answer everything still in flight, then every session ends cleanly and nothing is left held.
        h = self.h
        h.run(("settle", True))
        for conn in h.conns:
            h.check(h.core.disconnected(conn))
        h.run(("settle", False))
        assert h.core.session_count == 0 and h.core.local_identities() == []
        assert h.core.local_room_ids() == [MAIN]


ChatCoreMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_chat_core_state_machine = ChatCoreMachine.TestCase


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=30))
def test_any_bytes_as_lines_never_raise(lines: list[bytes]) -> None:
    harness = Harness()
    harness.run(("connect",))
    harness.run(("line", 0, b'{"type":"newidentity","identity":"Alice"}'))
    harness.run(("resolve", 0, True))
    for data in lines:
        harness.run(("line", 0, data))
