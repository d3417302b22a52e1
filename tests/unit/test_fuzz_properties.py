"""Fuzzing (issue 8): property tests of the framing, the client schema and the chat core over arbitrary
byte streams, plus a short run of the atheris harness (fuzz/fuzz_decoder.py).

The framing tests check `LineDecoder` against an executable specification (split the whole stream on
newlines), so any chunking of any stream must give exactly the same lines and the same over-long verdict.
The chat-core test drives several connections the way `node.server` does (bytes -> `LineDecoder` ->
`ChatCore.receive`, an over-long line is a drop), interleaved with cluster answers and disconnects; after
every step no exception has escaped, the core's invariants hold, nothing is sent to a closed connection and
every line sent is one the Java client can read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cluster.framing import FrameError, LineDecoder, LineTooLong, decode_object, encode
from node import protocol as wire
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
)
from tests.unit.test_chat_support import MAIN, REQUESTS, SERVER, FakeView

REPO = Path(__file__).resolve().parents[2]
FUZZER = REPO / "fuzz" / "fuzz_decoder.py"
# How long CI runs the atheris harness (longer runs are by hand, see fuzz/fuzz_decoder.py).
ATHERIS_CI_SECONDS = 10

SMALL_LIMIT = 48  # line limit for the framing properties: over-long lines happen often


# -- framing -------------------------------------------------------------------------------------------


def spec_lines(stream: bytes, limit: int) -> tuple[list[bytes], bool]:
    """What `LineDecoder(limit)` must deliver for `stream`, however it is chunked: the complete lines (one
    CR before the newline stripped) before the first part longer than `limit`, and whether there is one."""
    parts = stream.split(b"\n")
    lines: list[bytes] = []
    for index, part in enumerate(parts):
        if len(part) > limit:
            return lines, True
        if index < len(parts) - 1:
            lines.append(part[:-1] if part.endswith(b"\r") else part)
    return lines, False


# Streams rich in newlines, CRs and near-limit runs, not just uniform random bytes.
stream_piece = st.one_of(
    st.binary(max_size=30),
    st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n", b"x" * SMALL_LIMIT, b"y" * (SMALL_LIMIT - 1) + b"\r\n"]),
    st.integers(0, 2 * SMALL_LIMIT).map(lambda n: b"z" * n),
)
stream = st.lists(stream_piece, max_size=20).map(b"".join)


def feed_chunked(decoder: LineDecoder, data: bytes, cuts: list[int]) -> tuple[list[bytes], bool]:
    got: list[bytes] = []
    previous = 0
    for cut in [*sorted(cuts), len(data)]:
        try:
            got.extend(decoder.feed(data[previous:cut]))
        except LineTooLong as exc:
            got.extend(exc.lines)
            return got, True
        previous = cut
    return got, False


@settings(max_examples=400, deadline=None)
@given(stream, st.data())
def test_decoder_delivers_exactly_the_specified_lines_under_any_chunking(data: bytes, draw: st.DataObject) -> None:
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=12))
    decoder = LineDecoder(SMALL_LIMIT)
    got, too_long = feed_chunked(decoder, data, cuts)
    want, want_too_long = spec_lines(data, SMALL_LIMIT)
    assert (got, too_long) == (want, want_too_long)
    if not too_long:
        # What it buffers is exactly the unterminated tail: nothing lost, nothing kept twice.
        assert decoder.pending == len(data) - (data.rfind(b"\n") + 1) <= SMALL_LIMIT


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=SMALL_LIMIT + 8), max_size=40))
def test_decoder_memory_stays_bounded_by_limit_plus_one_chunk(chunks: list[bytes]) -> None:
    decoder = LineDecoder(SMALL_LIMIT)
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except LineTooLong:
            return
        assert decoder.pending <= SMALL_LIMIT


# JSON values of every shape, and bytes near JSON: decode_object must answer a dict or FrameError.
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
json_ish = st.one_of(
    json_value.map(lambda v: json.dumps(v).encode()),
    json_value.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.binary(max_size=64),
    st.sampled_from(
        [
            b'{"type":"message","content":"\\ud800"}',  # lone surrogate escape
            b'{"type":"message","content":"\xed\xa0\x80"}',  # surrogate encoded as raw (invalid) UTF-8
            b'{"a":1}' + b" " * 10,
            b"\xef\xbb\xbf{}",  # UTF-8 BOM
            b"NaN",
            b'{"x":Infinity}',
            b'{"type":"list","type":"who"}',
            b"1" * 4301,
            b'{"a":' * 5000 + b"1" + b"}" * 5000,
            b"[" * 50000,
        ]
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_ish)
def test_decode_object_returns_a_dict_or_raises_frame_error_only(line: bytes) -> None:
    try:
        value = decode_object(line)
    except FrameError as exc:
        encode(wire.error(str(exc))).decode("ascii")
        return
    assert isinstance(value, dict)


# -- client schema -----------------------------------------------------------------------------------

FIELDS = {
    "newidentity": ("identity",),
    "movejoin": ("identity", "former", "roomid"),
    "createroom": ("roomid",),
    "joinroom": ("roomid",),
    "deleteroom": ("roomid",),
    "message": ("content",),
    "list": (),
    "who": (),
    "quit": (),
}
type_value = st.one_of(st.sampled_from([*FIELDS, "error", "roomchange", "", "MESSAGE"]), json_value)
field_value = st.one_of(st.text(max_size=10), json_value)
wire_object = st.builds(
    lambda t, fields, extra: {"type": t, **fields, **extra},
    type_value,
    st.dictionaries(st.sampled_from(["identity", "former", "roomid", "content"]), field_value, max_size=4),
    st.dictionaries(st.text(max_size=6), json_value, max_size=2),
) | st.dictionaries(st.text(max_size=6), json_value, max_size=4)


@settings(max_examples=500, deadline=None)
@given(wire_object)
def test_from_wire_accepts_exactly_well_typed_messages(obj: dict[str, Any]) -> None:
    kind = obj.get("type")
    well_typed = isinstance(kind, str) and kind in FIELDS and all(isinstance(obj.get(f), str) for f in FIELDS[kind])
    try:
        message = wire.from_wire(obj)
    except wire.ProtocolError as exc:
        assert not well_typed, (obj, exc.reason)
        reply = encode(wire.error(exc.reason))
        assert reply.count(b"\n") == 1 and len(reply) < 200  # a hostile type name is not echoed in full
        return
    assert well_typed and isinstance(kind, str), obj
    for f in FIELDS[kind]:
        assert getattr(message, f) == obj[f]


# -- the chat core over arbitrary byte streams -------------------------------------------------------

NAMES = ["Alice", "Bob", "Carol", "x1", "Zoë"]
ROOMS = ["Den", "Lab", "Far", MAIN, "MainHall-s2", "no"]

valid_message = st.one_of(
    st.builds(lambda n: {"type": "newidentity", "identity": n}, st.sampled_from(NAMES)),
    st.builds(lambda n, r: {"type": "movejoin", "identity": n, "former": "MainHall-s2", "roomid": r},
              st.sampled_from(NAMES), st.sampled_from(ROOMS)),  # fmt: skip
    st.builds(lambda k, r: {"type": k, "roomid": r},
              st.sampled_from(["createroom", "joinroom", "deleteroom"]), st.sampled_from(ROOMS)),  # fmt: skip
    st.builds(lambda c: {"type": "message", "content": c}, st.text(max_size=12)),
    st.sampled_from([{"type": "list"}, {"type": "who"}, {"type": "quit"}]),
)
piece = st.one_of(
    valid_message.map(lambda m: json.dumps(m).encode() + b"\n"),
    valid_message.map(lambda m: json.dumps(m).encode() + b"\r\n"),
    valid_message.map(lambda m: json.dumps(m).encode()[: len(json.dumps(m)) // 2]),  # cut short
    st.binary(max_size=24),
    json_ish.map(lambda b: b[:80] + b"\n"),
    st.sampled_from([b"\n", b"\xff\xfe\n", b'{"type":', b"}\n", b"z" * 300]),  # z*300: over the limit
)
CORE_LINE_LIMIT = 256
MAX_CONNS = 5

conn_index = st.integers(0, MAX_CONNS - 1)
login = st.sampled_from(NAMES).map(lambda n: {"type": "newidentity", "identity": n})
room_request = st.builds(
    lambda k, r: {"type": k, "roomid": r},
    st.sampled_from(["createroom", "joinroom", "deleteroom"]),
    st.sampled_from(["Den", "Lab", "Den", "Lab", "Far", MAIN]),
)
raw_bytes = st.tuples(st.just("bytes"), conn_index, st.lists(piece, min_size=1, max_size=4), st.data())
approve = st.sampled_from([True, True, True, False])


def settled(message: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[tuple[Any, ...]]:
    """A line the "coordinator" answers at once: gets sessions into rich states (rooms, owners, routes)."""
    return st.tuples(st.just("settled"), conn_index, message, approve)


op = st.one_of(
    raw_bytes,
    settled(room_request),
    settled(login),
    raw_bytes,
    settled(room_request),
    settled(valid_message),
    st.tuples(st.just("resolve"), st.integers(0, 7), approve),
    st.tuples(st.sampled_from(["disconnect", "drop"]), conn_index),
)


class Shell:
    """The part of node.server that matters here: one LineDecoder per connection, an over-long line is a
    drop, cluster requests are answered later in any order. Checks every effect as it comes out."""

    def __init__(self) -> None:
        view = FakeView()
        view.add_remote("Far", server="s2")
        view.add_remote("MainHall-s2", server="s2", owner="")
        self.core = ChatCore(SERVER, view, max_queued_lines=8)
        self.decoders: dict[ConnId, LineDecoder] = {}
        self.slots: list[ConnId] = []  # slot -> its current connection; an ended one is replaced
        self.closed: set[ConnId] = set()
        self.eof: set[ConnId] = set()
        self.pending: list[Any] = []
        self.seen: Counter[str] = Counter()  # message types sent (how deep the run got: see the events)
        self.most_clients = 0
        for _ in range(MAX_CONNS):
            self.slots.append(self.connect())

    def connect(self) -> ConnId:
        conn = ConnId(len(self.decoders) + 1)
        self.decoders[conn] = LineDecoder(CORE_LINE_LIMIT)
        self.check(self.core.connect(conn))
        return conn

    def conn(self, index: int) -> ConnId:
        """The connection in slot `index`; a new one if that one ended (clients come back)."""
        conn = self.slots[index]
        if conn in self.closed or conn in self.eof:
            conn = self.slots[index] = self.connect()
        return conn

    def check(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Deliver | Multicast):
                targets = [e.conn] if isinstance(e, Deliver) else [c for c in e.conns if c != e.exclude]
                for target in targets:
                    assert target not in self.closed, f"{e} after Close({target})"
                check_client_readable(e.message)
                self.seen[e.message["type"] if e.message.get("approved") != "false" else "refused"] += 1
            elif isinstance(e, Close):
                assert e.conn not in self.closed, f"closed twice: {e.conn}"
                self.closed.add(e.conn)
            elif isinstance(e, REQUESTS):
                self.pending.append(e)
            else:
                assert isinstance(e, ReleaseIdentityRequest | ReleaseRoom | LimitExceeded), e
        self.core.check_invariants()
        self.most_clients = max(self.most_clients, self.core.client_count)

    def bytes_in(self, conn: ConnId, data: bytes) -> None:
        if conn in self.eof or conn in self.closed:
            return  # the shell stops reading a connection once it ended
        try:
            lines, too_long = self.decoders[conn].feed(data), False
        except LineTooLong as exc:
            lines, too_long = exc.lines, True
        for line in lines:
            self.check(self.core.receive(conn, line))
            if conn in self.closed:
                return
        if too_long:
            self.check(self.core.drop(conn, "line too long"))

    def run(self, step: tuple[Any, ...]) -> None:
        match step:
            case ("bytes", index, pieces, draw):
                data = b"".join(pieces)
                cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=3)))
                conn = self.conn(index)
                previous = 0
                for cut in [*cuts, len(data)]:
                    self.bytes_in(conn, data[previous:cut])
                    previous = cut
            case ("settled", index, message, ok):
                conn = self.conn(index)
                identified = [c for c in self.slots if self.core.is_identified(c)]
                if message["type"] not in ("newidentity", "movejoin") and identified:
                    conn = identified[index % len(identified)]  # where the rules are
                # A leading newline ends whatever partial line came before (that line gets its error).
                self.bytes_in(conn, b"\n" + json.dumps(message).encode() + b"\n")
                while self.pending:
                    self.check(self.core.resolve(self.pending.pop(0), ok))
            case ("resolve", index, ok):
                if self.pending:
                    self.check(self.core.resolve(self.pending.pop(index % len(self.pending)), ok))
            case ("disconnect", index):
                conn = self.slots[index]
                if conn not in self.eof:
                    self.eof.add(conn)
                    self.check(self.core.disconnected(conn))
            case ("drop", index):
                self.check(self.core.drop(self.slots[index], "test"))
            case _:
                raise AssertionError(step)

    def finish(self) -> None:
        """Answer everything, end every connection: nothing may be left held."""
        for conn in self.decoders:
            if conn not in self.eof:
                self.eof.add(conn)
                self.check(self.core.disconnected(conn))
            while self.pending:
                self.check(self.core.resolve(self.pending.pop(0), True))
        assert self.core.session_count == 0, self.core.snapshot()
        assert self.core.local_identities() == [] and self.core.local_room_ids() == [MAIN]


def check_client_readable(message: dict[str, Any]) -> None:
    """What keeps the Java client alive: a string type, string approved, a digit-string port, ASCII JSON."""
    assert isinstance(message.get("type"), str), message
    if "approved" in message:
        assert message["approved"] in ("true", "false"), message
    if message["type"] == "route":
        assert isinstance(message["port"], str) and message["port"].isdigit()
    line = encode(message)
    line.decode("ascii")
    assert line.count(b"\n") == 1


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(op, min_size=10, max_size=80))
def test_chat_core_survives_any_byte_streams_from_many_clients(steps: list[tuple[Any, ...]]) -> None:
    shell = Shell()
    for step in steps:
        shell.run(step)
    event(f"most identified clients at once: {min(shell.most_clients, 3)}")
    event(f"rooms created: {shell.seen['createroom'] > 0}, routed: {shell.seen['route'] > 0}")
    shell.finish()


garbage_line = st.one_of(
    st.binary(max_size=40).filter(lambda b: not _parses_to_message(b)),
    json_value.map(lambda v: json.dumps(v).encode()).filter(lambda b: not _parses_to_message(b)),
)


def _parses_to_message(line: bytes) -> bool:
    try:
        wire.from_wire(decode_object(line))
    except (FrameError, wire.ProtocolError):
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(st.lists(garbage_line, min_size=1, max_size=10), st.booleans())
def test_each_bad_line_gets_exactly_one_error_and_changes_nothing(lines: list[bytes], identified: bool) -> None:
    core = ChatCore(SERVER, FakeView())
    conn, other = ConnId(1), ConnId(2)
    core.connect(conn)
    core.connect(other)
    if identified:
        (claim,) = core.receive(conn, b'{"type":"newidentity","identity":"Alice"}')
        assert isinstance(claim, REQUESTS)
        core.resolve(claim, True)
    before = core.snapshot()
    for line in lines:
        effects = core.receive(conn, line)
        assert len(effects) == 1 and isinstance(effects[0], Deliver), effects
        assert effects[0].conn == conn and effects[0].message["type"] == "error"
        check_client_readable(effects[0].message)
        assert core.snapshot() == before
    core.check_invariants()


# -- the atheris harness, briefly ------------------------------------------------------------------------


def test_atheris_decoder_harness_runs_clean_for_a_few_seconds(tmp_path: Path) -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("atheris is not installed (pip install 'atheris==3.0.0'; Linux x86_64 wheels): "
                    "the coverage-guided decoder fuzzer did not run")  # fmt: skip
    corpus = tmp_path / "corpus"
    shutil.copytree(REPO / "fuzz" / "seeds", corpus)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(FUZZER), str(corpus), f"-max_total_time={ATHERIS_CI_SECONDS}",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],  # fmt: skip
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=ATHERIS_CI_SECONDS + 60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the fuzzer found a failing input (artifacts in {tmp_path}):\n{output[-4000:]}"
    assert "Done" in output and "stat::number_of_executed_units" in output, output[-2000:]
