"""Echo 100 messages, then print the kind of descriptor the loop watches for the engine's events,
"fifo" (the portable pipe) or "eventfd" (Linux's default), and the scheduling policies of the
tokio workers: "0" (SCHED_OTHER) or "3" (SCHED_BATCH)."""

import asyncio
import os
import stat
from pathlib import Path

from websockets.asyncio.client import connect

import brioche
from brioche import server, websocket


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    ws.send(text)


def handler(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    return server.upgrade(srv, request, [], None, server.bad_request)


async def main() -> None:
    config = websocket.init().on_text(on_text)
    async with await server.handler(handler).websocket(config).hostname("127.0.0.1").port(0).serve() as srv:
        async with connect(f"ws://127.0.0.1:{srv.port}/") as client:
            for i in range(100):
                await client.send(f"m{i}")
            got = [await client.recv() for _ in range(100)]
        assert got == [f"m{i}" for i in range(100)], got[:5]
        fd = srv._engine.fileno()
        kind = "fifo" if stat.S_ISFIFO(os.fstat(fd).st_mode) else os.readlink(f"/proc/self/fd/{fd}")
    policies = set()
    for task in Path("/proc/self/task").iterdir():
        if (task / "comm").read_text().strip() == "brioche-worker":
            # Field 41 of stat (policy): the 39th after the ")" that ends the name.
            policies.add((task / "stat").read_text().rsplit(")", 1)[1].split()[38])
    print(kind.replace("anon_inode:[eventfd]", "eventfd"), *sorted(policies))


asyncio.run(main())
