"""configuration.txt: one server per line.

    serverid host clients_port coordination_port priority [admin_port [raft_port [ws_port]]]

Whitespace-separated; `#` starts a comment; blank lines are ignored. `admin_port` defaults to
`clients_port + 1000`, `raft_port` to `coordination_port + 1000` and `ws_port` (WebSocket clients) to
`clients_port + 2000`. Every error names the file and line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cluster.names import ServerId, is_valid_server_id

ADMIN_PORT_OFFSET = 1000
RAFT_PORT_OFFSET = 1000
WS_PORT_OFFSET = 2000


class ConfigError(Exception):
    """A configuration file that cannot be used; str() is one readable line."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    server_id: ServerId
    host: str
    clients_port: int
    coordination_port: int
    priority: int
    admin_port: int
    raft_port: int
    ws_port: int = 0  # 0 only in hand-built test values; parse_config always sets it

    @property
    def raft_address(self) -> str:
        return f"{self.host}:{self.raft_port}"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    servers: tuple[ServerConfig, ...]
    source: str = "<config>"

    def server(self, server_id: str) -> ServerConfig:
        for server in self.servers:
            if server.server_id == server_id:
                return server
        raise KeyError(server_id)

    def __contains__(self, server_id: object) -> bool:
        return any(s.server_id == server_id for s in self.servers)

    @property
    def ids(self) -> tuple[ServerId, ...]:
        return tuple(s.server_id for s in self.servers)

    def priority(self, server_id: str) -> int:
        return self.server(server_id).priority

    def fingerprint(self) -> str:
        """Stable short hash of the cluster's shape, so clusters from different files never share data."""
        text = "\n".join(
            f"{s.server_id} {s.host} {s.clients_port} {s.coordination_port} {s.priority} {s.admin_port} {s.raft_port}"
            for s in self.servers
        )
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _port(text: str, what: str, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{where}: {what} {text!r} is not an integer") from None
    if not 1 <= value <= 65535:
        raise ConfigError(f"{where}: {what} {value} is out of range 1..65535")
    return value


def parse_config(text: str, source: str = "<config>") -> ClusterConfig:
    servers: list[ServerConfig] = []
    seen_ids: dict[str, int] = {}
    seen_priorities: dict[int, int] = {}
    seen_ports: dict[tuple[str, int], tuple[int, str]] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        fields = line.split()
        if not 5 <= len(fields) <= 8:
            raise ConfigError(
                f"{where}: expected 'serverid host clients_port coordination_port priority "
                f"[admin_port [raft_port [ws_port]]]', got {len(fields)} fields"
            )
        server_id, host = fields[0], fields[1]
        if not is_valid_server_id(server_id):
            raise ConfigError(f"{where}: server id {server_id!r} must be 1-32 letters, digits or '_'")
        if server_id in seen_ids:
            raise ConfigError(f"{where}: duplicate server id {server_id!r} (first on line {seen_ids[server_id]})")
        clients_port = _port(fields[2], "clients_port", where)
        coordination_port = _port(fields[3], "coordination_port", where)
        try:
            priority = int(fields[4])
        except ValueError:
            raise ConfigError(f"{where}: priority {fields[4]!r} is not an integer") from None
        if priority in seen_priorities:
            raise ConfigError(f"{where}: duplicate priority {priority} (first on line {seen_priorities[priority]})")
        admin_port = _port(fields[5], "admin_port", where) if len(fields) > 5 else clients_port + ADMIN_PORT_OFFSET
        raft_port = _port(fields[6], "raft_port", where) if len(fields) > 6 else coordination_port + RAFT_PORT_OFFSET
        ws_port = _port(fields[7], "ws_port", where) if len(fields) > 7 else clients_port + WS_PORT_OFFSET
        for name, port in (
            ("clients_port", clients_port),
            ("coordination_port", coordination_port),
            ("admin_port", admin_port),
            ("raft_port", raft_port),
            ("ws_port", ws_port),
        ):
            if not 1 <= port <= 65535:
                raise ConfigError(f"{where}: {name} {port} (derived) is out of range 1..65535")
            key = (host, port)
            if key in seen_ports:
                other_line, other_name = seen_ports[key]
                raise ConfigError(
                    f"{where}: port {port} on {host} used twice ({name}; already {other_name} on line {other_line})"
                )
            seen_ports[key] = (lineno, name)
        seen_ids[server_id] = lineno
        seen_priorities[priority] = lineno
        servers.append(
            ServerConfig(
                server_id=ServerId(server_id),
                host=host,
                clients_port=clients_port,
                coordination_port=coordination_port,
                priority=priority,
                admin_port=admin_port,
                raft_port=raft_port,
                ws_port=ws_port,
            )
        )
    if not servers:
        raise ConfigError(f"{source}: no servers configured")
    return ClusterConfig(servers=tuple(servers), source=source)


def load_config(path: str | Path) -> ClusterConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: configuration is not UTF-8 text") from None
    return parse_config(text, source=str(path))
