"""Serve an echo with the blocking ``run()`` until Ctrl+C; prints the port once listening."""

import sys

import brioche
from brioche import server, websocket


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    ws.send(text)


def handler(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    if request.path == "/port":
        return server.text(str(srv.port))
    return server.upgrade(srv, request, [], None, server.bad_request)


port = int(sys.argv[1])
server.handler(handler).websocket(websocket.init().on_text(on_text)).hostname("127.0.0.1").port(port).run()
print("stopped cleanly", flush=True)
