"""One TCP connection to a chat server: JSON lines in and out, every wait bounded.

Lines are cut with `cluster.framing.LineDecoder` (64 KiB limit), so a misbehaving server cannot make the
client buffer without bound. Complete lines that arrived together are kept, so a connection handed from
the route or reconnect step to the steady reader loses nothing that followed the first answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any

from cluster.framing import MAX_LINE_BYTES, FrameError, LineDecoder, LineTooLong, decode_object, encode

READ_CHUNK_BYTES = 64 * 1024
SEND_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class ServerAddress:
    host: str
    port: int
    server_id: str | None = None

    @property
    def label(self) -> str:
        where = f"{self.host}:{self.port}"
        return f"{self.server_id} ({where})" if self.server_id else where

    def same_endpoint(self, other: ServerAddress) -> bool:
        return (self.host, self.port) == (other.host, other.port)


class ConnectionFailed(Exception):
    """Connecting, sending or reading failed; str() is a short reason for the user."""


def describe(exc: BaseException) -> str:
    """A short human reason for a network failure."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, LineTooLong):
        return f"the server sent a line longer than {MAX_LINE_BYTES} bytes"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: ServerAddress) -> None:
        self.address = address
        self._reader = reader
        self._writer = writer
        self._decoder = LineDecoder(MAX_LINE_BYTES)
        self._lines: deque[bytes] = deque()
        self.skipped_lines = 0

    @classmethod
    async def open(cls, address: ServerAddress, timeout_s: float, tls: ssl.SSLContext | None = None) -> Connection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address.host, address.port, ssl=tls), timeout_s
            )
        except ssl.SSLError as exc:
            raise ConnectionFailed(f"cannot connect to {address.label}: TLS failed ({exc.reason or exc})") from exc
        except (OSError, TimeoutError) as exc:
            raise ConnectionFailed(f"cannot connect to {address.label}: {describe(exc)}") from exc
        return cls(reader, writer, address)

    async def send(self, message: dict[str, Any], timeout_s: float = SEND_TIMEOUT_S) -> None:
        try:
            self._writer.write(encode(message))
            # A server that stops reading must not freeze the client forever.
            await asyncio.wait_for(self._writer.drain(), timeout_s)
        except (OSError, TimeoutError) as exc:
            raise ConnectionFailed(f"cannot send to {self.address.label}: {describe(exc)}") from exc

    async def receive(self) -> dict[str, Any] | None:
        """The next JSON object from the server; None at end of stream.

        Raises ConnectionFailed on reset or an over-long line. Lines that are not JSON objects are skipped:
        the protocol never sends them, and one bad line should not end a chat.
        """
        while True:
            while self._lines:
                try:
                    return decode_object(self._lines.popleft())
                except FrameError:
                    self.skipped_lines += 1
            try:
                data = await self._reader.read(READ_CHUNK_BYTES)
                if not data:
                    return None
                self._lines.extend(self._decoder.feed(data))
            except (OSError, LineTooLong) as exc:
                raise ConnectionFailed(describe(exc)) from exc

    async def receive_within(self, timeout_s: float) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(self.receive(), timeout_s)
        except TimeoutError as exc:
            raise ConnectionFailed(f"no answer from {self.address.label} within {timeout_s:g} s") from exc

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT_S)
