"""PySyncObj frames sent as stored zlib blocks (registry/raft_wire.py): same bytes in, same bytes out."""

from __future__ import annotations

import inspect
import socket
import zlib

import pysyncobj.tcp_connection as tcp_connection
from hypothesis import given
from hypothesis import strategies as st
from pysyncobj.encryptor import getEncryptor
from pysyncobj.poller import createPoller

from registry import raft_wire


@given(st.binary(max_size=300_000))
def test_stored_stream_inflates_to_the_same_bytes(data: bytes) -> None:
    assert zlib.decompress(raft_wire.stored_zlib(data)) == data


def test_block_boundaries() -> None:
    for size in (0, 1, 0xFFFF - 1, 0xFFFF, 0xFFFF + 1, 3 * 0xFFFF):
        data = bytes(i % 251 for i in range(size))
        assert zlib.decompress(raft_wire.stored_zlib(data)) == data


def test_pinned_pysyncobj_frames_with_zlib_as_assumed() -> None:
    # install() swaps the module PySyncObj calls `zlib`; this holds only while it calls exactly these two.
    source = inspect.getsource(tcp_connection.TcpConnection)
    assert "zlib.compress(pickle.dumps(message), 3)" in source
    assert "pickle.loads(zlib.decompress(data))" in source


def _pair(encrypted: bool) -> tuple[object, tcp_connection.TcpConnection, tcp_connection.TcpConnection, list[object]]:
    poller = createPoller("auto")
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    received: list[object] = []
    sender = tcp_connection.TcpConnection(poller, socket=a, timeout=10.0)
    receiver = tcp_connection.TcpConnection(poller, onMessageReceived=received.append, socket=b, timeout=10.0)
    if encrypted:
        sender.encryptor = getEncryptor("secret")
        receiver.encryptor = getEncryptor("secret")
    return poller, sender, receiver, received


def _deliver(poller: object, received: list[object], count: int) -> None:
    for _ in range(200):
        if len(received) >= count:
            return
        poller.poll(0.05)  # type: ignore[attr-defined]
    raise AssertionError(f"only {len(received)} of {count} messages arrived")


def test_patched_and_unpatched_connections_understand_each_other() -> None:
    messages = [{"type": "append_entries", "entries": [(b"x" * n, n, 1)]} for n in (0, 10, 70_000)]
    for encrypted in (False, True):
        for patched_sender in (True, False):
            if patched_sender:
                raft_wire.install()
            else:
                tcp_connection.zlib = zlib  # type: ignore[attr-defined]
            poller, sender, receiver, received = _pair(encrypted)
            for message in messages:
                sender.send(message)
            raft_wire.install()  # the receiver side inflates either form
            _deliver(poller, received, len(messages))
            assert received == messages
            sender.disconnect()
            receiver.disconnect()
    assert raft_wire.installed()
