"""The app tests/test_workers.py serves with workers: ``python tests/workers_app.py N [REDIS_URL]``.

Every socket subscribes to ``all`` and is told which worker (pid) it landed on; a text message
is published to ``all``, the sender included, after ``block <seconds>`` has kept the worker's
loop blocked that long, or ``linger <seconds>`` has started a thread (not a daemon: the worker's
exit waits for it) that sleeps that long. ``GET /exit/<status>`` ends the worker that takes it
with that exit status. ``GET /stats`` answers the worker's pid, its own counters and every worker's
(``stats(all_workers=True)``). ``WORKERS_APP_TIMEOUT`` in the environment sets
``worker_timeout``. Module-level handlers: the workers unpickle them.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import brioche
from brioche import server, websocket


def on_open(ws: brioche.WebSocket[None]) -> None:
    ws.subscribe("all")
    ws.send(f"pid {os.getpid()}")


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    if text.startswith("block "):
        # A handler that blocks the loop, as a synchronous call that hangs does.
        time.sleep(float(text.removeprefix("block ")))
    elif text.startswith("linger "):
        threading.Thread(target=time.sleep, args=(float(text.removeprefix("linger ")),)).start()
    ws.publish("all", text)


def handler(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    if request.path.startswith("/exit/"):
        os._exit(int(request.path.removeprefix("/exit/")))
    if request.path == "/stats":
        return server.json({"pid": os.getpid(), "own": srv.stats(), "all": srv.stats(all_workers=True)})
    if srv.upgrade(request):
        return None
    return server.text(str(os.getpid()))


config = (
    server.handler(handler)
    .websocket(websocket.init().on_open(on_open).on_text(on_text).publish_to_self(True))
    .hostname("127.0.0.1")
)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if len(sys.argv) > 2:  # a Redis URL: topics shared through it (tests/test_redis_pubsub.py)
        config = config.pubsub_redis(sys.argv[2])
    if "WORKERS_APP_TIMEOUT" in os.environ:
        config = config.worker_timeout(float(os.environ["WORKERS_APP_TIMEOUT"]))
    server.run(config.port(0), workers=int(sys.argv[1]))
