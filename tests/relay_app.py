"""The app tests/test_workers_relay.py serves with workers and no Redis:
``python tests/relay_app.py N``.

Every socket subscribes to ``all`` and is told which worker (pid) it landed on. Text commands,
each publishing to ``all`` (the sender left out): ``big <n>`` publishes ``n`` bytes; ``seq <k>
<n>`` publishes ``k`` binary messages ``<i>:`` followed by ``n`` bytes, then answers ``done``;
``pub <text>`` publishes ``text``. ``stats`` answers the worker's ``stats()`` as JSON.
``sub <topic>`` subscribes to ``topic`` and answers ``subscribed``; ``spread <k> <n> <every>``
publishes ``k`` binary messages of ``n`` bytes, one in ``every`` to ``sparse`` and the others to
``bulk``, then answers ``done``; ``rss`` answers the worker's resident memory in KiB.
``$RELAY_APP_BACKPRESSURE`` sets the sockets' backpressure limit (1 GiB otherwise).
Module-level handlers: the workers unpickle them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import brioche
from brioche import server, websocket

SERVERS: list[brioche.Server[None]] = []


def on_open(ws: brioche.WebSocket[None]) -> None:
    ws.subscribe("all")
    ws.send(f"pid {os.getpid()}")


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    command, _, rest = text.partition(" ")
    if command == "big":
        ws.publish_bytes("all", b"b" * int(rest))
    elif command == "seq":
        count, size = (int(n) for n in rest.split())
        for i in range(count):
            ws.publish_bytes("all", f"{i}:".encode() + b"s" * size)
        ws.send("done")
    elif command == "pub":
        ws.publish("all", rest)
    elif command == "sub":
        ws.subscribe(rest)
        ws.send("subscribed")
    elif command == "spread":
        count, size, every = (int(n) for n in rest.split())
        payload = b"p" * size
        for i in range(count):
            ws.publish_bytes("bulk" if i % every else "sparse", payload)
        ws.send("done")
    elif command == "rss":
        with open("/proc/self/status") as status:
            ws.send(next(line.split()[1] for line in status if line.startswith("VmRSS:")))
    elif command == "stats":
        stats: dict[str, Any] = dict(SERVERS[0].stats())
        ws.send(json.dumps(stats))


def handler(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    if not SERVERS:
        SERVERS.append(srv)
    if srv.upgrade(request):
        return None
    return server.text(str(os.getpid()))


config = (
    server.handler(handler)
    # A sibling's client gets up to 100 MiB in a burst: none of it may be dropped on its way out.
    .websocket(
        websocket.init()
        .on_open(on_open)
        .on_text(on_text)
        .backpressure_limit(int(os.environ.get("RELAY_APP_BACKPRESSURE", 1 << 30)))
    )
    .hostname("127.0.0.1")
)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    server.run(config.port(0), workers=int(sys.argv[1]))
