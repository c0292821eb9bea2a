"""brioche bench server: one Python handler per message.

usage: brioche_server.py PORT [asyncio|uvloop]
  any path: echo (``ws.send(text)`` in ``on_text``);  /sub: subscribed to "bench";
  /pub: each text message is published to "bench" with ``srv.publish``.
"""

from __future__ import annotations

import asyncio
import sys

import brioche
from brioche import server, websocket

from common import TOPIC, listening, setup

SUB, PUB, ECHO = "sub", "pub", "echo"
_srv: brioche.Server[str] | None = None


def on_open(ws: brioche.WebSocket[str]) -> None:
    if ws.data == SUB:
        ws.subscribe(TOPIC)


def on_text(ws: brioche.WebSocket[str], text: str) -> None:
    if ws.data == PUB:
        assert _srv is not None
        _srv.publish(TOPIC, text)
    else:
        ws.send(text)


def on_bytes(ws: brioche.WebSocket[str], data: bytes) -> None:
    ws.send_bytes(data)


def handler(request: server.Request, srv: brioche.Server[str]) -> server.Response | None:
    role = SUB if request.path == "/sub" else PUB if request.path == "/pub" else ECHO
    if srv.upgrade(request, data=role):
        return None
    return server.text("brioche bench server")


async def main(port: int, loop_name: str) -> None:
    global _srv
    config = websocket.init().on_open(on_open).on_text(on_text).on_bytes(on_bytes)
    _srv = await server.handler(handler).websocket(config).hostname("127.0.0.1").port(port).serve()
    listening(f"brioche ({loop_name})", _srv.port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    port = setup()
    loop_name = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main(port, loop_name))
    else:
        asyncio.run(main(port, loop_name))
