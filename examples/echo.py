"""An echo server: every message on /ws comes straight back; any other path answers with text."""

import brioche
from brioche import server, websocket


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    ws.send(text)


def on_bytes(ws: brioche.WebSocket[None], data: bytes) -> None:
    ws.send_bytes(data)


def fetch(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    if request.path == "/ws" and srv.upgrade(request):
        return None  # upgraded: from now on the websocket handlers take over
    return server.text("connect a WebSocket to /ws\n")


app = server.handler(fetch).websocket(websocket.init().on_text(on_text).on_bytes(on_bytes))

if __name__ == "__main__":
    app.run()  # port $PORT or 3000, all interfaces, until Ctrl+C
