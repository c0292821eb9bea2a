"""websockets (asyncio implementation) bench server.

usage: websockets_server.py PORT
  any path: echo;  /sub: subscribed to "bench";  /pub: messages are ``broadcast`` to /sub
  ("#x ..." to the subscribers of x);  /t/a,b,c: subscribed to a, b and c, "+x"/"-x"
  (un)subscribe (S8). websockets has no topics: a dict of sets here.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from websockets.asyncio.server import ServerConnection, broadcast, serve

from common import TOPICS_PATH, listening, setup, topics_of

subscribers: set[ServerConnection] = set()
by_topic: defaultdict[str, set[ServerConnection]] = defaultdict(set)


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
            if isinstance(message, str) and message[:1] == "#":
                broadcast(by_topic.get(message[1:message.index(" ")], ()), message)
            else:
                broadcast(subscribers, message)
    elif path.startswith(TOPICS_PATH):
        topics = set(topics_of(path))
        for topic in topics:
            by_topic[topic].add(ws)
        try:
            async for message in ws:
                text = str(message)
                if text[:1] == "+":
                    topics.add(text[1:])
                    by_topic[text[1:]].add(ws)
                elif text[:1] == "-":
                    topics.discard(text[1:])
                    by_topic[text[1:]].discard(ws)
                await ws.send(text)
        finally:
            for topic in topics:
                by_topic[topic].discard(ws)
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
