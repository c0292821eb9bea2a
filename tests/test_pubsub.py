"""Topics: subscribe/unsubscribe, who a publish reaches, what it reports, and ordering."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

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


async def assert_nothing_pending(client: ClientConnection) -> None:
    """A round trip: the echo must be the very next message."""
    await client.send("echo sync")
    assert await recv(client) == "sync"


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
