"""Backpressure: send statuses, buffered_amount, on_drain, the limit, and nothing lost or reordered.

The stalled client is a raw socket with a small SO_RCVBUF whose transport stops reading, so the
kernel buffers fill and the server's writer gets EAGAIN.
"""

from __future__ import annotations

import asyncio
import struct
from itertools import groupby
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import brioche
from brioche import MessageBackpressured, MessageDropped, MessageSent, websocket
from conftest import Recorder, ServeFn, ws_url
from rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    RawWebSocket,
    SendRecord,
    fill,
    numbered,
    parse_frames,
    poll_until,
)

pytestmark = pytest.mark.both_loops

SIZE = 64 * 1024
LIMIT = 1024 * 1024
MAX_MESSAGES = 300  # 18.75 MiB: more than the kernel buffers plus the limit can hold


def kinds(records: list[SendRecord]) -> list[type]:
    """The run-length pattern of the statuses, e.g. [MessageSent, MessageBackpressured, ...]."""
    return [k for k, _ in groupby(type(r.status) for r in records)]


def seq(payload: bytes) -> int:
    return int(struct.unpack(">I", payload[:4])[0])


async def test_stalled_reader_gets_sent_then_backpressured_then_dropped_and_loses_nothing(
    serve: ServeFn, recorder: Recorder
) -> None:
    records: list[SendRecord] = []
    phase = ["filling"]
    after: dict[str, Any] = {}
    holder: list[brioche.Server[Any]] = []

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "go":
            ws.subscribe("late")
            await fill(ws, (numbered(i, SIZE) for i in range(MAX_MESSAGES)), records=records)
            phase[0] = "stalled"
            # Over the limit now: every other kind of send to this socket is dropped too.
            after["buffered"] = ws.buffered_amount
            after["send"] = ws.send("late")
            after["send_bytes"] = ws.send_bytes(b"late")
            after["ping"] = ws.ping(b"late")
            after["pong"] = ws.pong(b"late")
            after["server_publish"] = holder[0].publish("late", "late")
            recorder.add("filled")
        elif text == "sync":
            before = ws.buffered_amount
            recorder.add("sync", before, ws.send("synced"))

    def on_drain(ws: brioche.WebSocket[Any]) -> None:
        backpressured = sum(isinstance(r.status, MessageBackpressured) for r in records)
        recorder.add("drain", phase[0], backpressured)

    config = websocket.init().on_text(on_text).on_drain(on_drain).backpressure_limit(LIMIT)
    srv = await serve(config)
    holder.append(srv)
    async with await RawWebSocket.connect(srv.port, rcvbuf=4096) as client:
        client.pause_reading()
        await client.send_text("go")
        await recorder.wait_for(lambda: bool(recorder.of("filled")))

        assert kinds(records) == [MessageSent, MessageBackpressured, MessageDropped], [
            (type(r.status).__name__, r.buffered_before) for r in records
        ]
        sent = [r for r in records if isinstance(r.status, MessageSent)]
        assert all(r.status == MessageSent(SIZE) for r in sent)
        dropped = [r for r in records if isinstance(r.status, MessageDropped)]
        assert all(r.buffered_before > LIMIT for r in dropped), "dropped only when over the limit"
        accepted = [r.index for r in records if not isinstance(r.status, MessageDropped)]
        assert accepted == list(range(len(accepted))), "accepted ones are a prefix"
        assert after["buffered"] > LIMIT
        assert after["send"] == MessageDropped()
        assert after["send_bytes"] == MessageDropped()
        assert after["ping"] == MessageDropped()
        assert after["pong"] == MessageDropped()
        assert after["server_publish"] == MessageDropped()
        # Stalled since the first Backpressured: no drain may have fired in between.
        assert [d for d in recorder.of("drain") if d[1] > 0] == []

        phase[0] = "resumed"
        client.resume_reading()
        frames = []
        for _ in accepted:
            frames.append(await client.recv_frame(timeout=10))
        assert [f.opcode for f in frames] == [OP_BINARY] * len(accepted)
        assert [seq(f.payload) for f in frames] == accepted, "every accepted message, in order"
        corrupt = [i for i, f in zip(accepted, frames) if f.payload != numbered(i, SIZE)]
        assert corrupt == [], "payloads are byte-exact"

        # Everything written: on_drain, and after it nothing is buffered and sends are Sent again.
        await recorder.wait_for(lambda: any(d[0] == "resumed" for d in recorder.of("drain")))
        # The next frame is the reply to "sync": nothing dropped was delivered, nothing repeated.
        await client.send_text("sync")
        reply = await client.recv_frame()
        assert (reply.opcode, reply.payload) == (OP_TEXT, b"synced")
        assert recorder.of("sync") == [(0, MessageSent(6))]
        backpressured = len([r for r in records if isinstance(r.status, MessageBackpressured)])
        resumed_drains = [d for d in recorder.of("drain") if d[0] != "filling"]
        assert resumed_drains == [("resumed", backpressured)], "on_drain fired exactly once"


async def test_backpressure_limit_close_terminates_without_close_frame_and_reports_1008_once(
    serve: ServeFn, recorder: Recorder
) -> None:
    limit = 256 * 1024
    records: list[SendRecord] = []

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        await fill(
            ws,
            (numbered(i, SIZE) for i in range(MAX_MESSAGES)),
            records=records,
            stop_when=lambda status: isinstance(status, MessageDropped),
        )
        recorder.add("filled", ws.ready_state, ws.send("after"), ws.ping())

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    config = (
        websocket.init()
        .on_text(on_text)
        .on_close(on_close)
        .backpressure_limit(limit)
        .close_on_backpressure_limit(True)
    )
    srv = await serve(config)
    async with await RawWebSocket.connect(srv.port, rcvbuf=4096) as client:
        client.pause_reading()
        await client.send_text("go")
        await recorder.wait_for(lambda: bool(recorder.of("filled")) and bool(recorder.of("close")))

        assert isinstance(records[-1].status, MessageDropped)
        assert records[-1].buffered_before > limit
        assert all(not isinstance(r.status, MessageDropped) for r in records[:-1])
        ((state, send_after, ping_after),) = recorder.of("filled")
        assert state in (2, 3), "the socket is no longer open"
        assert send_after == MessageDropped()
        assert ping_after == MessageDropped()

        client.resume_reading()
        data, how = await client.read_until_end(timeout=10)
        frames, _partial_tail = parse_frames(data)
        assert how in ("eof", "reset")
        assert OP_CLOSE not in [f.opcode for f in frames], "terminated: no close frame"
        assert [f.opcode for f in frames] == [OP_BINARY] * len(frames)
        assert [f.payload for f in frames] == [numbered(i, SIZE) for i in range(len(frames))]

    await asyncio.wait_for(srv.stop(), 10)
    assert recorder.of("close") == [(1008, "backpressure limit exceeded")]


async def test_backpressure_limit_zero_never_drops(serve: ServeFn, recorder: Recorder) -> None:
    count = 128  # 8 MiB queued while the client does not read

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        statuses = []
        most = 0
        for i in range(count):
            statuses.append(ws.send_bytes(numbered(i, SIZE)))
            most = max(most, ws.buffered_amount)
        recorder.add("filled", statuses, most)

    srv = await serve(websocket.init().on_text(on_text).backpressure_limit(0))
    async with await RawWebSocket.connect(srv.port, rcvbuf=4096) as client:
        client.pause_reading()
        await client.send_text("go")
        await recorder.wait_for(lambda: bool(recorder.of("filled")))
        ((statuses, most),) = recorder.of("filled")
        assert MessageDropped() not in statuses
        assert most > 4 * 1024 * 1024, "this much was really queued at once"

        client.resume_reading()
        for i in range(count):
            frame = await client.recv_frame(timeout=10)
            assert (frame.opcode, seq(frame.payload)) == (OP_BINARY, i)
            assert frame.payload == numbered(i, SIZE)


async def test_an_abrupt_end_frees_the_queue_and_buffered_amount_reads_zero(
    serve: ServeFn, recorder: Recorder
) -> None:
    """What is queued for a client that does not read is dropped when the connection ends
    abruptly: it was held, and ``buffered_amount`` kept counting it, until the application let go
    of its WebSocket (Bun's ``bufferedAmount`` reads 0 once closed)."""

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        await fill(ws, (numbered(i, SIZE) for i in range(MAX_MESSAGES)),
                   stop_when=lambda status: isinstance(status, MessageDropped))
        before = ws.buffered_amount
        ws.terminate()
        recorder.add("terminated", before > LIMIT, ws.buffered_amount)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("closed", code, ws.buffered_amount)

    config = websocket.init().on_text(on_text).on_close(on_close).backpressure_limit(LIMIT)
    srv = await serve(config)
    async with await RawWebSocket.connect(srv.port) as client:  # never reads
        await client.send_text("go")
        await recorder.wait_for(lambda: bool(recorder.of("closed")), 10)
    assert recorder.of("terminated") == [(True, 0)]
    assert recorder.of("closed") == [(1006, 0)]


async def test_buffered_amount_counts_wire_bytes_including_headers(serve: ServeFn, recorder: Recorder) -> None:
    def measure(ws: brioche.WebSocket[Any]) -> list[int]:
        # Corked: the writer takes nothing until the callback returns, so the count is exact.
        amounts = [ws.buffered_amount]
        ws.send("abc")  # 2 + 3
        amounts.append(ws.buffered_amount)
        ws.send_bytes(bytes(200))  # 4 + 200
        amounts.append(ws.buffered_amount)
        ws.send_bytes(bytes(70_000))  # 10 + 70000
        amounts.append(ws.buffered_amount)
        ws.ping(b"xy")  # 2 + 2
        amounts.append(ws.buffered_amount)
        return amounts

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "measure":
            recorder.add("amounts", ws.cork(measure))
        else:
            # The client has every byte, but the writer thread may not have done its accounting
            # yet, so this waits (bounded) for the count to come down.
            recorder.add("later", await poll_until(lambda: ws.buffered_amount == 0, 5), ws.buffered_amount)

    srv = await serve(websocket.init().on_text(on_text))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_text("measure")
        got = [await client.recv_frame() for _ in range(4)]
        assert [(f.opcode, len(f.payload)) for f in got] == [
            (OP_TEXT, 3), (OP_BINARY, 200), (OP_BINARY, 70_000), (OP_PING, 2)
        ]
        await client.send_text("later")
        await recorder.wait_for(lambda: bool(recorder.of("later")))
    assert recorder.of("amounts") == [([0, 5, 209, 70_219, 70_223],)]
    assert recorder.of("later") == [(True, 0)], "everything written: nothing buffered"


async def test_sends_to_a_socket_that_is_not_open_are_dropped(serve: ServeFn, recorder: Recorder) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.subscribe("t")
        ws.close(4000, "bye")
        recorder.add("closing", ws.ready_state, ws.send("x"), ws.send_bytes(b"x"), ws.ping(), ws.pong())

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add(
            "closed", ws.ready_state, code,
            ws.send("x"), ws.send_bytes(b"x"), ws.ping(), ws.pong(),
            websocket.send(ws, "x"), websocket.send_bytes(ws, b"x"),
        )

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv)) as client:
        await client.send("close me")
        try:
            extra = await asyncio.wait_for(client.recv(), 5)
        except ConnectionClosed:
            extra = None
        assert extra is None, "nothing sent after close() reaches the client"
        assert client.close_code == 4000
        assert client.close_reason == "bye"
    await recorder.wait_for(lambda: bool(recorder.of("closed")))
    dropped = MessageDropped()
    assert recorder.of("closing") == [(2, dropped, dropped, dropped, dropped)]
    assert recorder.of("closed") == [(3, 4000, dropped, dropped, dropped, dropped, dropped, dropped)]
    assert srv.publish("t", "x") == dropped, "a closed socket receives no publish"


def frame_len(payload: int) -> int:
    """Bytes a server frame of ``payload`` bytes takes on the wire (and in ``buffered_amount``)."""
    return payload + (2 if payload < 126 else 4 if payload < 65536 else 10)


async def stall(ws: brioche.WebSocket[Any]) -> None:
    """Send to a client that is not reading until the kernel refuses a write: from then on the
    server's queue only grows (its task waits for a writability that does not come), so what
    ``buffered_amount`` reads is exactly what later sends add."""
    records = await fill(
        ws,
        (numbered(i, SIZE) for i in range(MAX_MESSAGES)),
        stop_when=lambda status: isinstance(status, MessageBackpressured),
    )
    assert isinstance(records[-1].status, MessageBackpressured), "the kernel took everything"


async def test_limit_applies_to_what_was_buffered_before_the_message(serve: ServeFn, recorder: Recorder) -> None:
    """A send is dropped when what is queued before it is over the limit, not when it would take
    the queue over: a queue of exactly the limit takes one more message. The kernel refuses
    first (``stall``), so nothing is written while the statuses are taken."""

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        await stall(ws)
        queued = ws.buffered_amount
        assert 0 < queued < LIMIT - 100_000, queued
        pad = LIMIT - queued - 10
        assert frame_len(pad) == LIMIT - queued
        recorder.add("statuses", [
            queued,
            ws.send_bytes(bytes(pad)), ws.buffered_amount,  # exactly the limit
            # At the limit is not over it: accepted (backpressured, as the kernel refuses).
            ws.send("x"), ws.buffered_amount,
            ws.send("y"), ws.send_bytes(b"y"), ws.ping(), ws.pong(), ws.buffered_amount,  # over it
        ])

    srv = await serve(websocket.init().on_text(on_text).backpressure_limit(LIMIT))
    async with await RawWebSocket.connect(srv.port, rcvbuf=4096) as client:
        client.pause_reading()
        await client.send_text("go")
        await recorder.wait_for(lambda: bool(recorder.of("statuses")))
        client.resume_reading()
        frames: list[Frame] = []
        while not frames or frames[-1].payload != b"x":
            frames.append(await client.recv_frame(timeout=10))
            assert len(frames) <= MAX_MESSAGES + 2
        queued = recorder.of("statuses")[0][0][0]
        assert [f.payload for f in frames] == [
            *(numbered(i, SIZE) for i in range(len(frames) - 2)), bytes(LIMIT - queued - 10), b"x"
        ]
        assert [f.opcode for f in frames[-2:]] == [OP_BINARY, OP_TEXT]
        # A close reply is not subject to the limit: it must be the very next frame.
        await client.send_close(1000)
        close = await client.expect_close_then_eof()
        assert close.close_code == 1000, "nothing dropped was delivered"
    ((statuses,),) = recorder.of("statuses")
    dropped, backpressured = MessageDropped(), MessageBackpressured()
    assert statuses[1:] == [
        backpressured, LIMIT, backpressured, LIMIT + 3, dropped, dropped, dropped, dropped, LIMIT + 3
    ]


async def test_close_on_backpressure_limit_client_sees_1006(serve: ServeFn, recorder: Recorder) -> None:
    """With ``close_on_backpressure_limit``, the send that finds the queue over the limit ends
    the connection without a close frame: a ``websockets`` client (which stops reading once
    ``max_queue`` messages wait) sees 1006, and the handler 1008."""

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        records = await fill(
            ws,
            (numbered(i, SIZE) for i in range(MAX_MESSAGES)),
            stop_when=lambda status: isinstance(status, MessageDropped),
        )
        recorder.add("filled", records[-1].status, ws.ready_state, ws.send("after"))

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    config = (
        websocket.init()
        .on_text(on_text)
        .on_close(on_close)
        .backpressure_limit(LIMIT)
        .close_on_backpressure_limit(True)
    )
    srv = await serve(config)
    async with connect(ws_url(srv), ping_interval=None, max_size=None, max_queue=1) as client:
        await client.send("go")
        await recorder.wait_for(lambda: bool(recorder.of("close")))
        received = 0
        with pytest.raises(ConnectionClosed):
            while received <= MAX_MESSAGES:
                assert await asyncio.wait_for(client.recv(), 10) == numbered(received, SIZE)
                received += 1
        assert client.close_code == 1006, "dropped without a close frame"
    await asyncio.wait_for(srv.stop(), 10)
    ((last, state, after),) = recorder.of("filled")
    assert (last, after) == (MessageDropped(), MessageDropped())
    assert state in (2, 3), "no longer open (closing, or already closed by the reader)"
    assert recorder.of("close") == [(1008, "backpressure limit exceeded")]


async def test_default_backpressure_limit_is_16_mib(serve: ServeFn, recorder: Recorder) -> None:
    limit = 16 * 1024 * 1024
    records: list[SendRecord] = []

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        await fill(ws, (numbered(i, SIZE) for i in range(400)), records=records,
                   stop_when=lambda status: isinstance(status, MessageDropped))
        recorder.add("filled")

    srv = await serve(websocket.init().on_text(on_text))
    async with await RawWebSocket.connect(srv.port, rcvbuf=4096) as client:
        client.pause_reading()
        await client.send_text("go")
        await recorder.wait_for(lambda: bool(recorder.of("filled")))
    assert isinstance(records[-1].status, MessageDropped), "dropped within 25 MiB"
    assert records[-2].buffered_before <= limit < records[-1].buffered_before


async def test_every_kind_of_send_to_a_congested_socket_reports_backpressured(
    serve: ServeFn, recorder: Recorder
) -> None:
    records: list[SendRecord] = []
    holder: list[brioche.Server[Any]] = []

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.subscribe("t")
        await fill(ws, (numbered(i, SIZE) for i in range(MAX_MESSAGES)), records=records,
                   stop_when=lambda status: isinstance(status, MessageBackpressured))
        recorder.add("statuses", [
            ws.send("text"), ws.send_bytes(b"bytes"), ws.ping(b"ping"), ws.pong(b"pong"),
            holder[0].publish("t", "published"),
        ])

    srv = await serve(websocket.init().on_text(on_text).backpressure_limit(LIMIT))
    holder.append(srv)
    async with await RawWebSocket.connect(srv.port, rcvbuf=4096) as client:
        client.pause_reading()
        await client.send_text("go")
        await recorder.wait_for(lambda: bool(recorder.of("statuses")))
        assert isinstance(records[-1].status, MessageBackpressured)
        assert recorder.of("statuses") == [([MessageBackpressured()] * 5,)]

        client.resume_reading()
        for i in range(len(records)):
            frame = await client.recv_frame(timeout=10)
            assert (frame.opcode, frame.payload) == (OP_BINARY, numbered(i, SIZE))
        rest = [await client.recv_frame() for _ in range(5)]
        assert [(f.opcode, f.payload) for f in rest] == [
            (OP_TEXT, b"text"), (OP_BINARY, b"bytes"), (OP_PING, b"ping"), (OP_PONG, b"pong"),
            (OP_TEXT, b"published"),
        ]


async def test_on_drain_fires_once_per_congestion_episode(serve: ServeFn, recorder: Recorder) -> None:
    records: list[SendRecord] = []
    phase = ["filling"]

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "fill":
            records.clear()
            await fill(ws, (numbered(i, SIZE) for i in range(MAX_MESSAGES)), records=records,
                       stop_when=lambda status: isinstance(status, MessageBackpressured))
            recorder.add("filled", len(records))
        else:
            ws.send("synced")

    def on_drain(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("drain", phase[0])

    srv = await serve(websocket.init().on_text(on_text).on_drain(on_drain).backpressure_limit(LIMIT))
    async with await RawWebSocket.connect(srv.port, rcvbuf=4096) as client:
        for episode in (1, 2):
            phase[0] = "filling"
            client.pause_reading()
            await client.send_text("fill")
            await recorder.wait_for(lambda: len(recorder.of("filled")) == episode)
            assert isinstance(records[-1].status, MessageBackpressured)
            phase[0] = "resumed"
            client.resume_reading()
            for i in range(recorder.of("filled")[-1][0]):
                frame = await client.recv_frame(timeout=10)
                assert frame.payload == numbered(i, SIZE)
            await recorder.wait_for(lambda: recorder.of("drain").count(("resumed",)) == episode)
        await client.send_text("sync")
        assert (await client.recv_frame()).payload == b"synced"
    assert recorder.of("drain").count(("resumed",)) == 2


async def test_publish_to_a_recipient_over_the_limit_drops_it_and_terminates_it_when_configured(
    serve: ServeFn, recorder: Recorder
) -> None:
    """A publish to a subscriber over its limit (a client that stopped reading, its queue past
    the limit with the kernel refusing more) drops the message for it (Dropped) and ends it
    with 1008; the next publish, in the same handler, reaches the other subscriber
    and is Sent, as in Bun, where the socket leaves its topics as it closes. It was Dropped:
    the ended socket stayed among the topic's subscribers until its task ended, each publish
    counting it as a dropped delivery."""
    holder: list[brioche.Server[Any]] = []

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.subscribe("t")
        recorder.add("open", ws)

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        await stall(ws)
        if ws.buffered_amount <= 1000:
            ws.send_bytes(bytes(1000))  # the kernel refuses: queued, now over the limit
        recorder.add("published", holder[0].publish("t", "news"), holder[0].publish("t", "news 2"))

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws, code, reason)

    config = (
        websocket.init()
        .on_open(on_open)
        .on_text(on_text)
        .on_close(on_close)
        .backpressure_limit(1000)
        .close_on_backpressure_limit(True)
    )
    srv = await serve(config)
    holder.append(srv)
    async with connect(ws_url(srv), ping_interval=None) as healthy:
        await recorder.wait_for(lambda: len(recorder.of("open")) == 1)
        async with await RawWebSocket.connect(srv.port, rcvbuf=4096) as overfull:
            overfull.pause_reading()
            await recorder.wait_for(lambda: len(recorder.of("open")) == 2)
            await overfull.send_text("go")
            await recorder.wait_for(lambda: bool(recorder.of("close")))
            overfull.resume_reading()
            data, how = await overfull.read_until_end(timeout=10)
            assert how in ("eof", "reset")
            assert OP_CLOSE not in [f.opcode for f in parse_frames(data)[0]], "ended without a close frame"
        assert [await asyncio.wait_for(healthy.recv(), 5) for _ in range(2)] == ["news", "news 2"], (
            "the other subscriber got both"
        )
        await recorder.wait_for(lambda: bool(recorder.of("close")))
        assert recorder.of("published") == [(MessageDropped(), MessageSent(6))]
        overfull_ws = recorder.of("open")[1][0]
        assert recorder.of("close") == [(overfull_ws, 1008, "backpressure limit exceeded")]
        assert srv.subscriber_count("t") == 1
        assert srv.stats()["sends_dropped"] == 1


@pytest.mark.parametrize("corked", [False, True], ids=["batch", "cork"])
@pytest.mark.parametrize("close_on_limit", [False, True])
async def test_a_burst_over_the_limit_to_a_client_that_reads_loses_nothing(
    serve: ServeFn, recorder: Recorder, close_on_limit: bool, corked: bool
) -> None:
    """One handler sends 24 messages of 64 KiB (1.5 MiB) over a limit of 1 MiB to a client that
    reads. Nothing is written until the handler batch ends, so the queue passes the limit with
    no byte yet offered to the kernel: it is written first, as uWS writes when its cork buffer
    overflows, and only what the kernel refuses counts (the client shares this loop, so the
    kernel's buffers hold the burst until the handler returns: half a MiB over the limit fits
    them). No send is dropped, the client gets all 24, and with ``close_on_backpressure_limit``
    it is not closed. Before, the client got 16 (and with the option, none: it was closed with
    1008). Inside ``cork()`` the same, as Bun's cork writes when its buffer overflows: a cork
    held all it was given, and dropped past the limit as a batch once did."""

    def burst(ws: brioche.WebSocket[Any]) -> list[object]:
        return [ws.send_bytes(numbered(i, SIZE)) for i in range(24)]

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "sync":
            ws.send("synced")
            return
        recorder.add("statuses", ws.cork(burst) if corked else burst(ws))

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    config = (
        websocket.init()
        .on_text(on_text)
        .on_close(on_close)
        .backpressure_limit(LIMIT)
        .close_on_backpressure_limit(close_on_limit)
    )
    srv = await serve(config)
    async with connect(ws_url(srv), max_size=None) as client:
        await client.send("go")
        received = [await asyncio.wait_for(client.recv(), 10) for _ in range(24)]
        assert received == [numbered(i, SIZE) for i in range(24)]
        await client.send("sync")
        assert await asyncio.wait_for(client.recv(), 10) == "synced"
    ((statuses,),) = recorder.of("statuses")
    assert not any(isinstance(s, MessageDropped) for s in statuses), statuses
    assert statuses[0] == MessageSent(SIZE)
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1000, "")]


async def test_with_a_limit_of_one_byte_the_first_send_is_sent(serve: ServeFn, recorder: Recorder) -> None:
    """The high-water mark is half the limit, at least one byte: with ``backpressure_limit(1)``
    a send onto an empty queue is Sent, as Bun's first send is (Bun's test "backpressureLimit"),
    and the next, over the limit with its queue not yet written, has it written first and is
    queued. Before, the first was Backpressured (a mark of 0) and the second Dropped."""

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("statuses", ws.send("a"), ws.send("b"))

    srv = await serve(websocket.init().on_text(on_text).backpressure_limit(1))
    async with connect(ws_url(srv)) as client:
        await client.send("go")
        assert [await asyncio.wait_for(client.recv(), 5) for _ in range(2)] == ["a", "b"]
    assert recorder.of("statuses") == [(MessageSent(1), MessageSent(1))]


@pytest.mark.parametrize("limit", [1, 1000])
async def test_a_limit_below_the_message_size_reports_backpressured_before_dropped(
    serve: ServeFn, recorder: Recorder, limit: int
) -> None:
    """With a limit below a message's size, each send onto an empty queue takes the queue past
    the limit: it is written at once (as uWS writes every send), so its status says whether the
    kernel took it. One handler's burst to a reader that has stopped goes Sent, Backpressured
    (the send the kernel refused part of), Dropped, as Bun's does; everything accepted arrives,
    in order, and ``on_drain`` follows. Before, the statuses went from Sent straight to Dropped:
    each send found the queue emptied by the next one's write, and a sender that slows down at
    Backpressured never saw it."""

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "sync":
            ws.send("synced")
            return
        statuses: list[object] = []
        for i in range(MAX_MESSAGES):
            statuses.append(ws.send_bytes(numbered(i, SIZE)))
            if isinstance(statuses[-1], MessageDropped):
                break
        recorder.add("statuses", statuses)

    def on_drain(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("drain")

    srv = await serve(websocket.init().on_text(on_text).on_drain(on_drain).backpressure_limit(limit))
    async with await RawWebSocket.connect(srv.port, rcvbuf=4096) as client:
        client.pause_reading()
        await client.send_text("go")
        await recorder.wait_for(lambda: bool(recorder.of("statuses")))
        ((statuses,),) = recorder.of("statuses")
        assert [k for k, _ in groupby(type(s) for s in statuses)] == [
            MessageSent, MessageBackpressured, MessageDropped
        ], statuses
        assert all(s == MessageSent(SIZE) for s in statuses if isinstance(s, MessageSent))
        accepted = len(statuses) - 1
        assert recorder.of("drain") == []

        client.resume_reading()
        frames = [await client.recv_frame(timeout=10) for _ in range(accepted)]
        assert [f.opcode for f in frames] == [OP_BINARY] * accepted
        assert [f.payload for f in frames] == [numbered(i, SIZE) for i in range(accepted)]
        await recorder.wait_for(lambda: bool(recorder.of("drain")))
        await client.send_text("sync")
        reply = await client.recv_frame(timeout=10)
        assert (reply.opcode, reply.payload) == (OP_TEXT, b"synced")
    assert recorder.of("drain") == [()]


async def test_on_drain_does_not_fire_once_the_socket_is_closing(serve: ServeFn, recorder: Recorder) -> None:
    """A congested socket is closed before its queue drains: when it has written everything,
    nothing more can be sent to it, and ``on_drain`` does not fire (as Bun's ``drain`` does not
    for a closed socket). Before, it fired with ``ready_state`` CLOSING."""

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        await fill(ws, (numbered(i, SIZE) for i in range(MAX_MESSAGES)),
                   stop_when=lambda status: isinstance(status, MessageBackpressured))
        ws.close(4000, "enough")
        recorder.add("closed")

    def on_drain(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("drain", ws.ready_state)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    srv = await serve(websocket.init().on_text(on_text).on_drain(on_drain).on_close(on_close).backpressure_limit(LIMIT))
    async with await RawWebSocket.connect(srv.port, rcvbuf=4096) as client:
        client.pause_reading()
        await client.send_text("go")
        await recorder.wait_for(lambda: bool(recorder.of("closed")))
        client.resume_reading()
        frames = []
        while True:
            frame = await client.recv_frame(timeout=10)
            frames.append(frame)
            if frame.opcode == OP_CLOSE:
                break
            assert len(frames) <= MAX_MESSAGES
        assert frames[-1].close_code == 4000
        await client.send_close(4000)
        await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(4000,)]
    assert recorder.of("drain") == []
