"""The asyncio shell around `ClientCore`: owns the connections, the timers and the output.

Every source of input (the current server's reader task, the user's input task, the route and reconnect
tasks) posts an event to one bounded queue; a single loop feeds each event to the core and applies the
effects it returns. So the core's state has one owner, and the order of printed lines is the order in which
things happened. Tasks live in a TaskGroup and are cancelled when the session ends.

User lines that arrive while the core cannot take them (not logged in yet, moving between servers,
reconnecting, or -- with `wait_replies` -- still waiting for the previous command's answer) are held in
order and released as soon as it can. Every wait is bounded: connects, sends, the answer to each command
(`reply_timeout_s`), the route's serverchange, and the whole reconnection (`reconnect_timeout_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from client.connection import Connection, ConnectionFailed, ServerAddress
from client.core import (
    EXIT_CONNECTION,
    AbandonRoute,
    AdoptRoute,
    ClientCore,
    Effect,
    Exit,
    FollowRoute,
    Hint,
    Phase,
    QuitCommand,
    Reconnect,
    SendMessage,
    Show,
    is_approved,
    parse_command,
    printable,
)

EVENT_QUEUE_BOUND = 256
# A server that accepts us and then drops us again would otherwise make the client reconnect forever.
MAX_RECONNECTS = 5
RECONNECTS_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class ShellOptions:
    wait_replies: bool = False
    reply_timeout_s: float = 15.0
    connect_timeout_s: float = 5.0
    # Long enough for the cluster to declare a dead server down (and, if it was the coordinator, elect a
    # new one) and release its clients' identities; short enough that a script does not hang.
    reconnect_timeout_s: float = 30.0
    retry_pause_s: float = 1.0
    debug: bool = False
    tls: ssl.SSLContext | None = None  # --tls: every connection (routes and reconnections too) uses it


# --- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerMessage:
    connection: Connection
    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ServerClosed:
    connection: Connection
    reason: str


@dataclass(frozen=True, slots=True)
class UserLine:
    text: str


@dataclass(frozen=True, slots=True)
class UserEnd:
    """End of input (EOF, Ctrl-D, Ctrl-C): the same as #quit."""


@dataclass(frozen=True, slots=True)
class UserOversized:
    """An input line over the limit, dropped by the reader."""


@dataclass(frozen=True, slots=True)
class RouteDone:
    connection: Connection | None
    reply: dict[str, Any] | None
    failure: str


@dataclass(frozen=True, slots=True)
class Reconnected:
    connection: Connection


@dataclass(frozen=True, slots=True)
class ReconnectFailed:
    reason: str


Event = ServerMessage | ServerClosed | UserLine | UserEnd | UserOversized | RouteDone | Reconnected | ReconnectFailed
UserEvent = UserLine | UserEnd | UserOversized
Post = Callable[[Event], Awaitable[None]]
InputSource = Callable[[Post], Coroutine[Any, Any, None]]


class Output(Protocol):
    def show(self, line: str) -> None: ...

    def hint(self, line: str) -> None: ...

    def refresh(self) -> None: ...


class StreamOutput:
    """Events to stdout, hints to stderr. The streams are looked up at each call, so prompt_toolkit's
    patch_stdout (which swaps sys.stdout/sys.stderr) keeps incoming lines above the line being typed."""

    def __init__(self) -> None:
        self.on_refresh: Callable[[], None] | None = None

    def show(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)

    def hint(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def refresh(self) -> None:
        if self.on_refresh is not None:
            self.on_refresh()


def unique_addresses(addresses: Sequence[ServerAddress]) -> list[ServerAddress]:
    """In order, one per endpoint, keeping the first named one (a server id makes messages clearer)."""
    result: list[ServerAddress] = []
    for address in addresses:
        for index, known in enumerate(result):
            if known.same_endpoint(address):
                if known.server_id is None and address.server_id is not None:
                    result[index] = address
                break
        else:
            result.append(address)
    return result


def reconnect_order(addresses: Sequence[ServerAddress], lost: ServerAddress) -> list[ServerAddress]:
    """The servers after the lost one first (spreading clients of a dead server), the lost one last: it
    may come back, but it is the least likely to answer soon."""
    others = [a for a in addresses if not a.same_endpoint(lost)]
    index = next((i for i, a in enumerate(addresses) if a.same_endpoint(lost)), None)
    if index is not None:
        after = [a for a in addresses[index + 1 :] if not a.same_endpoint(lost)]
        others = after + [a for a in others if a not in after]
    return [*others, lost]


class ClientShell:
    def __init__(
        self, core: ClientCore, addresses: Sequence[ServerAddress], output: Output, options: ShellOptions
    ) -> None:
        assert addresses, "at least one server address"
        self.core = core
        self.addresses = unique_addresses(addresses)
        self.output = output
        self.options = options
        self.logged_in = asyncio.Event()
        self._events: asyncio.Queue[Event] = asyncio.Queue(EVENT_QUEUE_BOUND)
        self._held: deque[UserEvent] = deque()
        self._current: Connection | None = None
        self._routed: Connection | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._readers: dict[Connection, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._deadline: float | None = None
        self._deadline_key: tuple[int, Phase] | None = None
        self._last = self.addresses[0]
        self._reconnect_times: deque[float] = deque()

    async def post(self, event: Event) -> None:
        await self._events.put(event)

    # --- the session -------------------------------------------------------------------------------

    async def run(self, input_source: InputSource | None = None) -> int:
        """Connect, log in, then process events until an Exit; returns the exit status."""
        first = self.core.start()
        if any(isinstance(effect, Exit) for effect in first):
            return await self._apply(first) or 0
        connection = await self._connect_first()
        if connection is None:
            return EXIT_CONNECTION
        self.core.server = connection.address.label
        status: int | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._make_current(connection)
                status = await self._apply(first)
                if status is None:
                    if input_source is not None:
                        self._spawn(input_source(self.post))
                    status = await self._loop()
                self._cancel_tasks()
        finally:
            await self._close_all()
        return status if status is not None else 0

    async def _connect_first(self) -> Connection | None:
        reasons = []
        for address in self.addresses:
            try:
                return await Connection.open(address, self.options.connect_timeout_s, self.options.tls)
            except ConnectionFailed as exc:
                reasons.append(str(exc))
                if address is not self.addresses[-1]:
                    self.output.hint(f"{exc}; trying the next server.")
        self.output.show(f"Could not connect to any server: {'; '.join(reasons)}.")
        return None

    async def _loop(self) -> int:
        loop = asyncio.get_running_loop()
        while True:
            timeout = None
            if self._deadline is not None and self.core.phase not in (Phase.ROUTING, Phase.RECONNECTING):
                timeout = max(0.0, self._deadline - loop.time())
            try:
                event = await asyncio.wait_for(self._events.get(), timeout)
            except TimeoutError:
                status = await self._apply(self.core.reply_timed_out(self.options.reply_timeout_s))
            else:
                status = await self._handle(event)
            if status is None:
                status = await self._release_held()
            if status is not None:
                return status
            self._arm_deadline()
            # The prompt shows the room, so it waits for the roomchange that follows the approval.
            if self.core.logged_in and (self.core.room or self.core.pending is None):
                self.logged_in.set()
            self.output.refresh()

    def _arm_deadline(self) -> None:
        """A fresh deadline whenever a new answer is awaited or the phase changes (e.g. after a move)."""
        pending = self.core.pending
        key = (pending.serial, self.core.phase) if pending is not None else None
        if key != self._deadline_key:
            self._deadline_key = key
            self._deadline = None if key is None else asyncio.get_running_loop().time() + self.options.reply_timeout_s

    async def _handle(self, event: Event) -> int | None:
        match event:
            case ServerMessage(connection, message):
                if connection is not self._current:
                    return None  # a line from a connection we already left
                if self.options.debug:
                    self.output.hint(f"<- {json.dumps(message)}")
                return await self._apply(self.core.receive(message))
            case ServerClosed(connection, reason):
                if connection is not self._current:
                    return None
                self._current = None
                await self._forget(connection)
                return await self._apply(self.core.connection_lost(reason))
            case UserLine() | UserEnd() | UserOversized():
                return await self._on_user(event)
            case RouteDone(connection, reply, failure):
                self._routed = connection
                if self.options.debug and reply is not None:
                    self.output.hint(f"<- {json.dumps(reply)}")
                return await self._apply(self.core.route_reply(reply, failure))
            case Reconnected(connection):
                self._make_current(connection)
                return await self._apply(self.core.reconnected(connection.address.label))
            case ReconnectFailed(reason):
                return await self._apply(self.core.reconnect_failed(reason))
        raise AssertionError(f"unhandled event {event!r}")

    async def _on_user(self, event: UserEvent) -> int | None:
        if self.core.phase is Phase.DONE:
            return None
        quitting = isinstance(event, UserEnd) or (
            isinstance(event, UserLine) and isinstance(parse_command(event.text), QuitCommand)
        )
        if quitting and not self._held and self.core.phase is Phase.RECONNECTING:
            return await self._apply(self.core.command("#quit"))
        if self.core.phase in (Phase.ROUTING, Phase.RECONNECTING) and not self.options.wait_replies:
            self.output.hint("(held until the client is connected again)")
        self._held.append(event)
        return None

    async def _release_held(self) -> int | None:
        while self._held and self.core.ready_for_input(self.options.wait_replies):
            event = self._held.popleft()
            match event:
                case UserLine(text):
                    effects = self.core.command(text)
                case UserEnd():
                    effects = self.core.end_of_input()
                case UserOversized():
                    effects = [Hint("Input line too long; not sent.")]
            status = await self._apply(effects)
            if status is not None:
                return status
            self._arm_deadline()
        return None

    # --- effects -----------------------------------------------------------------------------------

    async def _apply(self, effects: list[Effect]) -> int | None:
        for effect in effects:
            match effect:
                case SendMessage(message):
                    await self._send(message)
                case Show(line):
                    self.output.show(printable(line))
                case Hint(line):
                    self.output.hint(printable(line))
                case FollowRoute():
                    self._spawn(self._follow_route(effect))
                case AdoptRoute():
                    await self._adopt_route()
                case AbandonRoute():
                    routed, self._routed = self._routed, None
                    if routed is not None:
                        await routed.close()
                case Reconnect():
                    self._spawn(self._reconnect(self._last_address()))
                case Exit(status):
                    return status
        return None

    async def _send(self, message: dict[str, Any]) -> None:
        connection = self._current
        if connection is None:
            self.output.hint("Not connected; nothing was sent.")
            return
        if self.options.debug:
            self.output.hint(f"-> {json.dumps(message)}")
        try:
            await connection.send(message)
        except ConnectionFailed as exc:
            # Closing makes the reader see the end of the stream, which reports the loss exactly once.
            self.output.hint(str(exc))
            await connection.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._tg is not None
        task = self._tg.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _make_current(self, connection: Connection) -> None:
        self._current = connection
        self._readers[connection] = self._spawn(self._read(connection))
        if all(not a.same_endpoint(connection.address) for a in self.addresses):
            self.addresses.append(connection.address)
        self._last = connection.address

    def _last_address(self) -> ServerAddress:
        return self._last

    async def _forget(self, connection: Connection) -> None:
        reader = self._readers.pop(connection, None)
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        await connection.close()

    async def _adopt_route(self) -> None:
        routed, self._routed = self._routed, None
        assert routed is not None, "AdoptRoute without a routed connection"
        known = next((a for a in self.addresses if a.same_endpoint(routed.address)), routed.address)
        routed.address = replace(known, server_id=self.core.server or known.server_id)
        old = self._current
        self._make_current(routed)
        self.core.server = routed.address.label
        if old is not None:
            await self._forget(old)

    # --- tasks -------------------------------------------------------------------------------------

    async def _read(self, connection: Connection) -> None:
        reason = "closed by the server"
        try:
            while True:
                message = await connection.receive()
                if message is None:
                    break
                await self.post(ServerMessage(connection, message))
        except ConnectionFailed as exc:
            reason = str(exc)
        await self.post(ServerClosed(connection, reason))

    async def _follow_route(self, effect: FollowRoute) -> None:
        address = next(
            (a for a in self.addresses if (a.host, a.port) == (effect.host, effect.port)),
            ServerAddress(effect.host, effect.port),
        )
        connection: Connection | None = None
        try:
            connection = await Connection.open(address, self.options.connect_timeout_s, self.options.tls)
            if self.options.debug:
                self.output.hint(f"-> {json.dumps(effect.movejoin)}")
            await connection.send(effect.movejoin)
            # The Java client reads exactly one line here; the server sends serverchange first.
            reply = await connection.receive_within(self.options.reply_timeout_s)
            if reply is None:
                raise ConnectionFailed(f"{address.label} closed the connection")
        except ConnectionFailed as exc:
            if connection is not None:
                await connection.close()
            await self.post(RouteDone(None, None, str(exc)))
            return
        await self.post(RouteDone(connection, reply, ""))

    async def _reconnect(self, lost: ServerAddress) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._reconnect_times and self._reconnect_times[0] < now - RECONNECTS_WINDOW_S:
            self._reconnect_times.popleft()
        if len(self._reconnect_times) >= MAX_RECONNECTS:
            await self.post(
                ReconnectFailed(f"the connection was lost {MAX_RECONNECTS} times within {RECONNECTS_WINDOW_S:g} s")
            )
            return
        self._reconnect_times.append(now)
        deadline = loop.time() + self.options.reconnect_timeout_s
        last_reason = "no server answered"
        told_held = False
        order = reconnect_order(self.addresses, lost)
        while loop.time() < deadline:
            for address in order:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                connection: Connection | None = None
                try:
                    connection = await Connection.open(address, min(self.options.connect_timeout_s, remaining))
                    await connection.send(self.core.newidentity())
                    reply = await connection.receive_within(max(0.1, min(self.options.reply_timeout_s, remaining)))
                except ConnectionFailed as exc:
                    if connection is not None:
                        await connection.close()
                    last_reason = str(exc)
                    continue
                if is_approved(reply, "newidentity"):
                    await self.post(Reconnected(connection))
                    return
                await connection.close()
                last_reason = f"{address.label} still refuses identity {self.core.identity}"
                if not told_held:
                    told_held = True
                    self.output.hint(
                        f"{self.core.identity} is still held by the cluster (until the old server is declared "
                        f"down); retrying for up to {self.options.reconnect_timeout_s:g} s."
                    )
            await asyncio.sleep(max(0.0, min(self.options.retry_pause_s, deadline - loop.time())))
        await self.post(ReconnectFailed(f"{last_reason} (gave up after {self.options.reconnect_timeout_s:g} s)"))

    def _cancel_tasks(self) -> None:
        for task in list(self._background):
            task.cancel()

    async def _close_all(self) -> None:
        for connection in (self._current, self._routed):
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()
        self._current = self._routed = None
