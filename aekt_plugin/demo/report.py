"""Results of a table: the JSON file, the markdown table and the PNG plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .stats import paired_difference, summarize

__all__ = ["format_table", "plot_results", "read_results", "write_results"]

RESULTS_SCHEMA_VERSION = 1


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_results(path: str | Path, protocol: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``{"schema_version", "protocol": {...}, "runs": [...], "summary": {...}}`` as JSON.

    Each run has at least ``method``, ``seed``, ``accuracy`` (last epoch, test split, in ``[0, 1]``) and
    ``collapsed``. Non-finite numbers are written as the strings ``"nan"``/``"inf"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {m: {k: v for k, v in s.items() if k != "accuracies"} for m, s in summarize(runs).items()}
    blob = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "protocol": dict(protocol),
        "runs": list(runs),
        "summary": summary,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(blob), indent=1) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file while a table runs
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    blob = json.loads(Path(path).read_text())
    for r in blob["runs"]:
        for metric in ("accuracy", "val_accuracy"):
            if isinstance(r.get(metric), str):
                r[metric] = float(r[metric])
    return blob


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.2f}"


def format_table(
    runs: Sequence[Mapping[str, Any]],
    *,
    compare: Sequence[tuple[str, str]] = (("KD", "CE"), ("DKD", "KD"), ("AEKT", "KD"), ("AEKT", "DKD")),
    title: str | None = None,
    descriptions: Mapping[str, str] | None = None,
    metric: str = "accuracy",
) -> str:
    """A markdown table of mean ± std accuracy (%) per method with collapsed-run counts, followed by the
    paired-by-seed differences ``compare`` with their 95% t-intervals; ``metric`` is the test
    ``"accuracy"`` or the ``"val_accuracy"``."""
    summary = summarize(runs, metric=metric)
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    has_desc = bool(descriptions)
    label = "validation accuracy" if metric == "val_accuracy" else "accuracy"
    head = f"| method | {label} (%) mean ± std | runs | collapsed |" + (
        " configuration |" if has_desc else ""
    )
    lines += [head, "|---|---|---|---|" + ("---|" if has_desc else "")]
    for m, s in summary.items():
        acc = "all collapsed" if not s["accuracies"] else f"{_pct(s['mean'])} ± {_pct(s['std'])}"
        row = f"| {m} | {acc} | {s['n']} | {s['n_collapsed']} |"
        if has_desc:
            row += f" {descriptions.get(m, '')} |"  # type: ignore[union-attr]
        lines.append(row)
    diffs = [
        paired_difference(runs, a, b, metric=metric) for a, b in compare if a in summary and b in summary
    ]
    if diffs:
        lines += [
            "",
            "| paired by seed | mean difference (points) | 95% interval | n | verdict |",
            "|---|---|---|---|---|",
        ]
        for d in diffs:
            if d["n"] < 2:
                verdict = "too few pairs"
            elif d["within_noise"]:
                verdict = "within noise"
            else:
                verdict = f"{d['a']} {'better' if d['mean'] > 0 else 'worse'}"
            lines.append(
                f"| {d['a']} − {d['b']} | {100 * d['mean']:+.2f} | "
                f"[{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}] | {d['n']} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def plot_results(runs: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """A PNG: one row per method, each seed a dot (collapsed runs as red crosses), mean ± std bars."""
    from ._deps import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    summary = summarize(runs)
    methods = list(summary)
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(methods) + 1.4))
    for i, m in enumerate(methods):
        y = len(methods) - 1 - i
        ok = [100 * float(r["accuracy"]) for r in runs if r["method"] == m and not r.get("collapsed")]
        bad = [100 * float(r["accuracy"]) for r in runs if r["method"] == m and r.get("collapsed")]
        ax.scatter(ok, [y] * len(ok), s=14, color="tab:blue", alpha=0.7, zorder=3)
        if bad:
            bad = [0.0 if math.isnan(b) else b for b in bad]
            ax.scatter(bad, [y] * len(bad), marker="x", color="tab:red", zorder=3)
        s = summary[m]
        if s["accuracies"]:
            std = 0.0 if math.isnan(s["std"]) else 100 * s["std"]
            ax.errorbar(100 * s["mean"], y, xerr=std, fmt="|", color="black", ms=14, capsize=3, zorder=4)
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels(list(reversed(methods)))
    ax.set_xlabel("test accuracy (%), last epoch\n(dots: seeds; bars: mean ± std; red ×: collapsed runs)")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
