"""A server for the incoming-budget test, in a process of its own so that its RSS is its own:
``budget_server.py BUDGET_BYTES MESSAGE_TIMEOUT``. Echoes on /ws, ``GET /stats`` answers
``srv.stats()`` as JSON, prints the port once listening and serves until SIGTERM."""

import asyncio
import signal
import sys

import brioche
from brioche import server, websocket


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    ws.send(text)


def on_bytes(ws: brioche.WebSocket[None], data: bytes) -> None:
    ws.send_bytes(data)


def fetch(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    if request.path == "/stats":
        return server.json(srv.stats())
    if srv.upgrade(request):
        return None
    return server.not_found()


async def main() -> None:
    budget, timeout = int(sys.argv[1]), float(sys.argv[2])
    ws_config = (
        websocket.init().on_text(on_text).on_bytes(on_bytes)
        .max_payload_length(16 * 1024 * 1024).message_timeout(timeout)
    )
    config = server.handler(fetch).websocket(ws_config).hostname("127.0.0.1").port(0)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with config.max_incoming_bytes(budget).serve() as srv:
        print(srv.port, flush=True)
        await stop.wait()


asyncio.run(main())
