"""Serve an echo with the blocking ``run()`` until Ctrl+C; prints the port once listening.

``run_forever.py PORT [method|module]``: with a second argument, on uvloop, through
``Config.run(loop_factory=...)`` or ``server.run(config, loop_factory=...)``. Logs to stderr at INFO.
"""

import asyncio
import logging
import sys

import uvloop

import brioche
from brioche import server, websocket


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    ws.send(text)


def handler(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    if request.path == "/port":
        return server.text(str(srv.port))
    if request.path == "/loop":
        loop = type(asyncio.get_running_loop())
        return server.text(f"{loop.__module__}.{loop.__qualname__}")
    return server.upgrade(srv, request, [], None, server.bad_request)


logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
port = int(sys.argv[1])
how = sys.argv[2] if len(sys.argv) > 2 else None
config = server.handler(handler).websocket(websocket.init().on_text(on_text)).hostname("127.0.0.1").port(port)
if how == "method":
    config.run(loop_factory=uvloop.new_event_loop)
elif how == "module":
    server.run(config, loop_factory=uvloop.new_event_loop)
else:
    config.run()
print("stopped cleanly", flush=True)
