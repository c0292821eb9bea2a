"""brioche bench server with ``run(config, workers=N)``: S1's echo from N processes on one port.

usage: brioche_workers_server.py PORT N
"""

from __future__ import annotations

import logging
import sys

import brioche
from brioche import server, websocket

from common import setup


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    ws.send(text)


def handler(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    if srv.upgrade(request):
        return None
    return server.text("brioche workers bench server")


config = server.handler(handler).websocket(websocket.init().on_text(on_text)).hostname("127.0.0.1")

if __name__ == "__main__":
    port = setup()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server.run(config.port(port), workers=int(sys.argv[2]))
