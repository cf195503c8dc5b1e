#!/usr/bin/env python
"""The verdict on AEKT's two claims, across every protocol measured: one table and one forest plot.

Reads the committed results of ``accuracy.py`` (nothing is trained here) and gathers, per protocol, the
paired-by-seed differences of **test** accuracy that decide the questions a user asks:

* does DKD beat KD here (is the protocol one where decoupling matters)?
* the ratio-weighted explicit term: the default AEKT, and the best forms of the validation search, against
  DKD, on seeds the search never saw (the ``confirm`` tables);
* task separation: the best serial-layer form of the search against DKD (same runs);
* logit standardization with each loss (the ``standardize`` tables).

Writes ``results/verdict.md`` and ``results/verdict.png``::

    python benchmarks/verdict.py
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOLS = {  # file stem -> label
    "fmnist100": "Fashion-MNIST-100 (main)",
    "digits100": "digits-100 (demo)",
    "paperlike_digits100_cnn": "paper-like digits-100, CNN",
    "paperlike_digits100_mobile": "paper-like digits-100, mobile",
    "paperlike_digits100_cnn_T2_b2": "paper-like digits-100, CNN, T = 2 (gate met)",
    "paperlike_digits100_timm": "paper-like digits-100, timm ResNet (timm tasks)",
    "paperlike_digits100_timm_T2_b4": "paper-like digits-100, timm ResNet, T = 2, β = 4",
}
SERIAL = "AEKT S kd_cls, identity, lr×0.1, wd"
# (table kind, method a, method b, label)
COMPARISONS: tuple[tuple[str, str, str, str], ...] = (
    ("confirm", "KD", "CE", "KD − CE"),
    ("confirm", "DKD", "KD", "DKD − KD"),
    ("confirm", "AEKT", "DKD", "AEKT − DKD"),
    ("confirm", "AEKT w_max=1", "DKD", "AEKT w_max=1 − DKD"),
    ("confirm", "AEKT γ=2", "DKD", "AEKT γ=2 − DKD"),
    ("confirm", SERIAL, "DKD", "AEKT + serial S (kd_cls, S lr×0.1) − DKD"),
    ("standardize", "KD +std", "KD", "KD standardized − KD"),
    ("standardize", "DKD +std", "DKD", "DKD standardized − DKD"),
    ("standardize", "AEKT +std", "AEKT", "AEKT standardized − AEKT"),
)


def collect(results: Path = RESULTS) -> list[dict[str, Any]]:
    """One record per (comparison, protocol) whose table exists: the paired difference in points."""
    from aekt_plugin.demo.report import read_results
    from aekt_plugin.demo.stats import paired_difference

    rows = []
    for kind, a, b, label in COMPARISONS:
        for stem, protocol in PROTOCOLS.items():
            path = results / f"{stem}_{kind}.json"
            if not path.exists():
                continue
            d = paired_difference(read_results(path)["runs"], a, b)
            if d["n"] < 2:
                continue
            rows.append(
                {
                    "comparison": label,
                    "protocol": protocol,
                    "n": d["n"],
                    "seeds": d["seeds"],
                    "mean": 100 * d["mean"],
                    "ci_low": 100 * d["ci_low"],
                    "ci_high": 100 * d["ci_high"],
                    "within_noise": d["within_noise"],
                }
            )
    return rows


def _verdict(row: dict[str, Any]) -> str:
    if row["within_noise"]:
        return "within noise"
    return "better" if row["mean"] > 0 else "worse"


def _seeds(seeds: Sequence[int]) -> str:
    return f"{seeds[0]}–{seeds[-1]}" if list(seeds) == list(range(seeds[0], seeds[-1] + 1)) else str(seeds)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| comparison (test accuracy, points) | protocol | mean | 95 % interval | seeds | verdict |",
        "|---|---|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['comparison']} | {r['protocol']} | {r['mean']:+.2f} | "
            f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {_seeds(r['seeds'])} ({r['n']}) | {_verdict(r)} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """A forest plot of the comparisons that decide the claims (DKD − KD and everything against DKD): a
    band per comparison, a marker per protocol, the 95 % interval as a bar. The larger effects (KD − CE,
    standardization) stay in the table, where they do not squash the scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        r
        for r in rows
        if r["comparison"].endswith(("DKD − KD", "− DKD")) and "standardized" not in r["comparison"]
    ]
    comparisons = list(dict.fromkeys(r["comparison"] for r in rows))
    protocols = list(PROTOCOLS.values())
    markers = "osD^v<>"
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:red", "tab:olive"]
    step = 0.8 / len(protocols)
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(comparisons) + 1.8))
    for r in rows:
        k = protocols.index(r["protocol"])
        y = len(comparisons) - 1 - comparisons.index(r["comparison"]) + 0.4 - step * (k + 0.5)
        ax.errorbar(
            r["mean"],
            y,
            xerr=[[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]],
            fmt=markers[k],
            color=colors[k],
            mfc="white" if r["within_noise"] else colors[k],
            capsize=2.5,
            ms=5,
        )
    for k, protocol in enumerate(protocols):
        ax.plot([], [], markers[k], color=colors[k], label=protocol)
    for band in range(len(comparisons)):
        if band % 2:
            ax.axhspan(band - 0.5, band + 0.5, color="0.94", zorder=0)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(comparisons)))
    ax.set_yticklabels(list(reversed(comparisons)), fontsize=8.5)
    ax.set_ylim(-0.5, len(comparisons) - 0.5)
    ax.set_xlabel(
        "difference in test accuracy (points), paired by seed, 95 % interval\n"
        "(hollow marker: the interval contains 0, within noise)"
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Is AEKT worth choosing? Test accuracy on seeds no choice was made on")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the accuracy JSONs")
    args = parser.parse_args(argv)
    rows = collect(args.results)
    if not rows:
        print(f"no confirm or standardize results in {args.results}", file=sys.stderr)
        return 1
    table = markdown(rows)
    (args.results / "verdict.md").write_text(table)
    plot(rows, args.results / "verdict.png")
    print(table)
    missing = [c for c in dict.fromkeys(label for *_, label in COMPARISONS) if c not in table]
    if missing:
        print("not measured yet: " + ", ".join(missing), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
