"""Fixtures shared by the integration tests that drive real chat clusters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Cluster, start_cluster


@pytest.fixture(scope="module")
def chat_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One 3-server cluster (`python -m node` processes on loopback) per test module.

    Tests sharing it use identities and room ids of their own and leave no client connected, so they see
    only their own broadcasts (see `Net` in test_conformance.py).
    """
    with start_cluster(tmp_path_factory.mktemp("chat-cluster"), 3) as running:
        yield running
