"""Talk to the echo server with the `websockets` client: python client.py ws://127.0.0.1:3000/ws"""

import asyncio
import sys

from websockets.asyncio.client import connect


async def main(url: str) -> None:
    async with connect(url) as ws:
        await ws.send("hello")
        print(await ws.recv())
        await ws.send(b"\x00\x01")
        print(await ws.recv())


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:3000/ws"))
