"""Registry commands on the wire (the coordination channel's registry requests, test control lines).

A command is its dataclass fields plus `"op"`, its class name. `command_from_wire` accepts only the
registry's own command types (`registry.state.COMMAND_TYPES`, the one list of them), exactly their fields,
and only JSON scalars as values; anything else is a `ValueError`, never a half-built command.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from registry import state as rs

_BY_NAME: dict[str, type[Any]] = {cls.__name__: cls for cls in rs.COMMAND_TYPES}


def command_to_wire(command: rs.Command) -> dict[str, Any]:
    data = dataclasses.asdict(command)
    data["op"] = type(command).__name__
    return data


def command_from_wire(data: object) -> rs.Command:
    """Rebuild a registry command from its wire form; ValueError on anything else."""
    if not isinstance(data, dict):
        raise ValueError("command is not an object")
    cls = _BY_NAME.get(data.get("op", ""))
    if cls is None:
        raise ValueError(f"unknown command {data.get('op')!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k != "op"}
    if set(kwargs) != names:
        raise ValueError(f"{cls.__name__}: fields {sorted(kwargs)} != {sorted(names)}")
    for key, value in kwargs.items():
        if not isinstance(value, str | int | float) and value is not None:
            raise ValueError(f"{cls.__name__}.{key}: unsupported value")
    return cls(**kwargs)  # type: ignore[no-any-return]
