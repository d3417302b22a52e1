"""configuration.txt: one server per line.

    serverid host clients_port coordination_port priority [admin_port [raft_port [ws_port]]]

Whitespace-separated; `#` starts a comment; blank lines are ignored. `admin_port` defaults to
`clients_port + 1000`, `raft_port` to `coordination_port + 1000` and `ws_port` (WebSocket clients) to
`clients_port + 2000`. Every error names the file and line.

One optional setting line, anywhere in the file:

    voters = s4 s5 s6

names the servers that vote in Raft (the registry's quorum). Without it the `DEFAULT_VOTERS` (5)
highest-priority servers vote, or all of them in a smaller cluster. Every other server keeps a read-only
replica (docs/registry.md, "The voter core"). A setting line is recognised by its second field `=`; no
server line can have that shape (`=` is not a port).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cluster.names import ServerId, is_valid_server_id

ADMIN_PORT_OFFSET = 1000
RAFT_PORT_OFFSET = 1000
WS_PORT_OFFSET = 2000
# Raft voters when the configuration names none: the highest-priority servers, so that the Fast Bully
# coordinator (the highest-priority live server) is a voter whenever any voter is up. Five voters survive
# two lost hosts; more only make every commit wait on a larger majority.
DEFAULT_VOTERS = 5


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
    # The `voters = ...` setting as written (empty: the default voter core, see `voter_ids`).
    voters: tuple[ServerId, ...] = ()

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

    @property
    def voter_ids(self) -> tuple[ServerId, ...]:
        """The Raft voters, highest priority first: the `voters` setting, else the `DEFAULT_VOTERS`
        highest-priority servers."""
        ranked = sorted(self.servers, key=lambda s: -s.priority)
        if self.voters:
            return tuple(s.server_id for s in ranked if s.server_id in self.voters)
        return tuple(s.server_id for s in ranked[:DEFAULT_VOTERS])

    def is_voter(self, server_id: str) -> bool:
        return server_id in self.voter_ids

    def fingerprint(self) -> str:
        """Stable short hash of the cluster's shape, so clusters from different files never share data.

        The voter set counts once it is not every server: a Raft journal written under one membership must
        not be reused under another (PySyncObj's membership here is fixed, never changed in the log)."""
        lines = [
            f"{s.server_id} {s.host} {s.clients_port} {s.coordination_port} {s.priority} {s.admin_port} {s.raft_port}"
            for s in self.servers
        ]
        if len(self.voter_ids) != len(self.servers):
            lines.append("voters " + " ".join(sorted(self.voter_ids)))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


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
    voters: list[str] = []
    voters_where = ""
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        fields = line.split()
        if len(fields) >= 2 and fields[1] == "=":
            if fields[0] != "voters":
                raise ConfigError(f"{where}: unknown setting {fields[0]!r} (known: voters)")
            if voters_where:
                raise ConfigError(f"{where}: voters given twice (first at {voters_where})")
            voters, voters_where = fields[2:], where
            if not voters:
                raise ConfigError(f"{where}: voters = needs at least one server id")
            continue
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
    for i, voter in enumerate(voters):
        if voter not in seen_ids:
            raise ConfigError(f"{voters_where}: voter {voter!r} is not a configured server")
        if voter in voters[:i]:
            raise ConfigError(f"{voters_where}: voter {voter!r} named twice")
    return ClusterConfig(servers=tuple(servers), source=source, voters=tuple(ServerId(v) for v in voters))


def load_config(path: str | Path) -> ClusterConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: configuration is not UTF-8 text") from None
    return parse_config(text, source=str(path))
