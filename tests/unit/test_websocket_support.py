"""The pure parts of node/websocket.py: how a route line is recognised, WebSocket addresses, origins."""

from __future__ import annotations

from cluster.config import parse_config
from cluster.framing import encode
from node import protocol as wire
from node.websocket import _ROUTE_PREFIX, chat_origins, ws_url

CONFIG = parse_config("s1 127.0.0.1 4444 5555 1\ns2 ::1 4445 5556 2 5445 6556 7000\n")


def test_every_route_line_the_server_builds_is_recognised() -> None:
    assert encode(wire.route("kitchen", "10.0.0.2", 4445)).startswith(_ROUTE_PREFIX)
    assert not encode(wire.message("x", '{"type":"route",')).startswith(_ROUTE_PREFIX)
    assert not encode(wire.roomchange("a", "b", "route")).startswith(_ROUTE_PREFIX)


def test_websocket_addresses() -> None:
    assert ws_url(CONFIG.server("s1"), secure=False) == "ws://127.0.0.1:6444/"
    assert ws_url(CONFIG.server("s2"), secure=True) == "wss://[::1]:7000/"


def test_origins_are_the_clusters_chat_pages_plus_extras() -> None:
    origins = chat_origins(CONFIG, admin_secure=False, extra=" https://chat.example.org/ ")
    assert origins is not None
    assert None in origins  # non-browser clients send no Origin
    assert {"http://127.0.0.1:5444", "http://localhost:5444", "http://[::1]:5445", "http://localhost:5445",
            "https://chat.example.org"} <= set(origins)  # fmt: skip
    assert all(o is None or o.startswith(("https://", "http://")) for o in origins)
    assert "https://127.0.0.1:5444" in (chat_origins(CONFIG, admin_secure=True) or [])
    assert chat_origins(CONFIG, admin_secure=False, extra="*") is None
