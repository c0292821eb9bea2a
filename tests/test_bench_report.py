"""benches/run.py's verdicts: what benches/RESULTS.md's targets table says is met, and in how
many rounds, comes from `evaluate_targets` and `rounds_met` over results.json."""

from __future__ import annotations

import json
import operator
import sys
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent.parent / "benches"
sys.path.insert(0, str(BENCHES))
import run  # noqa: E402


def cell(key: str, *rounds: float | None) -> dict[str, Any]:
    """A server's cell as run.py keeps it: the median of its rounds, and each round's result
    (None: that round failed)."""
    values = sorted(v for v in rounds if v is not None)
    runs = [{key: v} if v is not None else {"error": "exited"} for v in rounds]
    return {key: {"median": values[len(values) // 2], "min": values[0], "max": values[-1]},
            "runs": runs}


def test_a_round_compares_the_servers_of_that_round() -> None:
    results = {"brioche": cell("rate", 10, 5, 10), "bun": cell("rate", 8, 8, 8)}
    assert run.rounds_met(results, ["brioche", "bun"], "rate", operator.ge) == (2, 3)
    # The medians (10 against 8) meet the target; the rounds say one of three missed it.
    assert run.median_of(results, "brioche", "rate") == 10


def test_a_failed_round_is_not_counted_and_a_missing_server_gives_no_rounds() -> None:
    results = {"brioche": cell("rate", 10, None, 7, 9), "bun": cell("rate", 8, 8, 8, 8)}
    # A round can report its rate and still have failed (lost messages, say).
    results["brioche"]["runs"][3]["error"] = "3 messages lost"
    assert run.rounds_met(results, ["brioche", "bun"], "rate", operator.ge) == (1, 2)
    results["bun"] = cell("rate", 8, 8)  # did not start in one round
    assert run.rounds_met(results, ["brioche", "bun"], "rate", operator.ge) is None
    results["bun"] = {"na": "not installed"}
    assert run.rounds_met(results, ["brioche", "bun"], "rate", operator.ge) is None
    assert run.median_of(results, "bun", "rate") is None


def committed() -> tuple[list[dict[str, Any]], dict[str, run.Scenario], list[run.ServerSpec]]:
    """results.json's targets table, and its scenarios and servers as `report_only` reads them."""
    data = json.loads((BENCHES / "results.json").read_text())
    saved, specs = run.saved_runs(data)
    return data["targets"], {sc.id: sc for sc in saved}, specs


def test_the_committed_table_is_what_evaluate_targets_says_of_the_committed_runs() -> None:
    targets, scen, specs = committed()
    assert json.loads(json.dumps(run.evaluate_targets(scen, specs))) == targets


def test_a_target_follows_the_medians_and_its_rounds_follow_each_round() -> None:
    _, scen, specs = committed()

    def s2_p50(targets: list[dict[str, Any]]) -> dict[str, Any]:
        (row,) = [t for t in targets
                  if t["target"] == "S2 p50 ≤ Bun" and t["server"] == "brioche-asyncio"]
        return row

    bun = scen["S2"].results["bun"]
    mine = scen["S2"].results["brioche-asyncio"]

    def brioche_p50_off_bun_by(us: int) -> dict[str, Any]:
        """The target once brioche's p50 is ``us`` over Bun's in every round and the median
        (whichever way the committed run went)."""
        for own, ref in zip(mine["runs"], bun["runs"]):
            own["p50_us"] = ref["p50_us"] + us
        mine["p50_us"]["median"] = bun["p50_us"]["median"] + us
        return s2_p50(run.evaluate_targets(scen, specs))

    before = brioche_p50_off_bun_by(1)
    assert before["rounds_met"][0] == 0
    after = brioche_p50_off_bun_by(-1)
    assert (before["met"], after["met"]) == (False, True)
    rounds = len(bun["runs"])
    assert after["rounds_met"] == (rounds, rounds)
    assert after["detail"].startswith(f"{bun['p50_us']['median'] - 1:,.0f} µs vs ")


def test_a_merge_keeps_the_build_each_row_of_the_table_ran_with() -> None:
    """A ``--merge`` of one scenario labelled every brioche row of the Servers table with the
    rerun's commit, though every other scenario's numbers came from the full run's build."""
    def spec(name: str, note: str, na: str | None = None) -> run.ServerSpec:
        return run.ServerSpec(name, name, ["python", "server.py"], None, note, na)

    old = [spec("bun", "Bun 1.2").as_json(), spec("brioche-asyncio", "brioche full-run").as_json(),
           spec("brioche-py312-sync", "", na=".venv-3.12 is missing").as_json(),
           spec("brioche-old", "brioche earlier --extra-server").as_json()]
    probed = [spec("bun", "Bun 1.3"), spec("brioche-asyncio", "brioche rerun"),
              spec("brioche-py312-sync", "brioche rerun 3.12"), spec("picows", "picows")]
    rows = run.merged_rows(probed, old)
    assert [(r.name, r.note) for r in rows] == [
        ("brioche-asyncio", "brioche full-run"),
        # Not run then: the rerun's row is the only one there is.
        ("brioche-py312-sync", "brioche rerun 3.12"),
        ("brioche-old", "brioche earlier --extra-server"),
        ("bun", "Bun 1.2"),
        ("picows", "picows"),
    ]
