"""permessage-deflate (RFC 7692): negotiation, compressed traffic both ways, limits on the
inflated size, and publishes to subscribers that negotiated differently.

The negotiation cases use the ``websockets`` client, which offers and runs every parameter; the
cases that need frames it would never send (a bomb, RSV bits where they do not belong, invalid
deflate data) use the raw client.
"""

from __future__ import annotations

import asyncio
import os
import zlib
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

import brioche
from brioche import MessageSent, websocket
from brioche.websocket import DeflateOptions

from conftest import Recorder, ServeFn, reset_peak_rss, status_kib, ws_url
from rawws import OP_BINARY, OP_CONTINUATION, OP_TEXT, RawWebSocket, encode_frame, poll_until, unread_by_server

MIB = 1 << 20
TIMEOUT = 10
TAIL = b"\x00\x00\xff\xff"
JSON = '{"type":"chat","room":"lobby","user":"alice","text":"hello, hello, hello"}'


def deflate(data: bytes, wbits: int = 15) -> bytes:
    """One message as a client with no context takeover sends it: sync flush, tail stripped."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -wbits)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TAIL)
    return out[:-4]


def stored(data: bytes) -> bytes:
    """``data`` in stored blocks (level 0), as a message's payload: sync-flushed, tail stripped."""
    compressor = zlib.compressobj(0, zlib.DEFLATED, -15)
    payload = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert payload.endswith(TAIL)
    return payload[: -len(TAIL)]


def fixed(data: bytes) -> bytes:
    """``data`` in a block of fixed Huffman codes, as a message's payload."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15, 8, zlib.Z_FIXED)
    payload = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert payload.endswith(TAIL)
    return payload[: -len(TAIL)]


VARIED = " ".join(str(i * 7919 % 1000) for i in range(3000)).encode()  # a dynamic block


def cut_in_a_later_header() -> bytes:
    """A message of two blocks, cut 12 bytes into the second's (dynamic) header: the first
    inflates whole, the tail (and an empty stored block after it) are read as more of that
    header, and nothing fails (zlib's own inflater agrees, below)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    first = compressor.compress(b"first part " * 100) + compressor.flush(zlib.Z_SYNC_FLUSH)
    second = compressor.compress(VARIED) + compressor.flush(zlib.Z_SYNC_FLUSH)
    payload = first + second[:12]
    checked = payload + TAIL + b"\x00\x00\x00\xff\xff"
    assert zlib.decompressobj(-15).decompress(checked) == b"first part " * 100
    return payload


def finished(data: bytes) -> bytes:
    """One message as a whole deflate stream, its last block final (BFINAL)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH)


def echo_config(**options: Any) -> websocket.Config[Any]:
    """Echo every message compressed, and record whether the connection negotiated deflate."""

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text, compress=True)

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        ws.send_bytes(data, compress=True)

    config = websocket.init().on_text(on_text).on_bytes(on_bytes)
    return config.per_message_deflate(DeflateOptions(**options) if options else True)


async def open_with(srv: brioche.Server[Any], **offer: Any) -> ClientConnection:
    factory = ClientPerMessageDeflateFactory(**offer)
    return await connect(ws_url(srv), extensions=[factory], compression=None, open_timeout=5)


def accepted(client: ClientConnection) -> str | None:
    assert client.response is not None
    return client.response.headers.get("Sec-WebSocket-Extensions")


@pytest.mark.parametrize(
    ("offer", "options", "answer"),
    [
        # websockets' default offer, and what Chromium offers.
        ({"client_max_window_bits": True}, {}, "permessage-deflate"),
        ({}, {}, "permessage-deflate"),
        (
            {"server_max_window_bits": 10, "client_max_window_bits": 9},
            {},
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=9",
        ),
        (
            {"server_no_context_takeover": True, "client_no_context_takeover": True},
            {},
            "permessage-deflate; server_no_context_takeover",
        ),
        (
            {"client_max_window_bits": True},
            {
                "server_no_context_takeover": True,
                "client_no_context_takeover": True,
                "server_max_window_bits": 12,
                "client_max_window_bits": 10,
            },
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
            "server_max_window_bits=12; client_max_window_bits=10",
        ),
        (
            {"server_max_window_bits": 9, "client_max_window_bits": True},
            {"client_max_window_bits": 9},
            "permessage-deflate; server_max_window_bits=9; client_max_window_bits=9",
        ),
    ],
)
async def test_each_offer_gets_the_answer_rfc_7692_asks_for_and_messages_flow_both_ways(
    serve: ServeFn, offer: dict[str, Any], options: dict[str, Any], answer: str
) -> None:
    srv = await serve(echo_config(**options))
    async with await open_with(srv, **offer) as client:
        assert accepted(client) == answer
        # Compressible messages, some repeated (back-references across messages with context
        # takeover), a large one, an empty one, binary.
        big = (JSON * 2000)[:100_000]
        for message in [JSON, JSON, big, "", "héllo " * 50, JSON]:
            await client.send(message)
            assert await asyncio.wait_for(client.recv(), 5) == message
        data = bytes(range(256)) * 300
        await client.send(data)
        assert await asyncio.wait_for(client.recv(), 5) == data


async def test_a_client_allowed_8_window_bits_is_inflated_with_9(serve: ServeFn) -> None:
    """A client that offers 8 gets 8 (the smaller of its value and the server's), but zlib
    compresses raw deflate with 9 bits at least, as Python's does: the server inflates with 9."""
    srv = await serve(echo_config())
    offer = "permessage-deflate; client_max_window_bits=8"
    raw = await RawWebSocket.connect(srv.port, headers=[("Sec-WebSocket-Extensions", offer)])
    text = "".join(f"{i % 97:03d}" for i in range(20_000)).encode()
    async with raw:
        assert b"sec-websocket-extensions: permessage-deflate; client_max_window_bits=8\r\n" in raw.response_head.lower()
        await raw.send_frame(OP_TEXT, deflate(text, wbits=9), rsv=4)
        frame = await raw.recv_data_frame()
        assert zlib.decompressobj(-15).decompress(frame.payload + TAIL) == text


@pytest.mark.parametrize(
    ("offer", "options"),
    [
        # zlib cannot compress raw deflate with a 256-byte window.
        ({"server_max_window_bits": 8}, {}),
        # The server wants to limit the client's window and the client does not allow it.
        ({"client_max_window_bits": None}, {"client_max_window_bits": 12}),
    ],
)
async def test_an_offer_the_server_cannot_honour_is_declined_and_the_connection_opens_plain(
    serve: ServeFn, offer: dict[str, Any], options: dict[str, Any]
) -> None:
    srv = await serve(echo_config(**options))
    async with await open_with(srv, **offer) as client:
        assert accepted(client) is None
        await client.send(JSON)
        assert await asyncio.wait_for(client.recv(), 5) == JSON


async def test_without_per_message_deflate_offers_are_ignored_and_rsv1_is_refused(
    serve: ServeFn,
) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text, compress=True)

    srv = await serve(websocket.init().on_text(on_text))
    async with await open_with(srv) as client:
        assert accepted(client) is None
        await client.send(JSON)
        assert await asyncio.wait_for(client.recv(), 5) == JSON
    raw = await RawWebSocket.connect(srv.port, headers=[("Sec-WebSocket-Extensions", "permessage-deflate")])
    async with raw:
        assert b"sec-websocket-extensions" not in raw.response_head.lower()
        await raw.send_frame(OP_TEXT, deflate(JSON.encode()), rsv=4)
        assert (await raw.expect_close_then_eof()).close_code == 1002


async def test_the_first_acceptable_offer_is_taken(serve: ServeFn) -> None:
    srv = await serve(echo_config())
    offers = (
        "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=8, "
        "permessage-deflate; unknown_param, permessage-deflate; server_max_window_bits=11"
    )
    raw = await RawWebSocket.connect(
        srv.port, headers=[("Sec-WebSocket-Extensions", offers), ("Sec-WebSocket-Extensions", "permessage-deflate")]
    )
    async with raw:
        assert b"sec-websocket-extensions: permessage-deflate; server_max_window_bits=11\r\n" in raw.response_head.lower()
        await raw.send_frame(OP_TEXT, deflate(JSON.encode()), rsv=4)
        frame = await raw.recv_data_frame()
        assert (frame.rsv, frame.opcode) == (4, OP_TEXT)
        inflater = zlib.decompressobj(-11)
        assert inflater.decompress(frame.payload + TAIL).decode() == JSON


async def test_a_decompression_bomb_is_closed_with_1009_from_a_10_kib_frame(
    serve: ServeFn, recorder: Recorder
) -> None:
    config = echo_config().max_payload_length(1024 * 1024)
    config = config.on_close(lambda ws, code, reason: recorder.add("close", code, reason))
    srv = await serve(config)
    bomb = deflate(bytes(10 * 1024 * 1024))
    assert len(bomb) <= 10 * 1024
    raw = await RawWebSocket.connect(srv.port, headers=[("Sec-WebSocket-Extensions", "permessage-deflate")])
    async with raw:
        # A message within the limit goes through first.
        await raw.send_frame(OP_BINARY, deflate(bytes(1024 * 1024)), rsv=4)
        frame = await raw.recv_data_frame()
        assert len(zlib.decompressobj(-15).decompress(frame.payload + TAIL)) == 1024 * 1024
        await raw.send_frame(OP_BINARY, bomb, rsv=4)
        close = await raw.expect_close_then_eof()
        assert close.close_code == 1009
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1009, "message too big")]


async def test_a_bomb_is_refused_without_inflating_the_rest(serve: ServeFn, recorder: Recorder) -> None:
    """1 MiB on the wire inflating to 1 GiB, against a 2 MiB limit: the server stops at the
    limit. It runs in this process, whose peak RSS grows by far less than the 1 GiB a server
    inflating the whole message would hold."""
    if not reset_peak_rss():
        pytest.skip("the peak RSS cannot be reset here (/proc/self/clear_refs)")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1024 * 1024)
    bomb = b"".join(compressor.compress(chunk) for _ in range(1024))
    bomb += compressor.flush(zlib.Z_SYNC_FLUSH)
    assert bomb.endswith(TAIL) and len(bomb) < 2 * 1024 * 1024
    bomb = bomb[:-4]
    config = echo_config().max_payload_length(2 * 1024 * 1024)
    config = config.on_close(lambda ws, code, reason: recorder.add("close", code, reason))
    srv = await serve(config)
    raw = await RawWebSocket.connect(srv.port, headers=[("Sec-WebSocket-Extensions", "permessage-deflate")])
    async with raw:
        assert reset_peak_rss()
        baseline = status_kib("VmHWM")
        await raw.send_frame(OP_BINARY, bomb, rsv=4)
        assert (await raw.expect_close_then_eof()).close_code == 1009
        growth_mib = (status_kib("VmHWM") - baseline) / 1024
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1009, "message too big")]
    assert growth_mib < 64, f"peak RSS +{growth_mib:.0f} MiB for a bomb refused at 2 MiB"


async def test_rfc_7692s_own_example_of_a_final_block_is_accepted(serve: ServeFn) -> None:
    """RFC 7692 7.2.3.3: a sender may end each message with a final block; what is left of the
    empty block after it, once its tail is stripped, is one byte (its example below). Only
    other bytes after the final block are refused (the cases below)."""
    srv = await serve(echo_config())
    raw = await RawWebSocket.connect(srv.port, headers=[("Sec-WebSocket-Extensions", "permessage-deflate")])
    inflater = zlib.decompressobj(-15)  # the server's replies keep their context
    async with raw:
        for _ in range(2):  # and the next message starts a stream of its own
            await raw.send_frame(OP_TEXT, bytes([0xF3, 0x48, 0xCD, 0xC9, 0xC9, 0x07, 0x00, 0x00]), rsv=4)
            frame = await raw.recv_data_frame()
            assert inflater.decompress(frame.payload + TAIL) == b"Hello"


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        # Not deflate data.
        ([(OP_BINARY, b"\xff\xff\xff\xff", True, 4)], 1007),
        # Invalid UTF-8 once inflated.
        ([(OP_TEXT, deflate(b"ok \xff"), True, 4)], 1007),
        # Bytes after the final block that ends the message's stream: garbage, or a block.
        ([(OP_TEXT, finished(b"hello") + b"\xff\xff\xff\xffGARBAGE", True, 4)], 1007),
        ([(OP_TEXT, finished(b"hello") + deflate(b" smuggled"), True, 4)], 1007),
        # No deflate data at all: every compressor writes a block, even for an empty message
        # (`00`). Taken as "" before, the appended 00 00 ff ff left the inflater inside a stored
        # block of 65,280 bytes, and the next, valid, message failed in its stead.
        ([(OP_TEXT, b"", True, 4)], 1007),
        ([(OP_BINARY, b"", False, 4), (OP_CONTINUATION, b"", True, 0)], 1007),
        # Cut short inside a stored block: the appended 00 00 ff ff was taken for 4 bytes of
        # its data, and the next, valid, message for more of it: both delivered as garbage.
        ([(OP_BINARY, stored(b"A" * 1000)[:505], True, 4), (OP_BINARY, deflate(b"next"), True, 4)], 1007),
        # Cut short inside a Huffman-coded block: its start was delivered, and the stream left
        # inside the block, to fail (or garble) the next message in its stead.
        ([(OP_TEXT, fixed(b"hello world, hello world")[:-2], True, 4), (OP_TEXT, deflate(b"next"), True, 4)], 1007),
        # Cut short inside a dynamic block's header: it inflated to nothing, no error (the
        # tail read as more of the header), and was delivered as ""; cut so in a later block,
        # the blocks before it were delivered as the whole message.
        ([(OP_TEXT, deflate(VARIED)[:12], True, 4)], 1007),
        ([(OP_TEXT, cut_in_a_later_header(), True, 4)], 1007),
        # RSV1 belongs on a message's first frame only.
        ([(OP_TEXT, deflate(b"abc"), False, 4), (OP_CONTINUATION, b"", True, 4)], 1002),
        # RSV1 on a control frame, and the bits no extension uses.
        ([(0x9, b"", True, 4)], 1002),
        ([(OP_TEXT, deflate(b"abc"), True, 2)], 1002),
        ([(OP_TEXT, deflate(b"abc"), True, 6)], 1002),
    ],
)
async def test_broken_compressed_frames_close_with_the_rfc_codes(
    serve: ServeFn, frames: list[tuple[int, bytes, bool, int]], code: int
) -> None:
    srv = await serve(echo_config())
    raw = await RawWebSocket.connect(srv.port, headers=[("Sec-WebSocket-Extensions", "permessage-deflate")])
    async with raw:
        for opcode, payload, fin, rsv in frames:
            await raw.send_frame(opcode, payload, fin=fin, rsv=rsv)
        assert (await raw.expect_close_then_eof()).close_code == code


async def test_a_fragmented_compressed_message_is_inflated_whole(serve: ServeFn) -> None:
    srv = await serve(echo_config())
    raw = await RawWebSocket.connect(srv.port, headers=[("Sec-WebSocket-Extensions", "permessage-deflate")])
    text = ("€uro " * 5000).encode()
    payload = deflate(text)
    async with raw:
        await raw.send_frame(OP_TEXT, payload[:7], fin=False, rsv=4)
        await raw.send_frame(OP_CONTINUATION, payload[7:100], fin=False)
        await raw.send_frame(OP_CONTINUATION, payload[100:], fin=True)
        frame = await raw.recv_data_frame()
        assert frame.rsv == 4
        assert zlib.decompressobj(-15).decompress(frame.payload + TAIL) == text


async def test_compress_is_per_message_and_the_queue_counts_compressed_bytes(serve: ServeFn) -> None:
    statuses: list[Any] = []
    buffered: list[int] = []

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        def burst(ws: brioche.WebSocket[Any]) -> None:
            statuses.append(ws.send("a" * 100_000, compress=True))
            buffered.append(ws.buffered_amount)
            statuses.append(ws.send("plain"))
            statuses.append(ws.send_bytes(b"b" * 5000, compress=True))
            statuses.append(ws.send_bytes(b"raw", compress=False))

        ws.cork(burst)

    srv = await serve(websocket.init().on_text(on_text).per_message_deflate(True))
    raw = await RawWebSocket.connect(srv.port, headers=[("Sec-WebSocket-Extensions", "permessage-deflate")])
    async with raw:
        await raw.send_text("go")
        frames = [await raw.recv_data_frame() for _ in range(4)]
    # MessageSent reports each message's own length; buffered_amount the compressed frame.
    assert statuses == [MessageSent(100_000), MessageSent(5), MessageSent(5000), MessageSent(3)]
    assert buffered[0] < 1000
    assert [(f.rsv, f.opcode) for f in frames] == [(4, OP_TEXT), (0, OP_TEXT), (4, OP_BINARY), (0, OP_BINARY)]
    inflater = zlib.decompressobj(-15)
    assert inflater.decompress(frames[0].payload + TAIL) == b"a" * 100_000
    assert frames[1].payload == b"plain"
    # Context takeover: the second compressed message uses the same inflater.
    assert inflater.decompress(frames[2].payload + TAIL) == b"b" * 5000
    assert frames[3].payload == b"raw"


async def test_a_compressed_publish_reaches_subscribers_of_every_kind(serve: ServeFn) -> None:
    """Without server context takeover subscribers share one compressed frame per window size;
    with it each gets its own; without deflate the frame goes out as it is."""

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.subscribe("room")

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "ready?":
            ws.send("ready")
        else:
            ws.publish("room", text, compress=True)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).per_message_deflate(True))
    kinds = {
        "stateless": "permessage-deflate; server_no_context_takeover",
        "stateless10": "permessage-deflate; server_no_context_takeover; server_max_window_bits=10",
        "takeover": "permessage-deflate",
        "plain": None,
    }
    clients = {}
    for name, offer in kinds.items():
        headers = [] if offer is None else [("Sec-WebSocket-Extensions", offer)]
        client = await RawWebSocket.connect(srv.port, headers=headers)
        clients[name] = client
        # Subscribed once its on_open ran: the reply to a later message proves it.
        await client.send_text("ready?")
        assert (await client.recv_data_frame()).payload == b"ready"
    inflaters = {
        "stateless": zlib.decompressobj(-15),
        "stateless10": zlib.decompressobj(-10),
        "takeover": zlib.decompressobj(-15),
    }
    async with websocket_publisher(srv) as publisher:
        for text in [JSON, JSON + "!", JSON]:
            await publisher.send(text)
            for name, client in clients.items():
                frame = await client.recv_data_frame()
                if name == "plain":
                    assert (frame.rsv, frame.payload) == (0, text.encode())
                else:
                    assert frame.rsv == 4, name
                    inflater = inflaters[name]
                    assert inflater.decompress(frame.payload + TAIL).decode() == text, name
                    if name.startswith("stateless"):
                        # No context: each message inflates on its own.
                        inflaters[name] = zlib.decompressobj(inflater_bits(name))
    for client in clients.values():
        await client.aclose()


def inflater_bits(name: str) -> int:
    return -10 if name == "stateless10" else -15


class websocket_publisher:
    """A plain client (not subscribed: it publishes only)."""

    def __init__(self, srv: brioche.Server[Any]) -> None:
        self.url = ws_url(srv, "/ws?publisher")
        self.client: ClientConnection | None = None

    async def __aenter__(self) -> ClientConnection:
        self.client = await connect(self.url, compression=None, open_timeout=5)
        return self.client

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.client is not None
        await self.client.close()


async def test_reload_cannot_change_per_message_deflate(serve: ServeFn) -> None:
    srv = await serve(echo_config())
    with pytest.raises(ValueError, match="per_message_deflate"):
        srv.reload(websocket=echo_config(server_no_context_takeover=True))


def test_deflate_options_are_checked() -> None:
    with pytest.raises(ValueError, match="server_max_window_bits must be >= 9"):
        DeflateOptions(server_max_window_bits=8)
    with pytest.raises(ValueError, match="client_max_window_bits must be >= 9"):
        DeflateOptions(client_max_window_bits=8)
    with pytest.raises(ValueError, match="client_max_window_bits must be <= 15"):
        DeflateOptions(client_max_window_bits=16)
    with pytest.raises(TypeError, match="server_no_context_takeover must be a bool"):
        DeflateOptions(server_no_context_takeover=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="per_message_deflate takes a bool or a DeflateOptions"):
        websocket.init().per_message_deflate("yes")  # type: ignore[arg-type]
    assert websocket.init().deflate_options is None
    assert websocket.init().per_message_deflate(True).deflate_options == DeflateOptions()
    assert websocket.per_message_deflate(websocket.init(), False).deflate_options is None


async def test_compressed_messages_waiting_to_be_inflated_do_not_hold_each_other_up(
    serve: ServeFn, recorder: Recorder
) -> None:
    """Four clients hold the 1 MiB max_incoming_bytes with the start of messages they never
    finish; meanwhile 24 clients each send a 59 KB compressed message, whole, which waits to
    be inflated. Once the four leave, the 24 are inflated and handled: what they hold
    themselves does not count against their inflation. Before, their 1.4 MB alone kept the
    budget over its limit, which only their inflation could bring down: none was ever
    handled, their connections (dead ones too) were held until the server stopped, and
    every large or compressed message from anyone else waited with them."""

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        recorder.add("message", len(data))

    config = websocket.init().on_bytes(on_bytes).per_message_deflate(True).max_payload_length(MIB)
    srv = await serve(config, max_incoming_bytes=MIB)
    offer = [("Sec-WebSocket-Extensions", "permessage-deflate")]
    fillers: list[RawWebSocket] = []
    waiters: list[RawWebSocket] = []
    # Incompressible: each waiter holds what it sent, under the floor at which reading pauses.
    payload = os.urandom(59_000)
    compressed = deflate(payload)
    try:
        for _ in range(4):
            raw = await RawWebSocket.connect(srv.port, headers=offer)
            fillers.append(raw)
            start = encode_frame(OP_BINARY, bytes(MIB))[: 300_000]
            await raw.send_raw(start)
        assert await poll_until(lambda: srv.stats()["incoming_bytes"] > MIB, TIMEOUT), srv.stats()
        held_by_fillers = srv.stats()["incoming_bytes"]
        for _ in range(24):
            raw = await RawWebSocket.connect(srv.port, headers=offer)
            waiters.append(raw)
            await raw.send_frame(OP_BINARY, compressed, rsv=4)
        assert await poll_until(
            lambda: srv.stats()["incoming_bytes"] >= held_by_fillers + 24 * len(compressed), TIMEOUT
        ), srv.stats()
        assert recorder.of("message") == []
        for raw in fillers:
            raw.close()
        await recorder.wait_for(lambda: len(recorder.of("message")) == 24, TIMEOUT)
    finally:
        for raw in fillers + waiters:
            raw.close()
    assert recorder.of("message") == [(len(payload),)] * 24
    assert await poll_until(lambda: srv.stats()["incoming_bytes"] == 0, TIMEOUT), srv.stats()


@pytest.mark.parametrize("message_timeout", [0, 1], ids=["no-timeout", "past-message-timeout"])
async def test_compressed_messages_wait_for_the_budget_before_they_are_inflated(
    serve: ServeFn, recorder: Recorder, message_timeout: int
) -> None:
    """Clients each send a 2 MiB message as a 2 KiB compressed frame, behind a message
    whose handler waits: under a 4 MiB max_incoming_bytes, only what the budget has room for
    is inflated, the rest waits compressed, and every message arrives once the budget frees.
    Before, each frame was inflated as it arrived: a connection holding 2 KiB is below the
    floor at which the budget pauses it, so ten held 20 MiB, and a thousand would have held
    2 GiB for 2 MB sent. A small compressed message is still served meanwhile.

    With a message_timeout of 1 s, held past it: a message that has all arrived and waits to
    be inflated is the server's delay, not its client's, and is not timed out (it was closed
    with 1008 before)."""
    # Enough that, were every message inflated, more would be held than the bound allows
    # (each worker thread may inflate one message while the budget still had room).
    cpus = len(os.sched_getaffinity(0))
    clients, size, budget = 2 * cpus + 8, 2 * MIB, 4 * MIB
    bound = budget + cpus * (size + 4096)
    payload = b"ab" * (size // 2)
    release = asyncio.Event()
    held_at_delivery: list[int] = []

    async def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        if data == b"wait":
            await release.wait()
            return
        held_at_delivery.append(srv.stats()["incoming_bytes"])
        recorder.add("message", data == payload)
        ws.send_bytes(b"got it")

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text)

    config = websocket.init().on_bytes(on_bytes).on_text(on_text).per_message_deflate(True)
    srv = await serve(config.message_timeout(message_timeout), max_incoming_bytes=budget)
    compressed = deflate(payload)
    assert len(compressed) < 4096
    raws: list[RawWebSocket] = []
    try:
        for _ in range(clients):
            raw = await RawWebSocket.connect(srv.port, headers=[("Sec-WebSocket-Extensions", "permessage-deflate")])
            raws.append(raw)
            await raw.send_bytes(b"wait")
            await raw.send_frame(OP_BINARY, compressed, rsv=4)
        # Everything sent has been read (each read is parsed, and a message inflated or kept,
        # in the same step of its connection's task), and at least what fits was inflated.
        assert await poll_until(lambda: unread_by_server(srv.port) == 0
                                and srv.stats()["messages_in"] >= clients + 2, 10), srv.stats()
        held = srv.stats()["incoming_bytes"]
        assert held <= bound, (held, bound)
        # Over the budget, a small compressed message still flows: it cannot inflate past the
        # floor below which a connection is read anyway.
        assert held > budget
        # Each connection whose message waits to be inflated stopped reading for the budget.
        assert srv.stats()["reads_paused"] >= 1
        chat = await RawWebSocket.connect(srv.port, headers=[("Sec-WebSocket-Extensions", "permessage-deflate")])
        raws.append(chat)
        await chat.send_frame(OP_TEXT, deflate(b"still here"), rsv=4)
        assert (await chat.recv_data_frame()).payload == b"still here"
        if message_timeout:
            # The time is what is tested: twice the deadline the waiting messages would have.
            await asyncio.sleep(2 * message_timeout)
            assert srv.stats()["closes_by_code"] == {}
        release.set()
        for raw in raws[:clients]:
            assert (await raw.recv_data_frame()).payload == b"got it"
    finally:
        release.set()
        for raw in raws:
            raw.close()
    assert recorder.of("message") == [(True,)] * clients
    assert max(held_at_delivery) <= bound, held_at_delivery
    assert await poll_until(lambda: srv.stats()["incoming_bytes"] == 0, 5), srv.stats()
