"""Sharded pub/sub on a real Redis Cluster of three masters (``pubsub_redis(sharded=True)``).

Each test starts its own cluster: three ``redis-server`` processes in cluster mode on free ports
(client and bus ports both chosen, so nothing depends on port + 10000), each in a directory of
its own under the test's temp dir, slots assigned by hand (``CLUSTER ADDSLOTSRANGE``) and the
nodes introduced with ``CLUSTER MEET``. Brioche is given the URL of the first node only: the
other masters are found through the cluster.

``cluster_of`` makes the variants: nodes that listen on TLS only (``rediss://``, certificates
from trustme), and a replica for each master, for failovers.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.client import connect

import brioche
from brioche import MessageDropped, MessageSent, server
from conftest import free_port, log_lines, serve_config, upgrade_ws_path, ws_url
from test_redis_pubsub import (
    Collector,
    Peer,
    Redis,
    ThrottledProxy,
    check_recovery,
    clients,
    peer,
    peer_stats,
    published,
    redis,
    start_redis_server,
    topics_config,
    until,
)

__all__ = ["clients", "peer", "redis"]  # fixtures, used by name

# All the engine's (the crate's cluster connection): `once` (pyproject.toml's markers).
pytestmark = [
    pytest.mark.skipif(
        shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
        reason="redis-server is not installed (make system-deps)",
    ),
    pytest.mark.once,
]

SLOTS = 16384
# The three masters' slots, as redis-cli --cluster create would split them.
RANGES = [(0, 5460), (5461, 10922), (10923, 16383)]
NAMESPACE = "c:"
# After a failover (every node sees the replica as master), the seconds until the other process
# has the topic's messages again. The core's worst case: a subscribe still trying the dead
# master on the slot map from before the failover (its timeout, 2 s), its backoff (at most 1 s),
# then a connect and a resubscribe; the rest is room for a loaded machine.
RECOVERY_BOUND = 5


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), Redis Cluster's key hash."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def slot(key: str) -> int:
    """The hash slot of ``key`` (no hash tags in these tests' names)."""
    assert "{" not in key
    return crc16(key.encode()) % SLOTS


def owner(key: str) -> int:
    """Which of the three masters serves ``key``'s slot."""
    return next(i for i, (low, high) in enumerate(RANGES) if low <= slot(key) <= high)


def topics_per_master(count: int) -> list[str]:
    """``count`` topics on each master, in master order: t0, t1, ... picked by their channel's slot."""
    chosen: list[list[str]] = [[] for _ in RANGES]
    for i in range(1000):
        topic = f"t{i}"
        if len(chosen[owner(NAMESPACE + topic)]) < count:
            chosen[owner(NAMESPACE + topic)].append(topic)
        if all(len(c) == count for c in chosen):
            return [topic for per_master in chosen for topic in per_master]
    raise AssertionError("1,000 names did not cover three masters")


def test_crc16_matches_redis_reference() -> None:
    # The check value of CRC16/XMODEM, and the example of the Redis Cluster specification.
    assert crc16(b"123456789") == 0x31C3
    assert slot("foo") == 12182


class Tls:
    """A CA and a certificate for 127.0.0.1 it signs (trustme), as the PEM files redis-server reads."""

    def __init__(self, directory: Path) -> None:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1")
        self.ca_file, self.cert_file, self.key_file = directory / "ca.pem", directory / "node.pem", directory / "node.key"
        ca.cert_pem.write_to_path(str(self.ca_file))
        leaf.cert_chain_pems[0].write_to_path(str(self.cert_file))
        leaf.private_key_pem.write_to_path(str(self.key_file))


class Node:
    """One ``redis-server`` in cluster mode, killed and started again at will, same ports and dir.

    With ``tls``, it listens on its TLS port only (``port`` is that port), and the cluster bus and
    replication between nodes are TLS too; clients are not asked for a certificate.
    """

    def __init__(self, directory: Path, tls: Tls | None = None, node_timeout_ms: int = 2000) -> None:
        self.port = free_port()
        self.bus_port = free_port()
        self.directory = directory
        self.tls = tls
        self.node_timeout_ms = node_timeout_ms
        directory.mkdir(parents=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.id = ""
        self.started = False
        # The port the cluster lists it at, when not its own (`announced_behind`).
        self.announced: int | None = None

    @property
    def listed_port(self) -> int:
        return self.announced or self.port

    def start(self) -> None:
        """Start it and wait for its answer (a first start may move to other ports)."""
        self.process = start_redis_server(self.arguments, self.cli, self.move, first=not self.started)
        self.started = True
        self.id = self.cli("CLUSTER", "MYID")[0]

    def arguments(self) -> list[str]:
        if self.tls is None:
            listen = ["--port", str(self.port)]
        else:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cluster", "yes", "--tls-replication", "yes",
                      "--tls-cert-file", str(self.tls.cert_file), "--tls-key-file", str(self.tls.key_file),
                      "--tls-ca-cert-file", str(self.tls.ca_file), "--tls-auth-clients", "no"]
        return [*listen, "--cluster-port", str(self.bus_port),
                "--bind", "127.0.0.1", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms), "--dir", str(self.directory), "--save", "",
                "--appendonly", "no",
                # A replica's first sync starts at once instead of waiting 5 s for other replicas to join it.
                "--repl-diskless-sync-delay", "0"]

    def move(self) -> None:
        self.port, self.bus_port = free_port(), free_port()

    def kill(self) -> None:
        """SIGKILL: the node gets no chance to tell anyone."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self.process = None

    def cli_text(self, *args: str) -> str:
        tls = [] if self.tls is None else ["--tls", "--cacert", str(self.tls.ca_file)]
        done = subprocess.run(["redis-cli", *tls, "-p", str(self.port), *args], capture_output=True, text=True, timeout=5)
        return done.stdout

    def cli(self, *args: str) -> list[str]:
        return self.cli_text(*args).split()

    def info(self, section: str) -> dict[str, str]:
        fields = (line.partition(":") for line in self.cli("INFO", section) + self.cli("CLUSTER", "INFO"))
        return {key: value for key, _, value in fields if value}

    def replicas_seen(self) -> set[tuple[str, str]]:
        """(replica id, its master's id) for each replica ``CLUSTER NODES`` lists here."""
        lines = (line.split() for line in self.cli_text("CLUSTER", "NODES").splitlines())
        return {(f[0], f[3]) for f in lines if len(f) > 3 and "slave" in f[2].split(",")}


class Cluster:
    """Three masters (``nodes[0:3]``, serving ``RANGES``) and, with ``replicas``, a replica of each
    (``nodes[3 + i]`` of ``nodes[i]``)."""

    def __init__(self, directory: Path, tls: Tls | None = None, replicas: bool = False, node_timeout_ms: int = 2000) -> None:
        count = len(RANGES) * (2 if replicas else 1)
        self.nodes = [Node(directory / f"node{i}", tls, node_timeout_ms) for i in range(count)]
        self.scheme = "redis" if tls is None else "rediss"

    @property
    def url(self) -> str:
        """The first node's URL: known once it has started (a first start may move it)."""
        return f"{self.scheme}://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        # Distinct config epochs before the nodes meet, as `redis-cli --cluster create` gives them:
        # left at 0, they collide, and which claim to a slot wins stays undecided for a while.
        for epoch, node in enumerate(self.nodes, 1):
            assert node.cli("CLUSTER", "SET-CONFIG-EPOCH", str(epoch)) == ["OK"]
        for node, (low, high) in zip(self.nodes, RANGES):
            assert node.cli("CLUSTER", "ADDSLOTSRANGE", str(low), str(high)) == ["OK"]
        for node in self.nodes[1:]:
            assert self.nodes[0].cli("CLUSTER", "MEET", "127.0.0.1", str(node.port), str(node.bus_port)) == ["OK"]
        self.wait_ok()
        masters, replicas = self.nodes[: len(RANGES)], self.nodes[len(RANGES) :]
        for replica, master in zip(replicas, masters):
            assert replica.cli("CLUSTER", "REPLICATE", master.id) == ["OK"]
        # A failover needs the replica in sync (or it holds data too old to be elected) and the
        # masters that vote to know whose replica it is.
        expected = {(replica.id, master.id) for replica, master in zip(replicas, masters)}
        deadline = time.monotonic() + 30
        while not all(r.info("replication").get("master_link_status") == "up" for r in replicas) or not all(
            node.replicas_seen() == expected for node in self.nodes
        ):
            assert time.monotonic() < deadline, "the replicas were not in sync and known to all within 30 s"
            time.sleep(0.05)

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every running node knows every node, sees every slot served and the cluster up."""
        deadline = time.monotonic() + timeout
        while True:
            infos = [node.info("cluster") for node in self.nodes if node.process is not None]
            if all(
                i.get("cluster_state") == "ok"
                and i.get("cluster_known_nodes") == str(len(self.nodes))
                and i.get("cluster_slots_ok") == str(SLOTS)
                for i in infos
            ):
                return
            assert time.monotonic() < deadline, f"cluster not ok within {timeout} s: {infos}"
            time.sleep(0.05)

    def wait_promoted(self, heir: Node, timeout: float = 10) -> None:
        """Until every running node says ``heir``, a replica, now serves its master's slots, and
        the cluster is whole again."""
        low, high = RANGES[self.nodes.index(heir) - len(RANGES)]
        deadline = time.monotonic() + timeout
        while not all(self.slot_owner_seen_by(n, s) == heir.port for n in self.nodes if n.process for s in (low, high)):
            assert time.monotonic() < deadline, f"the replica was not promoted within {timeout} s"
            time.sleep(0.05)
        self.wait_ok(timeout)

    def node_of(self, topic: str) -> Node:
        return self.nodes[owner(NAMESPACE + topic)]

    def shard_subscribers(self, topic: str) -> int:
        """Connections subscribed to ``topic``'s channel, asked of the master that serves it."""
        out = self.node_of(topic).cli("PUBSUB", "SHARDNUMSUB", NAMESPACE + topic)
        return int(out[1])

    def slot_owner_seen_by(self, node: Node, slot: int) -> int | None:
        """The port of the master that ``node`` says serves ``slot`` (``CLUSTER NODES``)."""
        for line in node.cli_text("CLUSTER", "NODES").splitlines():
            fields = line.split()
            for token in fields[8:]:
                if token.startswith("["):
                    continue  # a slot being migrated or imported
                low, _, high = token.partition("-")
                if int(low) <= slot <= int(high or low):
                    return int(fields[1].split("@")[0].rpartition(":")[2])
        return None

    def move_slot(self, slot: int, source: Node, target: Node) -> None:
        """Give ``slot`` (with no keys) from ``source`` to ``target``, as a resharding does."""
        source_id, target_id = source.cli("CLUSTER", "MYID")[0], target.cli("CLUSTER", "MYID")[0]
        # The new master must hold the cluster's highest epoch, as `redis-cli --cluster reshard`
        # makes sure: otherwise a ping the old master sent before its SETSLOT, still on its way,
        # can win the slot back.
        assert target.cli("CLUSTER", "BUMPEPOCH")[0] in ("BUMPED", "STILL")
        assert target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id) == ["OK"]
        assert source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id) == ["OK"]
        assert source.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot)) == ["0"]
        others = [node for node in self.nodes if node not in (source, target)]
        for node in (target, source, *others):
            assert node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", target_id) == ["OK"]
        deadline = time.monotonic() + 10
        while any(self.slot_owner_seen_by(node, slot) != target.listed_port for node in self.nodes):
            assert time.monotonic() < deadline, "the nodes did not agree on the slot's new master within 10 s"
            time.sleep(0.05)

    def spublish_calls(self) -> list[int]:
        calls = []
        for node in self.nodes:
            stat = node.info("commandstats").get("cmdstat_spublish", "calls=0,")
            calls.append(int(stat.split(",")[0].removeprefix("calls=")))
        return calls


@pytest.fixture
def cluster_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Cluster]]:
    """``cluster_of(tls=True, replicas=True, node_timeout_ms=1000)`` starts a cluster; all are
    killed after the test. With ``tls``, its CA is what rustls trusts, in this process and in the
    peers it starts (rustls-native-certs reads ``SSL_CERT_FILE``)."""
    made: list[Cluster] = []

    def make(tls: bool = False, replicas: bool = False, node_timeout_ms: int = 2000) -> Cluster:
        directory = tmp_path / f"cluster{len(made)}"
        certs = None
        if tls:
            directory.mkdir()
            certs = Tls(directory)
            monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file))
        made.append(Cluster(directory, certs, replicas, node_timeout_ms))
        made[-1].start()
        return made[-1]

    try:
        yield make
    finally:
        for instance in made:
            for node in instance.nodes:
                if node.process is not None:
                    node.kill()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, cluster_of: Callable[..., Cluster]) -> Cluster:
    """Three masters on plain TCP; on TLS only for a test parametrized ``indirect`` with "tls"."""
    return cluster_of(tls=getattr(request, "param", "plain") == "tls")


async def serve_sharded(started: list[brioche.Server[Any]], url: str) -> brioche.Server[Any]:
    config = server.handler(upgrade_ws_path).hostname("127.0.0.1").port(0).websocket(topics_config())
    return await serve_config(config.pubsub_redis(url, sharded=True, namespace=NAMESPACE), started)


def all_subscribed(cluster: Cluster, topics: list[str], count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        counts = await asyncio.gather(*(asyncio.to_thread(cluster.shard_subscribers, t) for t in topics))
        return all(c == count for c in counts)

    return check


@pytest.mark.parametrize("cluster", ["plain", "tls"], indirect=True)
async def test_two_processes_share_topics_on_three_masters_exactly_once_and_in_order(
    cluster: Cluster, started: list[brioche.Server[Any]], peer: Callable[..., Awaitable[Peer]], clients: Callable[[str], Awaitable[Collector]]
) -> None:
    """Topics on every master, the URL of one: fails where MOVED is not followed.

    "tls": ``rediss://`` to a cluster whose nodes listen on TLS ports only, so every connection
    to a master found through the cluster (not only the URL's node) is TLS, checked against the
    test's CA.
    """
    topics = topics_per_master(2)
    assert [owner(NAMESPACE + t) for t in topics] == [0, 0, 1, 1, 2, 2]
    assert len({slot(NAMESPACE + t) for t in topics}) == 6
    for topic in topics:
        assert cluster.nodes[0].cli("CLUSTER", "KEYSLOT", NAMESPACE + topic) == [str(slot(NAMESPACE + topic))]
    query = ",".join(topics)
    srv = await serve_sharded(started, cluster.url)
    other = await peer(cluster.url, NAMESPACE, "sharded")
    a_sub, a_pub = await clients(ws_url(srv, f"/ws?{query}")), await clients(ws_url(srv, f"/ws?{query}"))
    b_sub, b_pub = await clients(other.url(f"/ws?{query}")), await clients(other.url(f"/ws?{query}"))
    b_control = await connect(other.url(), open_timeout=5)
    # One subscription per process, on the master of each channel's slot.
    await until(all_subscribed(cluster, topics, 2), "both processes to subscribe on every master", 15)
    assert srv.stats()["redis_connected"] == 1
    assert (await peer_stats(b_control))["redis_connected"] == 1
    calls_before = await asyncio.to_thread(cluster.spublish_calls)

    count = 1_000
    for i in range(count):
        topic = topics[i % len(topics)]
        await a_pub.client.send(f"pub {topic} a {topic} {i}")
        await b_pub.client.send(f"pub {topic} b {topic} {i}")

    def expected(publisher: str, topic: str) -> list[str]:
        return [f"{publisher} {topic} {i}" for i in range(count) if topics[i % len(topics)] == topic]

    def complete() -> bool:
        return (
            len(a_sub.messages) >= 2 * count
            and len(b_sub.messages) >= 2 * count
            and len(a_pub.messages) >= count
            and len(b_pub.messages) >= count
        )

    await until(complete, "2,000 messages at each subscriber", 60)
    # A marker per topic behind everything each side published on it: a duplicate would have
    # come before it.
    for topic in topics:
        await a_pub.client.send(f"pub {topic} a {topic} end")
        await b_pub.client.send(f"pub {topic} b {topic} end")
    ends = {f"{p} {t} end" for p in "ab" for t in topics}
    await until(lambda: all(ends <= set(c.messages) for c in (a_sub, b_sub)), "markers")
    await until(
        lambda: {f"b {t} end" for t in topics} <= set(a_pub.messages)
        and {f"a {t} end" for t in topics} <= set(b_pub.messages),
        "markers to publishers",
    )
    for subscriber in (a_sub, b_sub):
        assert len(subscriber.messages) == 2 * count + 2 * len(topics)
        for topic in topics:
            for publisher in "ab":
                got = subscriber.starting(f"{publisher} {topic} ")
                assert got == expected(publisher, topic) + [f"{publisher} {topic} end"], (publisher, topic)
    # publish_to_self off: a publisher gets the other process's messages, never its own.
    assert len(a_pub.messages) == len(b_pub.messages) == count + len(topics)
    for topic in topics:
        assert a_pub.starting(f"b {topic} ") == expected("b", topic) + [f"b {topic} end"]
        assert b_pub.starting(f"a {topic} ") == expected("a", topic) + [f"a {topic} end"]
    assert a_pub.starting("a ") == b_pub.starting("b ") == []

    total = count + len(topics)
    await published(srv.stats, total)
    await published(lambda: peer_stats(b_control), total)
    stats = srv.stats()
    assert stats["publishes"] == total
    assert (stats["redis_published"], stats["redis_publishes_lost"], stats["redis_received"]) == (total, 0, total)
    remote_stats = await peer_stats(b_control)
    assert (remote_stats["redis_published"], remote_stats["redis_publishes_lost"]) == (total, 0)
    assert remote_stats["redis_received"] == total
    # Each master got the publishes of its own channels, from both processes, once each.
    calls = [after - before for after, before in zip(await asyncio.to_thread(cluster.spublish_calls), calls_before)]
    per_master = [2 * sum(1 for i in range(count) if owner(NAMESPACE + topics[i % len(topics)]) == m) + 4 for m in range(3)]
    assert calls == per_master
    await b_control.close()


async def test_subscriptions_are_counted_per_process_on_each_master(
    cluster: Cluster, started: list[brioche.Server[Any]], clients: Callable[[str], Awaitable[Collector]]
) -> None:
    """A channel is subscribed, on its own master, only while the process has local subscribers."""
    topics = topics_per_master(1)
    srv = await serve_sharded(started, cluster.url)
    first = [await clients(ws_url(srv, f"/ws?{t}")) for t in topics]
    await until(all_subscribed(cluster, topics, 1), "a subscription on every master", 15)
    second = [await clients(ws_url(srv, f"/ws?{t}")) for t in topics]
    # on_open, which subscribes, runs after the 101 has gone out: the client may be open first.
    await until(lambda: [srv.subscriber_count(t) for t in topics] == [2, 2, 2], "the second sockets' on_open")
    assert [await asyncio.to_thread(cluster.shard_subscribers, t) for t in topics] == [1, 1, 1]
    for client in first:
        await client.client.close()
    await until(lambda: [srv.subscriber_count(t) for t in topics] == [1, 1, 1], "the first sockets to go")
    assert [await asyncio.to_thread(cluster.shard_subscribers, t) for t in topics] == [1, 1, 1]
    for client in second:
        await client.client.close()
    await until(all_subscribed(cluster, topics, 0), "every master to see the channel left")


async def test_a_shard_channel_redis_refuses_is_refused_alone(
    cluster: Cluster, started: list[brioche.Server[Any]], peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture,
) -> None:
    """An ACL user allowed only the channels ``c:t*``, on every master: the refused
    ``SSUBSCRIBE`` of ``c:secret`` (NOPERM) failed the link, which went down and up again in a
    loop, deaf on every master. Now ``secret`` alone is refused, logged once, its publish lost,
    and a topic on each master crosses both ways."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    for node in cluster.nodes:
        user = ["ACL", "SETUSER", "limited", "on", ">limited-password", "~*", "+@all", "resetchannels", "&c:t*"]
        assert await asyncio.to_thread(node.cli, *user) == ["OK"]
    topics = topics_per_master(1)
    query = ",".join([*topics, "secret"])
    url = f"redis://limited:limited-password@127.0.0.1:{cluster.nodes[0].port}"
    srv = await serve_sharded(started, url)
    other = await peer(cluster.url, NAMESPACE, "sharded")
    await until(lambda: srv.stats()["redis_connected"] == 1, "the link to the cluster", 15)
    here = await clients(ws_url(srv, f"/ws?{query}"))
    there = await clients(other.url(f"/ws?{query}"))
    control = await connect(other.url(), open_timeout=5)
    await until(all_subscribed(cluster, topics, 2), "both processes to subscribe on every master", 15)
    # The other process's user may: its link subscribes to secret too.
    await until(all_subscribed(cluster, ["secret"], 1), "the other process to subscribe to secret")

    await control.send("pub secret s-there")
    for topic in topics:
        await control.send(f"pub {topic} {topic}-there")
    await until(lambda: len(here.messages) == len(topics), "each master's topic to cross here", 10)
    assert sorted(here.messages) == sorted(f"{topic}-there" for topic in topics)
    srv.publish("secret", "s-here")
    for topic in topics:
        srv.publish(topic, f"{topic}-here")
    await until(lambda: len(there.messages) == 1 + 2 * len(topics), "each master's topic to cross there", 10)
    assert sorted(there.messages) == sorted(["s-there", *(f"{t}-{side}" for t in topics for side in ("there", "here"))])

    def answered() -> bool:
        stats = srv.stats()
        return stats["redis_published"] + stats["redis_publishes_lost"] == 1 + len(topics)

    await until(answered, "the cluster to answer the publishes")
    stats = srv.stats()
    assert (stats["redis_published"], stats["redis_publishes_lost"], stats["redis_connected"]) == (len(topics), 1, 1)
    lines = log_lines(caplog, "brioche.redis")
    assert len(lines) == 1, lines
    [(level, line)] = lines
    assert level == logging.WARNING
    port = cluster.nodes[0].port
    assert line.startswith(f"Redis pub/sub at 127.0.0.1:{port} refused the channel c:secret (NOPERM "), line
    await control.close()


async def test_a_slot_moved_to_another_master_is_followed_without_an_outage(
    cluster: Cluster,
    started: list[brioche.Server[Any]],
    peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A subscribed channel's slot moves to another master (``CLUSTER SETSLOT``, a resharding).

    The old master ends the slot's subscriptions (a ``sunsubscribe`` push) and answers MOVED to
    its publishes: each process subscribes again on the new master and its publishes follow
    there, with no outage, nothing lost, nothing twice, in order.
    """
    caplog.set_level(logging.INFO, logger="brioche.redis")
    topic = topics_per_master(1)[2]
    moved = slot(NAMESPACE + topic)
    source, target = cluster.nodes[2], cluster.nodes[0]
    assert cluster.node_of(topic) is source
    srv = await serve_sharded(started, cluster.url)
    other = await peer(cluster.url, NAMESPACE, "sharded")
    local = await clients(ws_url(srv, f"/ws?{topic}"))
    remote = await clients(other.url(f"/ws?{topic}"))
    await until(all_subscribed(cluster, [topic], 2), "both processes to subscribe", 15)

    def subscribed_on(node: Node) -> int:
        return int(node.cli("PUBSUB", "SHARDNUMSUB", NAMESPACE + topic)[1])

    for i in range(100):
        srv.publish(topic, f"before {i}")
    await until(lambda: len(remote.messages) == 100, "100 messages before the move")
    await asyncio.to_thread(cluster.move_slot, moved, source, target)

    async def resubscribed() -> bool:
        return await asyncio.to_thread(subscribed_on, target) == 2

    await until(resubscribed, "both processes to subscribe on the new master")
    for i in range(100):
        srv.publish(topic, f"after {i}")
    for i in range(100):
        await remote.client.send(f"pub {topic} back {i}")
    # The peer's socket publishes "back": publish_to_self is off, so it gets only srv's.
    await until(lambda: len(remote.messages) == 200, "the messages after the move")
    await until(lambda: len(local.messages) == 200 + 100, "the other process's messages")
    expected = [f"before {i}" for i in range(100)] + [f"after {i}" for i in range(100)]
    assert remote.messages == expected
    assert local.starting("b") == expected[:100] + [f"back {i}" for i in range(100)]
    assert local.starting("after ") == expected[100:]
    await published(srv.stats, 200)
    stats = srv.stats()
    assert (stats["redis_published"], stats["redis_publishes_lost"], stats["redis_received"]) == (200, 0, 100)
    assert stats["redis_connected"] == 1
    assert [r.getMessage() for r in caplog.records if r.name == "brioche.redis"] == []


class Stream:
    """Publishes of "0", "1", ... on ``topic`` from ``srv``, one every 2 ms (a pace, not a
    synchronisation), each accepted locally, until ``stop`` is set or ``limit`` is reached."""

    def __init__(self, srv: brioche.Server[Any], topic: str, limit: int = 30_000) -> None:
        self.published = 0
        self.stop = asyncio.Event()
        self.task = asyncio.ensure_future(self._run(srv, topic, limit))

    async def _run(self, srv: brioche.Server[Any], topic: str, limit: int) -> None:
        while not self.stop.is_set() and self.published < limit:
            message = str(self.published)
            assert srv.publish(topic, message) == MessageSent(len(message))
            self.published += 1
            await asyncio.sleep(0.002)

    async def check_recovery(
        self, srv: brioche.Server[Any], local: Collector, remote: Collector, back_at: int, caplog: pytest.LogCaptureFixture
    ) -> int:
        return await check_recovery(srv, local, remote, lambda: self.published, self.stop, self.task, back_at, caplog)


async def stream_then_kill(
    cluster: Cluster,
    started: list[brioche.Server[Any]],
    peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]],
    topic: str,
    victim: Node,
) -> tuple[brioche.Server[Any], Collector, Collector, Stream]:
    """Two processes subscribed to ``topic``, a ``Stream`` of publishes flowing between them,
    then ``victim`` SIGKILLed: returns once the core saw the link go down and local delivery went
    on for 100 more messages."""
    srv = await serve_sharded(started, cluster.url)
    other = await peer(cluster.url, NAMESPACE, "sharded")
    local = await clients(ws_url(srv, f"/ws?{topic}"))
    remote = await clients(other.url(f"/ws?{topic}"))
    await until(all_subscribed(cluster, [topic], 2), "both processes to subscribe", 15)

    stream = Stream(srv, topic)
    await until(lambda: len(remote.messages) >= 50, "messages through the cluster")
    await asyncio.to_thread(victim.kill)
    await until(lambda: srv.stats()["redis_connected"] == 0, "the core to see the master gone")
    killed_at = stream.published
    await until(lambda: len(local.messages) >= killed_at + 100, "local delivery with a master down")
    return srv, local, remote, stream


async def test_a_master_restart_mid_stream(
    cluster: Cluster,
    started: list[brioche.Server[Any]],
    peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kill the master of one topic (not the URL's node) under a stream of publishes, start it again.

    Local delivery never stops; the other process gets nothing twice and nothing out of order,
    and has messages again within 5 s of the cluster being whole; one line says the link is
    down, one that it is back.
    """
    caplog.set_level(logging.INFO, logger="brioche.redis")
    topic = topics_per_master(1)[2]
    victim = cluster.node_of(topic)
    assert victim is cluster.nodes[2]
    srv, local, remote, stream = await stream_then_kill(cluster, started, peer, clients, topic, victim)
    await asyncio.to_thread(victim.start)
    await asyncio.to_thread(cluster.wait_ok)
    restarted_at = stream.published
    # The core's bound once the cluster is whole again: its backoff (at most 1 s), a connect and
    # a resubscribe.
    took = await until(lambda: any(int(m) >= restarted_at for m in remote.messages), "remote delivery to resume")
    assert took < 5
    await stream.check_recovery(srv, local, remote, restarted_at, caplog)


async def test_a_restarted_master_serves_every_channel_of_its_slots_again(
    cluster: Cluster, started: list[brioche.Server[Any]], clients: Callable[[str], Awaitable[Collector]]
) -> None:
    """Ten topics on the master that is killed and started again, ten on each of the others.

    The link came back subscribing to all of them at once through a node it had no connection
    to yet: the crate opened one connection per ``SSUBSCRIBE`` (seven at once on the restarted
    node, each with some of the channels), kept one, and the others closed with their
    subscriptions: ``redis_connected`` said 1, nothing was logged, and most of that master's
    topics stayed deaf for good. Now every channel is subscribed again, once, and every topic
    crosses, within ``RECOVERY_BOUND`` of the cluster being whole.
    """
    topics = topics_per_master(10)
    victim = cluster.nodes[2]
    assert [cluster.node_of(t) for t in topics].count(victim) == 10
    subscriber = await serve_sharded(started, cluster.url)
    publisher = await serve_sharded(started, cluster.url)
    received = await clients(ws_url(subscriber, "/ws?" + ",".join(topics)))
    await until(all_subscribed(cluster, topics, 1), "a subscription to every channel", 15)
    await asyncio.to_thread(victim.kill)
    await until(lambda: subscriber.stats()["redis_connected"] == 0, "the core to see the master gone")
    # Started again once the link is subscribing anew: the other masters' channels are, and the
    # dead master's are being retried, all at once.
    others = [t for t in topics if cluster.node_of(t) is not victim]
    await until(all_subscribed(cluster, others, 1), "the other masters' channels subscribed again", 15)
    await asyncio.to_thread(victim.start)
    await asyncio.to_thread(cluster.wait_ok)
    took = await until(all_subscribed(cluster, topics, 1), "every channel subscribed again", 10)
    assert took < RECOVERY_BOUND
    await until(lambda: subscriber.stats()["redis_connected"] == publisher.stats()["redis_connected"] == 1, "both links")
    for topic in topics:
        assert publisher.publish(topic, f"after {topic}") == MessageDropped()
    await until(lambda: len(received.messages) == len(topics), "a message on every topic", 5)
    assert sorted(received.messages) == sorted(f"after {t}" for t in topics)
    assert [await asyncio.to_thread(cluster.shard_subscribers, t) for t in topics] == [1] * len(topics)


@pytest.mark.parametrize("victim", [2, 0], ids=["another-master", "the-urls-node"])
async def test_a_master_killed_for_good_is_replaced_by_its_replica(
    cluster_of: Callable[..., Cluster],
    started: list[brioche.Server[Any]],
    peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]],
    caplog: pytest.LogCaptureFixture,
    victim: int,
) -> None:
    """SIGKILL the master of one topic, in a cluster with a replica per master, and never start it
    again: its replica is elected in its place (``cluster-node-timeout`` 1 s).

    Local delivery never stops; the other process has the topic's messages again within
    ``RECOVERY_BOUND`` of every node seeing the replica as master, gets nothing twice and
    nothing out of order, and both processes are subscribed on the new master.
    "the-urls-node": the master gone is the node of the servers' URL.
    """
    caplog.set_level(logging.INFO, logger="brioche.redis")
    cluster = cluster_of(replicas=True, node_timeout_ms=1000)
    topic = topics_per_master(1)[victim]
    dead, heir = cluster.nodes[victim], cluster.nodes[len(RANGES) + victim]
    assert cluster.node_of(topic) is dead
    srv, local, remote, stream = await stream_then_kill(cluster, started, peer, clients, topic, dead)
    await asyncio.to_thread(cluster.wait_promoted, heir)
    promoted_at = stream.published
    took = await until(lambda: any(int(m) >= promoted_at for m in remote.messages), "remote delivery to resume", 10)
    assert took < RECOVERY_BOUND
    await stream.check_recovery(srv, local, remote, promoted_at, caplog)
    channel = NAMESPACE + topic
    assert await asyncio.to_thread(heir.cli, "PUBSUB", "SHARDNUMSUB", channel) == [channel, "2"]


async def test_every_master_is_pinged(cluster: Cluster, started: list[brioche.Server[Any]]) -> None:
    """The link PINGs every master each 5 s (broker/: PING_EVERY), so that a master that stops
    answering without closing its socket (a machine gone) is noticed within 7 s even when
    nothing is published to it. Before, the PING was a pipeline without a key, which the crate
    sends to one node at random: within 7 s, at most two of the three masters had one."""
    srv = await serve_sharded(started, cluster.url)
    await until(lambda: srv.stats()["redis_connected"] == 1, "the link to the cluster")
    masters = cluster.nodes[: len(RANGES)]

    def pings() -> list[int]:
        stats = (node.info("commandstats").get("cmdstat_ping", "calls=0") for node in masters)
        return [int(stat.split(",")[0].removeprefix("calls=")) for stat in stats]

    before = await asyncio.to_thread(pings)

    async def all_pinged() -> bool:
        return all(now > then for now, then in zip(await asyncio.to_thread(pings), before))

    # PING_EVERY and the answer's timeout: two rounds may fall within it, never three.
    await until(all_pinged, "a PING on every master", 7)


async def announced_behind(cluster: Cluster, master: int, proxy: ThrottledProxy) -> None:
    """Have ``master`` announce ``proxy``'s port, so that clients reach it through the proxy
    (the cluster's bus and the tests' ``redis-cli`` still go straight to it)."""
    port = await proxy.start()
    node = cluster.nodes[master]
    assert node.cli("CONFIG", "SET", "cluster-announce-port", str(port)) == ["OK"]
    node.announced = port
    low = RANGES[master][0]

    async def everywhere() -> bool:
        seen = await asyncio.gather(*(asyncio.to_thread(cluster.slot_owner_seen_by, n, low) for n in cluster.nodes))
        return all(port == p for p in seen)

    await until(everywhere, "every node to list the master at the proxy's port")


async def messages_to_master_1(
    cluster: Cluster, started: list[brioche.Server[Any]], peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]], count: int, topic: str | None = None,
    before: Callable[[], Awaitable[None]] | None = None,
) -> tuple[brioche.Server[Any], Collector, str]:
    """A server here subscribed to a topic of master 1 (``topic``: one whose slot ``before``
    moves there, once subscribed), which another process sends ``count`` messages of 100 kB to
    (ten a second through a proxy carrying 1 MB a second: many in each 2 s a request is given);
    returns the server, its subscriber and the topic."""
    topic = topic or topics_per_master(1)[1]
    srv = await serve_sharded(started, cluster.url)
    here = await clients(ws_url(srv, f"/ws?{topic}"))
    other = await peer(cluster.url, NAMESPACE, "sharded")
    control = await connect(other.url(), open_timeout=5, max_size=None)
    await until(all_subscribed(cluster, [topic], 1), "this process to subscribe")
    # Up once the masters have said they hold the subscription, just after it shows there.
    await until(lambda: srv.stats()["redis_connected"] == 1, "this process's link")

    async def other_connected() -> bool:
        return bool((await peer_stats(control))["redis_connected"] == 1)

    await until(other_connected, "the other process's link")
    if before is not None:
        await before()

    async def on_master_1() -> bool:
        said = await asyncio.to_thread(cluster.nodes[1].cli, "PUBSUB", "SHARDNUMSUB", NAMESPACE + topic)
        return said[1:] == ["1"]

    await until(on_master_1, "this process's subscription on master 1")
    for i in range(count):
        await control.send(f"pub {topic} {i}" + "x" * (99_999 - len(str(i))))
    return srv, here, topic


async def all_arrive_through_a_slow_master_1(
    cluster: Cluster, started: list[brioche.Server[Any]], peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture,
    topic: str | None = None, before: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """``messages_to_master_1`` (90 of 100 kB) with master 1 behind a proxy carrying 1 MB a
    second from it: all arrive, in order, none lost, the link up and nothing logged."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    proxy = ThrottledProxy(cluster.nodes[1].port, None, 1e6)
    await announced_behind(cluster, 1, proxy)
    try:
        count = 90
        srv, here, _ = await messages_to_master_1(cluster, started, peer, clients, count, topic, before)
        await until(lambda: len(here.messages) == count, "the 90 through the slow connection", 40)
        assert [m.split("x")[0] for m in here.messages] == [f"{i}" for i in range(count)]
        stats = srv.stats()
        assert (stats["redis_received"], stats["redis_received_lost"], stats["redis_connected"]) == (count, 0, 1)
        assert log_lines(caplog, "brioche.redis") == []
    finally:
        await proxy.close()


async def test_a_master_busy_bringing_messages_is_not_taken_for_a_stalled_one(
    cluster: Cluster, started: list[brioche.Server[Any]], peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture,
) -> None:
    """9 MB of messages to a topic of a master whose connection to this process carries 1 MB a
    second: the link's PING of that master, 5 s in, was answered behind the messages still on
    the way, past the crate's 2 s timeout, so the link was declared down and the messages on
    the wire lost, as on a single node (test_redis_pubsub). Messages arriving from that master
    now prove it alive: all arrive, in order, and nothing is logged."""
    await all_arrive_through_a_slow_master_1(cluster, started, peer, clients, caplog)


async def test_a_master_given_a_slot_is_waited_on_for_that_slot_s_messages(
    cluster: Cluster, started: list[brioche.Server[Any]], peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture,
) -> None:
    """A subscribed topic's slot moves from master 0 to master 1, whose connection carries 1 MB
    a second, and 9 MB of messages follow: they came from master 1 but counted for master 0, as
    the link's map said at connect, so master 1's PING behind them was given 2 s and the link
    declared down. The map is read again when a master gives a wanted slot away."""
    topic = topics_per_master(1)[0]

    async def move() -> None:
        await asyncio.to_thread(cluster.move_slot, slot(NAMESPACE + topic), cluster.nodes[0], cluster.nodes[1])

    await all_arrive_through_a_slow_master_1(cluster, started, peer, clients, caplog, topic, move)


async def test_a_silent_master_is_noticed_while_another_brings_messages(
    cluster: Cluster, started: list[brioche.Server[Any]], peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture,
) -> None:
    """What proves a master alive is its own connection's messages, not the link's: master 2
    stopped (SIGSTOP: its sockets open, nothing answered) while master 1 brings 20 MB at 1 MB a
    second, the link is declared down at master 2's first unanswered PING (within 7 s: 5 between
    PINGs, 2 for the answer), not once master 1's messages end 20 s later. Nor once a publish
    here to master 1, answered behind those messages, has its answer: the PINGs go on in a task
    of their own, each master's on a clock of its own."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    proxy = ThrottledProxy(cluster.nodes[1].port, None, 1e6)
    await announced_behind(cluster, 1, proxy)
    silent = cluster.nodes[2].process
    assert silent is not None
    try:
        count = 200
        srv, here, topic = await messages_to_master_1(cluster, started, peer, clients, count)
        assert isinstance(srv.publish(topic, "from here"), MessageSent)
        silent.send_signal(signal.SIGSTOP)

        def lines() -> list[tuple[int, str]]:
            return log_lines(caplog, "brioche.redis")

        await until(lambda: len(lines()) > 0, "the link to be declared down", 15)
        assert "no answer to PING: timed out" in lines()[0][1], lines()
        assert len(here.messages) < count
        assert srv.stats()["redis_connected"] == 0
    finally:
        silent.send_signal(signal.SIGCONT)
        await proxy.close()


async def test_plain_pubsub_on_a_cluster_crosses_nodes(
    cluster: Cluster,
    started: list[brioche.Server[Any]],
    peer: Callable[..., Awaitable[Peer]],
    clients: Callable[[str], Awaitable[Collector]],
) -> None:
    """Without ``sharded``: PUBLISH on one node reaches a subscriber on another (Redis forwards it)."""
    config = server.handler(upgrade_ws_path).hostname("127.0.0.1").port(0).websocket(topics_config())
    srv = await serve_config(config.pubsub_redis(cluster.url, namespace=NAMESPACE), started)
    other = await peer(f"redis://127.0.0.1:{cluster.nodes[2].port}", NAMESPACE)
    subscriber = await clients(other.url("/ws?plain"))

    def subscribed() -> bool:
        return cluster.nodes[2].cli("PUBSUB", "NUMSUB", NAMESPACE + "plain")[1] == "1"

    await until(lambda: asyncio.to_thread(subscribed), "the subscription on the third node")
    # Before its link is up a publish here is lost at once.
    await until(lambda: srv.stats()["redis_connected"] == 1, "this process's link to Redis")
    for i in range(100):
        srv.publish("plain", f"p{i}")
    await until(lambda: len(subscriber.messages) == 100, "100 messages across nodes")
    assert subscriber.messages == [f"p{i}" for i in range(100)]
    await published(srv.stats, 100)
    assert (srv.stats()["redis_published"], srv.stats()["redis_publishes_lost"]) == (100, 0)


async def test_standalone_redis_with_sharded_keeps_one_connection(
    redis: Redis, started: list[brioche.Server[Any]], clients: Callable[[str], Awaitable[Collector]], caplog: pytest.LogCaptureFixture
) -> None:
    """``sharded=True`` on a Redis that is not a cluster: SSUBSCRIBE/SPUBLISH on its one connection."""
    caplog.set_level(logging.INFO, logger="brioche.redis")
    first = await serve_sharded(started, redis.url)
    second = await serve_sharded(started, redis.url)
    topics = topics_per_master(1)
    subscriber = await clients(ws_url(second, f"/ws?{','.join(topics)}"))

    async def subscribed() -> bool:
        out = await asyncio.to_thread(redis.cli, "PUBSUB", "SHARDNUMSUB", *(NAMESPACE + t for t in topics))
        return out[1::2] == ["1"] * len(topics)

    await until(subscribed, "the subscriptions on the standalone Redis")
    await until(lambda: first.stats()["redis_connected"] == 1, "the first server to connect")
    for topic in topics:
        first.publish(topic, f"on {topic}")
    await until(lambda: len(subscriber.messages) == len(topics), "the messages through Redis")
    assert subscriber.messages == [f"on {t}" for t in topics]
    await published(first.stats, 3)
    assert (first.stats()["redis_published"], second.stats()["redis_received"]) == (3, 3)
    # One connection per server, none left from asking whether it is a cluster; and redis-cli's.
    info = await asyncio.to_thread(redis.cli, "INFO", "clients")
    assert "connected_clients:3" in info
    assert [r.getMessage() for r in caplog.records if r.name == "brioche.redis"] == []
