"""serve_admin: the app behind waitress on a real loopback socket, and a clean close()."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest

from node.admin import create_app, serve_admin
from node.status import Snapshot, SnapshotBox
from tests.unit.test_admin import TOKEN, RecordingActions, make_snapshot


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serves_on_the_given_host_and_closes_cleanly() -> None:
    box = SnapshotBox()
    box.publish(Snapshot(server_id="s1"))
    server = serve_admin(create_app(box, RecordingActions(), TOKEN), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert server.host == "127.0.0.1"
        assert get(base + "/health") == (503, {"status": "starting"})
        box.publish(make_snapshot())
        assert get(base + "/health") == (200, {"status": "ok"})
        status, body = get(base + "/rooms/nosuchroom")
        assert status == 404 and body["error"] == "not-found"
        # A keep-alive connection left open must not keep the server alive after close().
        idle = socket.create_connection(("127.0.0.1", server.port))
    finally:
        server.close()
    idle.close()
    server.close()  # idempotent
    # The port is free again and nothing answers on it.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    assert not [t for t in threading.enumerate() if t.name.startswith("admin-127.0.0.1:")]


def test_a_port_in_use_fails_at_once() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            serve_admin(create_app(SnapshotBox(), RecordingActions(), TOKEN), "127.0.0.1", port)
