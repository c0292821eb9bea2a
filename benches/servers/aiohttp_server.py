"""aiohttp bench server.

usage: aiohttp_server.py PORT
  any path: echo;  /sub: subscribed to "bench";  /pub: each message is sent to every /sub
  ("#x ..." to the subscribers of x);  /t/a,b,c: subscribed to a, b and c, "+x"/"-x"
  (un)subscribe (S8). aiohttp has no topics: a dict of sets here.
"""

from __future__ import annotations

from collections import defaultdict

from aiohttp import WSMsgType, web

from common import TOPICS_PATH, listening, setup, topics_of

subscribers: set[web.WebSocketResponse] = set()
by_topic: defaultdict[str, set[web.WebSocketResponse]] = defaultdict(set)


async def handle(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(compress=False, max_msg_size=16 * 1024 * 1024)
    await ws.prepare(request)
    if request.path == "/sub":
        subscribers.add(ws)
        try:
            async for _ in ws:
                pass
        finally:
            subscribers.discard(ws)
    elif request.path == "/pub":
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                text = msg.data
                targets = (by_topic.get(text[1:text.index(" ")], ()) if text[:1] == "#"
                           else subscribers)
                for sub in list(targets):
                    if not sub.closed:
                        await sub.send_str(text)
    elif request.path.startswith(TOPICS_PATH):
        topics = set(topics_of(request.path))
        for topic in topics:
            by_topic[topic].add(ws)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    text = msg.data
                    if text[:1] == "+":
                        topics.add(text[1:])
                        by_topic[text[1:]].add(ws)
                    elif text[:1] == "-":
                        topics.discard(text[1:])
                        by_topic[text[1:]].discard(ws)
                    await ws.send_str(text)
        finally:
            for topic in topics:
                by_topic[topic].discard(ws)
    else:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
    return ws


def main(port: int) -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)

    async def announce(_: web.Application) -> None:
        listening("aiohttp", port)

    app.on_startup.append(announce)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main(setup())
