"""PySyncObj's message framing without the per-message zlib cost.

PySyncObj (0.3.17, `pysyncobj/tcp_connection.py`) compresses every message it sends with
`zlib.compress(data, 3)` and inflates every message it receives with `zlib.decompress`. Registry messages
are a few hundred bytes: setting up a deflate stream costs ~45 us per message whatever the level (0 to 9),
while the compression saves ~150 bytes on loopback or a LAN. At 5 servers the Raft leader sends about 8
messages per commit, so this was ~10% of the leader's CPU in `bench.approval` (py-spy, see
docs/benchmarks.md).

`install()` hands `pysyncobj.tcp_connection` a stand-in for the `zlib` module whose `compress` writes the
same bytes as *stored* deflate blocks (RFC 1950/1951: a zlib header, uncompressed blocks of up to 65,535
bytes, the Adler-32 checksum), in ~1 us. The result is still a valid zlib stream: every receiver, patched
or not (a server of an older version during a rolling upgrade included), inflates it with plain
`zlib.decompress`, and `decompress` is the real one here, so compressed messages from older servers are
read as before. Encryption and authentication (Fernet, applied after this step) are unchanged.
"""

from __future__ import annotations

import struct
import types
import zlib

__all__ = ["install", "installed", "stored_zlib"]

# Largest payload of one stored deflate block (LEN is 16 bits).
_MAX_STORED_BLOCK = 0xFFFF
# zlib header: deflate, 32 KiB window, no preset dictionary, check bits for "fastest" (0x78 0x01).
_ZLIB_HEADER = b"\x78\x01"
_BLOCK_HEADER = struct.Struct("<BHH")  # BFINAL/BTYPE=00 byte, LEN, NLEN
_ADLER = struct.Struct(">I")


def stored_zlib(data: bytes) -> bytes:
    """`data` as a zlib stream of stored (uncompressed) deflate blocks; `zlib.decompress` returns `data`."""
    parts = [_ZLIB_HEADER]
    view = memoryview(data)
    start, size = 0, len(data)
    while True:
        chunk = view[start : start + _MAX_STORED_BLOCK]
        start += len(chunk)
        final = start >= size
        parts.append(_BLOCK_HEADER.pack(1 if final else 0, len(chunk), len(chunk) ^ 0xFFFF))
        parts.append(bytes(chunk))
        if final:
            break
    parts.append(_ADLER.pack(zlib.adler32(data)))
    return b"".join(parts)


def _compress(data: bytes, level: int = -1) -> bytes:
    return stored_zlib(data)


# What pysyncobj.tcp_connection sees as `zlib`: a stored-block compress, the real decompress.
_STORED = types.SimpleNamespace(compress=_compress, decompress=zlib.decompress)


def install() -> None:
    """Make this process's PySyncObj frame its messages as stored zlib blocks (idempotent)."""
    import pysyncobj.tcp_connection as tcp_connection

    tcp_connection.zlib = _STORED  # type: ignore[attr-defined]


def installed() -> bool:
    import pysyncobj.tcp_connection as tcp_connection

    return getattr(tcp_connection, "zlib", None) is _STORED
