"""What a worker's publishes that a sibling misses leave behind (``run(config, workers=2)``,
no Redis): a count in ``stats()`` and a WARNING, with real worker processes over real sockets.

The relay holds at most 64 MiB for a sibling (``ws/relay.rs``): past it, or for one publish
larger than that, the sibling misses the publish.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake

from rawws import RawWebSocket
from test_workers import LISTENING, Supervisor, clients_covering

APP = Path(__file__).with_name("relay_app.py")
MIB = 1 << 20
# Why a sibling missed a publish (ws/relay.rs), as the log line says it.
BEHIND = "64 MiB already wait for it; more are not logged until it reads again"
TOO_LARGE = "a publish over 64 MiB"


def relay_lines(sup: Supervisor, pid: int, why: str) -> list[str]:
    """The worker's lines about ``pid`` missing publishes: a spawned worker has no handler of
    the app's, so `logging` prints WARNINGs bare on stderr, which the supervisor passes on."""
    line = f"dropping publishes to the sibling worker {pid} ({why}): its clients miss them"
    return [logged for logged in sup.lines if line in logged]


@pytest.fixture
def sup() -> Iterator[Supervisor]:
    started = Supervisor([sys.executable, str(APP), "2"], LISTENING)
    try:
        assert len(started.pids) == 2
        yield started
    finally:
        for pid in started.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        started.stop()


async def client_on(port: int) -> tuple[ClientConnection, int]:
    ws = await connect(f"ws://127.0.0.1:{port}/", open_timeout=10, max_size=None)
    greeting = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(greeting, str) and greeting.startswith("pid ")
    return ws, int(greeting[4:])


async def one_client_per_worker(port: int, pids: set[int]) -> dict[int, ClientConnection]:
    """One client on each worker, by pid; the others it took to reach them closed (any other
    would be one more subscriber to feed)."""
    mine: dict[int, ClientConnection] = {}
    for ws, pid in await clients_covering(port, pids, 2, client_on):
        if pid in mine:
            await ws.close()
        else:
            mine[pid] = ws
    return mine


async def stats(ws: ClientConnection) -> dict[str, Any]:
    """The worker's stats: ``ws`` must have nothing else to read."""
    await ws.send("stats")
    answer = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(answer, str)
    got: dict[str, Any] = json.loads(answer)
    return got


async def test_publishes_a_sibling_misses_are_counted_and_logged_once_per_stall(sup: Supervisor) -> None:
    mine = await one_client_per_worker(sup.port, sup.pids)
    (pa, a), (pb, b) = sorted(mine.items())
    assert (await stats(a))["relay_publishes_lost"] == 0

    # One publish over 64 MiB: no backlog can take it. B's client gets the next one instead.
    await a.send(f"big {65 * MIB}")
    await a.send("pub after")
    assert await asyncio.wait_for(b.recv(), 10) == "after"
    assert ((await stats(a))["relay_publishes_lost"], (await stats(b))["relay_publishes_lost"]) == (1, 0)
    sup.wait_for(re.compile(re.escape(f"sibling worker {pb} ({TOO_LARGE})")))

    # B stopped while A publishes 200 MiB: 64 MiB wait for it, what is past them is dropped.
    os.kill(pb, signal.SIGSTOP)
    count = 200
    await a.send(f"seq {count} {MIB}")
    assert await asyncio.wait_for(a.recv(), 30) == "done"
    lost = (await stats(a))["relay_publishes_lost"] - 1
    # Waiting for B: 63 in the backlog, the chunk A's writer took before B's socket filled (at
    # most another backlog's worth; none if the writer first ran once the 200 were published)
    # and what the socket holds (under one).
    assert count - 63 - 63 - 1 <= lost <= count - 63, lost
    sup.wait_for(re.compile(re.escape(f"sibling worker {pb} ({BEHIND})")))
    os.kill(pb, signal.SIGCONT)
    await a.send("pub end")
    got = []
    for _ in range(count + 1):
        message = await asyncio.wait_for(b.recv(), 30)
        if message == "end":
            break
        assert isinstance(message, bytes) and len(message) > MIB
        got.append(int(message[: message.index(b":")]))
    # In order, each once, and exactly those A did not count lost.
    assert got == sorted(set(got)) and len(got) == count - lost, (len(got), lost)
    assert got[0] == 0, "the first publishes were in B's backlog"
    # One line for the stall, not one per publish, even if A's writer took the backlog after
    # the drops began: B had not read it.
    assert len(relay_lines(sup, pb, BEHIND)) == 1, sup.lines
    assert len(relay_lines(sup, pb, TOO_LARGE)) == 1, sup.lines
    assert (await stats(b))["relay_publishes_lost"] == 0
    for ws in mine.values():
        await ws.close()


async def test_a_restarted_worker_accepts_once_linked_so_its_first_clients_publish_to_every_sibling(
    sup: Supervisor,
) -> None:
    """A worker killed and restarted by the supervisor listens at once but accepts clients only
    once its siblings have linked to it (they reconnect every 200 ms at most): a client that
    lands on it and publishes at once reaches the siblings' subscribers. Before, the kernel
    handed it clients as soon as it listened, and what they published before the links came up
    reached no sibling, and was not counted."""
    mine = await one_client_per_worker(sup.port, sup.pids)
    (pa, a), (victim, b) = sorted(mine.items())
    await b.close()
    loop = asyncio.get_running_loop()
    for trial in range(2):
        os.kill(victim, signal.SIGKILL)
        # Connections land on A until the new worker listens; then the kernel spreads them.
        landed = None
        deadline = loop.time() + 30
        for _ in range(5000):
            assert loop.time() < deadline, "no client reached the restarted worker within 30 s"
            try:
                ws, pid = await client_on(sup.port)
            except (OSError, InvalidHandshake):
                continue  # queued in the killed worker's listen backlog as it died: closed unread
            if pid not in (pa, victim):
                landed = (ws, pid)
                break
            await ws.close()
        assert landed is not None
        new, victim = landed
        await new.send(f"pub hello {trial}")
        assert await asyncio.wait_for(a.recv(), 10) == f"hello {trial}"
        assert (await stats(new))["relay_publishes_lost"] == 0
        await new.close()
    await a.close()


async def test_a_relayed_publish_queued_for_a_client_that_does_not_read_holds_only_its_own_bytes() -> None:
    """A client that reads nothing, in the worker the publishes are relayed to, subscribed to a
    topic that one publish in sixty goes to: its queue fills to its backpressure limit (2 MiB)
    and its worker's memory grows by about that much, as a local publisher's would. Before, each
    relayed payload was a slice of the relay's 64 KiB read buffer, and each queued one kept its
    whole buffer: about 60 times the limit (+120 MiB in the reviewer's run)."""
    started = Supervisor(
        [sys.executable, str(APP), "2"], LISTENING, env={"RELAY_APP_BACKPRESSURE": str(2 * MIB)}
    )
    try:
        mine = await one_client_per_worker(started.port, started.pids)
        (pa, publisher), (pb, probe) = sorted(mine.items())
        slow = None
        for _ in range(60):
            raw = await RawWebSocket.connect(started.port, "/", rcvbuf=4096)
            greeting = await raw.recv_data_frame()
            if greeting.payload == f"pid {pb}".encode():
                slow = raw
                break
            await raw.aclose()
        assert slow is not None, "60 clients never reached the second worker"
        await slow.send_text("sub sparse")
        assert (await slow.recv_data_frame()).payload == b"subscribed"
        slow.pause_reading()

        async def rss() -> int:
            await probe.send("rss")
            return int(await asyncio.wait_for(probe.recv(), 10))

        before = await rss()
        # In parts, each relayed whole before the next (the probe gets the mark behind it), so
        # that no more than 64 MiB ever wait for B in A's relay.
        for part in range(24):
            await publisher.send("spread 15000 1100 60")
            assert await asyncio.wait_for(publisher.recv(), 30) == "done"
            await publisher.send(f"pub mark {part}")
            assert await asyncio.wait_for(probe.recv(), 30) == f"mark {part}"
        grown = await rss() - before
        dropped = (await stats(probe))["sends_dropped"]
        assert dropped > 0, "the slow client's queue never reached its limit: the test proves nothing"
        assert (await stats(publisher))["relay_publishes_lost"] == 0
        assert grown < 24 * 1024, f"B's memory grew by {grown} KiB for a 2 MiB limit"
        slow.close()
        for ws in mine.values():
            await ws.close()
    finally:
        started.stop()
