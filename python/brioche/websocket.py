"""WebSocket configuration and the functions that act on a connected ``WebSocket``.

A ``Config`` is built with :func:`init` and refined with setters; each setter returns a new,
immutable ``Config``. Both styles work and mean the same, and so does the spec's constructor::

    config = websocket.init().on_text(on_text).idle_timeout(60)
    config = websocket.idle_timeout(websocket.on_text(websocket.init(), on_text), 60)
    config = websocket.Config(on_text_message=on_text, idle_timeout=60)

Every function below that takes a ``WebSocket`` first is also a method or property of it:
``websocket.send(ws, "hi")`` is ``ws.send("hi")``, ``websocket.data(ws)`` is ``ws.data``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeAlias, TypeVar

from brioche._buffer import Buffer
from brioche._enums import CloseCode, ReadyState
from brioche._brioche import (
    MessageBackpressured,
    MessageDropped,
    MessageSent,
    WebSocket,
)


__all__ = [
    "CloseCode",
    "Config",
    "DeflateOptions",
    "MessageBackpressured",
    "MessageDropped",
    "MessageSent",
    "ReadyState",
    "SendStatus",
    "WebSocket",
    "WebSocketSendStatus",
    "backpressure_limit",
    "buffered_amount",
    "close",
    "close_on_backpressure_limit",
    "cork",
    "data",
    "idle_timeout",
    "init",
    "is_subscribed",
    "max_payload_length",
    "message_timeout",
    "on_bytes",
    "on_close",
    "on_drain",
    "on_open",
    "on_ping",
    "on_pong",
    "on_text",
    "per_message_deflate",
    "ping",
    "pong",
    "publish",
    "publish_bytes",
    "publish_to_self",
    "ready_state",
    "remote_address",
    "send",
    "send_bytes",
    "send_pings",
    "set_data",
    "subprotocol",
    "subscribe",
    "subscriptions",
    "terminate",
    "unsubscribe",
]

T = TypeVar("T")
R = TypeVar("R")

SendStatus: TypeAlias = MessageSent | MessageBackpressured | MessageDropped
"""What ``send``, ``send_bytes``, ``publish``, ``publish_bytes``, ``ping`` and ``pong`` report."""

WebSocketSendStatus: TypeAlias = SendStatus
"""The spec's name for :data:`SendStatus`."""

# A handler's result is awaited (as its task) when it is awaitable and ignored when it is not, so
# it is typed `object`, as typeshed types callbacks whose result is ignored: a plain function or
# an `async def`, and a one-liner such as `lambda ws, text: ws.send(text)`.
TextHandler: TypeAlias = Callable[[WebSocket[T], str], object]
BytesHandler: TypeAlias = Callable[[WebSocket[T], bytes], object]
SocketHandler: TypeAlias = Callable[[WebSocket[T]], object]
CloseHandler: TypeAlias = Callable[[WebSocket[T], int, str], object]
ControlHandler: TypeAlias = Callable[[WebSocket[T], bytes], object]

_MIB = 1024 * 1024


def _check_handler(handler: object, setter: str, arguments: str) -> None:
    """Refuse, where it is set, a handler that could never run: one that is not callable, a
    generator function (its body would not run at all: calling it only makes a generator), or
    one that cannot take ``arguments`` ("ws, text") positionally. A callable whose signature
    Python cannot tell (some builtins) is taken as it is."""
    if not callable(handler):
        raise TypeError(f"a handler must be callable, got {type(handler).__name__}")
    name = getattr(handler, "__qualname__", None) or repr(handler)
    if inspect.isgeneratorfunction(handler) or inspect.isasyncgenfunction(handler):
        raise TypeError(f"{setter}: {name} is a generator function (it has a yield), so calling "
                        "it would run none of its body; a handler returns, or is async def "
                        "without yield")
    try:
        # The callable's own signature: a decorator's wrapper (functools.wraps) is what is called.
        signature = inspect.signature(handler, follow_wrapped=False)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*arguments.split(", "))
    except TypeError:
        raise TypeError(f"{setter}: the handler is called as handler({arguments}), which "
                        f"{name}{signature} cannot take") from None


# Each handler field of Config: its setter, and the arguments its handler is called with.
_HANDLERS = (
    ("on_text_message", "on_text", "ws, text"),
    ("on_bytes_message", "on_bytes", "ws, data"),
    ("on_open_handler", "on_open", "ws"),
    ("on_close_handler", "on_close", "ws, code, reason"),
    ("on_drain_handler", "on_drain", "ws"),
    ("on_ping_handler", "on_ping", "ws, payload"),
    ("on_pong_handler", "on_pong", "ws, payload"),
)

# The core holds sizes and counts as 64-bit integers, and timeouts up to 2**32 - 1 seconds
# (about 136 years), so that no deadline it computes can overflow: larger is refused here, at
# the setter, not by serve().
_MAX_SIZE = 2**64 - 1
_MAX_SECONDS = 2**32 - 1


def _check_size(name: str, value: object, *, minimum: int, maximum: int = _MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_seconds(name: str, value: object) -> float:
    """A duration: a wrong type is a TypeError; a negative one, NaN and one over the core's
    bound (infinity too) a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not 0 <= value <= _MAX_SECONDS:
        raise ValueError(f"{name} must be a number of seconds from 0 to {_MAX_SECONDS}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True, slots=True)
class DeflateOptions:
    """What the server accepts of a client's permessage-deflate offer (RFC 7692).

    The defaults are the RFC's: context kept on both sides, 15-bit windows. The server answers
    the first offer it can honour and declines the others (the connection then opens without
    compression); see *Compression* in the README (the docs' Behaviour page) for the rules.

    - ``server_no_context_takeover``: reset the server's compressor after every message, even
      when the client does not ask. No compressor is kept per connection (the thread's is used),
      and a ``publish`` is compressed once for all such subscribers, at some cost in ratio.
    - ``client_no_context_takeover``: ask the client to reset its compressor after every
      message, so no decompressor is kept per connection either.
    - ``server_max_window_bits`` (9-15): the largest window the server compresses with. A
      client asking for 8 is declined: zlib has no raw deflate with a 256-byte window.
    - ``client_max_window_bits`` (9-15): the largest window the client may use; below 15,
      offers that do not let the server limit it are declined. A client that offers 8 is
      answered 8, and inflated with 9: zlib-based clients compress with 9 when told 8.
    """

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15

    def __post_init__(self) -> None:
        _check_bool("server_no_context_takeover", self.server_no_context_takeover)
        _check_bool("client_no_context_takeover", self.client_no_context_takeover)
        for name, low in (("server_max_window_bits", 9), ("client_max_window_bits", 9)):
            value = _check_size(name, getattr(self, name), minimum=low)
            if value > 15:
                raise ValueError(f"{name} must be <= 15, got {value}")


# The spec's labels of `Config`'s constructor (the setters' names, the spec's and brioche's own)
# and the fields they set: the fields cannot have the setters' names.
_LABELS = {
    "on_open": "on_open_handler",
    "on_close": "on_close_handler",
    "on_drain": "on_drain_handler",
    "on_ping": "on_ping_handler",
    "on_pong": "on_pong_handler",
    "max_payload_length": "max_payload_length_bytes",
    "backpressure_limit": "backpressure_limit_bytes",
    "close_on_backpressure_limit": "close_on_backpressure",
    "idle_timeout": "idle_timeout_seconds",
    "message_timeout": "message_timeout_seconds",
    "publish_to_self": "publish_to_self_enabled",
    "send_pings": "send_pings_enabled",
    "per_message_deflate": "deflate_options",
}


@dataclasses.dataclass(frozen=True, slots=True, init=False)
class Config(Generic[T]):
    """How the server treats its WebSockets: the handlers and the limits.

    Create one with :func:`init` and its setters, or with the spec's constructor, whose
    labels are the setters' names (but ``on_text_message`` and ``on_bytes_message``, which
    are ``on_text`` and ``on_bytes``) and do what they do; a label left out or given ``None``
    keeps Bun's default (the spec's ``Option``)::

        websocket.Config(on_text_message=on_text, on_open=on_open, idle_timeout=60)
        websocket.init().on_text(on_text).on_open(on_open).idle_timeout(60)  # the same

    The spec's eleven labels can also be given by position, in its order (``on_text_message``,
    ``on_bytes_message``, ``on_open``, ``on_close``, ``on_drain``, ``max_payload_length``,
    ``backpressure_limit``, ``close_on_backpressure_limit``, ``idle_timeout``,
    ``publish_to_self``, ``send_pings``); brioche's own (``on_ping``, ``on_pong``,
    ``message_timeout``, ``per_message_deflate``) by name only. The fields below hold the
    values under other names, since the setters have the spec's; they are accepted by name
    too (``dataclasses.replace`` passes them).

    ``T`` is the type of the per-connection context passed to ``server.upgrade`` and read back
    with ``ws.data``. A handler setter given ``None`` removes that handler, as if it had never
    been set.
    """

    on_text_message: TextHandler[T] | None = None
    on_bytes_message: BytesHandler[T] | None = None
    on_open_handler: SocketHandler[T] | None = None
    on_close_handler: CloseHandler[T] | None = None
    on_drain_handler: SocketHandler[T] | None = None
    on_ping_handler: ControlHandler[T] | None = None
    on_pong_handler: ControlHandler[T] | None = None
    max_payload_length_bytes: int = 16 * _MIB
    backpressure_limit_bytes: int = 16 * _MIB
    close_on_backpressure: bool = False
    idle_timeout_seconds: int = 120
    message_timeout_seconds: float = 120.0
    publish_to_self_enabled: bool = False
    send_pings_enabled: bool = True
    deflate_options: DeflateOptions | None = None

    def __init__(
        self,
        on_text_message: TextHandler[T] | None = None,
        on_bytes_message: BytesHandler[T] | None = None,
        on_open: SocketHandler[T] | None = None,
        on_close: CloseHandler[T] | None = None,
        on_drain: SocketHandler[T] | None = None,
        max_payload_length: int | None = None,
        backpressure_limit: int | None = None,
        close_on_backpressure_limit: bool | None = None,
        idle_timeout: int | None = None,
        publish_to_self: bool | None = None,
        send_pings: bool | None = None,
        *,
        on_ping: ControlHandler[T] | None = None,
        on_pong: ControlHandler[T] | None = None,
        message_timeout: float | None = None,
        per_message_deflate: bool | DeflateOptions | None = None,
        **fields: Any,
    ) -> None:
        # The parameters by name, before any other local: each label's value, which _LABELS
        # maps to its field (one list of the labels, the signature's, not a second one here).
        given = locals()
        values: dict[str, Any] = {field.name: field.default for field in dataclasses.fields(self)}
        for name, value in fields.items():
            if name not in values:
                raise TypeError(f"Config() got an unexpected keyword argument {name!r}")
            values[name] = value
        values["on_text_message"] = on_text_message
        values["on_bytes_message"] = on_bytes_message
        for label, field in _LABELS.items():
            value = given[label]
            if value is None:
                continue
            if field in fields:
                raise TypeError(f"Config() got both {label}= and {field}=, which set the same thing")
            # As its setter keeps it: per_message_deflate's True is DeflateOptions(), False none.
            values[field] = _deflate_options(value) if label == "per_message_deflate" else value
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
        # A Config built by hand (or by dataclasses.replace) is checked as the setters check
        # theirs, by the setters' names: a wrong value is refused here, not by serve(). The
        # handler setters rely on it (dataclasses.replace runs it).
        for field, setter, arguments in _HANDLERS:
            handler = getattr(self, field)
            if handler is not None:
                _check_handler(handler, setter, arguments)
        _check_size("max_payload_length", self.max_payload_length_bytes, minimum=1)
        _check_size("backpressure_limit", self.backpressure_limit_bytes, minimum=0)
        _check_bool("close_on_backpressure_limit", self.close_on_backpressure)
        _check_size("idle_timeout", self.idle_timeout_seconds, minimum=0, maximum=_MAX_SECONDS)
        _check_seconds("message_timeout", self.message_timeout_seconds)
        _check_bool("publish_to_self", self.publish_to_self_enabled)
        _check_bool("send_pings", self.send_pings_enabled)
        if self.deflate_options is not None and not isinstance(self.deflate_options, DeflateOptions):
            raise TypeError("per_message_deflate must be a bool or a DeflateOptions, got "
                            f"{type(self.deflate_options).__name__}")

    def on_text(self, handler: TextHandler[T] | None) -> Config[T]:
        """Call ``handler(ws, text)`` for every text message (``async def`` or plain)."""
        return dataclasses.replace(self, on_text_message=handler)

    def on_bytes(self, handler: BytesHandler[T] | None) -> Config[T]:
        """Call ``handler(ws, data)`` for every binary message."""
        return dataclasses.replace(self, on_bytes_message=handler)

    def on_open(self, handler: SocketHandler[T] | None) -> Config[T]:
        """Call ``handler(ws)`` once a connection is upgraded; it runs before any message."""
        return dataclasses.replace(self, on_open_handler=handler)

    def on_close(self, handler: CloseHandler[T] | None) -> Config[T]:
        """Call ``handler(ws, code, reason)`` exactly once, after the last message.

        ``code`` and ``reason`` are those of the peer's close frame (1005 and ``""`` for one
        without a code), or the server's own when it ended the connection: 1006 when it ended
        without a close frame (``terminate``, a vanished client, no answer to ``close()``
        within 5 s, and the idle timeout, whose reason is ``"idle timeout"``, or
        ``"client not reading"`` for a client that read none of its queue); 1002, 1007 or
        1009 for what the client sent; 1008 for ``message_timeout`` and
        ``close_on_backpressure_limit``. The README's *Closing* table has each case.
        """
        return dataclasses.replace(self, on_close_handler=handler)

    def on_drain(self, handler: SocketHandler[T] | None) -> Config[T]:
        """Call ``handler(ws)`` each time a backpressured socket has written all it had queued."""
        return dataclasses.replace(self, on_drain_handler=handler)

    def on_ping(self, handler: ControlHandler[T] | None) -> Config[T]:
        """Call ``handler(ws, payload)`` for every ping from the client (Bun's ``ping``).

        The server still answers each ping with a pong by itself. Without a handler, pings
        are not handed to Python at all.
        """
        return dataclasses.replace(self, on_ping_handler=handler)

    def on_pong(self, handler: ControlHandler[T] | None) -> Config[T]:
        """Call ``handler(ws, payload)`` for every pong from the client (Bun's ``pong``)."""
        return dataclasses.replace(self, on_pong_handler=handler)

    def max_payload_length(self, max_payload_length: int) -> Config[T]:
        """Largest incoming message in bytes (default 16 MiB); larger ones close with 1009."""
        value = _check_size("max_payload_length", max_payload_length, minimum=1)
        return dataclasses.replace(self, max_payload_length_bytes=value)

    def backpressure_limit(self, backpressure_limit: int) -> Config[T]:
        """Bytes a connection may have queued before sends are dropped (default 16 MiB).

        0 is no limit: a client that reads slowly can then make its queue grow without bound.
        """
        value = _check_size("backpressure_limit", backpressure_limit, minimum=0)
        return dataclasses.replace(self, backpressure_limit_bytes=value)

    def close_on_backpressure_limit(self, close_on_backpressure_limit: bool) -> Config[T]:
        """Drop the connection when a send finds the backpressure limit exceeded.

        No close frame is sent (the queue is what is over the limit): the client sees 1006, and
        ``on_close`` gets 1008, "backpressure limit exceeded".
        """
        value = _check_bool("close_on_backpressure_limit", close_on_backpressure_limit)
        return dataclasses.replace(self, close_on_backpressure=value)

    def idle_timeout(self, idle_timeout: int) -> Config[T]:
        """Seconds of silence from the client before the connection is closed (default 120, 0: off).

        What the client sends counts, and so does its TCP stack taking bytes the kernel had
        refused (its answer to a keep-alive ping waits behind that backlog); what the server
        sends into a socket with room does not.

        A client that reads none of what is queued for it that long (the kernel refusing the
        queue and taking nothing of it when offered it again) is closed too, however much it
        sends, its pings included: it would otherwise hold its queue, up to
        ``backpressure_limit`` and one message, for as long as it went on sending. It is
        noticed within another ¾ of the timeout (a whole one with ``send_pings(False)``).
        ``on_close`` gets 1006 and ``"idle timeout"`` (a silent client) or ``"client not
        reading"``; either close is logged at INFO on ``brioche.ws``.
        """
        value = _check_size("idle_timeout", idle_timeout, minimum=0, maximum=_MAX_SECONDS)
        return dataclasses.replace(self, idle_timeout_seconds=value)

    def message_timeout(self, seconds: float) -> Config[T]:
        """Seconds a message may take from its first byte to its last (default 120, 0: off).

        A client still sending one message past it is closed with 1008 ("message timeout"), and
        the part received is dropped: a client that drips a large message cannot hold its buffer
        for ever by sending a byte now and then (each byte resets the idle timer).
        """
        value = _check_seconds("message_timeout", seconds)
        return dataclasses.replace(self, message_timeout_seconds=value)

    def publish_to_self(self, publish_to_self: bool) -> Config[T]:
        """Whether ``ws.publish`` also reaches ``ws`` when it is subscribed (default False)."""
        value = _check_bool("publish_to_self", publish_to_self)
        return dataclasses.replace(self, publish_to_self_enabled=value)

    def send_pings(self, send_pings: bool) -> Config[T]:
        """Whether the server pings silent clients before the idle timeout (default True).

        A client's pings are answered either way, as Bun answers them.
        """
        value = _check_bool("send_pings", send_pings)
        return dataclasses.replace(self, send_pings_enabled=value)

    def per_message_deflate(self, options: bool | DeflateOptions) -> Config[T]:
        """Accept permessage-deflate offers (Bun's ``perMessageDeflate``; default False).

        ``True`` is ``DeflateOptions()``: context kept both ways, the best ratio, and about
        330 KiB per connection once it has sent and received compressed messages;
        ``DeflateOptions(server_no_context_takeover=True, client_no_context_takeover=True)`` is
        what Bun's ``perMessageDeflate: true`` negotiates, and keeps nothing per connection.
        Messages from clients are inflated whenever they are
        compressed; messages to clients are compressed only when sent with ``compress=True``
        (``ws.send(msg, compress=True)``, ``publish``), as in Bun. ``ws.per_message_deflate``
        tells whether a connection negotiated it.
        """
        return dataclasses.replace(self, deflate_options=_deflate_options(options))


def _deflate_options(options: bool | DeflateOptions) -> DeflateOptions | None:
    """What ``per_message_deflate(options)`` keeps: ``True`` is ``DeflateOptions()``."""
    if isinstance(options, bool):
        return DeflateOptions() if options else None
    if isinstance(options, DeflateOptions):
        return options
    raise TypeError(
        f"per_message_deflate takes a bool or a DeflateOptions, got {type(options).__name__}"
    )


def init() -> Config[Any]:
    """An empty ``Config``: no handlers, Bun's default limits.

    ```pycon
    >>> def on_text(ws, text):
    ...     ws.send(text)
    >>> config = websocket.init().on_text(on_text).idle_timeout(60)
    >>> config.idle_timeout_seconds, config.max_payload_length_bytes
    (60, 16777216)
    ```
    """
    return Config()


def on_text(config: Config[T], handler: TextHandler[T] | None) -> Config[T]:
    """Module form of :meth:`Config.on_text`."""
    return config.on_text(handler)


def on_bytes(config: Config[T], handler: BytesHandler[T] | None) -> Config[T]:
    """Module form of :meth:`Config.on_bytes`."""
    return config.on_bytes(handler)


def on_open(config: Config[T], handler: SocketHandler[T] | None) -> Config[T]:
    """Module form of :meth:`Config.on_open`."""
    return config.on_open(handler)


def on_close(config: Config[T], handler: CloseHandler[T] | None) -> Config[T]:
    """Module form of :meth:`Config.on_close`."""
    return config.on_close(handler)


def on_drain(config: Config[T], handler: SocketHandler[T] | None) -> Config[T]:
    """Module form of :meth:`Config.on_drain`."""
    return config.on_drain(handler)


def on_ping(config: Config[T], handler: ControlHandler[T] | None) -> Config[T]:
    """Module form of :meth:`Config.on_ping`."""
    return config.on_ping(handler)


def on_pong(config: Config[T], handler: ControlHandler[T] | None) -> Config[T]:
    """Module form of :meth:`Config.on_pong`."""
    return config.on_pong(handler)


def max_payload_length(config: Config[T], max_payload_length: int) -> Config[T]:
    """Module form of :meth:`Config.max_payload_length`."""
    return config.max_payload_length(max_payload_length)


def backpressure_limit(config: Config[T], backpressure_limit: int) -> Config[T]:
    """Module form of :meth:`Config.backpressure_limit`."""
    return config.backpressure_limit(backpressure_limit)


def close_on_backpressure_limit(config: Config[T], close_on_backpressure_limit: bool) -> Config[T]:
    """Module form of :meth:`Config.close_on_backpressure_limit`."""
    return config.close_on_backpressure_limit(close_on_backpressure_limit)


def idle_timeout(config: Config[T], idle_timeout: int) -> Config[T]:
    """Module form of :meth:`Config.idle_timeout`."""
    return config.idle_timeout(idle_timeout)


def message_timeout(config: Config[T], seconds: float) -> Config[T]:
    """Module form of :meth:`Config.message_timeout`."""
    return config.message_timeout(seconds)


def publish_to_self(config: Config[T], publish_to_self: bool) -> Config[T]:
    """Module form of :meth:`Config.publish_to_self`."""
    return config.publish_to_self(publish_to_self)


def send_pings(config: Config[T], send_pings: bool) -> Config[T]:
    """Module form of :meth:`Config.send_pings`."""
    return config.send_pings(send_pings)


def per_message_deflate(config: Config[T], options: bool | DeflateOptions) -> Config[T]:
    """Module form of :meth:`Config.per_message_deflate`."""
    return config.per_message_deflate(options)


def send(
    ws: WebSocket[Any], message: str | Buffer, compress: bool = False
) -> SendStatus:
    """Queue a message, text for a ``str``, binary for bytes-like (as Bun's ``send``); never blocks.

    With ``compress=True`` the message is compressed if the client negotiated permessage-deflate
    (see :meth:`Config.per_message_deflate`), and sent as it is otherwise. ``MessageSent`` still
    reports the message's own length; ``buffered_amount`` and the backpressure limit count the
    compressed bytes.

    ```pycon
    >>> def on_text(ws, text):
    ...     match websocket.send(ws, text.upper()):
    ...         case brioche.MessageSent(bytes_sent=n): print("sent", n)
    ...         case brioche.MessageBackpressured() | brioche.MessageDropped(): print("later")
    ```
    """
    return ws.send(message, compress)


def send_bytes(
    ws: WebSocket[Any], message: Buffer, compress: bool = False
) -> SendStatus:
    """Queue a binary message; never blocks. ``compress`` as :func:`send`'s."""
    return ws.send_bytes(message, compress)


def publish(
    ws: WebSocket[Any], topic: str, message: str | Buffer, compress: bool = False
) -> SendStatus:
    """Send a message to every subscriber of ``topic`` except ``ws`` (see ``publish_to_self``):
    text for a ``str``, binary for bytes-like (as ``publish_bytes``), as ``send`` does.

    The status sums up this process's recipients: ``MessageDropped`` when none of them got it
    *or any one dropped it* (the others did get it: a publisher that retries on it sends them a
    duplicate), else ``MessageBackpressured`` if any is congested, else ``MessageSent``. With
    workers (``run(config, workers=n)``) or ``pubsub_redis`` it also goes to the other
    processes' subscribers, which the status does not count: ``MessageDropped`` there may mean
    only that no subscriber is in this process.

    With ``compress=True`` it is compressed for the subscribers that negotiated
    permessage-deflate: once for all those without server context takeover (per window size),
    once per subscriber for the others; subscribers without deflate get it uncompressed.
    """
    return ws.publish(topic, message, compress)


def publish_bytes(
    ws: WebSocket[Any], topic: str, message: Buffer, compress: bool = False
) -> SendStatus:
    """Send a binary message to every subscriber of ``topic`` except ``ws``; ``compress`` as :func:`publish`'s."""
    return ws.publish_bytes(topic, message, compress)


def subscribe(ws: WebSocket[Any], topic: str) -> bool:
    """Subscribe ``ws`` to ``topic`` (idempotent); False once ``ws`` is closing or closed."""
    return ws.subscribe(topic)


def unsubscribe(ws: WebSocket[Any], topic: str) -> bool:
    """Unsubscribe ``ws`` from ``topic``; whether it was subscribed."""
    return ws.unsubscribe(topic)


def is_subscribed(ws: WebSocket[Any], topic: str) -> bool:
    """Whether ``ws`` is subscribed to ``topic``."""
    return ws.is_subscribed(topic)


def subscriptions(ws: WebSocket[Any]) -> list[str]:
    """The topics ``ws`` is subscribed to, in the order subscribed (an unsubscribe moves the
    last into the place it leaves)."""
    return ws.subscriptions


def cork(ws: WebSocket[T], callback: Callable[[WebSocket[T]], R]) -> R:
    """Run ``callback(ws)`` and write everything it sends in one go; returns its result.

    A cork holds its sends back only until they pass ``backpressure_limit``: then what is
    queued is written at once, as Bun's ``cork`` writes when its buffer overflows, and only
    what the kernel refuses counts toward the limit.

    ``callback`` is a plain function: an ``async def`` one is a ``TypeError``, since its body
    would not run inside the cork.
    """
    return ws.cork(callback)


def data(ws: WebSocket[T]) -> T:
    """The context given to ``server.upgrade`` for this connection, or what was set since."""
    return ws.data


def set_data(ws: WebSocket[T], value: T) -> None:
    """Module form of ``ws.data = value``."""
    ws.data = value


def ready_state(ws: WebSocket[Any]) -> ReadyState:
    """``ReadyState.CONNECTING`` (0), ``OPEN`` (1), ``CLOSING`` (2) or ``CLOSED`` (3)."""
    return ws.ready_state


def subprotocol(ws: WebSocket[Any]) -> str | None:
    """The subprotocol chosen at the upgrade, ``None`` when none was."""
    return ws.subprotocol


def remote_address(ws: WebSocket[Any]) -> str:
    """The client's IP address, e.g. ``"127.0.0.1"``; ``""`` over a Unix socket."""
    return ws.remote_address


def buffered_amount(ws: WebSocket[Any]) -> int:
    """Bytes accepted for this connection but not yet written to the kernel."""
    return ws.buffered_amount


def close(ws: WebSocket[Any], code: int | None = 1000, reason: str = "") -> None:
    """Start the closing handshake; messages queued before it are still delivered.

    As Bun's ``close``: ``code`` ``None`` is 1000 (Bun's ``undefined``), ``reason`` is cut to 123
    UTF-8 bytes at a character boundary, and 0, 1005 or 1006 (a code ``on_close`` may get) send
    a close frame without a code. Other codes no frame may carry (1-999, 1004, 1015, 1016-2999,
    5000 and above) are a ``ValueError``.
    """
    ws.close(code, reason)


def terminate(ws: WebSocket[Any]) -> None:
    """End the connection at once, without a close frame (the client sees 1006).

    As Bun's: what was sent and published before is written first, as far as the kernel takes
    it without waiting; ``ready_state`` is ``CLOSED`` from then on.
    """
    ws.terminate()


def ping(ws: WebSocket[Any], payload: str | Buffer | None = None) -> SendStatus:
    """Send a ping frame (payload up to 125 bytes)."""
    return ws.ping(payload)


def pong(ws: WebSocket[Any], payload: str | Buffer | None = None) -> SendStatus:
    """Send an unsolicited pong frame (payload up to 125 bytes)."""
    return ws.pong(payload)
