"""run_cluster.py: starts every server, prints the table, stops them all on Ctrl-C; fails loudly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

from tests.support import PYTHON, REPO, TEST_SECRET, http_json, port_open, wait_until, write_config


def _start(args: list[str], tmp_path: Path) -> tuple[subprocess.Popen[str], list[str]]:
    env = dict(os.environ, CHATMESH_SECRET=TEST_SECRET)
    proc = subprocess.Popen(
        [PYTHON, "run_cluster.py", *args, "--data-root", str(tmp_path / "data")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_starts_all_prints_table_and_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    config = write_config(tmp_path, 3)
    proc, lines = _start(["--config", str(config), "--fresh"], tmp_path)
    try:
        wait_until(lambda: any("3 servers ready" in line for line in lines), 60, 0.1, "the ready line")
        table = [line for line in lines if line[:1] == "s" and line[1:2].isdigit()]
        assert [row.split()[0] for row in table] == ["s1", "s2", "s3"]
        assert table[2].split()[-1] == "coordinator"
        # Each server's lines come through its own pump thread, which may trail the supervisor's table.
        wait_until(lambda: any(line.startswith("[s1] chatmesh s1 ready") for line in lines), 10, 0.05, "s1's line")
        text = config.read_text().split("\n")[1:4]
        admin = [int(row.split()[5]) for row in text]
        clients = [int(row.split()[2]) for row in text]
        assert http_json(f"http://127.0.0.1:{admin[0]}/status")["coordinator"] == "s3"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        assert not any(port_open("127.0.0.1", port) for port in clients)
        assert lines[-1] == "run_cluster: stopped"
    finally:
        _kill(proc)


def test_a_server_that_cannot_start_stops_the_run_with_a_reason(tmp_path: Path) -> None:
    config = write_config(tmp_path, 2)
    s2_clients = int(config.read_text().split("\n")[2].split()[2])
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", s2_clients))
    blocker.listen()
    proc, lines = _start(["--config", str(config)], tmp_path)
    try:
        assert proc.wait(90) == 1
        assert any("server s2 exited" in line for line in lines), lines[-20:]
    finally:
        blocker.close()
        _kill(proc)


def test_bad_configuration_is_exit_2_and_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("s1 127.0.0.1 4000 4000 1\n")
    proc = subprocess.run([PYTHON, "run_cluster.py", "--config", str(bad)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "bad.txt:1: port 4000 on 127.0.0.1 used twice" in proc.stderr


def test_only_rejects_unknown_ids(tmp_path: Path) -> None:
    config = write_config(tmp_path, 2)
    proc = subprocess.run([PYTHON, "run_cluster.py", "--config", str(config), "--only", "s1,s9"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "unknown server id(s) s9" in proc.stderr
