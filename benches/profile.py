#!/usr/bin/env python3
"""Profile one server under one scenario: py-spy (Python + native frames) and perf.

    .venv/bin/python benches/profile.py                       # brioche (asyncio) under S1
    .venv/bin/python benches/profile.py --server rust-engine --scenario S3
    .venv/bin/python benches/profile.py --symbols             # brioche with an unstripped build
    .venv/bin/python benches/profile.py --scenario S7-64k-binary   # S7's cells: S7-{64k,1m}-{binary,text}
    .venv/bin/python benches/profile.py --server bun --scenario S3T   # over TLS: S1T, S3T

Same pinning as run.py (server on CPU 0, load generator on CPU 1). Two runs of the scenario:
one under ``py-spy record --native`` (a flame graph and raw folded stacks) and one under
``perf record -g`` (``perf report`` by symbol, self time). Everything lands in
``benches/out/profile/<server>-<scenario>-*``; ``*-summary.txt`` has the top entries of both.

py-spy sees only threads that run Python (the loop thread), not tokio's workers; perf sees
every thread of the server process.

The project's release profile strips the extension, so perf and py-spy cannot name brioche's
own Rust functions in it. ``--symbols`` builds an unstripped copy of the extension with
``maturin build`` (release profile with ``strip=false``, ``debug=1`` set through the
environment, nothing in the repository changed; target dir ``benches/out/target-prof``) into a
separate venv ``benches/out/venv-prof``, and profiles that. The pure-Rust server is built with
symbols anyway.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the same server specs, pinning and load generator)

PROFILE_DIR = run.OUT / "profile"
PROF_VENV = run.OUT / "venv-prof"
PROF_TARGET = run.OUT / "target-prof"

SCENARIO_ARGS = {
    "S1": ("echo-throughput", {"conns": 100, "inflight": 16, "size": 32}),
    "S2": ("echo-latency", {"conns": 100, "size": 32}),
    "S3": ("fanout", {"conns": 1000, "window": 32, "size": 32}),
    # S1 and S3 over TLS, as run.py's S1T and S3T (the load generator gets the CA: "ca" below).
    "S1T": ("echo-throughput", {"conns": 100, "inflight": 16, "size": 32, "ca": None}),
    "S3T": ("fanout", {"conns": 1000, "window": 32, "size": 32, "ca": None}),
    # S3 with 1 and 256 messages outstanding, as run.py's S3-1 and S3-256.
    **{sid: ("fanout", {"conns": 1000, "window": window, "size": 32})
       for sid, window in run.FANOUT_WINDOWS.items()},
    # S8 as run.py runs it: deliveries to 10,000 topics, and 100 connections (un)subscribing.
    "S8": ("topics", {"topics": 10_000, "per-topic": 10, "conns": 2_000, "churners": 100,
                      "window": 64, "size": 32}),
    # S7's four cells.
    **{f"S7-{tag}-{kind}": ("echo-throughput", {"conns": 10, "inflight": 4, "size": size,
                                                "binary": int(kind == "binary")})
       for tag, size in (("64k", 64 * 1024), ("1m", 1024 * 1024)) for kind in ("binary", "text")},
    # S9's handshakes: S5's churn without the echo, long enough to profile (about 10 s).
    "S9": ("churn", {"cycles": 400_000, "mark": 1_000, "concurrency": 32, "echo": 0, "hold": 60}),
    # S10's first run, every subscriber reading: S3 with run.py's 1,024-byte messages.
    "S10": ("fanout", {"conns": 1000, "window": 32, "size": run.SLOW_SIZE}),
}


def build_symbols_venv() -> Path:
    """An unstripped, release-optimised build of brioche in its own venv; returns its python."""
    py = PROF_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PROF_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "maturin>=1.7,<2",
                        "uvloop==0.23.0"], check=True)
    env = {**os.environ, "CARGO_TARGET_DIR": str(PROF_TARGET),
           "CARGO_PROFILE_RELEASE_STRIP": "false", "CARGO_PROFILE_RELEASE_DEBUG": "1"}
    wheels = run.OUT / "wheels-prof"
    shutil.rmtree(wheels, ignore_errors=True)
    run.log("maturin build --release (unstripped) into benches/out/wheels-prof")
    subprocess.run([str(PROF_VENV / "bin" / "maturin"), "build", "--release", "--quiet",
                    "--out", str(wheels), "-i", str(py)], cwd=run.REPO, env=env, check=True)
    wheel = next(wheels.glob("brioche-*.whl"))
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--force-reinstall",
                    "--no-deps", str(wheel)], check=True)
    return py


def top_folded(folded: Path, n: int = 40) -> list[str]:
    """Self time per leaf frame and inclusive time per frame from py-spy's folded stacks."""
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        self_t[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    out = [f"py-spy: {total} samples (all threads)", "", "self time, top leaf frames:"]
    out += [f"{100 * c / total:6.2f}%  {f}" for f, c in self_t.most_common(n)]
    out += ["", "inclusive time, top frames:"]
    out += [f"{100 * c / total:6.2f}%  {f}" for f, c in incl.most_common(n)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default="brioche-asyncio")
    ap.add_argument("--scenario", default="S1", choices=sorted(SCENARIO_ARGS))
    ap.add_argument("--seconds", type=float, default=8.0, help="profiled seconds per run")
    ap.add_argument("--symbols", action="store_true",
                    help="profile brioche from an unstripped build (benches/out/venv-prof)")
    ap.add_argument("--no-perf", action="store_true")
    ap.add_argument("--no-pyspy", action="store_true")
    ap.add_argument("--no-stat", action="store_true")
    ap.add_argument("--extra-server", action="append", default=[], metavar="NAME=PYTHON",
                    help="another build of brioche, as in run.py; then --server NAME profiles it")
    ns = ap.parse_args()
    run.raise_nofile()
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    extra = [(name, python) for name, _, python in (i.partition("=") for i in ns.extra_server)]
    specs = {s.name: s for s in run.server_specs({}, None, extra)}
    spec = specs[ns.server]
    if spec.na:
        print(f"{ns.server} is not available: {spec.na}", file=sys.stderr)
        return 1
    if ns.symbols and ns.server.startswith("brioche"):
        py = build_symbols_venv()
        spec.cmd = [str(py) if a == str(run.MAIN_PY) else a for a in spec.cmd]
    tag = f"{ns.server}-{ns.scenario}" + ("-sym" if ns.symbols else "")
    scenario, args = SCENARIO_ARGS[ns.scenario]
    server_env: dict[str, str] = {}
    if "ca" in args:
        # The bench servers serve TLS when these are set, as in run.py's S1T and S3T.
        files = run.tls_files()
        args = {**args, "ca": files["ca"]}
        server_env = {"BENCH_TLS_CERT": files["cert"], "BENCH_TLS_KEY": files["key"]}
    pyspy = run.PEERS_VENV / "bin" / "py-spy"
    summary: list[str] = [f"{tag}: {' '.join(spec.cmd)}", ""]

    def profiled(tool: str, cmd_for_pid) -> dict:  # type: ignore[no-untyped-def]
        server = run.RunningServer(spec, PROFILE_DIR / f"{tag}-{tool}-server.log", server_env)
        try:
            err = server.wait_ready()
            if err:
                raise SystemExit(f"server did not start: {err}")
            run.loadgen(scenario, server.port, {**args, "warmup": 0.2, "duration": 2}, 60)
            time.sleep(1)
            warmup = 1.0
            loadgen_args = {**args, "warmup": warmup, "duration": ns.seconds + 1.0}
            # Start the load, then attach the profiler once the warm-up is over.
            result: dict = {}

            def load() -> None:
                result.update(run.loadgen(scenario, server.port, loadgen_args, ns.seconds + 60))

            t = threading.Thread(target=load)
            t.start()
            time.sleep(warmup + 0.5)
            prof = subprocess.Popen(cmd_for_pid(server.pid), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            out, _ = prof.communicate(timeout=ns.seconds + 120)
            t.join(ns.seconds + 60)
            (PROFILE_DIR / f"{tag}-{tool}.log").write_text(out)
            return result
        finally:
            server.stop()

    if not ns.no_pyspy and pyspy.exists():
        folded = PROFILE_DIR / f"{tag}-pyspy.folded"
        svg = PROFILE_DIR / f"{tag}-pyspy.svg"
        for fmt, path in (("raw", folded), ("flamegraph", svg)):
            r = profiled(f"pyspy-{fmt}", lambda pid, fmt=fmt, path=path: [
                str(pyspy), "record", "--native", "--threads", "--rate", "200",
                "--duration", str(int(ns.seconds)),
                "--format", fmt, "--output", str(path), "--pid", str(pid)])
            summary.append(f"[py-spy {fmt}] load during profile: "
                           + ", ".join(f"{k}={v}" for k, v in r.items()
                                       if k in ("msgs_per_s", "deliveries_per_s", "p50_us", "mb_per_s")))
        if folded.exists():
            summary += top_folded(folded)
        summary.append("")
    if not ns.no_perf and shutil.which("perf"):
        data = PROFILE_DIR / f"{tag}-perf.data"
        r = profiled("perf", lambda pid: ["perf", "record", "-g", "-F", "999", "-o", str(data),
                                          "-p", str(pid), "--", "sleep", str(ns.seconds)])
        summary.append("[perf] load during profile: " + ", ".join(
            f"{k}={v}" for k, v in r.items() if k in ("msgs_per_s", "deliveries_per_s", "p50_us", "mb_per_s")))
        rep = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio",
                              "--percent-limit", "0.7", "--sort", "dso,sym", "-g", "none"],
                             capture_output=True, text=True)
        (PROFILE_DIR / f"{tag}-perf-report.txt").write_text(rep.stdout)
        summary += ["", "perf, self time by dso,symbol (>= 0.7%):"]
        summary += [line for line in rep.stdout.splitlines() if line and not line.startswith("#")]
        rep = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio",
                              "--sort", "comm,dso", "-g", "none"], capture_output=True, text=True)
        summary += ["", "perf, self time by thread name and dso:"]
        summary += [line for line in rep.stdout.splitlines() if line and not line.startswith("#")][:25]
    if not ns.no_stat and shutil.which("perf"):
        # Syscalls and context switches per delivered message (all threads of the server).
        events = ["context-switches", "cpu-migrations", "task-clock"] + [
            f"syscalls:sys_enter_{name}" for name in (
                "read", "write", "readv", "writev", "recvfrom", "sendto", "epoll_wait",
                "epoll_pwait", "futex", "sched_yield")]
        stat_out = PROFILE_DIR / f"{tag}-perf-stat.txt"
        r = profiled("perf-stat", lambda pid: [
            "perf", "stat", "-x", ",", "-o", str(stat_out), "-e", ",".join(events), "-p", str(pid),
            "--", "sleep", str(ns.seconds)])
        rate = r.get("msgs_per_s") or r.get("deliveries_per_s") or 0
        summary += ["", f"perf stat over {ns.seconds} s, per message ({rate:,.0f} msg/s):"]
        for line in stat_out.read_text().splitlines() if stat_out.exists() else []:
            parts = line.split(",")
            if len(parts) > 2 and parts[0].replace(".", "").isdigit():
                value, name = float(parts[0]), parts[2]
                per = value / (rate * ns.seconds) if rate else float("nan")
                summary.append(f"  {name:<36} {value:>14,.0f}  {per:8.3f} per message")
    out = PROFILE_DIR / f"{tag}-summary.txt"
    out.write_text("\n".join(summary) + "\n")
    run.log(f"wrote {out.relative_to(run.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
