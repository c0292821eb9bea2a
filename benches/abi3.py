#!/usr/bin/env python3
"""The abi3 extension against a version-specific one of the same commit, in S1 and S3.

    .venv/bin/python benches/abi3.py --other /tmp/brioche-vs/.venv/bin/python [--rounds 4]

`.venv` has the abi3 wheel (`make wheel`, then pip install dist/*.whl); `--other` is a venv of
the same CPython with a build without the "abi3" feature (pyproject.toml's features =
["python"]). run.py's cells (server on CPU 0, load generator on CPU 1, a warm-up run, then one
8-second measured run), alternated: each round runs both builds, in turns, first one first then
the other, so drift of a shared machine falls on both. Prints each run, then the medians,
min-max and the ratio of the medians, of the rate and of the rate per CPU-second of the server
(rate / server CPU share: less sensitive to other work on the machine taking CPU 0 from the
server, though not to what it does to the caches); writes benches/out/abi3.json. Not part of run.py:
RESULTS.md's "abi3" section quotes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--other", required=True, help="python of the version-specific build's venv")
    ap.add_argument("--rounds", type=int, default=4)
    ns = ap.parse_args()
    err = run.cargo_build(run.BENCHES / "loadgen" / "Cargo.toml")
    if err is not None:
        print(f"the load generator does not build: {err}", file=sys.stderr)
        return 1
    builds = {"abi3": str(run.MAIN_PY), "specific": ns.other}
    specs = [run.brioche_spec(name, name, python) for name, python in builds.items()]
    for spec in specs:
        probe = run.sh(spec.probe or [], timeout=60)
        print(f"{spec.name}: {spec.cmd[0]}: {probe.stdout.split()} {run.extension_build(spec.cmd[0])}")
    cfg = run.settings(False, None, 1)
    scenarios = [sc for sc in run.SCENARIOS if sc.id in ("S1", "S3")]
    runs: dict[str, dict[str, list[float]]] = {sc.id: {s.name: [] for s in specs} for sc in scenarios}
    per_cpu: dict[str, dict[str, list[float]]] = {sc.id: {s.name: [] for s in specs} for sc in scenarios}
    for rnd in range(ns.rounds):
        order = specs if rnd % 2 == 0 else specs[::-1]
        for sc in scenarios:
            key = sc.metrics[0].key
            for spec in order:
                cell = run.run_cell(sc, spec, cfg)
                values = [r[key] for r in cell["runs"] if "error" not in r]
                if not values:
                    print(f"{sc.id} {spec.name}: {cell.get('na') or cell['errors']}", file=sys.stderr)
                    return 1
                runs[sc.id][spec.name].extend(values)
                cpu = next(r.get("server_cpu_pct") for r in cell["runs"] if "error" not in r)
                if cpu:
                    per_cpu[sc.id][spec.name].append(values[0] / (cpu / 100))
                print(f"round {rnd + 1} {sc.id} {spec.name}: {values[0]:,.0f} {key}, server CPU "
                      f"{cpu or 0:.0f}%", flush=True)
    summary: dict[str, Any] = {}
    for sc in scenarios:
        summary[sc.id] = {}
        for what, table in ((sc.metrics[0].key, runs), ("per server CPU-second", per_cpu)):
            med = {name: statistics.median(v) for name, v in table[sc.id].items()}
            ratio = med["abi3"] / med["specific"]
            summary[sc.id][what] = {"runs": table[sc.id], "median": med, "ratio": ratio}
            spread = ", ".join(f"{n} {med[n]:,.0f} ({min(v):,.0f}-{max(v):,.0f})"
                               for n, v in table[sc.id].items())
            print(f"{sc.id} {what}: {spread}; abi3/specific {ratio:.3f}")
    run.OUT.mkdir(exist_ok=True)
    (run.OUT / "abi3.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
