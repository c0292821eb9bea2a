"""``run()`` whose ``on_close`` never returns, as one awaiting a call without a timeout.

``run_slow_close.py PORT GRACE WORKERS``: GRACE sets the stop's grace period (the private
``brioche._server.STOP_GRACE_SECONDS``, 10 s, too long for a test), in the supervisor and in each
worker, which imports this script too. Logs to stderr at INFO; prints what on_close went
through to stdout.
"""

import logging
import sys

import brioche
from brioche import _server, server, websocket
from slow_close import on_close_never_returning


def handler(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    return server.upgrade(srv, request, [], None, server.bad_request)


logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
_server.STOP_GRACE_SECONDS = float(sys.argv[2])
config = (
    server.handler(handler).websocket(websocket.init().on_close(on_close_never_returning))
    .hostname("127.0.0.1").port(int(sys.argv[1]))
)
if __name__ == "__main__":
    config.run(workers=int(sys.argv[3]))
    print("stopped cleanly", flush=True)
