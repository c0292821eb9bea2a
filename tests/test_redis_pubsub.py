"""Topics across processes through a real ``redis-server`` (``pubsub_redis``).

Each test starts its own ``redis-server`` on a free port (no persistence), a brioche server in
this process and, where the issue says processes, a second one in a subprocess
(``scripts/redis_peer.py``). Clients are real ``websockets`` clients; what Redis itself holds
is read with ``redis-cli``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

import brioche
from brioche import MessageDropped, MessageSent, server, websocket
from conftest import ServeFn, free_port, log_lines, serve_config, upgrade_ws_path, ws_url
from test_workers import AppSupervisor, clients_covering, receive

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server is not installed (make system-deps)",
)

# Tests of what the engine does with Redis, whose Python side is the same on every CPython, are
# `once` (pyproject.toml's markers): the matrix keeps the ones that go through the Python API.

PEER = Path(__file__).parent / "scripts" / "redis_peer.py"


def start_redis_server(
    arguments: Callable[[], list[str]], cli: Callable[..., list[str]], move: Callable[[], None], first: bool
) -> subprocess.Popen[bytes]:
    """Start ``redis-server`` with ``arguments()`` and wait until it answers PING (``cli``).

    free_port() avoids only the ports this process handed out: the other suite running beside it
    in `make test` may bind one before redis-server does, which then exits. A ``first`` start
    calls ``move`` (new ports) and tries again, up to three times; a restart keeps its ports,
    which others know it by. The server that answers must be the one started here.
    """
    for _ in range(3):
        process = subprocess.Popen(["redis-server", *arguments()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if _answers(process, cli):
            break
        assert first, "redis-server exited"
        move()
    else:
        raise AssertionError("redis-server exited at start three times (its port taken each time)")
    # Another process's server on the port (this one then exits, unable to bind) answers too.
    fields = (line.partition(":") for line in cli("INFO", "server"))
    pid = {key: value for key, _, value in fields}.get("process_id")
    assert pid == str(process.pid), f"the port is answered by another redis-server (pid {pid})"
    return process


def _answers(process: subprocess.Popen[bytes], cli: Callable[..., list[str]]) -> bool:
    """True once ``process`` answers PING; False if it exits first."""
    deadline = time.monotonic() + 10
    while process.poll() is None:
        try:
            if cli("PING") == ["PONG"]:
                # Another process's redis-server on the port answers too, while this one exits.
                return process.poll() is None
        except subprocess.TimeoutExpired:
            pass  # whatever holds the port (not this server, which cannot bind it) is silent
        assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
        time.sleep(0.02)
    return False


class Redis:
    """A ``redis-server`` of this test's own, killed and started again at will, same port. With
    ``tls`` (CA, certificate, key files), it listens on TLS only and clients are not asked for a
    certificate."""

    def __init__(self, tls: tuple[Path, Path, Path] | None = None) -> None:
        self.port = free_port()
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        self.started = False

    @property
    def url(self) -> str:
        return f"{'redis' if self.tls is None else 'rediss'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = start_redis_server(self.arguments, self.cli, self.move, first=not self.started)
        self.started = True

    def arguments(self) -> list[str]:
        if self.tls is None:
            listen = ["--port", str(self.port)]
        else:
            ca, cert, key = self.tls
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                      "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        return [*listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def move(self) -> None:
        self.port = free_port()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self.process = None

    def cli(self, *args: str) -> list[str]:
        tls = [] if self.tls is None else ["--tls", "--cacert", str(self.tls[0])]
        done = subprocess.run(["redis-cli", *tls, "-p", str(self.port), *args], capture_output=True, text=True, timeout=5)
        return done.stdout.split()

    def subscribers(self, channel: str, sharded: bool = False) -> int:
        """How many connections Redis has subscribed to ``channel``: one per brioche server."""
        out = self.cli("PUBSUB", "SHARDNUMSUB" if sharded else "NUMSUB", channel)
        return int(out[1])


@pytest.fixture
def redis() -> Iterator[Redis]:
    instance = Redis()
    instance.start()
    yield instance
    if instance.process is not None:
        instance.kill()


async def until(predicate: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 10) -> float:
    """Poll ``predicate`` (bounded in time); returns the seconds it took."""
    start = time.monotonic()
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)


async def subscribers(redis: Redis, channel: str, sharded: bool = False) -> int:
    return await asyncio.to_thread(redis.subscribers, channel, sharded)


async def published(stats: Callable[[], Mapping[str, object] | Awaitable[Mapping[str, object]]], count: int) -> None:
    """Wait for ``redis_published`` to reach ``count``. A publish is counted when Redis's answer
    reaches the publisher, which may be after Redis has delivered it to a subscriber."""

    async def check() -> bool:
        got = stats()
        if not isinstance(got, Mapping):
            got = await got
        return got["redis_published"] == count

    await until(check, f"redis_published to reach {count}")


class Collector:
    """Everything a client receives, read as it arrives."""

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.messages: list[str] = []
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.client:
            assert isinstance(message, str)
            self.messages.append(message)

    def starting(self, prefix: str) -> list[str]:
        return [m for m in self.messages if m.startswith(prefix)]


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[str], Awaitable[Collector]]]:
    opened: list[Collector] = []

    async def open_one(url: str) -> Collector:
        client = await connect(url, open_timeout=5, ping_interval=None, max_queue=None)
        opened.append(Collector(client))
        return opened[-1]

    yield open_one
    for collector in opened:
        await collector.client.close()
        collector.task.cancel()


class Peer:
    """``scripts/redis_peer.py``: a brioche server in another process."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def peer() -> AsyncIterator[Callable[..., Awaitable[Peer]]]:
    started: list[Peer] = []

    async def start(*args: str) -> Peer:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(PEER), *args, stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        started.append(Peer(process, int(line)))
        return started[-1]

    yield start
    for one in started:
        one.process.kill()
        await one.process.wait()


async def ask(control: ClientConnection, command: str, timeout: float = 5) -> str:
    """A command to a socket subscribed to nothing: its answer is the next message."""
    await control.send(command)
    answer = await asyncio.wait_for(control.recv(), timeout)
    assert isinstance(answer, str)
    return answer


async def peer_stats(control: ClientConnection) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(await ask(control, "stats"))
    return stats


def topics_config() -> websocket.Config[Any]:
    """What ``redis_peer.py`` serves: ``/ws?a,b`` subscribes on open; ``pub``/``unsub`` commands."""

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        for topic in (ws.data or "").split(","):
            if topic:
                ws.subscribe(topic)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        command, _, rest = text.partition(" ")
        if command == "pub":
            topic, _, message = rest.partition(" ")
            ws.publish(topic, message)
        elif command == "unsub":
            ws.unsubscribe(rest)

    return websocket.init().on_open(on_open).on_text(on_text)


async def check_recovery(
    srv: brioche.Server[Any],
    local: Collector,
    remote: Collector,
    count: Callable[[], int],
    stop: asyncio.Event,
    stream: Awaitable[None],
    restarted_at: int,
    caplog: pytest.LogCaptureFixture,
) -> int:
    """After an outage of Redis (or of a master) mid-stream: 100 more publishes, then the
    stream stops; local delivery lost nothing, remote lost only what was published during the
    outage, nothing duplicated or reordered, the loss counted, one line down and one back.
    ``count()`` is how many were published so far; returns the final count."""
    resumed_at = count()
    await until(lambda: count() >= resumed_at + 100, "100 more publishes")
    stop.set()
    await stream
    published = count()
    await until(lambda: len(local.messages) == published, "every local delivery")
    await until(lambda: remote.messages[-1] == str(published - 1), "the last remote delivery")

    assert local.messages == [str(i) for i in range(published)]
    got = [int(m) for m in remote.messages]
    assert got == sorted(set(got)), "duplicated or reordered"
    assert len(got) < published, "messages published during the outage cannot have arrived"
    # Once back, nothing is lost: from the first message after the restart on, all arrived.
    first_back = next(i for i in got if i >= restarted_at)
    assert got[got.index(first_back) :] == list(range(first_back, published))

    await until(
        lambda: srv.stats()["redis_published"] + srv.stats()["redis_publishes_lost"] == published,
        "the queue to Redis to drain",
    )
    stats = srv.stats()
    assert stats["redis_publishes_lost"] >= 1
    assert stats["redis_connected"] == 1
    lines = log_lines(caplog, "brioche.redis")
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO], lines
    assert "is down" in lines[0][1] and "is back" in lines[1][1]
    return published


async def test_two_processes_share_a_topic_exactly_once_and_in_order(
    redis: Redis, serve: ServeFn, peer: Callable[..., Awaitable[Peer]], clients: Callable[[str], Awaitable[Collector]]
) -> None:
    srv = await serve(topics_config(), pubsub_redis=redis.url)
    other = await peer(redis.url)
    a_sub, a_pub = await clients(ws_url(srv, "/ws?chat")), await clients(ws_url(srv, "/ws?chat"))
    b_sub, b_pub = await clients(other.url("/ws?chat")), await clients(other.url("/ws?chat"))
    b_control = await connect(other.url(), open_timeout=5)
    # One subscription per process, not per socket.
    await until(_equals(redis, "brioche:chat", 2), "both processes to subscribe")
    assert srv.stats()["redis_connected"] == 1
    assert (await peer_stats(b_control))["redis_connected"] == 1

    count = 1_000
    for i in range(count):
        await a_pub.client.send(f"pub chat a{i}")
        await b_pub.client.send(f"pub chat b{i}")
    a_expected = [f"a{i}" for i in range(count)]
    b_expected = [f"b{i}" for i in range(count)]

    def complete() -> bool:
        return (
            len(a_sub.messages) >= 2 * count
            and len(b_sub.messages) >= 2 * count
            and len(a_pub.messages) >= count
            and len(b_pub.messages) >= count
        )

    await until(complete, "2,000 messages at each subscriber", 60)
    # A marker behind everything else each side published: whatever a duplicate could be, it
    # would have come before it.
    await a_pub.client.send("pub chat a-end")
    await b_pub.client.send("pub chat b-end")
    await until(lambda: all("a-end" in c.messages and "b-end" in c.messages for c in (a_sub, b_sub)), "markers")
    await until(lambda: "b-end" in a_pub.messages and "a-end" in b_pub.messages, "markers to publishers")
    for subscriber in (a_sub, b_sub):
        assert len(subscriber.messages) == 2 * count + 2
        assert subscriber.starting("a") == a_expected + ["a-end"]
        assert subscriber.starting("b") == b_expected + ["b-end"]
    # publish_to_self off: a publisher gets the other process's messages, never its own.
    assert a_pub.messages == b_expected + ["b-end"]
    assert b_pub.messages == a_expected + ["a-end"]

    await published(srv.stats, count + 1)
    await published(lambda: peer_stats(b_control), count + 1)
    stats = srv.stats()
    assert stats["publishes"] == count + 1
    assert stats["redis_published"] == count + 1
    assert stats["redis_publishes_lost"] == 0
    assert stats["redis_received"] == count + 1
    remote_stats = await peer_stats(b_control)
    assert (remote_stats["redis_published"], remote_stats["redis_received"]) == (count + 1, count + 1)
    # Local subscribers only.
    assert srv.subscriber_count("chat") == 2
    await b_control.close()


@pytest.mark.parametrize("close_active", [False, True], ids=["stop", "stop-closing-all"])
async def test_what_clients_publish_while_their_server_stops_reaches_the_other_processes(
    redis: Redis,
    serve: ServeFn,
    peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]],
    close_active: bool,
) -> None:
    """A server's link to Redis lasts until its last connection has ended, not only until the
    stop begins: what a client publishes during a graceful ``stop()`` (which waits for the
    clients to leave), or what ``on_close`` publishes as ``stop(close_active_connections=True)``
    closes every socket or as the last client leaves (a user who left), reaches the other
    processes. Before, the link ended as the stop began, and those publishes were counted lost."""
    config = topics_config()

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        if ws.data == "leaver":
            ws.publish("chat", f"left {code}")

    srv = await serve(config.on_close(on_close), pubsub_redis=redis.url)
    other = await peer(redis.url)
    remote = await clients(other.url("/ws?chat"))
    await until(_equals(redis, "brioche:chat", 1), "the peer to subscribe")
    leaver = await clients(ws_url(srv, "/ws?leaver"))
    await leaver.client.send("pub chat before")
    await until(lambda: remote.messages == ["before"], "the publish before the stop")

    stopping = asyncio.ensure_future(srv.stop(close_active_connections=close_active))
    if close_active:
        await asyncio.wait_for(stopping, 10)
        await until(lambda: remote.messages == ["before", "left 1001"], "on_close's publish during the stop")
    else:
        await until(lambda: srv._stop_called, "the stop to begin")
        assert srv.stats()["open_connections"] == 1
        await leaver.client.send("pub chat during")
        await until(lambda: remote.messages == ["before", "during"], "the publish during the stop")
        await leaver.client.close()
        await asyncio.wait_for(stopping, 10)
        await until(lambda: remote.messages == ["before", "during", "left 1000"], "on_close's publish")
    stats = srv.stats()
    assert stats["redis_publishes_lost"] == 0
    assert stats["redis_published"] == len(remote.messages)


@pytest.mark.once
async def test_redis_restart_mid_stream(
    redis: Redis,
    serve: ServeFn,
    peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kill redis-server under a stream of publishes and start it again on the same port.

    Local delivery never stops; the other process gets nothing twice and nothing out of order,
    and has messages again within 5 s of Redis answering (the core's bound: its backoff, at most
    1 s, then a connect and a resubscribe).
    """
    caplog.set_level(logging.INFO, logger="brioche.redis")
    srv = await serve(topics_config(), pubsub_redis=redis.url)
    other = await peer(redis.url)
    local = await clients(ws_url(srv, "/ws?feed"))
    remote = await clients(other.url("/ws?feed"))
    await until(_equals(redis, "brioche:feed", 2), "both processes to subscribe")

    published = 0
    stop = asyncio.Event()

    async def publisher() -> None:
        nonlocal published
        # A steady stream, one message every 2 ms: a pace, not a synchronisation.
        while not stop.is_set() and published < 20_000:
            assert srv.publish("feed", str(published)) == MessageSent(len(str(published)))
            published += 1
            await asyncio.sleep(0.002)

    stream = asyncio.ensure_future(publisher())
    await until(lambda: len(remote.messages) >= 50, "messages through Redis")
    await asyncio.to_thread(redis.kill)
    killed_at = published
    await until(lambda: srv.stats()["redis_connected"] == 0, "the core to see Redis gone")
    await until(lambda: len(local.messages) >= killed_at + 100, "local delivery with Redis down")
    assert int(remote.messages[-1]) < published
    await asyncio.to_thread(redis.start)
    restarted_at = published
    took = await until(lambda: any(int(m) >= restarted_at for m in remote.messages), "remote delivery to resume")
    assert took < 5
    published = await check_recovery(srv, local, remote, lambda: published, stop, stream, restarted_at, caplog)
    lines = log_lines(caplog, "brioche.redis")
    assert f"127.0.0.1:{redis.port}" in lines[0][1]


@pytest.mark.once
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
async def test_namespaced_subscriptions_are_counted_per_server(
    redis: Redis, clients: Callable[[str], Awaitable[Collector]], sharded: bool
) -> None:
    """Two servers in one process (one Redis connection each), plain or sharded pub/sub, a
    namespace: a server holds one subscription to a channel while its topic has local
    subscribers, however many, and none once the last has left."""
    config: server.Config[Any] = server.handler(lambda request, srv: server.upgrade(srv, request, [], request.query or None, server.bad_request))
    config = config.websocket(topics_config()).hostname("127.0.0.1").port(0)
    config = server.pubsub_redis(config, redis.url, sharded=sharded, namespace="t:")
    first, second = await config.serve(), await config.serve()

    def room_count(count: int) -> Callable[[], Awaitable[bool]]:
        return _equals(redis, "t:room", count, sharded)

    async def settled(srv: brioche.Server[Any], marker: str) -> None:
        """Until every subscription change ``srv`` made so far has reached Redis.

        Nothing to poll for when a change must not happen: a server's link sends its changes
        in order on one connection, so once a topic subscribed now is counted, what came before
        it is done too.
        """
        await clients(ws_url(srv, f"/ws?{marker}"))
        await until(_equals(redis, f"t:{marker}", 1, sharded), f"the {marker} subscription")

    try:
        one = await clients(ws_url(first, "/ws?room"))
        await until(room_count(1), "the first server to subscribe")
        two = await clients(ws_url(second, "/ws?room"))
        await until(room_count(2), "the second server to subscribe")
        three = await clients(ws_url(first, "/ws?room"))
        # A third socket, on the first server: no second subscription for that server. (Its
        # on_open, which subscribes, runs after the 101 went out: the client may be open first.)
        await until(lambda: first.subscriber_count("room") == 2, "the third socket to subscribe")
        await settled(first, "marker1")
        assert await subscribers(redis, "t:room", sharded) == 2
        assert await subscribers(redis, "t:room", not sharded) == 0
        assert await subscribers(redis, "brioche:room", sharded) == 0

        # Something else on the channel is not a brioche message: no client sees it.
        await asyncio.to_thread(redis.cli, "SPUBLISH" if sharded else "PUBLISH", "t:room", "not from brioche")
        await two.client.send("pub room hello")
        await until(lambda: one.messages == ["hello"] and three.messages == ["hello"], "hello on the first server")
        assert two.messages == []
        assert first.stats()["redis_received"] == 1
        await published(second.stats, 1)

        await one.client.close()
        await until(lambda: first.subscriber_count("room") == 1, "the first server to see one leave")
        await settled(first, "marker2")
        assert await subscribers(redis, "t:room", sharded) == 2
        await three.client.send("unsub room")
        await until(room_count(1), "the first server to unsubscribe")
        await two.client.close()
        await until(room_count(0), "the second server to unsubscribe")
        assert first.subscriber_count("room") == second.subscriber_count("room") == 0

        # The topic's first subscriber again, after its last left: subscribed again, and
        # delivered to.
        again = await clients(ws_url(first, "/ws?room"))
        await until(room_count(1), "the first server to subscribe again")
        second.publish("room", "again")
        await until(lambda: again.messages == ["again"], "a publish through the renewed subscription")

        # A new subscriber right after the last left, before Redis heard of it: whether the
        # link takes the two changes in one batch or in two, it ends subscribed, not deaf.
        await again.client.close()
        await until(lambda: first.subscriber_count("room") == 0, "the first server to see the last one leave")
        replacement = await clients(ws_url(first, "/ws?room"))
        await until(lambda: first.subscriber_count("room") == 1, "the replacement to subscribe")
        await settled(first, "marker3")
        assert await subscribers(redis, "t:room", sharded) == 1
        second.publish("room", "replaced")
        await until(lambda: replacement.messages == ["replaced"], "a publish to the replacement")
    finally:
        await first.stop(close_active_connections=True)
        await second.stop(close_active_connections=True)


def _equals(redis: Redis, channel: str, count: int, sharded: bool = False) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await subscribers(redis, channel, sharded) == count

    return check


@pytest.mark.once
async def test_unreachable_redis_keeps_local_delivery_and_logs_once(
    serve: ServeFn, clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="brioche.redis")
    redis = Redis()  # not started: nothing listens on its port yet
    srv = await serve(topics_config(), pubsub_redis=redis.url)
    subscriber = await clients(ws_url(srv, "/ws?news"))
    await until(lambda: any(r.name == "brioche.redis" for r in caplog.records), "the outage to be logged")
    # Its on_open subscribes it on the loop, which may not have run it when the client has its 101.
    await until(lambda: srv.subscriber_count("news") == 1, "the subscriber's on_open")
    for i in range(100):
        assert srv.publish("news", f"n{i}") == MessageSent(len(f"n{i}"))
    await until(lambda: len(subscriber.messages) == 100, "local delivery")
    assert subscriber.messages == [f"n{i}" for i in range(100)]
    stats = srv.stats()
    assert (stats["redis_connected"], stats["redis_published"], stats["redis_publishes_lost"]) == (0, 0, 100)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "brioche.redis"]

    try:
        await asyncio.to_thread(redis.start)
        await until(lambda: srv.stats()["redis_connected"] == 1, "the core to connect", 5)
        await until(_equals(redis, "brioche:news", 1), "the subscription made on connecting")
        srv.publish("news", "after")
        await until(lambda: srv.stats()["redis_published"] == 1, "a publish through Redis")
        # The "back" line reaches `logging` through the loop, after the counters have moved;
        # taken before the kill below, which makes its own "down" line.
        await until(lambda: len(lines()) >= 2, "the reconnection to be logged")
        logged = lines()
    finally:
        redis.kill()
    assert len(logged) == 2 and "is down" in logged[0] and "is back" in logged[1], logged


async def test_namespaces_keep_apart_only_what_the_docs_say(
    redis: Redis, started: list[brioche.Server[Any]], clients: Callable[[str], Awaitable[Collector]]
) -> None:
    """A channel is namespace + topic, and Redis pub/sub ignores the URL's db: namespace ``chat2``
    with topic ``x`` reached namespace ``chat``'s topic ``2x``, and apps on ``/1`` and ``/2``
    shared topics, which the docs did not say. They now say both, and that namespaces ending in a
    separator none has elsewhere (``chat:``, ``chat2:``) are kept apart; this holds them to it."""
    doc = server.Config.pubsub_redis.__doc__ or ""
    said = " ".join(doc.split())
    assert "whatever the URL's db (``/1`` and ``/2`` share them)" in said
    assert "only if none of their namespaces is a prefix of another's" in said
    assert "``chat:`` and ``chat2:`` are" in said

    async def serve_on(db: int, namespace: str) -> brioche.Server[Any]:
        config = server.handler(upgrade_ws_path).hostname("127.0.0.1").port(0).websocket(topics_config())
        srv = await serve_config(config.pubsub_redis(f"{redis.url}/{db}", namespace=namespace), started)
        await until(lambda: srv.stats()["redis_connected"] == 1, f"the link of {namespace!r} on /{db}")
        return srv

    chat, chat2 = await serve_on(1, "chat"), await serve_on(2, "chat2")
    colon, colon2, colon_db2 = await serve_on(1, "chat:"), await serve_on(1, "chat2:"), await serve_on(2, "chat:")
    on_2x, on_x = await clients(ws_url(chat, "/ws?2x")), await clients(ws_url(colon, "/ws?x"))
    await until(_equals(redis, "chat2x", 1), "the subscription to chat2x")
    await until(_equals(redis, "chat:x", 1), "the subscription to chat:x")
    chat2.publish("x", "from chat2, topic x, db 2")
    await until(lambda: on_2x.messages == ["from chat2, topic x, db 2"], "chat's topic 2x to get it")
    # Answered by Redis, so delivered (to nobody) before the publish after it.
    colon2.publish("x", "from chat2:, topic x")
    await published(colon2.stats, 1)
    colon_db2.publish("x", "from chat:, topic x, db 2")
    await until(lambda: on_x.messages == ["from chat:, topic x, db 2"], "chat:'s topic x to get db 2's")
    assert on_2x.messages == ["from chat2, topic x, db 2"]


@pytest.mark.parametrize(
    ("credentials", "said"),
    [
        ("", "is down (cannot connect: NOAUTH HELLO must be called with the client already authenticated"),
        (":not-the-password@", "is down (cannot connect: WRONGPASS invalid username-password pair or user is disabled."),
        # The channel alone: the link stays up (test_a_channel_redis_refuses_is_refused_alone).
        ("listener:listener-password@", "refused the channel brioche:news (NOPERM"),
    ],
    ids=["no-password", "wrong-password", "no-channel-allowed"],
)
@pytest.mark.once
async def test_what_redis_refused_is_in_the_line_that_says_it_is_down(
    redis: Redis, serve: ServeFn, clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture,
    credentials: str, said: str,
) -> None:
    """A URL without the password, with a wrong one, or of an ACL user allowed no channel: the
    line said only "cannot connect" or "subscribe failed", the same as a Redis that is not
    there. It now says what Redis answered, its error code first, and never the password."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    # Redis 7's default for a new user is no channel (acl-pubsub-default resetchannels).
    user = ["ACL", "SETUSER", "listener", "on", ">listener-password", "~*", "+@all", "resetchannels"]
    assert await asyncio.to_thread(redis.cli, *user) == ["OK"]
    assert await asyncio.to_thread(redis.cli, "CONFIG", "SET", "requirepass", "the-password") == ["OK"]
    srv = await serve(topics_config(), pubsub_redis=f"redis://{credentials}127.0.0.1:{redis.port}")
    if credentials.startswith("listener"):
        # Let in, then refused the channel: the subscription made once the link is up.
        await until(lambda: srv.stats()["redis_connected"] == 1, "the link to Redis")
    await clients(ws_url(srv, "/ws?news"))
    await until(lambda: log_lines(caplog, "brioche.redis") != [], "the outage to be logged")
    [(level, line)] = log_lines(caplog, "brioche.redis")
    assert level == logging.WARNING
    assert line.startswith(f"Redis pub/sub at 127.0.0.1:{redis.port} {said}"), line
    assert "password" not in line.replace("username-password", ""), line


@pytest.mark.once
@pytest.mark.parametrize("mib", [30, 40])
async def test_a_publish_too_large_for_redis_is_lost_here_not_for_every_subscriber(
    redis: Redis, serve: ServeFn, peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture, mib: int,
) -> None:
    """Redis disconnects a subscriber whose output buffer passes 32 MiB (its default
    client-output-buffer-limit for pub/sub), counting what jemalloc rounded the reply up to: a
    message of more than 28 MiB cut the other process's link, which lost what came meanwhile
    and logged only "Redis is down". Over 24 MiB it is now not sent to Redis: counted as lost
    and logged, and the link, and what follows, carry on. 30 MiB: under the 32 MiB less 4 KiB
    allowed before, and cut by Redis 7.0."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    srv = await serve(topics_config(), pubsub_redis=redis.url)
    other = await peer(redis.url)
    remote = await clients(other.url("/ws?big"))
    control = await connect(other.url(), open_timeout=5)
    await until(_equals(redis, "brioche:big", 1), "the other process to subscribe")
    # Before its link is up a publish here is lost at once, whatever its size.
    await until(lambda: srv.stats()["redis_connected"] == 1, "this process's link to Redis")
    # No subscriber here: the status is this process's (nobody), the publish goes to Redis.
    assert srv.publish("big", "x" * (mib * 1024 * 1024)) == MessageDropped()
    srv.publish("big", "after")
    await until(lambda: remote.messages == ["after"], "the next publish to cross Redis")
    stats = srv.stats()
    assert (stats["redis_publishes_lost"], stats["redis_connected"]) == (1, 1)
    await published(srv.stats, 1)
    assert (await peer_stats(control))["redis_connected"] == 1
    await until(lambda: any(r.levelno == logging.WARNING for r in caplog.records), "the warning")
    assert [r.getMessage() for r in caplog.records if r.name == "brioche.redis"] == [
        "a publish over 24 MiB was not sent to Redis: Redis would disconnect every subscriber "
        "of its topic (client-output-buffer-limit pubsub); other processes miss it"
    ]
    await control.close()


class ThrottledProxy:
    """A TCP proxy on 127.0.0.1 to ``port`` that carries at most ``rate`` bytes a second towards
    it and ``down_rate`` back (``None``: at once): a slow link to Redis that works."""

    def __init__(self, port: int, rate: float | None, down_rate: float | None = None) -> None:
        self.target = port
        self.rate = rate
        self.down_rate = down_rate
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        for pump in (self._pump(reader, up_writer, self.rate), self._pump(up_reader, writer, self.down_rate)):
            task = asyncio.ensure_future(pump)
            self.tasks.add(task)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float | None) -> None:
        """Copy until end of file, each chunk sent only once the chunks before it have had their
        time at ``rate`` (pacing, from the last chunk on: time idle earns no burst)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        try:
            while chunk := await reader.read(64 * 1024):
                if rate is not None:
                    due = max(due, loop.time()) + len(chunk) / rate
                    await asyncio.sleep(due - loop.time())
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()


@pytest.mark.once
async def test_a_slow_link_to_redis_is_not_taken_for_a_stalled_one(
    redis: Redis, serve: ServeFn, peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture,
) -> None:
    """40 publishes of 1 MB through a link to Redis that carries 10 MB a second, working: the 2 s
    Redis was given to answer ran from the first byte of a pipeline of all that had queued
    (39 MB) to its last answer, so the link was given up as stalled after 2.2 s and 38 or 39
    were counted lost, although Redis had delivered 19 or 20 of the 40 to the other process. A
    pipeline now holds at most 1 MiB, with 2 s more for each MiB of it: the 40 are published,
    none lost, and all arrive."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    proxy = ThrottledProxy(redis.port, 10e6)
    port = await proxy.start()
    try:
        srv = await serve(topics_config(), pubsub_redis=f"redis://127.0.0.1:{port}")
        other = await peer(redis.url)
        remote = await clients(other.url("/ws?big"))
        await until(_equals(redis, "brioche:big", 1), "the other process to subscribe")
        await until(lambda: srv.stats()["redis_connected"] == 1, "this process's link to Redis")
        count, size = 40, 1_000_000
        for i in range(count):
            srv.publish("big", f"{i:02d}" + "x" * (size - 2))

        def answered() -> bool:
            stats = srv.stats()
            return stats["redis_published"] + stats["redis_publishes_lost"] == count

        took = await until(answered, "Redis to answer the 40 publishes", 60)
        await until(lambda: len(remote.messages) == count, "the 40 at the other process", 30)
        assert [m[:2] for m in remote.messages] == [f"{i:02d}" for i in range(count)]
        stats = srv.stats()
        assert (stats["redis_published"], stats["redis_publishes_lost"]) == (count, 0), took
        # 40 MB at 10 MB/s: the link was slow, and it stayed up.
        assert took > 2, took
        assert srv.stats()["redis_connected"] == 1
        assert log_lines(caplog, "brioche.redis") == []
    finally:
        await proxy.close()


@pytest.mark.once
async def test_a_link_busy_bringing_messages_is_not_taken_for_a_stalled_one(
    redis: Redis, serve: ServeFn, peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture,
) -> None:
    """9 messages of 1 MB from another process, through a link from Redis that carries 1 MB a
    second: the link's PING, 5 s in, was answered behind the messages still on the way, more
    than 2 s later, so the link was declared down ("no answer to PING: timed out") and the
    messages on the wire were lost with the connection. Messages arriving now prove the link
    alive: all 9 arrive, in order, and nothing is logged."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    proxy = ThrottledProxy(redis.port, None, 1e6)
    port = await proxy.start()
    try:
        srv = await serve(topics_config(), pubsub_redis=f"redis://127.0.0.1:{port}")
        here = await clients(ws_url(srv, "/ws?big"))
        other = await peer(redis.url)
        control = await connect(other.url(), open_timeout=5, max_size=None)
        await until(_equals(redis, "brioche:big", 1), "this process to subscribe")
        assert (await peer_stats(control))["redis_connected"] == 1
        count, size = 9, 1_000_000
        for i in range(count):
            await control.send(f"pub big {i}" + "x" * (size - 1))
        await until(lambda: len(here.messages) == count, "the 9 through the slow link", 40)
        assert [m[:1] for m in here.messages] == [str(i) for i in range(count)]
        stats = srv.stats()
        assert (stats["redis_received"], stats["redis_received_lost"], stats["redis_connected"]) == (count, 0, 1)
        assert log_lines(caplog, "brioche.redis") == []
        await control.close()
    finally:
        await proxy.close()


@pytest.mark.once
async def test_a_user_refused_ping_keeps_its_link(
    redis: Redis, serve: ServeFn, peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture,
) -> None:
    """An ACL user allowed pub/sub and nothing else (``+@pubsub`` has no PING): Redis's refusal
    of the link's PING is an answer, so the link is up. It was declared down ("no answer to
    PING: NOPERM ...") at every PING, 5 s apart, and messages were lost at each reconnection."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    user = ["ACL", "SETUSER", "pubsub-only", "on", ">pubsub-password", "resetchannels", "&brioche:*",
            "-@all", "+@pubsub", "+hello", "+auth"]
    assert await asyncio.to_thread(redis.cli, *user) == ["OK"]
    srv = await serve(topics_config(), pubsub_redis=f"redis://pubsub-only:pubsub-password@127.0.0.1:{redis.port}")
    here = await clients(ws_url(srv, "/ws?t"))
    other = await peer(redis.url)
    control = await connect(other.url(), open_timeout=5)
    await until(_equals(redis, "brioche:t", 1), "this process to subscribe")

    async def ping_refused() -> bool:
        return "ping" in await asyncio.to_thread(redis.cli, "ACL", "LOG")

    await until(ping_refused, "the link's first PING, refused", 10)
    await control.send("pub t after the ping")
    await until(lambda: here.messages == ["after the ping"], "a message after the refused PING")
    assert srv.stats()["redis_connected"] == 1
    assert log_lines(caplog, "brioche.redis") == []
    await control.close()


@pytest.mark.once
async def test_a_channel_redis_refuses_is_refused_alone(
    redis: Redis, serve: ServeFn, peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture,
) -> None:
    """An ACL user allowed only the channels ``brioche:allowed*``: Redis's refusal of
    ``brioche:secret`` (NOPERM) failed the whole pipeline that carried it, of subscribes or of
    publishes, and the link went down, came back and went down again, this process deaf on
    every topic meanwhile. Now ``secret`` alone is refused, in one WARNING that quotes Redis,
    and its publishes are counted lost, while ``allowed`` crosses both ways."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    user = ["ACL", "SETUSER", "limited", "on", ">limited-password", "~*", "+@all", "resetchannels",
            "&brioche:allowed*"]
    assert await asyncio.to_thread(redis.cli, *user) == ["OK"]
    srv = await serve(topics_config(), pubsub_redis=f"redis://limited:limited-password@127.0.0.1:{redis.port}")
    other = await peer(redis.url)
    await until(lambda: srv.stats()["redis_connected"] == 1, "the link to Redis")
    here = await clients(ws_url(srv, "/ws?allowed,secret"))
    there = await clients(other.url("/ws?allowed,secret"))
    control = await connect(other.url(), open_timeout=5)
    await until(_equals(redis, "brioche:allowed", 2), "both processes to subscribe to allowed")
    # The other process's user may: its link subscribes to secret too.
    await until(_equals(redis, "brioche:secret", 1), "the other process to subscribe to secret")

    await control.send("pub secret s-there")
    await control.send("pub allowed a-there")
    await until(lambda: "a-there" in here.messages, "allowed to cross from the other process", 10)
    # Redis delivers one publisher's messages in order: secret's would have come first.
    assert here.messages == ["a-there"]
    srv.publish("secret", "s-here")
    srv.publish("allowed", "a-here")
    await until(lambda: there.messages[-1:] == ["a-here"], "allowed to cross to the other process", 10)
    assert there.messages == ["s-there", "a-there", "a-here"]

    def answered() -> bool:
        stats = srv.stats()
        return stats["redis_published"] + stats["redis_publishes_lost"] == 2

    await until(answered, "Redis to answer the 2 publishes")
    stats = srv.stats()
    assert (stats["redis_published"], stats["redis_publishes_lost"], stats["redis_connected"]) == (1, 1, 1)
    lines = log_lines(caplog, "brioche.redis")
    assert len(lines) == 1, lines
    [(level, line)] = lines
    assert level == logging.WARNING
    assert line.startswith(f"Redis pub/sub at 127.0.0.1:{redis.port} refused the channel brioche:secret (NOPERM "), line
    await control.close()


@pytest.mark.once
async def test_a_refusal_that_comes_during_an_outage_is_logged_once(
    redis: Redis, serve: ServeFn, caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis's password changed while the link was up, then the link cut: the one line said
    "connection lost", and the WRONGPASS of every reconnection after it was never logged. A
    refusal that comes during an outage is now a line of its own, once; the transport's reasons
    (a restart's "connection lost", then "connection refused") still make one line."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    assert await asyncio.to_thread(redis.cli, "CONFIG", "SET", "requirepass", "first") == ["OK"]
    srv = await serve(topics_config(), pubsub_redis=f"redis://:first@127.0.0.1:{redis.port}")
    await until(lambda: srv.stats()["redis_connected"] == 1, "the link to Redis")
    assert await asyncio.to_thread(redis.cli, "-a", "first", "--no-auth-warning", "CONFIG", "SET", "requirepass", "second") == ["OK"]

    def refused() -> int:
        """Logins Redis refused (its ACL LOG: entries of reason "auth", each with its count)."""
        entries = " ".join(redis.cli("-a", "second", "--no-auth-warning", "ACL", "LOG")).split("count ")[1:]
        return sum(int(entry.split()[0]) for entry in entries if " reason auth " in entry)

    # Every client but redis-cli itself, authenticated before the change: the link.
    killed = await asyncio.to_thread(redis.cli, "-a", "second", "--no-auth-warning", "CLIENT", "KILL", "USER", "default")
    assert killed == ["1"]
    # Three reconnections refused: the refusal is logged once, not at each.
    await until(lambda: asyncio.to_thread(lambda: refused() >= 3), "three refused reconnections")
    lines = log_lines(caplog, "brioche.redis")
    down = f"Redis pub/sub at 127.0.0.1:{redis.port} is down"
    assert [level for level, _ in lines] == [logging.WARNING] * 2, lines
    assert lines[0][1].startswith(f"{down} (connection lost): "), lines
    assert lines[1][1].startswith(f"{down} (cannot connect: WRONGPASS invalid username-password pair"), lines
    assert await asyncio.to_thread(redis.cli, "-a", "second", "--no-auth-warning", "CONFIG", "SET", "requirepass", "first") == ["OK"]
    await until(lambda: srv.stats()["redis_connected"] == 1, "the link back")
    back = f"Redis pub/sub at 127.0.0.1:{redis.port} is back (resubscribed)"
    assert [(level, line[: len(back)]) for level, line in log_lines(caplog, "brioche.redis")[2:]] == [(logging.INFO, back)]


@pytest.mark.once
async def test_a_rediss_url_to_a_port_without_tls_says_so(
    redis: Redis, serve: ServeFn, caplog: pytest.LogCaptureFixture,
) -> None:
    """``rediss://`` to a Redis without TLS: it waits for the end of a line that a TLS handshake
    does not send, and the line said only "cannot connect: timed out"."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    await serve(topics_config(), pubsub_redis=f"rediss://127.0.0.1:{redis.port}")
    await until(lambda: log_lines(caplog, "brioche.redis") != [], "the outage to be logged")
    [(level, line)] = log_lines(caplog, "brioche.redis")
    assert level == logging.WARNING
    assert "(cannot connect: timed out; is that port Redis's TLS port?)" in line, line


@pytest.mark.once
async def test_the_url_s_db_is_ignored(
    redis: Redis, serve: ServeFn, peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]],
) -> None:
    """Pub/sub ignores the db, as the docs say: the link sent the URL's as ``SELECT``, so
    ``/99`` (past a standalone Redis's 16) never connected, nor did any db on a cluster, which
    refuses ``SELECT``."""
    srv = await serve(topics_config(), pubsub_redis=f"redis://127.0.0.1:{redis.port}/99")
    here = await clients(ws_url(srv, "/ws?t"))
    other = await peer(redis.url)
    control = await connect(other.url(), open_timeout=5)
    await until(_equals(redis, "brioche:t", 1), "this process to subscribe")
    await control.send("pub t through db 99")
    await until(lambda: here.messages == ["through db 99"], "the message from the other process")
    assert srv.stats()["redis_connected"] == 1
    await control.close()


async def test_settings_are_checked_and_stats_have_the_redis_keys(serve: ServeFn) -> None:
    base: server.Config[Any] = server.handler(lambda request, srv: None)
    with pytest.raises(ValueError, match="redis:// or rediss://"):
        base.pubsub_redis("http://127.0.0.1:6379")
    with pytest.raises(TypeError):
        base.pubsub_redis("redis://127.0.0.1", sharded="yes")  # type: ignore[arg-type]
    assert server.pubsub_redis(base, "redis://h:1", namespace="x:") == base.pubsub_redis("redis://h:1", namespace="x:")
    assert base.pubsub_redis("rediss://h").pubsub_redis_value == server.RedisPubSub("rediss://h", False, "brioche:")
    # At the setter, not at serve(): with workers(n), each worker failed on it, and was
    # restarted until the supervisor gave up.
    with pytest.raises(ValueError, match="^invalid Redis URL: "):
        base.pubsub_redis("redis://127.0.0.1:notaport")
    # A config printed (a log line, a traceback) does not show the password.
    printed = repr(base.pubsub_redis("redis://app:s3cret@h:1/0"))
    assert "s3cret" not in printed and "redis://app:***@h:1/0" in printed, printed
    # The client cannot skip the certificate check: it failed at every connection, logged.
    with pytest.raises(ValueError, match=r"^a rediss:// URL's #insecure is not supported: "):
        base.pubsub_redis("rediss://127.0.0.1:6379/#insecure")
    srv = await serve()
    stats = srv.stats()
    assert {k: stats[k] for k in stats if k.startswith("redis_")} == {  # type: ignore[literal-required]
        "redis_published": 0,
        "redis_publishes_lost": 0,
        "redis_received": 0,
        "redis_received_lost": 0,
        "redis_connected": 0,
    }


async def test_workers_share_topics_through_redis_once(redis: Redis) -> None:
    """``workers(2)`` with ``pubsub_redis``: publishes go through Redis, not also the relay."""
    sup = AppSupervisor(2, redis.url)
    try:
        clients = await clients_covering(sup.port, sup.pids, 2)
        await until(_equals(redis, "brioche:all", 2), "both workers to subscribe")
        sender = clients[0][0]
        messages = [f"w{i}" for i in range(100)]
        for message in messages:
            await sender.send(message)
        # In order and once each on the other worker (through Redis) and on the sender's own
        # (publish_to_self: local); a second copy through the relay would come before "end".
        # Every client reads all of it: a websockets client that leaves more than its queue
        # unread stops reading its socket, and its close then waits out close_timeout (10 s).
        await sender.send("end")
        for ws, _ in clients:
            assert await receive(ws, 101) == messages + ["end"]
        for ws, _ in clients:
            await ws.close()
    finally:
        sup.stop()


def tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 it signed, made with the openssl CLI: (ca, cert, key)."""
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=brioche test CA",
         "-keyout", str(ca_key), "-out", str(ca)],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr)],
        ["x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
         "-days", "1", "-extfile", str(ext), "-out", str(cert)],
    ):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
    return ca, cert, key


@pytest.mark.once
@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI to make a certificate")
async def test_rediss_shares_topics_over_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clients: Callable[[str], Awaitable[Collector]]
) -> None:
    ca, cert, key = tls_files(tmp_path)
    # rustls-native-certs reads the trusted roots from here when it is set.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    redis = Redis(tls=(ca, cert, key))
    redis.start()
    config: server.Config[Any] = server.handler(lambda request, srv: server.upgrade(srv, request, [], request.query or None, server.bad_request))
    config = config.websocket(topics_config()).hostname("127.0.0.1").port(0).pubsub_redis(redis.url)
    first, second = await config.serve(), await config.serve()
    try:
        subscriber = await clients(ws_url(second, "/ws?secure"))
        for srv in (first, second):
            await until(lambda: srv.stats()["redis_connected"] == 1, "a TLS connection to Redis")
        # The subscription made after `second` connected reaches Redis on its own; Redis drops a
        # publish that comes before it (at-most-once), so the test waits until Redis has it.
        await until(_equals(redis, "brioche:secure", 1), "the subscription to reach Redis over TLS")
        first.publish("secure", "over TLS")
        await until(lambda: subscriber.messages == ["over TLS"], "the message through rediss://")
        assert second.stats()["redis_received"] == 1
    finally:
        await first.stop(close_active_connections=True)
        await second.stop(close_active_connections=True)
        redis.kill()
