"""The running server: the asyncio side of the bridge.

The Rust engine owns the sockets. It pushes events into one queue per server and makes an eventfd
readable when the queue goes from empty to non-empty; the loop calls ``_on_wake``, which takes a
bounded batch of events and dispatches each to its handler.

Handlers for one connection run one at a time, in order, in that connection's own
``contextvars.Context``. A plain handler is a direct call. An ``async`` handler runs in an
``asyncio.Task`` from its first line (an eager task on 3.12+, so one that finishes without
suspending costs no loop iteration); while that task is suspended, the connection's later events
are parked behind it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import re
import select
import signal
import sys
import threading
import types
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator, Iterator
from functools import partial
from inspect import CO_COROUTINE, CORO_CREATED, GEN_CREATED, getcoroutinestate, getgeneratorstate, isawaitable
from time import perf_counter
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeAlias, TypedDict, TypeVar, final, overload
from urllib.parse import quote

from brioche import _brioche, _worker_stats
from brioche._brioche import BriocheError, Engine, PendingRequest, WebSocket
from brioche._http import (
    HeaderItems, Request, Response, SocketAddress, header_pairs, internal_error, text
)
from brioche._buffer import Buffer
from brioche.websocket import Config as WsConfig
from brioche.websocket import _LABELS, DeflateOptions, SendStatus, _check_bool, _check_seconds

if TYPE_CHECKING:
    # brioche.server imports this module, and binds its Config here itself once it is defined.
    from brioche.server import Config as Config

__all__ = ["BindError", "Handler", "Server"]

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("brioche")

_OPEN = _brioche.EVENT_OPEN
_TEXT = _brioche.EVENT_TEXT
_BYTES = _brioche.EVENT_BYTES
_DRAIN = _brioche.EVENT_DRAIN
_CLOSE = _brioche.EVENT_CLOSE
_FAIL = _brioche.EVENT_FAIL
_PING = _brioche.EVENT_PING
_PONG = _brioche.EVENT_PONG
_TEXT_RUN = _brioche.EVENT_TEXT_RUN
_BYTES_RUN = _brioche.EVENT_BYTES_RUN
_REQUEST = _brioche.EVENT_REQUEST
_STOPPED = _brioche.EVENT_STOPPED
_LINKS_ENDED = _brioche.EVENT_LINKS_ENDED
_LOG = _brioche.EVENT_LOG
_EVENT_NAMES = {_OPEN: "on_open", _TEXT: "on_text", _BYTES: "on_bytes", _DRAIN: "on_drain",
                _CLOSE: "on_close", _PING: "on_ping", _PONG: "on_pong"}
_CLOSED = 3
# The message kind of each run kind.
_KIND_OF_RUN = {_TEXT_RUN: _TEXT, _BYTES_RUN: _BYTES}
# A Task's `_state` (asyncio.base_futures' values, the C Task's too).
_PENDING = "PENDING"
_FINISHED = "FINISHED"
# What a plain handler may raise and the dispatch goes on after, reported (`_handler_failed`);
# anything else (KeyboardInterrupt, SystemExit, ...) propagates once reported.
_REPORTED = (Exception, asyncio.CancelledError)
# What the engine writes in a 101 itself: given again, the client would see two values, or an
# extension the server never negotiated (and fail the connection at its first message).
_HANDSHAKE_HEADERS = frozenset((
    "upgrade", "connection", "sec-websocket-accept", "sec-websocket-extensions",
    "content-length", "transfer-encoding",
))

# The websocket settings the engine fixes when the server starts (all but the handlers), by the
# setter that sets them: `reload` refuses a config that differs in one of them rather than
# ignore it.
_FIXED_AT_START = {setter: field for setter, field in _LABELS.items() if not setter.startswith("on_")}

# What run() (and each worker of run(workers=n)) gives stop(close_active_connections=True) after
# SIGINT or SIGTERM before it cancels the handler tasks still running, on_close's included: a
# handler awaiting something that never answers (a call without a timeout) must not keep the
# process alive past what a process manager waits before its SIGKILL. Ten seconds leave room for
# the clients' close replies (the core waits up to 5 s for them) and for on_close's usual work.
STOP_GRACE_SECONDS = 10.0

# A connection whose handler is suspended may have this many events parked behind it before the
# engine stops reading from its socket (TCP backpressure to that client only).
PARKED_EVENTS_LIMIT = 64

# One wake-up dispatches the events whose handlers fit in about BATCH_SECONDS (or in as long as
# the previous batch's writes took, if longer) at the pace of the previous batch, then the loop
# runs its other callbacks and due timers. It starts at FIRST_BATCH_EVENTS, shrinks at once to
# what fits, and grows (at most twofold) only after a full batch, up to MAX_BATCH_EVENTS. Sized
# by time, not by a fixed count: with fast handlers every extra wake-up (a loop turn, an eventfd
# write and read, ~15 us) costs more than it spreads.
FIRST_BATCH_EVENTS = 256
MAX_BATCH_EVENTS = 4096
BATCH_SECONDS = 0.002

# After a batch that wrote to HOLD_AFTER_CONNECTIONS connections or more, at least
# HOLD_AFTER_DELIVERIES_PER_CONNECTION publish deliveries to each on average, taking longer than
# HOLD_AFTER_WRITES_SECONDS, the next drain waits HOLD_SECONDS. Such a batch is a fan-out of
# several messages, each connection taking its own send; the clients' answers to its first sends
# arrive while its last ones are made. Drained at once, they make a smaller batch whose writes
# take as long, and the server settles into several small batches per round where one would do
# (S3: two sends per subscriber per round, 0.6x the deliveries/s of one). Waiting a moment lets
# the rest of the round arrive to share each send. Never after a few connections' writes,
# however long (S7's large echoes: holding them cost a fifth of their rate), nor after short
# ones (an echo's), nor after one message per connection (a lone broadcast, S8's publishes to
# 10-subscriber topics), where there is nothing for a later send to share. Nor after a batch that
# carried as many deliveries per connection as the fan-outs before it (at least
# HOLD_BELOW_PEAK of their peak, which loses FAN_OUT_PEAK_DECAY of itself at each fan-out): its
# round arrived whole, and waiting would only idle the loop (S3 on a machine fast enough for its
# rounds to arrive whole: a fifth of its time; 1.14x the deliveries/s with the peak, while S10
# keeps what the hold gives it).
HOLD_AFTER_CONNECTIONS = 256
HOLD_AFTER_DELIVERIES_PER_CONNECTION = 2
HOLD_AFTER_WRITES_SECONDS = 0.002
HOLD_SECONDS = 0.001
HOLD_BELOW_PEAK = 0.75
FAN_OUT_PEAK_DECAY = 0.05
# The core logs at most ten lines of a kind a second; a second after the latest line that filled
# its second, the loop asks how many were left out since, and says so in a line of its own if no
# later line of that kind has said it already.
LEFT_OUT_AFTER_SECONDS = 1.0

_CoroutineType = types.CoroutineType


def _chosen_subprotocol(value: str, offered: list[str]) -> str:
    """A ``Sec-WebSocket-Protocol`` given to ``upgrade()``: a list (the client's own header,
    passed on) answers with its first item the client offered, as uWS answers with the first;
    the 101 may name only one."""
    if "," not in value:
        return value
    for item in value.split(","):
        if item.strip() in offered:
            return item.strip()
    return value


@types.coroutine
def _in_context(
    coro: Coroutine[Any, Any, Any], context: contextvars.Context
) -> Generator[Any, Any, Any]:
    """Run every step of ``coro`` inside ``context`` (3.10, whose Task cannot be given one).

    The Task sees exactly what the coroutine yields and sends or throws the outcome back.
    """
    run = context.run
    try:
        yielded = run(coro.send, None)
    except StopIteration as stop:
        return stop.value
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            run(coro.close)
            raise
        except BaseException as exc:  # noqa: BLE001 - forwarded, including cancellation
            try:
                yielded = run(coro.throw, exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = run(coro.send, sent)
            except StopIteration as stop:
                return stop.value


if sys.version_info >= (3, 12):

    def _start_task(
        coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop, context: contextvars.Context
    ) -> asyncio.Task[Any]:
        # Eager: the first step runs now, inside the task, so a handler that finishes without
        # suspending is done before this returns and costs no loop iteration.
        return asyncio.Task(coro, loop=loop, context=context, eager_start=True)

    def _only_makes_coroutines(fn: object) -> bool:
        """True when calling ``fn`` runs none of its code, only makes a coroutine.

        That is an ``async def`` function, or a bound method of one. Such a handler's coroutine
        can be made outside the connection's context and go straight into an eager task, which
        enters the context itself (``Server._dispatch_eager``).
        """
        if type(fn) is types.MethodType:
            fn = fn.__func__
        return type(fn) is types.FunctionType and bool(fn.__code__.co_flags & CO_COROUTINE)

elif sys.version_info >= (3, 11):

    def _start_task(
        coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop, context: contextvars.Context
    ) -> asyncio.Task[Any]:
        return asyncio.Task(coro, loop=loop, context=context)

    def _only_makes_coroutines(fn: object) -> bool:
        # Without eager tasks a task's first step costs a loop iteration: no fast path to take.
        return False

else:

    def _start_task(
        coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop, context: contextvars.Context
    ) -> asyncio.Task[Any]:
        return asyncio.Task(_in_context(coro, context), loop=loop)

    def _only_makes_coroutines(fn: object) -> bool:
        return False


# asyncio.Task as Any: `_dispatch_eager`, only taken on 3.12+, passes `eager_start`, which the
# type checker's older Pythons do not know.
_AnyTask: Any = asyncio.Task


def _log_cancelled(ws: WebSocket[Any], kind: int) -> None:
    """A WebSocket handler was cancelled, not by a stop: its connection stays open."""
    logger.warning("%s handler for %s was cancelled", _EVENT_NAMES.get(kind, "handler"), repr(ws))


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _hang_up_stops() -> bool:
    """Whether SIGHUP, under ``run()`` without TLS (nothing to reload), is to stop the server
    gracefully, as SIGTERM does: it keeps its meaning (hang up), unless it was ignored when the
    process started (``nohup``). Left to its default, it ended the process with no 1001."""
    return signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN


def _log_hang_up() -> None:
    logging.getLogger("brioche").warning("SIGHUP: nothing to reload without tls(): stopping, as on SIGTERM")


def _stopping() -> Response:
    return text("Service Unavailable", 503)


def _close_for_protocol_error(ws: WebSocket[Any], code: int, reason: str) -> None:
    """Close once the events before it were handled, in order: the client broke the protocol,
    or sent its close frame behind them (answered with its code and reason, after what their
    handlers sent, as Bun's)."""
    ws.close(code, reason)


def _close_hook(server: weakref.ref[Server[Any]]) -> Callable[[WebSocket[Any]], None]:
    """What a socket calls when the application closes or terminates it (``Server._app_closed``).
    By a weak reference: the engine holds it, and the server holds the engine."""

    def app_closed(ws: WebSocket[Any]) -> None:
        srv = server()
        if srv is not None:
            srv._app_closed(ws)

    return app_closed


class BindError(BriocheError, OSError):
    """The server could not listen on the requested address; ``errno`` says why."""


class Stats(TypedDict):
    """What :meth:`Server.stats` returns: counts since the server started.

    ``messages_in`` and ``bytes_in`` count data messages from clients, ``messages_out`` and
    ``bytes_out`` messages queued for clients (sends and publish deliveries, one per
    recipient); the bytes are payload bytes, uncompressed (after inflating, before
    compressing), without frame headers, control frames or TLS: not a measure of bandwidth.
    ``deliveries`` counts the publish deliveries among them, and ``sends_backpressured`` those
    queued to a congested socket; ``sends_dropped`` counts sends and deliveries refused (a
    publish that reached nobody is no dropped delivery, although its status is
    ``MessageDropped()``). ``handshakes_rejected`` counts WebSocket handshakes the core refused
    for what makes them handshakes (400, 426, 503), ``requests_rejected`` HTTP requests, a
    handshake among them, it refused before the handler for anything else (400 for the ``Host``
    or a malformed request, or plain HTTP to the TLS port; 408, 413, 414, 431, 501 for a
    transfer coding it does not know, 503 for a body over ``max_incoming_bytes``), and
    ``responses_stalled`` HTTP connections it dropped because a response waited
    ``handshake_timeout`` on a client that read none of it. ``tls_handshakes_failed`` counts
    TLS connections that sent something but never finished their handshake (not TLS, refused
    by the TLS layer, left mid-handshake, or not done within ``handshake_timeout``).
    ``open_connections`` and ``incoming_bytes`` are current values. A connection is counted in
    ``connections_opened`` before its ``on_open`` runs, and in ``connections_closed`` and
    ``closes_by_code`` before its ``on_close`` runs; ``closes_by_code`` is keyed by the code
    ``on_close`` gets (the README's table of them): after the server's ``close()`` (a handler's
    1011 included) the code the client answers with, or 1006 if no answer came (``close(4002)``
    answered with 1000 counts 1000); 1008 for a connection dropped over its backpressure limit,
    although no close frame is sent then. Counters are per process: under ``workers`` each
    worker has its own, and ``stats(all_workers=True)`` sums them.

    With :meth:`~brioche.server.Config.pubsub_redis`: ``redis_published`` counts publishes
    written to Redis, ``redis_publishes_lost`` those the other processes never got (Redis down,
    the core's queue to it full, or the write failed), ``redis_received`` messages from other
    processes fanned out here (their deliveries count in ``deliveries``; ``publishes`` counts
    this process's own), ``redis_received_lost`` those Redis delivered and this process dropped
    (64 MiB of them already waited to be fanned out), and ``redis_connected`` is 1 while connected and subscribed (always 0
    without Redis).

    Under ``run(config, workers=n)`` without Redis: ``relay_publishes_lost`` counts the
    publishes a sibling worker missed because 64 MiB already waited for it or was being written
    to it (or the publish alone was larger), or because it had no link to this worker (it died,
    or was restarting or not yet connected; not one that stopped gracefully, which had no client
    left), once per sibling that missed it (always 0 otherwise).

    ``reads_paused`` counts the times a connection stopped reading because the server held more
    than ``max_incoming_bytes`` of incoming messages and request bodies (see
    :meth:`~brioche.server.Config.max_incoming_bytes`; the first such pause in a minute is logged
    at WARNING on ``brioche.ws``).

    ``batches_held`` counts the times the loop waited a millisecond before its next batch of
    events because the last batch wrote published messages, two or more to each of 256
    connections or more (fewer per connection than the fan-outs before it, or the first),
    and took over 2 ms (a fan-out: the wait lets more messages share each
    connection's next write; see ARCHITECTURE.md).

    ``handler_errors`` counts the handlers that failed: a WebSocket handler that raised (which
    closes its connection with 1011, unless it was ``on_close``), and an HTTP handler that
    raised, was cancelled by its own doing, or answered with something that is no valid
    ``Response`` (each answered 500). Each is also logged at ERROR on ``brioche``, but for a
    ``KeyboardInterrupt`` or ``SystemExit``, which is counted and propagates. A handler past
    its ``srv.timeout`` (503) is not among them.
    """

    connections_opened: int
    connections_closed: int
    messages_in: int
    bytes_in: int
    messages_out: int
    bytes_out: int
    publishes: int
    deliveries: int
    sends_backpressured: int
    sends_dropped: int
    handshakes_rejected: int
    requests_rejected: int
    responses_stalled: int
    tls_handshakes_failed: int
    reads_paused: int
    redis_published: int
    redis_publishes_lost: int
    redis_received: int
    redis_received_lost: int
    closes_by_code: dict[int, int]
    open_connections: int
    incoming_bytes: int
    redis_connected: int
    relay_publishes_lost: int
    batches_held: int
    handler_errors: int


def _deflate_tuple(options: DeflateOptions | None) -> tuple[bool, bool, int, int] | None:
    """``DeflateOptions`` as the engine takes them."""
    if options is None:
        return None
    return (
        options.server_no_context_takeover,
        options.client_no_context_takeover,
        options.server_max_window_bits,
        options.client_max_window_bits,
    )


def _handlers_of(config: WsConfig[Any]) -> tuple[Callable[..., Any] | None, ...]:
    """The handlers by event kind: ``_dispatch`` indexes this tuple with the kind."""
    return (
        config.on_open_handler, config.on_text_message, config.on_bytes_message,
        config.on_drain_handler, config.on_close_handler, _close_for_protocol_error,
        config.on_ping_handler, config.on_pong_handler,
        config.on_text_message, config.on_bytes_message,
    )


def _eager_of(handlers: tuple[Callable[..., Any] | None, ...]) -> tuple[bool, ...]:
    """Per event kind, whether its handler's messages take ``Server._dispatch_eager``."""
    return tuple(fn is not None and _only_makes_coroutines(fn) for fn in handlers)


def _call_each(fn: Callable[..., Any], ws: object, messages: Iterator[object]) -> object:
    """Call ``fn(ws, message)`` for each of ``messages`` until one returns something.

    Run in the connection's context, once for a run of its messages: what is left of
    ``messages`` (an iterator) is the caller's once this returns or raises.
    """
    for message in messages:
        result = fn(ws, message)
        if result is not None:
            return result
    return None


def _log_from_engine(name: str, level: int, message: str, args: tuple[Any, ...], left_out: int) -> None:
    """A line from the core (rate-limited there), formatted only if its logger wants it."""
    engine_logger = logging.getLogger(name)
    if not engine_logger.isEnabledFor(level):
        return
    if left_out:
        message += " (%d more like this were not logged before it)"
        args = (*args, left_out)
    engine_logger.log(level, message, *args)


def _http_url(scheme: str, hostname: str, port: int) -> str:
    """The URL of a server on ``hostname``, as this machine reaches it: a wildcard address gives
    its loopback (``0.0.0.0``: ``127.0.0.1``, ``::``: ``[::1]``), an IPv6 address is bracketed."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(hostname, hostname)
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/"


def _wildcard_note(hostname: str) -> str:
    """What a "listening on" line adds to ``_http_url`` for a server on every address of the host."""
    if hostname in ("0.0.0.0", "::"):
        return f" and every other address of this host ({hostname})"
    return ""


@final
class Server(Generic[T]):
    """A running server. Returned by ``await serve()``; also an async context manager.

    ```pycon
    >>> srv = await server.handler(lambda request, srv: server.text("hi")).port(0).serve()
    >>> srv.port > 0
    True
    >>> await srv.stop()
    ```
    """

    __slots__ = (
        "_engine", "_config", "_loop", "_fd", "_handlers", "_eager", "_busy", "_running", "_paused",
        "_stopped", "_engine_stopped", "_links_ending", "_links_ended", "_stop_called",
        "_closing_all", "_cancelling_all", "_tasks", "_close_tasks", "_request_tasks",
        "_stop_cancelled", "_stop_waiters", "_answering",
        "_context", "_ended", "_run",
        "_loop_thread", "_batch_max", "_wake_thread", "_batches_held", "_fan_out_peak", "_handler_errors",
        "_left_out_due", "_loop_end", "hostname", "unix",
        "__weakref__",
    )
    _engine: Engine
    _config: Config[T]
    _loop: asyncio.AbstractEventLoop
    _fd: int
    _handlers: tuple[Callable[..., Any] | None, ...]
    _eager: tuple[bool, ...]
    _busy: dict[WebSocket[T], deque[tuple[Any, ...]]]
    _running: dict[WebSocket[T], asyncio.Task[Any]]
    _paused: set[WebSocket[T]]
    _stopped: asyncio.Future[None]
    _engine_stopped: bool
    _links_ending: bool
    _links_ended: bool
    _stop_called: bool
    _closing_all: bool
    _cancelling_all: bool
    _tasks: set[asyncio.Task[Any]]
    _close_tasks: set[asyncio.Task[Any]]
    _request_tasks: set[asyncio.Task[Any]]
    _stop_cancelled: weakref.WeakSet[asyncio.Task[Any]]
    # The tasks awaiting stop(), each with what it awaits: one that is a handler of this server
    # waits for the other handlers only (`_check_stopped`).
    _stop_waiters: dict[asyncio.Task[Any], asyncio.Future[None]]
    # An HTTP handler's eager first step (3.12+) is running: its task is not in _request_tasks yet.
    _answering: bool
    _context: contextvars.Context
    _ended: set[WebSocket[T]]
    _run: tuple[WebSocket[T], Iterator[object]] | None
    _loop_thread: int
    _batch_max: int
    _wake_thread: threading.Thread | None
    _batches_held: int
    # The most deliveries per connection of the recent fan-out batches (HOLD_BELOW_PEAK).
    _fan_out_peak: float
    _handler_errors: int
    _left_out_due: dict[int, float]
    # Closed by the loop as it ends (`_stop_at_loop_end`); None once the server has stopped.
    _loop_end: AsyncGenerator[None, None] | None
    hostname: str
    """The address the server listens on, as configured (for ``sock()``, the socket's; ``""``
    on a Unix socket)."""
    unix: str | None
    """The Unix socket's path, ``None`` on TCP. A socket handed to ``sock()`` in Linux's
    abstract namespace shows as ``"@name"``."""

    def __init__(self) -> None:
        raise TypeError("use `await server.handler(fn).serve()` to start a Server")

    @classmethod
    def _start(
        cls,
        config: Config[T],
        port: int,
        loop: asyncio.AbstractEventLoop,
        addresses: list[str],
        *,
        unix: str | None = None,
        fd: int | None = None,
    ) -> Server[T]:
        """Listen on ``addresses`` and ``port`` (IP literals: ``serve()`` resolved the configured
        hostname), or on the Unix socket ``unix``, or on the bound socket ``fd``."""
        ws = config.websocket_config
        from brioche.websocket import Config as WsConfig

        limits = ws if ws is not None else WsConfig()
        slot = config.worker_slot
        redis = config.pubsub_redis_value
        try:
            engine = Engine(
                addresses,
                port,
                max_request_body_size=config.max_request_body_size_bytes,
                max_payload_length=limits.max_payload_length_bytes,
                backpressure_limit=limits.backpressure_limit_bytes,
                close_on_backpressure_limit=limits.close_on_backpressure,
                idle_timeout=limits.idle_timeout_seconds,
                publish_to_self=limits.publish_to_self_enabled,
                send_pings=limits.send_pings_enabled,
                websockets_enabled=ws is not None,
                handshake_timeout=config.handshake_timeout_seconds,
                max_request_header_size=config.max_request_header_size_bytes,
                max_connections=config.max_connections_value,
                message_timeout=limits.message_timeout_seconds,
                max_incoming_bytes=config.max_incoming_bytes_value,
                reuse_port=slot is not None,
                relay_path=None if slot is None else slot.relay_path,
                relay_peers=() if slot is None else slot.relay_peers,
                unix=unix,
                unix_mode=config.unix_mode,
                fd=fd,
                redis_url=redis.url if redis is not None else None,
                redis_sharded=redis is not None and redis.sharded,
                redis_namespace=redis.namespace if redis is not None else "brioche:",
                tls_cert=None if config.tls_files is None else config.tls_files[0],
                tls_key=None if config.tls_files is None else config.tls_files[1],
                per_message_deflate=_deflate_tuple(limits.deflate_options),
            )
        except OSError as exc:
            if fd is not None:
                where = f"file descriptor {fd}"
            elif unix is not None:
                where = unix
            else:
                where = f"{config.hostname_value or '0.0.0.0'}:{port}"
            raise BindError(exc.errno, f"cannot listen on {where}: {exc.strerror or exc}") from exc
        self = object.__new__(cls)
        self._engine = engine
        self._config = config
        self._loop = loop
        self.unix = engine.unix_path
        if self.unix is not None:
            self.hostname = ""
        elif fd is not None:
            self.hostname = engine.host or ""
        else:
            self.hostname = config.hostname_value or "0.0.0.0"
        self._handlers = _handlers_of(limits)
        self._eager = _eager_of(self._handlers)
        engine.set_control_events(
            limits.on_ping_handler is not None, limits.on_pong_handler is not None
        )
        self._busy = {}
        self._running = {}
        self._paused = set()
        self._stopped = loop.create_future()
        self._engine_stopped = False
        self._links_ending = False
        self._links_ended = False
        self._stop_called = False
        self._closing_all = False
        self._cancelling_all = False
        self._tasks = set()
        self._close_tasks = set()
        self._request_tasks = set()
        self._stop_cancelled = weakref.WeakSet()
        self._stop_waiters = {}
        self._answering = False
        # Each HTTP request's handler runs in a copy of the context serve() was called in.
        self._context = contextvars.copy_context()
        self._ended = set()
        self._run = None
        self._loop_thread = threading.get_ident()
        engine.set_close_hook(_close_hook(weakref.ref(self)))
        self._batch_max = FIRST_BATCH_EVENTS
        self._wake_thread = None
        self._batches_held = 0
        self._fan_out_peak = 0.0
        self._handler_errors = 0
        self._left_out_due = {}
        self._fd = engine.fileno()
        self._loop_end = _watch_loop_end(weakref.ref(self))
        try:
            loop.add_reader(self._fd, self._on_wake)
        except NotImplementedError:  # pragma: no cover - loops without add_reader (Proactor)
            self._wake_thread = threading.Thread(
                target=self._watch_fd, name="brioche-wake", daemon=True
            )
            self._wake_thread.start()
        return self

    # -- public surface ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on (the chosen one when configured with 0); 0 on a Unix
        socket, which has none."""
        return self._engine.port

    @property
    def url(self) -> str:
        """``http://host:port/`` (``https://`` with ``tls()``) for this server: a wildcard address gives its loopback
        (``0.0.0.0``: ``127.0.0.1``, ``::``: ``[::1]``), an IPv6 address is bracketed. On a Unix
        socket, ``http+unix://`` and the path percent-encoded (``http+unix://%2Ftmp%2Fapp.sock/``,
        as requests-unixsocket spells it)."""
        if self.unix is not None:
            return f"http+unix://{quote(self.unix, safe='')}/"
        scheme = "http" if self._config.tls_files is None else "https"
        return _http_url(scheme, self.hostname, self.port)

    @property
    def pending_websockets(self) -> int:
        """WebSocket connections currently open: each counts from the write of its 101 (so in
        ``on_open``) until it ends (so no longer in ``on_close``); a client that leaves before
        its 101 is written never counts."""
        return self._engine.pending_websockets

    @property
    def pending_requests(self) -> int:
        """HTTP requests in flight (Bun's ``pendingRequests``): each counts from when its head
        has been read until its answer, or its 101, is handed over to be written; a WebSocket
        handshake counts while its handler runs."""
        return self._engine.pending_requests

    def stats(self, all_workers: bool = False) -> Stats:
        """The server's counters since it started, kept by the core as it works.

        Reading them costs a few microseconds; counting costs the hot path a plain add on a
        counter only the counting thread writes. See :class:`Stats` for the keys.

        Under ``run(config, workers=n)`` they are this worker's; ``all_workers=True`` sums every
        worker's instead, each as of its last second (each worker writes its counters to the
        run's directory once a second), the current values too (``open_connections`` is then
        the open WebSockets of every live worker; ``redis_connected`` the number of workers
        connected to Redis). Whichever worker a scrape of the shared port reaches, it gets the
        same figures, and a counter never goes back from one scrape to the next, across a
        worker's restart too: a restarted worker counts on from where its predecessor's last
        second left off. In one process it is the same as ``stats()``.
        """
        slot = self._config.worker_slot
        if _check_bool("all_workers", all_workers) and slot is not None:
            # Every worker's file, this one's included: its live counters would be fresher than
            # the others', and a scrape reaching another worker next could see them go back.
            return _worker_stats.total(slot.directory, slot.workers, Stats.__required_keys__)  # type: ignore[return-value]
        stats = self._engine.stats()
        stats["batches_held"] = self._batches_held
        stats["handler_errors"] = self._handler_errors
        return stats  # type: ignore[return-value]

    # A server whose sockets carry data must be given it: ``ws.data`` would be None otherwise.
    @overload
    def upgrade(
        self: Server[None],
        request: Request,
        headers: HeaderItems = (),
        data: None = None,
        *,
        subprotocol: str | None = None,
    ) -> bool: ...
    @overload
    def upgrade(
        self, request: Request, headers: HeaderItems, data: T, *, subprotocol: str | None = None
    ) -> bool: ...
    @overload
    def upgrade(
        self, request: Request, *, headers: HeaderItems = (), data: T, subprotocol: str | None = None
    ) -> bool: ...
    def upgrade(
        self,
        request: Request,
        headers: HeaderItems = (),
        data: Any = None,
        *,
        subprotocol: str | None = None,
    ) -> bool:
        """Accept ``request`` as a WebSocket carrying ``data``; False if it cannot be upgraded.

        It cannot when it is not a WebSocket handshake, when it was already answered, or when
        its client has gone. A server without a ``websocket`` config is a ``TypeError``, as
        Bun's is: the handshake would otherwise get the fallback answer, with nothing to say
        why. ``headers`` (pairs, or a mapping) go into the 101 response; the ones the
        handshake itself sets (``Upgrade``, ``Connection``, ``Sec-WebSocket-Accept``,
        ``Sec-WebSocket-Extensions``) and the framing headers are a ``ValueError``.
        ``subprotocol`` is the one of ``request.subprotocols`` the server speaks
        (``ws.subprotocol``); one the client did not offer is a ``ValueError``. A
        ``Sec-WebSocket-Protocol`` in ``headers`` (Bun's way to choose one) is taken as
        ``subprotocol``.
        """
        if subprotocol is not None and not isinstance(subprotocol, str):
            raise TypeError(f"subprotocol must be a str or None, got {type(subprotocol).__name__}")
        if self._config.websocket_config is None:
            raise TypeError(
                "upgrade() needs WebSocket support: give the server a websocket config "
                "(.websocket(websocket.init()...)), as Bun.serve needs its websocket object"
            )
        pending = request._pending
        if not pending.is_websocket:
            return False
        extra: list[tuple[str, str]] = []
        for name, value in header_pairs(headers):
            lower = name.lower()
            if lower in _HANDSHAKE_HEADERS:
                raise ValueError(f"{name} is the handshake's own header; upgrade() cannot set it")
            if lower == "sec-websocket-protocol":
                if subprotocol is not None:
                    raise ValueError(
                        "a subprotocol is given twice (Sec-WebSocket-Protocol, subprotocol=)"
                    )
                subprotocol = _chosen_subprotocol(value, request.subprotocols)
            else:
                extra.append((name, value))
        if subprotocol is not None:
            offered = request.subprotocols
            if subprotocol not in offered:
                raise ValueError(
                    f"the client did not offer the subprotocol {subprotocol!r} (it offered {offered!r})"
                )
            extra.append(("sec-websocket-protocol", subprotocol))
        # The socket's handlers run in a copy of the context this is called in.
        upgraded = pending.upgrade(extra, data, contextvars.copy_context(), subprotocol)
        if upgraded:
            # Answered, with its 101: from here the socket's idle_timeout applies, and the
            # handler's work after the upgrade is not cut short.
            request._end_timeout()
        return upgraded

    def request_ip(self, request: Request) -> SocketAddress | None:
        """The client's address, family and port for ``request`` (Bun's ``requestIP``).

        ``None`` when the request did not come over TCP, as Bun answers ``null`` then.
        """
        address = request.remote_address
        if not address:
            # A client of a Unix socket: no address.
            return None
        family: Literal["IPv4", "IPv6"] = "IPv6" if ":" in address else "IPv4"
        return SocketAddress(address, family, request._pending.remote_port)

    def timeout(self, request: Request, seconds: float) -> None:
        """Give the handler of ``request`` at most ``seconds`` from now to answer (0: no limit).

        Bun's ``server.timeout``. The connection is idle while the handler works (the request was
        read whole before it started), so this is its idle timeout: once it passes, the client
        gets ``503 Service Unavailable`` and the handler's task, if still running, is cancelled.
        Calling it again replaces the previous limit.
        """
        seconds = _check_seconds("timeout", seconds)
        request._end_timeout()
        if seconds and not request._answered and not request._pending.upgraded:
            request._timer = self._loop.call_later(seconds, self._timed_out, request)

    def reload_tls(self) -> None:
        """Read the ``tls()`` certificate and key files again (a renewed certificate): the
        connections accepted from now on get them; open ones keep the one they started with.

        A file that cannot be used raises ``BriocheError`` and the certificate in use stays.
        ``run()`` calls it on SIGHUP. A ``ValueError`` if the server does not serve TLS.
        """
        self._engine.reload_tls()

    def reload(
        self, *, handler: Handler[T] | None = None, websocket: WsConfig[T] | None = None
    ) -> None:
        """Use ``handler`` and ``websocket``'s handlers for the events to come (Bun's ``reload``).

        Open connections stay open; their next events go to the new handlers, and events
        already queued for a connection whose handler is still running as well. Called from a
        handler, it takes effect from the next batch of events: the messages already taken into
        the current one may still get the old handlers. The limits of
        ``websocket`` (``idle_timeout``, ``max_payload_length``...) are fixed when the server
        starts: a config that changes one is a ``ValueError``, as is enabling websockets on a
        server started without them.
        """
        from brioche.websocket import Config as WsConfig, _check_handler

        if handler is None and websocket is None:
            raise TypeError("reload() needs handler=, websocket= or both")
        if handler is not None:
            _check_handler(handler, "reload", "request, server")
        config = self._config
        if websocket is not None:
            if not isinstance(websocket, WsConfig):
                raise TypeError(f"expected a websocket.Config, got {type(websocket).__name__}")
            current = config.websocket_config
            if current is None:
                raise ValueError(
                    "this server was started without a websocket config: reload cannot enable "
                    "websockets; stop it and serve again"
                )
            for setter, field in _FIXED_AT_START.items():
                old, new = getattr(current, field), getattr(websocket, field)
                if old != new:
                    raise ValueError(
                        f"reload cannot change {setter} ({old!r} -> {new!r}): it is fixed when "
                        "the server starts; stop it and serve again to change it"
                    )
            config = dataclasses.replace(config, websocket_config=websocket)
            self._handlers = _handlers_of(websocket)
            self._eager = _eager_of(self._handlers)
            self._engine.set_control_events(
                websocket.on_ping_handler is not None, websocket.on_pong_handler is not None
            )
        if handler is not None:
            config = dataclasses.replace(config, fetch=handler)
        self._config = config

    def publish(
        self, topic: str, message: str | Buffer, compress: bool = False
    ) -> SendStatus:
        """Send ``message`` to every subscriber of ``topic``; the status sums up theirs, as
        ``websocket.publish``'s (``MessageDropped`` if any one dropped it).

        With workers (``run(config, workers=n)``) or
        :meth:`~brioche.server.Config.pubsub_redis` it also goes to the subscribers of the other
        processes (through the relay, or Redis); the status returned is this process's (so
        ``MessageDropped`` when none is here). ``compress`` as ``ws.publish``'s.
        """
        return self._engine.publish(topic, message, compress)

    def subscriber_count(self, topic: str) -> int:
        """How many open connections of this server are subscribed to ``topic``.

        With :meth:`~brioche.server.Config.pubsub_redis`, still this process's only: the
        subscribers of other processes are not known here.
        """
        return self._engine.subscriber_count(topic)

    async def stop(self, close_active_connections: bool = False) -> None:
        """Stop listening and wait until every connection and every handler task has ended.

        With ``close_active_connections=True`` open WebSockets are closed with 1001, handler
        tasks still suspended once their connection is closed are cancelled (``on_close`` still
        runs, last), and so are the ``async`` HTTP handlers still running, as Bun's
        ``stop(true)`` ends requests in flight: their clients get ``503 Service Unavailable``.
        Otherwise connections carry on until they close by themselves, and their handlers until
        they finish.

        Awaited by one of this server's WebSocket handlers, it waits for every other handler and
        connection, its own connection's included (which ``close_active_connections`` does not
        cancel it for), not for itself: the events of its connection that come after it run
        after it, as always, and every other ``stop()``, ``wait_closed()`` and ``serve_forever()``
        returns after them. Awaited by its HTTP handler, it returns once the stop has begun,
        since the stop waits for the answer that handler has yet to give (which
        ``close_active_connections`` does not cancel either). Awaited through another task
        (``gather``, ``ensure_future``; ``wait_for`` on 3.10 and 3.11), it waits for the
        handler as any caller does.
        """
        me = asyncio.current_task()
        answering = me is not None and (self._answering or me in self._request_tasks)
        if close_active_connections and not self._closing_all:
            self._closing_all = True
            self._cancel_closed(spare=me)
            for task in list(self._request_tasks):
                if task is not me:
                    self._cancel_for_stop(task)
        if not self._stop_called:
            self._stop_called = True
            self._engine.stop(close_active_connections)
        elif close_active_connections:
            self._engine.stop(True)
        if answering and me is not None:
            # Not cancelled for this stop once it suspends, either (`_cancel_for_stop` cancels a
            # task once: it counts as done here); only run()'s grace, once over, cancels it.
            self._stop_cancelled.add(me)
            return
        if me is None:
            await asyncio.shield(self._stopped)
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._stop_waiters[me] = waiter
        # A handler waiting for its connection to end does not hold back its client's close
        # (`_track`'s hold; on_close takes none).
        ws = None
        if me not in self._close_tasks:
            ws = next((ws for ws, task in self._running.items() if task is me), None)
        if ws is not None:
            ws._release_handler()
        try:
            self._check_stopped()
            await waiter
        finally:
            del self._stop_waiters[me]
            if ws is not None:
                ws._hold_handler()

    def _cancel_handlers(self) -> int:
        """Cancel every handler task still running, ``on_close``'s and the HTTP handlers'
        included, and each one that starts from now on; the number that were running."""
        self._closing_all = True
        self._cancelling_all = True
        running = [task for task in self._tasks if not task.done()]
        for task in running:
            if task in self._request_tasks:
                task.cancel()
            else:
                self._cancel_from_first_step(task)
        return len(running)

    async def _stop_gracefully(self) -> None:
        """``run()``'s stop: ``stop(close_active_connections=True)``, and once
        ``STOP_GRACE_SECONDS`` have passed, the handler tasks still running are cancelled."""
        grace = STOP_GRACE_SECONDS
        stopping = asyncio.ensure_future(self.stop(close_active_connections=True))
        done, _ = await asyncio.wait({stopping}, timeout=grace)
        if not done:
            count = self._cancel_handlers()
            if count:
                logger.warning(
                    "stopping: cancelled %d handler %s still running after the %g s grace period",
                    count, "task" if count == 1 else "tasks", grace,
                )
            else:
                logger.warning(
                    "stopping: the %g s grace period has passed; waiting for the connections "
                    "still closing", grace,
                )
        await stopping

    async def wait_closed(self) -> None:
        """Wait until the server has stopped: ``stop()`` was called and everything ended."""
        await asyncio.shield(self._stopped)

    async def serve_forever(self) -> None:
        """Serve until the server is stopped; cancelled, it stops it, closing connections with 1001.

        ```pycon
        >>> srv = await server.handler(lambda request, srv: server.text("hi")).port(0).serve()
        >>> forever = asyncio.ensure_future(srv.serve_forever())
        >>> await asyncio.sleep(0)
        >>> forever.cancel()
        True
        >>> await srv.wait_closed()
        ```
        """
        try:
            await asyncio.shield(self._stopped)
        except asyncio.CancelledError:
            await self.stop(close_active_connections=True)
            raise

    def _forget_loop_end(self) -> None:
        """The server has stopped: the loop's end has nothing left to stop. Closed now, so that
        it is not left to the loop (or to a collection after the loop has closed)."""
        loop_end, self._loop_end = self._loop_end, None
        if loop_end is not None:
            try:
                loop_end.aclose().send(None)
            except StopIteration:
                pass

    async def __aenter__(self) -> Server[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(close_active_connections=True)

    def __repr__(self) -> str:
        return f"<brioche.Server {self.url}>"

    # -- the bridge -------------------------------------------------------------------------

    def _on_wake(self) -> None:
        started = perf_counter()
        try:
            # Inside: a drain that fails (a MemoryError making its objects) has begun the send
            # batch, which only end_batch ends.
            self._dispatch_batch(self._engine.drain(self._batch_max))
        finally:
            handled = perf_counter()
            # Everything the handlers sent is written here, one send per connection.
            connections, deliveries = self._engine.end_batch()
            writes = perf_counter() - handled
            self._size_next_batch(self._engine.drained, handled - started, writes)
            if (
                connections >= HOLD_AFTER_CONNECTIONS
                and deliveries >= HOLD_AFTER_DELIVERIES_PER_CONNECTION * connections
                and writes > HOLD_AFTER_WRITES_SECONDS
            ):
                per_connection = deliveries / connections
                peak = self._fan_out_peak
                self._fan_out_peak = max(per_connection, peak * (1 - FAN_OUT_PEAK_DECAY))
                # The first fan-out holds: nothing yet says whether its round came whole.
                if per_connection < HOLD_BELOW_PEAK * peak or peak == 0:
                    self._hold()

    def _log(self, event: tuple[Any, ...]) -> None:
        """A log line from the core; if it filled its second, the count of those left out after
        it is asked for a second later (``_report_left_out``)."""
        _, name, level, message, args, left_out, filled = event
        _log_from_engine(name, level, message, args, left_out)
        if filled >= 0:
            # Lines are left out only after a line that filled their second, and within that
            # second: a second after the latest such line, all of them are counted. A fill
            # while a report is due moves the report, or the lines of that later second left
            # out after the report would wait for a line that may never come.
            due = self._loop.time() + LEFT_OUT_AFTER_SECONDS
            if filled not in self._left_out_due:
                self._loop.call_at(due, self._report_left_out, filled, name, level, message)
            self._left_out_due[filled] = due

    def _report_left_out(self, kind: int, name: str, level: int, message: str) -> None:
        """Say how many lines of a kind were left out, unless a later line of it has said so:
        without this, a flood that stopped was never counted in the log."""
        due = self._left_out_due[kind]
        if self._loop.time() < due:
            self._loop.call_at(due, self._report_left_out, kind, name, level, message)
            return
        del self._left_out_due[kind]
        left_out = self._engine.take_left_out(kind)
        engine_logger = logging.getLogger(name)
        if left_out and engine_logger.isEnabledFor(level):
            engine_logger.log(
                level,
                "%d more lines like '%s' were not logged (at most ten of a kind a second)",
                left_out,
                re.sub("%[sd]", "…", message),
            )

    def _hold(self) -> None:
        """Stop watching the wake-up for HOLD_SECONDS; what arrives meanwhile waits for it.

        Never called while held: with the reader removed, ``_on_wake`` does not run."""
        if self._wake_thread is not None or self._links_ended:
            return
        self._loop.remove_reader(self._fd)
        self._batches_held += 1
        self._loop.call_later(HOLD_SECONDS, self._unhold)

    def _unhold(self) -> None:
        if not self._links_ended:
            self._loop.add_reader(self._fd, self._on_wake)

    def _size_next_batch(self, count: int, seconds: float, writes: float) -> None:
        """Size the next drain from this one's handler time, ``seconds`` for ``count`` events.

        The writes are not counted as the handlers' time: they take about as long for one
        event as for a thousand (one send per connection), and counting them kept a publish
        to many subscribers at one event per batch, one send per delivery. They set the
        budget instead, when longer than BATCH_SECONDS: a fan-out whose writes took 20 ms
        would otherwise be split into batches of 2 ms of handlers each, every part paying
        the 20 ms of writes again for its fraction of the messages."""
        if not count:
            return
        budget = max(BATCH_SECONDS, writes)
        fit = int(count * budget / seconds) if seconds > 0 else MAX_BATCH_EVENTS
        if count >= self._batch_max:
            # A full batch: more was waiting. Grow, at most twofold, while it fits the time.
            self._batch_max = max(1, min(MAX_BATCH_EVENTS, self._batch_max * 2, fit))
        elif fit < self._batch_max:
            self._batch_max = max(1, fit)

    def _dispatch_batch(self, events: list[tuple[Any, ...]]) -> None:
        busy = self._busy
        handlers = self._handlers
        eager = self._eager
        remaining = iter(events)
        try:
            for event in remaining:
                kind = event[0]
                if kind < _REQUEST:
                    ws = event[1]
                    if busy and ws in busy:
                        self._park(ws, event)
                    elif kind == _TEXT or kind == _BYTES:
                        # The per-message path, inlined: a plain handler that returns None costs
                        # one call in the connection's context and nothing else.
                        fn = handlers[kind]
                        if fn is None:
                            continue
                        if eager[kind]:
                            self._dispatch_eager(ws, kind, fn, iter((event[2],)), event[3])
                            continue
                        try:
                            # event[3] is ws._context, put in the tuple by the engine: cheaper
                            # than the property on the per-message path.
                            result = event[3].run(fn, ws, event[2])
                        except BaseException as exc:
                            self._handler_failed(ws, kind, exc)
                            if not isinstance(exc, _REPORTED):
                                raise
                            continue
                        if result is not None:
                            self._await_result(ws, kind, result)
                    elif kind == _TEXT_RUN or kind == _BYTES_RUN:
                        self._dispatch_run(ws, event)
                    else:
                        self._dispatch(ws, event)
                elif kind == _REQUEST:
                    self._on_request(event[1])
                elif kind == _STOPPED:
                    self._on_stopped()
                elif kind == _LINKS_ENDED:
                    self._on_links_ended()
                elif kind == _LOG:
                    self._log(event)
        except BaseException:
            # KeyboardInterrupt, SystemExit...: propagate as from a task, but the events after
            # it are still delivered, in order, once the loop runs again.
            rest = list(remaining)
            if rest:
                self._loop.call_soon(self._dispatch_batch, rest)
            raise

    def _dispatch_run(self, ws: WebSocket[T], run: tuple[Any, ...]) -> None:
        """A run of one connection's messages: its context is entered once, not per message."""
        kind = _KIND_OF_RUN[run[0]]
        fn = self._handlers[kind]
        if fn is None:
            return
        context = run[3]
        messages = iter(run[2])
        # What `_app_closed` empties, should a handler of the run close ws.
        self._run = (ws, messages)
        try:
            if self._eager[kind]:
                self._dispatch_eager(ws, kind, fn, messages, context)
                return
            while True:
                try:
                    result = context.run(_call_each, fn, ws, messages)
                except BaseException as exc:
                    self._failed_in_run(ws, kind, exc, messages, context)
                    continue
                if result is None:
                    return
                # Outside the context: the task enters it itself.
                try:
                    suspended = self._await_result(ws, kind, result)
                except BaseException:
                    self._park_rest(ws, kind, messages, context)
                    raise
                if suspended:
                    self._park_rest(ws, kind, messages, context)
                    return
        finally:
            self._run = None

    def _dispatch_eager(
        self,
        ws: WebSocket[T],
        kind: int,
        fn: Callable[..., Any],
        messages: Iterator[object],
        context: contextvars.Context,
    ) -> None:
        """Messages for an ``async def`` handler on 3.12+ (``_only_makes_coroutines``).

        Each coroutine is made here, outside the connection's context (making it runs none of the
        handler's code), and goes straight into an eager task, which enters the context itself: no
        ``context.run`` and no frame of ours around each task. The path of S1's await-free async
        handler; PROFILE.md has what it saves.
        """
        loop = self._loop
        for message in messages:
            try:
                task = _AnyTask(fn(ws, message), loop=loop, context=context, eager_start=True)
            except BaseException as exc:
                # A TypeError from the call (the handler's signature), or a KeyboardInterrupt or
                # SystemExit from the eager first step, which the Task re-raises.
                self._failed_in_run(ws, kind, exc, messages, context)
                continue
            # asyncio's own fields, in its C and Python Tasks alike: attribute reads instead of
            # calls, on the path every await-free message takes.
            state = task._state
            if state == _PENDING:
                self._track(ws, kind, task)
                self._park_rest(ws, kind, messages, context)
                return
            if state == _FINISHED and task._exception is None:
                continue
            # It raised, or it was cancelled within its first step: said, as it is on 3.10 and
            # 3.11, where that step runs later, from the loop.
            try:
                self._finished(ws, kind, task)
            except BaseException:
                self._park_rest(ws, kind, messages, context)
                raise

    def _failed_in_run(
        self,
        ws: WebSocket[T],
        kind: int,
        exc: BaseException,
        messages: Iterator[object],
        context: contextvars.Context,
    ) -> None:
        """A handler of a run raised: report it (an Exception closes with 1011, a CancelledError
        is said and changes nothing, and the run goes on); anything else parks the rest of the
        run and propagates."""
        self._handler_failed(ws, kind, exc)
        if not isinstance(exc, _REPORTED):
            self._park_rest(ws, kind, messages, context)
            raise exc

    def _park_rest(
        self, ws: WebSocket[T], kind: int, messages: Iterator[object], context: contextvars.Context
    ) -> None:
        """The messages of a run after a suspended handler (or a ``BaseException``) wait their turn."""
        rest = [(kind, ws, message, context) for message in messages]
        if not rest:
            return
        if ws not in self._busy:
            # Nothing is running for ws (a BaseException): the loop picks them up when it runs again.
            self._busy[ws] = deque()
            self._loop.call_soon(self._release, ws)
        for event in rest:
            self._park(ws, event)

    def _dispatch(self, ws: WebSocket[T], event: tuple[Any, ...]) -> bool:
        """Run the handler for ``event``; True when it suspended and now runs as a task."""
        kind = event[0]
        fn = self._handlers[kind]
        if fn is None:
            return False
        try:
            if kind == _TEXT or kind == _BYTES:
                result = event[3].run(fn, ws, event[2])
            else:
                result = ws._context.run(fn, *event[1:])
        except BaseException as exc:
            self._handler_failed(ws, kind, exc)
            if not isinstance(exc, _REPORTED):
                raise
            return False
        if result is None:
            return False
        return self._await_result(ws, kind, result)

    def _new_task(self, result: object, context: contextvars.Context) -> asyncio.Task[Any] | None:
        """A task running ``result`` in ``context``, or None when it is not awaitable."""
        if type(result) is _CoroutineType:
            return _start_task(result, self._loop, context)
        if isawaitable(result):
            return _start_task(_await(result), self._loop, context)
        return None

    def _await_result(self, ws: WebSocket[T], kind: int, result: object) -> bool:
        """Run a handler's awaitable result as a task; True when it is suspended."""
        task: asyncio.Task[Any] | None
        try:
            # A coroutine (an `async def` handler's result) straight to its task: this is the
            # per-message path of such handlers.
            if type(result) is _CoroutineType:
                task = _start_task(result, self._loop, ws._context)
            else:
                task = self._new_task(result, ws._context)
        except BaseException as exc:
            # KeyboardInterrupt or SystemExit in an eager first step: the Task re-raises it.
            self._handler_failed(ws, kind, exc)
            raise
        if task is None:
            return False
        if task.done():
            # Finished in its eager first step (3.12+): report it if it raised or was cancelled.
            if task.cancelled() or task.exception() is not None:
                self._finished(ws, kind, task)
            return False
        self._track(ws, kind, task)
        return True

    def _track(self, ws: WebSocket[T], kind: int, task: asyncio.Task[Any]) -> None:
        """A suspended handler task: ws's later events wait behind it, and stop() waits for it."""
        if ws not in self._busy:
            self._busy[ws] = deque()
        self._running[ws] = task
        self._tasks.add(task)
        if kind != _CLOSE:
            # In flight for the engine, as a message parked behind it would be, until it ends:
            # a close frame the client sends meanwhile is answered after what it sends.
            ws._hold_handler()
        task.add_done_callback(partial(self._handler_done, ws, kind))
        if kind == _CLOSE:
            # on_close runs to its end, even while stopping: it is the connection's clean-up.
            self._close_tasks.add(task)
        if self._cancelling_all:
            # Past run()'s grace period nothing may hold the stop up, on_close included; from
            # its first line on, as on_close is the clean-up.
            self._cancel_from_first_step(task)
        elif (
            kind != _CLOSE
            and self._closing_all
            and ws.ready_state == _CLOSED
            and task not in self._stop_waiters
        ):
            self._cancel_for_stop(task)

    def _finished(self, ws: WebSocket[T], kind: int, task: asyncio.Task[Any]) -> None:
        """Report how a handler task ended: an exception closes the connection with 1011.

        A ``KeyboardInterrupt`` or ``SystemExit`` is not raised again: the task's own step
        raised it out of the loop already (an eager first step, out of the Task's constructor).
        Raised again here, in a done callback, it surfaced a second time inside
        ``asyncio.run()``'s shutdown, which it cut short: no ``on_close``, no ``finally``."""
        if task.cancelled():
            if task not in self._stop_cancelled and not self._cancelling_all:
                # Not by a stop: by the app, or by something the handler awaited that was
                # cancelled under it (a pool shut down). Said, as the HTTP handler's is, since
                # what it did not do (an `on_open`'s set-up) was otherwise skipped unseen; the
                # connection stays open, as the cancel may be the app's intent.
                _log_cancelled(ws, kind)
            return
        exc = task.exception()
        if exc is None:
            return
        self._handler_failed(ws, kind, exc)
        if not isinstance(exc, (Exception, KeyboardInterrupt, SystemExit)):
            # Any other BaseException the task only stored: raised here, the loop's exception
            # handler reports it (from a done callback it goes no further).
            raise exc

    def _handler_done(self, ws: WebSocket[T], kind: int, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._close_tasks.discard(task)
        if self._running.get(ws) is task:
            del self._running[ws]
        try:
            self._finished(ws, kind, task)
        finally:
            try:
                self._release(ws)
            finally:
                if kind != _CLOSE:
                    # After the parked events have taken holds of their own: never none while
                    # a handler of ws runs, or a close read meanwhile would be answered first.
                    ws._release_handler()
            self._check_stopped()

    def _release(self, ws: WebSocket[T]) -> None:
        """Run the events parked behind a finished handler, until one suspends again."""
        parked = self._busy.get(ws)
        if parked is None:
            return
        try:
            while parked:
                event = parked.popleft()
                held = event[4] if event[0] == _TEXT or event[0] == _BYTES else -1
                if event[0] == _CLOSE:
                    self._ended.discard(ws)
                try:
                    suspended = self._dispatch(ws, event)
                finally:
                    # Once its handler has run, or has taken a hold of its own by suspending.
                    if held >= 0:
                        ws._release_parked(held)
                if suspended:
                    self._unpause_if_below_limit(ws, parked)
                    return
        except BaseException:
            if ws not in self._running:
                self._loop.call_soon(self._release, ws)
            raise
        self._unpause_if_below_limit(ws, parked)
        if ws not in self._ended:
            del self._busy[ws]
        # Else closed by the application: its events still go to `_park`, until on_close.

    def _app_closed(self, ws: WebSocket[T]) -> None:
        """The application closed or terminated ``ws``, open until then (``close()`` from a
        handler, or a handler's exception and its 1011). As uWS emits no message once closing,
        no handler gets any of ws's messages still to come, in this batch, parked behind a
        suspended handler, or read later: an ``on_open`` that rejects a client must not have
        ``on_text`` see what it sent meanwhile. ``on_close`` still runs, last. Closed from
        another thread (which cannot touch the dispatcher), the messages already read may
        still be handled; the engine hands up none read after the close, from any thread."""
        if threading.get_ident() != self._loop_thread:
            return
        self._ended.add(ws)
        run = self._run
        if run is not None and run[0] is ws:
            for _ in run[1]:  # the rest of the run being dispatched
                pass
        parked = self._busy.get(ws)
        if parked is None:
            # Its later events go to `_park`, which drops them, and runs on_close.
            self._busy[ws] = deque()
            return
        kept = [event for event in parked if event[0] == _CLOSE]
        for event in parked:
            if event[0] == _TEXT or event[0] == _BYTES:
                ws._release_parked(event[4])
        parked.clear()
        parked.extend(kept)
        self._unpause_if_below_limit(ws, parked)

    def _park(self, ws: WebSocket[T], event: tuple[Any, ...]) -> None:
        kind = event[0]
        if ws in self._ended:
            # Closed by the application: nothing but on_close reaches a handler now.
            if kind != _CLOSE:
                return
            if ws in self._running:
                self._busy[ws].append(event)  # run by `_release` when the handler ends
                if self._closing_all:
                    self._cancel_closed()
                return
            del self._busy[ws]
            self._ended.discard(ws)
            self._dispatch(ws, event)
            return
        if kind == _TEXT_RUN or kind == _BYTES_RUN:
            # Parked message by message: `_release` dispatches them one at a time.
            self._park_rest(ws, _KIND_OF_RUN[kind], iter(event[2]), event[3])
            return
        parked = self._busy[ws]
        if kind == _TEXT or kind == _BYTES:
            # Still in flight for the engine until its handler runs: on the connection's caps
            # (its reading stops at 1 MiB) and on max_incoming_bytes. Taken off in `_release`
            # by the size kept here: measured again, a str shared by the process (a one-character
            # one) could have grown its UTF-8 cache meanwhile, and the budget wrapped below 0.
            size = sys.getsizeof(event[2])
            event = (kind, ws, event[2], event[3], size)
            ws._hold_parked(size)
        parked.append(event)
        if kind == _CLOSE and self._closing_all:
            self._cancel_closed()
        if len(parked) >= PARKED_EVENTS_LIMIT and ws not in self._paused:
            self._paused.add(ws)
            ws._pause_reading(True)

    def _unpause_if_below_limit(self, ws: WebSocket[T], parked: deque[tuple[Any, ...]]) -> None:
        if len(parked) < PARKED_EVENTS_LIMIT and ws in self._paused:
            self._paused.discard(ws)
            ws._pause_reading(False)

    def _cancel_closed(self, spare: asyncio.Task[Any] | None = None) -> None:
        """Cancel the suspended handlers of connections that are closed (stopping with close),
        but those awaiting stop() itself."""
        for ws, task in list(self._running.items()):
            if (
                ws.ready_state == _CLOSED
                and task not in self._close_tasks
                and task is not spare
                and task not in self._stop_waiters
            ):
                self._cancel_for_stop(task)

    def _cancel_for_stop(self, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` for ``stop(True)``, once: a handler that catches the cancel to clean
        up is not cancelled again by each close, nor by the end of the last connection, that
        follow (only ``run()``'s grace period, once over, cancels again).

        A WebSocket handler's task is cancelled from its first line on
        (`_cancel_from_first_step`): its message was accepted. An HTTP handler's is cancelled
        at once, started or not: its request is answered 503 instead."""
        if task not in self._stop_cancelled:
            self._stop_cancelled.add(task)
            if task in self._request_tasks:
                task.cancel()
            else:
                self._cancel_from_first_step(task)

    def _cancel_from_first_step(self, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` at the await it is suspended in; one whose first step the loop has
        yet to run (3.10 and 3.11 start no task eagerly) once that step has run, as cancelled
        before it, its handler ran no line: the message skipped while the connection's next
        ones were handled, or the clean-up of an ``on_close`` never begun. Not every task
        after a step of its own: one already woken would run on past the await it was
        cancelled in, up to its next."""
        coro = task.get_coro()
        if type(coro) is _CoroutineType:
            started = getcoroutinestate(coro) != CORO_CREATED
        else:
            # 3.10's `_in_context`, a generator around the coroutine.
            started = type(coro) is not types.GeneratorType or getgeneratorstate(coro) != GEN_CREATED
        if started:
            task.cancel()
        else:
            self._loop.call_soon(task.cancel)

    def _request_failed(self, request: Request, message: str, exc: BaseException | None = None) -> None:
        """An HTTP handler that failed: counted (``handler_errors``), logged at ERROR as
        ``message`` (whose ``%r`` is the request, with ``exc``'s traceback) and answered 500."""
        self._handler_errors += 1
        logger.error(message, request, exc_info=exc)
        self._reply(request, internal_error())

    def _handler_failed(self, ws: WebSocket[T], kind: int, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            # From a plain handler (the result of a cancelled future): cancelled, as an async
            # one is that awaits it, and said the same way (`_finished`); the connection stays
            # open. Raised on, it closed with 1011 and surfaced as the loop's unhandled error.
            _log_cancelled(ws, kind)
            return
        name = _EVENT_NAMES.get(kind, "handler")
        self._handler_errors += 1
        if not isinstance(exc, Exception):
            # KeyboardInterrupt, SystemExit...: the caller lets it propagate, which reports it.
            if kind != _CLOSE:
                ws.close(1011, "internal error")
            return
        # The repr is taken now, not when a handler formats the line: by then the close below
        # has changed the state it shows.
        if kind == _CLOSE:
            logger.error("%s handler raised for %s", name, repr(ws), exc_info=exc)
            return
        logger.error("%s handler raised for %s; closing the connection with 1011", name, repr(ws),
                     exc_info=exc)
        ws.close(1011, "internal error")

    def _on_request(self, pending: PendingRequest) -> None:
        request = Request(pending)
        context = self._context.copy()
        try:
            result = context.run(self._config.fetch, request, self)
            # A Response, or None after an upgrade: the usual answers need no task.
            if result is None or type(result) is Response:
                task = None
            else:
                self._answering = True
                try:
                    task = self._new_task(result, context)
                finally:
                    self._answering = False
        except Exception as exc:
            self._request_failed(request, "handler raised for %r", exc)
            return
        except asyncio.CancelledError:
            # The handler's own doing, as for a task it cancelled itself (`_request_done`).
            self._request_failed(request, "handler for %r was cancelled: 500")
            return
        except BaseException:
            # KeyboardInterrupt, SystemExit (from the call, or an eager task's first step):
            # answered before it propagates, as a WebSocket handler's closes 1011 first.
            # Unanswered, the request held stop() and run() for ever.
            self._handler_errors += 1
            self._reply(request, internal_error())
            raise
        if task is None:
            self._reply(request, result)
        elif task.done():
            self._request_done(request, task)
        else:
            request._task = task
            self._tasks.add(task)
            self._request_tasks.add(task)
            task.add_done_callback(partial(self._request_done, request))
            if self._closing_all:
                # Queued before stop(True) and dispatched after it: ended as those in flight were.
                self._cancel_for_stop(task)

    def _request_done(self, request: Request, task: asyncio.Task[Any]) -> None:
        self._request_tasks.discard(task)
        if task in self._tasks:
            self._tasks.discard(task)
            self._check_stopped()
        if task.cancelled():
            # Cancelled by stop(True): the server is going away, which is no fault of the request's:
            # 503, as for a request the server is too busy to serve. Any other cancellation is
            # the handler's own doing.
            if self._closing_all:
                self._reply(request, _stopping())
            elif not (request._answered or request._pending.upgraded):
                # srv.timeout's cancel comes after its 503 (and its line).
                self._request_failed(request, "handler for %r was cancelled: 500")
            return
        exc = task.exception()
        if exc is not None:
            # A KeyboardInterrupt or SystemExit left the loop already, from the task's step.
            self._request_failed(request, "handler raised for %r", exc)
            return
        self._reply(request, task.result())

    def _timed_out(self, request: Request) -> None:
        """``srv.timeout`` passed: answer 503, then cancel the handler that did not answer."""
        request._timer = None
        task = request._task
        logger.warning("handler for %r did not answer within its timeout: 503", request)
        self._reply(request, text("Service Unavailable", 503))
        if task is not None:
            task.cancel()

    def _reply(self, request: Request, result: object) -> None:
        request._end_timeout()
        pending = request._pending
        if pending.upgraded or request._answered:
            return
        request._answered = True
        request._task = None
        if result is None:
            self._handler_errors += 1
            logger.error("handler returned None for %r without upgrading it", request)
            result = internal_error()
        elif not isinstance(result, Response):
            self._handler_errors += 1
            logger.error("handler returned %s for %r, expected a Response",
                         type(result).__name__, request)
            result = internal_error()
        try:
            pending.respond(result.status, list(result.headers), result.body_bytes())
        except ValueError:
            self._handler_errors += 1
            logger.exception("invalid response for %r", request)
            fallback = internal_error()
            pending.respond(fallback.status, list(fallback.headers), fallback.body_bytes())

    def _on_stopped(self) -> None:
        """Every connection has ended: finish once the handlers have, and then the links to
        other processes (``_check_stopped``)."""
        self._engine_stopped = True
        if self._closing_all:
            for task in self._tasks - self._close_tasks - self._stop_waiters.keys():
                self._cancel_for_stop(task)
        self._check_stopped()

    def _on_links_ended(self) -> None:
        self._links_ended = True
        self._stop_watching()
        self._check_stopped()

    def _stop_watching(self) -> None:
        if self._wake_thread is None:
            self._loop.remove_reader(self._fd)

    def _check_stopped(self) -> None:
        if not self._engine_stopped:
            return
        if not self._tasks:
            if not self._links_ended:
                # Every handler has run, on_close's included: what they published for other
                # processes (Redis, sibling workers) goes out before the stop is over, and the
                # links end after it (EVENT_LINKS_ENDED), still watched for.
                if not self._links_ending:
                    self._links_ending = True
                    if not self._engine.end_links():
                        self._links_ended = True
                        self._stop_watching()
                if not self._links_ended:
                    return
            if not self._stopped.done():
                self._stopped.set_result(None)
                self._forget_loop_end()
            waiting = list(self._stop_waiters.values())
        elif self._tasks <= self._stop_waiters.keys():
            # Every handler left awaits stop(): each would wait for the others for ever.
            waiting = [self._stop_waiters[task] for task in self._tasks]
        else:
            return
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)

    def _watch_fd(self) -> None:  # pragma: no cover - only for loops without add_reader
        handled = threading.Event()

        def wake() -> None:
            try:
                self._on_wake()
            finally:
                handled.set()

        while not self._stopped.done():
            readable, _, _ = select.select([self._fd], [], [], 0.5)
            if readable:
                handled.clear()
                self._loop.call_soon_threadsafe(wake)
                handled.wait()


async def _stop_at_loop_end(server: weakref.ref[Server[Any]]) -> AsyncGenerator[None, None]:
    """Suspended while the loop runs, for the loop to close as it ends (``asyncio.run`` and
    ``asyncio.Runner`` do, as does any runner calling ``loop.shutdown_asyncgens()``): a server
    that has not stopped by then (never asked to, or its ``stop()`` cut short) is stopped as
    ``run()`` stops it. Without this the core, which does not run on the loop, went on listening
    once the loop had closed: connections were accepted and never answered, and the port stayed
    taken. ``run()``'s stop, not a plain ``stop(True)``: the runner has cancelled every task
    before this, and an ``on_close`` waiting on one of them would hold the loop's end for ever;
    past the grace period it is cancelled."""
    try:
        yield
    finally:
        srv = server()
        if srv is not None and srv._loop_end is not None:
            srv._loop_end = None
            logger.info(
                "the event loop is ending with the server on %s still running: stopping it "
                "(its WebSockets get 1001)", srv.url,
            )
            await srv._stop_gracefully()


def _watch_loop_end(server: weakref.ref[Server[Any]]) -> AsyncGenerator[None, None] | None:
    """``_stop_at_loop_end``, started on the running loop, which keeps it among the async
    generators it closes as it ends; None where the loop does not track them."""
    firstiter, finalizer = sys.get_asyncgen_hooks()
    loop = asyncio.get_running_loop()
    # Only with the running loop's own hook (asyncio's and uvloop's are its bound methods), and
    # not once it has closed its generators for good (a server started in a runner's shutdown:
    # asyncio would warn, and nothing would close this one; uvloop does not show the flag).
    if getattr(firstiter, "__self__", None) is not loop or getattr(
        loop, "_asyncgens_shutdown_called", False
    ):
        return None
    loop_end = _stop_at_loop_end(server)
    # Without the loop's finalizer: it would schedule the close of a generator collected
    # unclosed on the loop, which may have closed by then; such a generator's server is gone
    # (the server holds it), so its close has nothing to do and needs no loop.
    sys.set_asyncgen_hooks(firstiter, None)
    try:
        loop_end.asend(None).send(None)
    except StopIteration:
        pass
    finally:
        sys.set_asyncgen_hooks(firstiter, finalizer)
    return loop_end


Handler: TypeAlias = Callable[
    [Request, Server[T]], Awaitable[Response | None] | Response | None
]
"""``handler(request, server)``: return a ``Response``, or ``None`` after a successful upgrade."""


def run_loop(
    main: Coroutine[Any, Any, R], loop_factory: Callable[[], asyncio.AbstractEventLoop] | None
) -> R:
    """``asyncio.run(main, loop_factory=...)``, also on 3.10, which has no loop_factory."""
    if loop_factory is None:
        return asyncio.run(main)
    elif sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(main)
    else:  # pragma: no cover - 3.10 only
        loop = loop_factory()
        try:
            asyncio.set_event_loop(loop)
            return loop.run_until_complete(main)
        finally:
            # As asyncio.run does: a KeyboardInterrupt leaves `main` pending, and cancelling it
            # runs its clean-up (`finally: await srv.stop(...)`) instead of leaving it to be
            # closed, unfinished, by the garbage collector.
            try:
                _cancel_all_tasks(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:  # pragma: no cover - 3.10 only
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {"message": "unhandled exception during shutdown", "exception": task.exception(), "task": task}
            )


def _reload_tls_logged(srv: Server[Any]) -> None:
    """SIGHUP: a renewed certificate for new connections; a bad one is logged, the old kept."""
    try:
        srv.reload_tls()
    except BriocheError as exc:
        logging.getLogger("brioche").error("SIGHUP: the TLS certificate was not reloaded: %s", exc)
    else:
        logging.getLogger("brioche").info("SIGHUP: TLS certificate reloaded")
