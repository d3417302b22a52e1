"""Where user lines come from: a prompt_toolkit prompt (interactive) or stdin lines (batch).

Both are `InputSource`s: coroutines that post `UserLine`s and finally one `UserEnd` to the shell.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import TYPE_CHECKING

from client.shell import ClientShell, Event, InputSource, Post, UserEnd, UserLine, UserOversized

# The servers cut lines at 64 KiB; an input line beyond that can never be sent, so stop reading it there.
MAX_INPUT_LINE_BYTES = 64 * 1024
if TYPE_CHECKING:  # prompt_toolkit is imported only when a prompt is shown, so batch runs start faster
    from prompt_toolkit import PromptSession

INPUT_QUEUE_BOUND = 64
READ_CHUNK_BYTES = 64 * 1024


def split_lines(buffer: bytearray, discarding: bool) -> tuple[list[UserLine | UserOversized], bool]:
    """Take the complete lines out of `buffer` (in place); bound what stays there.

    `discarding` is True while skipping the rest of an over-long line; the new value is returned.
    """
    events: list[UserLine | UserOversized] = []
    while (end := buffer.find(b"\n")) >= 0:
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        if discarding or len(line) > MAX_INPUT_LINE_BYTES:
            events.append(UserOversized())
            discarding = False
        else:
            events.append(UserLine(line.decode("utf-8", errors="replace").rstrip("\r")))
    if len(buffer) > MAX_INPUT_LINE_BYTES:
        buffer.clear()
        discarding = True
    return events, discarding


def stdin_source(fd: int) -> InputSource:
    """Lines from a file descriptor (a pipe, a file or a terminal), read by a daemon thread.

    A thread, because asyncio cannot watch a regular file and a blocking read cannot be cancelled; a daemon
    one, so a client that exits while its stdin stays open does not hang. It uses os.read, not sys.stdin:
    a daemon thread blocked inside a buffered reader holds its lock, and the interpreter aborts at exit.
    The bounded queue pushes back on a fast producer.
    """

    async def source(post: Post) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue(INPUT_QUEUE_BOUND)

        def put(event: Event) -> None:
            asyncio.run_coroutine_threadsafe(queue.put(event), loop).result()

        def pump() -> None:
            buffer = bytearray()
            discarding = False
            try:
                while chunk := os.read(fd, READ_CHUNK_BYTES):
                    buffer += chunk
                    events, discarding = split_lines(buffer, discarding)
                    for event in events:
                        put(event)
                if buffer and not discarding:  # a last line without a newline still counts
                    buffer += b"\n"
                    for event in split_lines(buffer, discarding)[0]:
                        put(event)
                put(UserEnd())
            except (RuntimeError, OSError):
                return  # the loop is gone (client exiting) or stdin was closed under us

        threading.Thread(target=pump, name="stdin-reader", daemon=True).start()
        while True:
            event = await queue.get()
            await post(event)
            if isinstance(event, UserEnd):
                return

    return source


def prompt_source(shell: ClientShell, session: PromptSession[str]) -> InputSource:
    """An editable prompt `[room] identity> ` with history; Ctrl-D or Ctrl-C quits."""

    async def source(post: Post) -> None:
        # The prompt shows the room, which is known only once the server has let us in.
        await shell.logged_in.wait()
        while True:
            try:
                # A callable message is re-evaluated at each redraw, so the prompt follows room changes.
                line = await session.prompt_async(lambda: shell.core.prompt)
            except (EOFError, KeyboardInterrupt):
                await post(UserEnd())
                return
            await post(UserLine(line))

    return source


def new_session() -> PromptSession[str]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    # History stays in memory: chat lines can be private, so nothing is written to disk.
    return PromptSession(history=InMemoryHistory())
