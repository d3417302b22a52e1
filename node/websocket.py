"""WebSocket clients (issue 15): the chat protocol of the TCP port, one JSON message per text frame, on
`ws_port`.

Theory of operation
-------------------
A thin shell around the Sans-I/O `ServerProtocol` of the `websockets` library, on the server's own event
loop. The opening handshake (bounded in time and in concurrent handshakes) is done here; after it the
connection is handed to `ChatServer.serve_connection`, exactly like a TCP connection, with two adapters:

- `_frame_source` turns frames into the lines the chat server expects: each complete text message is one
  line. A binary message, or a message larger than `Limits.max_line_bytes` (the library refuses it with
  close code 1009 before buffering it), is an over-long line: the client is dropped as an abrupt quit. A
  close frame or a protocol error is the end of the stream.
- `_FrameTransport` is the write side: the chat server writes newline-terminated JSON lines (several per
  call after a broadcast run); each line becomes one text frame. A `route` line additionally gets `wsurl`,
  the WebSocket address of the server it routes to, so a browser can follow it (TCP clients never see it).

So sessions, rooms, limits, relaying and every protocol rule are the chat server's, shared with TCP
clients; nothing here knows the protocol beyond recognising a `route` line.

Browsers send an `Origin` header: it must be one of the cluster's own chat pages (the admin origins) or
one listed in `CHATMESH_WS_ORIGINS` (`*` allows any). Clients that send no Origin (not browsers) are
accepted, as on the TCP port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Origin

from cluster.config import ClusterConfig, ServerConfig
from cluster.framing import FrameError, decode_object, encode
from node.server import READ_CHUNK_BYTES, ChatServer, LineSource, write_transport

log = logging.getLogger("chatmesh.websocket")

# How long a new connection may take to complete its opening handshake.
HANDSHAKE_TIMEOUT_S = 10.0
# Connections allowed in their opening handshake at once; more are closed at accept.
MAX_HANDSHAKES = 256
# Environment variable: extra allowed browser origins, comma-separated ("*" = any origin).
ORIGINS_ENV = "CHATMESH_WS_ORIGINS"

_ROUTE_PREFIX = b'{"type":"route",'


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def ws_url(server: ServerConfig, secure: bool) -> str:
    """The address a browser connects to for `server`'s WebSocket port."""
    return f"{'wss' if secure else 'ws'}://{_host_in_url(server.host)}:{server.ws_port}/"


def chat_origins(config: ClusterConfig, admin_secure: bool, extra: str = "") -> list[Origin | None] | None:
    """Browser origins allowed to open a chat WebSocket: every server's admin origin (the chat pages),
    their `localhost` spelling for loopback hosts, `extra` (comma-separated), and no Origin at all
    (non-browser clients). None means any origin (`extra` contains "*")."""
    extras = [o.strip().rstrip("/") for o in extra.split(",") if o.strip()]
    if "*" in extras:
        return None
    scheme = "https" if admin_secure else "http"
    origins: list[Origin | None] = [None]
    for server in config.servers:
        hosts = [_host_in_url(server.host)]
        if server.host.startswith("127.") or server.host == "::1":
            hosts.append("localhost")
        for host in hosts:
            origins.append(Origin(f"{scheme}://{host}:{server.admin_port}"))
    origins += [Origin(o) for o in extras]
    return origins


def listener_for(
    chat: ChatServer, config: ClusterConfig, me: ServerConfig, tls: ssl.SSLContext | None, admin_tls: bool,
    extra_origins: str = "",
) -> WebSocketListener:
    """The WebSocket listener of server `me`: routes name the other servers' WebSocket addresses (with this
    server's scheme: every server of a cluster is set up alike)."""
    return WebSocketListener(
        chat,
        me.host,
        me.ws_port,
        route_urls={(s.host, s.clients_port): ws_url(s, tls is not None) for s in config.servers},
        origins=chat_origins(config, admin_tls, extra_origins),
        tls=tls,
    )


class _FrameTransport(asyncio.WriteTransport):
    """The chat server's write side over a WebSocket: one text frame per JSON line."""

    def __init__(
        self, transport: asyncio.WriteTransport, protocol: ServerProtocol, route_urls: Mapping[tuple[str, int], str]
    ) -> None:
        super().__init__()
        self._transport = transport
        self._protocol = protocol
        self._route_urls = route_urls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        protocol = self._protocol
        if protocol.state is not State.OPEN:
            return  # closing: the client said goodbye or broke a rule; nothing more goes out
        for line in bytes(data).split(b"\n"):
            if line:
                protocol.send_text(self._with_ws_address(line) if line.startswith(_ROUTE_PREFIX) else line)
        self.push()

    def _with_ws_address(self, line: bytes) -> bytes:
        try:
            message = decode_object(line)
            url = self._route_urls.get((str(message["host"]), int(message["port"])))
        except (FrameError, KeyError, ValueError):
            return line
        if url is None:
            return line
        message["wsurl"] = url
        return encode(message).rstrip(b"\n")

    def push(self) -> None:
        """Send what the protocol has queued (frames, pongs, a close echo); an end-of-stream marker closes
        the TCP connection."""
        chunks = self._protocol.data_to_send()
        data = b"".join(chunks)
        if data and not self._transport.is_closing():
            self._transport.write(data)
        if any(not chunk for chunk in chunks):
            self._transport.close()

    def close(self) -> None:
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(1000)
        self.push()
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _frame_source(
    reader: asyncio.StreamReader, protocol: ServerProtocol, transport: _FrameTransport, first: Iterable[Any]
) -> LineSource:
    """The lines of a WebSocket client: one per complete text message (see the module docstring)."""
    limit = protocol.max_message_size
    pending: list[Any] = list(first)
    fragments: list[bytes] = []
    ended = False

    async def next_lines() -> tuple[list[bytes], str | None] | None:
        nonlocal pending, fragments, ended
        while not ended:
            if not pending:
                try:
                    data = await reader.read(READ_CHUNK_BYTES)
                except (ConnectionError, OSError):
                    return None
                if not data:
                    protocol.receive_eof()
                    transport.push()
                    return None
                protocol.receive_data(data)
                transport.push()  # pongs, the echo of a close frame
                pending = list(protocol.events_received())
            lines: list[bytes] = []
            events, pending = pending, []
            for event in events:
                if not isinstance(event, Frame):
                    continue
                if event.opcode is Opcode.BINARY:
                    ended = True
                    return lines, "binary frame (only text frames carry chat messages)"
                if event.opcode is Opcode.TEXT or event.opcode is Opcode.CONT:
                    fragments.append(bytes(event.data))  # the library bounds a whole message by `limit`
                    if event.fin:
                        message = fragments[0] if len(fragments) == 1 else b"".join(fragments)
                        fragments = []
                        if not _is_utf8(message):
                            # RFC 6455 8.1: fail the connection (1007); for the chat, an abrupt quit.
                            protocol.fail(1007, "text frame is not UTF-8")
                            transport.push()
                            ended = True
                            break
                        lines.append(message)
                elif event.opcode is Opcode.CLOSE:
                    ended = True
                    break
            if isinstance(protocol.parser_exc, PayloadTooBig):
                ended = True
                return lines, f"message larger than {limit} bytes"
            if protocol.state is State.CLOSED or protocol.parser_exc is not None:
                ended = True  # a protocol error: the library already failed the connection
            if lines:
                return lines, None
        return None

    return next_lines


class WebSocketListener:
    """Accepts WebSocket clients on `host:port` and serves them through `chat`."""

    def __init__(
        self,
        chat: ChatServer,
        host: str,
        port: int,
        *,
        route_urls: Mapping[tuple[str, int], str],
        origins: Sequence[Origin | None] | None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.chat = chat
        self.host = host
        self.port = port  # the bound port once started
        self.route_urls = route_urls
        self.origins = origins
        self.tls = tls
        self._server: asyncio.Server | None = None
        self._handshaking = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("%s: accepting WebSocket clients on %s:%d", self.chat.server_id, self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), HANDSHAKE_TIMEOUT_S)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = write_transport(writer)
        if self._handshaking >= MAX_HANDSHAKES:
            raw.abort()
            return
        protocol = ServerProtocol(origins=self.origins, max_size=self.chat.limits.max_line_bytes, logger=log)
        transport = _FrameTransport(raw, protocol, self.route_urls)
        self._handshaking += 1
        try:
            first = await asyncio.wait_for(self._handshake(reader, protocol, transport), HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, ConnectionError, OSError):
            first = None
        except asyncio.CancelledError:
            raw.abort()
            return
        finally:
            self._handshaking -= 1
        if first is None:
            raw.close()  # after the refusal the protocol queued, if any
            return
        source = _frame_source(reader, protocol, transport, first)
        await self.chat.serve_connection(transport, writer.get_extra_info("peername"), source)

    @staticmethod
    async def _handshake(
        reader: asyncio.StreamReader, protocol: ServerProtocol, transport: _FrameTransport
    ) -> list[Any] | None:
        """Complete the opening handshake: the events that followed the request, or None if refused."""
        while True:
            data = await reader.read(READ_CHUNK_BYTES)
            if not data:
                return None
            protocol.receive_data(data)
            events = list(protocol.events_received())
            for i, event in enumerate(events):
                if isinstance(event, Request):
                    response = protocol.accept(event)
                    protocol.send_response(response)
                    transport.push()
                    if protocol.state is not State.OPEN:
                        log.info("refused a WebSocket handshake: %s", protocol.handshake_exc)
                        return None
                    return events[i + 1 :]
            transport.push()  # e.g. a 400 answer to a request that is not HTTP
            if protocol.handshake_exc is not None:
                return None
