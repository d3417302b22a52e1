"""Newline-delimited JSON framing with a bound on line length.

`LineDecoder` is sans-IO: feed it whatever bytes arrived, get back complete lines. A line longer than
`max_line_bytes` is an error the caller must act on (the protocol disconnects such a client); the decoder
never buffers more than `max_line_bytes` + one chunk.
"""

from __future__ import annotations

import json
from typing import Any

MAX_LINE_BYTES = 64 * 1024


class LineTooLong(Exception):
    """A peer sent more than the line limit without a newline.

    `lines` holds the complete lines that arrived before the over-long one, so none is lost.
    """

    def __init__(self, message: str, lines: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.lines = lines or []


class FrameError(Exception):
    """A line that is not a JSON object."""


class LineDecoder:
    __slots__ = ("max_line_bytes", "_buffer")  # one per client connection

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete lines (without the newline, CR stripped).

        Raises LineTooLong if a line, complete or not, exceeds the limit.
        """
        if self._buffer:
            data = bytes(self._buffer) + data
        # One split in C instead of a find and a copy per line: the read path of every chat message.
        *lines, rest = data.split(b"\n")
        limit = self.max_line_bytes
        for i, line in enumerate(lines):
            if len(line) > limit:
                raise LineTooLong(f"line of {len(line)} bytes exceeds {limit}", _strip_cr(lines[:i]))
        lines = _strip_cr(lines)
        self._buffer = bytearray(rest)
        if len(rest) > limit:
            raise LineTooLong(f"more than {limit} bytes without a newline", lines)
        return lines

    @property
    def pending(self) -> int:
        return len(self._buffer)


def _strip_cr(lines: list[bytes]) -> list[bytes]:
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


# json.loads(text) is raw_decode plus a regular expression for surrounding whitespace; a line that starts
# with "{" and ends with "}" (every line a client or server we know sends) needs neither.
_DECODER = json.JSONDecoder()


def _loads(text: str) -> Any:
    if text[:1] == "{" and text[-1:] == "}":
        value, end = _DECODER.raw_decode(text)
        if end == len(text):
            return value
    return json.loads(text)  # anything else, errors included, exactly as json.loads has it


def decode_object(line: bytes) -> dict[str, Any]:
    """Parse one line as a JSON object; FrameError with a readable reason otherwise."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError("line is not valid UTF-8") from exc
    try:
        value = _loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, and ints longer than Python allows
        raise FrameError("line is not valid JSON") from exc
    if not isinstance(value, dict):
        raise FrameError("line is not a JSON object")
    return value


_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
# json.dumps builds an encoder, and the encoder its C scanner, on every call: ~2 us of a ~3 us encode, paid
# once per chat line. Built once here with the very arguments JSONEncoder.iterencode passes (no circular
# check: our messages are trees), it writes the same bytes.
_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)  # None without CPython's _json accelerator
_ESCAPE = json.encoder.encode_basestring_ascii
_C_ENCODE = (
    _MAKE_ENCODER(None, _ENCODER.default, _ESCAPE, None, ":", ",", False, False, True)
    if _MAKE_ENCODER is not None
    else None
)


def encode(message: dict[str, Any]) -> bytes:
    """One ASCII-only JSON line (the Java client reads with the platform charset after a server change)."""
    if len(message) == 3 and message.get("type") == "message":
        # A chat line, encoded once per message a room relays: two C string escapes instead of the dict
        # walk (1.1 us -> 0.45 us, issue 14). The same bytes as below for protocol.message()'s dicts; a dict
        # with these keys in another order gets the same JSON object, keys in the protocol's order.
        identity, content = message.get("identity"), message.get("content")
        if type(identity) is str and type(content) is str:
            return f'{{"type":"message","identity":{_ESCAPE(identity)},"content":{_ESCAPE(content)}}}\n'.encode("ascii")
    if _C_ENCODE is None:
        return _ENCODER.encode(message).encode("ascii") + b"\n"
    return "".join(_C_ENCODE(message, 0)).encode("ascii") + b"\n"
