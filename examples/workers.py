"""One port, several processes: a chat room whose messages reach the clients of every worker.

    PORT=8000 WORKERS=4 python workers.py

Each worker is a fresh interpreter that imports this file (without running the block at the
bottom) and unpickles ``app``: the handlers and the config live at module level. The process
started here supervises the workers: it restarts one that dies and, on SIGTERM or Ctrl+C, stops
them all, each closing its connections with 1001.
"""

import logging
import os

import brioche
from brioche import server, websocket


def on_open(ws: brioche.WebSocket[None]) -> None:
    ws.subscribe("room")


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    # Reaches the room's subscribers in this worker and, through the relay, in the others.
    ws.publish("room", text)


def fetch(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    return server.upgrade(srv, request, [], None, server.bad_request)


ws_config = websocket.init().on_open(on_open).on_text(on_text).publish_to_self(True)
app = server.handler(fetch).websocket(ws_config).hostname("127.0.0.1")

if __name__ == "__main__":
    # The supervisor logs here: "4 workers listening on port 8000 (pids ...)", restarts.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server.run(app, workers=int(os.environ.get("WORKERS", "2")))
