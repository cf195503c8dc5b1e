"""The benchmark result as markdown: the environment, then one table per shape with its targets."""

from __future__ import annotations

from typing import Any

from . import targets
from .methods import BASELINES, split_option

__all__ = ["failures", "format_bytes", "format_time", "to_markdown"]


def format_time(seconds: float) -> str:
    """``12.3 µs`` below a millisecond, ``4.56 ms`` above."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def format_bytes(nbytes: int | None) -> str:
    """KiB below a MiB, MiB above; ``–`` for ``None`` (not measured)."""
    if nbytes is None:
        return "–"
    if nbytes < 1024 * 1024:
        return f"{nbytes / 1024:.1f} KiB"
    return f"{nbytes / 2**20:.2f} MiB"


def _ratio(entry: dict[str, Any], base: str) -> str:
    value = entry.get(f"ratio_{base}")
    if value is None:
        return "–"
    return f"{value:.2f} ({entry[f'ratio_{base}_p25']:.2f}–{entry[f'ratio_{base}_p75']:.2f})"


def _header(result: dict[str, Any]) -> list[str]:
    env, settings = result["environment"], result["settings"]
    revision = env.get("aekt_plugin_revision")  # written by benchmarks/kernel.py
    lines = [
        "# `aekt bench` — loss-kernel benchmark",
        "",
        f"- device: **{env['device']}** ({env['device_name']}), dtype **{env['dtype']}**, "
        f"threads **{env['threads']}**, torch {env['torch']}, Python {env['python']}, "
        f"aekt-plugin {env['aekt_plugin']}{f' ({revision})' if revision else ''}, {env['timestamp']}",
        f"- loss settings: T={settings['temperature']}, α={settings['alpha']}, β={settings['beta']}, "
        f"AEKT {settings['aekt_defaults']}",
        f"- timing: {settings['timing']}; clock: {settings['clock']}; {settings['rounds']} rounds, "
        f"blocks ≥ {settings['min_block_ms']} ms. "
        "Ratios show median (interquartile range) of the paired per-round ratios.",
        "- calls = ATen operators dispatched by one forward+backward; saved = unique storages autograd "
        "keeps for backward (+ tensors stored on `ctx`); `new` excludes the inputs themselves.",
    ]
    if settings.get("options"):
        described = "; ".join(f"`+{name}`: {text}" for name, text in settings["options"].items())
        lines.append(
            f"- options: {described}. `× without` is the paired ratio to the loss without the option."
        )
    verdict = "PASS" if result["passed"] else "FAIL"
    lines.append(f"- targets judged on: {result['targets_judged_on']}; overall: **{verdict}**")
    return [*lines, *(f"  - **FAIL** {line}" for line in failures(result)), ""]


def _where(entry: dict[str, Any]) -> str:
    shape = ", ".join(map(str, entry["shape"]))
    if "row" in entry:
        return f"{entry['row']} ({shape}) {entry['dtype']}"
    return f"({shape})"


def failures(result: dict[str, Any]) -> list[str]:
    """One line per missed target: where, which, and by how much
    (:func:`~aekt_plugin.bench.targets.describe`)."""
    entries = [*result["kernel"], *result.get("off_path", [])]
    return [
        targets.describe(check, _where(entry))
        for entry in entries
        for check in entry["targets"]
        if not check["passed"]
    ]


def _verdict(check: dict[str, Any]) -> str:
    if check["passed"]:
        return "pass"
    return f"**FAIL** ({100.0 * (check['value'] / check['limit'] - 1.0):+.1f} %)"


def _targets_table(checks: list[dict[str, Any]], title: str) -> list[str]:
    lines = ["", f"| {title} | value | limit | result |", "|---|---:|---:|---|"]
    for check in checks:
        lines.append(f"| {check['name']} | {check['value']:.3f} | {check['limit']:.2f} | {_verdict(check)} |")
    return lines


def _without_option(name: str, m: dict[str, Any]) -> str:
    base, option = split_option(name)
    return "–" if option is None else _ratio(m, base)


def _shape_section(entry: dict[str, Any]) -> list[str]:
    batch, classes = entry["shape"]
    with_options = any(split_option(name)[1] for name in entry["methods"])
    ratio_headers = [f"× {base}" for base in BASELINES] + (["× without"] if with_options else [])
    lines = [
        f"## ({batch}, {classes}) — {entry['tier']} tier",
        "",
        "| method | median time | "
        + " | ".join(ratio_headers)
        + " | calls | saved (unique) | saved (new) | saved tensors | peak mem |",
        "|---|" + "---:|" * (len(ratio_headers) + 6),
    ]
    for name, m in entry["methods"].items():
        cells = [
            f"`{name}`",
            format_time(m["median_s"]),
            *(_ratio(m, base) for base in BASELINES),
            *([_without_option(name, m)] if with_options else []),
            str(m["calls"]),
            format_bytes(m["saved_bytes_unique"] + m["ctx_attr_bytes"]),
            format_bytes(m["saved_bytes_new"]),
            str(m["saved_tensors"]),
            format_bytes(m["peak_memory_bytes"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if entry["targets"]:
        lines += _targets_table(entry["targets"], "fused AEKT target")
    return lines + _agreement_lines(entry["agreement"])


_OFFPATH_TITLES = {
    "compiled": "compiled with torch.compile (inductor), forward+backward",
    "dense": "dense logits, classes at dim 1, forward+backward",
    "memory": "extra peak memory of forward+backward",
}


def _offpath_section(entry: dict[str, Any]) -> list[str]:
    """One off-path row: each method's time and paired ratios (where timed) and extra peak memory."""
    methods = entry["methods"]
    timed = any("median_s" in m for m in methods.values())
    bases = [name for name in methods if any(f"ratio_{name}" in m for m in methods.values())]
    headers = ["method", *(["median time", *(f"× {base}" for base in bases)] if timed else [])]
    measured_peak = any("extra_peak_inputs" in m for m in methods.values())
    headers += ["extra peak (inputs)"] if measured_peak else []
    lines = [
        f"## {_where(entry)} — {_OFFPATH_TITLES[entry['row']]}",
        "",
        "| " + " | ".join(headers) + " |",
        "|---|" + "---:|" * (len(headers) - 1),
    ]
    for name, m in methods.items():
        cells = [f"`{name}`"]
        if timed:
            cells += [format_time(m["median_s"]), *(_ratio(m, base) for base in bases)]
        if measured_peak:
            peak = m.get("extra_peak_inputs")
            cells.append("–" if peak is None else f"{peak:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if entry["targets"]:
        lines += _targets_table(entry["targets"], "target")
    return lines + _agreement_lines(entry["agreement"])


def to_markdown(result: dict[str, Any]) -> str:
    """The benchmark result as markdown tables (environment and missed targets first, then one table per
    shape, then the off-path rows)."""
    lines = _header(result)
    for entry in result["kernel"]:
        lines += _shape_section(entry)
    for entry in result.get("off_path", []):
        lines += _offpath_section(entry)
    return "\n".join(lines)


def _agreement_lines(agreement: dict[str, dict[str, float]]) -> list[str]:
    """The entry's closing lines: how far each fused loss lies from its baseline."""
    if not agreement:
        return [""]
    agree = ", ".join(
        f"{pair}: loss {d['loss_abs_diff']:.1e}, grad {d['grad_max_abs_diff']:.1e}"
        for pair, d in agreement.items()
    )
    return ["", f"Agreement (max abs diff): {agree}.", ""]
