"""aiohttp bench server.

usage: aiohttp_server.py PORT
  any path: echo;  /sub: subscribed to "bench";  /pub: each message is sent to every /sub.
"""

from __future__ import annotations

from aiohttp import WSMsgType, web

from common import listening, setup

subscribers: set[web.WebSocketResponse] = set()


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
                for sub in list(subscribers):
                    if not sub.closed:
                        await sub.send_str(msg.data)
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
