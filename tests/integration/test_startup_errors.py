"""A server that cannot start says what, where and why in one line and exits 2 (as for a bad
configuration): a port of each role taken by another process, and a data directory in use."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from cluster.config import load_config
from tests.support import PYTHON, REPO, write_config

TIMEOUT_S = 60


def start_node(config: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CHATMESH_SECRET="startup-test-secret", PYTHONPATH=str(REPO))
    return subprocess.run(
        [PYTHON, "-m", "node", "--config", str(config), "--id", "s1", "--data-dir", str(data_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


@pytest.mark.parametrize(
    ("port_field", "role"),
    [("raft_port", "registry (Raft port "), ("coordination_port", "coordination listener ("),
     ("clients_port", "client listener ("), ("admin_port", "admin listener (")],
)  # fmt: skip
def test_a_port_in_use_is_exit_2_and_one_line_naming_role_host_and_port(
    tmp_path: Path, port_field: str, role: str
) -> None:
    path = write_config(tmp_path, 1)
    server = load_config(path).server("s1")
    port = getattr(server, port_field)
    blocker = socket.socket()
    blocker.bind((server.host, port))
    blocker.listen()
    try:
        result = start_node(path, tmp_path / "data")
    finally:
        blocker.close()
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"chatmesh s1: cannot start the {role}{server.host}:{port}")
    assert "Traceback" not in result.stdout + result.stderr


def test_a_data_directory_in_use_is_exit_2_and_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, 1)
    data = tmp_path / "data"
    env = dict(os.environ, CHATMESH_SECRET="startup-test-secret", PYTHONPATH=str(REPO))
    first = subprocess.Popen(
        [PYTHON, "-m", "node", "--config", str(path), "--id", "s1", "--data-dir", str(data)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert first.stdout is not None
        for line in first.stdout:  # bounded: the server prints its ready line or exits
            if "ready" in line:
                break
        # The second server gets other ports, the same data directory.
        (tmp_path / "other").mkdir()
        other = write_config(tmp_path / "other", 1)
        result = start_node(other, data)
    finally:
        first.kill()
        first.wait(TIMEOUT_S)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "in use by another process" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
