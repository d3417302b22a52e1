"""The admin HTTP surface of one server: JSON reads, token-protected writes, Prometheus metrics and the
live dashboard (issue 9, with `/health` and `/status` from issue 4).

Threads. The app runs in waitress worker threads. It reads only the immutable snapshot the event loop
published (`SnapshotBox.get`), and it steers the server only through `AdminActions`, whose implementation
crosses into the loop (`run_coroutine_threadsafe`) and may raise `TimeoutError` when the loop does not
answer in time; that becomes a 503.

Trust. Reads are open unless `loopback_reads_only` is set, in which case a request from any non-loopback
address (read or write) gets 403. Writes need `Authorization: Bearer <token>`; with no token configured
every write is refused with 403, so an operator who forgot the token gets a clear answer instead of an
open door. The token is compared in constant time. The peer address is the socket's (waitress ignores
forwarding headers unless told to trust a proxy), so `X-Forwarded-For` cannot fake loopback.

Errors. Every error, including routing errors, oversized bodies and bugs, is a JSON object
`{"error": <slug>, "message": <text>, "status": <code>}`; never an HTML page or a traceback.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hmac
import ipaddress
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import waitress
from flask import Flask, Response, jsonify, request, send_from_directory
from waitress.trigger import trigger as WaitressTrigger
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from node.metrics import metrics_registry, render_metrics
from node.status import ClientView, RoomView, ServerView, Snapshot, SnapshotBox

log = logging.getLogger("chatmesh.admin")

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The largest request body accepted (kick bodies are a few bytes); more is a 413.
MAX_BODY_BYTES = 64 * 1024
# waitress worker threads: reads are cheap snapshot lookups; writes wait for the loop at most
# the action timeout, so a few threads keep reads responsive while a write waits.
ADMIN_THREADS = 4
# Connections waitress keeps open at once (its default is 100); an admin port needs few.
ADMIN_CONNECTION_LIMIT = 64
# Idle keep-alive connections are closed after this long.
ADMIN_CHANNEL_TIMEOUT_S = 30
# How long AdminServer.close() waits for the serving thread and workers to finish.
ADMIN_CLOSE_TIMEOUT_S = 5.0
# /health reports 503 when the loop has not published for this long: the process is up but wedged.
STALE_SNAPSHOT_S = 10.0

DELETE_ROOM_RESULTS = ("ok", "not-found", "not-local", "mainhall", "unavailable")


class AdminActions(Protocol):
    """Writes, carried out on the event loop by the server (may raise TimeoutError)."""

    def start_election(self) -> None: ...

    def kick(self, identity: str) -> bool:
        """False when `identity` is not a client of this server."""
        ...

    def delete_room(self, room_id: str) -> str:
        """One of "ok", "not-found", "not-local", "mainhall", "unavailable"."""
        ...


class ApiError(Exception):
    """An operating error that becomes a JSON error response."""

    def __init__(self, status: int, message: str, error: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error = error or _slug(status)


def _slug(status: int) -> str:
    return HTTP_STATUS_CODES.get(status, "error").lower().replace(" ", "-").replace("'", "")


def error_response(status: int, message: str, error: str | None = None) -> Response:
    response = jsonify({"error": error or _slug(status), "message": message, "status": status})
    response.status_code = status
    return response


def is_loopback(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1)."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


@dataclass(frozen=True, slots=True)
class Schemes:
    """Which ports of the cluster speak TLS (every server is set up alike): the admin port (https) and the
    WebSocket port (wss)."""

    admin_tls: bool = False
    ws_tls: bool = False

    @property
    def http(self) -> str:
        return "https" if self.admin_tls else "http"


PLAIN = Schemes()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def admin_url(server: ServerView, schemes: Schemes = PLAIN) -> str:
    return f"{schemes.http}://{_url_host(server.host)}:{server.admin_port}"


def ws_url(server: ServerView, schemes: Schemes = PLAIN) -> str:
    """Where the chat page opens its WebSocket to `server`."""
    return f"{'wss' if schemes.ws_tls else 'ws'}://{_url_host(server.host)}:{server.ws_port}/"


def _origins(snapshot: Snapshot | None, schemes: Schemes = PLAIN) -> set[str]:
    """Browser origins of the cluster's dashboards and chat pages: the only ones allowed to read
    cross-origin."""
    if snapshot is None:
        return set()
    origins: set[str] = set()
    for server in snapshot.servers:
        origins.add(admin_url(server, schemes))
        if is_loopback(server.host):
            # An operator may open a loopback dashboard as localhost.
            origins.add(f"{schemes.http}://localhost:{server.admin_port}")
    return origins


def _ws_origins(snapshot: Snapshot | None, schemes: Schemes) -> set[str]:
    """The WebSocket addresses the chat page may connect to (its CSP connect-src)."""
    if snapshot is None:
        return set()
    scheme = "wss" if schemes.ws_tls else "ws"
    found: set[str] = set()
    for server in snapshot.servers:
        found.add(ws_url(server, schemes).rstrip("/"))
        if is_loopback(server.host):
            found.add(f"{scheme}://localhost:{server.ws_port}")
    return found


# --- JSON shapes ---------------------------------------------------------------------------------


def server_json(server: ServerView, snapshot: Snapshot, schemes: Schemes = PLAIN) -> dict[str, Any]:
    return {
        "server_id": server.server_id,
        "host": server.host,
        "clients_port": server.clients_port,
        "coordination_port": server.coordination_port,
        "admin_port": server.admin_port,
        "raft_port": server.raft_port,
        "priority": server.priority,
        "up": server.up,
        "role": server.role,
        "coordinator": server.server_id == snapshot.coordinator,
        "raft_leader": server.server_id == snapshot.raft.leader,
        "admin_url": admin_url(server, schemes),
        "ws_port": server.ws_port,
        "ws_url": ws_url(server, schemes),
        "incarnation": server.incarnation,
        "self": server.server_id == snapshot.server_id,
    }


def room_json(room: RoomView, snapshot: Snapshot, with_members: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "room_id": room.room_id,
        "server_id": room.server_id,
        "owner": room.owner,
        "local": room.server_id == snapshot.server_id,
        "member_count": None if room.members is None else len(room.members),
    }
    if with_members:
        data["members"] = None if room.members is None else list(room.members)
    return data


def client_json(client: ClientView, snapshot: Snapshot) -> dict[str, Any]:
    return {
        "identity": client.identity,
        "server_id": client.server_id,
        "local": client.server_id == snapshot.server_id,
        "room_id": client.room_id,
        "in_transit": client.in_transit,
    }


def status_json(snapshot: Snapshot) -> dict[str, Any]:
    """Issue 4's /status fields, then a few extra ones the dashboard uses. The status types serialise
    themselves (their fields are the schema: node/status.py)."""
    return {
        "server_id": snapshot.server_id,
        "pid": snapshot.pid,
        "role": snapshot.role,
        "coordinator": snapshot.coordinator,
        "servers_up": list(snapshot.servers_up),
        "clients": snapshot.local_client_count,
        "rooms": [r.room_id for r in snapshot.local_rooms],
        "raft": dataclasses.asdict(snapshot.raft),
        "registry": dataclasses.asdict(snapshot.registry_counts),
        "serving": snapshot.serving,
        "counters": counters_json(snapshot),
        "taken_at": snapshot.taken_at,
        "loop": {"max_gap_s": snapshot.loop_max_gap_s, "stalls": snapshot.loop_stalls},
    }


def counters_json(snapshot: Snapshot) -> dict[str, int]:
    return dataclasses.asdict(snapshot.counters)


def cluster_json(snapshot: Snapshot, schemes: Schemes = PLAIN) -> dict[str, Any]:
    """Everything the dashboard draws, from this server's point of view, in one request."""
    clients_per_server: dict[str, int] = {}
    for client in snapshot.clients:
        clients_per_server[client.server_id] = clients_per_server.get(client.server_id, 0) + 1
    rooms_per_server: dict[str, int] = {}
    for room in snapshot.rooms:
        rooms_per_server[room.server_id] = rooms_per_server.get(room.server_id, 0) + 1
    servers = []
    for server in snapshot.servers:
        data = server_json(server, snapshot, schemes)
        data["clients"] = clients_per_server.get(server.server_id, 0)
        data["rooms"] = rooms_per_server.get(server.server_id, 0)
        servers.append(data)
    status = status_json(snapshot)
    return {
        "server_id": snapshot.server_id,
        "serving": snapshot.serving,
        "taken_at": snapshot.taken_at,
        "role": snapshot.role,
        "coordinator": snapshot.coordinator,
        "raft": status["raft"],
        "registry": status["registry"],
        "counters": status["counters"],
        "servers": servers,
        "rooms": [room_json(r, snapshot) for r in snapshot.rooms],
        "events": [{"time": e.wall_time, "text": e.text} for e in reversed(snapshot.recent_events)],
    }


# --- the app -------------------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def create_app(
    snapshots: SnapshotBox,
    actions: AdminActions,
    token: str | None,
    loopback_reads_only: bool = False,
    schemes: Schemes = PLAIN,
) -> Flask:
    """The admin app of one server. `token` None or blank refuses every write."""
    app = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]  # fields in the documented order
    expected = token.strip().encode() if token and token.strip() else None
    registry = metrics_registry(snapshots)

    def current() -> Snapshot:
        snapshot = snapshots.get()
        if snapshot is None:
            raise ApiError(503, "this server has not published its state yet; it is starting", "unavailable")
        return snapshot

    def write(view: F) -> F:
        """Bearer-token check for a write endpoint (before the body is looked at)."""

        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if expected is None:
                raise ApiError(
                    403,
                    "admin writes are disabled: no admin token is configured on this server "
                    "(set CHATMESH_ADMIN_TOKEN or --admin-token-file)",
                )
            header = request.headers.get("Authorization", "")
            scheme, _, presented = header.partition(" ")
            # compare_digest on bytes: on str it refuses non-ASCII input with a TypeError.
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
                log.warning(
                    "admin: refused %s %s from %s: bad or missing token",
                    request.method,
                    request.path,
                    request.remote_addr,
                )
                raise ApiError(401, "a valid 'Authorization: Bearer <token>' header is required")
            return view(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    def run_action(what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except (TimeoutError, concurrent.futures.TimeoutError):
            raise ApiError(503, f"{what}: the server did not answer in time; try again", "unavailable") from None
        except RuntimeError as exc:  # e.g. the loop is closed while the server stops
            raise ApiError(503, f"{what}: the server is not running ({exc})", "unavailable") from None

    @app.before_request
    def check_source() -> Response | None:
        if loopback_reads_only and not is_loopback(request.remote_addr):
            log.warning("admin: refused %s %s from non-loopback %s", request.method, request.path, request.remote_addr)
            return error_response(403, "this admin port answers loopback clients only")
        return None

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        if response.mimetype == "application/json":
            # Live state: a cached answer is a wrong answer.
            response.headers["Cache-Control"] = "no-store"
            origin = request.headers.get("Origin")
            if request.method == "GET" and origin and origin in _origins(snapshots.get(), schemes):
                # Only the cluster's own dashboards may read cross-origin (to follow other servers).
                response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
        return response

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        response = error_response(exc.status, exc.message, exc.error)
        if exc.status == 401:
            # RFC 6750: tell the client which scheme the endpoint wants.
            response.headers["WWW-Authenticate"] = 'Bearer realm="chatmesh-admin"'
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        response = error_response(status, exc.description or _slug(status))
        for name, value in exc.get_headers():
            if name.lower() in ("allow", "www-authenticate", "retry-after"):
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def crash(exc: Exception) -> Response:
        log.exception("admin: unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal error; see the server log", "internal")

    # -- reads ------------------------------------------------------------------------------------

    @app.get("/health")
    def health() -> tuple[Response, int]:
        snapshot = snapshots.get()
        age = snapshots.age_s()
        if snapshot is None or not snapshot.serving:
            return jsonify({"status": "starting"}), 503
        if age is not None and age > STALE_SNAPSHOT_S:
            return jsonify({"status": "stale", "snapshot_age_s": round(age, 1)}), 503
        return jsonify({"status": "ok"}), 200

    @app.get("/status")
    def status() -> Response:
        return jsonify(status_json(current()))

    @app.get("/cluster")
    def cluster() -> Response:
        return jsonify(cluster_json(current(), schemes))

    @app.get("/servers")
    def servers() -> Response:
        snapshot = current()
        return jsonify({"servers": [server_json(s, snapshot, schemes) for s in snapshot.servers]})

    @app.get("/rooms")
    def rooms() -> Response:
        snapshot = current()
        return jsonify({"rooms": [room_json(r, snapshot) for r in snapshot.rooms]})

    @app.get("/rooms/<room_id>")
    def room(room_id: str) -> Response:
        snapshot = current()
        found = snapshot.room(room_id)
        if found is None:
            raise ApiError(404, f"no room {room_id!r} in the cluster")
        return jsonify(room_json(found, snapshot, with_members=True))

    @app.get("/clients")
    def clients() -> Response:
        snapshot = current()
        return jsonify({"clients": [client_json(c, snapshot) for c in snapshot.clients]})

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = render_metrics(registry, request.headers.get("Accept"))
        return Response(body, content_type=content_type)

    @app.get("/")
    def dashboard() -> Response:
        response = send_from_directory(STATIC_DIR, "dashboard.html", max_age=0)
        connect = " ".join(sorted(_origins(snapshots.get(), schemes)))
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self' {connect}; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
        )
        return response

    @app.get("/chat")
    def chat_page() -> Response:
        """The chat page: it talks WebSocket to the servers' ws ports and reads /servers of any of them."""
        response = send_from_directory(STATIC_DIR, "chat.html", max_age=0)
        snapshot = snapshots.get()
        connect = " ".join(sorted(_origins(snapshot, schemes) | _ws_origins(snapshot, schemes)))
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self' {connect}; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
        )
        return response

    # -- writes -----------------------------------------------------------------------------------

    @app.post("/admin/election")
    @write
    def election() -> tuple[Response, int]:
        run_action("start election", actions.start_election)
        log.info("admin: election started by operator from %s", request.remote_addr)
        return jsonify({"result": "election started"}), 202

    @app.post("/admin/kick")
    @write
    def kick() -> Response:
        # force: `curl -d '{"identity": ...}'` sends a form content type; the body is what counts.
        body = request.get_json(force=True, silent=True)
        identity = body.get("identity") if isinstance(body, dict) else None
        if not isinstance(identity, str) or not identity:
            raise ApiError(400, 'the body must be a JSON object {"identity": "<name>"}')
        kicked = run_action("kick", lambda: actions.kick(identity))
        if not kicked:
            elsewhere = _where(snapshots.get(), identity)
            if elsewhere:
                raise ApiError(409, f"{identity!r} is a client of {elsewhere}, not of this server; kick it there")
            raise ApiError(404, f"{identity!r} is not a client of this server")
        log.info("admin: %s kicked by operator from %s", identity, request.remote_addr)
        return jsonify({"result": "kicked", "identity": identity})

    @app.delete("/rooms/<room_id>")
    @write
    def delete_room(room_id: str) -> Response:
        result = run_action("delete room", lambda: actions.delete_room(room_id))
        match result:
            case "ok":
                log.info("admin: room %s deleted by operator from %s", room_id, request.remote_addr)
                return jsonify({"result": "deleted", "room_id": room_id})
            case "not-found":
                raise ApiError(404, f"no room {room_id!r} in the cluster")
            case "not-local":
                snapshot = snapshots.get()
                found = snapshot.room(room_id) if snapshot else None
                where = f"server {found.server_id}" if found else "another server"
                raise ApiError(409, f"room {room_id!r} is hosted by {where}; delete it there", "not-local")
            case "mainhall":
                raise ApiError(409, f"{room_id!r} is a MainHall; a MainHall cannot be deleted", "mainhall")
            case "unavailable":
                raise ApiError(503, "the registry is unavailable (election or no quorum); try again", "unavailable")
            case _:
                raise AssertionError(f"delete_room returned {result!r}, expected one of {DELETE_ROOM_RESULTS}")

    return app


def _where(snapshot: Snapshot | None, identity: str) -> str | None:
    """The server another client `identity` is on, from the snapshot (None when unknown or local)."""
    client = snapshot.client(identity) if snapshot else None
    if client is None or snapshot is None or client.server_id == snapshot.server_id:
        return None
    return f"server {client.server_id}"


# --- serving -------------------------------------------------------------------------------------


class AdminServer:
    """A waitress server running one app in a daemon thread; `close()` stops it and frees the port."""

    def __init__(self, server: Any, socket_map: dict[int, Any], thread: threading.Thread) -> None:
        self._server = server
        self._map = socket_map
        self._thread = thread
        self._closed = False
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (useful when serving on port 0)."""
        return int(self._server.effective_port)

    @property
    def host(self) -> str:
        return str(self._server.effective_host)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self, timeout_s: float = ADMIN_CLOSE_TIMEOUT_S) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # waitress' socket map is owned by its loop thread: close every channel and the listener from
        # inside that thread (a trigger thunk); the loop then exits because its map is empty.
        wake = next((d for d in list(self._map.values()) if isinstance(d, WaitressTrigger)), None)
        if wake is not None and self._thread.is_alive():
            wake.pull_trigger(self._close_all)
            self._thread.join(timeout_s)
        if self._thread.is_alive() or wake is None:
            self._close_all()  # the loop is gone or stuck: close from here, best effort
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout_s)

    def _close_all(self) -> None:
        for dispatcher in list(self._map.values()):
            with contextlib.suppress(OSError):
                dispatcher.close()


def serve_admin(app: Flask, host: str, port: int) -> AdminServer:
    """Bind `host:port` now (an OSError here means the port is unusable) and serve `app` in a daemon
    thread with waitress."""
    socket_map: dict[int, Any] = {}
    server = waitress.create_server(
        app,
        map=socket_map,
        host=host,
        port=port,
        threads=ADMIN_THREADS,
        connection_limit=ADMIN_CONNECTION_LIMIT,
        channel_timeout=ADMIN_CHANNEL_TIMEOUT_S,
        max_request_body_size=MAX_BODY_BYTES,
        ident="chatmesh-admin",
    )
    if not hasattr(server, "effective_port"):
        # A host name that resolves to several addresses gives a multi-socket server; one server binds
        # one address, so the configuration must name it.
        server.close()
        raise OSError(f"admin host {host!r} resolves to several addresses; configure one IP address")
    thread = threading.Thread(target=server.run, name=f"admin-{host}:{server.effective_port}", daemon=True)
    thread.start()
    admin = AdminServer(server, socket_map, thread)
    log.info("admin endpoints on %s/ (pid %d)", admin.url, os.getpid())
    return admin
