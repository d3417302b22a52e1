"""What every fault scenario checks, and the test clients that feed those checks.

Theory of operation
-------------------
A `Session` is one test client connection speaking the client protocol. Every request it makes is timed:
`last_alive` is the send time of the latest request that got its reply, so the server certainly held the
session (and its identity and owned room) at that moment.

The `Ledger` records every approval any test client receives (identity or room) with the time the reply
arrived. A name is *certainly held* by a session from the arrival of its approval until that session's
`last_alive` (or until the release was requested: quit, deleteroom). Two different sessions certainly
holding the same name at one instant is a duplicate approval: the invariant the whole system exists for.
Closures noticed late never produce false alarms, because only the certain interval counts.

`check_settled` runs after the faults stopped: every live server agrees on one coordinator (the highest
priority live one), every live server's registry (GET /clients, /rooms) is the same, and the registry
matches the sessions that are still alive: each one's identity on its server, each owned room, each live
server's MainHall, and nothing of a dead server (nothing committed is lost, nothing released comes back).

All waits are bounded polls. Time is `time.monotonic()`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

# One reply from a server: the coordinator's bounded wait (cluster/timings.py request_deadline_s, 4 s)
# plus slack for a loaded machine.
REPLY_TIMEOUT_S = 8.0
# A line longer than this from a server is a bug.
MAX_LINE_BYTES = 1 << 20
# A server resumed after SIGSTOP may serve its old sessions until it applies its own "server down" (it
# catches up with the Raft log first); longer than this after SIGCONT is a failure.
ZOMBIE_WINDOW_LIMIT_S = 3.0
# Lines of history each session keeps for failure reports.
HISTORY_LINES = 12


class ClusterLike(Protocol):
    """What the checks need from `tests.support.Cluster` or the namespace cluster."""

    @property
    def ids(self) -> list[str]: ...
    def live(self) -> list[str]: ...
    def status(self, server_id: str, timeout: float = 1.0) -> dict: ...
    def admin_url(self, server_id: str) -> str: ...
    def client_address(self, server_id: str) -> tuple[str, int]: ...


class SessionLost(Exception):
    """The server closed the connection (or it broke)."""


class NoReply(Exception):
    """No reply of the expected type within the timeout."""


def now() -> float:
    return time.monotonic()


class Session:
    """One client connection. Not thread-safe: one thread drives it."""

    _ids = itertools.count(1)

    def __init__(self, server: str, address: tuple[str, int], label: str = "") -> None:
        self.key = f"{label or 'c'}.{next(Session._ids)}"
        self.server = server
        self.address = address
        self.identity: str | None = None
        self.room: str | None = None
        self.owned_room: str | None = None
        # Rooms of ours the server dissolved unasked: (when we saw it, the last proof of life before it).
        self.rooms_dissolved: dict[str, list[tuple[float, float]]] = {}
        self.last_alive = 0.0
        self.closed = False
        self.messages_seen = 0
        self.stray_replies: list[dict[str, Any]] = []  # a second answer to one request would land here
        self.history: collections.deque[str] = collections.deque(maxlen=HISTORY_LINES)  # for diagnosis
        self._buffer = b""
        self.sock = socket.create_connection(address, timeout=REPLY_TIMEOUT_S)

    def __repr__(self) -> str:
        return f"Session({self.key} {self.identity}@{self.server} room={self.room} owns={self.owned_room})"

    # -- wire ------------------------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            self.close()
            raise SessionLost(f"{self.key}: send failed: {exc}") from None

    def recv(self, timeout: float) -> dict[str, Any]:
        deadline = now() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - now()
            if remaining <= 0:
                raise NoReply(f"{self.key}: no message within {timeout}s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise NoReply(f"{self.key}: no message within {timeout}s") from None
            except OSError as exc:
                self.close()
                raise SessionLost(f"{self.key}: {exc}") from None
            if not chunk:
                self.close()
                raise SessionLost(f"{self.key}: closed by the server")
            self._buffer += chunk
            assert len(self._buffer) < MAX_LINE_BYTES, f"{self.key}: oversized line from server"
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        assert isinstance(message, dict) and isinstance(message.get("type"), str), f"line without type: {line!r}"
        if "approved" in message:
            assert message["approved"] in ("true", "false"), f"approved must be a string: {message}"
        return message

    def request(
        self,
        message: dict[str, Any],
        match: Callable[[dict[str, Any]], bool],
        timeout: float = REPLY_TIMEOUT_S,
        proves_alive: bool = True,
    ) -> dict[str, Any]:
        """Send `message`, return the first reply `match` accepts (broadcasts in between are skipped).

        The reply proves the session alive when it was sent, unless `proves_alive` is false (a message
        that may predate the request, such as the quit roomchange a fenced server sends on its own)."""
        sent = now()
        self.history.append(f"{sent:.3f} > {message}")
        self.send(message)
        deadline = sent + timeout
        while True:
            try:
                reply = self.recv(max(deadline - now(), 0.001))
            except (SessionLost, NoReply) as exc:
                self.history.append(f"{now():.3f} ! {exc}")
                raise
            if match(reply):
                if proves_alive:
                    self.last_alive = max(self.last_alive, sent)
                self.history.append(f"{now():.3f} < {reply}")
                return reply
            self._observe(reply)

    def _observe(self, message: dict[str, Any]) -> None:
        """A broadcast: follow what concerns us (we may be moved to MainHall when our room is deleted)."""
        if message.get("type") == "message":
            self.messages_seen += 1
        elif message.get("type") in ("newidentity", "createroom", "deleteroom", "serverchange", "route"):
            self.stray_replies.append(message)
        elif message.get("type") == "roomchange" and message.get("identity") == self.identity:
            former, room = message.get("former"), message.get("roomid") or None
            if self.owned_room is not None and former == self.owned_room and room == f"MainHall-{self.server}":
                # Moved out of our own room unasked: the server dissolved it (a deleteroom refused as in doubt
                # that committed later, or an operator's delete). A server that kept a room the registry deleted
                # sends nothing, so this cannot hide that bug. Replies before this one on the stream were sent
                # while the room still stood.
                self.rooms_dissolved.setdefault(former, []).append((now(), self.last_alive))
                self.owned_room = None
            self.room = room

    def drain(self) -> None:
        """Read whatever broadcasts are already waiting, without blocking."""
        with contextlib.suppress(NoReply):
            while True:
                self._observe(self.recv(0.0005))

    def close(self) -> None:
        if not self.closed:
            self.history.append(f"{now():.3f} closed")
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def describe(self) -> str:
        return f"{self!r} last_alive={self.last_alive:.3f}\n      " + "\n      ".join(self.history)

    # -- protocol ----------------------------------------------------------------------------------------

    def login(self, identity: str, ledger: Ledger | None = None, timeout: float = REPLY_TIMEOUT_S) -> bool:
        reply = self.request({"type": "newidentity", "identity": identity}, _is("newidentity"), timeout)
        if reply["approved"] != "true":
            self.close()
            if ledger is not None:
                ledger.refused("identity", identity, self)
            return False
        self.identity = identity
        self.room = f"MainHall-{self.server}"
        if ledger is not None:
            ledger.approved("identity", identity, self)
        return True

    def ping(self, timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """`who`: proves the session is alive now."""
        reply = self.request({"type": "who"}, _is("roomcontents"), timeout)
        self.room = reply.get("roomid") or self.room
        return reply

    def list_rooms(self, timeout: float = REPLY_TIMEOUT_S) -> list[str]:
        return list(self.request({"type": "list"}, _is("roomlist"), timeout)["rooms"])

    def create_room(self, room_id: str, ledger: Ledger | None = None, timeout: float = REPLY_TIMEOUT_S) -> bool:
        reply = self.request(
            {"type": "createroom", "roomid": room_id},
            lambda m: m.get("type") == "createroom" and m.get("roomid") == room_id,
            timeout,
        )
        if reply["approved"] != "true":
            if ledger is not None:
                ledger.refused("room", room_id, self)
            return False
        self.owned_room = room_id
        self.room = room_id
        if ledger is not None:
            ledger.approved("room", room_id, self)
        return True

    def delete_room(self, room_id: str, ledger: Ledger | None = None, timeout: float = REPLY_TIMEOUT_S) -> bool:
        sent = now()
        reply = self.request(
            {"type": "deleteroom", "roomid": room_id},
            lambda m: m.get("type") == "deleteroom" and m.get("roomid") == room_id,
            timeout,
        )
        if reply["approved"] == "true":
            if ledger is not None:
                ledger.released("room", room_id, self, sent)
            if self.owned_room == room_id:
                self.owned_room = None
            self.room = f"MainHall-{self.server}"
            return True
        return False

    def join(self, room_id: str, timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """joinroom: the roomchange about us, or a route (the caller follows it with `Session.move`)."""
        me, former = self.identity, self.room

        def mine(m: dict[str, Any]) -> bool:
            # Our own earlier roomchanges (after newidentity, createroom, or our room deleted by its owner)
            # may arrive first: the answer moves us into R (success) or names one room twice (refusal).
            if m.get("type") == "route":
                return m.get("roomid") == room_id
            if m.get("type") != "roomchange" or m.get("identity") != me:
                return False
            if m.get("roomid") == room_id and m.get("former") != room_id:
                return True
            return m.get("former") == m.get("roomid") and m.get("roomid") in (former, room_id)

        reply = self.request({"type": "joinroom", "roomid": room_id}, mine, timeout)
        if reply["type"] == "roomchange":
            self.room = reply.get("roomid") or self.room
        return reply

    def say(self, content: str) -> None:
        self.send({"type": "message", "content": content})

    def quit(self, ledger: Ledger | None = None, timeout: float = REPLY_TIMEOUT_S) -> None:
        sent = now()
        me = self.identity
        with contextlib.suppress(SessionLost, NoReply):
            self.request(
                {"type": "quit"},
                lambda m: m.get("type") == "roomchange" and m.get("identity") == me and m.get("roomid") == "",
                timeout,
                proves_alive=False,
            )
        if ledger is not None:
            ledger.session_released(self, sent)
        self.close()


def move(
    old: Session,
    route: dict[str, Any],
    server_of: Callable[[tuple[str, int]], str],
    ledger: Ledger | None,
    timeout: float = REPLY_TIMEOUT_S,
) -> Session:
    """Follow a route: a new connection with movejoin, the old one closed. Returns the new session."""
    address = (route["host"], int(route["port"]))
    new = Session(server_of(address), address, label=old.key + "m")
    former = old.room or ""
    sent = now()
    old.close()
    reply = new.request(
        {"type": "movejoin", "identity": old.identity, "former": former, "roomid": route["roomid"]},
        _is("serverchange"),
        timeout,
    )
    if reply.get("approved") != "true":
        new.close()
        if ledger is not None:
            ledger.session_released(old, sent)
        raise SessionLost(f"{old.key}: movejoin refused: {reply}")
    new.identity = old.identity
    new.room = route["roomid"]
    if ledger is not None:
        ledger.moved(old, new)
    return new


def _is(kind: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") == kind


# -- a scenario's record --------------------------------------------------------------------------------


class ScenarioRecord:
    """What a fault scenario keeps as it goes: its cluster, ledger and sessions, and the notes and failures
    `tests.fault.netlab.scenario_main` prints. `cluster` needs `client_address(sid)`, `close()`, `ids`, `log()`."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.ledger = Ledger()
        self.sessions: list[Session] = []
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.t0 = now()

    def note(self, text: str) -> None:
        line = f"[{now() - self.t0:6.2f}s] {text}"
        self.notes.append(line)
        print(line, flush=True)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)
            self.note(f"FAIL {what}")

    def close(self) -> None:
        for s in self.sessions:
            s.close()
        self.cluster.close()


# -- the ledger of approvals ------------------------------------------------------------------------------


@dataclasses.dataclass
class Holding:
    kind: str  # "identity" | "room"
    name: str
    session: Session
    since: float  # the approval reply arrived
    released_at: float | None = None  # the release was requested (quit, deleteroom, move away)
    lost_at: float | None = None  # its server was killed

    def certain_until(self) -> float:
        """Until when the holder certainly still held it."""
        end = max(self.session.last_alive, self.since)
        if self.kind == "room":
            seen = [
                max(alive, self.since)
                for at, alive in self.session.rooms_dissolved.get(self.name, [])
                if at >= self.since
            ]
            if seen:
                end = min(end, seen[0])
        for cut in (self.released_at, self.lost_at):
            if cut is not None:
                end = min(end, cut)
        return end


class Ledger:
    """Every approval and refusal any test client received, with enough timing to prove duplicates."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # the chaos run feeds one ledger from many threads
        self.holdings: list[Holding] = []
        self.approvals = {"identity": 0, "room": 0}
        self.refusals = {"identity": 0, "room": 0}
        self.freezes: list[tuple[str, float, float]] = []

    def approved(self, kind: str, name: str, session: Session) -> None:
        with self.lock:
            self.approvals[kind] += 1
            self.holdings.append(Holding(kind, name, session, now()))

    def refused(self, kind: str, name: str, session: Session) -> None:
        with self.lock:
            self.refusals[kind] += 1

    def _open(self, session: Session) -> list[Holding]:
        return [h for h in self.holdings if h.session is session and h.released_at is None and h.lost_at is None]

    def released(self, kind: str, name: str, session: Session, at: float) -> None:
        with self.lock:
            for h in self._open(session):
                if h.kind == kind and h.name == name:
                    h.released_at = at

    def session_released(self, session: Session, at: float) -> None:
        with self.lock:
            for h in self._open(session):
                h.released_at = at

    def moved(self, old: Session, new: Session) -> None:
        """The identity now lives in `new` (same holder, new connection)."""
        with self.lock:
            for h in self._open(old):
                if h.kind == "identity":
                    h.released_at = max(old.last_alive, h.since)
                    self.holdings.append(Holding("identity", h.name, new, now()))
                else:  # an owner cannot leave its room, so this is a bug in the test or the server
                    h.released_at = max(old.last_alive, h.since)

    def server_lost(self, server: str, sessions: Iterable[Session]) -> None:
        """The server was SIGKILLed now: what its sessions held is gone (the sessions notice by themselves)."""
        with self.lock:
            t = now()
            for s in list(sessions):
                if s.server == server:
                    for h in self._open(s):
                        h.lost_at = t

    def server_frozen(self, server: str, stopped_at: float, resumed_at: float) -> None:
        """The server was SIGSTOPped at `stopped_at` and SIGCONTed at `resumed_at`."""
        with self.lock:
            self.freezes.append((server, stopped_at, resumed_at))

    def _zombie_excess(self, a: Holding, b: Holding) -> float | None:
        """If `a` overlaps `b` only because a's server was frozen (so the cluster released a's name and
        approved it to b) and kept serving a's session after it resumed: how long after SIGCONT."""
        for server, stopped, resumed in self.freezes:
            if server == a.session.server and a.since < stopped <= b.since and a.certain_until() >= resumed:
                return a.certain_until() - resumed
        return None

    def overlaps(self) -> tuple[list[str], list[float]]:
        """(duplicates, zombie windows): names certainly held by two sessions at one instant.

        A zombie window is the overlap the cluster cannot avoid without leases: a frozen server was declared
        down, its names went to others, and after SIGCONT it served its old sessions until it applied its own
        "server down". Its length (seconds after SIGCONT) is returned; the caller bounds it. Every other
        overlap is a duplicate."""
        problems = []
        windows = []
        with self.lock:
            by_name: dict[tuple[str, str], list[Holding]] = {}
            for h in self.holdings:
                by_name.setdefault((h.kind, h.name), []).append(h)
            for (kind, name), holds in by_name.items():
                holds.sort(key=lambda h: h.since)
                for i, a in enumerate(holds):
                    for b in holds[i + 1 :]:
                        if b.session is a.session or b.since > a.certain_until():
                            continue
                        excess = self._zombie_excess(a, b)
                        if excess is not None:
                            windows.append(excess)
                            continue
                        problems.append(
                            f"{kind} {name!r} approved to {b.session.key}@{b.session.server} at {b.since:.3f} "
                            f"while {a.session.key}@{a.session.server} (approved {a.since:.3f}) still held it "
                            f"at {a.certain_until():.3f}\n    {a.session.describe()}\n    {b.session.describe()}"
                        )
        return problems, windows

    def duplicates(self, zombie_limit_s: float = ZOMBIE_WINDOW_LIMIT_S) -> list[str]:
        """Duplicates, and zombie windows longer than `zombie_limit_s`."""
        problems, windows = self.overlaps()
        problems += [
            f"a resumed server served a session whose name the cluster had released for {w:.2f}s after SIGCONT"
            for w in windows
            if w > zombie_limit_s
        ]
        return problems

    def summary(self) -> str:
        return (
            f"approved {self.approvals['identity']} identities and {self.approvals['room']} rooms, "
            f"refused {self.refusals['identity']} identities and {self.refusals['room']} rooms"
        )


# -- the cluster as its servers see it ---------------------------------------------------------------------


def http_json(url: str, timeout: float = 1.0) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def registry_view(cluster: ClusterLike, server_id: str) -> tuple[frozenset[tuple], frozenset[tuple]]:
    """(identities, rooms) of one server's replica: {(identity, server, in_transit)}, {(room, server, owner)}."""
    base = cluster.admin_url(server_id)
    clients = http_json(base + "/clients")["clients"]
    rooms = http_json(base + "/rooms")["rooms"]
    return (
        frozenset((c["identity"], c["server_id"], bool(c["in_transit"])) for c in clients),
        frozenset((r["room_id"], r["server_id"], r["owner"]) for r in rooms),
    )


def coordinator_problems(cluster: ClusterLike, live: list[str]) -> list[str]:
    """One coordinator, the highest-priority live server, seen by every live server."""
    statuses = {sid: cluster.status(sid) for sid in live}
    problems = []
    views = {sid: s.get("coordinator") for sid, s in statuses.items()}
    expected = max(live, key=_priority_key(cluster))
    if set(views.values()) != {expected}:
        problems.append(f"coordinator views {views}, expected {expected}")
    claiming = sorted(sid for sid, s in statuses.items() if s.get("role") == "coordinator")
    if claiming != [expected]:
        problems.append(f"servers with role coordinator: {claiming}, expected [{expected}]")
    not_serving = sorted(sid for sid, s in statuses.items() if not s.get("serving"))
    if not_serving:
        problems.append(f"not serving: {not_serving}")
    return problems


def _priority_key(cluster: ClusterLike) -> Callable[[str], int]:
    config = getattr(cluster, "config", None)
    if config is not None:
        return lambda sid: int(config.server(sid).priority)
    return lambda sid: cluster.ids.index(sid)


def registry_problems(cluster: ClusterLike, live: list[str], sessions: Iterable[Session]) -> list[str]:
    """Every live replica identical and equal to what the live sessions and live servers hold."""
    views = {sid: registry_view(cluster, sid) for sid in live}
    problems = []
    distinct = set(views.values())
    if len(distinct) != 1:
        for sid, (ids, rooms) in views.items():
            problems.append(f"{sid} replica: {len(ids)} identities, {len(rooms)} rooms")
        first = next(iter(views.values()))
        for sid, view in views.items():
            if view != first:
                problems.append(
                    f"{sid} differs: identities {sorted(view[0] ^ first[0])}, rooms {sorted(view[1] ^ first[1])}"
                )
        return problems
    identities, rooms = distinct.pop()
    alive = [s for s in sessions if not s.closed and s.identity is not None]
    want_ids = {(str(s.identity), s.server, False) for s in alive}
    want_rooms = {(f"MainHall-{sid}", sid, "") for sid in live}
    want_rooms |= {(str(s.owned_room), s.server, str(s.identity)) for s in alive if s.owned_room}
    if identities != want_ids:
        problems.append(
            f"registry identities != live sessions: extra {sorted(identities - want_ids)}, "
            f"missing {sorted(want_ids - identities)}"
        )
        latest: dict[str, Session] = {}
        for s in sessions:
            if s.identity is not None:
                latest[s.identity] = s
        for name in sorted({str(i) for i, _, _ in identities ^ want_ids}):
            if name in latest:
                problems.append(f"  latest session of {name}: {latest[name].describe()}")
    if rooms != want_rooms:
        problems.append(
            f"registry rooms != live rooms: extra {sorted(rooms - want_rooms)}, missing {sorted(want_rooms - rooms)}"
        )
    return problems


def ping_all(sessions: Iterable[Session]) -> list[str]:
    """Prove every open session alive now (updates last_alive); returns the ones that were lost."""
    lost = []
    for s in sessions:
        if s.closed or s.identity is None:
            continue
        try:
            s.drain()
            s.ping()
        except (SessionLost, NoReply) as exc:
            s.close()
            lost.append(f"{s.key} {s.identity}@{s.server}: {exc}")
    return lost


def check_settled(
    cluster: ClusterLike,
    sessions: list[Session],
    ledger: Ledger,
    timeout: float = 20.0,
    live: list[str] | None = None,
    sessions_must_survive: bool = True,
) -> list[str]:
    """Wait (bounded) until coordinator and registries settle; return the problems still left (empty = ok).

    With `sessions_must_survive`, an open session the server closed is a problem too (clients of surviving
    servers keep their sessions); otherwise it is only dropped from what the registry must hold."""
    live_ids = live if live is not None else cluster.live()
    deadline = now() + timeout
    problems: list[str] = []
    lost = ping_all(sessions)
    while True:
        try:
            problems = coordinator_problems(cluster, live_ids) + registry_problems(cluster, live_ids, sessions)
        except Exception as exc:  # a server not answering /status yet
            problems = [f"status unavailable: {exc!r}"]
        if not problems or now() >= deadline:
            break
        time.sleep(0.1)
    lost += ping_all(sessions)  # alive until after the registry matched
    lost_problems = [f"session lost: {x}" for x in lost] if sessions_must_survive else []
    strays = [f"{s.key}: answer to no request: {m}" for s in sessions for m in s.stray_replies]
    return problems + ledger.duplicates() + lost_problems + strays


def probe_login(
    connect: Callable[[str], Session],
    servers: list[str],
    name_prefix: str,
    ledger: Ledger | None,
    started: float,
    timeout: float = 20.0,
) -> tuple[float, Session | None, int]:
    """New connections ask for fresh identities on `servers` in turn until one is approved.

    Returns (seconds from `started` to the approval, the approved session, attempts); (inf, None, n) after
    `timeout`. A server that refuses connections is skipped."""
    attempt = 0
    while now() - started < timeout:
        attempt += 1
        server = servers[attempt % len(servers)]
        try:
            session = connect(server)
        except OSError:
            time.sleep(0.01)
            continue
        try:
            if session.login(f"{name_prefix}{attempt}", ledger, timeout=max(timeout - (now() - started), 0.1)):
                return now() - started, session, attempt
        except (SessionLost, NoReply):
            session.close()
    return float("inf"), None, attempt


class Clients:
    """The test clients of one scenario: every session it opened and the ledger they all feed."""

    def __init__(self, cluster: ClusterLike) -> None:
        self.cluster = cluster
        self.ledger = Ledger()
        self.sessions: list[Session] = []

    def connect(self, server: str) -> Session:
        session = Session(server, self.cluster.client_address(server), label=server)
        self.sessions.append(session)
        return session

    def login(self, server: str, identity: str) -> Session:
        session = self.connect(server)
        assert session.login(identity, self.ledger), f"{identity} refused on {server}"
        return session

    def on(self, server: str) -> list[Session]:
        return [s for s in self.sessions if s.server == server and not s.closed and s.identity]

    def server_killed(self, server: str) -> None:
        self.ledger.server_lost(server, self.sessions)
        for s in self.sessions:
            if s.server == server:
                s.close()

    def probe(self, servers: list[str], prefix: str, started: float, timeout: float = 20.0) -> float:
        took, _, _ = probe_login(self.connect, servers, prefix, self.ledger, started, timeout)
        return took

    def settled(self, live: list[str] | None = None, timeout: float = 20.0, sessions_must_survive: bool = True) -> None:
        problems = check_settled(self.cluster, self.sessions, self.ledger, timeout, live, sessions_must_survive)
        assert not problems, "invariants broken:\n  " + "\n  ".join(problems)

    def close(self) -> None:
        for s in self.sessions:
            s.close()
