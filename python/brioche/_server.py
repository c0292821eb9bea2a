"""The running server: the asyncio side of the bridge.

The Rust engine owns the sockets. It pushes events into one queue per server and makes an eventfd
readable when the queue goes from empty to non-empty; the loop calls ``_on_wake`` once for the
whole batch. Handlers for one connection run one at a time and in order: an ``async`` handler is
stepped eagerly, and only if it suspends does it become a task, with that connection's later
events parked until it finishes.
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterable
from functools import partial
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

from brioche import _brioche
from brioche._brioche import BriocheError, Engine, PendingRequest, WebSocket
from brioche._http import Request, Response, internal_error

if TYPE_CHECKING:
    from brioche.server import Config
    from brioche.websocket import SendStatus

__all__ = ["BindError", "Server"]

T = TypeVar("T")

logger = logging.getLogger("brioche")

_OPEN = _brioche.EVENT_OPEN
_TEXT = _brioche.EVENT_TEXT
_BYTES = _brioche.EVENT_BYTES
_DRAIN = _brioche.EVENT_DRAIN
_CLOSE = _brioche.EVENT_CLOSE
_FAIL = _brioche.EVENT_FAIL
_REQUEST = _brioche.EVENT_REQUEST
_STOPPED = _brioche.EVENT_STOPPED
_EVENT_NAMES = {_OPEN: "on_open", _TEXT: "on_text", _BYTES: "on_bytes", _DRAIN: "on_drain",
                _CLOSE: "on_close"}

# A connection whose handler is suspended may have this many events parked behind it before the
# engine stops reading from its socket (TCP backpressure to that client only).
PARKED_EVENTS_LIMIT = 64

_CoroutineType = types.CoroutineType


@types.coroutine
def _continue(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Hand a coroutine that was already stepped once to a Task, as if the Task had started it.

    The Task sees exactly what the coroutine yielded (a future, or None for a bare yield) and
    sends or throws the outcome back through unchanged.
    """
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - forwarded, including cancellation
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    return await _continue(coro, yielded)


def _close_for_protocol_error(ws: WebSocket[Any], code: int, reason: str) -> None:
    """The client broke the protocol: close once the events before it were handled, in order."""
    ws.close(code, reason)


class BindError(BriocheError, OSError):
    """The server could not listen on the requested address; ``errno`` says why."""


@final
class Server(Generic[T]):
    """A running server. Returned by ``serve()``; also an async context manager.

    >>> async with await server.handler(handler).port(0).serve() as srv:
    ...     print(srv.port)
    """

    __slots__ = (
        "_engine", "_config", "_loop", "_fd", "_handlers", "_busy", "_paused", "_stopped",
        "_stop_called", "_tasks", "_wake_thread", "hostname",
    )
    _engine: Engine
    _config: Config[T]
    _loop: asyncio.AbstractEventLoop
    _fd: int
    _handlers: tuple[Callable[..., Any] | None, ...]
    _busy: dict[WebSocket[T], deque[tuple[Any, ...]]]
    _paused: set[WebSocket[T]]
    _stopped: asyncio.Future[None]
    _stop_called: bool
    _tasks: set[asyncio.Future[Any]]
    _wake_thread: threading.Thread | None
    hostname: str
    """The address the server listens on, as configured."""

    def __init__(self) -> None:
        raise TypeError("use `await server.handler(fn).serve()` to start a Server")

    @classmethod
    def _start(cls, config: Config[T], port: int, loop: asyncio.AbstractEventLoop) -> Server[T]:
        ws = config.websocket_config
        from brioche.websocket import Config as WsConfig

        limits = ws if ws is not None else WsConfig()
        try:
            engine = Engine(
                config.hostname_value,
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
            )
        except OSError as exc:
            where = f"{config.hostname_value}:{port}"
            raise BindError(exc.errno, f"cannot listen on {where}: {exc.strerror or exc}") from exc
        self = object.__new__(cls)
        self._engine = engine
        self._config = config
        self._loop = loop
        self.hostname = config.hostname_value
        self._handlers = (
            limits.on_open_handler, limits.on_text_message, limits.on_bytes_message,
            limits.on_drain_handler, limits.on_close_handler, _close_for_protocol_error,
        )
        self._busy = {}
        self._paused = set()
        self._stopped = loop.create_future()
        self._stop_called = False
        self._tasks = set()
        self._wake_thread = None
        self._fd = engine.fileno()
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
        """The port the server listens on (the chosen one when configured with 0)."""
        return self._engine.port

    @property
    def url(self) -> str:
        """``http://host:port/`` for this server."""
        host = "127.0.0.1" if self.hostname == "0.0.0.0" else self.hostname
        return f"http://{host}:{self.port}/"

    @property
    def pending_websockets(self) -> int:
        """WebSocket connections currently open (or being upgraded)."""
        return self._engine.pending_websockets

    def upgrade(
        self, request: Request, headers: Iterable[tuple[str, str]] = (), data: T | None = None
    ) -> bool:
        """Accept ``request`` as a WebSocket carrying ``data``; False if it cannot be upgraded.

        It cannot when it is not a WebSocket handshake, when it was already answered, or when the
        server has no ``websocket`` config. ``headers`` go into the 101 response.
        """
        if self._config.websocket_config is None:
            return False
        return request._pending.upgrade([(str(k), str(v)) for k, v in headers], data)

    def publish(self, topic: str, message: str | bytes) -> SendStatus:
        """Send ``message`` to every subscriber of ``topic``."""
        return self._engine.publish(topic, message)

    def subscriber_count(self, topic: str) -> int:
        """How many open connections are subscribed to ``topic``."""
        return self._engine.subscriber_count(topic)

    async def stop(self, close_active_connections: bool = False) -> None:
        """Stop listening and wait until every connection has ended.

        With ``close_active_connections=True`` open WebSockets are closed with 1001; otherwise
        they carry on until they close by themselves.
        """
        if not self._stop_called:
            self._stop_called = True
            self._engine.stop(close_active_connections)
        elif close_active_connections:
            self._engine.stop(True)
        await asyncio.shield(self._stopped)

    async def __aenter__(self) -> Server[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(close_active_connections=True)

    def __repr__(self) -> str:
        return f"<brioche.Server {self.url}>"

    # -- the bridge -------------------------------------------------------------------------

    def _on_wake(self) -> None:
        events = self._engine.drain()
        try:
            self._dispatch_batch(events)
        finally:
            # Everything the handlers sent is written here, one send per connection.
            self._engine.end_batch()

    def _dispatch_batch(self, events: list[tuple[Any, ...]]) -> None:
        busy = self._busy
        handlers = self._handlers
        for event in events:
            kind = event[0]
            if kind < _REQUEST:
                ws = event[1]
                if busy and ws in busy:
                    self._park(ws, event)
                elif kind == _TEXT or kind == _BYTES:
                    # The per-message path, inlined: a plain handler that returns None costs
                    # one call here and nothing else.
                    fn = handlers[kind]
                    if fn is None:
                        continue
                    try:
                        result = fn(ws, event[2])
                    except Exception as exc:
                        self._handler_failed(ws, kind, exc)
                        continue
                    if result is not None:
                        self._await_result(ws, kind, result)
                else:
                    self._dispatch(ws, event)
            elif kind == _REQUEST:
                self._on_request(event[1])
            elif kind == _STOPPED:
                self._on_stopped()

    def _dispatch(self, ws: WebSocket[T], event: tuple[Any, ...]) -> bool:
        """Run the handler for ``event``; True when it suspended and now runs as a task."""
        kind = event[0]
        fn = self._handlers[kind]
        if fn is None:
            return False
        try:
            result = fn(*event[1:])
        except Exception as exc:
            self._handler_failed(ws, kind, exc)
            return False
        if result is None:
            return False
        return self._await_result(ws, kind, result)

    def _await_result(self, ws: WebSocket[T], kind: int, result: object) -> bool:
        """Finish a handler's awaitable result; True when it suspended and now runs as a task."""
        try:
            if type(result) is _CoroutineType:
                task = self._step(result)[1]
            elif isawaitable(result):
                task = asyncio.ensure_future(result)
            else:
                return False
        except Exception as exc:
            self._handler_failed(ws, kind, exc)
            return False
        if task is None:
            return False
        if ws not in self._busy:
            self._busy[ws] = deque()
        self._tasks.add(task)
        task.add_done_callback(partial(self._handler_done, ws, kind))
        return True

    def _step(self, coro: Coroutine[Any, Any, Any]) -> tuple[Any, asyncio.Task[Any] | None]:
        """Run ``coro`` until it first suspends: its result, or a task if it suspended.

        Most handlers finish without suspending, and then no task is created at all (a task per
        message would dominate the cost of a small echo). Exceptions propagate.
        """
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value, None
        return None, self._loop.create_task(_resume(coro, yielded))

    def _handler_done(self, ws: WebSocket[T], kind: int, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if isinstance(exc, Exception):
                self._handler_failed(ws, kind, exc)
            elif exc is not None:
                raise exc
        parked = self._busy[ws]
        while parked:
            if self._dispatch(ws, parked.popleft()):
                self._unpause_if_below_limit(ws, parked)
                return
        del self._busy[ws]
        self._unpause_if_below_limit(ws, parked)

    def _park(self, ws: WebSocket[T], event: tuple[Any, ...]) -> None:
        parked = self._busy[ws]
        parked.append(event)
        if len(parked) >= PARKED_EVENTS_LIMIT and ws not in self._paused:
            self._paused.add(ws)
            ws._pause_reading(True)

    def _unpause_if_below_limit(self, ws: WebSocket[T], parked: deque[tuple[Any, ...]]) -> None:
        if len(parked) < PARKED_EVENTS_LIMIT and ws in self._paused:
            self._paused.discard(ws)
            ws._pause_reading(False)

    def _handler_failed(self, ws: WebSocket[T], kind: int, exc: BaseException) -> None:
        name = _EVENT_NAMES.get(kind, "handler")
        if kind == _CLOSE:
            logger.error("%s handler raised", name, exc_info=exc)
            return
        logger.error("%s handler raised; closing the connection with 1011", name, exc_info=exc)
        ws.close(1011, "internal error")

    def _on_request(self, pending: PendingRequest) -> None:
        request = Request(pending)
        try:
            result = self._config.fetch(request, self)
            task: asyncio.Future[Any] | None = None
            if type(result) is _CoroutineType:
                result, task = self._step(result)
            elif isawaitable(result):
                task = asyncio.ensure_future(result)
            if task is not None:
                self._tasks.add(task)
                task.add_done_callback(partial(self._request_done, request))
                return
        except Exception:
            logger.exception("handler raised for %r", request)
            self._reply(request, internal_error())
            return
        self._reply(request, result)

    def _request_done(self, request: Request, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            self._reply(request, internal_error())
            return
        exc = task.exception()
        if exc is not None:
            logger.error("handler raised for %r", request, exc_info=exc)
            self._reply(request, internal_error())
            return
        self._reply(request, task.result())

    def _reply(self, request: Request, result: object) -> None:
        pending = request._pending
        if pending.upgraded:
            return
        if result is None:
            logger.error("handler returned None for %r without upgrading it", request)
            result = internal_error()
        elif not isinstance(result, Response):
            logger.error("handler returned %s for %r, expected a Response",
                         type(result).__name__, request)
            result = internal_error()
        try:
            pending.respond(result.status, list(result.headers), result.body_bytes())
        except ValueError:
            logger.exception("invalid response for %r", request)
            fallback = internal_error()
            pending.respond(fallback.status, list(fallback.headers), fallback.body_bytes())

    def _on_stopped(self) -> None:
        if self._wake_thread is None:
            self._loop.remove_reader(self._fd)
        if not self._stopped.done():
            self._stopped.set_result(None)

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

