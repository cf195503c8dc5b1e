r"""Summary statistics of the accuracy tables: mean ± std per method and paired-by-seed differences.

For methods ``A`` and ``B`` run with the same seeds ``s = 1..n`` (same initialisation and batch order),
the paired difference is ``d_s = acc_A(s) - acc_B(s)``; its 95% interval is
``mean(d) ± t_{0.975, n-1} · std(d) / √n`` (Student's t, ``std`` with ``n-1`` in the denominator).
When that interval contains 0 the difference is *within noise*. Collapsed runs (accuracy near chance,
:func:`~aekt_plugin.demo.train.is_collapsed`) are counted and reported, and left out of means and
differences rather than averaged in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["paired_difference", "summarize", "t_quantile"]

# two-sided 95% (one-sided 0.975) quantiles of Student's t, df = 1..30
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (exact table to 30, then the
    Cornish-Fisher expansion around the normal quantile 1.95996)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def summarize(runs: Iterable[Mapping[str, Any]], *, metric: str = "accuracy") -> dict[str, dict[str, Any]]:
    """Per method (in order of first appearance): ``n`` runs, ``n_collapsed``, and ``mean``/``std`` of
    ``metric`` (test ``"accuracy"``, or ``"val_accuracy"``) over the runs that did not collapse (``nan``
    when every run collapsed)."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        rec = out.setdefault(r["method"], {"n": 0, "n_collapsed": 0, "accuracies": [], "collapsed_seeds": []})
        rec["n"] += 1
        if r.get("collapsed"):
            rec["n_collapsed"] += 1
            rec["collapsed_seeds"].append(r["seed"])
        else:
            rec["accuracies"].append(float(r[metric]))
    for rec in out.values():
        rec["mean"], rec["std"] = _mean_std(rec["accuracies"])
    return out


def paired_difference(
    runs: Iterable[Mapping[str, Any]], method_a: str, method_b: str, *, metric: str = "accuracy"
) -> dict[str, Any]:
    """``metric(method_a) - metric(method_b)`` paired by seed, over seeds where both ran and neither
    collapsed (``metric``: test ``"accuracy"``, or ``"val_accuracy"``).

    Returns ``{"a", "b", "n", "seeds", "mean", "std", "ci_low", "ci_high", "within_noise"}``; with fewer
    than two pairs the interval is ``nan`` and ``within_noise`` is ``True`` (nothing can be claimed).
    """
    by_seed: dict[str, dict[Any, Mapping[str, Any]]] = {method_a: {}, method_b: {}}
    for r in runs:
        if r["method"] in by_seed:
            by_seed[r["method"]][r["seed"]] = r
    seeds = sorted(
        s
        for s in by_seed[method_a]
        if s in by_seed[method_b]
        and not by_seed[method_a][s].get("collapsed")
        and not by_seed[method_b][s].get("collapsed")
    )
    diffs = [float(by_seed[method_a][s][metric]) - float(by_seed[method_b][s][metric]) for s in seeds]
    mean, std = _mean_std(diffs)
    n = len(diffs)
    if n >= 2:
        half = t_quantile(n - 1) * std / math.sqrt(n)
        low, high = mean - half, mean + half
        within = low <= 0.0 <= high
    else:
        low = high = float("nan")
        within = True
    return {
        "a": method_a,
        "b": method_b,
        "n": n,
        "seeds": seeds,
        "mean": mean,
        "std": std,
        "ci_low": low,
        "ci_high": high,
        "within_noise": within,
    }
