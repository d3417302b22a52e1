"""Coverage-guided fuzzing (atheris/libFuzzer) of everything a client's bytes meet before the chat rules:
`cluster.framing.LineDecoder`, `decode_object` and `node.protocol.from_wire`.

Run by hand for as long as you like (libFuzzer options pass straight through):

    .venv/bin/python fuzz/fuzz_decoder.py -max_total_time=300
    .venv/bin/python fuzz/fuzz_decoder.py fuzz/corpus -max_total_time=3600   # keep what it finds

CI runs it for ~10 s (tests/unit/test_fuzz_properties.py). A crash prints the traceback and writes the input
to `crash-<sha1>`; replay it with `.venv/bin/python fuzz/fuzz_decoder.py crash-<sha1>`.

What counts as a bug (the harness raises, libFuzzer reports it):
- any exception other than `LineTooLong` from the decoder, `FrameError` from `decode_object`, or
  `ProtocolError` from `from_wire`;
- the decoder returning a line longer than its limit, containing a newline, or losing/duplicating bytes
  (the lines it returns plus what it buffers must be exactly the stream, CRs before newlines aside);
- a decoded message whose fields are not strings, or an error reply that is not one ASCII JSON line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from cluster.framing import FrameError, LineDecoder, LineTooLong, decode_object, encode
    from node import protocol as wire

# Small enough that the fuzzer reaches the over-long-line paths with short inputs.
MAX_LINE_BYTES = 256
MAX_CHUNKS = 16


def expected_lines(stream: bytes) -> tuple[list[bytes], bool]:
    """The decoder's specification: the complete lines of `stream` (one CR before the newline stripped)
    up to the first part longer than the limit, and whether such a part exists."""
    parts = stream.split(b"\n")
    lines: list[bytes] = []
    for index, part in enumerate(parts):
        if len(part) > MAX_LINE_BYTES:
            return lines, True
        if index < len(parts) - 1:
            lines.append(part[:-1] if part.endswith(b"\r") else part)
    return lines, False


def check_message(message: wire.ClientMessage) -> None:
    for value in message.__dataclass_fields__:
        assert isinstance(getattr(message, value), str), message


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    chunks = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)) for _ in range(fdp.ConsumeIntInRange(0, MAX_CHUNKS))]
    chunks.append(fdp.ConsumeBytes(fdp.remaining_bytes()))
    stream = b"".join(chunks)

    decoder = LineDecoder(MAX_LINE_BYTES)
    got: list[bytes] = []
    too_long = False
    for chunk in chunks:
        try:
            got.extend(decoder.feed(chunk))
        except LineTooLong as exc:
            got.extend(exc.lines)
            too_long = True
            break
    want, want_too_long = expected_lines(stream)
    assert too_long == want_too_long, (stream, too_long)
    assert got == want, (stream, got, want)
    if not too_long:
        assert decoder.pending == len(stream) - (stream.rfind(b"\n") + 1)

    for line in got:
        assert len(line) <= MAX_LINE_BYTES and b"\n" not in line
        try:
            obj = decode_object(line)
        except FrameError as exc:
            reply = encode(wire.error(str(exc)))
        else:
            assert isinstance(obj, dict)
            try:
                check_message(wire.from_wire(obj))
                continue
            except wire.ProtocolError as exc:
                reply = encode(wire.error(exc.reason))
        # The error reply the server would send: one ASCII JSON line with a string type.
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1
        reply.decode("ascii")
        assert isinstance(decode_object(reply[:-1])["type"], str)


def main(argv: list[str]) -> None:
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
