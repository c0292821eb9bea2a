"""The blocking entry points: ``Config.run()`` and the ``python -m brioche`` demo, stopped by Ctrl+C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from conftest import free_port, hangup_by_default, ignore_sigint, kill_if_running

SCRIPT = Path(__file__).parent / "scripts" / "run_forever.py"
SLOW_CLOSE_SCRIPT = Path(__file__).parent / "scripts" / "run_slow_close.py"
LOOP_END_SCRIPT = Path(__file__).parent / "scripts" / "loop_end.py"


async def run_forever(
    preexec_fn: Callable[[], object] | None = None,
) -> tuple[asyncio.subprocess.Process, int]:
    """``tests/scripts/run_forever.py`` on a free port (its output piped), and that port."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), str(port), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=preexec_fn,
    )
    return proc, port


async def stop_expecting_1001(proc: asyncio.subprocess.Process, sig: int, client: ClientConnection) -> None:
    """Send ``sig`` to the server's process: ``client`` is closed with 1001."""
    proc.send_signal(sig)
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(client.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def connect_when_listening(url: str) -> ClientConnection:
    for _ in range(200):  # bounded: up to ~10 s for the interpreter to start
        try:
            return await connect(url)
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listening at {url}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
async def test_ctrl_c_during_run_closes_clients_with_1001_and_exits_cleanly(sig: signal.Signals) -> None:
    """Ctrl+C, and SIGHUP (a closed terminal) without TLS, which has nothing to reload: both
    stop the server gracefully. SIGHUP was left to its default and ended the process without a
    close frame to anyone."""
    proc, port = await run_forever(preexec_fn=hangup_by_default)
    try:
        async with await connect_when_listening(f"ws://127.0.0.1:{port}/ws") as client:
            await client.send("before ctrl-c")
            assert await client.recv() == "before ctrl-c"
            proc.send_signal(sig)
            try:
                await asyncio.wait_for(client.recv(), 10)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1001
            else:
                raise AssertionError("the connection stayed open after Ctrl+C")
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        await kill_if_running(proc)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "stopped cleanly"


def ignore_sighup() -> None:
    """A ``preexec_fn``: the child starts with SIGHUP ignored, as under ``nohup``."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def test_under_nohup_a_hang_up_does_not_stop_run() -> None:
    """SIGHUP ignored when the process started (``nohup``) stays ignored: the server serves
    on, and Ctrl+C still stops it with 1001."""
    proc, port = await run_forever(preexec_fn=ignore_sighup)
    try:
        async with await connect_when_listening(f"ws://127.0.0.1:{port}/ws") as client:
            proc.send_signal(signal.SIGHUP)
            # Still served after the hang-up: a round trip made after the signal is delivered.
            await client.send("after the hang-up")
            assert await asyncio.wait_for(client.recv(), 10) == "after the hang-up"
            await stop_expecting_1001(proc, signal.SIGINT, client)
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        await kill_if_running(proc)
    assert proc.returncode == 0, err.decode()
    assert b"SIGHUP" not in err


async def test_run_logs_where_it_listens_once_it_does() -> None:
    proc, port = await run_forever()
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 15)
        # On 127.0.0.1 (the script's): the URL alone; tls.py in test_docs.py is on 0.0.0.0.
        assert line.decode() == f"INFO brioche: listening on http://127.0.0.1:{port}/\n"
        # Said once it listens: a client may connect as soon as it reads the line.
        async with connect(f"ws://127.0.0.1:{port}/ws") as client:
            await client.send("up")
            assert await asyncio.wait_for(client.recv(), 10) == "up"
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        await kill_if_running(proc)
    assert proc.returncode == 0, err.decode()
    assert out.decode() == "stopped cleanly\n"
    assert err.decode() == "", "the line is logged once, and nothing else at INFO for a clean run"


@pytest.mark.parametrize(("loop", "mode"), [
    ("asyncio", "never"), ("uvloop", "never"), ("asyncio", "cut-short"), ("asyncio", "slow-close"),
])
async def test_a_server_still_running_as_its_loop_ends_is_stopped_and_frees_its_port(loop: str, mode: str) -> None:
    """A program whose ``main()`` returns with its server (kept in a global) still running:
    never stopped, or after a plain ``stop()`` cut short by ``wait_for`` (it waits for the
    client). As the runner ends the loop, the server is stopped as ``run()`` stops it: its
    client gets 1001, ``on_close`` runs, it is logged, and once the runner has returned the
    port refuses connections and can be listened on again. An ``on_close`` that never returns
    is cancelled after the grace period (0.5 s here) instead of holding the program's end for
    ever. Before, the core went on listening with nobody to answer: connections were accepted
    and hung, and the port stayed taken (``BindError``) for the rest of the program."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(LOOP_END_SCRIPT), loop, mode,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 15))
        async with connect(f"ws://127.0.0.1:{port}/ws") as client:
            await client.send("bye")
            assert await asyncio.wait_for(client.recv(), 10) == "bye"
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(client.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        await kill_if_running(proc)
    assert proc.returncode == 0, err.decode()
    stopping = (
        f"INFO brioche: the event loop is ending with the server on http://127.0.0.1:{port}/ still "
        "running: stopping it (its WebSockets get 1001)"
    )
    closing = {
        "never": ["on_close 1001"],
        "cut-short": ["on_close 1001"],
        "slow-close": [
            "on_close 1001",
            "WARNING brioche: stopping: cancelled 1 handler task still running after the 0.5 s grace period",
            "on_close cancelled",
        ],
    }[mode]
    assert out.decode().splitlines() == [
        *(["stop cut short"] if mode == "cut-short" else []),
        stopping,
        *closing,
        "runner returned",
        "refused",
        "listened again",
    ]


@pytest.mark.parametrize("workers", [1, 2])
async def test_run_cancels_an_on_close_still_running_after_the_grace_period(workers: int) -> None:
    """An on_close that never returns held SIGTERM's stop forever (under workers, until the
    supervisor's SIGKILL 10 s later). Now it is cancelled once the grace period passes."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SLOW_CLOSE_SCRIPT), str(port), "0.5", str(workers),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        # Every worker listens, with its SIGTERM handler, once the start line is logged.
        for _ in range(20):
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "the server's stderr ended before it listened"
            if "listening on" in line:
                break
        else:
            raise AssertionError("no 'listening on' line among the first 20")
        async with connect(f"ws://127.0.0.1:{port}/") as client:
            await stop_expecting_1001(proc, signal.SIGTERM, client)
        # The bound: the 0.5 s grace and the exit, well before the supervisor's SIGKILL.
        out, err = await asyncio.wait_for(proc.communicate(), 8)
    finally:
        if proc.returncode is None:
            # Its workers too, which hold its pipes open: its own session's process group.
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == ["on_close 1001", "on_close cancelled", "stopped cleanly"]
    warnings = [line for line in err.decode().splitlines() if line.startswith("WARNING")]
    assert warnings == [
        "WARNING brioche: stopping: cancelled 1 handler task still running after the 0.5 s grace period"
    ], err.decode()


async def start_demo(
    *args: str, preexec_fn: Callable[[], None]
) -> tuple[asyncio.subprocess.Process, str]:
    """``python -m brioche`` on a free port, and the line it printed first (where it listens)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "brioche", *args, "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=preexec_fn,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
    except BaseException:
        await kill_if_running(proc)
        raise
    return proc, line


@pytest.mark.parametrize(("host_args", "on"), [
    (["--host", "127.0.0.1"], ""),
    # The default, 0.0.0.0: the line said only the loopback's URL, which reads as a server no
    # other machine can reach.
    ([], r" and every other address of this host \(0\.0\.0\.0\)"),
], ids=["loopback", "default-host"])
async def test_demo_module_prints_its_address_and_echoes(host_args: list[str], on: str) -> None:
    # Started with SIGINT ignored, as a shell's background job (and some CI runners) start it:
    # Ctrl+C still stops the demo, which handles the signal itself.
    proc, line = await start_demo(*host_args, preexec_fn=ignore_sigint)
    try:
        match = re.fullmatch(rf"brioche demo listening on http://127\.0\.0\.1:(\d+)/{on} \(Ctrl\+C to stop\)\n",
                             line)
        assert match, line
        async with connect(f"ws://127.0.0.1:{match.group(1)}/echo") as client:
            await client.send("héllo")
            assert await client.recv() == "héllo"
        proc.send_signal(signal.SIGINT)
        # communicate: both pipes are read meanwhile, so the demo never blocks writing to them.
        _, err = await asyncio.wait_for(proc.communicate(), 30)  # a bound: a loaded CI machine is slow to exit
        assert proc.returncode == 0, err.decode()
    finally:
        await kill_if_running(proc)
    assert proc.returncode == 0


async def test_demo_module_stops_on_sighup_as_on_sigterm() -> None:
    """SIGHUP (the demo's terminal closed) stops the demo gracefully, as it stops ``run()`` and
    ``--workers``: its client gets 1001 and it exits 0. Before, the signal was left to its
    default in one process: the demo died with 129 and its client got 1006."""
    proc, line = await start_demo("--host", "127.0.0.1", preexec_fn=hangup_by_default)
    try:
        match = re.match(r"brioche demo listening on http://127\.0\.0\.1:(\d+)/ ", line)
        assert match, line
        async with connect(f"ws://127.0.0.1:{match.group(1)}/echo") as client:
            await client.send("before")
            assert await client.recv() == "before"
            proc.send_signal(signal.SIGHUP)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(client.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await kill_if_running(proc)
    assert proc.returncode == 0, err.decode()
    assert "SIGHUP: nothing to reload without tls(): stopping, as on SIGTERM" in err.decode()


async def test_demo_module_says_what_is_wrong_with_port_and_still_shows_its_help() -> None:
    async def demo(*args: str, port_env: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "brioche", *args, env={**os.environ, "PORT": port_env},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    # Before, a bad $PORT was read while the options were declared: a traceback even for --help.
    code, out, _ = await demo("--help", port_env="abc")
    assert code == 0 and "usage: python -m brioche" in out
    code, _, err = await demo(port_env="abc")
    assert code == 2 and err.splitlines()[-1] == "python -m brioche: error: $PORT must be a port number, got 'abc'"
    code, _, err = await demo("--port", "70000", port_env="3000")
    assert code == 2 and err.splitlines()[-1] == "python -m brioche: error: --port must be in 0..65535, got 70000"
    # A port taken (3000 often is): one line saying so and what to do, in one process or with
    # workers. Before, a traceback ending in BindError.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            code, _, err = await demo("--host", "127.0.0.1", "--port", str(port), "--workers", workers,
                                      port_env="3000")
            assert code == 1 and len(err.splitlines()) == 1, err
            assert re.fullmatch(
                rf"python -m brioche: cannot listen on 127\.0\.0\.1:{port}: Address already in use"
                r"( \(os error 98\))?; choose another with --port \(or \$PORT\)\n", err
            ), err
    # An address this machine does not have: one line too, without the port's hint.
    code, _, err = await demo("--host", "192.0.2.1", "--port", "0", port_env="3000")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("python -m brioche: cannot listen on 192.0.2.1:0: ") and "--port" not in err, err
