"""``run(config, workers=n)``: worker processes on one port, topics shared, supervised.

Each test starts ``tests/workers_app.py`` (the supervisor and its workers are real processes)
and reads the supervisor's log lines for the port, the workers' pids and their restarts; one
starts the demo, ``python -m brioche --workers 2``, the same way.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import brioche
from brioche import server, websocket
from brioche._workers import _SUN_PATH, WorkersFailed, _relay_paths, _report_failure, _reserve_ports, _start_error
from conftest import hangup_by_default, ignore_sigint
from rawws import holders_of_server_end, poll_until
from test_listen import needs_ipv6

APP = Path(__file__).with_name("workers_app.py")
LISTENING = re.compile(r"(?P<workers>\d+) workers listening on port (?P<port>\d+) \(pids (?P<pids>[\d, ]+)\)")


def spawned_children(parent: int) -> set[int]:
    """The pids of the processes ``parent`` started with multiprocessing's ``spawn``: its workers.

    Its other child, multiprocessing's resource tracker, is told apart by its command line.
    """
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # it exited meanwhile
            continue
        # After the command name, which may hold spaces and parentheses: state, then ppid.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            pids.add(int(entry))
    return pids


class Supervisor:
    """A supervisor process started with ``argv``, the lines it printed (stdout and stderr) read
    by a thread as they come, and its workers.

    It is ready once it printed a line matching ``listening``, whose ``port`` group is the port
    it serves; its workers are then the processes it spawned.
    """

    def __init__(
        self,
        argv: list[str],
        listening: re.Pattern[str],
        preexec_fn: Callable[[], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=preexec_fn,
            env=None if env is None else {**os.environ, **env},
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.pids: set[int] = set()
        try:
            self.listening = self.wait_for(listening)
            self.port = int(self.listening["port"])
            self.pids = spawned_children(self.proc.pid)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        return self.wait_for_lines(pattern, 1, timeout)[0]

    def wait_for_lines(self, pattern: re.Pattern[str], count: int, timeout: float = 30.0) -> list[re.Match[str]]:
        """The first ``count`` lines matching ``pattern``, once it printed that many."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                matches = [match for line in self.lines if (match := pattern.search(line))]
                if len(matches) >= count:
                    return matches[:count]
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, (
                    f"no line matching {pattern.pattern!r}; exit code {self.proc.poll()}; "
                    f"log: {self.lines}"
                )
                self.changed.wait(min(left, 0.5))

    def stop(self) -> None:
        """SIGTERM the supervisor; SIGKILL it and every worker it spawned if they linger."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            for pid in self.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.reader.join(5)


class AppSupervisor(Supervisor):
    """``tests/workers_app.py`` with ``workers`` workers; ``args`` follow on its command line, and
    ``worker_timeout`` (seconds) is set when given."""

    def __init__(self, workers: int, *args: str, worker_timeout: float | None = None) -> None:
        env = None if worker_timeout is None else {"WORKERS_APP_TIMEOUT": str(worker_timeout)}
        super().__init__([sys.executable, str(APP), str(workers), *args], LISTENING, hangup_by_default, env)
        try:
            # An operator reads the pids off this line: they must be the workers, all of them.
            assert int(self.listening["workers"]) == workers
            assert {int(pid) for pid in self.listening["pids"].split(", ")} == self.pids
            assert len(self.pids) == workers
        except BaseException:
            self.stop()
            raise


@pytest.fixture
def supervisor_of() -> Iterator[Any]:
    started: list[Supervisor] = []

    def start(workers: int, worker_timeout: float | None = None) -> Supervisor:
        sup = AppSupervisor(workers, worker_timeout=worker_timeout)
        started.append(sup)
        return sup

    try:
        yield start
    finally:
        for sup in started:
            sup.stop()


async def client_on(port: int) -> tuple[ClientConnection, int]:
    """A connected client and the pid of the worker it landed on."""
    ws = await connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10)
    greeting = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(greeting, str) and greeting.startswith("pid ")
    return ws, int(greeting[4:])


async def clients_covering(
    port: int,
    pids: set[int],
    at_least: int,
    connect_one: Callable[[int], Awaitable[tuple[ClientConnection, int]]] = client_on,
) -> list[tuple[ClientConnection, int]]:
    """Connect (with ``connect_one``) until every pid in ``pids`` has a client and ``at_least``
    are connected.

    The kernel spreads connections by a hash of their addresses; 60 misses in a row for one of
    three workers has a probability of about 1e-10.
    """
    clients: list[tuple[ClientConnection, int]] = []
    for _ in range(60):
        clients.append(await connect_one(port))
        if len(clients) >= at_least and pids <= {pid for _, pid in clients}:
            return clients
    raise AssertionError(f"60 clients never reached all of {pids}: {[pid for _, pid in clients]}")


async def receive(ws: ClientConnection, count: int) -> list[str]:
    got = []
    for _ in range(count):
        message = await asyncio.wait_for(ws.recv(), 10)
        assert isinstance(message, str)
        got.append(message)
    return got


async def test_every_publish_reaches_every_client_of_every_worker(supervisor_of: Any) -> None:
    sup = supervisor_of(3)
    clients = await clients_covering(sup.port, sup.pids, at_least=9)
    try:
        per_client = 5
        for i, (ws, _) in enumerate(clients):
            for k in range(per_client):
                await ws.send(f"{i}:{k}")
        expected = sorted(f"{i}:{k}" for i in range(len(clients)) for k in range(per_client))
        for ws, pid in clients:
            got = await receive(ws, len(expected))
            assert sorted(got) == expected, f"client on {pid}"
            # One sender's messages keep their order, across workers too.
            for i in range(len(clients)):
                mine = [m for m in got if m.startswith(f"{i}:")]
                assert mine == [f"{i}:{k}" for k in range(per_client)]
        # Nothing more: each publish arrived once. A final marker from the first client comes
        # next on every socket, right after what was counted.
        await clients[0][0].send("end")
        for ws, _ in clients:
            assert await receive(ws, 1) == ["end"]
    finally:
        for ws, _ in clients:
            await ws.close()


async def test_a_worker_killed_is_restarted_logged_and_serves_the_port(supervisor_of: Any) -> None:
    sup = supervisor_of(2)
    victim = min(sup.pids)
    os.kill(victim, signal.SIGKILL)
    died = sup.wait_for(re.compile(rf"WARNING brioche: worker (\d) \(pid {victim}\) exited with signal SIGKILL; restarting it$"))
    restarted = sup.wait_for(re.compile(rf"INFO brioche: worker {died[1]} restarted \(pid (\d+)\)"))
    new_pid = int(restarted[1])
    survivor = (sup.pids - {victim}).pop()
    sup.pids.add(new_pid)
    clients = await clients_covering(sup.port, {new_pid, survivor}, at_least=2)
    try:
        assert {pid for _, pid in clients} == {new_pid, survivor}
        on_new = next(ws for ws, pid in clients if pid == new_pid)
        on_survivor = next(ws for ws, pid in clients if pid == survivor)
        # Both directions of the relay are up again once the restarted worker said it is ready.
        await on_new.send("from the new one")
        await on_survivor.send("from the survivor")
        for ws, _ in clients:
            assert sorted(await receive(ws, 2)) == ["from the new one", "from the survivor"]
    finally:
        for ws, _ in clients:
            await ws.close()


async def test_a_serving_worker_that_exits_with_status_78_is_restarted(supervisor_of: Any) -> None:
    """78 (EX_CONFIG) is the status of a worker that ran ``run()`` again while importing the
    script, but only before it got ready: an app may exit with it for reasons of its own once
    serving, and is restarted as any worker is. Before, that stopped the whole server with the
    unguarded-run error."""
    sup = supervisor_of(2)
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.HTTPError):  # the worker is gone before it answers
            await http.get(f"http://127.0.0.1:{sup.port}/exit/78", timeout=10)
    died = sup.wait_for(re.compile(r"WARNING brioche: worker (\d) \(pid \d+\) exited with exit code 78; restarting it$"))
    sup.wait_for(re.compile(rf"INFO brioche: worker {died[1]} restarted \(pid (\d+)\)"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_to_the_supervisor_closes_every_worker_s_clients_with_1001(
    supervisor_of: Any, sig: signal.Signals
) -> None:
    sup = supervisor_of(2)
    clients = await clients_covering(sup.port, sup.pids, at_least=4)
    sup.proc.send_signal(sig)
    for ws, pid in clients:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 15)
        assert ws.close_code == 1001, f"client on {pid}"
    assert await asyncio.to_thread(sup.proc.wait, 20) == 0
    for pid in sup.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any("WARNING" in line or "Traceback" in line for line in sup.lines), sup.lines


async def test_workers_whose_supervisor_is_killed_close_their_clients_with_1001_and_exit(
    supervisor_of: Any,
) -> None:
    """SIGKILL (or the OOM killer) gives the supervisor no chance to stop its workers: each sees
    its end of the sentinel pipe close, and stops as on SIGTERM. Before, they served on,
    orphaned, with nothing to restart or stop them."""
    sup = supervisor_of(2)
    clients = await clients_covering(sup.port, sup.pids, at_least=4)
    relay_dir = relay_dir_of(min(sup.pids))
    assert os.path.isdir(relay_dir)
    sup.proc.kill()
    for ws, pid in clients:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 15)
        assert ws.close_code == 1001, f"client on {pid}"

    # Reparented to init (or a subreaper), which reaps them.
    assert await poll_until(lambda: all(exited(pid) for pid in sup.pids), 20), sup.pids
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", sup.port), timeout=2).close()
    # The supervisor could not remove the relay's directory: the last worker to stop did.
    assert not os.path.exists(relay_dir)


def relay_dir_of(pid: int) -> str:
    """The directory of the Unix socket worker ``pid`` listens on for its siblings' publishes."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and f"socket:[{fields[6]}]" in inodes and "brioche-relay-" in fields[7]:
                return os.path.dirname(fields[7])
    raise AssertionError(f"worker {pid} has no relay socket")


DEMO_LISTENING = re.compile(
    r"^brioche demo listening on http://127\.0\.0\.1:(?P<port>\d+)/ "
    r"\(2 workers, pids (?P<pids>\d+ \d+); Ctrl\+C to stop\)$"
)


def accepting_worker(port: int, client: ClientConnection, pids: set[int]) -> int:
    """Which of ``pids`` holds the server end of ``client``'s connection to 127.0.0.1:``port``.

    The demo does not tell a client which worker it landed on, so the kernel is asked: the
    socket's inode in /proc/net/tcp, then the worker with a descriptor on it. A handshake that
    completed was accepted, so the inode is set and in that worker's descriptor table.
    """
    holders = holders_of_server_end(port, client.local_address[1], pids)
    assert len(holders) == 1, (client.local_address, holders)
    assert isinstance(holders[0], int)
    return holders[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_the_demo_with_two_workers_serves_its_page_and_echo_then_stops_on_a_signal(
    sig: signal.Signals,
) -> None:
    # Started with SIGINT ignored, as from a shell's background job: the supervisor's own
    # handler must still take it.
    argv = [sys.executable, "-m", "brioche", "--host", "127.0.0.1", "--port", "0", "--workers", "2"]
    sup = Supervisor(argv, DEMO_LISTENING, preexec_fn=ignore_sigint)
    clients: list[tuple[ClientConnection, int]] = []
    try:
        # The pids it printed are the processes it spawned.
        assert {int(pid) for pid in sup.listening["pids"].split()} == sup.pids
        assert len(sup.pids) == 2, sup.pids

        async with httpx.AsyncClient() as http:
            page = await http.get(f"http://127.0.0.1:{sup.port}/", timeout=10)
        assert (page.status_code, page.headers["content-type"]) == (200, "text/html; charset=utf-8")
        assert page.text == files("brioche").joinpath("demo.html").read_text(encoding="utf-8")

        async def echo_client_on(port: int) -> tuple[ClientConnection, int]:
            ws = await connect(f"ws://127.0.0.1:{port}/echo", open_timeout=10)
            return ws, accepting_worker(port, ws, sup.pids)

        clients = await clients_covering(sup.port, sup.pids, 2, echo_client_on)
        for i, (ws, pid) in enumerate(clients):
            await ws.send(f"héllo {i}")
            assert await asyncio.wait_for(ws.recv(), 10) == f"héllo {i}", f"client on {pid}"

        sup.proc.send_signal(sig)
        for ws, pid in clients:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 15)
            assert closed.value.rcvd is not None, f"client on {pid}"
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "server shutting down")
        # run() returns once every worker stopped, and the demo's main() with it: a clean exit.
        assert await asyncio.to_thread(sup.proc.wait, 20) == 0
        for pid in sup.pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", sup.port)
        # Everything the demo printed, once its output closed: its address, no warning, no traceback.
        await asyncio.to_thread(sup.reader.join, 10)
        assert not sup.reader.is_alive()
        assert sup.lines == [sup.listening[0]]
    finally:
        for ws, _ in clients:
            await ws.close()
        sup.stop()


def hello(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
    return server.text("hi")


def test_workers_are_for_run_only_and_checked_like_every_setter() -> None:
    config = server.handler(hello).workers(2)
    assert config.workers_count == 2
    assert server.workers(config, 3).workers_count == 3
    with pytest.raises(ValueError, match="workers\\(n\\) needs run\\(\\)"):
        config.serve()
    with pytest.raises(ValueError):
        config.workers(0)
    with pytest.raises(TypeError):
        config.workers(True)


def test_a_config_that_cannot_be_pickled_is_refused_before_any_worker_starts() -> None:
    config: server.Config[Any] = server.handler(lambda request, srv: server.text("hi"))
    config = config.hostname("127.0.0.1").port(0)
    with pytest.raises(TypeError, match="module-level functions"):
        server.run(config, workers=2)


def test_a_temporary_directory_too_deep_for_the_relay_sockets_is_named_before_any_worker_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers relay publishes over unix sockets under TMPDIR, whose paths may be 107 bytes
    at most. Under a deeper TMPDIR each worker failed to bind, with an error that named neither
    the path nor TMPDIR."""
    deep = tmp_path / ("d" * max(1, 100 - len(str(tmp_path))))
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    config = server.handler(hello).websocket(websocket.init()).hostname("127.0.0.1").port(0)
    with pytest.raises(ValueError) as raised:
        server.run(config, workers=2)
    message = str(raised.value)
    assert message.startswith(f"run(..., workers=n) relays publishes between the workers over unix sockets in {deep}/brioche-relay-")
    assert message.endswith(
        f"a unix socket's path is at most {_SUN_PATH - 1}): set TMPDIR (or tempfile.tempdir) to a shorter directory"
    ), message
    assert os.listdir(deep) == [], "the relay directory is removed"


def test_a_relay_socket_path_may_be_as_long_as_a_unix_socket_allows_and_no_longer() -> None:
    # "/0.sock" is 7 bytes: the longest path is the last worker's, "/9.sock" of ten.
    fits = "/" + "d" * (_SUN_PATH - 1 - 1 - 7)
    assert _relay_paths(fits, 10)[-1] == fits + "/9.sock"
    assert len(_relay_paths(fits, 10)[-1]) == _SUN_PATH - 1
    with pytest.raises(ValueError, match=rf"\({_SUN_PATH} bytes; a unix socket's path is at most {_SUN_PATH - 1}\)"):
        _relay_paths(fits + "d", 10)
    # Eleven workers: "/10.sock" is a byte longer than the rest.
    with pytest.raises(ValueError, match=rf"\({_SUN_PATH} bytes;"):
        _relay_paths(fits, 11)


@pytest.mark.parametrize("reuseport", [False, True])
def test_a_taken_port_is_a_bind_error_before_any_worker_starts(reuseport: bool) -> None:
    """Taken by a socket with SO_REUSEPORT too, as another run's workers hold it: Linux would let
    this run join that port's group and share its connections (the port's listeners then split
    the clients between two apps whose topics are not shared)."""
    with socket.socket() as taken:
        if reuseport:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = server.handler(hello).websocket(websocket.init()).hostname("127.0.0.1").port(port)
        with pytest.raises(brioche.BindError):
            server.run(config, workers=2)


@needs_ipv6
def test_every_address_of_the_hostname_is_reserved_before_any_worker_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hostname with two addresses (as ``localhost`` has on most machines: 127.0.0.1 and
    ::1), the port taken on the second: ``run`` raises ``BindError`` naming it, before any
    worker starts, as each worker binds every address. Only the first was reserved: each
    worker failed on the second and was restarted until the fifth crash in a row ended it with
    a ``RuntimeError``. (The resolver answers for the made-up name in this process only, where
    the reservation happens.)"""
    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "two.test":
            return real("127.0.0.1", *args, **kwargs) + real("::1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = server.handler(hello).websocket(websocket.init()).hostname("two.test").port(port)
        with pytest.raises(brioche.BindError, match=rf"^\[Errno 98\] cannot listen on ::1:{port}: "):
            server.run(config, workers=2)


@pytest.mark.parametrize("how", ["package", "directory"])
def test_handlers_in_a_package_s_main_module_are_one_clear_error(tmp_path: Path, how: str) -> None:
    """``python -m mypkg`` (or ``python mypkg/``) with the handlers in mypkg/__main__.py, ``run``
    under the main guard, as the docs advise for a script: ``spawn`` does not import such a
    ``__main__`` again in a worker, so no worker could find them. A ``TypeError`` names them
    before any worker starts. Before, the pickle check passed, and each worker failed to
    unpickle ("Can't get attribute 'fetch' on <module '__main__'>") until the fifth crash in a
    row."""
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "from brioche import server\n"
        "def fetch(request, srv):\n"
        "    return server.text('hi')\n"
        "if __name__ == '__main__':\n"
        "    server.handler(fetch).hostname('127.0.0.1').port(0).run(workers=2)\n"
    )
    argv = ["-m", "mypkg"] if how == "package" else ["mypkg"]
    done = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    where = " (mypkg.__main__)" if how == "package" else ""
    assert done.stderr.splitlines()[-1] == (
        f"TypeError: run(..., workers=n): fetch is defined in __main__{where}, which the workers "
        "cannot import: define the handlers in an importable module (as mypkg/app.py) and import "
        "them"
    ), done.stderr
    assert done.stderr.count("Traceback") == 1, done.stderr


class Unreadable(Exception):
    """An exception whose ``__init__`` formats its message: unpickled, it formats it again."""

    def __init__(self, path: str) -> None:
        super().__init__(f"cannot open {path}")


def test_a_start_error_that_does_not_copy_as_it_was_is_reported_by_its_summary() -> None:
    """A worker's exception that comes back from pickle other than it was ("cannot open cannot
    open /etc/app.toml") is not raised as that copy: ``WorkersFailed`` gives its summary."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    with reader, writer:
        _report_failure(writer, Unreadable("/etc/app.toml"))
        message = reader.recv()
    error = _start_error(message[1:])
    assert type(error) is WorkersFailed
    assert str(error) == "a worker could not start: Unreadable: cannot open /etc/app.toml"
    assert "(in the worker)" in str(error.__cause__)


@needs_ipv6
def test_port_0_is_one_port_on_every_address() -> None:
    reserved = _reserve_ports(["127.0.0.1", "::1"], 0)
    try:
        assert len({sock.getsockname()[1] for sock in reserved}) == 1
        assert [sock.getsockname()[0] for sock in reserved] == ["127.0.0.1", "::1"]
    finally:
        for sock in reserved:
            sock.close()


def test_run_with_workers_outside_the_main_guard_is_one_clear_error(tmp_path: Path) -> None:
    """A script that calls ``run(config, workers=n)`` at module level, without
    ``if __name__ == "__main__":``, runs it again in every worker as ``spawn`` imports the
    script. The supervisor says so, once, and stops. Before, each worker and each restart
    printed multiprocessing's "bootstrapping phase" traceback (600 lines for two workers)
    until the crash loop gave up."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from brioche import server\n"
        "def hello(request, srv):\n"
        "    return server.text('hi')\n"
        "server.handler(hello).hostname('127.0.0.1').port(0).run(workers=2)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "bootstrapping phase" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[-1] == (
        "brioche._workers.WorkersFailed: run(config, workers=n) ran again in each worker, as it "
        "imported the script: spawn imports the script in every worker to find its handlers, so "
        'the call must be under if __name__ == "__main__":'
    ), done.stderr
    assert done.stderr.count("Traceback") == 1, done.stderr
    assert "restarting" not in done.stderr


def test_a_worker_that_cannot_start_is_the_error_one_process_raises(tmp_path: Path) -> None:
    """A certificate that cannot be read fails each worker's ``serve()``. ``run`` raises what it
    raises in one process, a ``BriocheError`` naming the file, once, with the worker's
    traceback as its cause, and restarts nothing. Before, each worker printed its traceback
    and was restarted until the fifth crash in a row ended it with a ``RuntimeError``
    (``WorkersFailed``) that ``except BriocheError`` did not catch: 292 lines for two workers."""
    script = tmp_path / "no_cert.py"
    script.write_text(
        "import logging\n"
        "from brioche import server\n"
        "def hello(request, srv):\n"
        "    return server.text('hi')\n"
        "if __name__ == '__main__':\n"
        "    logging.basicConfig(level=logging.INFO)\n"
        f"    config = server.handler(hello).hostname('127.0.0.1').port(0).tls({str(tmp_path / 'cert.pem')!r}, 'key.pem')\n"
        "    server.run(config, workers=2)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"brioche.BriocheError: cannot read the certificate file {tmp_path / 'cert.pem'}: No such "
        "file or directory (os error 2)"
    ), done.stderr
    assert done.stderr.count("(in the worker)") == 1, done.stderr
    assert "restarting" not in done.stderr
    assert "Process brioche-worker" not in done.stderr


def test_a_worker_that_fails_to_start_again_is_given_up_on_in_one_line_each(tmp_path: Path) -> None:
    """Once serving, a worker restarted after a crash fails to import its app (the module raises
    while the config is unpickled): each failure is one WARNING line with the error, restarts
    back off, and the fifth in a row stops the server with ``WorkersFailed`` saying so. Before,
    each printed multiprocessing's traceback, and the give-up said "crashed"."""
    (tmp_path / "failing_app.py").write_text(
        "import os\n"
        "from brioche import server\n"
        f"if os.path.exists({str(tmp_path / 'down')!r}):\n"
        "    raise RuntimeError('the database is down')\n"
        "def hello(request, srv):\n"
        "    return server.text('hi')\n"
        "config = server.handler(hello).hostname('127.0.0.1').port(0)\n"
    )
    script = tmp_path / "main.py"
    script.write_text(
        "import logging, sys\n"
        "if __name__ == '__main__':\n"
        "    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')\n"
        f"    sys.path.insert(0, {str(tmp_path)!r})\n"
        "    import failing_app\n"
        "    from brioche import server\n"
        "    server.run(failing_app.config, workers=2)\n"
    )
    sup = Supervisor([sys.executable, str(script)], LISTENING)
    try:
        (tmp_path / "down").touch()
        victim = min(sup.pids)
        os.kill(victim, signal.SIGKILL)
        sup.proc.wait(60)
    finally:
        sup.stop()
    assert sup.proc.returncode == 1
    failures = [line for line in sup.lines if "before it was ready" in line]
    assert len(failures) == 5, sup.lines
    assert failures[0].startswith("WARNING brioche: worker "), failures
    assert failures[0].endswith(
        "exited with an error before it was ready: RuntimeError: the database is down; restarting it"
    ), failures
    assert "stopping the server" in failures[-1]
    assert sup.lines[-1].endswith("WorkersFailed: worker " + failures[0].split()[3] + " failed to start 5 times in a row")
    # The supervisor's own, of the WorkersFailed it ends with; none of the workers'.
    assert sum("Traceback" in line for line in sup.lines) == 1, sup.lines


async def test_a_worker_that_keeps_crashing_once_serving_is_restarted_every_time(supervisor_of: Any) -> None:
    """A worker killed six times, each time right after its restart reported ready (as a crash
    a client can set off), is restarted each time, with a backoff, and serves again: the other
    worker still serves the port, and a crash that lets it start is no reason to stop it. Before,
    the fifth crash within 5 s of a start stopped the whole server."""
    sup = supervisor_of(2)
    victim = min(sup.pids)
    for attempt in range(1, 7):
        os.kill(victim, signal.SIGKILL)
        died = sup.wait_for(re.compile(rf"WARNING brioche: worker (\d) \(pid {victim}\) exited with signal SIGKILL; restarting it"))
        restarted = sup.wait_for_lines(re.compile(rf"INFO brioche: worker {died[1]} restarted \(pid (\d+)\)$"), attempt)
        victim = int(restarted[-1][1])
        sup.pids.add(victim)
    backoffs = [line.rsplit(" in ", 1)[-1] for line in sup.lines if "restarting it in" in line]
    assert backoffs == ["0.25 s", "0.50 s", "1.00 s", "2.00 s", "4.00 s"], sup.lines
    assert sup.proc.poll() is None
    clients = await clients_covering(sup.port, {victim}, at_least=1)
    for ws, _ in clients:
        await ws.close()


async def blocked_and_killed(sup: Supervisor, stuck: ClientConnection, pid: int, timeout: float) -> int:
    """Block worker ``pid``'s loop from its client ``stuck``; once the worker wrote its stack
    and the supervisor killed and restarted it, the restarted worker's pid."""
    started = time.monotonic()
    await stuck.send("block 120")
    silent = sup.wait_for(re.compile(
        rf"ERROR brioche: worker (\d) \(pid {pid}\) has not run its event loop for ([\d.]+) s "
        r"\(a handler blocking it\?\), so its clients got no answer; its Python stack is on its "
        r"stderr: killing it$"
    ))
    # The timeout, and one beat more (a quarter of it) before the kill; the last beat came up
    # to a beat before the block, and the figure is rounded to a tenth.
    assert timeout <= float(silent[2]) <= time.monotonic() - started + timeout / 4 + 0.1
    sup.wait_for(re.compile(rf"WARNING brioche: worker {silent[1]} \(pid {pid}\) exited with signal SIGKILL; restarting it$"))
    restarted = sup.wait_for(re.compile(rf"INFO brioche: worker {silent[1]} restarted \(pid (\d+)\)"))
    # faulthandler's watchdog, on the worker's stderr, before the kill: the handler's frame.
    dump = sup.lines[: sup.lines.index(silent.string)]
    at = max(i for i, line in enumerate(dump) if re.fullmatch(r"Timeout \(\d+:\d\d:\d\d\)!", line))
    assert any(re.search(r'File ".*workers_app\.py", line \d+ in on_text', line) for line in dump[at:]), sup.lines
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(stuck.recv(), 10)
    assert closed.value.rcvd is None  # cut, no close frame: 1006
    return int(restarted[1])


async def test_a_worker_whose_loop_is_blocked_is_killed_with_its_stack_logged_and_restarted(
    supervisor_of: Any,
) -> None:
    """A handler that blocks its worker's loop (a synchronous call that hangs) left that worker
    alive and deaf for ever, while the kernel kept giving it its share of the new connections.
    With ``worker_timeout(3)``: handlers that block the loop 1 s at a time, for over two
    timeouts, are left alone (the loop beats between them); one that blocks it for good gets
    the worker's stack written (its frame in it), the worker killed and logged, and a new
    worker in its place."""
    sup = supervisor_of(2, worker_timeout=3)
    busy = min(sup.pids)
    clients = await clients_covering(sup.port, {busy}, 1)
    ws = next(ws for ws, pid in clients if pid == busy)
    # The others would not read what this one publishes, and their close would wait for it.
    for other, _ in clients:
        if other is not ws:
            await other.close()
    started = time.monotonic()
    rounds = 0
    while time.monotonic() - started < 7 and rounds < 20:
        await ws.send("block 1")
        # Published to every client; this one gets it once the block is over.
        assert await receive(ws, 1) == ["block 1"]
        rounds += 1
    assert time.monotonic() - started >= 7, f"only {rounds} rounds"
    assert not [line for line in sup.lines if "event loop" in line or "Timeout" in line], sup.lines
    assert spawned_children(sup.proc.pid) == sup.pids

    new_pid = await blocked_and_killed(sup, ws, busy, 3)
    sup.pids.add(new_pid)
    others = await clients_covering(sup.port, {new_pid}, 1)
    try:
        on_new = next(ws for ws, pid in others if pid == new_pid)
        await on_new.send("after")
        assert "after" in await receive(on_new, 1)
    finally:
        for other, _ in others:
            await other.close()


async def test_a_supervisor_stopped_with_its_workers_kills_none_of_them_when_resumed(
    supervisor_of: Any,
) -> None:
    """Ctrl+Z stops the supervisor and its workers together (SIGSTOP here, a little longer than
    their ``worker_timeout(3)``). Resumed, the supervisor may run before the workers and find
    every beat late: it allows one beat more before it takes that for a stuck loop, and kills
    nobody; a worker blocked afterwards is still found out."""
    sup = supervisor_of(2, worker_timeout=3)
    clients = await clients_covering(sup.port, sup.pids, 2)
    try:
        everyone = [sup.proc.pid, *sup.pids]
        for pid in everyone:
            os.kill(pid, signal.SIGSTOP)
        # The stop is the scenario itself.
        await asyncio.sleep(3.5)
        for pid in everyone:  # the supervisor first, as the kernel may well run it first
            os.kill(pid, signal.SIGCONT)
        # Then more than a timeout of traffic through every worker.
        started = time.monotonic()
        while time.monotonic() - started < 4:
            for ws, _ in clients:
                await ws.send("ping")
            for ws, _ in clients:
                assert await receive(ws, len(clients)) == ["ping"] * len(clients)
        assert not [line for line in sup.lines if "event loop" in line], sup.lines
        assert spawned_children(sup.proc.pid) == sup.pids
        victim = min(sup.pids)
        stuck = next(ws for ws, pid in clients if pid == victim)
        # The others would not read what it publishes, and their close would wait for it.
        for ws, _ in clients:
            if ws is not stuck:
                await ws.close()
        sup.pids.add(await blocked_and_killed(sup, stuck, victim, 3))
    finally:
        for ws, _ in clients:
            await ws.close()


async def test_a_worker_blocked_before_it_is_ready_is_found_out_too(supervisor_of: Any) -> None:
    """A worker serves the port from its start, before it reports ready (once linked to its
    siblings): a handler that blocks its loop then must be found out as later. Here a
    restarted worker waits for a sibling stopped with SIGSTOP, which cannot link; a client of
    the restarted one blocks its loop, and it is killed without ever having been ready. (The
    stopped sibling is killed too, a timeout after it stopped, and its successor links with the
    restarted worker: 6 s leaves the restarted worker's start and the search for it time to
    block it before it could report ready.)"""
    sup = supervisor_of(2, worker_timeout=6)
    a, b = sorted(sup.pids)
    os.kill(b, signal.SIGSTOP)
    os.kill(a, signal.SIGKILL)
    sup.wait_for(re.compile(rf"WARNING brioche: worker \d \(pid {a}\) exited with signal SIGKILL"))

    def successors() -> set[int]:
        return spawned_children(sup.proc.pid) - {a, b}

    assert await poll_until(lambda: len(successors()) == 1, 10)
    (restarted,) = successors()
    sup.pids.add(restarted)
    stuck = None
    for _ in range(40):  # half of the connections go to b, which answers none
        try:
            ws = await connect(f"ws://127.0.0.1:{sup.port}/ws", open_timeout=0.5)
        except (TimeoutError, asyncio.TimeoutError):  # two classes before 3.11
            continue
        greeting = await asyncio.wait_for(ws.recv(), 10)
        if greeting == f"pid {restarted}":
            stuck = ws
            break
        await ws.close()
    assert stuck is not None, "no connection reached the restarted worker"
    await stuck.send("block 120")
    sup.wait_for(re.compile(
        rf"ERROR brioche: worker \d \(pid {restarted}\) has not run its event loop for [\d.]+ s"
    ))
    assert not [line for line in sup.lines if f"restarted (pid {restarted})" in line], sup.lines
    # b, stopped all along, is named for what it is: no stack of it was written.
    assert sup.wait_for(re.compile(
        rf"ERROR brioche: worker \d \(pid {b}\) has been stopped \(SIGSTOP, a debugger\) for [\d.]+ s, so "
        r"its clients got no answer: killing it \(worker_timeout\(0\) while debugging one\)$"
    ))
    # A crash of a worker that served, not a failure to start (five of which in a row stop the
    # whole server): a client that blocks a worker still waiting for its siblings must not.
    sup.wait_for(re.compile(rf"WARNING brioche: worker \d \(pid {restarted}\) exited with signal SIGKILL; restarting it$"))
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(stuck.recv(), 10)


async def test_a_worker_that_stopped_but_does_not_exit_is_killed(supervisor_of: Any) -> None:
    """A worker stopped by a SIGTERM of its own closes its clients and ends its loop, then its
    interpreter waits for a thread the app started; its place stayed taken for as long (the
    supervisor restarts a worker once it has exited). Watched to its end, it is killed a
    ``worker_timeout`` later, and restarted."""
    sup = supervisor_of(2, worker_timeout=3)
    victim = min(sup.pids)
    clients = await clients_covering(sup.port, {victim}, 1)
    try:
        lingering = next(ws for ws, pid in clients if pid == victim)
        await lingering.send("linger 120")
        assert await receive(lingering, 1) == ["linger 120"]
        os.kill(victim, signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(lingering.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        stuck = re.compile(
            rf"ERROR brioche: worker (\d) \(pid {victim}\) stopped, but has not exited ([\d.]+) s "
            r"later: killing it$"
        )
        line = await asyncio.to_thread(sup.wait_for, stuck)
        assert float(line[2]) >= 3
        await asyncio.to_thread(sup.wait_for, re.compile(rf"worker {line[1]} \(pid {victim}\) exited with signal SIGKILL; restarting it$"))
        await asyncio.to_thread(sup.wait_for, re.compile(rf"INFO brioche: worker {line[1]} restarted"))
    finally:
        for ws, _ in clients:
            await ws.close()


def test_worker_timeout_is_checked_like_every_setter() -> None:
    config = server.handler(hello)
    assert config.worker_timeout_seconds == 30.0
    assert config.worker_timeout(0).worker_timeout_seconds == 0.0
    assert config.worker_timeout(1).worker_timeout_seconds == 1.0
    assert server.worker_timeout(config, 2.5).worker_timeout_seconds == 2.5
    with pytest.raises(ValueError, match="worker_timeout must be a number of seconds"):
        config.worker_timeout(-1)
    with pytest.raises(ValueError, match=r"worker_timeout must be 0 \(never\) or at least 1 second, got 0.5"):
        config.worker_timeout(0.5)
    with pytest.raises(TypeError, match="worker_timeout must be a number of seconds, got str"):
        config.worker_timeout("30")  # type: ignore[arg-type]


async def stats_from(port: int, pid: int) -> dict[str, Any]:
    """``GET /stats`` of worker ``pid``: new connections until the kernel gives one to it."""
    for _ in range(60):
        async with httpx.AsyncClient() as http:
            answer = (await http.get(f"http://127.0.0.1:{port}/stats", timeout=10)).json()
        if answer["pid"] == pid:
            return answer  # type: ignore[no-any-return]
    raise AssertionError(f"60 requests never reached worker {pid}")


async def test_stats_of_all_workers_sum_every_worker_s_and_carry_over_a_restart(supervisor_of: Any) -> None:
    """``stats(all_workers=True)`` answers the whole port's counters from whichever worker a
    scrape reaches: before, each worker knew only its own, and a scrape of the shared port got
    one worker's figures at random. A worker killed and restarted counts on from its
    predecessor's last snapshot, so the sum does not go back (as a counter reset would)."""
    sup = supervisor_of(2)
    a, b = sorted(sup.pids)
    clients = await clients_covering(sup.port, {a, b}, 2)
    try:
        on_a = next(ws for ws, pid in clients if pid == a)
        on_b = next(ws for ws, pid in clients if pid == b)
        for i in range(3):
            await on_a.send(f"a{i}")
        for i in range(5):
            await on_b.send(f"b{i}")
        for ws, _ in clients:  # each publish reaches every client: 8 each
            assert len(await receive(ws, 8)) == 8

        async def settled() -> tuple[dict[str, Any], dict[str, Any]]:
            # Each worker's file is as of its last second: asked until both have written it.
            for _ in range(50):
                from_a, from_b = await stats_from(sup.port, a), await stats_from(sup.port, b)
                if from_a["all"]["deliveries"] == from_b["all"]["deliveries"] == 8 * len(clients):
                    return from_a, from_b
                await asyncio.sleep(0.1)
            raise AssertionError(f"never settled: {from_a}, {from_b}")

        from_a, from_b = await settled()
        for answer in (from_a, from_b):
            total = answer["all"]
            assert total["messages_in"] == 8
            assert total["publishes"] == 8
            assert total["connections_opened"] == len(clients)
            assert total["open_connections"] == len(clients)
            # The HTTP requests are no WebSocket handshakes; nothing was refused or failed.
            assert total["handshakes_rejected"] == total["handler_errors"] == 0
        assert from_a["own"]["messages_in"] == 3 and from_b["own"]["messages_in"] == 5
        assert from_a["all"]["closes_by_code"] == from_b["all"]["closes_by_code"] == {}

        os.kill(a, signal.SIGKILL)
        sup.wait_for(re.compile(rf"WARNING brioche: worker \d \(pid {a}\) exited with signal SIGKILL"))
        # Logged once the supervisor took a's open connections out of the sum: b, asked before
        # a's successor is up, counts its own alone.
        on_a_gone = sum(1 for _, pid in clients if pid == a)
        from_b = await stats_from(sup.port, b)
        assert from_b["all"]["open_connections"] == len(clients) - on_a_gone
        assert from_b["all"]["messages_in"] == 8
        restarted = sup.wait_for(re.compile(r"INFO brioche: worker \d restarted \(pid (\d+)\)"))
        new = int(restarted[1])
        sup.pids.add(new)
        from_new = await stats_from(sup.port, new)
        total = from_new["all"]
        # a's counts, from its last snapshot, and b's; the gauges are the live workers' alone.
        assert total["messages_in"] == 8 and from_new["own"]["messages_in"] == 0
        assert total["open_connections"] == len(clients) - on_a_gone
        assert total["connections_opened"] == len(clients)

        # A worker that stops (SIGTERM: its clients closed with 1001) writes what it counted to
        # the end, and its successor counts on from there.
        os.kill(b, signal.SIGTERM)
        # Waited for in a thread: this loop's clients answer b's close frames meanwhile.
        exited = re.compile(rf"WARNING brioche: worker \d \(pid {b}\) exited with exit code 0; restarting it")
        await asyncio.to_thread(sup.wait_for, exited)
        restarts = re.compile(r"INFO brioche: worker \d restarted \(pid (\d+)\)")
        again = int((await asyncio.to_thread(sup.wait_for_lines, restarts, 2))[1][1])
        sup.pids.add(again)
        from_again = await stats_from(sup.port, again)
        total = from_again["all"]
        assert total["messages_in"] == 8 and total["deliveries"] == 8 * len(clients)
        assert total["connections_opened"] == len(clients)
        assert total["connections_closed"] == sum(1 for _, pid in clients if pid == b)
        assert total["closes_by_code"] == {"1001": total["connections_closed"]}  # keys: JSON's
        assert total["open_connections"] == 0
    finally:
        for ws, _ in clients:
            await ws.close()


def test_stats_of_all_workers_in_one_process_are_its_own() -> None:
    async def main() -> None:
        async with server.handler(hello).hostname("127.0.0.1").port(0).serve() as srv:
            assert srv.stats(all_workers=True) == srv.stats()
            with pytest.raises(TypeError, match="all_workers must be a bool"):
                srv.stats(all_workers=1)  # type: ignore[arg-type]

    asyncio.run(main())


def exited(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie its parent has not reaped yet has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):  # gone, or going as it is read
        return True
    return stat[stat.rindex(")") + 2] == "Z"


async def test_a_stopped_sibling_does_not_hold_the_others_graceful_stop(supervisor_of: Any) -> None:
    """Worker b is stopped (SIGSTOP, as a debugger or a frozen host would) while a's client
    publishes 3 MiB, which the relay is still writing to b when the supervisor gets SIGTERM:
    a closes its client with 1001 and exits at once. Before, its write to b was outside the
    wait for the stop, and a was killed 15 s later, its stop never done."""
    sup = supervisor_of(2)
    a, b = sorted(sup.pids)
    clients = await clients_covering(sup.port, {a}, 1)
    client = next(ws for ws, pid in clients if pid == a)
    os.kill(b, signal.SIGSTOP)
    try:
        big = "x" * (1024 * 1024)
        for _ in range(3):
            await client.send(big)
        assert await receive(client, 3) == [big] * 3
        sup.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(client.recv(), 12)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        # Bounded below the supervisor's 15 s before it kills a worker.
        assert await poll_until(lambda: exited(a), 12), f"worker {a} still running; log: {sup.lines}"
    finally:
        os.kill(b, signal.SIGCONT)
        for ws, _ in clients:
            await ws.close()
    assert await asyncio.to_thread(sup.proc.wait, 20) == 0
    assert not [line for line in sup.lines if f"pid {a}" in line and "killing" in line], sup.lines


async def test_sighup_without_tls_stops_the_workers_as_sigterm_does(supervisor_of: Any) -> None:
    """SIGHUP reloads the certificate under ``tls()``; without it there is nothing to reload,
    and the supervisor stops gracefully, as on SIGTERM (with a WARNING saying why). It was left
    to its default: the supervisor died alone, its workers stopped only on noticing it gone."""
    sup = supervisor_of(2)
    clients = await clients_covering(sup.port, sup.pids, 2)
    sup.proc.send_signal(signal.SIGHUP)
    for ws, pid in clients:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001, f"client on {pid}"
    assert await asyncio.to_thread(sup.proc.wait, 20) == 0
    await asyncio.to_thread(sup.reader.join, 10)
    assert any("SIGHUP: nothing to reload" in line for line in sup.lines), sup.lines


async def test_the_workers_log_as_the_supervisor_was_told_to() -> None:
    """``python -m brioche --workers 2 --log-level INFO``: a refused handshake is logged at INFO
    by the worker that refused it, in the supervisor's format. The workers, started afresh by
    ``spawn``, had no logging set up (the demo sets it up in ``main()``) and printed nothing."""
    argv = [sys.executable, "-m", "brioche", "--host", "127.0.0.1", "--port", "0", "--workers", "2",
            "--log-level", "INFO"]
    sup = Supervisor(argv, DEMO_LISTENING, preexec_fn=ignore_sigint)
    try:
        async with httpx.AsyncClient() as http:
            refused = await http.get(
                f"http://127.0.0.1:{sup.port}/echo",
                headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"},
                timeout=10,
            )
        assert refused.status_code == 400
        line = sup.wait_for(re.compile(r" INFO brioche\.http: .*"), timeout=10)
        assert re.search(r" INFO brioche\.http: refused a WebSocket handshake from 127\.0\.0\.1:\d+: 400, "
                         r"missing or invalid Sec-WebSocket-Key$", line[0]), line[0]
    finally:
        sup.stop()


def log_in_a_fresh_worker(supervisor_setup: str, worker_logs: str, tmp_path: Path) -> subprocess.CompletedProcess[bytes]:
    """Run ``supervisor_setup`` (code that sets up logging) in an interpreter playing the
    supervisor, and hand its ``_log_setup()`` to another, playing a worker started afresh, which
    copies it and runs ``worker_logs``: that one's output."""
    setup = tmp_path / "log_setup.pickle"
    supervisor = (
        "import logging, pickle, sys\n"
        "from brioche._workers import _log_setup\n"
        f"{supervisor_setup}"
        f"open({str(setup)!r}, 'wb').write(pickle.dumps(_log_setup()))\n"
    )
    subprocess.run([sys.executable, "-c", supervisor], capture_output=True, check=True, timeout=30)
    worker = (
        "import logging, pickle, sys\n"
        "from brioche._workers import _copy_log_setup\n"
        f"_copy_log_setup(pickle.loads(open({str(setup)!r}, 'rb').read()))\n"
        f"{worker_logs}"
    )
    return subprocess.run([sys.executable, "-c", worker], capture_output=True, check=True, timeout=30)


@pytest.mark.parametrize("style", ["%", "{", "$"])
def test_a_worker_copies_the_supervisor_s_log_format_in_its_own_style(tmp_path: Path, style: str) -> None:
    """A worker (a fresh interpreter: here, one started to play it) whose imports set up no
    logging takes the supervisor's format, whatever its style: a ``{`` format read as ``%``
    would be a ValueError at the worker's start, and every worker would crash-loop."""
    fmt = {"%": "%(levelname)s|%(name)s|%(message)s", "{": "{levelname}|{name}|{message}",
           "$": "${levelname}|${name}|${message}"}[style]
    done = log_in_a_fresh_worker(
        f"logging.basicConfig(format={fmt!r}, style={style!r})\n"
        "logging.getLogger('brioche').setLevel(logging.INFO)\n",
        "logging.getLogger('brioche.http').info('refused')\n",
        tmp_path,
    )
    assert done.stderr.decode().splitlines() == ["INFO|brioche.http|refused"]


def test_a_worker_is_silent_where_the_supervisor_s_root_logger_is(tmp_path: Path) -> None:
    """A ``NullHandler`` first on the supervisor's root logger (an app that silences logging):
    the worker adds one too. With none, logging's last resort printed its warnings."""
    done = log_in_a_fresh_worker(
        "logging.getLogger().addHandler(logging.NullHandler())\n",
        "logging.getLogger('app').warning('careful')\n",
        tmp_path,
    )
    assert (done.stdout, done.stderr) == (b"", b"")


@pytest.mark.parametrize("destination", ["file", "stdout"])
def test_a_worker_logs_where_the_supervisor_s_basic_config_writes(tmp_path: Path, destination: str) -> None:
    """``basicConfig(filename=...)``: a worker appends its lines to the same file, in the same
    format; ``basicConfig(stream=sys.stdout)``: to stdout. Before, only a plain stderr handler was
    copied: with a file, the workers' INFO lines were lost and their warnings printed bare on
    stderr ("WARNING from worker"), and stdout's went to stderr."""
    log = tmp_path / "app.log"
    where = f"filename={str(log)!r}" if destination == "file" else "stream=sys.stdout"
    done = log_in_a_fresh_worker(
        f"logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s', {where})\n"
        "logging.getLogger().info('from the supervisor')\n",
        "logging.getLogger('app').info('from a worker')\n"
        "logging.getLogger('app').warning('careful')\n",
        tmp_path,
    )
    assert done.stderr == b""
    worker_lines = ["INFO app: from a worker", "WARNING app: careful"]
    if destination == "file":
        assert log.read_text().splitlines() == ["INFO root: from the supervisor", *worker_lines]
        assert done.stdout == b""
    else:
        assert done.stdout.decode().splitlines() == worker_lines
