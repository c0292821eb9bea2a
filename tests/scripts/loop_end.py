"""A server its program does not stop: ``main()`` returns once a client sends "bye", and the
runner ends the loop with the server still running (tests/test_run.py).

``loop_end.py LOOP MODE``: LOOP is asyncio or uvloop; MODE is ``never`` (no ``stop()`` at
all), ``cut-short`` (a plain ``stop()``, which waits for the client, given 0.2 s by
``wait_for``) or ``slow-close`` (no ``stop()``, and an ``on_close`` that never returns, with
the stop's grace period at 0.5 s). Prints the port once listening, logs at INFO to stdout,
and, after the runner has returned, whether the port still takes connections and whether it
can be listened on again.
"""

import asyncio
import errno
import logging
import socket
import sys

import uvloop

import brioche
from brioche import server, websocket
from brioche import _server
from brioche._server import run_loop
from slow_close import on_close_never_returning

# Kept for the whole program, as an application's global would be: nothing collects it.
SERVERS: list[brioche.Server[None]] = []


def handler(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    return server.upgrade(srv, request, [], None, server.bad_request)


async def main() -> int:
    bye = asyncio.Event()

    def on_text(ws: brioche.WebSocket[None], text: str) -> None:
        ws.send(text)
        if text == "bye":
            bye.set()

    def on_close(ws: brioche.WebSocket[None], code: int, reason: str) -> None:
        print(f"on_close {code}", flush=True)

    config = websocket.init().on_text(on_text)
    config = config.on_close(on_close_never_returning if MODE == "slow-close" else on_close)
    srv = await server.handler(handler).websocket(config).hostname("127.0.0.1").port(0).serve()
    SERVERS.append(srv)
    print(srv.port, flush=True)
    await bye.wait()
    if MODE == "cut-short":
        try:
            await asyncio.wait_for(srv.stop(), 0.2)
        except asyncio.TimeoutError:
            print("stop cut short", flush=True)
    return srv.port


async def listen_again(port: int) -> None:
    srv = await server.handler(handler).hostname("127.0.0.1").port(port).serve()
    await srv.stop()


logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
factory = uvloop.new_event_loop if sys.argv[1] == "uvloop" else None
MODE = sys.argv[2]
_server.STOP_GRACE_SECONDS = 0.5
port = run_loop(main(), factory)
print("runner returned", flush=True)
probe = socket.socket()
probe.settimeout(5)
try:
    probe.connect(("127.0.0.1", port))
    print("still accepting", flush=True)
except OSError as exc:
    print("refused" if exc.errno == errno.ECONNREFUSED else f"connect: {exc}", flush=True)
finally:
    probe.close()
run_loop(listen_again(port), factory)
print("listened again", flush=True)
