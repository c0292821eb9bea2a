"""HTTPS and wss:// without a proxy: brioche terminates TLS itself.

    PORT=8443 TLS_CERT=/etc/letsencrypt/live/example.com/fullchain.pem \
        TLS_KEY=/etc/letsencrypt/live/example.com/privkey.pem python tls.py

A renewed certificate needs no restart: `kill -HUP <pid>` (certbot's deploy hook, or systemd's
`ExecReload=/bin/kill -HUP $MAINPID`) reads both files again; connections opened from then on
get the new certificate, open ones keep theirs. SIGTERM closes every WebSocket with 1001.
"""

import logging
import os

import brioche
from brioche import server, websocket


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    ws.send(text)


def fetch(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    if request.path == "/healthz":
        return server.text("ok\n")
    return server.upgrade(srv, request, [], None, server.bad_request)


app = (
    server.handler(fetch)
    .websocket(websocket.init().on_text(on_text))
    .hostname("0.0.0.0")  # clients connect directly: wss://example.com:8443/
    .tls(os.environ["TLS_CERT"], os.environ["TLS_KEY"])  # PEM: the full chain, and its key
    .handshake_timeout(10)  # seconds for the TLS handshake and the HTTP request together
)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)  # "SIGHUP: TLS certificate reloaded" goes here
    app.run()
