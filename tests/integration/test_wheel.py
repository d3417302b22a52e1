"""The package stands on its own: build the wheel from a copy of the tracked files, install it into a fresh
virtual environment outside the checkout (dependencies from the package index, through pip's cache), and
run a 3-server cluster with the installed `chatmesh-cluster` from a directory of its own (its own
configuration, data root and secret file). The installed `chatmesh-client` (TCP) and a WebSocket client
chat through it, and the chat page comes from the installed package's static files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.support import REPO, WsChatClient, wait_until, write_config

INSTALL_TIMEOUT_S = 300


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = INSTALL_TIMEOUT_S) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def clean_env() -> dict[str, str]:
    """The environment without anything pointing at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def tracked_copy(destination: Path) -> Path:
    """The tracked files of the checkout (what a clone has), so the build leaves the checkout untouched."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=30)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell which files a clone would have")
    for name in listed.stdout.decode().split("\0"):
        if name and (REPO / name).is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target)
    return destination


def test_the_wheel_installs_and_runs_a_cluster_from_anywhere(tmp_path: Path) -> None:
    env = clean_env()
    source = tracked_copy(tmp_path / "source")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source)],
        tmp_path, env)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("chatmesh-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], tmp_path, env)
    for command in ("chatmesh-server", "chatmesh-cluster", "chatmesh-client"):
        assert (venv / "bin" / command).exists(), f"{command} was not installed"
    where = run([str(venv / "bin" / "python"), "-c", "import node, pathlib; print(pathlib.Path(node.__file__))"],
                tmp_path, env)  # fmt: skip
    assert str(venv) in where and str(REPO) not in where

    # A directory of its own: configuration, data and secret there, nothing from the checkout.
    home = tmp_path / "elsewhere"
    home.mkdir()
    config = write_config(home, 3)
    env.pop("CHATMESH_SECRET", None)
    assert "--ws-tls-cert" in run([str(venv / "bin" / "chatmesh-server"), "--help"], home, env)
    unknown = subprocess.run([str(venv / "bin" / "chatmesh-server"), "--config", str(config), "--id", "s9"], cwd=home,
                             env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert unknown.returncode == 2 and "'s9' is not in" in unknown.stderr
    lines: list[str] = []
    cluster = subprocess.Popen(
        [str(venv / "bin" / "chatmesh-cluster"), "--config", str(config), "--data-root", str(home / "data"),
         "--cluster-secret-file", str(home / "secret")],
        cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    threading.Thread(target=lambda: lines.extend(cluster.stdout or []), daemon=True).start()
    client: subprocess.Popen[str] | None = None
    web: WsChatClient | None = None
    try:
        wait_until(lambda: any("3 servers ready" in line for line in lines) or cluster.poll() is not None, 90, 0.1,
                   "the installed cluster to be ready")  # fmt: skip
        assert cluster.poll() is None, "".join(lines[-40:])
        assert (home / "secret").stat().st_mode & 0o777 == 0o600
        from cluster.config import load_config

        s1 = load_config(config).server("s1")
        with urllib.request.urlopen(f"http://{s1.host}:{s1.admin_port}/chat", timeout=5) as page:
            assert b"/static/chat.js" in page.read()
        with urllib.request.urlopen(f"http://{s1.host}:{s1.admin_port}/static/chat.js", timeout=5) as script:
            assert b"movejoin" in script.read()

        web = WsChatClient(f"ws://{s1.host}:{s1.ws_port}/", 10)
        assert web.login("WheelWeb")
        client = subprocess.Popen(
            [str(venv / "bin" / "chatmesh-client"), "-h", s1.host, "-p", str(s1.clients_port), "-i", "WheelTcp",
             "--batch"],
            cwd=home, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        out: list[str] = []
        threading.Thread(target=lambda: out.extend(client.stdout or []), daemon=True).start()
        web.recv_until(lambda m: m.get("type") == "roomchange" and m.get("identity") == "WheelTcp")
        web.send({"type": "message", "content": "hello terminal"})
        wait_until(lambda: any("WheelWeb: hello terminal" in line for line in out), 10, 0.05, "the TCP client to see")
        assert client.stdin is not None
        client.stdin.write("hello browser\n#quit\n")
        client.stdin.flush()
        assert web.recv_until(lambda m: m.get("type") == "message") == {
            "type": "message", "identity": "WheelTcp", "content": "hello browser"}  # fmt: skip
        assert client.wait(15) == 0
    finally:
        if web is not None:
            web.close()
        if client is not None and client.poll() is None:
            client.kill()
        if cluster.poll() is None:
            os.killpg(cluster.pid, 9)
        cluster.wait(10)
