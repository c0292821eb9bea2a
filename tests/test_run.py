"""The blocking entry points: ``Config.run()`` and the ``python -m brioche`` demo, stopped by Ctrl+C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from conftest import free_port, ignore_sigint

SCRIPT = Path(__file__).parent / "scripts" / "run_forever.py"


async def connect_when_listening(url: str) -> ClientConnection:
    for _ in range(200):  # bounded: up to ~10 s for the interpreter to start
        try:
            return await connect(url)
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listening at {url}")


async def test_ctrl_c_during_run_closes_clients_with_1001_and_exits_cleanly() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), str(port), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with await connect_when_listening(f"ws://127.0.0.1:{port}/ws") as client:
            await client.send("before ctrl-c")
            assert await client.recv() == "before ctrl-c"
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(client.recv(), 10)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1001
            else:
                raise AssertionError("the connection stayed open after Ctrl+C")
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "stopped cleanly"


async def test_run_logs_where_it_listens_once_it_does() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), str(port), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 15)
        assert line.decode() == f"INFO brioche: listening on http://127.0.0.1:{port}/\n"
        # Said once it listens: a client may connect as soon as it reads the line.
        async with connect(f"ws://127.0.0.1:{port}/ws") as client:
            await client.send("up")
            assert await asyncio.wait_for(client.recv(), 10) == "up"
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out.decode() == "stopped cleanly\n"
    assert err.decode() == "", "the line is logged once, and nothing else at INFO for a clean run"


async def test_demo_module_prints_its_address_and_echoes() -> None:
    # Started with SIGINT ignored, as a shell's background job (and some CI runners) start it:
    # Ctrl+C still stops the demo, which handles the signal itself.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "brioche", "--host", "127.0.0.1", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=ignore_sigint,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line
        async with connect(f"ws://127.0.0.1:{match.group(1)}/echo") as client:
            await client.send("héllo")
            assert await client.recv() == "héllo"
        proc.send_signal(signal.SIGINT)
        # communicate: both pipes are read meanwhile, so the demo never blocks writing to them.
        _, err = await asyncio.wait_for(proc.communicate(), 30)  # a bound: a loaded CI machine is slow to exit
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0


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
