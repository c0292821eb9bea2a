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
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import LOADGEN, MAIN_PY, OUT, RunningServer, ServerSpec, loadgen  # noqa: E402


def serve(workers: int, cpus: str) -> RunningServer:
    """run.py's server start (its own process group, log in benches/out/logs), on `cpus`."""
    if workers == 1:
        cmd = [str(MAIN_PY), "brioche_server.py", "{port}"]
    else:
        cmd = [str(MAIN_PY), "brioche_workers_server.py", "{port}", str(workers)]
    spec = ServerSpec(f"workers-{workers}", f"workers={workers}", cmd)
    srv = RunningServer(spec, OUT / "logs" / f"workers-{workers}.log", cpus=cpus)
    # With workers, ready once the supervisor logs that every worker listens: the port accepts
    # from the first one on, and S1's connections would all go to it.
    err = srv.wait_ready(log_line="workers listening" if workers > 1 else None)
    if err is not None:
        srv.stop()
        raise RuntimeError(f"the server did not start: {err}")
    return srv


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
            srv = serve(workers, ns.server_cpus)
            try:
                loads.append(os.getloadavg()[0])
                value = s1(srv.port, ns.duration)
                results[workers].append(value)
                print(f"repeat {repeat + 1}, workers={workers}: {value:,.0f} round trips/s "
                      f"(load average {loads[-1]:.2f})", flush=True)
            finally:
                srv.stop()
    summary = {f"workers={w}": {"median": statistics.median(v), "min": min(v), "max": max(v)}
               for w, v in results.items()}
    summary["load_average_1min"] = {"median": statistics.median(loads), "max": max(loads)}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
