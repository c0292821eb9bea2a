"""A service behind a reverse proxy: loopback only, explicit limits, stopped by SIGTERM.

    PORT=8000 python production.py

SIGTERM (systemd's stop) or Ctrl+C closes every WebSocket with 1001 ("server shutting down"),
waits for the handlers to finish, and exits 0.
"""

import logging

import brioche
from brioche import server, websocket


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    ws.send(text)


def fetch(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    if request.path == "/healthz":
        return server.text("ok\n")
    return server.upgrade(srv, request, [], None, server.bad_request)


ws_config = (
    websocket.init()
    .on_text(on_text)
    .max_payload_length(1024 * 1024)  # largest message a client may send; larger: close 1009
    .backpressure_limit(4 * 1024 * 1024)  # bytes queued for one slow client before sends drop
    .idle_timeout(60)  # seconds without a byte from the client (pinged at 3/4 of it)
    .message_timeout(30)  # seconds one message may take to arrive; then close 1008
)
app = (
    server.handler(fetch)
    .websocket(ws_config)
    .hostname("127.0.0.1")  # only the proxy talks to us; the port comes from $PORT
    .handshake_timeout(10)  # seconds to send the whole HTTP request; then 408
    .max_connections(50_000)  # open WebSockets; past it handshakes get 503
    .max_incoming_bytes(512 * 1024 * 1024)  # what all clients together may make us hold
)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)  # handler errors go to the "brioche" logger
    app.run()
