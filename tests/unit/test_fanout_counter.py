"""bench.fanout's counter process: the sockets handed over are read there, every newline counted once, and
a connection the other side closes is reported as lost. Real loopback TCP and a real counter process."""

from __future__ import annotations

import asyncio
import os

from bench.fanout import Counter, LoadGen, Peer, _factory

LINE = b'{"type":"message","content":"x"}\n'
DEADLINE_S = 10.0


def test_counter_counts_the_lines_of_handed_over_sockets_and_their_closes() -> None:
    async def scenario() -> None:
        accepted: list[asyncio.StreamWriter] = []
        ready = asyncio.Event()

        async def on_connect(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)
            if len(accepted) == 3:
                ready.set()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        gen = LoadGen({"server_pid": os.getpid()})
        gen.setup = False
        loop = asyncio.get_running_loop()
        peers = []
        for i in range(3):
            peer = Peer(gen, i + 1)  # none of them samples (index 0 would)
            await loop.create_connection(_factory(peer), "127.0.0.1", port)
            peers.append(peer)
        await asyncio.wait_for(ready.wait(), DEADLINE_S)
        counter = Counter()
        try:
            counter.hand_over(peers)
            # Lines split across writes and several per write: counted once each, wherever they break.
            accepted[0].write(LINE * 5 + LINE[:7])
            accepted[0].write(LINE[7:])
            accepted[1].write(LINE * 1000)
            accepted[2].write(LINE)
            for writer in accepted:
                await writer.drain()
            async with asyncio.timeout(DEADLINE_S):
                while (await counter.sample())[0] < 1007:
                    await asyncio.sleep(0.01)
            lines, lost, cpu_s = await counter.sample()
            assert (lines, lost) == (1007, 0)
            assert cpu_s >= 0.0
            assert all(p.lines == 0 for p in peers)  # nothing was read here after the hand-over
            accepted[1].close()
            async with asyncio.timeout(DEADLINE_S):
                while (await counter.sample())[1] < 1:
                    await asyncio.sleep(0.01)
            assert (await counter.sample())[:2] == (1007, 1)
        finally:
            counter.close()
            for peer in peers:
                assert peer.transport is not None
                peer.transport.abort()
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()
        assert counter.proc.returncode == 0

    asyncio.run(scenario())
