"""``python -m brioche``: a demo server with an echo page and a chat room.

    python -m brioche                 # every address of this host, port 3000 ($PORT overrides it)
    python -m brioche --port 8080 --host 127.0.0.1 --log-level INFO
    python -m brioche --uvloop        # on uvloop's event loop
    python -m brioche --workers 4     # four processes on one port, chat rooms shared
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import signal
import sys
from dataclasses import dataclass
from importlib.resources import files
from typing import NoReturn

import brioche
from brioche import server, websocket
from brioche._server import BindError, _hang_up_stops, _http_url, _wildcard_note, run_loop

CHAT = "chat"


@dataclass(frozen=True)
class Session:
    """What each socket carries (``ws.data``): which demo it is for, and who it is."""

    room: str | None
    name: str
    server: brioche.Server[Session]


def _page() -> str:
    return files("brioche").joinpath("demo.html").read_text(encoding="utf-8")


def on_open(ws: brioche.WebSocket[Session]) -> None:
    session = ws.data
    if session.room is not None:
        ws.subscribe(session.room)
        ws.send(json.dumps({"system": f"you are {session.name}"}), compress=True)
        ws.publish(session.room, json.dumps({"system": f"{session.name} joined"}), compress=True)


def on_text(ws: brioche.WebSocket[Session], text: str) -> None:
    session = ws.data
    if session.room is None:
        ws.send(text, compress=True)
    else:
        # publish_to_self is on: the sender sees its own line, in order with everyone else's.
        ws.publish(session.room, json.dumps({"from": session.name, "text": text}), compress=True)


def on_bytes(ws: brioche.WebSocket[Session], data: bytes) -> None:
    ws.send_bytes(data, compress=True)


def on_close(ws: brioche.WebSocket[Session], code: int, reason: str) -> None:
    session = ws.data
    if session.room is not None:
        # The socket is closed, so the server publishes on its behalf.
        session.server.publish(
            session.room, json.dumps({"system": f"{session.name} left"}), compress=True
        )


def handler(request: server.Request, srv: brioche.Server[Session]) -> server.Response | None:
    if request.path == "/echo":
        return server.upgrade(srv, request, [], Session(None, "echo", srv), server.bad_request)
    if request.path == "/chat":
        name = "guest-" + brioche.random_uuid_v7()[-6:]
        return server.upgrade(srv, request, [], Session(CHAT, name, srv), server.bad_request)
    if request.path == "/":
        return server.html(_page())
    return server.not_found()


def config() -> server.Config[Session]:
    ws_config = (
        websocket.init()
        .on_open(on_open)
        .on_text(on_text)
        .on_bytes(on_bytes)
        .on_close(on_close)
        .publish_to_self(True)
        # Browsers offer it: messages to them are compressed (compress=True above).
        .per_message_deflate(True)
    )
    return server.handler(handler).websocket(ws_config)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m brioche",
        description="A demo server: an echo page at / (WebSocket /echo) and a chat room (/chat).",
        epilog="Press Ctrl+C to stop: open connections are closed with 1001.",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument(
        "--port",
        type=int,
        help="port to listen on; 0 picks a free one (default: $PORT, else 3000)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="level of the brioche loggers printed to stderr; INFO shows refused handshakes, "
        "protocol-error closes and idle timeouts (default: WARNING)",
    )
    parser.add_argument(
        "--uvloop", action="store_true", help="run on uvloop's event loop (pip install uvloop)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serve from this many processes on one port (SO_REUSEPORT), supervised by this one; "
        "publishes reach every worker (default: 1)",
    )
    args = parser.parse_args()
    if args.port is None:
        # Read here, not as the option's default: a bad $PORT must not break --help or --port.
        try:
            args.port = server._default_port()
        except ValueError as exc:
            parser.error(str(exc))
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    loop_factory = None
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            parser.error("--uvloop needs uvloop: pip install uvloop")
        loop_factory = uvloop.new_event_loop
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("brioche").setLevel(args.log_level)

    if args.workers > 1:

        def ready(port: int, pids: list[int]) -> None:
            on = "uvloop; " if args.uvloop else ""
            print(
                f"brioche demo listening on {_http_url('http', args.host, port)}{_wildcard_note(args.host)} "
                f"({args.workers} workers, pids {' '.join(map(str, pids))}; {on}Ctrl+C to stop)",
                flush=True,
            )

        # The workers unpickle the handlers by module name, and `spawn` does not re-import a
        # package's __main__: take them from this file imported under its own name.
        import importlib

        demo = importlib.import_module("brioche.__main__")
        config_ = demo.config().hostname(args.host).port(args.port).workers(args.workers)
        try:
            server._run_workers(config_, loop_factory, ready)
        except BindError as exc:
            _port_taken(exc)
        return

    async def run() -> None:
        # Ctrl+C and SIGTERM are handled by the loop, not left to KeyboardInterrupt: they stop
        # the server the same way on every loop and CPython, and a SIGINT the parent process
        # ignored (a shell's background job, some CI runners) still stops the demo. SIGHUP (its
        # terminal closed) too, as under `run()` and `--workers`, unless started ignoring it
        # (`nohup`): left to its default, it ended the demo with no close frame to anyone.
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_requested.set)
        if _hang_up_stops():
            loop.add_signal_handler(signal.SIGHUP, server._hang_up, stop_requested)
        srv = await config().hostname(args.host).port(args.port).serve()
        on = "uvloop; " if args.uvloop else ""
        print(f"brioche demo listening on {srv.url}{_wildcard_note(args.host)} ({on}Ctrl+C to stop)", flush=True)
        try:
            await stop_requested.wait()
        finally:
            await srv.stop(close_active_connections=True)

    try:
        run_loop(run(), loop_factory)
    except KeyboardInterrupt:
        pass
    except BindError as exc:
        _port_taken(exc)


def _port_taken(exc: BindError) -> NoReturn:
    """The demo cannot listen (its port 3000 is often taken): one line, not a traceback, and
    what to do when it is the port."""
    hint = "; choose another with --port (or $PORT)" if exc.errno == errno.EADDRINUSE else ""
    print(f"python -m brioche: {exc.strerror}{hint}", file=sys.stderr)
    raise SystemExit(1)


if __name__ == "__main__":
    main()
