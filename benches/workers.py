#!/usr/bin/env python3
"""S1 (echo throughput) against ``workers(2)`` and one worker, runs alternated.

    .venv/bin/python benches/workers.py [--repeats 5] [--duration 8] [--server-cpus 0]

The load generator is pinned to CPU 1 (``taskset -c 1``) and the server, every worker of it,
to ``--server-cpus`` (default CPU 0, as benches/run.py; ``0,1`` lets the workers use both and
share CPU 1 with the client). Each repeat runs one worker, then two, on a fresh server; the
medians and the load average before each run are printed. Traffic: 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import LOADGEN, MAIN_PY, SERVERS_DIR, free_port, loadgen, port_open, raise_nofile  # noqa: E402


def serve(workers: int, cpus: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    if workers == 1:
        argv = [str(MAIN_PY), "brioche_server.py", str(port)]
    else:
        argv = [str(MAIN_PY), "brioche_workers_server.py", str(port), str(workers)]
    proc = subprocess.Popen(["taskset", "-c", cpus, *argv], cwd=SERVERS_DIR, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=raise_nofile)
    if workers > 1:
        # Ready when the supervisor logs that every worker is: read its lines, bounded.
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        for line in proc.stderr:
            if "workers listening" in line or time.monotonic() > deadline:
                break
    deadline = time.monotonic() + 30
    while not port_open(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return proc, port


def s1(port: int, duration: float) -> float:
    r = loadgen("echo-throughput", port, {"conns": 100, "inflight": 16, "size": 32,
                                          "warmup": 2, "duration": duration}, duration + 60)
    if "error" in r:
        raise RuntimeError(r["error"])
    return float(r["msgs_per_s"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--server-cpus", default="0")
    ns = ap.parse_args()
    if not LOADGEN.exists():
        sys.exit("build the load generator first: cargo build --release in benches/loadgen")
    results: dict[int, list[float]] = {1: [], 2: []}
    loads: list[float] = []
    for repeat in range(ns.repeats):
        for workers in (1, 2):
            proc, port = serve(workers, ns.server_cpus)
            try:
                loads.append(os.getloadavg()[0])
                value = s1(port, ns.duration)
                results[workers].append(value)
                print(f"repeat {repeat + 1}, workers={workers}: {value:,.0f} round trips/s "
                      f"(load average {loads[-1]:.2f})", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    summary = {f"workers={w}": {"median": statistics.median(v), "min": min(v), "max": max(v)}
               for w, v in results.items()}
    summary["load_average_1min"] = {"median": statistics.median(loads), "max": max(loads)}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
