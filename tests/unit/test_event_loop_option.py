"""`--event-loop` / CHATMESH_EVENT_LOOP: asyncio by default, uvloop on request, one clear line otherwise."""

from __future__ import annotations

import asyncio

import pytest

from node.__main__ import StartupError, loop_runner, parse_args


def test_default_is_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHATMESH_EVENT_LOOP", raising=False)
    assert parse_args(["--id", "s1"]).event_loop == "asyncio"
    assert loop_runner("asyncio") is asyncio.run


def test_environment_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATMESH_EVENT_LOOP", "uvloop")
    assert parse_args(["--id", "s1"]).event_loop == "uvloop"


def test_unknown_loop_is_a_startup_error() -> None:
    with pytest.raises(StartupError, match="unknown event loop 'tokio'"):
        loop_runner("tokio")


def test_uvloop_runs_a_coroutine_with_its_own_loop() -> None:
    pytest.importorskip("uvloop")

    async def loop_class() -> int:
        return len(type(asyncio.get_running_loop()).__module__.split("uvloop"))

    assert loop_runner("uvloop")(loop_class()) == 2  # the module name contains "uvloop"
