r"""The pass/fail targets of the fused AEKT loss (``aekt_fused``), judged at each shape.

Two tiers, by the number of logits:

* ``B·C >= 131072`` ("memory" tier, e.g. (512, 1000), (1024, 1000)), where passes over memory dominate:
  time ≤ 1.15 × ``kd_plain`` and ≤ 0.35 × ``dkd_mdistiller``;
* smaller ("overhead" tier, e.g. (64, 100), (256, 100)), where the cost per ATen call dominates:
  time ≤ 2 × ``kd_plain`` and ≤ 0.5 × ``dkd_mdistiller``.

At every shape: time ≤ 0.5 × ``aekt_reference``; bytes kept for backward (unique saved storages plus
tensors on ``ctx``) ≤ those of ``kd_plain``, and ≤ two ``B×C`` tensors of the logits' dtype plus
64 bytes per sample (the kernel keeps one ``B×C`` tensor, ``docs/derivations.md`` section 7). Times are
the paired ratios of :func:`aekt_plugin.bench.timing.summarise`.

In the overhead tier the fused AEKT also costs ≤ 1.25 × the fused DKD (its weight rule must not double the
per-call cost).

Off the tuned path (:mod:`~aekt_plugin.bench.offpath`):

* ``compiled``, ``(4096, 8192)``: compiled AEKT ≤ 1.25 × compiled ``kd_plain`` and ≤ 1.0 × the eager AEKT
  (compiling must not make it slower); the eager AEKT ≤ 1.5 × compiled ``kd_plain``;
* ``dense``, ``(8, 19, 256, 512)``: extra peak memory ≤ 2.0 inputs, time ≤ 1.1 × ``kd_plain`` on the same
  layout;
* ``memory``, ``(8192, 16384)``: extra peak memory ≤ 2.0 inputs in float32, ≤ 2.5 with bfloat16 inputs.

The targets are defined for fp32 (the ``memory`` row's bfloat16 figure aside) on one CPU thread; on another
device, dtype or thread count they are still judged, and the result says that they are indicative only.
Each judged target is ``{name, value, limit, passed}``; :func:`describe` words a missed one.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "MEMORY_TIER_NUMEL",
    "OFFPATH_LIMITS",
    "describe",
    "judge",
    "judge_offpath",
    "judged_on",
    "shape_tier",
]

MEMORY_TIER_NUMEL = 131072
"""``B·C`` from which a shape is in the "memory" tier (passes over memory dominate)."""

_TIER_LIMITS = {  # tier -> (time × kd_plain, time × dkd_mdistiller)
    "memory": (1.15, 0.35),
    "overhead": (2.0, 0.5),
}
_REFERENCE_LIMIT = 0.5
_DKD_FUSED_LIMIT = 1.25
"""Overhead tier: the fused AEKT against the fused DKD, the same kernel with a constant weight rule."""
_O_B_BYTES_PER_SAMPLE = 64
"""Allowance per sample for the ``O(B)`` part of the saved-bytes bound (eight 8-byte scalars per row)."""


def shape_tier(batch: int, classes: int) -> str:
    """``"memory"`` when ``B·C >= 131072`` (passes over memory dominate), else ``"overhead"``."""
    return "memory" if batch * classes >= MEMORY_TIER_NUMEL else "overhead"


def _kept_bytes(method: dict[str, Any]) -> int:
    return method["saved_bytes_unique"] + method["ctx_attr_bytes"]


def judge(
    batch: int, classes: int, methods: dict[str, dict[str, Any]], element_size: int
) -> list[dict[str, Any]]:
    """The targets of ``aekt_fused`` at shape ``(batch, classes)``: ``{name, value, limit, passed}`` each.

    ``methods`` maps a method name to its figures (``ratio_<baseline>``, ``saved_bytes_unique``,
    ``ctx_attr_bytes``); a target whose baseline was not measured is left out, and none is judged without
    ``aekt_fused``.
    """
    if "aekt_fused" not in methods:
        return []
    fused = methods["aekt_fused"]
    vs_kd, vs_dkd = _TIER_LIMITS[shape_tier(batch, classes)]
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float) -> None:
        if value is not None:
            checks.append({"name": name, "value": value, "limit": limit, "passed": bool(value <= limit)})

    check("time / kd_plain", fused.get("ratio_kd_plain"), vs_kd)
    check("time / dkd_mdistiller", fused.get("ratio_dkd_mdistiller"), vs_dkd)
    check("time / aekt_reference", fused.get("ratio_aekt_reference"), _REFERENCE_LIMIT)
    if shape_tier(batch, classes) == "overhead":
        check("time / dkd_fused", fused.get("ratio_dkd_fused"), _DKD_FUSED_LIMIT)
    if "kd_plain" in methods:
        check("saved bytes / kd_plain", _kept_bytes(fused) / max(_kept_bytes(methods["kd_plain"]), 1), 1.0)
    bound = 2 * batch * classes * element_size + _O_B_BYTES_PER_SAMPLE * batch
    check("saved bytes / (2·B·C·elem + O(B))", _kept_bytes(fused) / bound, 1.0)
    return checks


def judged_on(device: torch.device, dtype: torch.dtype, threads: int) -> str:
    """Which configuration the targets were judged on, and whether it is the one they are defined for."""
    if device.type == "cpu" and dtype == torch.float32 and threads == 1:
        return "fp32, one CPU thread (the configuration the targets are defined for)"
    name = str(dtype).replace("torch.", "")
    return (
        f"{name} on {device.type} with {threads} thread(s) "
        "(the targets are defined for fp32 on one CPU thread; indicative only)"
    )


OFFPATH_LIMITS: dict[str, tuple[tuple[str, str, str, float], ...]] = {
    # row -> (target name, method, figure, limit); a figure is a method's key in the row's results
    "compiled": (
        ("compiled AEKT / compiled kd_plain", "aekt_fused:compiled", "ratio_kd_plain:compiled", 1.25),
        ("compiled AEKT / eager AEKT", "aekt_fused:compiled", "ratio_aekt_fused", 1.0),
        ("eager AEKT / compiled kd_plain", "aekt_fused", "ratio_kd_plain:compiled", 1.5),
    ),
    "dense": (
        ("extra peak memory / input", "aekt_fused", "extra_peak_inputs", 2.0),
        ("time / kd_plain (same layout)", "aekt_fused", "ratio_kd_plain", 1.1),
    ),
    "memory:float32": (("extra peak memory / input", "aekt_fused", "extra_peak_inputs", 2.0),),
    "memory:bfloat16": (("extra peak memory / input", "aekt_fused", "extra_peak_inputs", 2.5),),
}
"""The targets of each off-path row (the ``memory`` row by dtype), as ``(name, method, figure, limit)``."""


def judge_offpath(row: str, dtype: str, methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of one off-path row (:data:`OFFPATH_LIMITS`); a figure that was not measured (a profiler
    without allocation records) is left out."""
    limits = OFFPATH_LIMITS.get(f"{row}:{dtype}", OFFPATH_LIMITS.get(row, ()))
    checks = []
    for name, method, figure, limit in limits:
        value = methods.get(method, {}).get(figure)
        if value is not None:
            checks.append({"name": name, "value": value, "limit": limit, "passed": bool(value <= limit)})
    return checks


def describe(check: dict[str, Any], where: str) -> str:
    """A missed target in words: which, where, and by how much it is over its limit."""
    over = check["value"] / check["limit"] - 1.0
    return (
        f"{where}: {check['name']} is {check['value']:.3f}, over its limit {check['limit']:.2f} "
        f"by {check['value'] - check['limit']:.3f} ({100.0 * over:+.1f} %)"
    )

