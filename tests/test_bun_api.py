"""Bun's API: ping and pong handlers, ``send`` of bytes, assignable ``ws.data``, ``srv.reload``,
``srv.request_ip`` and ``srv.timeout``, over real sockets with the ``websockets`` client and httpx."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

import brioche
from brioche import _brioche, server, websocket
from brioche._server import Server
from conftest import Recorder, ServeFn, ws_url


async def recv(client: Any) -> Any:
    return await asyncio.wait_for(client.recv(), 5)


def echo_text(ws: brioche.WebSocket[Any], text: str) -> None:
    ws.send(text)


# -- on_ping / on_pong -----------------------------------------------------------------------


async def test_on_ping_gets_each_ping_in_order_with_messages_and_the_pong_still_goes_out(
    serve: ServeFn, recorder: Recorder
) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("event", "text", text)
        ws.send(text)

    async def on_ping(ws: brioche.WebSocket[Any], payload: bytes) -> None:
        recorder.add("event", "ping", payload)

    srv = await serve(websocket.init().on_text(on_text).on_ping(on_ping))
    async with connect(ws_url(srv), ping_interval=None) as client:
        await client.send("a")
        pong = await client.ping(b"\x00hello\xff")
        await client.send("b")
        await asyncio.wait_for(pong, 5)  # the automatic pong, with the ping's payload
        assert await recv(client) == "a"
        assert await recv(client) == "b"
        await recorder.wait_for(lambda: len(recorder.of("event")) == 3, 5)
    assert recorder.of("event") == [("text", "a"), ("ping", b"\x00hello\xff"), ("text", "b")]


async def test_pings_for_a_handler_count_as_messages_in_flight(serve: ServeFn, recorder: Recorder) -> None:
    """A client pings faster than on_ping runs (here: while the loop is blocked): the core stops
    reading it at the in-flight cap instead of queueing pings for Python without bound, and once
    the loop runs again every ping is handled and answered."""
    import threading

    from rawws import OP_PING, OP_PONG, blocking_connect, encode_frame, parse_frames
    from test_timeouts import unread_by_server

    pings = 20_000  # 240 KB: more than one 64 KiB read, which the core may hold unparsed
    seen: list[bytes] = []
    unread_seen: list[int] = []
    release = threading.Event()

    def on_ping(ws: brioche.WebSocket[Any], payload: bytes) -> None:
        if not seen:
            release.wait(20)  # blocks the loop: nothing is taken from the queue meanwhile
        seen.append(payload)
        if len(seen) == pings:
            recorder.add("all")

    srv = await serve(websocket.init().on_ping(on_ping))
    sock = await asyncio.to_thread(blocking_connect, srv.port)
    client_port = sock.getsockname()[1]
    flood = b"".join(encode_frame(OP_PING, b"%06d" % i) for i in range(pings))

    def send_and_watch() -> None:
        sock.sendall(flood)
        # Bounded poll (5 s): the server's receive queue keeps what the core does not read. A
        # core that reads on empties it within milliseconds; this one must hold it unchanged
        # for 20 polls in a row (200 ms).
        steady = 0
        for _ in range(500):
            unread = unread_by_server(srv.port, client_port)
            steady = steady + 1 if unread > 0 and unread_seen[-1:] == [unread] else 0
            unread_seen.append(unread)
            if steady == 20:
                break
            threading.Event().wait(0.01)
        release.set()

    watcher = threading.Thread(target=send_and_watch)
    watcher.start()
    try:
        await recorder.wait_for(lambda: bool(recorder.of("all")), timeout=30)
    finally:
        release.set()
        watcher.join(10)
    assert unread_seen[-21:] == [unread_seen[-1]] * 21 and unread_seen[-1] > 0, (
        f"the core read on while Python was blocked: unread {unread_seen[-5:]}"
    )
    assert seen == [b"%06d" % i for i in range(pings)]

    def pongs() -> list[bytes]:
        got: list[bytes] = []
        buffer = b""
        sock.settimeout(10)
        for _ in range(10_000):
            frames, buffer = parse_frames(buffer + sock.recv(65536))
            got += [f.payload for f in frames if f.opcode == OP_PONG]
            if len(got) >= pings:
                break
        return got

    assert await asyncio.to_thread(pongs) == [b"%06d" % i for i in range(pings)]
    sock.close()


async def test_on_pong_gets_the_clients_answer_to_ws_ping(serve: ServeFn, recorder: Recorder) -> None:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.ping(b"are you there")

    def on_pong(ws: brioche.WebSocket[Any], payload: bytes) -> None:
        recorder.add("pong", payload)
        ws.send("got " + payload.decode())

    srv = await serve(websocket.on_pong(websocket.init().on_open(on_open), on_pong))
    async with connect(ws_url(srv), ping_interval=None) as client:
        assert await recv(client) == "got are you there"
    assert recorder.of("pong") == [(b"are you there",)]


async def test_without_ping_and_pong_handlers_no_control_event_reaches_python(
    serve: ServeFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds: list[int] = []
    dispatch = Server._dispatch_batch

    def recording(self: Server[Any], events: list[tuple[Any, ...]]) -> None:
        kinds.extend(event[0] for event in events)
        dispatch(self, events)

    monkeypatch.setattr(Server, "_dispatch_batch", recording)
    srv = await serve(websocket.init().on_text(echo_text))
    async with connect(ws_url(srv), ping_interval=None) as client:
        await asyncio.wait_for(await client.ping(b"1"), 5)
        await client.send("after the ping")
        # The text comes after the ping on the wire: once it is echoed, the ping was parsed.
        assert await recv(client) == "after the ping"
    assert _brioche.EVENT_TEXT in kinds
    assert _brioche.EVENT_PING not in kinds and _brioche.EVENT_PONG not in kinds


# -- ws.send(str | bytes-like) ---------------------------------------------------------------


async def test_send_takes_bytes_like_as_binary_and_str_as_text(serve: ServeFn) -> None:
    statuses: list[brioche.SendStatus] = []

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        statuses.append(ws.send(text, compress=True))
        statuses.append(ws.send(text.encode()))
        statuses.append(ws.send(bytearray(b"ba")))
        statuses.append(websocket.send(ws, memoryview(b"xmvx")[1:3]))
        with pytest.raises(TypeError, match="str or a bytes-like object, got int"):
            ws.send(12)  # type: ignore[arg-type]

    srv = await serve(websocket.init().on_text(on_text))
    async with connect(ws_url(srv)) as client:
        await client.send("héllo")
        assert [await recv(client) for _ in range(4)] == ["héllo", "héllo".encode(), b"ba", b"mv"]
    assert statuses == [brioche.MessageSent(6), brioche.MessageSent(6), brioche.MessageSent(2),
                        brioche.MessageSent(2)]


# -- ws.data ----------------------------------------------------------------------------------


async def test_ws_data_is_assignable_and_each_connection_keeps_its_own(serve: ServeFn) -> None:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.data = {"from upgrade": ws.data, "count": 0}

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        state = ws.data
        websocket.set_data(ws, {**state, "count": state["count"] + 1})
        ws.send(f"{ws.data['from upgrade']} {ws.data['count']}")

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text))
    async with connect(ws_url(srv, "/ws?one")) as one, connect(ws_url(srv, "/ws?two")) as two:
        for expected in ("one 1", "one 2"):
            await one.send("x")
            assert await recv(one) == expected
        await two.send("x")
        assert await recv(two) == "two 1"



async def test_ws_data_releases_each_value_it_held(serve: ServeFn, recorder: Recorder) -> None:
    """A replaced value is released at once, and the last one when the connection's object goes:
    ``ws.data`` owns one reference, whatever was assigned in between."""
    import weakref

    from rawws import poll_until

    class Token:
        pass

    refs: list[weakref.ref[Token]] = []

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.data = Token()
        refs.append(weakref.ref(ws.data))
        ws.data = Token()
        refs.append(weakref.ref(ws.data))
        recorder.add("first released", refs[0]() is None)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(f"{type(ws.data).__name__} {ws.data is refs[1]()}")

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv)) as client:
        await client.send("x")
        assert await recv(client) == "Token True"
    await recorder.wait_for(lambda: recorder.of("close") == [(1000,)], 5)
    assert recorder.of("first released") == [(True,)]
    # The connection's object goes once the loop is done with its last event; no cycle holds it.
    assert await poll_until(lambda: refs[1]() is None, 5), "the last value outlived its connection"


async def test_a_socket_in_a_reference_cycle_is_collected(serve: ServeFn, recorder: Recorder) -> None:
    """``ws.data`` holding the socket (itself, or a dict holding it), or a context variable set
    to it in a handler (the connection's context then holds it): cycles the collector frees."""
    import contextvars
    import gc
    import weakref

    from rawws import poll_until

    current: contextvars.ContextVar[brioche.WebSocket[Any]] = contextvars.ContextVar("current")
    refs: list[weakref.ref[brioche.WebSocket[Any]]] = []

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        refs.append(weakref.ref(ws))
        kind = ws.data
        if kind == "self":
            ws.data = ws
        elif kind == "dict":
            ws.data = {"ws": ws}
        else:
            current.set(ws)  # runs in the connection's context, which the socket holds

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    srv = await serve(websocket.init().on_open(on_open).on_close(on_close))
    for kind in ("self", "dict", "contextvar"):
        async with connect(ws_url(srv) + "?" + kind):
            pass
    await recorder.wait_for(lambda: recorder.of("close") == [(1000,)] * 3, 5)
    assert len(refs) == 3

    def collected() -> bool:
        gc.collect()
        return all(ref() is None for ref in refs)

    # Without __traverse__ the collector cannot see the socket's references: never collected.
    assert await poll_until(collected, 5), [ref() is None for ref in refs]


# -- srv.reload --------------------------------------------------------------------------------


async def test_reload_swaps_the_http_and_websocket_handlers_without_dropping_a_connection(
    serve: ServeFn, recorder: Recorder
) -> None:
    def on_text_v1(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send("v1 " + text)

    def on_text_v2(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send("v2 " + text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    def on_ping(ws: brioche.WebSocket[Any], payload: bytes) -> None:
        ws.send(b"ping " + payload)

    def handler_v2(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        if request.path == "/ws":
            return server.upgrade(srv, request, [], None, server.bad_request)
        return server.text("v2")

    v1 = websocket.init().on_text(on_text_v1).on_close(on_close)
    srv = await serve(v1)
    async with httpx.AsyncClient() as http, connect(ws_url(srv), ping_interval=None) as client:
        assert (await http.get(srv.url)).text == "ok"
        await client.send("a")
        assert await recv(client) == "v1 a"
        await asyncio.wait_for(await client.ping(b"before"), 5)  # no on_ping yet: not seen

        srv.reload(handler=handler_v2, websocket=websocket.init().on_text(on_text_v2).on_close(on_close)
                   .on_ping(on_ping))

        assert (await http.get(srv.url)).text == "v2"
        await client.send("b")
        assert await recv(client) == "v2 b"
        await client.ping(b"after")
        assert await recv(client) == b"ping after"
        server.reload(srv, websocket=v1)
        await client.send("c")
        assert await recv(client) == "v1 c"
    await recorder.wait_for(lambda: bool(recorder.of("close")), 5)
    assert recorder.of("close") == [(1000,)]


async def test_reload_refuses_what_cannot_change_live_with_a_clear_error(serve: ServeFn) -> None:
    config = websocket.init().on_text(echo_text)
    srv = await serve(config)
    with pytest.raises(ValueError, match=r"reload cannot change idle_timeout \(120 -> 5\)"):
        srv.reload(websocket=config.idle_timeout(5))
    with pytest.raises(ValueError, match="max_payload_length"):
        srv.reload(websocket=config.max_payload_length(10))
    with pytest.raises(TypeError, match="handler=, websocket= or both"):
        srv.reload()
    with pytest.raises(TypeError, match="callable"):
        srv.reload(handler=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="websocket.Config"):
        srv.reload(websocket="on_text")  # type: ignore[arg-type]
    plain = await serve(None)
    with pytest.raises(ValueError, match="without a websocket config"):
        plain.reload(websocket=config)
    # Nothing was half-applied: the first server still echoes with its first config.
    async with connect(ws_url(srv)) as client:
        await client.send("same")
        assert await recv(client) == "same"


# -- srv.request_ip ----------------------------------------------------------------------------


async def test_request_ip_gives_the_clients_address_family_and_port(serve: ServeFn) -> None:
    seen: list[brioche.SocketAddress | None] = []

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        seen.append(srv.request_ip(request))
        seen.append(server.request_ip(srv, request))
        return server.upgrade(srv, request, [], None, server.bad_request)

    srv = await serve(websocket.init().on_text(echo_text), handler=handler)
    async with connect(ws_url(srv)) as client:
        host, port = client.local_address[:2]
        await client.send("x")
        assert await recv(client) == "x"
    expected = brioche.SocketAddress("127.0.0.1", "IPv4", port)
    assert host == "127.0.0.1"
    assert seen == [expected, expected]
    assert seen[0] is not None and (seen[0].address, seen[0].family, seen[0].port) == tuple(expected)


# -- srv.timeout -------------------------------------------------------------------------------


async def test_timeout_answers_503_and_cancels_a_handler_that_did_not_answer_in_time(
    serve: ServeFn, recorder: Recorder
) -> None:
    never = asyncio.Event()

    async def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        if request.path == "/fast":
            srv.timeout(request, 2)
            return server.text("fast")
        srv.timeout(request, 10)
        server.timeout(srv, request, 0.2)  # replaces the 10 s
        try:
            await never.wait()
        except asyncio.CancelledError:
            recorder.add("cancelled", request.path)
            raise
        return server.text("never")

    srv = await serve(None, handler=handler)
    async with httpx.AsyncClient(timeout=5) as http:
        slow = await http.get(srv.url + "slow")
        assert (slow.status_code, slow.text) == (503, "Service Unavailable")
        await recorder.wait_for(lambda: bool(recorder.of("cancelled")), 5)
        assert recorder.of("cancelled") == [("/slow",)]
        fast = await http.get(srv.url + "fast")
        assert (fast.status_code, fast.text) == (200, "fast")


async def test_timeout_ends_with_the_upgrade_and_spares_the_handler_after_it(
    serve: ServeFn, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        srv.timeout(request, 0.1)
        if not srv.upgrade(request):
            return server.bad_request()
        try:
            await asyncio.sleep(0.4)  # work after the 101 (an audit log), four times the limit
        except asyncio.CancelledError:
            recorder.add("ended", "cancelled")
            raise
        recorder.add("ended", "finished")
        return None

    caplog.set_level(logging.WARNING, logger="brioche")
    srv = await serve(websocket.init().on_text(lambda ws, text: ws.send(text)), handler=handler)
    async with connect(ws_url(srv)) as client:
        await recorder.wait_for(lambda: bool(recorder.of("ended")), 5)
        assert recorder.of("ended") == [("finished",)]
        await client.send("still open")
        assert await asyncio.wait_for(client.recv(), 5) == "still open"
    assert [r.getMessage() for r in caplog.records if r.name == "brioche"] == []


async def test_timeout_zero_removes_the_limit(serve: ServeFn) -> None:
    async def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        srv.timeout(request, 0.05)
        srv.timeout(request, 0)
        await asyncio.sleep(0.3)  # the slow handler under test, six times the removed limit
        return server.text("late but answered")

    srv = await serve(None, handler=handler)
    async with httpx.AsyncClient(timeout=5) as http:
        reply = await http.get(srv.url)
    assert (reply.status_code, reply.text) == (200, "late but answered")


async def test_timeout_checks_its_argument(serve: ServeFn) -> None:
    errors: list[type[BaseException]] = []

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        for bad in (-1, float("nan"), float("inf"), "1", None):
            try:
                srv.timeout(request, bad)  # type: ignore[arg-type]
            except (TypeError, ValueError) as exc:
                errors.append(type(exc))
        return server.ok()

    srv = await serve(None, handler=handler)
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(srv.url)).status_code == 200
    assert errors == [ValueError, ValueError, ValueError, TypeError, TypeError]


async def test_a_clients_close_frame_is_answered_with_its_code_and_reason(
    serve: ServeFn, recorder: Recorder
) -> None:
    """As Bun (its test "a Close with code 1000 is echoed back as 1000") and ``websockets``
    answer: the reply carries the client's reason too. Before, the code alone."""
    from rawws import OP_CLOSE, RawWebSocket

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    srv = await serve(websocket.init().on_close(on_close))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_close(1000, "bye")
        reply = await client.recv_frame()
    assert (reply.opcode, reply.payload) == (OP_CLOSE, b"\x03\xe8bye")
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1000, "bye")]


async def test_the_clients_protocol_header_passed_to_upgrade_chooses_its_first_offer(
    serve: ServeFn, recorder: Recorder
) -> None:
    """Bun's test "server.upgrade() with Sec-WebSocket-Protocol in options.headers": the
    client's own header, a list, passed to ``upgrade()`` answers with its first item (the 101
    names one). Before, the whole list was taken as one name the client had not offered: a
    ``ValueError`` in the handler, and no WebSocket."""

    def handler(request: brioche.server.Request, srv: Server[Any]) -> None:
        offered = request.headers["sec-websocket-protocol"]
        srv.upgrade(request, [("Sec-WebSocket-Protocol", offered), ("X-Custom", "hello")])

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open", ws.subprotocol)

    srv = await serve(websocket.init().on_open(on_open), handler=handler)
    async with connect(ws_url(srv), subprotocols=["part", "tail"]) as client:  # type: ignore[list-item]
        assert client.subprotocol == "part"
        assert client.response is not None
        assert client.response.headers["X-Custom"] == "hello"
        await recorder.wait_for(lambda: bool(recorder.of("open")))
    assert recorder.of("open") == [("part",)]


async def test_upgrade_and_terminate_return_before_on_open_and_on_close_run(
    serve: ServeFn, recorder: Recorder
) -> None:
    """Where brioche's order is not Bun's (README, Order): Bun's ``upgrade()`` runs ``open``
    and its ``terminate()`` runs ``close`` before returning; brioche's return first, and the
    handler runs on after the call, then the socket's handler."""

    def handler(request: brioche.server.Request, srv: Server[Any]) -> None:
        recorder.add("event", "upgrade", srv.upgrade(request))
        recorder.add("event", "rest of handler")

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("event", "open")

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.terminate()
        recorder.add("event", "terminate returned", ws.ready_state)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("event", "close", code)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_close(on_close), handler=handler)
    async with connect(ws_url(srv)) as client:
        await client.send("terminate")
        await recorder.wait_for(lambda: ("close", 1006) in recorder.of("event"))
    assert recorder.of("event") == [
        ("upgrade", True),
        ("rest of handler",),
        ("open",),
        ("terminate returned", brioche.ReadyState.CLOSED),
        ("close", 1006),
    ]
