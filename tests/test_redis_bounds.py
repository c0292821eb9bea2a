"""What the Redis link may hold while Redis is stalled or down, with a real ``redis-server``.

A stalled Redis is one stopped with SIGSTOP: it keeps its socket open and answers nothing, so
the core's request waits for its 2 s response timeout. The memory figures are this process's
RSS (the server runs in it), against a baseline taken just before, with wide margins: what is
asserted exactly is what the core counts.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
from websockets.asyncio.client import ClientConnection, connect

from brioche import websocket
from conftest import ServeFn, log_lines, reset_peak_rss, status_kib, ws_url
from rawws import RawWebSocket
from test_redis_pubsub import Peer, ask, peer, peer_stats, until
from test_redis_pubsub import Redis, redis
from test_redis_pubsub import pytestmark as needs_redis

# The engine's bounds alone: `once` (pyproject.toml's markers).
pytestmark = [needs_redis, pytest.mark.once]

MIB = 1 << 20
# The core's bound on what waits for Redis (pubsub/remote.rs: OUTGOING_BYTES), and what each
# publish holds of it: the topic, the payload and the 18-byte header it gets on Redis.
OUTGOING_BYTES = 64 * MIB
HEADER = 18




def rss_mib() -> float:
    return status_kib("VmRSS") / 1024


def baseline_rss_mib() -> float:
    """RSS with what earlier tests freed given back to the kernel: reused, it would hide growth."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    return rss_mib()


async def test_publishes_to_a_stalled_redis_hold_at_most_64_mib(
    redis: Redis, serve: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    """300 publishes of 1 MiB with Redis stopped: 63 fit in the 64 MiB the core may hold, the
    other 237 are lost at once (before: all 300 were held, 1 MiB each), with one WARNING. Once
    the core gives the stalled link up, the 63 are lost too, and once back, the bytes they held
    are free again."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    srv = await serve(websocket.init(), pubsub_redis=redis.url)
    await until(lambda: srv.stats()["redis_connected"] == 1, "the link to Redis")
    assert redis.process is not None
    count, payload = 300, b"x" * MIB
    fit = OUTGOING_BYTES // (HEADER + len("news") + len(payload))
    assert fit == 63

    before = baseline_rss_mib()
    assert reset_peak_rss(), "cannot reset VmHWM on this kernel"
    redis.process.send_signal(signal.SIGSTOP)
    for _ in range(count):
        srv.publish("news", payload)
    grown = status_kib("VmHWM") / 1024 - before
    stats = srv.stats()
    # Still connected: the core waits 2 s for Redis to answer before it gives the link up, and
    # the 300 publishes take a few tens of milliseconds.
    assert stats["redis_connected"] == 1, "the link dropped during the publishes: too slow a machine"
    assert (stats["redis_published"], stats["redis_publishes_lost"]) == (0, count - fit)
    # 63 MiB held, the batch being written copied once more for its pipeline; before the
    # bound, 300 MiB and more.
    assert grown < 200, f"RSS grew by {grown:.0f} MiB"

    def lines() -> list[tuple[int, str]]:
        return log_lines(caplog, "brioche.redis")

    await until(lambda: len(lines()) >= 1, "the loss to be logged")
    assert lines()[0][0] == logging.WARNING and "dropping publishes to Redis" in lines()[0][1], lines()

    # The stalled request times out: what was held is lost too, and released.
    await until(lambda: srv.stats()["redis_connected"] == 0, "the core to give the stalled link up", 10)
    redis.process.send_signal(signal.SIGCONT)
    await until(lambda: srv.stats()["redis_connected"] == 1, "the link to come back", 10)
    stats = srv.stats()
    assert (stats["redis_published"], stats["redis_publishes_lost"]) == (0, count)
    # 63 more fit again (a queue still charged for the lost ones would refuse them all).
    for _ in range(fit):
        srv.publish("news", payload)
    await until(lambda: srv.stats()["redis_published"] == fit, "the publishes after the outage", 10)
    assert srv.stats()["redis_publishes_lost"] == count
    levels = [level for level, _ in lines()]
    assert levels == [logging.WARNING, logging.WARNING, logging.INFO], lines()
    assert "is down" in lines()[1][1] and "is back" in lines()[2][1]


def channels(redis: Redis) -> set[str]:
    return {channel.removeprefix("brioche:") for channel in redis.cli("PUBSUB", "CHANNELS", "brioche:*")}


async def peer_control(peer: Callable[..., Awaitable[Peer]], url: str) -> tuple[Peer, ClientConnection]:
    """A server in another process (``scripts/redis_peer.py``), whose RSS is the core's and
    Python's alone, and a socket to command it."""
    other = await peer(url)
    control = await connect(other.url(), open_timeout=5, max_size=None)
    return other, control


async def connected(control: ClientConnection) -> int:
    count: int = (await peer_stats(control))["redis_connected"]
    return count


def peer_rss_mib(other: Peer) -> float:
    return status_kib("VmRSS", other.process.pid) / 1024


async def test_topic_churn_while_redis_is_stalled_is_kept_once_per_topic(
    redis: Redis, peer: Callable[..., Awaitable[Peer]]
) -> None:
    """Redis stopped while connected, the link waiting for its answer to a SUBSCRIBE: 2,000,000
    subscribe/unsubscribe pairs of one topic are one change to look at, not 4,000,000 reports
    (before: about 100 bytes a pair, 200 MiB); once Redis answers again, its subscriptions are
    exactly the topics with subscribers."""
    other, control = await peer_control(peer, redis.url)
    await until(_connected_is(control, 1), "the link to Redis")
    assert redis.process is not None
    before = peer_rss_mib(other)
    redis.process.send_signal(signal.SIGSTOP)
    await control.send("sub first")  # the link sends its SUBSCRIBE, and waits
    # 4,000,000 calls from Python: about 2 s here, more beside another suite.
    assert await ask(control, "churn 2000000 room", timeout=60) == "churned"
    grown = peer_rss_mib(other) - before
    assert grown < 24, f"RSS grew by {grown:.0f} MiB"
    await control.send("sub room")
    redis.process.send_signal(signal.SIGCONT)
    # Whether the link got its answer in time or gave up and subscribed anew, it settles.
    await until(_channels_are(redis, {"first", "room"}), "Redis to hold the two subscriptions", 15)
    await until(_connected_is(control, 1), "the link to be up")
    assert await asyncio.to_thread(channels, redis) == {"first", "room"}
    await control.close()


async def test_topic_churn_while_redis_is_down_holds_nothing_and_resubscribes_exactly(
    redis: Redis, peer: Callable[..., Awaitable[Peer]]
) -> None:
    """2,000,000 subscribe/unsubscribe pairs of distinct topics with Redis down, 100 topics
    left subscribed: the core keeps no report of them (before: each pair held about 100 bytes
    until Redis came back, 200 MiB here), and once Redis is back it is subscribed to exactly
    the 100."""
    other, control = await peer_control(peer, redis.url)
    await until(_connected_is(control, 1), "the link to Redis")
    await asyncio.to_thread(redis.kill)
    await until(_connected_is(control, 0), "the core to see Redis gone")

    before = peer_rss_mib(other)
    assert await ask(control, "churn 2000000 t#", timeout=60) == "churned"
    grown = peer_rss_mib(other) - before
    assert grown < 24, f"RSS grew by {grown:.0f} MiB"
    kept = {f"kept{i}" for i in range(100)}
    for topic in sorted(kept):
        await control.send(f"sub {topic}")
    assert await ask(control, "count kept99") == "1"

    await asyncio.to_thread(redis.start)
    await until(_connected_is(control, 1), "the link to come back", 10)
    # Connected means subscribed to what the registry held when it connected.
    assert await asyncio.to_thread(channels, redis) == kept
    await control.close()


def _connected_is(control: ClientConnection, value: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await connected(control) == value

    return check


def _channels_are(redis: Redis, expected: set[str]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await asyncio.to_thread(channels, redis) == expected

    return check


def resp(*parts: bytes) -> bytes:
    """One Redis command in RESP."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def foreign(seq: int, payload: bytes, opcode: int = 2, origin: int = 0x5EED) -> bytes:
    """A message as another brioche process puts it on Redis (pubsub/remote.rs: version 1, the
    opcode, 0x40 added when the publisher asked for compression, its origin and sequence
    number, little-endian)."""
    return bytes([1, opcode]) + struct.pack("<QQ", origin, seq) + payload


def publish_at_once(port: int, messages: list[bytes]) -> None:
    """PUBLISH ``messages`` to ``brioche:flood`` in one transaction: Redis holds them until
    EXEC and then hands all of them to its subscribers at once, so they arrive as fast as a
    subscriber reads, however slowly this process could send them."""
    # A timeout on each operation: this runs in a thread, which no wait_for can stop.
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(resp(b"MULTI"))
        for message in messages:
            sock.sendall(resp(b"PUBLISH", b"brioche:flood", message))
        sock.sendall(resp(b"EXEC"))
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass
    finally:
        sock.close()


async def test_messages_from_redis_wait_for_the_fan_out_up_to_64_mib(
    redis: Redis, serve: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process publishes 200 messages of 1 MiB in one transaction, which the publisher
    asked to be compressed, to a topic seven local clients take with permessage-deflate:
    Redis hands the messages over faster than the server compresses them (about 7 ms a message
    and a window size here). The messages used to wait for the fan-out in an unbounded channel
    (the server grew by the backlog); now 64 MiB of them may wait, the rest are counted lost and
    logged, and the link carries on. Redis is told not to cut a slow subscriber, so that every
    message reaches the server and the counts add up exactly."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    redis.cli("CONFIG", "SET", "client-output-buffer-limit", "pubsub 0 0 0")
    config = (websocket.init().on_open(lambda ws: ws.subscribe(ws.data)).per_message_deflate(True)
              .backpressure_limit(MIB))
    srv = await serve(config, pubsub_redis=redis.url)
    await until(lambda: srv.stats()["redis_connected"] == 1, "the link to Redis")
    # Subscribers without context takeover share one compression of a message per window
    # size: seven sizes, seven compressions of each message, whether the subscriber takes it or
    # not (a stalled one drops it once compressed). None of them reads.
    readers = []
    for bits in range(9, 16):
        offer = f"permessage-deflate; server_no_context_takeover; server_max_window_bits={bits}"
        readers.append(await RawWebSocket.connect(srv.port, "/ws?flood", rcvbuf=4096,
                                                  headers=[("Sec-WebSocket-Extensions", offer)]))
        readers[-1].pause_reading()
    count, payload = 200, os.urandom(MIB)  # random: deflate works hardest, and gains nothing
    messages = [foreign(seq, payload, opcode=0x42) for seq in range(1, count + 1)]
    try:
        await until(lambda: srv.subscriber_count("flood") == len(readers), "the subscribers")
        await until(_channels_are(redis, {"flood"}), "the link to subscribe")
        before = baseline_rss_mib()
        assert reset_peak_rss(), "cannot reset VmHWM on this kernel"
        await asyncio.to_thread(publish_at_once, redis.port, messages)

        def settled() -> bool:
            stats = srv.stats()
            return stats["redis_received"] + stats["redis_received_lost"] == count

        await until(settled, "every message fanned out or lost", 30)
        grown = status_kib("VmHWM") / 1024 - before
        stats = srv.stats()
        assert stats["redis_received_lost"] > 0, "the fan-out kept up: nothing to show"
        assert stats["redis_connected"] == 1
        # 64 MiB waiting and about 30 more here: the subscribers' 1 MiB queues, the compressed
        # copies, what reading holds. Without the bound the server grew by 227 MiB.
        assert grown < 120, f"RSS grew by {grown:.0f} MiB"
        await until(lambda: len(log_lines(caplog, "brioche.redis")) >= 1, "the loss to be logged")
        lines = log_lines(caplog, "brioche.redis")
        assert lines[0] == (logging.WARNING, "dropping messages from Redis (64 MiB of them already wait "
                            "to be fanned out here): this process's subscribers miss them; more drops are "
                            "not logged until that queue empties"), lines
    finally:
        for reader in readers:
            reader.close()
    # The link carries on. The readers' leaving unsubscribes the link from Redis and the next
    # client's arrival subscribes it again; a message published in between reaches no one, so
    # the test waits for each.
    await until(lambda: srv.subscriber_count("flood") == 0, "the readers to leave")
    await until(_channels_are(redis, set()), "the link to unsubscribe")
    async with connect(ws_url(srv, "/ws?flood"), open_timeout=5) as client:
        await until(lambda: srv.subscriber_count("flood") == 1, "the new subscriber")
        await until(_channels_are(redis, {"flood"}), "the link to subscribe again")
        await asyncio.to_thread(publish_at_once, redis.port, [foreign(count + 1, b"after")])
        assert await asyncio.wait_for(client.recv(), 10) == b"after"
