"""JSON-lines framing (cluster/framing.py), including property tests over arbitrary byte streams."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.framing import FrameError, LineDecoder, LineTooLong, decode_object, encode
from node import protocol as wire


def test_lines_split_across_chunks_are_reassembled() -> None:
    decoder = LineDecoder()
    assert decoder.feed(b'{"a":') == []
    assert decoder.feed(b'1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert decoder.pending == 4


def test_crlf_is_accepted() -> None:
    assert LineDecoder().feed(b"x\r\n") == [b"x"]


def test_line_over_the_limit_is_refused_even_without_newline() -> None:
    decoder = LineDecoder(max_line_bytes=8)
    with pytest.raises(LineTooLong):
        decoder.feed(b"123456789")
    with pytest.raises(LineTooLong):
        LineDecoder(max_line_bytes=8).feed(b"123456789\n")
    assert LineDecoder(max_line_bytes=8).feed(b"12345678\n") == [b"12345678"]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"\xff\xfe", "UTF-8"),
        (b"{nope", "JSON"),
        (b"[1,2]", "object"),
        (b'"s"', "object"),
        (b"[" * 100000, "JSON"),
        (b"1" * 5000, "JSON"),
    ],
)
def test_decode_object_rejects_with_reason(line: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        decode_object(line)


def test_encode_is_ascii_single_line() -> None:
    data = encode({"type": "message", "content": "héllo\nworld ☃"})
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    data.decode("ascii")
    assert json.loads(data) == {"type": "message", "content": "héllo\nworld ☃"}


@given(st.lists(st.binary(max_size=200), max_size=30))
def test_any_byte_stream_never_raises_anything_but_line_too_long(chunks: list[bytes]) -> None:
    decoder = LineDecoder(max_line_bytes=64)
    try:
        for chunk in chunks:
            for line in decoder.feed(chunk):
                assert len(line) <= 64
                with contextlib.suppress(FrameError):
                    decode_object(line)
    except LineTooLong:
        return
    assert decoder.pending <= 64


@given(st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=4), max_size=10), st.data())
def test_encoded_objects_round_trip_through_any_chunking(objects: list[dict[str, str]], data: st.DataObject) -> None:
    stream = b"".join(encode(o) for o in objects)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = LineDecoder()
    out = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        out.extend(decoder.feed(stream[previous:cut]))
        previous = cut
    assert [decode_object(line) for line in out] == objects


def test_lines_before_an_over_long_line_are_kept() -> None:
    with pytest.raises(LineTooLong) as info:
        LineDecoder(max_line_bytes=8).feed(b"ok\nfine\n123456789\n")
    assert info.value.lines == [b"ok", b"fine"]


# -- the fast paths write and read exactly what the json module does ----------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=10), _json_values, max_size=6))
def test_encode_writes_what_json_dumps_writes(message: dict) -> None:
    expected = json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"
    assert encode(message) == expected


@given(st.text(), st.text())
def test_a_chat_line_encodes_as_json_dumps_writes_it(identity: str, content: str) -> None:
    """The chat-line path of encode (the line every room relays) writes the general path's bytes."""
    message = wire.message(identity, content)
    expected = json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"
    assert encode(message) == expected


@given(st.permutations(["type", "identity", "content"]), _json_values, _json_values)
def test_a_message_in_any_key_order_or_with_any_values_encodes_to_the_same_object(
    keys: list[str], identity: object, content: object
) -> None:
    values = {"type": "message", "identity": identity, "content": content}
    message = {key: values[key] for key in keys}
    data = encode(message)
    assert data.endswith(b"\n") and data.count(b"\n") == 1 and data.isascii()
    assert json.loads(data) == message


@given(st.dictionaries(st.text(max_size=10), _json_values, max_size=6), st.sampled_from(["", " ", "\t", "x", "}", ","]),
       st.sampled_from(["", " ", "\r"]))  # fmt: skip
def test_decode_object_accepts_and_refuses_what_json_loads_does(message: dict, tail: str, head: str) -> None:
    text = head + json.dumps(message, separators=(",", ":")) + tail
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(FrameError):
            decode_object(text.encode())
        return
    assert decode_object(text.encode()) == expected


def _reference_feed(buffer: bytearray, data: bytes, limit: int) -> list[bytes]:
    """The decoder as it was first written (a find and a copy per line), to compare with."""
    buffer += data
    lines: list[bytes] = []
    start = 0
    while (end := buffer.find(b"\n", start)) >= 0:
        if end - start > limit:
            raise LineTooLong("", lines)
        line = bytes(buffer[start:end])
        lines.append(line[:-1] if line.endswith(b"\r") else line)
        start = end + 1
    del buffer[:start]
    if len(buffer) > limit:
        raise LineTooLong("", lines)
    return lines


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"x", b"\n").replace(b"y", b"\r")), max_size=12),
       st.integers(min_value=1, max_value=30))  # fmt: skip
def test_feed_matches_the_reference_decoder(chunks: list[bytes], limit: int) -> None:
    decoder, buffer = LineDecoder(limit), bytearray()
    for chunk in chunks:
        try:
            expected: list[bytes] | LineTooLong = _reference_feed(buffer, chunk, limit)
        except LineTooLong as exc:
            expected = exc
        try:
            got = decoder.feed(chunk)
        except LineTooLong as exc:
            assert isinstance(expected, LineTooLong) and exc.lines == expected.lines
            return
        assert got == expected
