"""Shared fixtures: a real brioche server on 127.0.0.1:0 inside the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import settings
from websockets.asyncio.client import ClientConnection, connect

import brioche
from brioche import server, websocket

ServeFn = Callable[..., Awaitable[brioche.Server[Any]]]

# Hypothesis: the same examples on every run by default (`make test`, CI), so a failure there is
# reproducible and a pass means the same thing each time; `make fuzz` selects "fuzz", random and
# different on each run. BRIOCHE_HYPOTHESIS_PROFILE picks one.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("fuzz", derandomize=False, database=None)
settings.load_profile(os.environ.get("BRIOCHE_HYPOTHESIS_PROFILE", "ci"))

ASYNCIO_ONLY: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
BOTH_LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    **ASYNCIO_ONLY,
    "uvloop": uvloop.new_event_loop,
}


# An app as a user runs it: `config` served under `asyncio.run()` until the process is told to
# stop, its port printed first and "main finally" last (`app_process`).
APP_MAIN = (
    "async def main():\n"
    "    try:\n"
    "        async with config.serve() as srv:\n"
    "            print('port', srv.port, flush=True)\n"
    "            await asyncio.get_running_loop().create_future()\n"
    "    finally:\n"
    "        print('main finally', flush=True)\n"
    "asyncio.run(main())\n"
)


@contextlib.contextmanager
def app_process(directory: Path, app: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Run ``app`` (imports, handlers and a ``config``) then ``APP_MAIN`` as a program of its
    own; yields the process, its output unread but for the port line, and the port. Killed at
    the end if it is still running."""
    script = directory / "app.py"
    script.write_text(app + APP_MAIN)
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline().split()
            assert first[:1] == ["port"], (first, proc.stderr.read() if proc.stderr else "")
            yield proc, int(first[1])
        finally:
            proc.kill()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests marked ``both_loops`` (the backpressure, drain, flow-control, stop and close
    modules) run on the default asyncio loop and on uvloop, as ``[asyncio]`` and ``[uvloop]``;
    the others on the default loop only (their ids keep no suffix)."""
    return BOTH_LOOPS if item.get_closest_marker("both_loops") is not None else ASYNCIO_ONLY


async def upgrade_ws_path(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
    """Upgrade ``/ws`` (with the query string as ``ws.data``); answer anything else with text."""
    if request.path == "/ws":
        return server.upgrade(srv, request, [], request.query or None, server.bad_request)
    return server.text("ok")


def server_starter(started: list[brioche.Server[Any]]) -> ServeFn:
    """A ``serve`` function that appends each server it starts to ``started``."""

    async def start(
        ws_config: websocket.Config[Any] | None = None,
        handler: server.Handler[Any] = upgrade_ws_path,
        **settings: Any,
    ) -> brioche.Server[Any]:
        """``settings`` name server.Config setters: ``max_connections=2``, ``handshake_timeout=1``;
        a tuple is several arguments: ``tls=(cert_file, key_file)``."""
        config = server.handler(handler).hostname("127.0.0.1").port(0)
        if ws_config is not None:
            config = config.websocket(ws_config)
        for name, value in settings.items():
            config = getattr(config, name)(*value) if isinstance(value, tuple) else getattr(config, name)(value)
        srv = await config.serve()
        started.append(srv)
        return srv

    return start


@pytest.fixture
async def started() -> AsyncIterator[list[brioche.Server[Any]]]:
    """The servers a test started (see ``serve_config``); all are stopped after it."""
    servers: list[brioche.Server[Any]] = []
    yield servers
    for srv in servers:
        await asyncio.wait_for(srv.stop(close_active_connections=True), 10)


async def serve_config(config: server.Config[Any], started: list[brioche.Server[Any]]) -> brioche.Server[Any]:
    """Serve a config a test made whole (a Unix socket, a socket handed in, a sample's app)."""
    srv = await config.serve()
    started.append(srv)
    return srv


@pytest.fixture
def serve(started: list[brioche.Server[Any]]) -> ServeFn:
    """``await serve(ws_config, handler=..., **config)`` starts a server; all are stopped after."""
    return server_starter(started)


def log_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[int, str]]:
    """The level and message of each line ``caplog`` caught from the logger ``name``."""
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == name]


_ports_given: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a subprocess told which port to take, and not one
    given before in this run: the kernel may hand a port it has just handed out (and that nobody
    has bound yet) again, and a cluster asks for a dozen before its nodes start."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port
    raise AssertionError("the kernel gave only ports this run had been given already")


def ignore_sigint() -> None:
    """A ``preexec_fn``: the child starts with SIGINT ignored, as a shell's background job (and
    some CI runners) start it; a server that handles the signal itself must still stop on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def hangup_by_default() -> None:
    """A ``preexec_fn``: the child starts with SIGHUP's default action, as from a terminal,
    whatever this process inherited (under ``nohup`` it is ignored, and a server keeps it so)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def status_kib(field: str, pid: int | str = "self") -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def kill_if_running(proc: asyncio.subprocess.Process) -> None:
    """Kill ``proc`` if it is still running: the end of a test that failed before it exited."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+: ``5`` in clear_refs); whether it could."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


async def wait_listening(port: int, proc: asyncio.subprocess.Process | None = None) -> None:
    """Until something accepts on 127.0.0.1:``port`` (about 10 s at most); fails early if
    ``proc`` exits first."""
    for _ in range(200):
        if proc is not None and proc.returncode is not None:
            raise AssertionError(f"exited with {proc.returncode} before listening on {port}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError(f"nothing listening on {port}")


def ws_url(srv: brioche.Server[Any], path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{srv.port}{path}"


async def echo(client: ClientConnection, message: str, timeout: float = 5) -> None:
    """Send ``message`` and expect it straight back."""
    await client.send(message)
    assert await asyncio.wait_for(client.recv(), timeout) == message


@pytest.fixture
async def bystander_of() -> AsyncIterator[Callable[[brioche.Server[Any]], Awaitable[ClientConnection]]]:
    """``bystander = await bystander_of(srv)``: a well-behaved client, echoing before the test."""
    clients: list[ClientConnection] = []

    async def open_one(srv: brioche.Server[Any]) -> ClientConnection:
        client = await connect(ws_url(srv, "/ws?bystander"), open_timeout=5, ping_interval=None)
        clients.append(client)
        await echo(client, "bystander before")
        return client

    yield open_one
    for client in clients:
        await client.close()


class Recorder:
    """Collects what handlers saw, and lets a test wait for it without sleeping."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._changed = asyncio.Event()

    def add(self, *event: Any) -> None:
        self.events.append(event)
        self._changed.set()

    def poke(self) -> None:
        """Wake waiters without recording anything (for counters kept elsewhere)."""
        self._changed.set()

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [e[1:] for e in self.events if e[0] == kind]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        async def loop() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
