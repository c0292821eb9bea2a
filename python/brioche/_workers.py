"""``run(config, workers=n)``: n processes serving one port, supervised by the calling one.

Each worker is a fresh interpreter (multiprocessing's ``spawn`` start method) with its own loop
and its own engine, listening on the same port with ``SO_REUSEPORT``: the kernel spreads new
connections over the workers. Never ``fork``: a forked child of a process whose tokio runtime
has started inherits its locks but not its threads. ``spawn`` also behaves the same on every
Python version and system; what it costs (an interpreter start and the app's imports, ~0.1-0.3 s
per worker) is paid at start and at each restart only.

The config reaches the workers pickled, so its handlers are pickled by reference: module-level
functions of an importable module (or of the script, which ``spawn`` re-imports without running
its ``if __name__ == "__main__":`` block). A lambda or a closure is refused before any worker
starts. That is the same contract as uvicorn's ``"module:app"`` import string, without a second
way to name an app.

Topics are shared through the engine's relay (``src/engine/ws/relay.rs``): every publish is also
written to each sibling over a Unix socket in a directory made for the run; no broker to run.

The parent (this module, in the process that called ``run``) starts no event loop and no engine:
it reserves the port, starts the workers, restarts one that dies (logging why, with a backoff)
or whose event loop stopped running (``Config.worker_timeout``: each worker's loop writes a byte
to the supervisor every second), and on SIGINT or SIGTERM (or SIGHUP without TLS) sends each
worker SIGTERM, which closes its connections with 1001 and stops as ``run()`` does in one
process (handlers still running after its grace period are cancelled); a worker still alive
STOP_TIMEOUT after the SIGTERM is killed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import faulthandler
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from brioche import _worker_stats
from brioche._server import (
    STOP_GRACE_SECONDS,
    BindError,
    _hang_up_stops,
    _log_hang_up,
    _reload_tls_logged,
    run_loop,
)

if TYPE_CHECKING:
    from brioche._server import Server
    from brioche.server import Config

__all__ = ["WorkerSlot", "run_workers"]

logger = logging.getLogger("brioche")

# A worker that served and dies within FAST_CRASH_SECONDS of reporting ready (or of listening,
# if it did not get as far as ready) crashed "fast": its restarts back off (0, then 0.25 s
# doubling, at most MAX_BACKOFF_SECONDS) and go on for as long as it keeps serving between
# them, since the other workers still serve and a client that can crash one (or block its loop
# past worker_timeout) must not take the whole port down. One that dies before it ever listens
# failed to start, however long its imports took: its restarts back off alike, and at
# GIVE_UP_AFTER in a row everything stops, as a worker that cannot start will not start by
# retrying. A failure of the first start (a certificate, an address) is raised by run() at once,
# as in one process.
FAST_CRASH_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 4.0
GIVE_UP_AFTER = 5
# A worker's exit status when ``run(config, workers=n)`` ran again in it, from the script's
# module level while ``spawn`` imported it: every restart would do the same.
EXIT_RUN_IN_IMPORT = 78
UNGUARDED_RUN = (
    "run(config, workers=n) ran again in each worker, as it imported the script: spawn "
    "imports the script in every worker to find its handlers, so the call must be under "
    'if __name__ == "__main__":'
)
# SIGTERM, then this long for the workers to stop, then SIGKILL. Each worker cancels its handlers
# still running once its grace period (STOP_GRACE_SECONDS, which covers the clients' close
# replies) has passed: the margin lets that cancel, and the worker's exit, come first.
STOP_TIMEOUT = STOP_GRACE_SECONDS + 5.0
# A worker reports ready once its siblings' publishes reach it and its own reach them, or after
# this long (a sibling may be down). Generous: at a cold start on a loaded machine a sibling's
# interpreter may take seconds to import, and a worker that reports ready before its links are
# up loses the first publishes that cross them (seen in CI with 5 s).
LINK_TIMEOUT = 30.0
# A serving worker's loop writes a byte to the supervisor this often (or four times per
# worker_timeout, if that is shorter): a late beat or two is no cause for a kill.
BEAT_SECONDS = 1.0
# How often a worker writes its counters (when they changed) for stats(all_workers=True).
STATS_SECONDS = 1.0
# What a worker writes on its pipe to the supervisor once listening, after the one framed
# ("listening", pid) message: a beat (with its stack watchdog armed, or without one: no usable
# stderr), ready (linked to its siblings), and stopping (its loop is about to end).
BEAT, BEAT_NO_WATCHDOG, READY, STOPPING = b".", b",", b"r", b"s"
# The longest the supervisor waits at once: a worker_timeout of days must not overflow the
# wait's milliseconds.
MAX_WAIT_SECONDS = 60.0


def _beat_interval(timeout: float) -> float:
    return min(BEAT_SECONDS, timeout / 4) if timeout > 0 else STATS_SECONDS


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSlot:
    """What a worker needs besides the config: which one it is and where its siblings are."""

    index: int
    relay_path: str
    relay_peers: tuple[str, ...]

    @property
    def directory(self) -> str:
        """The run's directory: every worker's relay socket and counters (``_worker_stats``)."""
        return os.path.dirname(self.relay_path)

    @property
    def workers(self) -> int:
        return len(self.relay_peers) + 1


class WorkersFailed(RuntimeError):
    """A worker kept failing to start: the server was stopped."""


class _WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker, as the ``__cause__`` of its copy that
    ``run`` raises (as ``concurrent.futures`` shows a child process's)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _backoff(failures: int) -> float:
    return 0.0 if failures <= 1 else min(MAX_BACKOFF_SECONDS, 0.25 * 2 ** (failures - 2))


def _start_error(failure: tuple[bytes | None, str, str]) -> BaseException:
    """The exception a worker could not start with, as its copy here, with the worker's
    traceback as its cause; a ``WorkersFailed`` naming it if it could not be copied."""
    payload, summary, tb = failure
    exc: BaseException | None = None
    if payload is not None:
        try:
            exc = pickle.loads(payload)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = WorkersFailed(f"a worker could not start: {summary}")
    exc.__cause__ = _WorkerTraceback(f"\n\n(in the worker)\n{tb}")
    return exc


class _MainFinder(pickle.Pickler):
    """A pickler that notes the functions and classes it pickles by reference to ``__main__``."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.in_main: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and obj.__module__ == "__main__":
            if obj.__qualname__ not in self.in_main:
                self.in_main.append(obj.__qualname__)
        return NotImplemented


def _stopped_by_signal(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, a debugger's ptrace stop), where /proc tells."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # no /proc (not Linux), or it just exited
        return False
    # After the command name, which may hold spaces and parentheses: the state.
    state = stat.rindex(b")") + 2
    return stat[state : state + 1] in (b"T", b"t")


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen on) ``host:port`` with SO_REUSEPORT, which the workers bind too.

    It picks the port when ``port`` is 0, fails early when the port is taken, and keeps the port
    for this run while no worker is listening (all restarting): a socket bound but not listening
    takes no connections.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # First without SO_REUSEPORT: Linux lets any socket of the same user that sets it join a
    # port's group, so a second run() on a port already served would have shared its
    # connections (and not its topics) instead of failing. SO_REUSEADDR still lets a restart
    # bind over the last run's connections in TIME_WAIT.
    with socket.socket(family, socket.SOCK_STREAM) as trial:
        trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        trial.bind((host, port))
        port = trial.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _reserve_ports(addresses: list[str], port: int) -> list[socket.socket]:
    """``_reserve_port`` on every address, not the first alone: a port taken on another (``::1``
    of ``localhost``) was a crash loop of the workers, each failing to bind it, instead of a
    ``BindError``. Port 0 is picked on the first address; taken on a later one, the pick is
    tried again (8 times in all, as the engine does in one process)."""
    attempts = 8
    for attempt in range(attempts):
        reserved: list[socket.socket] = []
        try:
            for address in addresses:
                want = reserved[0].getsockname()[1] if reserved else port
                try:
                    reserved.append(_reserve_port(address, want))
                except OSError as exc:
                    picked = port == 0 and bool(reserved)
                    if not (picked and exc.errno == errno.EADDRINUSE and attempt < attempts - 1):
                        raise BindError(
                            exc.errno, f"cannot listen on {address}:{want}: {exc.strerror or exc}"
                        ) from exc
                    break
            else:
                return reserved
        except BaseException:
            for sock in reserved:
                sock.close()
            raise
        for sock in reserved:
            sock.close()
    raise AssertionError("unreachable: the last attempt returns or raises")


@dataclasses.dataclass(frozen=True, slots=True)
class _LogSetup:
    """What a worker copies of the supervisor's logging: the levels of the root and ``brioche``
    loggers, and the first handler on the root logger (``logging.basicConfig``'s), if there is
    one: its formatter, and where it writes."""

    root_level: int
    brioche_level: int
    # The formatter as plain values (a class of the app's would have to unpickle in the worker
    # before any of its code runs, or the worker could never start): format, date format, style.
    # None: the supervisor has no handler, and the worker adds none either.
    formatter: tuple[str, str | None, str] | None
    handler_level: int = logging.NOTSET
    # The file of a plain `FileHandler` (`basicConfig(filename=...)`), and its encoding: the
    # workers append to it too, a line at a time. Otherwise a worker writes to stderr, which it
    # inherits, or to stdout when the supervisor's handler wrote there.
    file: tuple[str, str | None] | None = None
    stdout: bool = False
    # The supervisor's root logger has a NullHandler first.
    silent: bool = False


def _log_setup() -> _LogSetup:
    root = logging.getLogger()
    levels = (root.level, logging.getLogger("brioche").level)
    if not root.handlers:
        return _LogSetup(*levels, None)
    handler = root.handlers[0]
    if isinstance(handler, logging.NullHandler):
        # The app silences the root logger: so do the workers (with no handler at all, logging's
        # last resort would print their warnings).
        return _LogSetup(*levels, None, silent=True)
    styles: dict[object, str] = {cls: style for style, (cls, _) in logging._STYLES.items()}
    f = handler.formatter or logging.Formatter()
    formatter = (f._fmt or "%(message)s", f.datefmt, styles.get(type(f._style), "%"))
    # Any other class (a rotating file, a colour or a rich one) may not survive the copy; its
    # format does, and stderr is where a worker's lines then go.
    if type(handler) is logging.FileHandler:
        return _LogSetup(
            *levels, formatter, handler.level, file=(handler.baseFilename, handler.encoding)
        )
    stdout = isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout
    return _LogSetup(*levels, formatter, handler.level, stdout=stdout)


def _copy_log_setup(setup: _LogSetup) -> None:
    """In a worker whose imports configured no logging: the supervisor's, as far as it goes.

    ``spawn`` starts the worker's interpreter afresh, and an app that sets up logging under
    ``if __name__ == "__main__":`` (the usual place, and the demo's) had it only in the
    supervisor: the workers' INFO lines were lost and their warnings printed bare (also with
    ``basicConfig(filename=...)``, whose handler was not copied).
    """
    if logging.getLogger().handlers:
        return
    if setup.silent:
        logging.getLogger().addHandler(logging.NullHandler())
    elif setup.formatter is not None:
        fmt, datefmt, style = setup.formatter
        handler: logging.Handler | None = None
        if setup.file is not None:
            try:
                handler = logging.FileHandler(setup.file[0], encoding=setup.file[1])
            except OSError:  # pragma: no cover - the supervisor opened it a moment ago
                handler = None
        if handler is None:
            handler = logging.StreamHandler(sys.stdout if setup.stdout else None)
        try:
            handler.setFormatter(logging.Formatter(fmt, datefmt, style))  # type: ignore[arg-type]
        except ValueError:  # pragma: no cover - a format its own style accepted
            pass
        handler.setLevel(setup.handler_level)
        logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(setup.root_level)
    logging.getLogger("brioche").setLevel(setup.brioche_level)


def _report_failure(ready: multiprocessing.connection.Connection, exc: BaseException) -> None:
    """Send the supervisor why this worker could not start, instead of its traceback on stderr."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    payload: bytes | None
    try:
        payload = pickle.dumps(exc)
        # Some exceptions pickle, then fail to unpickle (required arguments), or come back
        # other than they were (an __init__ that formats its message formats it twice): the
        # supervisor then raises WorkersFailed with the summary instead.
        copy = pickle.loads(payload)
        if type(copy) is not type(exc) or str(copy) != str(exc):
            payload = None
    except Exception:
        payload = None
    try:
        ready.send(("failed", payload, f"{type(exc).__name__}: {exc}", tb))
    except OSError:  # pragma: no cover - the supervisor is gone
        pass


def _worker_main(
    pickled: bytes,
    slot: WorkerSlot,
    ready: multiprocessing.connection.Connection,
    log_setup: _LogSetup,
) -> None:
    _copy_log_setup(log_setup)
    # Ctrl+C reaches the whole process group; the parent turns it into one SIGTERM per worker,
    # so each worker has a single way to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGHUP is the supervisor's "reload the certificate": until the loop handles it, a worker
    # still starting must not die of it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Unpickled here, not by multiprocessing before this runs: an app module that fails to
    # import is then reported as any other failure to start.
    try:
        config, loop_factory = pickle.loads(pickled)
    except Exception as exc:
        _report_failure(ready, exc)
        raise SystemExit(1) from None
    if not run_loop(_serve_worker(config, slot, ready), loop_factory):
        raise SystemExit(1)


async def _serve_worker(
    config: Config[Any], slot: WorkerSlot, ready: multiprocessing.connection.Connection
) -> bool:
    """Serve until SIGTERM; False if the server could not start (reported to the supervisor)."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop_requested.set)
    # A supervisor killed outright (SIGKILL, the OOM killer) sends no SIGTERM: without this its
    # workers would go on serving the port, orphans nothing restarts or stops, alongside the
    # next run()'s workers (SO_REUSEPORT). Its end of the sentinel pipe closes as it dies.
    parent = multiprocessing.parent_process()
    if parent is not None:
        loop.add_reader(parent.sentinel, _orphaned, loop, parent, stop_requested)
    try:
        srv = await config.serve()
    except Exception as exc:
        _report_failure(ready, exc)
        return False
    if config.tls_files is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload_tls_logged, srv)
    snapshots = _worker_stats.Snapshots(slot.directory, slot.index)
    # Listening from here (the port is shared; the engine accepts clients once the siblings'
    # links are up, or a second on): the supervisor watches the loop from now on, the wait for
    # the links below included, as a handler may block it there too.
    try:
        ready.send(("listening", os.getpid()))
    except OSError:
        pass  # the supervisor is gone: _orphaned stops this worker, gracefully
    ticker = _Ticker(loop, srv, snapshots, config.worker_timeout_seconds, ready)
    try:
        ticker.tick()
        siblings = len(slot.relay_peers)
        deadline = loop.time() + LINK_TIMEOUT
        # Bounded poll: the relay's links come up in the engine's threads, with no event to await.
        # A SIGTERM meanwhile (a sibling that died starting never links) ends the wait: this
        # worker serves a second on at the latest, and must stop as gracefully as any.
        while (
            srv._engine.relay_links != (siblings, siblings)
            and loop.time() < deadline
            and not stop_requested.is_set()
        ):
            await asyncio.sleep(0.005)
        ticker.report(READY)
        await stop_requested.wait()
    finally:
        try:
            # Beating on while stopping: a stop stuck in a handler is as deaf as any.
            await srv._stop_gracefully()
        finally:
            # Before anything else can run on the loop: no stacks dumped, nor counters
            # written, after this worker's end.
            ticker.cancel()
        # The engine removed this worker's socket as it stopped. A supervisor killed outright
        # cannot remove the directory: the last of its workers to stop does (a sibling's socket
        # or counters still there keep it). Not while the supervisor lives: it would restart a
        # worker that stopped (a SIGTERM of its own), which binds its socket there, and starts
        # its counters from what this one counted to the end.
        if parent is not None and not parent.is_alive():
            snapshots.remove()
            try:
                os.rmdir(slot.directory)
            except OSError:
                pass
        else:
            snapshots.write(dict(srv.stats()))
    return True


class _Ticker:
    """A serving worker's timer on its loop: its counters for stats(all_workers=True), and,
    with a worker_timeout, its heartbeat to the supervisor and the watchdog of its stacks.

    A timer on the loop, not a thread: a thread would go on beating while the loop is stuck.
    The watchdog is faulthandler's ``dump_traceback_later``, re-armed at each beat: its own C
    thread writes every thread's Python stack to stderr once the loop has not re-armed it for
    worker_timeout, which the supervisor's kill follows (it allows one more beat first). It is
    process-wide: while it runs it replaces an app's own ``dump_traceback_later``.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, srv: Server[Any], snapshots: _worker_stats.Snapshots,
        timeout: float, pipe: multiprocessing.connection.Connection,
    ) -> None:
        self.loop, self.srv, self.snapshots, self.timeout = loop, srv, snapshots, timeout
        self.interval = _beat_interval(timeout)
        # Raw bytes from here on, never blocking the loop (see BEAT).
        os.set_blocking(pipe.fileno(), False)
        self.pipe: multiprocessing.connection.Connection | None = pipe
        self.watchdog = timeout > 0
        self.unsent = b""
        self.handle: asyncio.TimerHandle | None = None
        self.written_at = float("-inf")

    def report(self, what: bytes) -> None:
        """Tell the supervisor ``what`` (READY, STOPPING), at the next tick if the pipe is full."""
        self.unsent += what
        self._send()

    def _send(self) -> None:
        if self.pipe is None or not self.unsent:
            return
        try:
            self.unsent = self.unsent[os.write(self.pipe.fileno(), self.unsent) :]
        except BlockingIOError:
            pass  # the supervisor has beats of this worker to read: it knows its loop runs
        except OSError:
            self.pipe = None  # the supervisor is gone: _orphaned stops this worker

    def tick(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        if self.watchdog:
            try:
                faulthandler.dump_traceback_later(self.timeout)
            except Exception:  # no stderr with a file descriptor to write to
                self.watchdog = False
        if self.timeout > 0:
            self.unsent += BEAT if self.watchdog else BEAT_NO_WATCHDOG
        self._send()
        now = self.loop.time()
        if now - self.written_at >= STATS_SECONDS:
            self.written_at = now
            self.snapshots.write(dict(self.srv.stats()))
        self.handle = self.loop.call_later(self.interval, self.tick)

    def cancel(self) -> None:
        """The loop is about to end: no more beats, stacks or counters from it."""
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if self.watchdog:
            faulthandler.cancel_dump_traceback_later()
            self.watchdog = False
        self.report(STOPPING)


def _orphaned(loop: asyncio.AbstractEventLoop, parent: BaseProcess, stop_requested: asyncio.Event) -> None:
    loop.remove_reader(parent.sentinel)
    logger.warning("the supervisor (pid %s) is gone: stopping this worker", parent.pid)
    stop_requested.set()


@dataclasses.dataclass(slots=True)
class _Worker:
    slot: WorkerSlot
    process: BaseProcess | None = None
    # Its pipe to the supervisor: framed messages until it listens ("failed", or "listening"),
    # single bytes after (see BEAT).
    pipe: multiprocessing.connection.Connection | None = None
    # When it last reported ready.
    ready_at: float = 0.0
    # Crashes in a row within FAST_CRASH_SECONDS of being ready, and failures in a row to start.
    fast_crashes: int = 0
    failed_starts: int = 0
    restart_at: float | None = None
    restarts: int = 0
    # Reported ready since its last start (linked to its siblings).
    serving: bool = False
    # Listening (serving the port) since its last start, and since when: from then on it is
    # watched, and a death is a crash, not a failure to start.
    listening: bool = False
    listening_at: float = 0.0
    # Why it could not start, as it reported: the exception pickled (None if it could not be),
    # its one-line summary and its traceback.
    failure: tuple[bytes | None, str, str] | None = None
    # Once listening: when the last byte came on its pipe, since when its silence is suspect
    # (one more beat is allowed for), whether its last beat had the stack watchdog armed,
    # whether it said it is stopping, and whether it was killed for its silence.
    alive_at: float = 0.0
    suspect_at: float | None = None
    watchdog: bool = False
    stopping: bool = False
    killed: bool = False


def run_workers(
    config: Config[Any],
    workers: int,
    addresses: list[str],
    port: int,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None,
    on_ready: Callable[[int, list[int]], None] | None = None,
) -> None:
    """Serve ``config`` from ``workers`` processes until SIGINT or SIGTERM; see the module doc.

    ``addresses`` are what the hostname resolves to: each is reserved, on one port (the one
    picked on the first when ``port`` is 0), as each worker binds them all.
    ``on_ready(port, pids)`` is called once, when every worker first reported ready, with the
    workers' pids (it logs at INFO when not given).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # In a worker, importing the script (multiprocessing sets `_inheriting` for as long as
        # the child prepares, as its own "bootstrapping phase" check reads it). Quietly: the
        # supervisor says why, once; multiprocessing's error, raised further on, was one
        # traceback per worker and restart (hundreds of lines) ending in a crash loop.
        raise SystemExit(EXIT_RUN_IN_IMPORT)
    pickler = _MainFinder(io.BytesIO())
    try:
        pickler.dump((config, loop_factory))
    except Exception as exc:
        raise TypeError(
            "run(..., workers=n) starts each worker from a pickled config: its handlers must be "
            "module-level functions of an importable module (or of the script), not lambdas or "
            f"closures ({exc})"
        ) from exc
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if pickler.in_main and (
        getattr(main, "__file__", None) is None
        or (spec is not None and (spec.name == "__main__" or spec.name.endswith(".__main__")))
    ):
        # `spawn` imports the script again in each worker, but not a package's __main__.py
        # (`python -m mypkg`), a directory's or a zipapp's (`python app/`, `python app.pyz`),
        # nor `python -c` or a REPL: each worker then failed to unpickle.
        where = f" ({spec.name})" if spec is not None and spec.name != "__main__" else ""
        raise TypeError(
            f"run(..., workers=n): {', '.join(pickler.in_main)} "
            f"{'is' if len(pickler.in_main) == 1 else 'are'} defined in __main__{where}, which "
            "the workers cannot import: define the handlers in an importable module (as "
            "mypkg/app.py) and import them"
        )
    reserved = _reserve_ports(addresses, port)
    port = reserved[0].getsockname()[1]
    try:
        relay_dir = tempfile.mkdtemp(prefix="brioche-relay-")
        try:
            paths = _relay_paths(relay_dir, workers)
            slots = [
                WorkerSlot(i, paths[i], tuple(p for p in paths if p != paths[i]))
                for i in range(workers)
            ]
            worker_config = dataclasses.replace(config, port_number=port, workers_count=1)
            _Supervisor(worker_config, slots, port, loop_factory, on_ready).run()
        finally:
            shutil.rmtree(relay_dir, ignore_errors=True)
    finally:
        for sock in reserved:
            sock.close()


# The size of `sockaddr_un.sun_path`, its terminating NUL included.
_SUN_PATH = 108 if sys.platform.startswith("linux") else 104


def _relay_paths(relay_dir: str, workers: int) -> list[str]:
    """Each worker's relay socket in ``relay_dir``, or a ``ValueError`` naming the directory if
    a path is too long for a unix socket: each worker failed to bind, with an error that named
    neither the path nor where it comes from (the temporary directory: TMPDIR)."""
    paths = [os.path.join(relay_dir, f"{i}.sock") for i in range(workers)]
    longest = max(len(os.fsencode(path)) for path in paths)
    if longest >= _SUN_PATH:
        raise ValueError(
            f"run(..., workers=n) relays publishes between the workers over unix sockets in "
            f"{relay_dir}, and their paths are too long ({longest} bytes; a unix socket's path "
            f"is at most {_SUN_PATH - 1}): set TMPDIR (or tempfile.tempdir) to a shorter "
            "directory"
        )
    return paths


class _Supervisor:
    def __init__(
        self,
        config: Config[Any],
        slots: list[WorkerSlot],
        port: int,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None,
        on_ready: Callable[[int, list[int]], None] | None,
    ) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.config = config
        self.workers = [_Worker(slot) for slot in slots]
        self.port = port
        self.loop_factory = loop_factory
        self.on_ready = on_ready
        self.timeout = config.worker_timeout_seconds
        self.interval = _beat_interval(self.timeout)
        self.all_ready = False
        self.signals = 0
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals += 1
        try:
            os.write(self.wake_w, b"x")
        except OSError:  # pragma: no cover - the pipe is full: a wake-up is pending anyway
            pass

    def _on_hang_up(self, signum: int, frame: object) -> None:
        """SIGHUP without TLS: nothing to reload, so a stop, as SIGTERM's."""
        _log_hang_up()
        self._on_signal(signum, frame)

    def _on_hup(self, signum: int, frame: object) -> None:
        """Each worker reloads its TLS certificate (``reload_tls``)."""
        for worker in self.workers:
            if worker.process is not None and worker.process.pid is not None:
                try:
                    os.kill(worker.process.pid, signal.SIGHUP)
                except ProcessLookupError:  # pragma: no cover - it just exited
                    pass

    def run(self) -> None:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        # Left to its default, SIGHUP killed the supervisor alone: no 1001 for the clients,
        # workers left to notice the orphaning, the relay's directory left.
        if self.config.tls_files is not None:
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
        elif _hang_up_stops():
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hang_up)
        try:
            for worker in self.workers:
                self._start(worker)
            self._supervise()
        finally:
            try:
                self._stop_all()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                os.close(self.wake_r)
                os.close(self.wake_w)

    def _start(self, worker: _Worker) -> None:
        config = dataclasses.replace(self.config, worker_slot=worker.slot)
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_worker_main,
            args=(pickle.dumps((config, self.loop_factory)), worker.slot, writer, _log_setup()),
            name=f"brioche-worker-{worker.slot.index}",
        )
        process.start()
        writer.close()
        worker.process, worker.pipe = process, reader
        worker.serving = worker.listening = False
        worker.failure = None
        worker.restart_at = None
        worker.suspect_at = None
        worker.watchdog = worker.stopping = worker.killed = False

    def _supervise(self) -> None:
        while not self.signals:
            waitables: list[Any] = [self.wake_r]
            for worker in self.workers:
                if worker.process is not None:
                    waitables.append(worker.process.sentinel)
                if worker.pipe is not None:
                    waitables.append(worker.pipe)
            due = [w.restart_at for w in self.workers if w.restart_at is not None]
            due += [at for w in self.workers if (at := self._silence_due(w)) is not None]
            asked = min(MAX_WAIT_SECONDS, max(0.0, min(due) - time.monotonic())) if due else None
            multiprocessing.connection.wait(waitables, asked)
            if self.signals:
                return
            for worker in self.workers:
                self._check(worker)

    def _silence_due(self, worker: _Worker) -> float | None:
        """When the supervisor must next look at ``worker``'s heartbeat, if it has one."""
        if worker.pipe is None or not worker.listening or worker.killed or self.timeout == 0:
            return None
        if worker.suspect_at is None:
            return worker.alive_at + self.timeout
        return worker.suspect_at + self.interval

    def _check(self, worker: _Worker) -> None:
        if worker.pipe is not None and not worker.listening and worker.pipe.poll():
            self._read_message(worker)
        if worker.pipe is not None and worker.listening:
            self._read_beats(worker)
        process = worker.process
        if process is not None and not process.is_alive():
            process.join()
            worker.process = None
            self._close_pipe(worker)
            # Its open connections and the like are gone with it, before a successor says so.
            _worker_stats.zero_gauges(worker.slot.directory, worker.slot.index)
            # Only from a worker that never got as far as serving: 78 is also EX_CONFIG, which
            # an app may exit with for reasons of its own.
            if not worker.listening and process.exitcode == EXIT_RUN_IN_IMPORT:
                logger.error("%s", UNGUARDED_RUN)
                raise WorkersFailed(UNGUARDED_RUN)
            if not worker.listening and worker.failure is not None and not self.all_ready:
                # The first start: what one process would raise, raised once (the siblings are
                # stopped as run() unwinds), not a restart loop of tracebacks.
                raise _start_error(worker.failure)
            if worker.listening:
                worker.failed_starts = 0
                lived = time.monotonic() - (worker.ready_at if worker.serving else worker.listening_at)
                worker.fast_crashes = worker.fast_crashes + 1 if lived < FAST_CRASH_SECONDS else 1
                delay = _backoff(worker.fast_crashes)
                why = _exit_reason(process.exitcode)
            else:
                worker.failed_starts += 1
                delay = _backoff(worker.failed_starts)
                why = (
                    f"{_exit_reason(process.exitcode)} before it was ready"
                    if worker.failure is None
                    else f"an error before it was ready: {worker.failure[1]}"
                )
                if worker.failure is not None:
                    logger.debug("worker %d's error:\n%s", worker.slot.index, worker.failure[2])
                if worker.failed_starts >= GIVE_UP_AFTER:
                    logger.error(
                        "worker %d (pid %d) exited with %s, %d times in a row: stopping the server",
                        worker.slot.index, process.pid, why, worker.failed_starts,
                    )
                    raise WorkersFailed(
                        f"worker {worker.slot.index} failed to start {worker.failed_starts} "
                        "times in a row"
                    )
            logger.warning(
                "worker %d (pid %d) exited with %s; restarting it%s",
                worker.slot.index, process.pid, why, f" in {delay:.2f} s" if delay else "",
            )
            worker.restart_at = time.monotonic() + delay
        if process is not None and worker.process is not None:
            self._check_silence(worker, process)
        if worker.restart_at is not None and time.monotonic() >= worker.restart_at:
            worker.restarts += 1
            self._start(worker)

    def _read_message(self, worker: _Worker) -> None:
        """The one framed message a worker sends: why it could not start, or that it listens."""
        assert worker.pipe is not None
        try:
            message = worker.pipe.recv()
        except EOFError:
            self._close_pipe(worker)  # it died before it listened: its sentinel says so
            return
        if message[0] == "listening":
            worker.listening, worker.listening_at = True, time.monotonic()
            worker.alive_at = worker.listening_at
            os.set_blocking(worker.pipe.fileno(), False)
        else:
            worker.failure = message[1:]
            self._close_pipe(worker)

    def _close_pipe(self, worker: _Worker) -> None:
        if worker.pipe is not None:
            worker.pipe.close()
            worker.pipe = None

    def _read_beats(self, worker: _Worker) -> None:
        assert worker.pipe is not None
        try:
            beats = os.read(worker.pipe.fileno(), 4096)
        except BlockingIOError:
            return
        if beats:
            worker.alive_at = time.monotonic()
            worker.suspect_at = None
            last_beat = max(beats.rfind(BEAT), beats.rfind(BEAT_NO_WATCHDOG))
            if last_beat >= 0:
                worker.watchdog = beats[last_beat : last_beat + 1] == BEAT
            if STOPPING in beats:
                worker.stopping = True
            if READY in beats and not worker.serving:
                worker.serving = True
                worker.ready_at = worker.alive_at
                self._ready(worker)
        else:
            # The worker's end closed: it exited, and its sentinel says how.
            self._close_pipe(worker)

    def _check_silence(self, worker: _Worker, process: BaseProcess) -> None:
        """Kill a worker whose loop has not beaten for worker_timeout and one beat more.

        The beat more: a supervisor stopped with its workers (Ctrl+Z, a frozen container)
        runs again before they do, and finds every beat late.
        """
        due = self._silence_due(worker)
        now = time.monotonic()
        if due is None or now < due or process.pid is None:
            return
        if worker.suspect_at is None:
            worker.suspect_at = now
            return
        if _stopped_by_signal(process.pid):
            # Its watchdog thread is stopped too: no stack to point at.
            logger.error(
                "worker %d (pid %d) has been stopped (SIGSTOP, a debugger) for %.1f s, so its "
                "clients got no answer: killing it (worker_timeout(0) while debugging one)",
                worker.slot.index, process.pid, now - worker.alive_at,
            )
        elif worker.stopping:
            # Its loop ended: what holds it is its exit (multiprocessing joins its non-daemon
            # threads while the process object, and so this pipe, is still open).
            logger.error(
                "worker %d (pid %d) stopped, but has not exited %.1f s later: killing it",
                worker.slot.index, process.pid, now - worker.alive_at,
            )
        else:
            logger.error(
                "worker %d (pid %d) has not run its event loop for %.1f s (a handler blocking "
                "it?), so its clients got no answer%s: killing it",
                worker.slot.index, process.pid, now - worker.alive_at,
                "; its Python stack is on its stderr" if worker.watchdog else "",
            )
        worker.killed = True
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # pragma: no cover - it just exited: its sentinel says so
            pass

    def _ready(self, worker: _Worker) -> None:
        assert worker.process is not None
        if worker.restarts:
            logger.info("worker %d restarted (pid %d)", worker.slot.index, worker.process.pid)
        if self.all_ready or any(not w.serving and w is not worker for w in self.workers):
            return
        self.all_ready = True
        pids = [w.process.pid for w in self.workers if w.process is not None and w.process.pid]
        if self.on_ready is not None:
            self.on_ready(self.port, pids)
        else:
            logger.info(
                "%d workers listening on port %d (pids %s)",
                len(self.workers), self.port, ", ".join(map(str, pids)),
            )

    def _drain_wake_ups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _stop_all(self) -> None:
        """SIGTERM each worker, wait for them up to STOP_TIMEOUT, then SIGKILL what is left.

        More signals meanwhile change nothing: one Ctrl+C or `kill` is often delivered twice
        (to the process and to its group, as `timeout` and terminals do).
        """
        running = [w.process for w in self.workers if w.process is not None]
        for process in running:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while running and time.monotonic() < deadline:
            self._drain_wake_ups()
            multiprocessing.connection.wait(
                [p.sentinel for p in running] + [self.wake_r], deadline - time.monotonic()
            )
            running = [p for p in running if p.is_alive()]
        for process in running:
            logger.warning(
                "worker (pid %d) did not stop within %.0f s: killing it", process.pid, STOP_TIMEOUT
            )
            process.kill()
        for worker in self.workers:
            if worker.process is not None:
                worker.process.join()
                worker.process = None
            self._close_pipe(worker)
