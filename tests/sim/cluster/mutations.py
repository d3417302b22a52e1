"""Bugs this project once fixed, re-introduced on demand, to show the simulation finds them.

Each mutation patches the production code for the length of a `with mutated(name)` block and nothing
else: the simulation runs the real code with exactly that bug back in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

MUTATIONS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {}


@contextlib.contextmanager
def mutated(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    with MUTATIONS[name]():
        yield
