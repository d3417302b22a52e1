"""Fixtures of the fault tests: the network-namespace partition lab, skipped with a reason when unavailable."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.fault.netlab import LabUnavailable, NetLab, unavailable_reason


@pytest.fixture
def make_lab() -> Iterator[Callable[[list[str]], NetLab]]:
    """`make_lab(["s1", "s2"])` builds a lab; every lab (and every process in it) is destroyed in teardown."""
    labs: list[NetLab] = []
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"partition lab unavailable: {reason}")

    def make(server_ids: list[str]) -> NetLab:
        try:
            lab = NetLab.create(server_ids)
        except LabUnavailable as exc:
            pytest.skip(f"partition lab unavailable: {exc}")
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.destroy()
