"""Optional TLS on the three ports people connect to: the clients port, the WebSocket port (wss) and the
admin port (https). See docs/security.md.

Each port has its own certificate and key, from a flag or an environment variable (the flag wins):

    --clients-tls-cert FILE --clients-tls-key FILE   CHATMESH_CLIENTS_TLS_CERT / CHATMESH_CLIENTS_TLS_KEY
    --ws-tls-cert FILE      --ws-tls-key FILE        CHATMESH_WS_TLS_CERT / CHATMESH_WS_TLS_KEY
    --admin-tls-cert FILE   --admin-tls-key FILE     CHATMESH_ADMIN_TLS_CERT / CHATMESH_ADMIN_TLS_KEY

With none given nothing changes. A certificate without its key (or the reverse), an unreadable file or a
key that does not match is a startup error naming the files.

The admin port: waitress has no TLS, so with an admin certificate the server runs waitress on a private
loopback port and `AdminTlsProxy`, on the server's event loop, terminates TLS on the configured admin
port and relays each connection to it. The proxy remembers which of its own loopback source ports carries
which client, and `RealPeer` gives the admin app that client's address (never "127.0.0.1"), so the
loopback-only option and the logs see the real peer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask

from node.admin import AdminServer, serve_admin

log = logging.getLogger("chatmesh.tls")

# (flag prefix, environment prefix, what) for each port that can speak TLS.
PORTS = (
    ("clients", "CHATMESH_CLIENTS_TLS", "clients port"),
    ("ws", "CHATMESH_WS_TLS", "WebSocket port"),
    ("admin", "CHATMESH_ADMIN_TLS", "admin port"),
)
# A TLS handshake on any of these ports must finish within this long.
TLS_HANDSHAKE_TIMEOUT_S = 10.0
# Bytes relayed per read by the admin proxy.
PROXY_CHUNK_BYTES = 64 * 1024
# Connections the admin proxy relays at once (waitress itself accepts 64).
PROXY_MAX_CONNECTIONS = 64


class TlsError(ValueError):
    """Unusable TLS settings; str() is one readable line."""


@dataclass(frozen=True)
class TlsOptions:
    """Server-side TLS contexts; None = plain TCP on that port."""

    clients: ssl.SSLContext | None = None
    websocket: ssl.SSLContext | None = None
    admin: ssl.SSLContext | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, env, what in PORTS:
        parser.add_argument(f"--{flag}-tls-cert", metavar="FILE", help=f"TLS certificate (PEM) of the {what} "
                            f"(else ${env}_CERT)")  # fmt: skip
        parser.add_argument(f"--{flag}-tls-key", metavar="FILE", help=f"its private key (else ${env}_KEY)")


def server_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise TlsError(f"cannot use TLS certificate {cert} with key {key}: {reason}") from None
    return context


def options_from(args: argparse.Namespace, environ: Mapping[str, str]) -> TlsOptions:
    contexts: dict[str, ssl.SSLContext | None] = {}
    for flag, env, what in PORTS:
        cert = getattr(args, f"{flag}_tls_cert", None) or environ.get(f"{env}_CERT", "").strip() or None
        key = getattr(args, f"{flag}_tls_key", None) or environ.get(f"{env}_KEY", "").strip() or None
        if (cert is None) != (key is None):
            raise TlsError(f"TLS on the {what} needs both a certificate and a key (--{flag}-tls-cert and "
                           f"--{flag}-tls-key, or ${env}_CERT and ${env}_KEY)")  # fmt: skip
        contexts[flag] = server_context(cert, key) if cert and key else None
    return TlsOptions(clients=contexts["clients"], websocket=contexts["ws"], admin=contexts["admin"])


class AdminTlsProxy:
    """Terminates TLS on `host:port` and relays each connection to `127.0.0.1:backend_port` (waitress)."""

    def __init__(self, host: str, port: int, backend_port: int, tls: ssl.SSLContext) -> None:
        self.host = host
        self.port = port
        self.backend_port = backend_port
        self.tls = tls
        # Our loopback source port towards waitress -> the real client's address. Written on the loop, read
        # by waitress threads (single dict operations are atomic in CPython).
        self.peers: dict[int, str] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._relay, self.host, self.port, ssl=self.tls, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S
        )
        log.info("admin TLS on %s:%d, relayed to waitress on 127.0.0.1:%d", self.host, self.port, self.backend_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= PROXY_MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        backend: asyncio.StreamWriter | None = None
        local_port = 0
        try:
            back_reader, backend = await asyncio.open_connection("127.0.0.1", self.backend_port)
            local_port = backend.get_extra_info("sockname")[1]
            self.peers[local_port] = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
            await asyncio.gather(_pipe(reader, backend), _pipe(back_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.peers.pop(local_port, None)
            for w in (writer, backend):
                if w is not None:
                    w.close()  # sends what is still buffered, then closes
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        while data := await reader.read(PROXY_CHUNK_BYTES):
            writer.write(data)
            await writer.drain()  # backpressure: never buffer more than the transport's limit
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()


async def serve_admin_app(app: Flask, host: str, port: int, tls: ssl.SSLContext | None) -> AdminListeners:
    """Serve the admin app on `host:port`: waitress alone, or with `tls` waitress on a private loopback
    port behind `AdminTlsProxy` (and `RealPeer`, so the app sees the real clients)."""
    if tls is None:  # binding runs on a worker thread: nothing blocking on the loop
        return AdminListeners(await asyncio.to_thread(serve_admin, app, host, port), None)
    server = await asyncio.to_thread(serve_admin, app, "127.0.0.1", 0)
    proxy = AdminTlsProxy(host, port, server.port, tls)
    app.wsgi_app = RealPeer(app.wsgi_app, proxy.peers)  # type: ignore[method-assign]
    try:
        await proxy.start()
    except OSError:
        server.close()
        raise
    return AdminListeners(server, proxy)


@dataclass
class AdminListeners:
    server: AdminServer
    proxy: AdminTlsProxy | None

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
        await asyncio.to_thread(self.server.close)


class RealPeer:
    """WSGI middleware behind `AdminTlsProxy`: the request's REMOTE_ADDR is the proxied client's, and the
    scheme is https. A connection the proxy did not make keeps its own (loopback) address."""

    def __init__(self, app: Callable[..., Iterable[bytes]], peers: Mapping[int, str]) -> None:
        self.app = app
        self.peers = peers

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with contextlib.suppress(KeyError, ValueError):
            real = self.peers.get(int(environ["REMOTE_PORT"]))
            if real is not None:
                environ["REMOTE_ADDR"] = real
                environ["wsgi.url_scheme"] = "https"
        return self.app(environ, start_response)
