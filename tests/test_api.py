"""The public API's values: send statuses, UUIDs, immutable validated configs, errors."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import errno
import functools
import inspect
import math
import pickle
import time
import typing
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect

import brioche
from brioche import MessageBackpressured, MessageDropped, MessageSent, server, websocket
from brioche._buffer import Buffer
from conftest import ServeFn, upgrade_ws_path, ws_url

# -- send statuses ---------------------------------------------------------------------------


def test_message_sent_equality_and_bytes_sent() -> None:
    assert MessageSent(3) == MessageSent(3)
    assert MessageSent(3) != MessageSent(4)
    assert MessageSent(3).bytes_sent == 3
    assert MessageSent(0) != MessageDropped()
    assert MessageSent(3) != 3


def test_message_sent_is_hashable() -> None:
    assert hash(MessageSent(3)) == hash(MessageSent(3))
    assert {MessageSent(3), MessageSent(3), MessageSent(4)} == {MessageSent(3), MessageSent(4)}
    assert {MessageSent(1): "a"}[MessageSent(1)] == "a"


def test_only_message_dropped_is_false() -> None:
    """``if not ws.send(m)`` finds the drops, as ``if (!ws.send(m))`` does in Bun (0 for a
    drop). Every status was true, so the check never fired."""
    assert [bool(s) for s in (MessageSent(0), MessageSent(5), MessageBackpressured(), MessageDropped())] == [
        True,
        True,
        True,
        False,
    ]


def test_message_sent_of_a_negative_size_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="bytes_sent must be >= 0, not -1"):
        MessageSent(-1)


def test_backpressured_and_dropped_are_equal_to_themselves_only() -> None:
    assert MessageBackpressured() == MessageBackpressured()
    assert MessageDropped() == MessageDropped()
    assert MessageBackpressured() != MessageDropped()
    assert hash(MessageBackpressured()) == hash(MessageBackpressured())
    assert len({MessageDropped(), MessageDropped(), MessageBackpressured()}) == 2


def test_every_status_pickles_and_copies_to_an_equal_one() -> None:
    # A status may be logged, queued to another process or copied with the data it came with.
    # MessageSent could not be pickled (its constructor takes the size).
    for status in (MessageSent(3), MessageSent(70_000), MessageBackpressured(), MessageDropped()):
        assert pickle.loads(pickle.dumps(status)) == status
        assert copy.copy(status) == status
        assert copy.deepcopy(status) == status


def describe(status: brioche.SendStatus) -> str:
    match status:
        case MessageSent(bytes_sent=n):
            return f"sent {n}"
        case MessageBackpressured():
            return "backpressured"
        case MessageDropped():
            return "dropped"
        case _:
            return "unknown"


def test_match_on_send_statuses() -> None:
    assert describe(MessageSent(7)) == "sent 7"
    assert describe(MessageBackpressured()) == "backpressured"
    assert describe(MessageDropped()) == "dropped"


def test_the_spec_names_the_status_type_websocket_send_status() -> None:
    status: brioche.WebSocketSendStatus = MessageDropped()
    assert describe(status) == "dropped"
    assert websocket.WebSocketSendStatus is websocket.SendStatus is brioche.WebSocketSendStatus
    assert "WebSocketSendStatus" in websocket.__all__ and "WebSocketSendStatus" in brioche.__all__
    # The spec's constructors of `WebSocketSendStatus` are its module's names too.
    for name in ("MessageSent", "MessageBackpressured", "MessageDropped"):
        assert name in websocket.__all__ and getattr(websocket, name) is getattr(brioche, name)


def test_match_positional_bytes_sent() -> None:
    match MessageSent(12):
        case MessageSent(n):
            assert n == 12
        case _:
            pytest.fail("MessageSent(n) did not match")


# -- random_uuid_v7 --------------------------------------------------------------------------


def test_random_uuid_v7_is_rfc9562_version_7() -> None:
    value = brioche.random_uuid_v7()
    assert isinstance(value, str)
    parsed = uuid.UUID(value)
    assert str(parsed) == value  # canonical lowercase 8-4-4-4-12 form
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122  # variant bits 10xx
    assert value[14] == "7"
    assert value[19] in "89ab"


def test_random_uuid_v7_timestamp_is_now() -> None:
    before = int(time.time() * 1000)
    value = brioche.random_uuid_v7()
    after = int(time.time() * 1000)
    millis = int(value.replace("-", "")[:12], 16)
    assert before - 2000 <= millis <= after + 2000


def test_random_uuid_v7_values_are_unique_and_time_ordered() -> None:
    values = [brioche.random_uuid_v7() for _ in range(100)]
    assert len(set(values)) == 100
    assert values == sorted(values)
    assert all(uuid.UUID(v).version == 7 and uuid.UUID(v).variant == uuid.RFC_4122 for v in values)


# -- configs ---------------------------------------------------------------------------------


def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
    ws.send(text)


def test_websocket_config_setters_return_new_objects() -> None:
    base = websocket.init()
    changed = base.idle_timeout(5).max_payload_length(1024).on_text(on_text).publish_to_self(True)
    assert changed is not base
    assert base == websocket.init()
    assert base.idle_timeout_seconds == 120
    assert base.on_text_message is None
    assert changed.idle_timeout_seconds == 5
    assert changed.max_payload_length_bytes == 1024
    assert changed.on_text_message is on_text
    assert changed.publish_to_self_enabled is True


def test_websocket_config_is_frozen() -> None:
    config = websocket.init()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.idle_timeout_seconds = 5  # type: ignore[misc]
    assert config.idle_timeout_seconds == 120


def test_server_config_setters_return_new_objects_and_it_is_frozen() -> None:
    base = server.handler(upgrade_ws_path)
    changed = base.port(1234).hostname("127.0.0.1").max_request_body_size(10)
    assert (base.port_number, base.hostname_value, base.max_request_body_size_bytes) == (None, None, 1024 * 1024)
    assert (changed.port_number, changed.hostname_value, changed.max_request_body_size_bytes) == (1234, "127.0.0.1", 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.port_number = 1  # type: ignore[misc]


def test_max_payload_length_negative_raises_value_error() -> None:
    with pytest.raises(ValueError):
        websocket.init().max_payload_length(-1)


def test_idle_timeout_string_raises_type_error() -> None:
    with pytest.raises(TypeError):
        websocket.init().idle_timeout("x")  # type: ignore[arg-type]


def test_settings_past_what_the_core_holds_are_refused_by_their_setter() -> None:
    # Before, these passed the setter and failed in serve() (an OverflowError naming no
    # setting), or, for idle_timeout, panicked every connection's task once it opened.
    ws, srv = websocket.init(), server.handler(upgrade_ws_path)
    for setter in (ws.max_payload_length, ws.backpressure_limit, srv.max_connections,
                   srv.max_incoming_bytes, srv.max_request_body_size, srv.max_request_header_size):
        setter(2**64 - 1)
        with pytest.raises(ValueError, match=r" must be <= 18446744073709551615, got 18446744073709551616"):
            setter(2**64)
    ws.idle_timeout(2**32 - 1)
    with pytest.raises(ValueError, match=r"^idle_timeout must be <= 4294967295, got 18446744073709551615$"):
        ws.idle_timeout(2**64 - 1)
    for seconds in (ws.message_timeout, srv.handshake_timeout):
        seconds(2**32 - 1)
        for value in (2**32, 1e300, math.inf, math.nan, -1):
            with pytest.raises(ValueError, match=r" must be a number of seconds from 0 to 4294967295, got"):
                seconds(value)


async def test_the_longest_timeouts_serve(serve: ServeFn) -> None:
    # Every deadline the core computes from them (now + timeout, the ping at 3/4) is in range.
    config = (websocket.init().on_text(lambda ws, text: ws.send(text))
              .idle_timeout(2**32 - 1).message_timeout(2**32 - 1))
    srv = await serve(config, handshake_timeout=2**32 - 1)
    async with connect(ws_url(srv)) as client:
        await client.send(["frag", "ments"])
        assert await asyncio.wait_for(client.recv(), 5) == "fragments"
        await client.close()
    assert client.close_code == 1000


def test_a_config_built_by_hand_is_checked_as_its_setters_check() -> None:
    with pytest.raises(TypeError, match="^idle_timeout must be an int, got str$"):
        websocket.Config(idle_timeout_seconds="x")
    with pytest.raises(ValueError, match="^max_payload_length must be >= 1, got -1$"):
        websocket.Config(max_payload_length_bytes=-1)
    with pytest.raises(TypeError, match="^a handler must be callable, got int$"):
        websocket.Config(on_text_message=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^send_pings must be a bool, got int$"):
        websocket.Config(send_pings_enabled=1)
    with pytest.raises(ValueError, match="^max_connections must be >= 0, got -1$"):
        server.Config(fetch=upgrade_ws_path, max_connections_value=-1)
    with pytest.raises(ValueError, match="^handshake_timeout must be a number of seconds > 0, got 0$"):
        server.Config(fetch=upgrade_ws_path, handshake_timeout_seconds=0)
    with pytest.raises(TypeError, match="^a handler must be callable, got int$"):
        server.Config(fetch=42)  # type: ignore[arg-type]
    assert websocket.Config(idle_timeout_seconds=5) == websocket.init().idle_timeout(5)


def test_the_specs_constructor_takes_its_labels_as_the_setters_names() -> None:
    """``websocket.Config(on_text_message=..., on_open=..., idle_timeout=...)`` is the spec's
    record constructor: each label sets what the setter of that name sets, by name or in the
    spec's order, and ``None`` keeps the default (the spec's ``Option``). Before, every label
    but the first two was an unexpected keyword argument."""

    def on_text(ws: Any, text: str) -> None:
        pass

    def on_bytes(ws: Any, data: bytes) -> None:
        pass

    def on_open(ws: Any) -> None:
        pass

    def on_close(ws: Any, code: int, reason: str) -> None:
        pass

    def on_drain(ws: Any) -> None:
        pass

    built = (websocket.init().on_text(on_text).on_bytes(on_bytes).on_open(on_open)
             .on_close(on_close).on_drain(on_drain).max_payload_length(1024)
             .backpressure_limit(2048).close_on_backpressure_limit(True).idle_timeout(60)
             .publish_to_self(True).send_pings(False))
    assert websocket.Config(
        on_text_message=on_text, on_bytes_message=on_bytes, on_open=on_open, on_close=on_close,
        on_drain=on_drain, max_payload_length=1024, backpressure_limit=2048,
        close_on_backpressure_limit=True, idle_timeout=60, publish_to_self=True, send_pings=False,
    ) == built
    assert websocket.Config(on_text, on_bytes, on_open, on_close, on_drain, 1024, 2048, True, 60,
                            True, False) == built
    assert websocket.Config(
        on_open=None, max_payload_length=None, backpressure_limit=None,
        close_on_backpressure_limit=None, idle_timeout=None, publish_to_self=None, send_pings=None,
    ) == websocket.init()
    # brioche's own setters are labels too, by name.
    assert websocket.Config(
        on_ping=on_bytes, on_pong=on_bytes, message_timeout=2.5, per_message_deflate=True
    ) == websocket.init().on_ping(on_bytes).on_pong(on_bytes).message_timeout(2.5).per_message_deflate(True)
    assert websocket.Config(per_message_deflate=False) == websocket.init()
    assert websocket.Config(idle_timeout=5).idle_timeout_seconds == 5

    # Refused as the setters refuse, in their words.
    with pytest.raises(TypeError, match="^idle_timeout must be an int, got str$"):
        websocket.Config(idle_timeout="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^close_on_backpressure_limit must be a bool, got int$"):
        websocket.Config(close_on_backpressure_limit=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^on_open: the handler is called as handler\(ws\), "):
        websocket.Config(on_open=on_text)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^per_message_deflate takes a bool or a DeflateOptions, got int$"):
        websocket.Config(per_message_deflate=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Config\(\) got both idle_timeout= and "
                       r"idle_timeout_seconds=, which set the same thing$"):
        websocket.Config(idle_timeout=5, idle_timeout_seconds=5)
    with pytest.raises(TypeError, match=r"^Config\(\) got an unexpected keyword argument 'idle'$"):
        websocket.Config(idle=5)
    with pytest.raises(TypeError):
        # Only the spec's eleven go by position.
        websocket.Config(on_text, on_bytes, on_open, on_close, on_drain, 1024, 2048, True, 60,  # type: ignore[call-arg]
                         True, False, on_bytes)


async def test_a_config_from_the_specs_constructor_serves(serve: ServeFn) -> None:
    config: websocket.Config[None] = websocket.Config(
        on_text_message=lambda ws, text: ws.send(text.upper()),
        on_open=lambda ws: ws.send("hello"),
        max_payload_length=8,
    )
    srv = await serve(config)
    async with connect(ws_url(srv)) as client:
        assert await asyncio.wait_for(client.recv(), 5) == "hello"
        await client.send("abc")
        assert await asyncio.wait_for(client.recv(), 5) == "ABC"
        await client.send("123456789")
        await asyncio.wait_for(client.wait_closed(), 5)
    assert client.close_code == 1009


def test_on_text_non_callable_raises_type_error() -> None:
    with pytest.raises(TypeError):
        websocket.init().on_text(42)  # type: ignore[arg-type]


def test_a_handler_setter_given_none_removes_the_handler() -> None:
    """``None`` unsets a handler, and is typed so (mypy --strict checks this file: with the
    setters typed for handlers only, these calls failed it)."""

    def on_text(ws: Any, text: str) -> None:
        pass

    def on_open(ws: Any) -> None:
        pass

    config = websocket.init().on_text(on_text).on_open(on_open)
    assert config.on_text(None) == websocket.init().on_open(on_open)
    assert websocket.on_open(config, None).on_text_message is on_text
    assert config.on_ping(None).on_close(None).on_drain(None).on_pong(None).on_bytes(None) == config


def test_a_handler_that_could_never_run_is_refused_where_it_is_set() -> None:
    async def stream(ws: Any, text: str) -> Any:
        yield text

    def steps(ws: Any) -> Any:
        yield ws

    with pytest.raises(TypeError, match="^on_text: .*stream is a generator function"):
        websocket.init().on_text(stream)
    with pytest.raises(TypeError, match="^on_open: .*steps is a generator function"):
        websocket.init().on_open(steps)
    with pytest.raises(TypeError, match=r"^on_text: the handler is called as handler\(ws, text\), "
                       r"which .*<lambda>\(ws\) cannot take$"):
        websocket.init().on_text(lambda ws: None)  # type: ignore[arg-type,misc]
    with pytest.raises(TypeError, match=r"^on_close: the handler is called as handler\(ws, code, reason\)"):
        websocket.init().on_close(lambda ws, code: None)  # type: ignore[arg-type,misc]
    with pytest.raises(TypeError, match=r"^handler: the handler is called as handler\(request, server\)"):
        server.handler(lambda request: None)  # type: ignore[arg-type,misc]
    with pytest.raises(TypeError, match=r"^on_text: the handler is called as handler\(ws, text\)"):
        websocket.Config(on_text_message=lambda ws: None)  # type: ignore[arg-type,misc]

    # Whatever can take the arguments is accepted: defaults, *args, bound methods, partials,
    # callable objects, and builtins whose signature Python cannot tell.
    class Handlers:
        def on_text(self, ws: Any, text: str) -> None:
            pass

        def __call__(self, ws: Any) -> None:
            pass

    def tagged(tag: str, ws: Any, data: bytes) -> None:
        pass

    def drained(ws: Any, extra: object = None) -> None:
        pass

    # A decorator's wrapper is what gets called, whatever the function it wraps takes.
    def with_db(fn: Callable[..., Any]) -> Callable[[Any, str], Any]:
        @functools.wraps(fn)
        def wrapper(ws: Any, text: str) -> Any:
            return fn(ws, text, "db")
        return wrapper

    @with_db
    def on_text_with_db(ws: Any, text: str, db: str) -> None:
        pass

    websocket.init().on_text(on_text_with_db)
    config = (websocket.init().on_text(Handlers().on_text).on_open(Handlers())
              .on_close(lambda ws, *rest: None).on_drain(drained)
              .on_bytes(functools.partial(tagged, "tag")).on_ping(print))
    assert config.on_ping_handler is print


def test_publish_to_self_int_raises_type_error() -> None:
    with pytest.raises(TypeError):
        websocket.init().publish_to_self(1)  # type: ignore[arg-type]


def test_port_out_of_range_raises_value_error() -> None:
    with pytest.raises(ValueError):
        server.handler(upgrade_ws_path).port(70000)
    with pytest.raises(ValueError):
        server.handler(upgrade_ws_path).port(-1)


def test_server_handler_non_callable_raises_type_error() -> None:
    with pytest.raises(TypeError):
        server.handler(42)  # type: ignore[arg-type]


def test_module_function_style_equals_method_style() -> None:
    c = websocket.init()
    assert websocket.idle_timeout(c, 5) == c.idle_timeout(5)
    assert websocket.on_text(c, on_text) == c.on_text(on_text)
    assert websocket.max_payload_length(c, 10) == c.max_payload_length(10)
    assert websocket.backpressure_limit(c, 10) == c.backpressure_limit(10)
    assert websocket.close_on_backpressure_limit(c, True) == c.close_on_backpressure_limit(True)
    assert websocket.publish_to_self(c, True) == c.publish_to_self(True)
    assert websocket.send_pings(c, False) == c.send_pings(False)
    s = server.handler(upgrade_ws_path)
    assert server.port(s, 80) == s.port(80)
    assert server.hostname(s, "127.0.0.1") == s.hostname("127.0.0.1")
    assert server.websocket(s, c) == s.websocket(c)
    assert server.max_request_body_size(s, 5) == s.max_request_body_size(5)


def _public_callables() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for module in (brioche, websocket, server):
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type) and obj.__module__.startswith("brioche."):
                found.append((f"{module.__name__}.{name}", obj))
                found += [
                    (f"{module.__name__}.{name}.{attr}", member)
                    for attr, member in vars(obj).items()
                    if not attr.startswith("_") and inspect.isfunction(member)
                ]
            elif inspect.isfunction(obj):
                found.append((f"{module.__name__}.{name}", obj))
    return found


def test_every_public_annotation_resolves_at_run_time() -> None:
    """``typing.get_type_hints`` (what pydantic, dependency injectors and doc tools call)
    resolves every public function's, method's and class's annotations: ``Buffer`` (the payload
    type) and ``Handler`` were bound for type checkers only, and raised ``NameError``."""
    callables = _public_callables()
    failed = []
    for name, obj in callables:
        try:
            typing.get_type_hints(obj)
        except Exception as exc:  # noqa: BLE001 - each failure is listed below
            failed.append(f"{name}: {exc!r}")
    assert failed == []
    assert len(callables) > 100
    assert typing.get_type_hints(websocket.send)["message"] == str | Buffer
    reload_handler = typing.get_type_hints(brioche.Server.reload)["handler"]
    assert typing.get_args(reload_handler) == (server.Handler, type(None))


# -- errors ----------------------------------------------------------------------------------


def test_brioche_error_is_an_exception() -> None:
    assert issubclass(brioche.BriocheError, Exception)


async def test_binding_a_port_in_use_raises_os_error(serve: ServeFn) -> None:
    first = await serve(websocket.init())
    config = server.handler(upgrade_ws_path).hostname("127.0.0.1").port(first.port)
    with pytest.raises(OSError):
        second = await config.serve()
        await second.stop()  # only reached if the bind wrongly succeeded


# Beyond "raises an OSError": _brioche.pyi declares `class BindError(BriocheError, OSError)` for
# "the server could not listen on the requested address", and callers that retry on another port
# check `exc.errno == errno.EADDRINUSE` as they do with asyncio.create_server.


async def test_binding_a_port_in_use_error_is_a_brioche_error(serve: ServeFn) -> None:
    first = await serve(websocket.init())
    config = server.handler(upgrade_ws_path).hostname("127.0.0.1").port(first.port)
    with pytest.raises(OSError) as info:
        await config.serve()
    assert isinstance(info.value, brioche.BriocheError), type(info.value).__mro__


async def test_binding_a_port_in_use_error_has_errno_eaddrinuse(serve: ServeFn) -> None:
    first = await serve(websocket.init())
    config = server.handler(upgrade_ws_path).hostname("127.0.0.1").port(first.port)
    with pytest.raises(OSError) as info:
        await config.serve()
    assert info.value.errno == errno.EADDRINUSE, info.value


async def test_serve_resolves_the_hostname_with_the_loops_getaddrinfo() -> None:
    """getaddrinfo blocks: serve() must look the name up through the loop (in its executor)."""
    loop = asyncio.get_running_loop()
    looked_up: list[object] = []
    real = loop.getaddrinfo

    async def recording_getaddrinfo(host: Any, port: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        return await real(host, port, **kwargs)

    loop.getaddrinfo = recording_getaddrinfo  # type: ignore[method-assign]
    try:
        srv = await server.handler(upgrade_ws_path).hostname("localhost").port(0).serve()
        try:
            assert looked_up == ["localhost"]
            _, writer = await asyncio.open_connection("localhost", srv.port)
            writer.close()
        finally:
            await srv.stop()
        looked_up.clear()
        literal = await server.handler(upgrade_ws_path).hostname("127.0.0.1").port(0).serve()
        await literal.stop()
        assert looked_up == [], "an IP literal needs no lookup"
    finally:
        del loop.getaddrinfo


async def test_an_unresolvable_hostname_is_a_bind_error() -> None:
    config = server.handler(upgrade_ws_path).hostname("no-such-host.invalid").port(0)
    with pytest.raises(brioche.BindError, match="no-such-host.invalid"):
        await config.serve()
