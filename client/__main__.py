"""`python -m client -h HOST -p PORT -i IDENTITY`: the chatmesh terminal chat client.

Options are the Java client's (`-h -p -i -d`), plus fallback servers for reconnection (`--config`,
`--servers`) and a non-interactive mode for scripts (`--batch`, automatic when stdin is not a terminal).
Exit status: 0 after #quit or end of input; 1 identity refused; 2 bad usage; 3 no connection (could not
connect, or lost and could not reconnect).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from collections.abc import Sequence

from client.connection import ServerAddress
from client.core import EXIT_USAGE, ClientCore
from client.shell import ClientShell, ShellOptions, StreamOutput
from cluster.config import ConfigError, load_config

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4444  # the Java client's default, and s1's in the shipped configuration.txt


class UsageError(Exception):
    pass


def parse_address(text: str) -> ServerAddress:
    """`host:port`, or `[v6-address]:port`."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"bad server address {text!r}: expected host:port")
    return ServerAddress(host, int(port_text))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Terminal chat client for chatmesh (and any server of the classic JSON chat protocol).",
        # -h is the host, as in the Java client; help is --help only.
        add_help=False,
    )
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument("-h", "--host", help=f"server host (default {DEFAULT_HOST}, or the first fallback)")
    parser.add_argument("-p", "--port", type=int, help=f"server client port (default {DEFAULT_PORT})")
    parser.add_argument("-i", "--identity", required=True, help="your identity: 3-16 letters/digits, letter first")
    parser.add_argument("--config", metavar="FILE", help="a configuration.txt: its servers are reconnection fallbacks")
    parser.add_argument("--servers", metavar="HOST:PORT,...", help="fallback servers for reconnection")
    parser.add_argument("--batch", action="store_true", help="no prompt: lines from stdin, events to stdout")
    parser.add_argument(
        "--wait-replies", action="store_true", help="send each stdin line only after the previous one is answered"
    )
    parser.add_argument("--reply-timeout", type=float, default=15.0, metavar="S", help="wait for an answer (15)")
    parser.add_argument("--connect-timeout", type=float, default=5.0, metavar="S", help="wait for a connect (5)")
    parser.add_argument(
        "--reconnect-timeout", type=float, default=30.0, metavar="S", help="keep trying to reconnect for (30)"
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS (the server's clients port must use it)")
    parser.add_argument("--ca", metavar="FILE", help="trust the CA certificates in FILE (PEM) for --tls (default: the "
                        "system's)")  # fmt: skip
    parser.add_argument("-d", "--debug", action="store_true", help="print the JSON sent and received on stderr")
    return parser


def server_addresses(args: argparse.Namespace) -> list[ServerAddress]:
    """The server to try first, then the fallbacks (configuration file, then --servers)."""
    fallbacks: list[ServerAddress] = []
    if args.config:
        config = load_config(args.config)
        fallbacks += [ServerAddress(s.host, s.clients_port, s.server_id) for s in config.servers]
    if args.servers:
        fallbacks += [parse_address(part) for part in args.servers.split(",") if part.strip()]
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"port {args.port} is out of range 1..65535")
    if args.host is None and args.port is None and fallbacks:
        return fallbacks
    primary = ServerAddress(args.host or DEFAULT_HOST, args.port if args.port is not None else DEFAULT_PORT)
    named = next((f for f in fallbacks if f.same_endpoint(primary)), primary)
    return [named, *fallbacks]


def positive(value: float, name: str) -> float:
    if not value > 0:
        raise UsageError(f"{name} must be positive")
    return value


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.ca and not args.tls:
        raise UsageError("--ca needs --tls")
    if not args.tls:
        return None
    try:
        return ssl.create_default_context(cafile=args.ca)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use CA file {args.ca}: {getattr(exc, 'strerror', None) or exc}") from None


def shell_options(args: argparse.Namespace) -> ShellOptions:
    return ShellOptions(
        tls=tls_context(args),
        wait_replies=args.wait_replies,
        reply_timeout_s=positive(args.reply_timeout, "--reply-timeout"),
        connect_timeout_s=positive(args.connect_timeout, "--connect-timeout"),
        reconnect_timeout_s=positive(args.reconnect_timeout, "--reconnect-timeout"),
        debug=args.debug,
    )


async def run(identity: str, addresses: list[ServerAddress], options: ShellOptions, interactive: bool) -> int:
    output = StreamOutput()
    shell = ClientShell(ClientCore(identity), addresses, output, options)
    # Imported here so that batch runs never load the terminal library (prompt_toolkit).
    from client.terminal import new_session, prompt_source, stdin_source

    if not interactive:
        return await shell.run(stdin_source(sys.stdin.fileno()))
    from prompt_toolkit.patch_stdout import patch_stdout

    session = new_session()

    def redraw() -> None:
        if session.app.is_running:
            session.app.invalidate()

    output.on_refresh = redraw
    with patch_stdout():
        return await shell.run(prompt_source(shell, session))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        addresses = server_addresses(args)
        options = shell_options(args)
    except (ConfigError, UsageError) as exc:
        print(f"chatmesh-client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    interactive = not args.batch and sys.stdin.isatty() and sys.stdout.isatty()
    try:
        return asyncio.run(run(args.identity, addresses, options, interactive))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
