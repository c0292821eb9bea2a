"""Type stubs for the Rust extension module ``brioche._brioche``."""

from collections.abc import Callable, Sequence
from contextvars import Context
from typing import Any, Generic, Literal, TypeVar, final

from typing_extensions import Buffer

from brioche._enums import ReadyState

__all__ = [
    "BriocheError", "MessageSent", "MessageBackpressured", "MessageDropped", "WebSocket",
    "PendingRequest", "Engine", "random_uuid_v7", "check_redis_url", "EVENT_OPEN", "EVENT_TEXT",
    "EVENT_BYTES", "EVENT_DRAIN", "EVENT_CLOSE", "EVENT_FAIL", "EVENT_PING", "EVENT_PONG",
    "EVENT_TEXT_RUN", "EVENT_BYTES_RUN", "EVENT_REQUEST", "EVENT_STOPPED", "EVENT_LOG",
    "EVENT_LINKS_ENDED",
    "__version__",
]

_T = TypeVar("_T")
_R = TypeVar("_R")

__version__: str
"""Cargo.toml's version, the one in the package metadata."""

EVENT_OPEN: int
EVENT_TEXT: int
EVENT_BYTES: int
EVENT_DRAIN: int
EVENT_CLOSE: int
EVENT_FAIL: int
EVENT_PING: int
EVENT_PONG: int
EVENT_TEXT_RUN: int
EVENT_BYTES_RUN: int
EVENT_REQUEST: int
EVENT_STOPPED: int
EVENT_LOG: int
EVENT_LINKS_ENDED: int

class BriocheError(Exception):
    """Root of the exceptions brioche raises."""

@final
class MessageSent:
    """The message was queued and the socket is not congested."""

    __match_args__ = ("bytes_sent",)
    def __new__(cls, bytes_sent: int) -> MessageSent: ...
    @property
    def bytes_sent(self) -> int:
        """Payload bytes accepted (the UTF-8 length for text)."""
    def __getnewargs__(self) -> tuple[int]: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class MessageBackpressured:
    """The message was queued, but the socket is congested: slow down until ``on_drain``."""

    __match_args__ = ()
    def __init__(self) -> None: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __bool__(self) -> Literal[True]: ...

@final
class MessageDropped:
    """The message was discarded: the socket is not open or is over its backpressure limit. For
    a publish: no subscriber of this process got it, or at least one dropped it (the others got
    it); other processes' subscribers (workers, Redis) are not counted.

    The one false status: ``if not ws.send(m)`` finds the drops, as ``if (!ws.send(m))`` does in
    Bun, whose ``send`` returns 0 for them."""

    __match_args__ = ()
    def __init__(self) -> None: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __bool__(self) -> Literal[False]: ...

_SendStatus = MessageSent | MessageBackpressured | MessageDropped

@final
class WebSocket(Generic[_T]):
    """A server-side WebSocket connection. Every method is synchronous and never blocks."""

    @property
    def data(self) -> _T:
        """The context passed to ``server.upgrade``, or what was assigned since."""
    @data.setter
    def data(self, value: _T) -> None: ...
    @property
    def subprotocol(self) -> str | None:
        """The subprotocol chosen at the upgrade, ``None`` when none was."""
    @property
    def ready_state(self) -> ReadyState:
        """``ReadyState.CONNECTING`` (0), ``OPEN`` (1), ``CLOSING`` (2) or ``CLOSED`` (3)."""
    @property
    def remote_address(self) -> str:
        """The client's IP address; ``""`` over a Unix socket."""
    @property
    def buffered_amount(self) -> int:
        """Bytes accepted but not yet written to the kernel; 0 once the connection ended
        abruptly, or once its last frames after a close are written or given up."""
    @property
    def subscriptions(self) -> list[str]:
        """The topics this socket is subscribed to, in the order subscribed (an unsubscribe
        moves the last into the place it leaves)."""
    @property
    def per_message_deflate(self) -> bool:
        """Whether the client negotiated permessage-deflate."""
    def send(self, message: str | Buffer, compress: bool = False) -> _SendStatus:
        """Queue a message: text for a ``str``, binary for bytes-like; ``compress`` if negotiated."""
    def send_bytes(self, message: Buffer, compress: bool = False) -> _SendStatus:
        """Queue a binary message."""
    def publish(
        self, topic: str, message: str | Buffer, compress: bool = False
    ) -> _SendStatus:
        """Send a message to the subscribers of ``topic`` (not to this socket unless
        publish_to_self): text for a ``str``, binary for bytes-like."""
    def publish_bytes(
        self, topic: str, message: Buffer, compress: bool = False
    ) -> _SendStatus:
        """Send bytes to the subscribers of ``topic``."""
    def subscribe(self, topic: str) -> bool:
        """Subscribe to ``topic``; idempotent. False, subscribing nothing, once the socket is
        closing or closed (as Bun's ``subscribe``)."""
    def unsubscribe(self, topic: str) -> bool:
        """Unsubscribe from ``topic``; whether the socket was subscribed to it (as Bun's)."""
    def is_subscribed(self, topic: str) -> bool:
        """Whether this socket is subscribed to ``topic``."""
    def cork(self, callback: Callable[[WebSocket[_T]], _R]) -> _R:
        """Run ``callback(self)``; what it sends is written in one go, unless it passes
        ``backpressure_limit`` (then what is queued is written at once, as Bun's ``cork``
        does). ``callback`` is a plain function: an ``async def`` one is a ``TypeError``."""
    def close(self, code: int | None = None, reason: str = "") -> None:
        """Start the closing handshake with ``code`` (1000 for ``None``, Bun's ``undefined``) and
        ``reason``, as Bun's ``close``: the reason is cut to 123 UTF-8 bytes at a character
        boundary, and 0, 1005 or 1006 send a close frame without a code (or reason). Other codes
        no frame may carry are a ``ValueError``."""
    def terminate(self) -> None:
        """End the connection without a close frame; what was queued is written first, as far
        as the kernel takes it now. ``ready_state`` is ``CLOSED`` from then on."""
    def ping(self, payload: str | Buffer | None = None) -> _SendStatus:
        """Send a ping frame (payload at most 125 bytes)."""
    def pong(self, payload: str | Buffer | None = None) -> _SendStatus:
        """Send a pong frame (payload at most 125 bytes)."""
    @property
    def _context(self) -> Context:
        """The ``contextvars.Context`` this connection's handlers run in."""
    def _pause_reading(self, paused: bool) -> None: ...
    def _hold_parked(self, size: int) -> None: ...
    def _release_parked(self, size: int) -> None: ...
    def _hold_handler(self) -> None: ...
    def _release_handler(self) -> None: ...
    def _inject_panic(self) -> None: ...
    def __class_getitem__(cls, item: Any) -> Any: ...

@final
class PendingRequest:
    """An HTTP request waiting for its answer (internal: wrapped by ``server.Request``)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def query(self) -> str: ...
    @property
    def headers(self) -> list[tuple[str, str]]: ...
    @property
    def body(self) -> bytes: ...
    @property
    def remote_address(self) -> str: ...
    @property
    def client(self) -> str: ...
    @property
    def remote_port(self) -> int: ...
    @property
    def is_websocket(self) -> bool: ...
    @property
    def upgraded(self) -> bool: ...
    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None: ...
    def upgrade(
        self,
        headers: list[tuple[str, str]],
        data: Any,
        context: Context,
        subprotocol: str | None = None,
    ) -> bool: ...

@final
class Engine:
    """One listening server inside the tokio runtime (internal: wrapped by ``brioche.Server``)."""

    def __new__(
        cls,
        addresses: list[str],
        port: int,
        *,
        max_request_body_size: int,
        max_payload_length: int,
        backpressure_limit: int,
        close_on_backpressure_limit: bool,
        idle_timeout: int,
        publish_to_self: bool,
        send_pings: bool,
        websockets_enabled: bool,
        handshake_timeout: float,
        max_request_header_size: int,
        max_connections: int,
        message_timeout: float,
        max_incoming_bytes: int,
        reuse_port: bool = False,
        relay_path: str | None = None,
        relay_peers: Sequence[str] = ...,
        unix: str | None = None,
        unix_mode: int | None = None,
        fd: int | None = None,
        redis_url: str | None = None,
        redis_sharded: bool = False,
        redis_namespace: str = ...,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        per_message_deflate: tuple[bool, bool, int, int] | None = None,
    ) -> Engine: ...
    @property
    def relay_links(self) -> tuple[int, int] | None: ...
    def reload_tls(self) -> None: ...
    @property
    def port(self) -> int:
        """The port listened on; 0 on a Unix socket."""
    @property
    def host(self) -> str | None:
        """The first IP address listened on; ``None`` on a Unix socket."""
    @property
    def unix_path(self) -> str | None:
        """The Unix socket's path; ``None`` on TCP."""
    @property
    def pending_websockets(self) -> int: ...
    @property
    def pending_requests(self) -> int: ...
    @property
    def incoming_bytes(self) -> int: ...
    @property
    def drained(self) -> int: ...
    def stats(self) -> dict[str, Any]: ...
    def fileno(self) -> int: ...
    def drain(self, max_events: int) -> list[tuple[Any, ...]]: ...
    def end_batch(self) -> tuple[int, int]: ...
    def stop(self, close_active_connections: bool) -> None: ...
    def end_links(self) -> bool: ...
    def publish(
        self, topic: str, message: str | Buffer, compress: bool = False
    ) -> _SendStatus: ...
    def subscriber_count(self, topic: str) -> int: ...
    def take_left_out(self, kind: int) -> int: ...
    def set_close_hook(self, hook: Callable[[WebSocket[Any]], None]) -> None: ...
    def set_control_events(self, pings: bool, pongs: bool) -> None: ...

def random_uuid_v7() -> str:
    """A random, time-ordered UUID (RFC 9562 version 7) as a string."""

def check_redis_url(url: str) -> None:
    """Raise ``ValueError`` for a Redis URL the server could not connect with."""
