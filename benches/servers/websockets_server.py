"""websockets (asyncio implementation) bench server.

usage: websockets_server.py PORT
  any path: echo;  /sub: subscribed to "bench";  /pub: messages are ``broadcast`` to /sub.
"""

from __future__ import annotations

import asyncio

from websockets.asyncio.server import ServerConnection, broadcast, serve

from common import listening, setup

subscribers: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request is not None else "/"
    if path == "/sub":
        subscribers.add(ws)
        try:
            await ws.wait_closed()
        finally:
            subscribers.discard(ws)
    elif path == "/pub":
        async for message in ws:
            broadcast(subscribers, message)
    else:
        async for message in ws:
            await ws.send(message)


async def main(port: int) -> None:
    # No compression: the clients do not offer it anyway; ping timeouts left at the defaults.
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=16 * 1024 * 1024):
        listening("websockets", port)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(setup()))
