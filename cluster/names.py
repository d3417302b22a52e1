"""Identity and room-id rules of the client protocol (docs/protocol.md, "Names")."""

from __future__ import annotations

import re
from typing import NewType

ServerId = NewType("ServerId", str)
Identity = NewType("Identity", str)
RoomId = NewType("RoomId", str)

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{2,15}")
# Server ids appear in room ids (MainHall-<id>) and in file paths, so keep them plain.
_SERVER_ID = re.compile(r"[A-Za-z0-9_]{1,32}")

MAINHALL_PREFIX = "MainHall-"


def is_valid_name(name: object) -> bool:
    """True for a legal identity or room id: ASCII letter first, then letters/digits, 3..16 long."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def is_valid_server_id(server_id: str) -> bool:
    return _SERVER_ID.fullmatch(server_id) is not None


def mainhall(server_id: str) -> RoomId:
    """The room every server owns and no client can create or delete."""
    return RoomId(MAINHALL_PREFIX + server_id)


def is_mainhall(room_id: str) -> bool:
    return room_id.startswith(MAINHALL_PREFIX)
