"""One PNG per scenario from benches/results.json: benches/charts/S1.png ...

Run by benches/run.py with the peers' venv (it has matplotlib): medians as bars, min–max as
error bars, brioche's bars in its own colour, "n/a" where a server has no result; a server
that does not run in a scenario (the handler variants run S1 and S2 only) has no bar there.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCHES = Path(__file__).resolve().parent
CHARTS = BENCHES / "charts"


def colour(name: str) -> str:
    if name.startswith("brioche"):
        return "#c8872f"
    if name == "rust-engine":
        return "#8c5a1c"
    if name == "bun":
        return "#6b6bd6"
    if name == "picows":
        return "#3d9970"
    return "#9a9a9a"


def main() -> None:
    data = json.loads((BENCHES / "results.json").read_text())
    CHARTS.mkdir(exist_ok=True)
    labels = {s["name"]: s["label"] for s in data["servers"]}
    names = [s["name"] for s in data["servers"]]
    quick = " (quick smoke run)" if data["settings"].get("quick") else ""
    for sc in data["scenarios"]:
        metrics = sc["metrics"]
        count = sum(1 for n in names if n in sc["results"])
        width = max(6.5, 0.55 * count)  # the echo scenarios have the handler variants' rows too
        # Up to three metrics side by side; more (S7's four cells) two to a row.
        cols = len(metrics) if len(metrics) <= 3 else 2
        rows = -(-len(metrics) // cols)
        fig, axes = plt.subplots(rows, cols,
                                 figsize=(width * cols, (4.6 + 0.08 * count) * rows), squeeze=False)
        for ax, m in zip(axes.flat, metrics):
            xs, meds, lo, hi, cols, na = [], [], [], [], [], []
            shown = [n for n in names if n in sc["results"]]  # rows that ran in this scenario
            for i, n in enumerate(shown):
                cell = sc["results"][n]
                s = cell.get(m["key"]) if "na" not in cell else None
                xs.append(i)
                cols.append(colour(n))
                if s is None:
                    meds.append(0.0)
                    lo.append(0.0)
                    hi.append(0.0)
                    na.append(i)
                else:
                    meds.append(s["median"])
                    lo.append(s["median"] - s["min"])
                    hi.append(s["max"] - s["median"])
            ax.bar(xs, meds, color=cols, yerr=[lo, hi], capsize=3, ecolor="#333333")
            top = max([abs(v) for v in meds] + [1e-9])
            for i in na:
                ax.text(i, top * 0.02, "n/a", ha="center", va="bottom", fontsize=8, rotation=90)
            for i, v in enumerate(meds):
                if i not in na:
                    # Ratios and seconds (S9, S10) need two decimals to tell 0.95 from 1.
                    text = (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10
                            else f"{v:.2f}")
                    ax.text(i, v, text, ha="center", va="bottom", fontsize=7)
            ax.set_xticks(xs)
            ax.set_xticklabels([labels[n] for n in shown], rotation=35, ha="right", fontsize=8)
            better = "higher" if m["higher_is_better"] else "lower"
            ax.set_ylabel(f"{m['label']} ({m['unit']}), {better} is better", fontsize=9)
            ax.axhline(0, color="#333333", linewidth=0.6)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{sc['id']}: {sc['title']}{quick} — median, min–max of "
                     f"{data['settings']['repeats']} run(s)", fontsize=11)
        fig.tight_layout()
        fig.savefig(CHARTS / f"{sc['id']}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
