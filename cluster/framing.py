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
    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete lines (without the newline, CR stripped).

        Raises LineTooLong if a line, complete or not, exceeds the limit.
        """
        self._buffer += data
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.max_line_bytes:
                raise LineTooLong(f"line of {end - start} bytes exceeds {self.max_line_bytes}", lines)
            line = bytes(self._buffer[start:end])
            if line.endswith(b"\r"):
                line = line[:-1]
            lines.append(line)
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self.max_line_bytes:
            raise LineTooLong(f"more than {self.max_line_bytes} bytes without a newline", lines)
        return lines

    @property
    def pending(self) -> int:
        return len(self._buffer)


def decode_object(line: bytes) -> dict[str, Any]:
    """Parse one line as a JSON object; FrameError with a readable reason otherwise."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError("line is not valid UTF-8") from exc
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, and ints longer than Python allows
        raise FrameError("line is not valid JSON") from exc
    if not isinstance(value, dict):
        raise FrameError("line is not a JSON object")
    return value


def encode(message: dict[str, Any]) -> bytes:
    """One ASCII-only JSON line (the Java client reads with the platform charset after a server change)."""
    return json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"
