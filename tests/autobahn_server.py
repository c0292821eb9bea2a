"""A brioche echo server for the Autobahn|TestSuite fuzzing client.

    python tests/autobahn_server.py PORT [CERT_FILE KEY_FILE]

Serves ws://127.0.0.1:PORT/ (any path; wss:// with a certificate and key) until SIGTERM or SIGINT, echoing every text and binary
message unchanged. Messages up to 16 MiB (Autobahn 9.* sends exactly 16 MiB), no idle timeout.
permessage-deflate is accepted as offered (12.* and 13.* offer it; 1.* to 10.* do not, and run
against the same server) and every echo asks to be compressed, so the clients that negotiated it
get compressed echoes.
Prints nothing; errors from handlers go to the `brioche` logger (stderr) as usual.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import brioche
from brioche import server, websocket

MIB = 1024 * 1024


def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
    ws.send(text, compress=True)


def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
    ws.send_bytes(data, compress=True)


def ws_config() -> websocket.Config[Any]:
    return (
        websocket.init()
        .on_text(on_text)
        .on_bytes(on_bytes)
        .max_payload_length(16 * MIB)
        # 9.* queues up to 16 MiB echoes at once; never drop an echo for backpressure.
        .backpressure_limit(0)
        .idle_timeout(0)
        .per_message_deflate(True)
    )


def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
    return server.upgrade(srv, request, [], None, server.bad_request)


async def main(port: int, tls: list[str]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    config = server.handler(handler).websocket(ws_config()).hostname("127.0.0.1").port(port)
    if tls:
        config = config.tls(tls[0], tls[1])
    srv = await config.serve()
    try:
        await stop.wait()
    finally:
        await asyncio.wait_for(srv.stop(close_active_connections=True), 10)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 4):
        print(f"usage: {sys.argv[0]} PORT [CERT_FILE KEY_FILE]", file=sys.stderr)
        sys.exit(2)
    asyncio.run(main(int(sys.argv[1]), sys.argv[2:]))
