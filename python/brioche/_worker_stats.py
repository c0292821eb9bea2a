"""Every worker's counters, for ``srv.stats(all_workers=True)`` under ``run(config, workers=n)``.

Each worker writes its ``stats()`` to a file of its own in the run's directory (beside the
relay's sockets) once a second, and as it stops; any worker sums the files. A scrape then
gets the whole port's counters from whichever worker the kernel gave it, and two scrapes that
reach different workers agree: every figure is a sum of snapshots, each as of its worker's
last second, so a counter never goes back between them. A restarted worker starts its counters
from its predecessor's last snapshot, so a restart does not look like a reset either (the
counts of the crashed worker's last second are lost; the gauges start afresh).

Imported by ``_server`` (the sum) and ``_workers`` (the writing); it imports neither.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

# Current values, not counts: summed over the workers, never carried over a restart.
GAUGES = frozenset({"open_connections", "incoming_bytes", "redis_connected"})


def path_of(directory: str, index: int) -> str:
    return os.path.join(directory, f"{index}.stats.json")


def _read(path: str) -> dict[str, Any] | None:
    """A worker's last snapshot, or None if it wrote none yet (or its file cannot be read)."""
    try:
        with open(path, encoding="utf-8") as f:
            stats: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    stats["closes_by_code"] = {int(code): n for code, n in stats.get("closes_by_code", {}).items()}
    return stats


def _add(total: dict[str, Any], stats: dict[str, Any], *, gauges: bool = True) -> None:
    for key, value in stats.items():
        if key == "closes_by_code":
            codes = total.setdefault(key, {})
            for code, n in value.items():
                codes[code] = codes.get(code, 0) + n
        elif isinstance(value, int) and (gauges or key not in GAUGES):
            total[key] = total.get(key, 0) + value


class Snapshots:
    """One worker's side: its file, and the counts its predecessor at that index left."""

    def __init__(self, directory: str, index: int) -> None:
        self.path = path_of(directory, index)
        self.base: dict[str, Any] = {}
        self.written: dict[str, Any] | None = None
        previous = _read(self.path)
        if previous is not None:
            _add(self.base, previous, gauges=False)

    def write(self, stats: dict[str, Any]) -> None:
        """Replace the file with ``stats`` plus the base, unless that is what it holds."""
        total: dict[str, Any] = {}
        _add(total, self.base)
        _add(total, stats)
        if total != self.written and _write(self.path, total):
            self.written = total

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _write(path: str, stats: dict[str, Any]) -> bool:
    """Replace the file at ``path`` whole: a reader sees the old or the new. False if it could
    not be written."""
    stats = {**stats, "closes_by_code": {str(code): n for code, n in stats.get("closes_by_code", {}).items()}}
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(stats, f)
        os.replace(partial, path)
        return True
    except OSError:
        # The directory is gone (the supervisor removed it as the run ended): nothing to
        # report to.
        try:
            os.unlink(partial)
        except OSError:
            pass
        return False


def zero_gauges(directory: str, index: int) -> None:
    """The supervisor's, for a worker that died: its counters stay in the sum, its current
    values (open connections and the like) went with it."""
    path = path_of(directory, index)
    stats = _read(path)
    if stats is not None and any(stats.get(key) for key in GAUGES):
        _write(path, {**stats, **{key: 0 for key in GAUGES if key in stats}})


def total(directory: str, workers: int, keys: Iterable[str]) -> dict[str, Any]:
    """The sum of every worker's last snapshot; those of ``keys`` no worker wrote are 0."""
    result: dict[str, Any] = {key: 0 for key in keys}
    result["closes_by_code"] = {}
    for index in range(workers):
        stats = _read(path_of(directory, index))
        if stats is not None:
            _add(result, stats)
    return result
