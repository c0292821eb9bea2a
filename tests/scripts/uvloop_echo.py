"""Echo 100 messages through brioche with uvloop as the event loop; prints the loop class."""

import asyncio

import uvloop
from websockets.asyncio.client import connect

import brioche
from brioche import server, websocket


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    ws.send(text)


async def on_bytes(ws: brioche.WebSocket[None], data: bytes) -> None:
    await asyncio.sleep(0)
    ws.send_bytes(data)


def handler(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    return server.upgrade(srv, request, [], None, server.bad_request)


async def main() -> None:
    config = websocket.init().on_text(on_text).on_bytes(on_bytes)
    async with await server.handler(handler).websocket(config).hostname("127.0.0.1").port(0).serve() as srv:
        async with connect(f"ws://127.0.0.1:{srv.port}/") as client:
            for i in range(100):
                await client.send(f"m{i}")
                await client.send(bytes([i]))
            got = [await client.recv() for _ in range(200)]
    expected = [x for i in range(100) for x in (f"m{i}", bytes([i]))]
    assert got == expected, got[:5]
    print(type(asyncio.get_running_loop()).__module__, "ok")


uvloop.run(main())
