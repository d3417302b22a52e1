"""configuration.txt parsing and validation (cluster/config.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config, parse_config
from tests.support import REPO


def test_shipped_configuration_is_six_servers_on_one_host() -> None:
    config = load_config(REPO / "configuration.txt")
    assert config.ids == ("s1", "s2", "s3", "s4", "s5", "s6")
    assert [s.clients_port for s in config.servers] == list(range(4444, 4450))
    assert [s.coordination_port for s in config.servers] == list(range(5555, 5561))
    assert [s.priority for s in config.servers] == [1, 2, 3, 4, 5, 6]


def test_admin_and_raft_ports_default_to_offsets() -> None:
    config = parse_config("a 127.0.0.1 4000 6500 1\n")
    server = config.server("a")
    assert server.admin_port == 5000  # clients_port + 1000
    assert server.raft_port == 7500  # coordination_port + 1000
    assert server.raft_address == "127.0.0.1:7500"


def test_ws_port_defaults_to_clients_port_plus_2000_and_can_be_given() -> None:
    assert parse_config("a h 4000 6500 1\n").server("a").ws_port == 6000
    assert parse_config("a h 4000 6500 1 5000 7000 9000\n").server("a").ws_port == 9000


def test_explicit_admin_and_raft_ports() -> None:
    config = parse_config("a h 4000 6500 1 7500 8000\n")
    assert (config.server("a").admin_port, config.server("a").raft_port) == (7500, 8000)


def test_comments_and_blank_lines_are_ignored() -> None:
    config = parse_config("# head\n\n  a h 4000 6500 1  # trailing\n\nb h 4001 6501 2\n")
    assert config.ids == ("a", "b")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a h 4000 6500\n", "got 4 fields"),
        ("a h 4000 6500 1 2 3 4 5\n", "got 9 fields"),
        ("a h 4000 6500 1 5000 7000 x\n", "ws_port 'x' is not an integer"),
        ("a h 4000 6500 1 5000 7000 7000\n", "port 7000 on h used twice (ws_port; already raft_port"),
        ("a h 64000 6500 1 5000\n", "ws_port 66000 (derived) is out of range"),
        ("a h x 6500 1\n", "clients_port 'x' is not an integer"),
        ("a h 70000 6500 1\n", "out of range"),
        ("a h 0 6500 1\n", "out of range"),
        ("a h 4000 6500 p\n", "priority 'p' is not an integer"),
        ("a h 4000 6500 1\na h 4001 6501 2\n", "duplicate server id 'a'"),
        ("a h 4000 6500 1\nb h 4001 6501 1\n", "duplicate priority 1"),
        ("a h 4000 6500 1\nb h 4000 5001 2\n", "port 4000 on h used twice"),
        ("a h 4000 4000 1\n", "port 4000 on h used twice"),
        ("a/b h 4000 6500 1\n", "server id 'a/b'"),
        ("a h 65000 6500 1\n", "admin_port 66000 (derived) is out of range"),
        ("# nothing\n", "no servers configured"),
    ],
)
def test_bad_configuration_names_file_and_line(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="conf.txt")
    assert fragment in str(info.value)
    assert str(info.value).startswith("conf.txt")


def test_same_port_on_different_hosts_is_fine() -> None:
    config = parse_config("a h1 4000 6500 1\nb h2 4000 6500 2\n")
    assert len(config.servers) == 2


def test_error_reports_line_number() -> None:
    with pytest.raises(ConfigError, match=r"^c\.txt:3: "):
        parse_config("a h 4000 6500 1\n\nb h 4001\n", source="c.txt")


def test_fingerprint_differs_between_clusters() -> None:
    one = parse_config("a h 4000 6500 1\n")
    two = parse_config("a h 4001 6500 1\n")
    assert one.fingerprint() != two.fingerprint()
    assert one.fingerprint() == parse_config("a h 4000 6500 1 # same\n").fingerprint()


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "nope.txt")


def test_node_exits_2_with_one_line_on_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("s1 127.0.0.1 4000 notaport 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "node", "--config", str(bad), "--id", "s1"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env={"CHATMESH_SECRET": "x", "PATH": "/usr/bin"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "bad.txt:1" in proc.stderr and "coordination_port 'notaport'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_node_exits_2_without_a_cluster_secret(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "node", "--config", str(REPO / "configuration.txt"), "--id", "s1"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no cluster secret" in proc.stderr


def test_node_exits_2_for_unknown_server_id() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "node", "--config", str(REPO / "configuration.txt"), "--id", "zz"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env={"CHATMESH_SECRET": "x", "PATH": "/usr/bin"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "'zz' is not in" in proc.stderr


def test_node_exits_2_for_a_bad_limit_variable() -> None:
    env = {"CHATMESH_SECRET": "x", "PATH": "/usr/bin", "CHATMESH_LIMIT_MAX_CLEINTS": "5"}
    proc = subprocess.run(
        [sys.executable, "-m", "node", "--config", str(REPO / "configuration.txt"), "--id", "s1"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "CHATMESH_LIMIT_MAX_CLEINTS: unknown limit" in proc.stderr
    assert "Traceback" not in proc.stderr
