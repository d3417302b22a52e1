"""The layering rules: cluster <- bully, registry <- node; pure cores import no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO

OURS = {"cluster", "registry", "bully", "node", "client"}
ALLOWED = {
    "cluster": set(),
    "registry": {"cluster"},
    "bully": {"cluster"},
    "node": {"cluster", "registry", "bully"},
    "client": {"cluster"},
}
IO_MODULES = {"asyncio", "socket", "threading", "time", "flask", "pysyncobj", "selectors", "subprocess"}
PURE = ["cluster/config.py", "cluster/names.py", "cluster/framing.py", "registry/state.py", "bully/election.py",
        "bully/failure_detector.py", "bully/messages.py", "bully/node.py", "node/chat.py", "node/protocol.py",
        "node/limits.py", "client/core.py", "cluster/timings.py", "node/membership.py", "node/reconcile.py",
        "node/retry.py"]  # fmt: skip


def test_every_package_is_layered() -> None:
    """A new top-level package must be given its place in the layers (or the rules above miss it)."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == set(ALLOWED), f"unlayered packages: {sorted(packages - set(ALLOWED))}"


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_lower_layers(package: str) -> None:
    for path in (REPO / package).rglob("*.py"):
        ours = imported_roots(path) & OURS - {package}
        assert ours <= ALLOWED[package], f"{path.relative_to(REPO)} imports {sorted(ours - ALLOWED[package])}"


@pytest.mark.parametrize("relative", PURE)
def test_pure_cores_do_no_io(relative: str) -> None:
    path = REPO / relative
    if not path.exists():
        pytest.fail(f"{relative} is missing")
    io = imported_roots(path) & IO_MODULES
    assert not io, f"{relative} imports {sorted(io)}"
