"""systemd socket activation: systemd binds the port and hands the socket over (fd 3).

The socket outlives the process: during a restart, clients queue in its backlog instead of
being refused. Started by brioche-activated.socket and brioche-activated.service; to try it
without systemd:

    systemd-socket-activate -l 127.0.0.1:8000 python socket_activation.py
"""

import os

import brioche
from brioche import server, websocket

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): the first socket passed is fd 3


def systemd_socket() -> int:
    """The one socket systemd passed to this process, as sd_listen_fds(3) finds it."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        raise SystemExit("expected one socket from systemd (LISTEN_PID, LISTEN_FDS=1)")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # meant for this process, not for its children
    return SD_LISTEN_FDS_START


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    ws.send(text)


def fetch(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    if request.path == "/healthz":
        return server.text("ok\n")
    return server.upgrade(srv, request, [], None, server.bad_request)


app = server.handler(fetch).websocket(websocket.init().on_text(on_text))

if __name__ == "__main__":
    # A TCP or a Unix socket alike (ListenStream=/run/brioche/app.sock works too). brioche
    # serves on a duplicate: fd 3 stays open, and systemd keeps the socket anyway.
    app.sock(systemd_socket()).run()
