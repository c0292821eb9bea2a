#!/usr/bin/env python3
"""One cell of S1, S2, S3, S7, S8, S9 or S10 for several builds or handler modes of brioche and
for the peers, interleaved.

    .venv/bin/python benches/ab.py new=.venv-3.12/bin/python:async \\
        old=/tmp/v312-old/bin/python:async sync=.venv-3.12/bin/python:sync [--rounds 10]
    .venv/bin/python benches/ab.py --cell 1m-binary brioche=.venv/bin/python:sync \\
        picows=peer:picows bun=peer:bun

Each variant is NAME=PYTHON:MODE, MODE one of brioche_server.py's handler modes (sync, async,
async-sleep0), or NAME=peer:SERVER, SERVER a row of run.py (picows, bun, socketify, ...).
``--cell`` is s1 (100 connections, 16 messages of 32 bytes in flight each), s2 (S2's round
trips, one in flight on each of 100 connections: the p50 in µs stands for the rate, lower is
better; the p90, p99, mean and round trips a second are printed beside it: with every
connection waiting on its one round trip, the mean is the connections over the rate), s3 (S3's fan-out; s3-1 and s3-256 with 1 and 256
messages outstanding), s10 (S10's fan-out of 1,024-byte messages, every subscriber reading), s5
(S5's connections/s), s8-churn (S8's subscribes+unsubscribes/s; s8 its deliveries/s, and a run
of either prints both), s9 (S9's handshakes/s; s5 and s9 sample no CPU), s9-open (S9's seconds
to open 10,000 idle connections after its handshakes: lower is better) or one of S7's
(64k-binary, 64k-text, 1m-binary, 1m-text: 10 connections, 4 in flight each); s1t and s3t are s1
and s3 over TLS. Every round starts each variant once (run.py's server start, CPU 0; load
generator on CPU 1; a 1.5 s warm-up, then a 4 s measured window), in turns, the order reversed
every other round, so the drift of a shared machine falls on all of them. Prints each run's rate
and the server's CPU time per message (µs: server CPU share ÷ rate, which other work on the
machine moves less than the rate) and, where the load generator reports it, its own CPU share
(near 100%, the client bounds the rate), then per variant the medians, and per pair of variants
the median of the per-round ratios. With ``--loop-probe``, each brioche run also records its
loop's rounds (loop_probe/sitecustomize.py) and prints what they did in the measured window.
Traffic: 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    FANOUT_WINDOWS, LARGE_CELLS, LARGE_CONNS, LARGE_INFLIGHT, OUT, TLS_SCENARIOS, CpuSampler,
    RunningServer, ServerSpec, loadgen, server_specs, tls_client_args, tls_server_env,
)

WARMUP, DURATION = 1.5, 4.0
# Each cell: the load generator's scenario, its arguments, and the rate it reports.
S1 = ("echo-throughput", {"conns": 100, "inflight": 16, "size": 32}, "msgs_per_s")
# S2's round-trip latency: its "rate" is the p50 in µs (lower is better; p99 printed beside it).
S2 = ("echo-latency", {"conns": 100, "size": 32}, "p50_us")
S3 = ("fanout", {"conns": 1000, "window": 32, "size": 32}, "deliveries_per_s")
# S9's handshake rate: bounded by its cycles, not by time, so no CPU window (shown as nan).
S9 = ("churn", {"cycles": 20000, "mark": 2000, "concurrency": 32, "echo": 0, "hold": 60},
      "conns_per_s_rest")
# S5's connection churn: connect, one echo, close; bounded by its cycles as S9's.
# S9's second figure: seconds to open 10,000 idle connections, 64 at a time, each with one echo
# (lower is better; no CPU window either), after S9's handshakes on the same server, as run.py
# runs it.
S9_OPEN = ("idle", {"conns": 10_000, "concurrency": 64, "hold": 60}, "connect_s")
S5 = ("churn", {"cycles": 50000, "mark": 5000, "concurrency": 32, "hold": 60}, "conns_per_s")
# S8's deliveries/s and its subscribe+unsubscribe rate: one run reports both.
S8 = ("topics", {"topics": 10_000, "per-topic": 10, "conns": 2_000, "churners": 100,
                 "window": 64, "size": 32}, "deliveries_per_s")
S8_CHURN = (S8[0], S8[1], "churn_ops_per_s")
# S10's first run: S3's fan-out with 1,024-byte messages, every subscriber reading.
S10 = ("fanout", {"conns": 1000, "window": 32, "size": 1024}, "deliveries_per_s")
# S10 with its slow reader: run with BENCH_BACKPRESSURE_LIMIT=1048576 in the environment, as
# run.py gives every server for S10.
S10_SLOW = ("fanout", {"conns": 1000, "window": 32, "size": 1024, "slow": 1}, "deliveries_per_s")
CELLS = {"s1": S1, "s2": S2, "s3": S3, "s5": S5, "s8": S8, "s8-churn": S8_CHURN, "s9": S9,
         "s9-open": S9_OPEN,
         "s10": S10, "s10-slow": S10_SLOW, **{
    sid.lower(): (S3[0], {**S3[1], "window": window}, S3[2])
    for sid, window in FANOUT_WINDOWS.items()
}, **{
    label.replace(" KiB", "k").replace(" MiB", "m").replace(" ", "-"):
        ("echo-throughput", {"conns": LARGE_CONNS, "inflight": LARGE_INFLIGHT, "size": size,
                             "binary": int(binary)}, "msgs_per_s")
    for _, label, size, binary in LARGE_CELLS}}
# Over TLS (run.py's certificate, and its CA for the load generator): s1t and s3t.
TLS_CELLS = {tls.lower(): plain.lower() for tls, plain in TLS_SCENARIOS.items()}
CELLS.update({tls: CELLS[plain] for tls, plain in TLS_CELLS.items()})


LOOP_PROBE = Path(__file__).resolve().parent / "loop_probe"
# A probe line's message counts, in the order loop_probe/sitecustomize.py writes them.
ROLES = ("echo", "sub", "pub", "churn", "topics", "other")


def rounds_summary(path: Path, start: float, end: float) -> str:
    """What the loop's rounds between `start` and `end` (``time.monotonic()``) did: one line
    from the probe's file (see loop_probe/sitecustomize.py)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        return f"no rounds recorded ({e})"
    rows = [line.split() for line in lines]
    rows = [r for r in rows if len(r) == 10 and start <= float(r[0]) < end]
    if not rows:
        return "no rounds recorded in the measured window"
    seconds = end - start
    handlers = sum(float(r[1]) for r in rows)
    writes = sum(float(r[2]) for r in rows)
    rounds = [float(r[1]) + float(r[2]) for r in rows]
    per_round = {role: sum(int(r[3 + i]) for r in rows) / len(rows) for i, role in enumerate(ROLES)}
    roles = ", ".join(f"{count:,.1f} {role}" for role, count in per_round.items() if count)
    return (f"{len(rows) / seconds:,.0f} rounds/s, median {statistics.median(rounds) * 1e3:.2f} ms "
            f"({handlers / seconds:.0%} of the time in drains and handlers, {writes / seconds:.0%} "
            f"in writes); messages a round: {roles or 'none'}")


def measure(name: str, spec: ServerSpec, cell: tuple[str, dict[str, int], str],
            duration: float = DURATION, tls: bool = False,
            loop_probe: Path | None = None) -> tuple[float, float, dict[str, Any]]:
    """One run: the cell's rate, the server's CPU µs per message, and the load generator's
    whole result; with `loop_probe`, brioche's loop rounds are recorded in that file
    (`loop_probe/`) and the result has the measured window's summary under "rounds"."""
    env = tls_server_env() if tls else {}
    if loop_probe is not None:
        path = os.pathsep.join(p for p in (str(LOOP_PROBE), os.environ.get("PYTHONPATH")) if p)
        env = {**env, "PYTHONPATH": path, "BRIOCHE_LOOP_PROBE_FILE": str(loop_probe)}
    srv = RunningServer(spec, OUT / "logs" / f"ab-{name}.log", env)
    err = srv.wait_ready()
    if err is not None:
        srv.stop()
        raise RuntimeError(f"{name} did not start: {err}")
    try:
        scenario, args, _ = cell
        if tls:
            args = {**args, **tls_client_args()}
        timed = scenario not in ("churn", "idle")
        sampler = CpuSampler(srv.pid, WARMUP + 0.5, duration - 0.6)
        if timed:
            sampler.start()
            args = {**args, "warmup": WARMUP, "duration": duration}
        # The CPU sampler's window, which the rounds' summary uses too.
        window = time.monotonic() + WARMUP + 0.5
        if cell is S9_OPEN:
            before = loadgen(S9[0], srv.port, S9[1], 70)
            if "error" in before:
                raise RuntimeError(f"{name}: {before['error']}")
            time.sleep(0.5)
        r = loadgen(scenario, srv.port, args, 70)
        if timed:
            sampler.join(5)
    finally:
        srv.stop()
    if "error" in r:
        raise RuntimeError(f"{name}: {r['error']}")
    if loop_probe is not None:
        r["rounds"] = rounds_summary(loop_probe, window, window + duration - 0.6)
    rate = float(r[cell[2]])
    cpu = sampler.pct if sampler.pct is not None else float("nan")
    # S2's "rate" is a latency: its CPU is per round trip, from the round trips it counted.
    per_s = float(r["msgs_per_s"]) if scenario == "echo-latency" else rate
    return rate, cpu / 100 / per_s * 1e6, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", metavar="NAME=PYTHON:MODE")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cell", choices=sorted(CELLS), default="s1")
    ap.add_argument("--duration", type=float, default=DURATION, help="measured seconds per run")
    ap.add_argument("--loop-probe", action="store_true",
                    help="record brioche's loop rounds (loop_probe/sitecustomize.py) into "
                    "benches/out/loop_probe/ and summarise each run's")
    ns = ap.parse_args()
    peers: dict[str, ServerSpec] | None = None
    variants: dict[str, ServerSpec] = {}
    for item in ns.variants:
        name, _, rest = item.partition("=")
        python, _, mode = rest.rpartition(":")
        if name and python == "peer":
            if peers is None:
                peers = {s.name: s for s in server_specs({}, None)}
            if mode not in peers or peers[mode].na:
                ap.error(f"no usable peer {mode!r}: {peers[mode].na if mode in peers else ''}")
            variants[name] = peers[mode]
            continue
        if not name or not python or mode not in ("sync", "async", "async-sleep0"):
            ap.error(f"want NAME=PYTHON:MODE or NAME=peer:SERVER, not {item!r}")
        # Absolute, not resolved: a venv's python is a symlink to the base interpreter.
        variants[name] = ServerSpec(name, name, [os.path.abspath(python), "brioche_server.py",
                                                 "{port}", "asyncio", mode])
    rates: dict[str, list[float]] = {n: [] for n in variants}
    cpus: dict[str, list[float]] = {n: [] for n in variants}
    for rnd in range(ns.rounds):
        order = list(variants) if rnd % 2 == 0 else list(reversed(variants))
        for name in order:
            probe = None
            if ns.loop_probe and variants[name].cmd[1:2] == ["brioche_server.py"]:
                probe = OUT / "loop_probe" / f"ab-{name}-{rnd + 1}.txt"
                probe.parent.mkdir(parents=True, exist_ok=True)
            rate, cpu, result = measure(name, variants[name], CELLS[ns.cell], ns.duration,
                                        tls=ns.cell in TLS_CELLS, loop_probe=probe)
            rates[name].append(rate)
            cpus[name].append(cpu)
            size = CELLS[ns.cell][1].get("size")
            if ns.cell == "s2":
                what = (f"p50 {rate:,.0f} µs, p90 {result['p90_us']:,.0f} µs, p99 "
                        f"{result['p99_us']:,.0f} µs, mean {result['mean_us']:,.0f} µs, "
                        f"{result['msgs_per_s']:,.0f} round trips/s, {cpu:.3f} CPU µs "
                        "per round trip")
            elif ns.cell == "s9":
                what = f"{rate:,.0f}/s, connect→101 p99 {result['handshake_p99_us']:,.0f} µs"
            elif ns.cell in ("s8", "s8-churn"):
                # One run makes both of S8's figures, which trade against each other: both shown.
                what = (f"{result['deliveries_per_s']:,.0f} deliveries/s, "
                        f"{result['churn_ops_per_s']:,.0f} subscribe+unsubscribe/s")
                if ns.cell == "s8":
                    what += f", {cpu:.3f} CPU µs per delivery"
            elif ns.cell == "s9-open":
                what = f"{rate:.3f} s to open them"
            elif ns.cell == "s5":
                what = f"{rate:,.0f}/s"
            else:
                what = (f"{rate:,.0f} msg/s ({rate * size / 1e6:,.0f} MB/s), {cpu:.3f} CPU µs/msg "
                        f"({cpu * 1000 / size:.3f} ns/B)")
            if "client_cpu_pct" in result:
                # A client near 100% bounds the rate whatever the server does.
                what += f", client CPU {result['client_cpu_pct']:.0f}%"
            print(f"round {rnd + 1} {name}: {what} (load average {os.getloadavg()[0]:.2f})",
                  flush=True)
            if "rounds" in result:
                print(f"    {result['rounds']}", flush=True)
    print()
    for name in variants:
        fmt = ",.3f" if ns.cell == "s9-open" else ",.0f"  # seconds there, not a rate
        print(f"{name}: rate median {statistics.median(rates[name]):{fmt}} "
              f"({min(rates[name]):{fmt}}-{max(rates[name]):{fmt}}), CPU µs/msg median "
              f"{statistics.median(cpus[name]):.3f} ({min(cpus[name]):.3f}-{max(cpus[name]):.3f})")
    for a, b in itertools.combinations(variants, 2):
        by_rate = statistics.median(x / y for x, y in zip(rates[a], rates[b]))
        by_cpu = statistics.median(y / x for x, y in zip(cpus[a], cpus[b]))
        print(f"{a} ÷ {b}: rate {by_rate:.3f}× (median of per-round ratios), "
              f"per CPU-second {by_cpu:.3f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
