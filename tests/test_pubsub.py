"""Topics: subscribe/unsubscribe, who a publish reaches, what it reports, and ordering."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import brioche
from brioche import MessageBackpressured, MessageDropped, MessageSent, server, websocket
from conftest import Recorder, ServeFn, ws_url
from rawws import OP_TEXT, RawWebSocket, SendRecord, fill, numbered


def topics_config(recorder: Recorder, holder: list[brioche.Server[Any]], **options: bool) -> websocket.Config[Any]:
    """``/ws?a,b`` subscribes to a and b on open. Text commands:

    ``pub <topic> <msg>`` publishes (status recorded), ``pubb <topic> <msg>`` publishes bytes,
    ``echo <x>`` answers ``x`` (a round trip that proves nothing else was queued before it).
    """

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        for topic in (ws.data or "").split(","):
            if topic:
                ws.subscribe(topic)
        recorder.add("open", ws)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        command, _, rest = text.partition(" ")
        if command == "pub":
            topic, _, message = rest.partition(" ")
            recorder.add("pub", ws.publish(topic, message))
        elif command == "pubb":
            topic, _, message = rest.partition(" ")
            recorder.add("pub", ws.publish_bytes(topic, message.encode()))
        elif command == "pubany":
            # ws.publish with a bytes-like message, as send takes one; then a wrong type.
            topic, _, message = rest.partition(" ")
            recorder.add("pub", ws.publish(topic, message.encode()), ws.publish(topic, bytearray(b"ba")),
                         websocket.publish(ws, topic, memoryview(b"mv")))
            try:
                ws.publish(topic, 1)  # type: ignore[arg-type]
            except TypeError as exc:
                recorder.add("refused", str(exc))
        elif command == "echo":
            ws.send(rest)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws, srv_count(holder, ws.data))

    config = websocket.init().on_open(on_open).on_text(on_text).on_close(on_close)
    if options.get("publish_to_self"):
        config = config.publish_to_self(True)
    return config


def srv_count(holder: list[brioche.Server[Any]], topics: str | None) -> dict[str, int]:
    return {t: holder[0].subscriber_count(t) for t in (topics or "").split(",") if t}


async def start(serve: ServeFn, recorder: Recorder, **options: bool) -> brioche.Server[Any]:
    holder: list[brioche.Server[Any]] = []
    srv = await serve(topics_config(recorder, holder, **options))
    holder.append(srv)
    return srv


@asynccontextmanager
async def clients(
    srv: brioche.Server[Any], recorder: Recorder, *queries: str
) -> AsyncIterator[list[ClientConnection]]:
    """Open one client per query and wait until every on_open (and so its subscribe) ran."""
    async with AsyncExitStack() as stack:
        opened = len(recorder.of("open"))
        conns = [await stack.enter_async_context(connect(ws_url(srv, f"/ws?{q}"))) for q in queries]
        await recorder.wait_for(lambda: len(recorder.of("open")) == opened + len(queries))
        yield conns


async def recv(client: ClientConnection) -> str | bytes:
    return await asyncio.wait_for(client.recv(), 5)


def upgrade_with_path(request: brioche.server.Request, srv: brioche.Server[Any]) -> None:
    """Upgrade any path, with the path as ``ws.data``."""
    srv.upgrade(request, data=request.path)


async def assert_nothing_pending(client: ClientConnection) -> None:
    """A round trip: the echo must be the very next message."""
    await client.send("echo sync")
    assert await recv(client) == "sync"


class Paths:
    """A server's sockets by the path they connected to (``ws.data``, see `upgrade_with_path`),
    each subscribed on open to the topics ``topics`` gives its path. A text ``echo sync`` is
    answered ``sync`` (`assert_nothing_pending`); any other calls ``act(srv)``, once `srv` is set
    to the server that `config()` serves."""

    def __init__(
        self, recorder: Recorder, topics: dict[str, tuple[str, ...]], act: Callable[[brioche.Server[Any]], None]
    ) -> None:
        self.recorder, self.topics, self.act = recorder, topics, act
        self.sockets: dict[str, brioche.WebSocket[Any]] = {}
        self.srv: brioche.Server[Any] | None = None

    def on_open(self, ws: brioche.WebSocket[Any]) -> None:
        self.sockets[ws.data] = ws
        for topic in self.topics.get(ws.data, ()):
            ws.subscribe(topic)
        self.recorder.add("open")

    def on_text(self, ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "echo sync":
            ws.send("sync")
            return
        assert self.srv is not None
        self.act(self.srv)

    def config(self) -> websocket.Config[Any]:
        return websocket.init().on_open(self.on_open).on_text(self.on_text)


async def test_subscribe_unsubscribe_is_subscribed_and_subscriptions(serve: ServeFn, recorder: Recorder) -> None:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        seen: list[Any] = []
        seen.append(ws.subscriptions)
        ws.subscribe("a")
        websocket.subscribe(ws, "b")
        seen.append(sorted(ws.subscriptions))
        seen.append(sorted(websocket.subscriptions(ws)))
        seen.append((ws.is_subscribed("a"), websocket.is_subscribed(ws, "b"), ws.is_subscribed("c")))
        ws.unsubscribe("a")
        seen.append((ws.subscriptions, ws.is_subscribed("a"), ws.is_subscribed("b")))
        websocket.unsubscribe(ws, "b")
        ws.unsubscribe("never-subscribed")
        seen.append((ws.subscriptions, websocket.is_subscribed(ws, "b")))
        recorder.add("seen", seen)

    srv = await serve(websocket.init().on_open(on_open))
    async with connect(ws_url(srv)):
        await recorder.wait_for(lambda: bool(recorder.of("seen")))
    assert recorder.of("seen") == [([
        [],
        ["a", "b"],
        ["a", "b"],
        (True, True, False),
        (["b"], False, True),
        ([], False),
    ],)]


async def test_empty_topic_name_raises_value_error(serve: ServeFn, recorder: Recorder) -> None:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        raised = []
        for call in (
            lambda: ws.subscribe(""),
            lambda: ws.unsubscribe(""),
            lambda: ws.is_subscribed(""),
            lambda: ws.publish("", "x"),
            lambda: ws.publish_bytes("", b"x"),
            lambda: websocket.subscribe(ws, ""),
            lambda: websocket.publish(ws, "", "x"),
        ):
            try:
                call()
            except ValueError:
                raised.append(True)
            else:
                raised.append(False)
        recorder.add("raised", raised, ws.subscriptions)

    srv = await serve(websocket.init().on_open(on_open))
    async with connect(ws_url(srv)):
        await recorder.wait_for(lambda: bool(recorder.of("raised")))
    assert recorder.of("raised") == [([True] * 7, [])]
    with pytest.raises(ValueError):
        srv.publish("", "x")
    with pytest.raises(ValueError):
        server.publish(srv, "", b"x")


async def test_a_topic_that_is_not_a_str_is_a_type_error_naming_the_call(
    serve: ServeFn, recorder: Recorder
) -> None:
    """Before, pyo3's own message named neither the call nor the argument: "'int' object is
    not an instance of 'str'"."""

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        errors = []
        for name, call in (
            ("subscribe", lambda: ws.subscribe(1)),  # type: ignore[arg-type]
            ("unsubscribe", lambda: ws.unsubscribe(b"t")),  # type: ignore[arg-type]
            ("is_subscribed", lambda: ws.is_subscribed(None)),  # type: ignore[arg-type]
            ("publish", lambda: ws.publish(1, "x")),  # type: ignore[arg-type]
            ("publish_bytes", lambda: ws.publish_bytes(1, b"x")),  # type: ignore[arg-type]
            ("subscribe", lambda: websocket.subscribe(ws, 1)),  # type: ignore[arg-type]
        ):
            with pytest.raises(TypeError) as raised:
                call()
            errors.append((name, str(raised.value)))
        recorder.add("errors", errors)

    srv = await serve(websocket.init().on_open(on_open))
    async with connect(ws_url(srv)):
        await recorder.wait_for(lambda: bool(recorder.of("errors")))
    assert recorder.of("errors") == [([
        ("subscribe", "subscribe() takes the topic as a str, got int"),
        ("unsubscribe", "unsubscribe() takes the topic as a str, got bytes"),
        ("is_subscribed", "is_subscribed() takes the topic as a str, got NoneType"),
        ("publish", "publish() takes the topic as a str, got int"),
        ("publish_bytes", "publish_bytes() takes the topic as a str, got int"),
        ("subscribe", "subscribe() takes the topic as a str, got int"),
    ],)]
    with pytest.raises(TypeError, match=r"^publish\(\) takes the topic as a str, got int$"):
        srv.publish(1, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^subscriber_count\(\) takes the topic as a str, got int$"):
        srv.subscriber_count(1)  # type: ignore[arg-type]


async def test_server_topic_calls_refuse_an_empty_topic_and_name_a_wrong_message(
    serve: ServeFn, recorder: Recorder
) -> None:
    srv = await start(serve, recorder)
    with pytest.raises(ValueError, match="^a topic name must be a non-empty string$"):
        srv.subscriber_count("")
    with pytest.raises(ValueError, match="^a topic name must be a non-empty string$"):
        srv.publish("", "x")
    with pytest.raises(TypeError, match=r"^publish\(\) takes a str or a bytes-like object, got int$"):
        srv.publish("t", 1)  # type: ignore[arg-type]
    async with clients(srv, recorder, "t") as (client,):
        assert srv.publish("t", bytearray(b"ab")) == MessageSent(2)
        assert srv.publish("t", memoryview(b"cde")) == MessageSent(3)
        assert [await recv(client), await recv(client)] == [b"ab", b"cde"]


async def test_subscribing_twice_is_idempotent(serve: ServeFn, recorder: Recorder) -> None:
    srv = await start(serve, recorder)
    async with clients(srv, recorder, "t,t") as (client,):
        (ws,) = [e[0] for e in recorder.of("open")]
        ws.subscribe("t")
        assert srv.subscriber_count("t") == 1
        assert ws.subscriptions == ["t"]
        assert srv.publish("t", "once") == MessageSent(4)
        assert await recv(client) == "once"
        await assert_nothing_pending(client)


async def test_server_publish_reaches_every_subscriber_and_only_them(serve: ServeFn, recorder: Recorder) -> None:
    srv = await start(serve, recorder)
    async with clients(srv, recorder, "news", "news,sport", "news", "sport") as conns:
        news, both, news2, sport = conns
        assert srv.subscriber_count("news") == 3
        assert server.subscriber_count(srv, "sport") == 2
        assert srv.subscriber_count("nothing") == 0

        assert srv.publish("news", "héllo") == MessageSent(len("héllo".encode()))
        assert server.publish(srv, "news", b"\x00\x01\xff") == MessageSent(3)
        assert srv.publish("sport", b"goal") == MessageSent(4)
        for client in (news, both, news2):
            assert await recv(client) == "héllo"
            assert await recv(client) == b"\x00\x01\xff"
        assert await recv(both) == b"goal"
        assert await recv(sport) == b"goal"
        for client in conns:
            await assert_nothing_pending(client)


async def test_ws_publish_skips_the_sender_by_default(serve: ServeFn, recorder: Recorder) -> None:
    srv = await start(serve, recorder)
    async with clients(srv, recorder, "room", "room") as (sender, other):
        await sender.send("pub room hi")
        assert await recv(other) == "hi"
        await assert_nothing_pending(sender)
        assert recorder.of("pub") == [(MessageSent(2),)]


async def test_publish_to_self_also_reaches_the_sender(serve: ServeFn, recorder: Recorder) -> None:
    srv = await start(serve, recorder, publish_to_self=True)
    async with clients(srv, recorder, "room", "room") as (sender, other):
        await sender.send("pub room hi")
        assert await recv(other) == "hi"
        assert await recv(sender) == "hi"
        await assert_nothing_pending(sender)
        await assert_nothing_pending(other)


async def test_publisher_need_not_be_subscribed(serve: ServeFn, recorder: Recorder) -> None:
    srv = await start(serve, recorder)
    async with clients(srv, recorder, "room", "") as (subscriber, outsider):
        await outsider.send("pubb room data")
        assert await recv(subscriber) == b"data"
        await assert_nothing_pending(outsider)
        assert recorder.of("pub") == [(MessageSent(4),)]


async def test_ws_publish_sends_bytes_like_messages_as_binary(serve: ServeFn, recorder: Recorder) -> None:
    srv = await start(serve, recorder)
    async with clients(srv, recorder, "room", "") as (subscriber, publisher):
        await publisher.send("pubany room data")
        assert [await recv(subscriber) for _ in range(3)] == [b"data", b"ba", b"mv"]
        await assert_nothing_pending(publisher)
        assert recorder.of("pub") == [(MessageSent(4), MessageSent(2), MessageSent(2))]
        assert recorder.of("refused") == [("publish() takes a str or a bytes-like object, got int",)]


async def test_publish_with_no_recipient_is_dropped(serve: ServeFn, recorder: Recorder) -> None:
    srv = await start(serve, recorder)
    async with clients(srv, recorder, "mine") as (client,):
        await client.send("pub nobody x")  # no subscriber at all
        await client.send("pub mine x")  # only the sender, which publish skips
        await assert_nothing_pending(client)
        assert recorder.of("pub") == [(MessageDropped(),), (MessageDropped(),)]
    assert srv.publish("nobody", "x") == MessageDropped()
    assert srv.publish("nobody", b"x") == MessageDropped()


async def test_publish_reports_payload_utf8_length(serve: ServeFn, recorder: Recorder) -> None:
    message = "héllo wörld 🥐"
    srv = await start(serve, recorder)
    async with clients(srv, recorder, "t", "") as (subscriber, publisher):
        await publisher.send(f"pub t {message}")
        assert await recv(subscriber) == message
        await publisher.send(f"pubb t {message}")
        assert await recv(subscriber) == message.encode()
        await assert_nothing_pending(publisher)
    size = len(message.encode())
    assert size != len(message)
    assert recorder.of("pub") == [(MessageSent(size),), (MessageSent(size),)]


async def test_closed_socket_is_subscribed_to_nothing(serve: ServeFn, recorder: Recorder) -> None:
    after_close: list[Any] = []

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.subscribe("t")
        ws.subscribe("u")
        recorder.add("open", ws)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        ws.subscribe("v")  # a no-op on a closed socket
        after_close.append((ws.subscriptions, ws.is_subscribed("t"), ws.is_subscribed("v")))
        recorder.add("close", code)

    srv = await serve(websocket.init().on_open(on_open).on_close(on_close))
    async with connect(ws_url(srv)), connect(ws_url(srv)):
        await recorder.wait_for(lambda: len(recorder.of("open")) == 2)
        assert (srv.subscriber_count("t"), srv.subscriber_count("u")) == (2, 2)
    await recorder.wait_for(lambda: len(recorder.of("close")) == 2)
    assert after_close == [([], False, False)] * 2
    assert [srv.subscriber_count(t) for t in ("t", "u", "v")] == [0, 0, 0]
    (ws,) = recorder.of("open")[0]
    ws.subscribe("w")
    assert srv.subscriber_count("w") == 0
    assert srv.publish("t", "x") == MessageDropped()


async def test_subscriber_count_drops_when_one_of_two_closes(serve: ServeFn, recorder: Recorder) -> None:
    srv = await start(serve, recorder)
    async with clients(srv, recorder, "t") as (staying,):
        async with clients(srv, recorder, "t"):
            assert srv.subscriber_count("t") == 2
        await recorder.wait_for(lambda: len(recorder.of("close")) == 1)
        assert srv.subscriber_count("t") == 1
        assert srv.publish("t", "still") == MessageSent(5)
        assert await recv(staying) == "still"


async def test_direct_sends_and_publishes_keep_their_order(serve: ServeFn, recorder: Recorder) -> None:
    holder: list[brioche.Server[Any]] = []

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        statuses = []
        for i in range(60):
            match i % 4:
                case 0:
                    statuses.append(ws.send(f"{i}"))
                case 1:
                    statuses.append(holder[0].publish("t", f"{i}"))
                case 2:
                    statuses.append(websocket.publish_bytes(ws, "t", f"{i}".encode()))
                case _:
                    statuses.append(websocket.publish(ws, "t", f"{i}"))
        recorder.add("statuses", statuses)

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.subscribe("t")

    config = websocket.init().on_open(on_open).on_text(on_text).publish_to_self(True)
    srv = await serve(config)
    holder.append(srv)
    async with connect(ws_url(srv)) as client:
        await client.send("go")
        got = [await recv(client) for _ in range(60)]
    expected = [f"{i}".encode() if i % 4 == 2 else f"{i}" for i in range(60)]
    assert got == expected
    ((statuses,),) = recorder.of("statuses")
    assert statuses == [MessageSent(len(f"{i}")) for i in range(60)]


async def test_publish_is_backpressured_if_any_recipient_is_congested_and_dropped_if_any_dropped(
    serve: ServeFn, recorder: Recorder
) -> None:
    size = 64 * 1024
    records: list[SendRecord] = []
    holder: list[brioche.Server[Any]] = []

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        messages = (numbered(i, size) for i in range(300))
        if text == "congest":
            await fill(ws, messages, records=records,
                       stop_when=lambda status: isinstance(status, MessageBackpressured))
            recorder.add("publish", holder[0].publish("t", "while congested"))
        elif text == "overfill":
            for message in messages:
                if ws.send_bytes(message) == MessageDropped():
                    break
            recorder.add("publish", holder[0].publish("t", "while over the limit"))
        elif text == "echo sync":
            ws.send("sync")

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.subscribe("t")
        recorder.add("open")

    config = websocket.init().on_open(on_open).on_text(on_text).backpressure_limit(1024 * 1024)
    srv = await serve(config)
    holder.append(srv)
    async with connect(ws_url(srv)) as healthy, await RawWebSocket.connect(srv.port, rcvbuf=4096) as stalled:
        await recorder.wait_for(lambda: len(recorder.of("open")) == 2)
        assert srv.publish("t", "both fine") == MessageSent(9)
        assert await recv(healthy) == "both fine"
        assert (await stalled.recv_frame()).payload == b"both fine"

        stalled.pause_reading()
        await stalled.send_text("congest")
        await recorder.wait_for(lambda: len(recorder.of("publish")) == 1)
        assert isinstance(records[-1].status, MessageBackpressured)
        assert recorder.of("publish") == [(MessageBackpressured(),)]
        assert await recv(healthy) == "while congested"

        await stalled.send_text("overfill")
        await recorder.wait_for(lambda: len(recorder.of("publish")) == 2)
        assert recorder.of("publish")[1] == (MessageDropped(),)
        assert await recv(healthy) == "while over the limit", "the others still get it"
        await assert_nothing_pending(healthy)

        # The stalled client gets what was accepted for it, ending with the first publish.
        stalled.resume_reading()
        accepted = len(records)
        for i in range(accepted):
            frame = await stalled.recv_frame(timeout=10)
            assert frame.payload == numbered(i, size)
        frame = await stalled.recv_frame(timeout=10)
        assert (frame.opcode, frame.payload) == (OP_TEXT, b"while congested")


async def test_one_batchs_publishes_sends_subscribes_and_closes_keep_their_order(
    serve: ServeFn, recorder: Recorder
) -> None:
    """Publishes to one topic that follow each other in a batch are queued to each subscriber
    together, later; whatever else the batch does to a connection or a subscription comes after
    the publishes made before it and before those made after it, and ``stats()`` read in the
    handler counts them all."""

    def act(srv: brioche.Server[Any]) -> None:
        a, b, c = paths.sockets["/a"], paths.sockets["/b"], paths.sockets["/c"]
        statuses = [srv.publish("t", "t1"), srv.publish("t", "t2"), a.send("a1")]
        statuses += [srv.publish("t", "t3"), srv.publish("t", "t4")]
        c.subscribe("t")
        statuses += [srv.publish("t", "t5"), srv.publish("t", "t6")]
        b.unsubscribe("t")
        statuses += [srv.publish("t", "t7"), srv.publish("u", "u1"), srv.publish("t", "t8")]
        # t1-t4 to a and b, t5-t6 to a, b and c, t7 and t8 to a and c, u1 to a
        recorder.add("deliveries", srv.stats()["deliveries"])
        a.close(4000, "bye")
        statuses.append(srv.publish("t", "t9"))
        recorder.add("statuses", statuses)

    paths = Paths(recorder, {"/a": ("t", "u"), "/b": ("t",)}, act)
    srv = await serve(paths.config(), handler=upgrade_with_path)
    paths.srv = srv
    async with AsyncExitStack() as stack:
        a, b, c, go = [
            await stack.enter_async_context(connect(ws_url(srv, path))) for path in ("/a", "/b", "/c", "/go")
        ]
        await recorder.wait_for(lambda: len(recorder.of("open")) == 4)
        await go.send("go")
        assert [await recv(a) for _ in range(10)] == ["t1", "t2", "a1", "t3", "t4", "t5", "t6", "t7", "u1", "t8"]
        with pytest.raises(ConnectionClosed):
            await recv(a)
        assert a.close_code == 4000
        assert [await recv(b) for _ in range(6)] == ["t1", "t2", "t3", "t4", "t5", "t6"]
        assert [await recv(c) for _ in range(5)] == ["t5", "t6", "t7", "t8", "t9"]
        await assert_nothing_pending(b)
        await assert_nothing_pending(c)
    # a left its topics when its close began, so t9 went to c alone, and was Sent.
    assert recorder.of("statuses") == [([MessageSent(2)] * 11,)]
    assert recorder.of("deliveries") == [(8 + 6 + 2 + 1 + 2,)]


async def test_a_run_of_publishes_reports_and_queues_as_each_publish_alone(serve: ServeFn, recorder: Recorder) -> None:
    """Twelve 1,000-byte publishes in one handler, to two subscribers with a 16 KiB limit (the
    high-water mark half of it), one of which already has 7,000 bytes queued: each status is what
    that publish would report queued at once. The fuller one congests at the third; at the
    eleventh it would be over the limit with nothing yet offered to the kernel, so its queue is
    written first (it reads, so all of it goes), and the rest are Backpressured (congested until
    the batch's own flush, which brings its one ``on_drain``); the other congests at the tenth.
    Both get every message."""
    big = "x" * 7000
    messages = [f"{i:02d}" + "y" * 998 for i in range(12)]

    def act(srv: brioche.Server[Any]) -> None:
        statuses = [paths.sockets["/full"].send(big)] + [srv.publish("t", m) for m in messages]
        recorder.add("statuses", statuses)

    def on_drain(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("drain", ws.data)

    paths = Paths(recorder, {"/full": ("t",), "/light": ("t",)}, act)
    config = paths.config().on_drain(on_drain).backpressure_limit(16384)
    srv = await serve(config, handler=upgrade_with_path)
    paths.srv = srv
    before = srv.stats()
    async with AsyncExitStack() as stack:
        full, light, go = [
            await stack.enter_async_context(connect(ws_url(srv, path))) for path in ("/full", "/light", "/go")
        ]
        await recorder.wait_for(lambda: len(recorder.of("open")) == 3)
        await go.send("go")
        assert [await recv(full) for _ in range(13)] == [big, *messages]
        assert [await recv(light) for _ in range(12)] == messages
        await recorder.wait_for(lambda: len(recorder.of("drain")) == 2)
        await assert_nothing_pending(full)
        await assert_nothing_pending(light)
    ((statuses,),) = recorder.of("statuses")
    after = srv.stats()
    # The eleventh and twelfth are Backpressured for the other one, congested since the tenth.
    assert statuses == [MessageSent(7000)] + [MessageSent(1000)] * 2 + [MessageBackpressured()] * 10
    assert sorted(recorder.of("drain")) == [("/full",), ("/light",)]
    assert after["deliveries"] - before["deliveries"] == 12 + 12
    assert after["sends_backpressured"] - before["sends_backpressured"] == 10 + 3
    assert after["sends_dropped"] - before["sends_dropped"] == 0


async def test_a_run_that_takes_a_reading_subscriber_past_the_limit_writes_its_queue_instead_of_closing_it(
    serve: ServeFn, recorder: Recorder
) -> None:
    """With ``close_on_backpressure_limit``, six 1,000-byte publishes in one handler to a
    subscriber that reads, over a limit of 4,096: queued before each frame 0, 1,004, 2,008 (the
    high-water mark is 2,048), 3,012, 4,016, then 5,020, over the limit but never offered to the
    kernel. The sixth has the queue written first, as uWS writes when its cork buffer
    overflows, and is queued (Backpressured: the socket is congested until the batch's flush):
    the subscriber is not closed and gets all six (it was closed with 1008 before)."""
    messages = [f"{i:02d}" + "z" * 998 for i in range(6)]

    def act(srv: brioche.Server[Any]) -> None:
        statuses = [srv.publish("t", m) for m in messages]
        recorder.add("after", statuses, paths.sockets["/sub"].ready_state)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws.data, code)

    paths = Paths(recorder, {"/sub": ("t",)}, act)
    config = (
        paths.config()
        .on_close(on_close)
        .backpressure_limit(4096)
        .close_on_backpressure_limit(True)
    )
    srv = await serve(config, handler=upgrade_with_path)
    paths.srv = srv
    async with AsyncExitStack() as stack:
        sub, go = [await stack.enter_async_context(connect(ws_url(srv, path))) for path in ("/sub", "/go")]
        await recorder.wait_for(lambda: len(recorder.of("open")) == 2)
        await go.send("go")
        assert [await recv(sub) for _ in range(6)] == messages
        await assert_nothing_pending(sub)
        assert recorder.of("close") == []
    assert recorder.of("after") == [
        ([MessageSent(1000)] * 3 + [MessageBackpressured()] * 3, brioche.ReadyState.OPEN)
    ]


async def test_a_socket_leaves_its_topics_when_its_close_begins(serve: ServeFn, recorder: Recorder) -> None:
    """The server closes a subscriber whose client never answers the close frame: from
    ``close()`` on, as uWS's ``end()`` frees the subscriber, it is no longer counted by
    ``subscriber_count`` nor subscribed, ``subscribe`` refuses it (False), and a publish to its
    topic reaches the other subscriber and is Sent. Before, it stayed subscribed while closing
    (up to the close timeout), and every publish to its topics reported Dropped."""

    def act(srv: brioche.Server[Any]) -> None:
        closing = paths.sockets["/ws"]
        before = srv.subscriber_count("room")
        closing.close(4000, "kicked")
        recorder.add(
            "after",
            before,
            closing.ready_state,
            srv.subscriber_count("room"),
            closing.is_subscribed("room"),
            closing.subscriptions,
            closing.subscribe("other"),
            closing.subscriptions,
            srv.publish("room", "still here"),
        )

    paths = Paths(recorder, {"/ws": ("room",), "/other": ("room",)}, act)
    srv = await serve(paths.config(), handler=upgrade_with_path)
    paths.srv = srv
    async with await RawWebSocket.connect(srv.port, "/ws") as mute, connect(ws_url(srv, "/other")) as other:
        async with connect(ws_url(srv, "/go")) as go:
            await recorder.wait_for(lambda: len(recorder.of("open")) == 3)
            await go.send("go")
            assert await recv(other) == "still here"
            close = await mute.recv_frame()
            assert (close.close_code, close.close_reason) == (4000, "kicked")
            await recorder.wait_for(lambda: bool(recorder.of("after")))
    assert recorder.of("after") == [
        (2, brioche.ReadyState.CLOSING, 1, False, [], False, [], MessageSent(10))
    ]


async def test_a_socket_leaves_its_topics_when_it_is_terminated(serve: ServeFn, recorder: Recorder) -> None:
    """``terminate()`` takes the socket out of its topics before it returns, as ``close()``
    does and Bun's ``terminate`` does: a publish right after it (announcing the kick) reaches
    the two others and is Sent, and ``subscriber_count`` no longer counts it. Before, the socket
    stayed subscribed until its task ended: the publish said Dropped though both others got
    it, and the count was still 3."""

    def act(srv: brioche.Server[Any]) -> None:
        kicked = paths.sockets["/kicked"]
        before = srv.subscriber_count("room")
        kicked.terminate()
        recorder.add(
            "after",
            before,
            kicked.ready_state,
            srv.subscriber_count("room"),
            kicked.is_subscribed("room"),
            kicked.subscriptions,
            kicked.subscribe("other"),
            srv.publish("room", "kicked"),
        )

    paths = Paths(recorder, {"/kicked": ("room",), "/a": ("room",), "/b": ("room",)}, act)
    srv = await serve(paths.config(), handler=upgrade_with_path)
    paths.srv = srv
    async with AsyncExitStack() as stack:
        kicked, a, b = [
            await stack.enter_async_context(connect(ws_url(srv, path))) for path in ("/kicked", "/a", "/b")
        ]
        await recorder.wait_for(lambda: len(recorder.of("open")) == 3)
        await kicked.send("go")
        assert [await recv(a), await recv(b)] == ["kicked", "kicked"]
        with pytest.raises(ConnectionClosed):
            await recv(kicked)
    assert recorder.of("after") == [(3, brioche.ReadyState.CLOSED, 2, False, [], False, MessageSent(6))]
    assert srv.stats()["sends_dropped"] == 0


async def test_a_socket_s_subscriptions_through_many_subscribes_and_unsubscribes(
    serve: ServeFn, recorder: Recorder
) -> None:
    """One socket joins 10,000 topics and leaves them one by one, twice: ``subscriptions`` lists
    each once, in the order joined, and nothing after. A socket's topics are a set, where an
    unsubscribe scanned a list (40,000 took 3.5 s of the loop to leave; the commit gives the
    measurement, which a test does not time)."""
    topics = [f"t{i}" for i in range(10_000)]

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        for _ in range(2):
            subscribed = [ws.subscribe(t) for t in topics]
            seen = ws.subscriptions
            left = [ws.unsubscribe(t) for t in topics]
            recorder.add("round", all(subscribed), seen == topics, all(left), ws.subscriptions)
        ws.subscribe("b")
        ws.subscribe("a")
        ws.subscribe("c")
        ws.unsubscribe("b")
        recorder.add("order", ws.subscriptions, ws.unsubscribe("b"), ws.is_subscribed("a"))
        ws.send("done")

    srv = await serve(websocket.init().on_open(on_open))
    async with connect(ws_url(srv)) as client:
        assert await recv(client) == "done"
    assert recorder.of("round") == [(True, True, True, [])] * 2
    # c, the last, took the place b left.
    assert recorder.of("order") == [(["c", "a"], False, True)]
    assert srv.subscriber_count("t0") == 0


async def test_subscribe_and_unsubscribe_answer_as_buns_do(serve: ServeFn, recorder: Recorder) -> None:
    """Bun's ``subscribe`` returns true while the socket is open, ``unsubscribe`` whether it
    was subscribed, and both false once it is closed (Bun's test "subscribe/unsubscribe return
    false on a closed socket"). They returned None."""
    kept: list[brioche.WebSocket[Any]] = []

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        kept.append(ws)
        recorder.add(
            "open",
            ws.subscribe("t"),
            ws.subscribe("t"),
            ws.is_subscribed("t"),
            websocket.unsubscribe(ws, "t"),
            ws.unsubscribe("t"),
            ws.unsubscribe("never"),
            websocket.subscribe(ws, "u"),
        )

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws.subscribe("t"), ws.unsubscribe("u"), ws.subscriptions)

    srv = await serve(websocket.init().on_open(on_open).on_close(on_close))
    async with connect(ws_url(srv)):
        await recorder.wait_for(lambda: bool(recorder.of("open")))
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("open") == [(True, True, True, True, False, False, True)]
    assert recorder.of("close") == [(False, False, [])]
    assert kept[0].subscribe("t") is False
    assert srv.subscriber_count("t") == 0


async def test_publishes_before_a_terminate_count_as_delivered(serve: ServeFn, recorder: Recorder) -> None:
    """The publishes made before ``terminate`` are queued to the socket, which writes them
    before it ends (as Bun's ``terminate`` flushes first), and ``stats()`` counts them as
    delivered, run or not."""

    def act(srv: brioche.Server[Any]) -> None:
        statuses = [srv.publish("t", "m1"), srv.publish("t", "m2")]
        paths.sockets["/gone"].terminate()
        stats = srv.stats()
        recorder.add("after", statuses, stats["deliveries"], stats["sends_dropped"])

    paths = Paths(recorder, {"/gone": ("t",), "/stays": ("t",)}, act)
    srv = await serve(paths.config(), handler=upgrade_with_path)
    paths.srv = srv
    async with AsyncExitStack() as stack:
        gone, stays, go = [
            await stack.enter_async_context(connect(ws_url(srv, path))) for path in ("/gone", "/stays", "/go")
        ]
        await recorder.wait_for(lambda: len(recorder.of("open")) == 3)
        await go.send("go")
        assert [await recv(stays) for _ in range(2)] == ["m1", "m2"]
        await assert_nothing_pending(stays)
        assert [await recv(gone) for _ in range(2)] == ["m1", "m2"]
        with pytest.raises(ConnectionClosed):
            await recv(gone)
    assert recorder.of("after") == [([MessageSent(2)] * 2, 4, 0)]


async def test_a_send_from_another_thread_comes_after_the_publishes_before_it(
    serve: ServeFn, recorder: Recorder
) -> None:
    """A handler publishes twice to a topic, then has another thread send to a subscriber and
    waits for it: the subscriber gets both publishes, then the send. The second publish may be
    part of a run not yet queued when the thread sends; the thread's send queues it first."""

    def act(srv: brioche.Server[Any]) -> None:
        statuses = [srv.publish("t", "a"), srv.publish("t", "b")]
        helper = threading.Thread(target=lambda: statuses.append(paths.sockets["/sub"].send("c")))
        helper.start()
        # Bounded: a send that deadlocked with this thread would otherwise hang the loop.
        helper.join(10)
        assert not helper.is_alive(), "the send from another thread blocked"
        recorder.add("statuses", statuses)

    paths = Paths(recorder, {"/sub": ("t",)}, act)
    srv = await serve(paths.config(), handler=upgrade_with_path)
    paths.srv = srv
    async with AsyncExitStack() as stack:
        sub, go = [await stack.enter_async_context(connect(ws_url(srv, path))) for path in ("/sub", "/go")]
        await recorder.wait_for(lambda: len(recorder.of("open")) == 2)
        await go.send("go")
        assert [await recv(sub) for _ in range(3)] == ["a", "b", "c"]
    assert recorder.of("statuses") == [([MessageSent(1)] * 3,)]


async def test_large_messages_sent_from_a_thread_are_released_with_no_event_after(
    serve: ServeFn, recorder: Recorder
) -> None:
    """A large ``str`` is sent from the object itself, not a copy, and each frame holds a
    reference until it is written; the references are given back on the loop thread (they need
    the GIL). Sent from another thread, one at a time to a client that reads each (so the
    connection never counts as congested, whose end would be an event), the frames are written
    by the engine's own threads, and their references waited for the server's next event: on a
    server with none to come, forever. Now the loop is woken to give them back."""
    sockets: dict[str, brioche.WebSocket[Any]] = {}

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        sockets["ws"] = ws
        recorder.add("open")

    srv = await serve(websocket.init().on_open(on_open))
    big = "x" * 200_000  # over the engine's inline size, under its 256 KiB high-water mark
    async with connect(ws_url(srv), ping_interval=None, max_size=None) as client:
        await recorder.wait_for(lambda: bool(recorder.of("open")))
        before = sys.getrefcount(big)
        for _ in range(20):
            assert await asyncio.to_thread(sockets["ws"].send, big) == MessageSent(len(big))
            assert await asyncio.wait_for(client.recv(), 10) == big
        # Written and read: only their release is left, which nothing the client does starts.
        for _ in range(500):  # bounded: 5 s
            if sys.getrefcount(big) == before:
                break
            await asyncio.sleep(0.01)
        assert sys.getrefcount(big) == before, f"{sys.getrefcount(big) - before} references still held"
        assert srv.stats()["messages_in"] == 0


async def test_send_and_publish_from_a_thread_outside_any_handler(serve: ServeFn, recorder: Recorder) -> None:
    """What the README promises: ``ws.send``, ``ws.publish`` and ``srv.publish`` may be called
    from any thread, while no handler runs; each returns its status at once and is delivered."""
    sockets: dict[str, brioche.WebSocket[Any]] = {}

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        sockets[ws.data] = ws
        ws.subscribe("t")
        recorder.add("open")

    srv = await serve(websocket.init().on_open(on_open), handler=upgrade_with_path)
    async with connect(ws_url(srv, "/a")) as a, connect(ws_url(srv, "/b")) as b:
        await recorder.wait_for(lambda: len(recorder.of("open")) == 2)
        calls = [
            lambda: sockets["/a"].send("send"),
            lambda: sockets["/a"].publish("t", "ws.publish"),  # not to itself: publish_to_self is off
            lambda: srv.publish("t", "srv.publish"),
        ]
        statuses = [await asyncio.to_thread(call) for call in calls]
        assert statuses == [MessageSent(4), MessageSent(10), MessageSent(11)]
        assert [await recv(a) for _ in range(2)] == ["send", "srv.publish"]
        assert [await recv(b) for _ in range(2)] == ["ws.publish", "srv.publish"]
