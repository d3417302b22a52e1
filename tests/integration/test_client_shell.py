"""The client process (`python -m client --batch`) over real sockets against a small fake cluster.

The fake servers implement just enough of docs/protocol.md (one asyncio loop in a thread, a shared dict for
the "registry") to exercise the client's shell: login, every command, a route to another server, a server
killed under a client, and an identity held for a while before the cluster releases it. The same client
behaviours are checked against the real servers in test_client_cluster.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from client.core import HELP_LINES
from tests.support import PYTHON, REPO, free_ports

TIMEOUT_S = 10.0


@dataclass
class Session:
    writer: asyncio.StreamWriter
    identity: str = ""
    room: str = ""
    routed_away: bool = False


@dataclass
class FakeServer:
    server_id: str
    port: int
    cluster: FakeCluster
    sessions: list[Session] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def mainhall(self) -> str:
        return f"MainHall-{self.server_id}"

    def members(self, room: str) -> list[Session]:
        return [s for s in self.sessions if s.room == room and s.identity]

    def send(self, session: Session, message: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            session.writer.write(json.dumps(message).encode() + b"\n")

    def broadcast(self, room: str, message: dict[str, Any], also: Session | None = None) -> None:
        targets = self.members(room)
        if also is not None and also not in targets:
            targets.append(also)
        for target in targets:
            self.send(target, message)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(writer)
        self.sessions.append(session)
        quit_sent = False
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                message = json.loads(line)
                if self.on_message(session, message):
                    quit_sent = True
                    break
                await writer.drain()
        except (ConnectionError, json.JSONDecodeError):
            pass
        finally:
            if not quit_sent and session.identity and not session.routed_away:
                self.leave(session)
            if session in self.sessions:
                self.sessions.remove(session)
            with contextlib.suppress(Exception):
                writer.close()

    def leave(self, session: Session) -> None:
        rc = {"type": "roomchange", "identity": session.identity, "former": session.room, "roomid": ""}
        self.broadcast(session.room, rc, also=session)
        self.cluster.identities.pop(session.identity, None)
        session.room = ""

    def on_message(self, session: Session, message: dict[str, Any]) -> bool:
        """Handle one client message; True when the session ends."""
        cluster = self.cluster
        kind = message.get("type")
        if kind == "newidentity":
            identity = message["identity"]
            if identity in cluster.identities:
                self.send(session, {"type": "newidentity", "approved": "false"})
                return True
            cluster.identities[identity] = self.server_id
            session.identity, session.room = identity, self.mainhall
            self.send(session, {"type": "newidentity", "approved": "true"})
            self.broadcast(
                self.mainhall, {"type": "roomchange", "identity": identity, "former": "", "roomid": self.mainhall}
            )
        elif kind == "movejoin":
            identity = message["identity"]
            cluster.identities[identity] = self.server_id
            room = message["roomid"] if cluster.rooms.get(message["roomid"], ("",))[0] == self.server_id else None
            session.identity, session.room = identity, room or self.mainhall
            self.send(session, {"type": "serverchange", "approved": "true", "serverid": self.server_id})
            self.broadcast(
                session.room,
                {"type": "roomchange", "identity": identity, "former": message["former"], "roomid": session.room},
            )
        elif kind == "list":
            rooms = [s.mainhall for s in cluster.servers.values() if s.server is not None] + list(cluster.rooms)
            self.send(session, {"type": "roomlist", "rooms": rooms})
        elif kind == "who":
            owner = cluster.rooms.get(session.room, ("", ""))[1]
            identities = [s.identity for s in self.members(session.room)]
            self.send(
                session, {"type": "roomcontents", "roomid": session.room, "identities": identities, "owner": owner}
            )
        elif kind == "createroom":
            room = message["roomid"]
            owns = any(owner == session.identity for _, owner in cluster.rooms.values())
            ok = room not in cluster.rooms and not room.startswith("MainHall") and not owns
            self.send(session, {"type": "createroom", "roomid": room, "approved": "true" if ok else "false"})
            if ok:
                cluster.rooms[room] = (self.server_id, session.identity)
                self.move(session, room)
        elif kind == "joinroom":
            room = message["roomid"]
            where = cluster.rooms.get(room, (room[len("MainHall-") :], "") if room.startswith("MainHall-") else None)
            owns = cluster.rooms.get(session.room, ("", ""))[1] == session.identity
            if where is None or room == session.room or owns or where[0] not in cluster.servers:
                self.send(
                    session,
                    {
                        "type": "roomchange",
                        "identity": session.identity,
                        "former": session.room,
                        "roomid": session.room,
                    },
                )
            elif where[0] == self.server_id:
                self.move(session, room)
            else:
                target = cluster.servers[where[0]]
                self.send(session, {"type": "route", "roomid": room, "host": "127.0.0.1", "port": str(target.port)})
                former, session.room, session.routed_away = session.room, "", True
                self.broadcast(
                    former, {"type": "roomchange", "identity": session.identity, "former": former, "roomid": room}
                )
        elif kind == "deleteroom":
            room = message["roomid"]
            ok = cluster.rooms.get(room) == (self.server_id, session.identity)
            if ok:
                del cluster.rooms[room]
                for member in self.members(room):
                    member.room = self.mainhall
                    self.broadcast(
                        self.mainhall,
                        {"type": "roomchange", "identity": member.identity, "former": room, "roomid": self.mainhall},
                    )
            self.send(session, {"type": "deleteroom", "roomid": room, "approved": "true" if ok else "false"})
        elif kind == "message":
            for member in self.members(session.room):
                if member is not session:
                    self.send(member, {"type": "message", "identity": session.identity, "content": message["content"]})
        elif kind == "quit":
            self.leave(session)
            return True
        return False

    def move(self, session: Session, room: str) -> None:
        former = session.room
        session.room = room
        rc = {"type": "roomchange", "identity": session.identity, "former": former, "roomid": room}
        for target in {id(s): s for s in self.members(former) + self.members(room) + [session]}.values():
            self.send(target, rc)


class FakeCluster:
    """Fake servers s1..sN on one event loop in a background thread."""

    def __init__(self, count: int, release_after_s: float = 0.0) -> None:
        self.identities: dict[str, str] = {}
        self.rooms: dict[str, tuple[str, str]] = {}  # room -> (server id, owner)
        self.release_after_s = release_after_s
        ports = free_ports(count)
        self.servers = {f"s{i + 1}": FakeServer(f"s{i + 1}", ports[i], self) for i in range(count)}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT_S)

    def __enter__(self) -> FakeCluster:
        self.thread.start()
        for server in self.servers.values():
            self.call(self._start(server))
        return self

    async def _start(self, server: FakeServer) -> None:
        server.server = await asyncio.start_server(server.handle, "127.0.0.1", server.port)

    def kill(self, server_id: str) -> None:
        """Abruptly close a server and its connections; its identities are released `release_after_s` later
        (the cluster declaring it down), and its rooms vanish."""
        self.call(self._kill(self.servers[server_id]))

    async def _kill(self, server: FakeServer) -> None:
        assert server.server is not None
        server.server.close()
        server.server = None
        for session in list(server.sessions):
            session.routed_away = True  # no goodbyes from a dead server
            session.writer.transport.abort()
        held = [i for i, s in self.identities.items() if s == server.server_id]
        for room in [r for r, (s, _) in self.rooms.items() if s == server.server_id]:
            del self.rooms[room]

        def release() -> None:
            for identity in held:
                if self.identities.get(identity) == server.server_id:
                    del self.identities[identity]

        self.loop.call_later(self.release_after_s, release)

    def config(self, directory: Path) -> Path:
        path = directory / "configuration.txt"
        lines = [f"{sid} 127.0.0.1 {s.port} {s.port + 1} {i + 1}" for i, (sid, s) in enumerate(self.servers.items())]
        path.write_text("\n".join(lines) + "\n")
        return path

    def __exit__(self, *exc: object) -> None:
        for server in self.servers.values():
            if server.server is not None:
                with contextlib.suppress(Exception):
                    self.call(self._kill(server))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class BatchClient:
    """`python -m client --batch` as a child process: write stdin lines, read stdout lines with a timeout."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "client", "--batch", *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._collect_stderr, daemon=True).start()

    @staticmethod
    def _pump(stream: Any, into: queue.Queue[str | None]) -> None:
        for raw in iter(stream.readline, b""):
            into.put(raw.decode().rstrip("\n"))
        into.put(None)

    def _collect_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            self.stderr.append(raw.decode().rstrip("\n"))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()

    def expect(self, wanted: str, timeout: float = TIMEOUT_S, prefix: bool = False) -> list[str]:
        """Read stdout until the line `wanted` (or one starting with it); returns the lines read before it."""
        before: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {wanted!r} within {timeout}s; got {before}; stderr {self.stderr}") from None
            if line is None:
                raise AssertionError(f"stdout ended before {wanted!r}; got {before}; stderr {self.stderr}")
            self.seen.append(line)
            if line == wanted or (prefix and line.startswith(wanted)):
                return before
            before.append(line)

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        return self.proc.wait(timeout)

    def rest(self) -> list[str]:
        """All remaining stdout lines (after the process ended)."""
        result = []
        while (line := self.lines.get(timeout=TIMEOUT_S)) is not None:
            result.append(line)
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@contextlib.contextmanager
def batch_client(*args: str) -> Iterator[BatchClient]:
    client = BatchClient(list(args))
    try:
        yield client
    finally:
        client.kill()


def run_script(args: list[str], script: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [PYTHON, "-m", "client", "--batch", *args],
        input=script,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def address(cluster: FakeCluster, server_id: str) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(cluster.servers[server_id].port)]


@pytest.fixture
def fake() -> Iterator[FakeCluster]:
    with FakeCluster(3) as cluster:
        yield cluster


def test_script_with_every_command_prints_the_java_lines_and_exits_0(fake: FakeCluster) -> None:
    script = (
        "#help\n#list\n#who\n#createroom jokes\n#who\n#createroom second\n#joinroom jokes\n"
        "#joinroom nosuch\nhello\n#deleteroom jokes\n#deleteroom jokes\n#bogus\n#quit\n"
    )
    result = run_script([*address(fake, "s1"), "-i", "Adel", "--wait-replies"], script)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    help_end = lines.index(HELP_LINES[-1])
    assert lines[:2] == ["User has been approved.", "Adel moves to MainHall-s1"]
    answers = lines[help_end + 1 :]
    assert answers[:8] == [
        "List of chat rooms: MainHall-s1 MainHall-s2 MainHall-s3",
        "MainHall-s1 contains Adel",
        "Room jokes is created.",
        "Adel moves from MainHall-s1 to jokes",
        "jokes contains Adel*",
        "Create room second failed.",
        "room unchanged",
        "room unchanged",
    ]
    # The deleteroom reply and the members' roomchanges may come in either order (protocol.md).
    assert sorted(answers[8:10]) == ["Adel moves from jokes to MainHall-s1", "Room jokes is deleted."]
    assert answers[10:] == ["Delete room jokes failed.", "Adel has quit!"]
    assert "Unknown command #bogus" in result.stderr


def test_end_of_input_quits_cleanly(fake: FakeCluster) -> None:
    result = run_script([*address(fake, "s1"), "-i", "Adel"], "")
    assert result.returncode == 0
    assert result.stdout.splitlines()[-1] == "Adel has quit!"


def test_refused_identity_exits_1(fake: FakeCluster) -> None:
    with batch_client(*address(fake, "s1"), "-i", "Adel") as first:
        first.expect("Adel moves to MainHall-s1")
        result = run_script([*address(fake, "s2"), "-i", "Adel"], "#list\n")
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["Adel already in use."]


def test_invalid_identity_exits_1_without_connecting() -> None:
    result = run_script(["-p", "1", "-i", "no"], "")
    assert result.returncode == 1 and "Invalid identity" in result.stderr


def test_no_server_exits_3() -> None:
    (port,) = free_ports(1)
    result = run_script(["-p", str(port), "-i", "Adel", "--connect-timeout", "2"], "")
    assert result.returncode == 3 and "Could not connect" in result.stdout


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    assert run_script(["-i", "Adel", "--servers", "nohostport"], "").returncode == 2
    assert run_script(["-i", "Adel", "--config", str(tmp_path / "missing.txt")], "").returncode == 2


def test_message_round_trip_between_two_clients(fake: FakeCluster) -> None:
    with batch_client(*address(fake, "s1"), "-i", "Adel") as adel:
        adel.expect("Adel moves to MainHall-s1")  # before Bob starts, so that Adel sees him arrive
        with batch_client(*address(fake, "s1"), "-i", "Bob") as bob:
            bob.expect("Bob moves to MainHall-s1")
            adel.expect("Bob moves to MainHall-s1")
            adel.send("hello Bob")
            bob.expect("Adel: hello Bob")
            bob.send("hi Adel")
            adel.expect("Bob: hi Adel")
            bob.close_stdin()
            assert bob.wait() == 0
            adel.expect("Bob has quit!")


def test_cross_server_join_follows_the_route(fake: FakeCluster) -> None:
    with (
        batch_client(*address(fake, "s1"), "-i", "Adel", "--wait-replies") as adel,
        batch_client(*address(fake, "s3"), "-i", "Bob", "--wait-replies") as bob,
    ):
        adel.expect("Adel moves to MainHall-s1")
        adel.send("#createroom jokes")
        adel.expect("Adel moves from MainHall-s1 to jokes")
        bob.expect("Bob moves to MainHall-s3")
        bob.send("#joinroom jokes")
        bob.expect("Bob switches to server s1")
        bob.expect("Bob moves from MainHall-s3 to jokes")
        adel.expect("Bob moves from MainHall-s3 to jokes")
        bob.send("#who")
        bob.expect("jokes contains Adel* Bob")
        bob.send("on s1 now")
        adel.expect("Bob: on s1 now")


def test_a_failed_route_falls_back_to_the_old_server(fake: FakeCluster) -> None:
    with (
        batch_client(*address(fake, "s1"), "-i", "Adel", "--wait-replies") as adel,
        batch_client(*address(fake, "s3"), "-i", "Bob", "--wait-replies") as bob,
    ):
        adel.expect("Adel moves to MainHall-s1")
        adel.send("#createroom jokes")
        adel.expect("Adel moves from MainHall-s1 to jokes")
        bob.expect("Bob moves to MainHall-s3")
        fake.call(_stop_listening(fake.servers["s1"]))  # s1's clients stay, but it accepts no one new
        bob.send("#joinroom jokes")
        bob.expect("Server change failed")
        bob.send("#list")
        bob.expect("List of chat rooms: MainHall-s2 MainHall-s3 jokes")
        assert any("Still connected to server" in line for line in bob.stderr)


async def _stop_listening(server: FakeServer) -> None:
    assert server.server is not None
    server.server.close()
    server.server = None


def test_server_killed_client_reconnects_elsewhere_and_retakes_its_identity(tmp_path: Path) -> None:
    with FakeCluster(3, release_after_s=2.0) as fake:
        config = fake.config(tmp_path)
        with (
            batch_client(*address(fake, "s1"), "-i", "Adel", "--config", str(config), "--wait-replies") as adel,
            batch_client(*address(fake, "s2"), "-i", "Bob") as bob,
        ):
            adel.expect("Adel moves to MainHall-s1")
            bob.expect("Bob moves to MainHall-s2")
            fake.kill("s1")
            s1, s2 = fake.servers["s1"].port, fake.servers["s2"].port
            adel.expect(f"Lost connection to server s1 (127.0.0.1:{s1}) (closed by the server); reconnecting...")
            adel.expect(f"Reconnected to server s2 (127.0.0.1:{s2}) as Adel.")
            adel.expect("Adel moves to MainHall-s2")
            bob.expect("Adel moves to MainHall-s2")
            assert any("still held" in line for line in adel.stderr), "the identity was held for 2 s"
            adel.send("back again")
            bob.expect("Adel: back again")
            adel.send("#quit")
            adel.expect("Adel has quit!")
            assert adel.wait() == 0


def test_lines_typed_while_reconnecting_are_sent_afterwards(tmp_path: Path) -> None:
    with FakeCluster(2, release_after_s=1.0) as fake:
        fallback = f"127.0.0.1:{fake.servers['s2'].port}"
        with (
            batch_client(*address(fake, "s1"), "-i", "Adel", "--servers", fallback) as adel,
            batch_client(*address(fake, "s2"), "-i", "Bob") as bob,
        ):
            adel.expect("Adel moves to MainHall-s1")
            bob.expect("Bob moves to MainHall-s2")
            fake.kill("s1")
            adel.send("sent after reconnecting")
            adel.close_stdin()
            bob.expect("Adel: sent after reconnecting")
            bob.expect("Adel has quit!")
            assert adel.wait() == 0


def test_giving_up_reconnecting_exits_3(fake: FakeCluster) -> None:
    with batch_client(*address(fake, "s1"), "-i", "Adel", "--reconnect-timeout", "1") as adel:
        adel.expect("Adel moves to MainHall-s1")
        fake.kill("s1")
        assert adel.wait() == 3
        assert adel.rest()[-1].startswith("Could not reconnect:")


def test_a_server_line_over_64_kib_is_a_lost_connection(tmp_path: Path) -> None:
    connections = []

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        if len(connections) > 1:  # only the first session floods; reconnecting finds nobody home
            writer.close()
            return
        await reader.readline()
        writer.write(b'{"type":"newidentity","approved":"true"}\n' + b"x" * (70 * 1024))
        await writer.drain()
        await asyncio.sleep(5)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    (port,) = free_ports(1)
    server = asyncio.run_coroutine_threadsafe(asyncio.start_server(flood, "127.0.0.1", port), loop).result(5)
    try:
        with batch_client("-p", str(port), "-i", "Adel", "--reconnect-timeout", "1") as client:
            assert client.wait() == 3
            lines = client.rest()
        assert "longer than 65536 bytes" in lines[-2] and lines[-1].startswith("Could not reconnect")
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_help_is_long_option_only() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "client", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0 and "--identity" in result.stdout and "-h HOST" in result.stdout


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("POSIX only")
