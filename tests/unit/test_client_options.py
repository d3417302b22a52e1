"""The client's command line, server lists and bounded stdin line splitting (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.__main__ import UsageError, build_parser, parse_address, server_addresses
from client.connection import ServerAddress
from client.shell import UserLine, UserOversized, reconnect_order, unique_addresses
from client.terminal import MAX_INPUT_LINE_BYTES, split_lines


def test_java_style_short_options_and_long_only_help() -> None:
    args = build_parser().parse_args(["-h", "example.org", "-p", "4445", "-i", "Adel", "-d"])
    assert (args.host, args.port, args.identity, args.debug) == ("example.org", 4445, "Adel", True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.0.1:4444", ServerAddress("127.0.0.1", 4444)), ("[::1]:4445", ServerAddress("::1", 4445))],
)
def test_parse_address(text: str, address: ServerAddress) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["localhost", ":4444", "host:0", "host:70000", "host:x"])
def test_bad_addresses_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_address(text)


def test_config_servers_are_fallbacks_and_name_the_primary(tmp_path: Path) -> None:
    config = tmp_path / "configuration.txt"
    config.write_text("s1 127.0.0.1 4444 5555 1\ns2 127.0.0.1 4445 5556 2\n")
    args = build_parser().parse_args(["-p", "4445", "-i", "Adel", "--config", str(config), "--servers", "h:1"])
    addresses = unique_addresses(server_addresses(args))
    assert addresses == [
        ServerAddress("127.0.0.1", 4445, "s2"),
        ServerAddress("127.0.0.1", 4444, "s1"),
        ServerAddress("h", 1),
    ]
    assert addresses[0].label == "s2 (127.0.0.1:4445)"


def test_without_host_and_port_the_fallbacks_are_tried_in_order(tmp_path: Path) -> None:
    args = build_parser().parse_args(["-i", "Adel", "--servers", "a:1,b:2"])
    assert server_addresses(args) == [ServerAddress("a", 1), ServerAddress("b", 2)]
    args = build_parser().parse_args(["-i", "Adel"])
    assert server_addresses(args) == [ServerAddress("127.0.0.1", 4444)]


def test_reconnect_tries_the_servers_after_the_lost_one_first_and_the_lost_one_last() -> None:
    a, b, c, d = (ServerAddress("h", port, f"s{port}") for port in (1, 2, 3, 4))
    assert reconnect_order([a, b, c, d], b) == [c, d, a, b]
    assert reconnect_order([a, b, c, d], d) == [a, b, c, d]
    unknown = ServerAddress("elsewhere", 9)
    assert reconnect_order([a, b], unknown) == [a, b, unknown]


def test_split_lines_keeps_partial_lines_and_strips_cr() -> None:
    buffer = bytearray(b"one\r\ntwo\nthr")
    events, discarding = split_lines(buffer, False)
    assert events == [UserLine("one"), UserLine("two")] and buffer == b"thr" and not discarding


def test_split_lines_bounds_an_over_long_line_and_recovers() -> None:
    buffer = bytearray(b"x" * (MAX_INPUT_LINE_BYTES + 1))
    events, discarding = split_lines(buffer, False)
    assert events == [] and discarding and len(buffer) == 0
    buffer += b"rest of it\nnext\n"
    events, discarding = split_lines(buffer, discarding)
    assert events == [UserOversized(), UserLine("next")] and not discarding


def test_split_lines_decodes_utf8_leniently() -> None:
    events, _ = split_lines(bytearray("héllo\n".encode() + b"\xff\n"), False)
    assert events == [UserLine("héllo"), UserLine("\ufffd")]
