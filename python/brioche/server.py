"""The HTTP side: configure a server, serve it, answer requests and upgrade them to WebSockets.

```pycon
>>> async def handler(request: server.Request, srv: brioche.Server[str]) -> server.Response | None:
...     if request.path == "/ws":
...         return server.upgrade(srv, request, [], brioche.random_uuid_v7(), server.bad_request)
...     return server.text("hello")
>>> srv = await server.handler(handler).websocket(websocket.init()).port(0).serve()
>>> srv.url.startswith("http://127.0.0.1:")
True
>>> await srv.stop()
```
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import re
import socket
import warnings
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

from brioche import _brioche, _server
from brioche import websocket as _websocket
from brioche._buffer import Buffer
from brioche.websocket import _check_bool, _check_handler, _check_seconds, _check_size
from brioche._http import (
    HeaderItems,
    Headers,
    Request,
    Response,
    SocketAddress,
    bad_request,
    html,
    internal_error,
    json,
    not_found,
    ok,
    text,
)
from brioche._server import (
    BindError,
    Handler,
    Server,
    _hang_up_stops,
    _log_hang_up,
    _reload_tls_logged,
    _wildcard_note,
    run_loop,
)
from brioche._workers import WorkerSlot, run_workers


__all__ = [
    "Config",
    "Handler",
    "Headers",
    "Request",
    "Response",
    "Server",
    "Serving",
    "SocketAddress",
    "bad_request",
    "handler",
    "handshake_timeout",
    "hostname",
    "html",
    "internal_error",
    "json",
    "max_connections",
    "tls",
    "max_incoming_bytes",
    "max_request_body_size",
    "max_request_header_size",
    "not_found",
    "ok",
    "port",
    "publish",
    "pubsub_redis",
    "RedisPubSub",
    "reload",
    "request_ip",
    "run",
    "serve",
    "serve_forever",
    "sock",
    "stop",
    "subscriber_count",
    "text",
    "timeout",
    "unix",
    "upgrade",
    "wait_closed",
    "websocket",
    "worker_timeout",
    "workers",
]

if TYPE_CHECKING:
    # A server's data type is Any where nothing fixes it (a lambda handler), not unknown: a
    # checker's strict mode would flag every use of such a config. typing_extensions is the
    # checker's (PEP 696 defaults), not a dependency.
    import typing_extensions

    T = typing_extensions.TypeVar("T", default=Any)
else:
    T = TypeVar("T")

async def _resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[str]:
    """The addresses to bind for ``host``, every one it resolves to, in the resolver's order.

    Looked up off the loop (getaddrinfo blocks). ``localhost`` is usually both ``127.0.0.1`` and
    ``::1``: a client may try either, so the server listens on both, on one port.
    """
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BindError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return _bindable(infos, host, port)


def _bindable(infos: list[tuple[Any, ...]], host: str, port: int) -> list[str]:
    # An IPv6 link-local address comes with a scope ("fe80::1%eth0"): the engine takes plain
    # literals, so those are left out.
    addresses = [
        str(info[4][0]) for info in infos
        if info[0] in (socket.AF_INET, socket.AF_INET6) and "%" not in str(info[4][0])
    ]
    if not addresses:
        raise BindError(0, f"cannot listen on {host}:{port}: it has no address")
    return list(dict.fromkeys(addresses))


def _default_port() -> int:
    raw = os.environ.get("PORT")
    if raw is None:
        return 3000
    try:
        return _check_port(int(raw))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"$PORT must be a port number, got {raw!r}") from exc


def _check_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"port must be an int, got {type(value).__name__}")
    if not 0 <= value <= 65535:
        raise ValueError(f"port must be in 0..65535, got {value}")
    return value


def _check_worker_timeout(value: object) -> float:
    seconds = _check_seconds("worker_timeout", value)
    if 0 < seconds < 1:
        # A beat every quarter of it: both ends would spin, and any hiccup would kill.
        raise ValueError(f"worker_timeout must be 0 (never) or at least 1 second, got {value!r}")
    return seconds


def _check_path(name: str, value: object) -> str:
    """A filesystem path given as ``str`` or ``os.PathLike[str]``: TypeError for anything else."""
    path = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a str or os.PathLike[str] path, got {type(value).__name__}")
    if not path or "\0" in path:
        raise ValueError(f"{name} must be a non-empty path without NUL, got {path!r}")
    return path


@final
@dataclasses.dataclass(frozen=True, slots=True)
class RedisPubSub:
    """Where topics are shared with other processes: what :meth:`Config.pubsub_redis` sets."""

    url: str
    sharded: bool = False
    namespace: str = "brioche:"

    def __repr__(self) -> str:
        # The URL's password stays out of logs and tracebacks that print the config.
        url = re.sub(r"^(rediss?://[^:@/]*:)[^/]*@", r"\1***@", self.url)
        return f"RedisPubSub(url={url!r}, sharded={self.sharded!r}, namespace={self.namespace!r})"


@dataclasses.dataclass(frozen=True, slots=True)
class Config(Generic[T]):
    """A server that is not running yet. Each setter returns a new ``Config``."""

    fetch: Handler[T]
    websocket_config: _websocket.Config[T] | None = None
    port_number: int | None = None
    hostname_value: str | None = None
    """``None``: not set, ``"0.0.0.0"`` unless ``unix`` or ``sock`` says where to listen."""
    unix_path: str | None = None
    unix_mode: int | None = None
    listen_socket: socket.socket | int | None = None
    max_request_body_size_bytes: int = 1024 * 1024
    max_request_header_size_bytes: int = 64 * 1024
    handshake_timeout_seconds: float = 10.0
    max_connections_value: int = 0
    max_incoming_bytes_value: int = 1 << 30
    tls_files: tuple[str, str] | None = None
    workers_count: int = 1
    worker_timeout_seconds: float = 30.0
    # Set by run(workers=n) in each worker's copy of the config (brioche._workers).
    worker_slot: WorkerSlot | None = dataclasses.field(default=None, repr=False)
    pubsub_redis_value: RedisPubSub | None = None

    def __post_init__(self) -> None:
        # A Config built by hand is checked as the setters check theirs (the paths, the socket
        # and Redis are checked by their setters, and when the server starts).
        _check_handler(self.fetch, "handler", "request, server")
        if self.websocket_config is not None and not isinstance(self.websocket_config, _websocket.Config):
            raise TypeError(f"expected a websocket.Config, got {type(self.websocket_config).__name__}")
        if self.port_number is not None:
            _check_port(self.port_number)
        _check_size("max_request_body_size", self.max_request_body_size_bytes, minimum=0)
        _check_size("max_request_header_size", self.max_request_header_size_bytes, minimum=8192)
        if not _check_seconds("handshake_timeout", self.handshake_timeout_seconds) > 0:
            raise ValueError("handshake_timeout must be a number of seconds > 0, got "
                             f"{self.handshake_timeout_seconds!r}")
        _check_size("max_connections", self.max_connections_value, minimum=0)
        _check_size("max_incoming_bytes", self.max_incoming_bytes_value, minimum=0)
        _check_size("workers", self.workers_count, minimum=1)
        _check_worker_timeout(self.worker_timeout_seconds)

    def websocket(self, config: _websocket.Config[T]) -> Config[T]:
        """Accept WebSockets with this configuration (handlers and limits)."""
        if not isinstance(config, _websocket.Config):
            raise TypeError(f"expected a websocket.Config, got {type(config).__name__}")
        return dataclasses.replace(self, websocket_config=config)

    def port(self, port: int) -> Config[T]:
        """TCP port to listen on; 0 picks a free one (default: ``$PORT`` or 3000)."""
        return dataclasses.replace(self, port_number=_check_port(port))

    def hostname(self, hostname: str) -> Config[T]:
        """Address to listen on (default ``"0.0.0.0"``).

        ``"::"`` takes IPv6 and IPv4 where the OS allows dual-stack sockets (Linux does). A name
        is resolved when the server starts, and it listens on every address the name has, on
        one port (``localhost``: ``127.0.0.1`` and ``::1``).
        """
        if not isinstance(hostname, str):
            raise TypeError(f"hostname must be a str, got {type(hostname).__name__}")
        if not hostname:
            raise ValueError("hostname must be a non-empty string")
        return dataclasses.replace(self, hostname_value=hostname)

    def unix(self, path: str | os.PathLike[str], mode: int | None = None) -> Config[T]:
        """Listen on a Unix domain socket at ``path`` instead of a hostname and port.

        A socket file already there that nobody accepts on (left by a server that crashed) is
        replaced; one a server accepts on gives ``BindError``, and so does any other kind of
        file, which is never removed. ``stop()`` removes the file, if it is still the one this
        server created. ``mode`` (e.g. ``0o660``) sets its permissions before any client can
        connect; without it the umask decides. Clients need write permission to connect.
        """
        path = _check_path("unix path", path)
        if mode is not None:
            if isinstance(mode, bool) or not isinstance(mode, int):
                raise TypeError(f"unix mode must be an int like 0o660, got {type(mode).__name__}")
            if not 0 <= mode <= 0o7777:
                raise ValueError(f"unix mode must be a permission mode in 0..0o7777, got {mode!r}")
        return dataclasses.replace(self, unix_path=path, unix_mode=mode)

    def sock(self, sock: socket.socket | int) -> Config[T]:
        """Serve on a socket that is already bound, a ``socket.socket`` or a file descriptor.

        For systemd socket activation (``LISTEN_FDS``) and process managers that bind for you.
        A TCP (IPv4, IPv6) or Unix stream socket, bound, listening or not (the server calls
        ``listen`` if needed). The server works on a duplicate of the descriptor, made when it
        starts: yours stays open, yours to close; close it once ``serve()`` has returned so that
        ``stop()`` really stops the listening (a listening socket closes with its last
        descriptor). The socket is made non-blocking, a flag the duplicate shares. A Unix
        socket's file is not removed at ``stop()``: whoever created it owns it.
        """
        if isinstance(sock, bool) or not isinstance(sock, (socket.socket, int)):
            raise TypeError(f"sock must be a socket.socket or a file descriptor, got {type(sock).__name__}")
        if isinstance(sock, int) and sock < 0:
            raise ValueError(f"sock takes a file descriptor >= 0, got {sock}")
        return dataclasses.replace(self, listen_socket=sock)

    def tls(self, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> Config[T]:
        """Serve HTTPS and ``wss://`` (TLS 1.2 and 1.3, ALPN ``http/1.1``) on the TCP port.

        ``cert_file`` is PEM: the server's certificate, then the intermediates up to the root
        (a "full chain"); ``key_file`` its unencrypted PEM key (PKCS#8, PKCS#1 or SEC1). Both
        are read when the server starts: a missing file, an encrypted key or one that does not
        match the certificate is a ``BriocheError`` from ``serve()``. ``srv.reload_tls()`` (or
        SIGHUP under ``run()``) reads them again. ``handshake_timeout`` covers the TLS handshake
        and the request together. Not with ``unix()``.
        """
        files = (_check_path("tls cert_file", cert_file), _check_path("tls key_file", key_file))
        return dataclasses.replace(self, tls_files=files)

    def max_request_body_size(self, size: int) -> Config[T]:
        """Largest HTTP request body accepted, in bytes (default 1 MiB); larger gets 413."""
        value = _check_size("max_request_body_size", size, minimum=0)
        return dataclasses.replace(self, max_request_body_size_bytes=value)

    def max_request_header_size(self, size: int) -> Config[T]:
        """Largest request head, in bytes (default 64 KiB); larger gets 431.

        The head is counted as its request line and headers spell it (``name: value`` lines,
        without optional whitespace), to the byte. hyper refuses some heads first: a request
        target over 64 KiB with 414 or 431, more than 100 headers with 431.
        """
        value = _check_size("max_request_header_size", size, minimum=8192)
        return dataclasses.replace(self, max_request_header_size_bytes=value)

    def handshake_timeout(self, seconds: float) -> Config[T]:
        """Seconds a client has to send its whole request, head and body (default 10).

        A request still incomplete then gets 408 and the connection is closed (slowloris guard).
        Reading a response is not timed, but a response write that makes no progress for this
        long (a client that reads none of it) ends the connection.
        """
        value = _check_seconds("handshake_timeout", seconds)
        if not value > 0:
            raise ValueError(f"handshake_timeout must be a number of seconds > 0, got {seconds!r}")
        return dataclasses.replace(self, handshake_timeout_seconds=value)

    def max_connections(self, count: int) -> Config[T]:
        """Most WebSockets open at once; past it handshakes get 503 (default 0: no limit).

        A connection counts until it has ended and its close is flushed (up to about 6 s after
        ``on_close``), although ``pending_websockets`` stops counting it at ``on_close``: what closing
        connections still have queued counts against this limit too."""
        value = _check_size("max_connections", count, minimum=0)
        return dataclasses.replace(self, max_connections_value=value)

    def max_incoming_bytes(self, size: int) -> Config[T]:
        """Bytes all clients together may make the server hold (default 1 GiB, 0: no limit).

        It counts messages still arriving and messages waiting for their handler. Past it, the
        connections holding 64 KiB or more stop being read until it frees up (their clients
        wait, held back by TCP), while those holding less go on; a paused client whose message
        is still incomplete at its ``message_timeout`` is closed with 1008. HTTP request bodies
        count from their first byte until the handler answers; one that does not fit gets 503.
        Each time a connection stops reading for it counts in ``stats()["reads_paused"]``, and
        the first such pause in a minute is logged at WARNING on ``brioche.ws`` with the client
        and the limit.
        """
        value = _check_size("max_incoming_bytes", size, minimum=0)
        return dataclasses.replace(self, max_incoming_bytes_value=value)

    def workers(self, count: int) -> Config[T]:
        """Serve from ``count`` processes sharing the port (``SO_REUSEPORT``); ``run()`` only.

        Each worker has its own loop and engine, and the kernel spreads connections over them.
        Publishes reach every worker's subscribers. The process that calls ``run()`` supervises
        them: it restarts a worker that dies and stops them all on SIGINT or SIGTERM. The
        config is pickled to reach the workers, so its handlers must be module-level functions
        of an importable module (or of the script). ``serve()`` refuses a config with more
        than one worker. Default 1: ``run()`` serves in its own process.
        """
        value = _check_size("workers", count, minimum=1)
        return dataclasses.replace(self, workers_count=value)

    def worker_timeout(self, seconds: float) -> Config[T]:
        """Restart a worker whose event loop has not run for ``seconds`` (default 30, at least
        1; 0: never), as gunicorn's ``--timeout`` does.

        With :meth:`workers` of 2 or more (with one, nothing watches the process that serves),
        each serving worker's loop tells the supervisor that it runs, every second (every
        quarter of ``seconds`` if that is shorter). A worker silent for
        ``seconds`` has its loop blocked (a handler that never returns, a synchronous call that
        hangs): it answers none of its clients while the kernel goes on giving it its share of
        the new ones. It then writes the Python stack of each of its threads to its stderr
        (faulthandler's ``dump_traceback_later``, from a thread of its own), and, one beat later
        if still silent, the supervisor logs it at ERROR, kills it (SIGKILL) and restarts it as
        any worker that died; its clients' connections are cut. A worker is watched from the
        moment it serves the port. The watchdog replaces an app's own ``dump_traceback_later``
        (one per process): set 0 to keep it. A worker stopped (SIGSTOP, a debugger) for that
        long is killed too (set 0 while debugging one); after a stop of the whole process group
        (Ctrl+Z) that long, the stacks may be written with no kill following. Without workers
        there is no supervisor, and this is unused.
        """
        value = _check_worker_timeout(seconds)
        return dataclasses.replace(self, worker_timeout_seconds=value)

    def pubsub_redis(
        self, url: str, *, sharded: bool = False, namespace: str = "brioche:"
    ) -> Config[T]:
        """Share topics with every process (on any machine) using the same Redis at ``url``.

        ``url`` is ``redis://[user:password@]host[:port][/db]``, or ``rediss://`` for TLS. Each
        ``publish`` reaches this process's subscribers as before and, through Redis, those of
        the other processes; the core holds one connection to Redis per server, subscribes to
        a topic's channel (``namespace`` + topic) only while this process has subscribers to
        it, and fans messages out to its sockets without Python. ``sharded=True`` uses Redis 7's
        sharded pub/sub (``SSUBSCRIBE``/``SPUBLISH``): on a Redis Cluster, ``url`` names any
        node, and each channel goes to the master of its hash slot (one connection per master,
        MOVED followed; order is kept per publisher and topic); on a standalone Redis, the one
        connection.

        Redis pub/sub has one set of channels per Redis (per cluster), whatever the URL's db
        (``/1`` and ``/2`` share them): applications on one Redis are kept apart by their
        ``namespace`` alone, and only if none of their namespaces is a prefix of another's.
        End each with a separator it has nowhere else, as the default ``brioche:`` does:
        ``chat`` and ``chat2`` are not apart (``chat2``'s topic ``x`` and ``chat``'s topic
        ``2x`` are one channel, ``chat2x``), ``chat:`` and ``chat2:`` are.

        Delivery between processes is at most once: while Redis is unreachable, local delivery
        goes on, publishes are lost for the other processes (``redis_publishes_lost`` in
        :meth:`Server.stats`), and the core reconnects on its own. ``publish`` returns the
        local outcome and ``subscriber_count`` counts this process's subscribers only.
        """
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, got {type(url).__name__}")
        if not url.startswith(("redis://", "rediss://")):
            raise ValueError(f"url must start with redis:// or rediss://, got {url.split(':')[0]!r}")
        # Here, not at serve(): with workers(n), each of n processes failed on it, restarted.
        _brioche.check_redis_url(url)
        _check_bool("sharded", sharded)
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
        value = RedisPubSub(url, sharded, namespace)
        return dataclasses.replace(self, pubsub_redis_value=value)

    def serve(self) -> Serving[T]:
        """Start listening on the running event loop.

        Await it for the started ``Server``, or use it as an async context manager, which stops
        the server (closing connections with 1001) on the way out, as ``websockets.serve`` does:

        ```pycon
        >>> config = server.handler(lambda request, srv: server.text("hi")).hostname("127.0.0.1")
        >>> async with config.port(0).serve() as srv:
        ...     print(srv.url.startswith("http://127.0.0.1:"))
        True
        ```

        A server still running when the loop ends (``asyncio.run`` returning, or any runner
        that calls ``loop.shutdown_asyncgens()``) is stopped then, as ``run()`` stops it.
        """
        if self.workers_count > 1:
            raise ValueError(
                "serve() runs one server on the running loop: workers(n) needs run(), which "
                "starts and supervises the worker processes"
            )
        return Serving(self)

    async def _start(self) -> Server[T]:
        loop = asyncio.get_running_loop()
        tcp_set = [name for name, value in (("hostname", self.hostname_value),
                                            ("port", self.port_number)) if value is not None]
        if self.listen_socket is not None:
            others = [*tcp_set, *(["unix"] if self.unix_path is not None else [])]
            if others:
                given = " and ".join(f"{name}()" for name in others)
                raise ValueError(f"sock() says where to listen: it cannot be combined with {given}")
            fd = self.listen_socket
            if isinstance(fd, socket.socket):
                fd = fd.fileno()
                if fd < 0:
                    raise ValueError("sock() was given a closed socket")
            return Server._start(self, 0, loop, [], fd=fd)
        if self.unix_path is not None:
            if self.tls_files is not None:
                raise ValueError("tls() serves a TCP port: it cannot be combined with unix()")
            if tcp_set:
                given = " and ".join(f"{name}()" for name in tcp_set)
                raise ValueError(f"unix() replaces hostname() and port(): it cannot be combined with {given}")
            return Server._start(self, 0, loop, [], unix=self.unix_path)
        port_number = _default_port() if self.port_number is None else self.port_number
        hostname = "0.0.0.0" if self.hostname_value is None else self.hostname_value
        addresses = await _resolve(loop, hostname, port_number)
        return Server._start(self, port_number, loop, addresses)

    def run(
        self,
        *,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
        workers: int | None = None,
    ) -> None:
        """Serve until Ctrl+C or SIGTERM (or SIGHUP without TLS), then close every connection
        with 1001 and return.

        It stops as ``stop(close_active_connections=True)`` does (``async`` HTTP handlers still
        running are cancelled at once, their clients answered 503), and gives the handlers left,
        each connection's ``on_close`` among them, a grace period of 10 seconds: the handler
        tasks still running then are cancelled, on_close's too, a WARNING says how many, and
        ``run()`` returns. With workers each worker does the same, and the supervisor kills one
        still alive 15 seconds after its SIGTERM. A process manager must wait longer than that
        before it kills the process (systemd's ``TimeoutStopSec``). More Ctrl+C or SIGTERM
        meanwhile change nothing. A handler that catches the cancellation and carries on
        awaiting holds the stop up still: only the process manager's SIGKILL ends that one.

        ``loop_factory`` makes the event loop to serve on: ``uvloop.new_event_loop`` for uvloop
        (default: asyncio's own loop). ``workers`` overrides :meth:`workers`: with more than
        one, this process starts that many worker processes, supervises them and returns once
        they all stopped (a ``TypeError`` first if the config cannot be pickled, a
        ``ValueError`` if the temporary directory, where the workers' relay sockets go, is too
        deep for a unix socket's path: set TMPDIR to a shorter one).
        """
        config = self if workers is None else self.workers(workers)
        if config.workers_count == 1:
            run_loop(_serve_until_signalled(config), loop_factory)
            return
        _run_workers(config, loop_factory, None)


# `Server` (in _server, which this module imports) annotates its config with this class: bound
# there too, so that `typing.get_type_hints(Server)` resolves it.
setattr(_server, "Config", Config)  # noqa: B010 - a type cannot be assigned as an attribute for mypy


@final
class Serving(Generic[T]):
    """What ``serve()`` returns: await it for the ``Server``, or ``async with`` it.

    ``async with`` stops the server on the way out, closing open connections with 1001. One
    neither awaited nor entered starts nothing, and warns (``RuntimeWarning``) when it is
    dropped, as a coroutine never awaited does.
    """

    __slots__ = ("_config", "_server", "_used")

    def __init__(self, config: Config[T]) -> None:
        self._config = config
        self._server: Server[T] | None = None
        self._used = False

    def __await__(self) -> Generator[Any, None, Server[T]]:
        self._used = True
        return self._config._start().__await__()

    async def __aenter__(self) -> Server[T]:
        self._used = True
        if self._server is not None:
            # A second server in the one slot: the first would never be stopped.
            raise RuntimeError("this serve() is already entered; call serve() again for another server")
        self._server = await self._config._start()
        return self._server

    def __del__(self) -> None:
        # `Bun.serve()` listens at once; `serve()` without `await` (or `async with`) silently
        # did nothing, and no "never awaited" warning came, `Serving` being no coroutine.
        if not self._used:
            warnings.warn(
                "serve() was never awaited: nothing is listening (use `await config.serve()` "
                "or `async with config.serve() as srv:`)",
                RuntimeWarning,
                stacklevel=2,
            )

    async def __aexit__(self, *exc_info: object) -> None:
        srv, self._server = self._server, None
        if srv is not None:
            await srv.stop(close_active_connections=True)


def _run_workers(
    config: Config[Any],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None,
    on_ready: Callable[[int, list[int]], None] | None,
) -> None:
    """Resolve the hostname here (the workers bind what the parent reserved), then supervise."""
    if config.unix_path is not None or config.listen_socket is not None:
        raise ValueError(
            "workers(n) share a TCP port (SO_REUSEPORT): they cannot serve on unix() or sock()"
        )
    port_number = _default_port() if config.port_number is None else config.port_number
    hostname = "0.0.0.0" if config.hostname_value is None else config.hostname_value
    addresses = _resolve_now(hostname, port_number)
    run_workers(config, config.workers_count, addresses, port_number, loop_factory, on_ready)


def _resolve_now(host: str, port: int) -> list[str]:
    """``_resolve``'s addresses, looked up on this thread: every one, as each worker binds them
    all (``localhost``: both ``127.0.0.1`` and ``::1``)."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BindError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return _bindable(infos, host, port)


async def _serve_until_signalled(config: Config[Any]) -> None:
    import signal

    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop_requested.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix loops
            pass
    srv = await config.serve()
    # As the workers' supervisor says where they listen: the one line that tells an operator the
    # server is up, and where. `url` names the loopback for a wildcard address, which alone
    # would read as a server only this machine can reach.
    logging.getLogger("brioche").info("listening on %s%s", srv.url, _wildcard_note(srv.hostname))
    try:
        if config.tls_files is not None:
            loop.add_signal_handler(signal.SIGHUP, _reload_tls_logged, srv)
        elif _hang_up_stops():
            loop.add_signal_handler(signal.SIGHUP, _hang_up, stop_requested)
    except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix loops
        pass
    try:
        await stop_requested.wait()
    finally:
        await srv._stop_gracefully()


def _hang_up(stop_requested: asyncio.Event) -> None:
    _log_hang_up()
    stop_requested.set()


def handler(fn: Handler[T]) -> Config[T]:
    """A server ``Config`` that answers every HTTP request with ``fn(request, server)``.

    ``fn`` may be ``async def`` or a plain function. An exception in it gives a 500 response and a
    log line on the ``brioche`` logger; the server carries on.
    """
    return Config(fetch=fn)


def websocket(config: Config[T], ws_config: _websocket.Config[T]) -> Config[T]:
    """Module form of :meth:`Config.websocket`."""
    return config.websocket(ws_config)


def port(config: Config[T], port: int) -> Config[T]:
    """Module form of :meth:`Config.port`."""
    return config.port(port)


def hostname(config: Config[T], hostname: str) -> Config[T]:
    """Module form of :meth:`Config.hostname`."""
    return config.hostname(hostname)


def unix(config: Config[T], path: str | os.PathLike[str], mode: int | None = None) -> Config[T]:
    """Module form of :meth:`Config.unix`."""
    return config.unix(path, mode)


def sock(config: Config[T], sock: socket.socket | int) -> Config[T]:
    """Module form of :meth:`Config.sock`."""
    return config.sock(sock)


def max_request_body_size(config: Config[T], size: int) -> Config[T]:
    """Module form of :meth:`Config.max_request_body_size`."""
    return config.max_request_body_size(size)


def max_request_header_size(config: Config[T], size: int) -> Config[T]:
    """Module form of :meth:`Config.max_request_header_size`."""
    return config.max_request_header_size(size)


def handshake_timeout(config: Config[T], seconds: float) -> Config[T]:
    """Module form of :meth:`Config.handshake_timeout`."""
    return config.handshake_timeout(seconds)


def tls(
    config: Config[T], cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]
) -> Config[T]:
    """Module form of :meth:`Config.tls`."""
    return config.tls(cert_file, key_file)


def max_connections(config: Config[T], count: int) -> Config[T]:
    """Module form of :meth:`Config.max_connections`."""
    return config.max_connections(count)


def max_incoming_bytes(config: Config[T], size: int) -> Config[T]:
    """Module form of :meth:`Config.max_incoming_bytes`."""
    return config.max_incoming_bytes(size)


def pubsub_redis(
    config: Config[T], url: str, *, sharded: bool = False, namespace: str = "brioche:"
) -> Config[T]:
    """Module form of :meth:`Config.pubsub_redis`."""
    return config.pubsub_redis(url, sharded=sharded, namespace=namespace)


def serve(config: Config[T]) -> Serving[T]:
    """Module form of :meth:`Config.serve`: ``await serve(config)`` or ``async with serve(config)``."""
    return config.serve()


def run(
    config: Config[Any],
    *,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    workers: int | None = None,
) -> None:
    """Module form of :meth:`Config.run`: ``run(config, loop_factory=uvloop.new_event_loop)``.

    ``run(config, workers=4)`` serves from four supervised processes (see :meth:`Config.workers`).
    """
    config.run(loop_factory=loop_factory, workers=workers)


def workers(config: Config[T], count: int) -> Config[T]:
    """Module form of :meth:`Config.workers`."""
    return config.workers(count)


def worker_timeout(config: Config[T], seconds: float) -> Config[T]:
    """Module form of :meth:`Config.worker_timeout`."""
    return config.worker_timeout(seconds)


def upgrade(
    srv: Server[T],
    request: Request,
    headers: HeaderItems,
    data: T,
    fallback: Callable[[], Response],
    *,
    subprotocol: str | None = None,
) -> Response | None:
    """Upgrade ``request`` to a WebSocket carrying ``data``; ``None`` on success, else ``fallback()``.

    ``headers`` (pairs, or a mapping) are added to the ``101 Switching Protocols`` response, and so is
    ``subprotocol``, one of ``request.subprotocols`` (else ``ValueError``); as for
    :meth:`Server.upgrade`, the handshake's own headers are a ``ValueError``, a
    ``Sec-WebSocket-Protocol`` among ``headers`` is taken as ``subprotocol``, and a server without
    a ``websocket`` config is a ``TypeError``.
    """
    if srv.upgrade(request, headers, data, subprotocol=subprotocol):
        return None
    return fallback()


def timeout(srv: Server[Any], request: Request, seconds: float) -> None:
    """Module form of :meth:`Server.timeout`."""
    srv.timeout(request, seconds)


async def stop(srv: Server[Any], close_active_connections: bool = False) -> None:
    """Module form of :meth:`Server.stop`."""
    await srv.stop(close_active_connections)


def publish(
    srv: Server[Any], topic: str, message: str | Buffer, compress: bool = False
) -> _websocket.SendStatus:
    """Module form of :meth:`Server.publish`."""
    return srv.publish(topic, message, compress)


def request_ip(srv: Server[Any], request: Request) -> SocketAddress | None:
    """Module form of :meth:`Server.request_ip`."""
    return srv.request_ip(request)


def reload(
    srv: Server[T],
    *,
    handler: Handler[T] | None = None,
    websocket: _websocket.Config[T] | None = None,
) -> None:
    """Module form of :meth:`Server.reload`."""
    srv.reload(handler=handler, websocket=websocket)


async def serve_forever(srv: Server[Any]) -> None:
    """Module form of :meth:`Server.serve_forever`."""
    await srv.serve_forever()


async def wait_closed(srv: Server[Any]) -> None:
    """Module form of :meth:`Server.wait_closed`."""
    await srv.wait_closed()


def subscriber_count(srv: Server[Any], topic: str) -> int:
    """Module form of :meth:`Server.subscriber_count`."""
    return srv.subscriber_count(topic)
