"""HTTP requests and responses as the handler sees them."""

from __future__ import annotations

import asyncio
import dataclasses
import json as _json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, NamedTuple, TypeAlias, final

from brioche._brioche import PendingRequest

__all__ = [
    "Headers",
    "Request",
    "Response",
    "SocketAddress",
    "bad_request",
    "html",
    "internal_error",
    "json",
    "not_found",
    "ok",
    "text",
]


class SocketAddress(NamedTuple):
    """A client's address, as ``srv.request_ip`` gives it (Bun's ``SocketAddress``)."""

    address: str
    """The IP address, e.g. ``"127.0.0.1"`` or ``"::1"``."""
    family: Literal["IPv4", "IPv6"]
    port: int


@final
class Headers(Mapping[str, str]):
    """Read-only, case-insensitive HTTP headers; ``get_all`` returns every value of a name.

    Values are read as ISO-8859-1, as Bun and ``websockets`` read them: one character per byte,
    so ``value.encode("latin-1")`` gives back the bytes sent (UTF-8 among them, to decode).
    """

    __slots__ = ("_items", "_by_name")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: tuple[tuple[str, str], ...] = tuple(items)
        # Indexed at the first lookup: most upgrade handlers read no header.
        self._by_name: dict[str, str] | None = None

    @property
    def _index(self) -> dict[str, str]:
        index = self._by_name
        if index is None:
            index = {}
            for name, value in self._items:
                key = name.lower()
                # Repeated headers are joined with ", " as RFC 9110 section 5.3 allows.
                index[key] = f"{index[key]}, {value}" if key in index else value
            self._by_name = index
        return index

    def __getitem__(self, name: str) -> str:
        return self._index[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def get_all(self, name: str) -> list[str]:
        """Every value sent for ``name``, in order."""
        key = name.lower()
        return [value for item, value in self._items if item.lower() == key]

    def items_raw(self) -> tuple[tuple[str, str], ...]:
        """The headers as received: ``(name, value)`` pairs, names in lowercase."""
        return self._items

    def __repr__(self) -> str:
        return f"Headers({list(self._items)!r})"


@final
class Request:
    """An HTTP request: ``method``, ``path``, ``query``, ``headers`` and the whole ``body``.

    ``path`` is the target's path as the client sent it, percent-encoded and without the query
    (``/rooms/caf%C3%A9``; ``urllib.parse.unquote`` decodes it); ``query`` is what follows the
    ``?``, undecoded (``urllib.parse.parse_qs`` reads it), or ``""``.
    """

    __slots__ = (
        "_pending", "_timer", "_task", "_answered", "_headers", "_body", "method", "path", "query",
    )

    def __init__(self, pending: PendingRequest) -> None:
        self._pending = pending
        # Kept for srv.timeout: its timer, and the handler's task that it cancels.
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._answered = False
        self._headers: Headers | None = None
        self._body: bytes | None = None
        self.method: str = pending.method
        self.path: str = pending.path
        self.query: str = pending.query

    def _end_timeout(self) -> None:
        """The limit ``srv.timeout`` set is over: the request is answered, or given another."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # Headers, body and address are made into Python objects when first read: a handler that
    # only upgrades reads none of them, and a handshake is a dozen header strings.
    @property
    def headers(self) -> Headers:
        """The request's headers (case-insensitive lookups)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = Headers(self._pending.headers)
        return headers

    @property
    def body(self) -> bytes:
        """The whole body (``b""`` for none)."""
        body = self._body
        if body is None:
            body = self._body = self._pending.body
        return body

    @property
    def remote_address(self) -> str:
        """The client's IP address, ``""`` over a Unix socket (see ``srv.request_ip``)."""
        return self._pending.remote_address

    @property
    def is_websocket(self) -> bool:
        """Whether this is a valid WebSocket handshake that ``upgrade`` can accept."""
        return self._pending.is_websocket

    @property
    def subprotocols(self) -> list[str]:
        """The subprotocols the client offers (``Sec-WebSocket-Protocol``), in its order; an
        item that is not a token (RFC 6455 4.1: ``a b``, say) is no offer and is left out."""
        return [
            name.strip()
            for value in self.headers.get_all("sec-websocket-protocol")
            for name in value.split(",")
            if is_token(name.strip())
        ]

    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return _json.loads(self.body)

    def __repr__(self) -> str:
        # The client too, named as the core's refusals name it: the lines that name a request
        # (a handler's exception, its 500 or 503) then say whose it was.
        target = f"{self.path}?{self.query}" if self.query else self.path
        return f"<Request {self.method} {target} from {self._pending.client}>"


_NO_BODY = frozenset((204, 205, 304))
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def is_token(value: str) -> bool:
    """Whether ``value`` is an HTTP token (RFC 9110 5.6.2), as a subprotocol's name must be."""
    return bool(value) and all(c in _TCHARS for c in value)


# What a response's or a 101's headers may be given as: pairs (a name may repeat) or a mapping,
# each value a str or an int (written in decimal).
# A value, not a string: typing.get_type_hints resolves it where it is used, too.
HeaderItems: TypeAlias = Iterable[tuple[str, str | int]] | Mapping[str, str | int]


def header_pairs(headers: HeaderItems) -> tuple[tuple[str, str], ...]:
    """``headers`` as ``(name, value)`` pairs of ``str``: pairs as given (a name repeated), or
    a mapping's items (``{"content-type": "text/plain"}``, as Starlette and aiohttp take)."""
    items: Iterable[object] = headers.items() if isinstance(headers, Mapping) else headers
    if isinstance(items, (str, bytes)):
        raise TypeError(f"headers must be (name, value) pairs or a mapping, got {type(items).__name__}")
    pairs = []
    for item in items:
        # A lone pair, ``(("content-type", "text/plain"))`` without its comma, is two strings.
        if isinstance(item, (str, bytes)) or not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"each header must be a (name, value) pair, got {item!r}")
        name, value = item
        if not isinstance(name, str):
            raise TypeError(f"a header's name must be a str, got {name!r}")
        # An int is written in decimal; anything else made into a str was a mistake on the
        # wire (``b'secret'``, ``None``), so it is refused rather than sent.
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(int(value))  # an IntEnum's str() is its name on 3.10
        elif not isinstance(value, str):
            raise TypeError(f"the value of header {name!r} must be a str or an int, got {type(value).__name__}")
        pairs.append((name, value))
    return tuple(pairs)


@final
@dataclasses.dataclass(frozen=True, slots=True, init=False)
class Response:
    """An HTTP response. ``body`` may be ``str`` (sent as UTF-8) or ``bytes``; ``headers``,
    ``(name, value)`` pairs (a name may repeat), may be given as a mapping (a ``dict``).

    The server sets ``content-length`` from the body. One given in ``headers`` must match it
    (the answer to a HEAD, and a 304, may give the length of a body they leave out; a 204 may
    give none, RFC 9110 8.6), and
    ``transfer-encoding`` may not be given, nor a 2xx answer a ``CONNECT`` (it would open a
    tunnel): the handler's response is then a ``ValueError``, logged, and the client gets 500.
    A 204, 205 or 304 with a body is a ``ValueError`` here. Header values are sent as
    ISO-8859-1, one byte per character: a character above U+00FF, or an ASCII control
    character other than tab, is the handler's error too (500). A header name that is not a
    ``str``, or a value neither a ``str`` nor an ``int`` (written in decimal), is a
    ``TypeError`` here.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: str | bytes

    # Written out, not generated: `headers` is taken in any of its forms and kept as pairs.
    def __init__(
        self,
        status: int = 200,
        headers: HeaderItems = (),
        body: str | bytes = b"",
    ) -> None:
        if isinstance(status, bool) or not isinstance(status, int):
            raise TypeError(f"status must be an int, got {type(status).__name__}")
        if not 200 <= status <= 599:
            raise ValueError(f"status must be in 200..599, got {status}")
        if not isinstance(body, (str, bytes)):
            raise TypeError(f"body must be str or bytes, got {type(body).__name__}")
        if body and status in _NO_BODY:
            # As Bun's (the Fetch standard's) Response refuses it: these statuses carry no
            # content (RFC 9110 15.3.5, 15.3.6, 15.4.5), and a body would be dropped or sent.
            raise ValueError(f"a {status} response has no body")
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "headers", header_pairs(headers))
        object.__setattr__(self, "body", body)

    def with_header(self, name: str, value: str | int) -> Response:
        """A copy with one more header."""
        return Response(self.status, (*self.headers, (name, value)), self.body)

    def body_bytes(self) -> bytes:
        """The body as it goes on the wire: a ``str`` body encoded as UTF-8."""
        return self.body.encode("utf-8") if isinstance(self.body, str) else self.body


def text(body: str, status: int = 200) -> Response:
    """A ``text/plain; charset=utf-8`` response."""
    return Response(status, (("content-type", "text/plain; charset=utf-8"),), body)


def html(body: str, status: int = 200) -> Response:
    """A ``text/html; charset=utf-8`` response."""
    return Response(status, (("content-type", "text/html; charset=utf-8"),), body)


def json(value: Any, status: int = 200) -> Response:
    """A JSON response of ``value`` (serialised with :func:`json.dumps`)."""
    body = _json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return Response(status, (("content-type", "application/json"),), body)


def ok() -> Response:
    """200 with an empty body."""
    return Response(200)


def not_found() -> Response:
    """404 Not Found."""
    return text("Not Found", 404)


def bad_request() -> Response:
    """400 Bad Request."""
    return text("Bad Request", 400)


def internal_error() -> Response:
    """500 Internal Server Error."""
    return text("Internal Server Error", 500)
