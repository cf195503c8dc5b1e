"""Accuracy benchmark: which loss trains the better student, and is AEKT worth choosing over DKD?

Tables (``--table``), each a protocol whose students differ only in the loss:

* ``fmnist100`` (the main protocol): Fashion-MNIST-100, six epochs, no augmentation, a cached teacher;
* ``digits100``: the demo's protocol (digits side by side, 100 classes; about a second per student);
* ``fashion-mnist`` and ``digits``: 10-class secondary tables;
* ``paperlike-<digits100|fmnist100>-<cnn|mobile>``: the paper-like protocol of ``protocols.py`` (a
  teacher that fits its training split, augmentation with the teacher's logits on the augmented view,
  30 epochs), with a plain and a MobileNet-style student; ``paperlike-digits100-timm``: a timm ResNet
  student whose every row trains through a timm task (``timm_family.py``: timm's own
  ``ClassificationTask`` and ``LogitDistillationTask``, this package's DKD and AEKT tasks).

Method groups (``--methods``):

* ``main``: CE, KD, DKD and AEKT with the package defaults; ``probes`` adds β = 8 probes, ``all`` the
  ablations that set the defaults (the original tables);
* ``search``: the design-space screen of AEKT (``variants.py``) next to KD, DKD, DKD with the same α, and
  the default AEKT, judged on **validation** accuracy only (written to ``<table>_search.json``);
* ``confirm``: CE, KD, DKD, the default AEKT and ``--candidates`` on fresh seeds, test accuracy
  (``<table>_confirm.json``);
* ``calibrate``: KD and DKD over T ∈ {2, 4} and β ∈ {1, 2, 4, 8}, judged on **validation** accuracy
  (``<table>_calibrate.json``): where, if anywhere, DKD beats KD by the calibration gate's margin;
* ``standardize``: KD, DKD and AEKT with and without logit standardization (same T, α, β), plus KD with
  the recipe of Sun et al. (standardized, T = 2, KD weight 9), test accuracy (``<table>_standardize.json``).

Accuracy is the last epoch's top-1; nothing is selected on the test split. Collapsed runs are flagged and
kept out of means. Every run records its configuration, seed, validation and test accuracy and the git
revision it ran on. The JSON is rewritten after every run and ``--resume`` continues it, so a table can be
built over several sittings, e.g. as two one-thread processes on two cores::

    python benchmarks/accuracy.py --table fmnist100 --methods search --seeds 5 --resume
    python benchmarks/accuracy.py --table paperlike-digits100-cnn --seeds 10 --resume
    python benchmarks/accuracy.py --table digits100 --methods confirm --seeds 100-109 \\
        --candidates "AEKT α=4" --resume
    python benchmarks/accuracy.py --table fmnist100 --report-only   # tables and plots from the JSON
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocols import prepare_paperlike  # noqa: E402
from variants import SerialVariant, VariantMethod, method_from_dict  # noqa: E402

from aekt_plugin.demo.protocol import SETTINGS, prepare  # noqa: E402
from aekt_plugin.demo.report import format_table, plot_results, read_results  # noqa: E402
from aekt_plugin.demo.run import SMALL_PROBLEM_BETA, parse_seeds, main_methods, run_table  # noqa: E402
from aekt_plugin.demo.stats import paired_difference  # noqa: E402
from aekt_plugin.demo.train import MethodConfig, core_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TABLES = {  # --table -> (file stem, title)
    "fmnist100": ("fmnist100", "Fashion-MNIST-100"),
    "digits100": ("digits100", "digits-100"),
    "fashion-mnist": ("fmnist10", "Fashion-MNIST (10 classes)"),
    "digits": ("digits", "digits"),
    "paperlike-digits100-cnn": ("paperlike_digits100_cnn", "Paper-like digits-100, plain CNN student"),
    "paperlike-digits100-mobile": (
        "paperlike_digits100_mobile",
        "Paper-like digits-100, MobileNet-style student",
    ),
    "paperlike-digits100-timm": (
        "paperlike_digits100_timm",
        "Paper-like digits-100, timm ResNet student trained through timm's tasks",
    ),
    "paperlike-fmnist100-cnn": ("paperlike_fmnist100_cnn", "Paper-like Fashion-MNIST-100, plain CNN student"),
    "paperlike-fmnist100-mobile": (
        "paperlike_fmnist100_mobile",
        "Paper-like Fashion-MNIST-100, MobileNet-style student",
    ),
}
MAIN = ("CE", "KD", "DKD", "AEKT")


def _fmt_w(w: float) -> str:
    return "inf" if math.isinf(w) else f"{w:g}"


def _key(m: MethodConfig) -> tuple[Any, ...]:
    d = m.to_dict()
    d.pop("name")
    return tuple(sorted(d.items(), key=lambda kv: kv[0]))


def _dedupe(
    base: MethodConfig, variants: Sequence[MethodConfig]
) -> tuple[list[MethodConfig], dict[str, str]]:
    """The variants that differ from ``base`` and from each other, and the aliases of those that do not."""
    methods, aliases, seen = [], {}, {_key(base): base.name}
    for v in variants:
        k = _key(v)
        if k in seen:
            aliases[v.name] = seen[k]
        else:
            seen[k] = v.name
            methods.append(v)
    return methods, aliases


def ablation_methods(aekt: MethodConfig) -> tuple[list[MethodConfig], dict[str, str]]:
    """The AEKT variants around the default ``aekt`` that set the package defaults, each changing one
    thing; returns the methods and the aliases of variants whose configuration equals the default."""
    variants: list[MethodConfig] = []
    for order in (None, "cls_kd", "kd_cls"):
        variants.append(replace(aekt, name=f"AEKT order={order}", order=order))
    for w in (1.0, 2.0, 5.0, 10.0, math.inf):
        variants.append(aekt.with_options(f"AEKT w_max={_fmt_w(w)}", max_weight=w))
    normalize = not aekt.option("normalize_weight")
    variants.append(aekt.with_options(f"AEKT normalize_weight={normalize}", normalize_weight=normalize))
    s_order = aekt.order or "cls_kd"
    serial = SerialVariant(**_fields(aekt))
    variants.append(replace(serial, name=f"AEKT {s_order} residual S", order=s_order, residual=True))
    variants.append(replace(serial, name=f"AEKT {s_order} S no wd", order=s_order, s_weight_decay=False))
    return _dedupe(aekt, variants)


def probe_methods(main: Sequence[MethodConfig]) -> list[MethodConfig]:
    """β = 8 (the CIFAR-100 default) for DKD and AEKT: the collapse hazard on small problems."""
    by = {m.name: m for m in main}
    return [
        by["DKD"].with_options("DKD beta=8", beta=8.0),
        by["AEKT"].with_options("AEKT beta=8", beta=8.0),
    ]


def serial_name(order: str, residual: bool, lr_scale: float, weight_decay: bool, detach: bool = False) -> str:
    parts = [f"S {order}", "residual" if residual else "identity", f"lr×{lr_scale:g}"]
    parts.append("wd" if weight_decay else "no wd")
    if detach:
        parts.append("detached head")
    return "AEKT " + ", ".join(parts)


def search_methods(main: Sequence[MethodConfig]) -> tuple[list[MethodConfig], dict[str, str]]:
    """The design-space screen around the default AEKT: one change per row (the module docstring of
    ``variants.py`` defines each), plus DKD with each α tried, so that a gain from α alone shows."""
    by = {m.name: m for m in main}
    aekt = VariantMethod(**_fields(by["AEKT"]))
    rows: list[MethodConfig] = []
    for alpha in (2.0, 4.0, 8.0):
        rows.append(aekt.with_options(f"AEKT α={alpha:g}", alpha=alpha))
        rows.append(by["DKD"].with_options(f"DKD α={alpha:g}", alpha=alpha))
    for gamma in (0.5, 2.0):
        rows.append(replace(aekt, name=f"AEKT γ={gamma:g}", gamma=gamma))
    for w in (1.0, 2.0, 10.0, math.inf):
        rows.append(aekt.with_options(f"AEKT w_max={_fmt_w(w)}", max_weight=w))
    rows.append(aekt.with_options("AEKT no batch normalisation", normalize_weight=False))
    rows.append(replace(aekt, name="AEKT one-sided", one_sided=True))
    for gamma in (0.5, 1.0, 2.0):
        rows.append(replace(aekt, name=f"AEKT implicit γ_b={gamma:g}", implicit_gamma=gamma))
    for order in ("cls_kd", "kd_cls"):
        for residual in (False, True):
            for lr_scale in (1.0, 10.0):
                for weight_decay in (True, False):
                    rows.append(
                        replace(
                            aekt,
                            name=serial_name(order, residual, lr_scale, weight_decay),
                            order=order,
                            residual=residual,
                            s_lr_scale=lr_scale,
                            s_weight_decay=weight_decay,
                        )
                    )
    for order in ("cls_kd", "kd_cls"):  # the smaller learning rate for S
        rows.append(replace(aekt, name=serial_name(order, False, 0.1, True), order=order, s_lr_scale=0.1))
    for residual in (False, True):
        rows.append(
            replace(
                aekt,
                name=serial_name("cls_kd", residual, 1.0, True, detach=True),
                order="cls_kd",
                residual=residual,
                detach_head=True,
            )
        )
    return _dedupe(aekt, rows)


STANDARDIZED = " +std"


def standardize_methods(main: Sequence[MethodConfig]) -> list[MethodConfig]:
    """KD, DKD and AEKT as in ``main`` with standardized logits, and KD with the standardization recipe of
    Sun et al. (CVPR 2024; their code's ``--logit-stand --base-temp 2 --kd-weight 9``)."""
    by = {m.name: m for m in main}
    rows = [by[n].with_options(n + STANDARDIZED, standardize=True) for n in ("KD", "DKD", "AEKT")]
    recipe = by["KD"].with_options("KD +std, T=2, ×9", standardize=True, temperature=2.0)
    rows.append(replace(recipe, kd_weight=9.0))
    return rows


CALIBRATION_TEMPERATURES = (2.0, 4.0)
CALIBRATION_BETAS = (1.0, 2.0, 4.0, 8.0)


def calibration_methods() -> list[MethodConfig]:
    """KD at each temperature and DKD at each (temperature, β), α = 1: the grid the gate was sought on."""
    rows = []
    for t in CALIBRATION_TEMPERATURES:
        rows.append(MethodConfig(f"KD T={t:g}", loss="kd", options={"temperature": t}))
        rows += [
            MethodConfig(f"DKD T={t:g} β={b:g}", loss="dkd", options={"temperature": t, "beta": b})
            for b in CALIBRATION_BETAS
        ]
    return rows


def write_calibration_report(json_path: Path, stem: str, title: str) -> str:
    """DKD − KD at each (T, β) on validation accuracy, against KD at the same temperature."""
    blob = read_results(json_path)
    runs, cfgs = blob["runs"], blob["protocol"]["methods"]
    compare = [(n, f"KD T={c['temperature']:g}") for n, c in cfgs.items() if c["loss"] == "dkd"]
    md = (
        _teacher_line(blob["protocol"], runs, f"{title}, calibration")
        + "\n\nKD and DKD over the temperature and β grid, **validation accuracy** (last epoch); the gate "
        "asks DKD − KD ≥ +1.0 point with the interval above 0.\n\n"
        + format_table(
            runs,
            compare=compare,
            descriptions={n: describe(method_from_dict(c)) for n, c in cfgs.items()},
            metric="val_accuracy",
        )
    )
    (RESULTS / f"{stem}_calibrate.md").write_text(md)
    return md


def _fields(method: MethodConfig) -> dict[str, Any]:
    """The fields of a plain method, to build one of the benchmark's subclasses from it."""
    return {f.name: getattr(method, f.name) for f in fields(MethodConfig)}


def describe(m: MethodConfig) -> str:
    if m.loss == "ce":
        return "cross-entropy only"
    o = m.options
    parts = [f"T={o['temperature']:g}"]
    if m.loss != "kd":
        parts += [f"α={o['alpha']:g}", f"β={o['beta']:g}"]
    if m.loss == "aekt":
        parts += [f"w_max={_fmt_w(o['max_weight'])}", f"normalize={o['normalize_weight']}", f"order={m.order}"]
        if isinstance(m, VariantMethod):
            if m.gamma != 1.0:
                parts.append(f"γ={m.gamma:g}")
            if m.one_sided:
                parts.append("one-sided")
            if m.implicit_gamma:
                parts.append(f"implicit γ_b={m.implicit_gamma:g}")
        if m.order is not None:
            serial = m if isinstance(m, SerialVariant) else SerialVariant(**_fields(m))
            parts.append(
                ("residual S" if serial.residual else "S=I init")
                + ("" if serial.s_weight_decay else ", S no wd")
                + ("" if serial.s_lr_scale == 1 else f", S lr×{serial.s_lr_scale:g}")
                + (", detached head" if getattr(m, "detach_head", False) else "")
            )
    if o["standardize"]:
        parts.append("standardized logits")
    if m.kd_weight != 1.0:
        parts.append(f"KD weight {m.kd_weight:g}")
    return ("Hinton KD, " if m.loss == "kd" else "") + ", ".join(parts)


def _common_seeds(runs: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[int]:
    per = [{r["seed"] for r in runs if r["method"] == m} for m in methods]
    return sorted(set.intersection(*per)) if per else []


def _seed_text(seeds: Sequence[int]) -> str:
    if seeds and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def git_revision() -> str:
    """The commit the benchmark runs on, ``-dirty`` when the working tree differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def _teacher_line(proto: dict[str, Any], runs: Sequence[dict[str, Any]], title: str) -> str:
    teacher = proto["teacher_result"]
    sp = proto["splits"]
    line = (
        f"{title}. Teacher {teacher['model']} ({teacher['params']} params): "
        f"{100 * teacher['accuracy']:.2f}% test"
    )
    if teacher.get("train_accuracy") is not None:
        line += f", {100 * teacher['train_accuracy']:.2f}% train"
    if teacher.get("mean_q_t"):
        line += ", mean q_t on the augmented views " + ", ".join(
            f"{v:.3f} ({k})" for k, v in teacher["mean_q_t"].items()
        )
    return line + (
        f". Student {proto['student']['model']} ({runs[0]['params'] if runs else '?'} params), "
        f"{proto['student']['epochs']} epochs, {sp['n_train']} training / {sp['n_val']} validation / "
        f"{sp['n_test']} test examples, last epoch, accuracy in %."
    )


def write_report(json_path: Path, stem: str, title: str) -> str:
    """Markdown tables (main rows, ablations, probes) and the PNG plot from a results JSON."""
    blob = read_results(json_path)
    runs, proto = blob["runs"], blob["protocol"]
    cfgs = proto["methods"]

    def desc(name: str) -> str:
        return describe(method_from_dict(cfgs[name]))

    main = [r for r in runs if r["method"] in MAIN]
    parts = [
        _teacher_line(proto, runs, title),
        "",
        format_table(
            main,
            compare=[("KD", "CE"), ("DKD", "KD"), ("AEKT", "KD"), ("AEKT", "DKD")],
            descriptions={m: desc(m) for m in MAIN if m in cfgs},
        ),
    ]
    train = [r for r in main if r.get("train_accuracy") is not None]
    if train:
        parts += [
            "Training accuracy (clean training split, last epoch): "
            + ", ".join(
                f"{m} {100 * sum(r['train_accuracy'] for r in train if r['method'] == m) / n:.1f}"
                for m in MAIN
                if (n := sum(1 for r in train if r["method"] == m))
            ),
            "",
        ]
    abl = [n for n in cfgs if n.startswith("AEKT ") and "beta=" not in n]
    if abl:
        seeds = _common_seeds(runs, abl)
        rows = [r for r in runs if r["method"] in ["AEKT", *abl, "DKD", "KD"] and r["seed"] in seeds]
        parts += [
            "",
            f"Ablations around the default AEKT, seeds {_seed_text(seeds)} for every row (paired differences "
            "against DKD and against the default):",
            "",
            format_table(
                rows,
                compare=[(n, "DKD") for n in ["AEKT", *abl]] + [(n, "AEKT") for n in abl],
                descriptions={n: desc(n) for n in ["AEKT", *abl, "DKD", "KD"]},
            ),
        ]
        if proto.get("aliases"):
            parts += [
                "Rows equal to the default configuration (their runs are the AEKT row): "
                + ", ".join(f"{a} = {b}" for a, b in proto["aliases"].items()),
                "",
            ]
    probes = [n for n in cfgs if "beta=" in n]
    if probes:
        seeds = _common_seeds(runs, probes)
        base = {n: n.split(" beta=")[0] for n in probes}
        rows = [r for r in runs if r["method"] in [*probes, *base.values()] and r["seed"] in seeds]
        parts += [
            "",
            f"β = 8 probes (the CIFAR-100 weight on this small problem), seeds {_seed_text(seeds)}, "
            f"against the same methods with β = {cfgs[base[probes[0]]]['beta']:g} on the same seeds:",
            "",
            format_table(
                rows,
                compare=[(n, base[n]) for n in probes],
                descriptions={n: desc(n) for n in [*probes, *base.values()]},
            ),
        ]
    md = "\n".join(parts)
    (RESULTS / f"{stem}_accuracy.md").write_text(md)
    plot_results(runs, RESULTS / f"{stem}_accuracy.png", title=title)
    return md


def gate(runs: Sequence[dict[str, Any]], threshold: float = 0.01) -> dict[str, Any]:
    """The calibration gate of the paper-like protocol: DKD − KD ≥ ``threshold`` with the paired 95 %
    interval above 0 (test accuracy)."""
    d = paired_difference(runs, "DKD", "KD")
    passed = d["n"] >= 2 and d["mean"] >= threshold and d["ci_low"] > 0
    return {**d, "threshold": threshold, "passed": passed}


def plot_differences(
    runs: Sequence[dict[str, Any]],
    names: Sequence[str],
    baseline: str,
    path: Path,
    *,
    title: str,
    metric: str = "accuracy",
) -> Path:
    """A forest plot: each row's paired difference against ``baseline`` with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diffs = [paired_difference(runs, n, baseline, metric=metric) for n in names]
    fig, ax = plt.subplots(figsize=(8.5, 0.3 * len(diffs) + 1.5))
    for i, d in enumerate(diffs):
        y = len(diffs) - 1 - i
        if d["n"] < 2:
            continue
        color = "tab:gray" if d["within_noise"] else ("tab:green" if d["mean"] > 0 else "tab:red")
        ax.errorbar(
            100 * d["mean"],
            y,
            xerr=[[100 * (d["mean"] - d["ci_low"])], [100 * (d["ci_high"] - d["mean"])]],
            fmt="o",
            color=color,
            capsize=3,
        )
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(diffs)))
    ax.set_yticklabels([d["a"] for d in reversed(diffs)], fontsize=8)
    label = "validation" if metric == "val_accuracy" else "test"
    ax.set_xlabel(
        f"{label} accuracy − {baseline} (points), paired by seed, 95 % interval\n"
        "(green: better, red: worse, grey: within noise)"
    )
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_search_report(json_path: Path, stem: str, title: str) -> str:
    """The screen, judged on validation accuracy: a table and a plot of each row's paired difference
    against DKD and against the default AEKT."""
    blob = read_results(json_path)
    runs, cfgs = blob["runs"], blob["protocol"]["methods"]
    names = list(cfgs)
    seeds = _common_seeds(runs, names)
    rows = [r for r in runs if r["seed"] in seeds]
    others = [n for n in names if n not in ("KD", "DKD", "AEKT")]
    compare = [(n, "DKD") for n in ["AEKT", *others]] + [(n, "AEKT") for n in others]
    table = format_table(
        rows,
        compare=compare,
        descriptions={n: describe(method_from_dict(cfgs[n])) for n in names},
        metric="val_accuracy",
    )
    md = (
        f"{title}: the AEKT design-space screen, **validation accuracy** (last epoch), seeds "
        f"{_seed_text(seeds)} for every row; paired differences against DKD and against the default AEKT."
        "\n\n" + table
    )
    (RESULTS / f"{stem}_search.md").write_text(md)
    plot_differences(
        rows,
        [n for n in names if n != "DKD"],
        "DKD",
        RESULTS / f"{stem}_search.png",
        title=f"{title}: AEKT design-space screen",
        metric="val_accuracy",
    )
    return md


def write_paired_report(json_path: Path, stem: str, title: str, kind: str) -> str:
    """The test-accuracy table of a ``confirm`` or ``standardize`` run, with its paired differences."""
    blob = read_results(json_path)
    runs, proto = blob["runs"], blob["protocol"]
    cfgs = proto["methods"]
    names = list(cfgs)
    others = [n for n in names if n not in MAIN]
    if kind == "confirm":
        compare = [("DKD", "KD"), ("AEKT", "DKD")] + [(n, "DKD") for n in others]
        compare += [(n, "AEKT") for n in others]
        heading = "confirmation on fresh seeds"
    else:
        compare = [(n, n.removesuffix(STANDARDIZED)) for n in others if n.endswith(STANDARDIZED)]
        compare += [(n, "KD") for n in others if not n.endswith(STANDARDIZED)]
        compare += [
            ("AEKT" + STANDARDIZED, "DKD" + STANDARDIZED),
            ("DKD" + STANDARDIZED, "KD" + STANDARDIZED),
        ]
        heading = "logit standardization"
    md = (
        _teacher_line(proto, runs, f"{title}, {heading}")
        + "\n\n"
        + format_table(
            runs, compare=compare, descriptions={n: describe(method_from_dict(cfgs[n])) for n in names}
        )
    )
    (RESULTS / f"{stem}_{kind}.md").write_text(md)
    plot_results(runs, RESULTS / f"{stem}_{kind}.png", title=f"{title}: {heading} (test)")
    return md


def _prepare(table: str, progress: bool) -> tuple[Any, Any]:
    """The prepared protocol of ``table`` and its per-seed batch source (``None``: fixed batches)."""
    if table.startswith("paperlike-"):
        _, dataset, family = table.split("-")
        prepared = prepare_paperlike(dataset, family, progress=progress)
        return prepared, prepared.batches
    return prepare(SETTINGS[table], progress=progress), None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", choices=sorted(TABLES), default="fmnist100")
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds("5"))
    parser.add_argument(
        "--main-seeds",
        type=parse_seeds,
        default=None,
        help="seeds of the four main rows (default: --seeds); more seeds narrow their intervals",
    )
    parser.add_argument("--probe-seeds", type=parse_seeds, default=parse_seeds("3"))
    parser.add_argument(
        "--methods",
        choices=("main", "probes", "all", "search", "confirm", "calibrate", "standardize"),
        default="main",
        help="main: CE, KD, DKD, AEKT; probes: plus β=8 probes; all: plus ablations; search: the AEKT "
        "design-space screen (validation); confirm: the main rows and --candidates on fresh seeds; "
        "calibrate: KD and DKD over T and β (validation); standardize: KD, DKD, AEKT with and without logit "
        "standardization",
    )
    parser.add_argument(
        "--candidates",
        default="",
        help="search rows to confirm (with --methods confirm), separated by commas, or by semicolons when "
        "a name holds a comma",
    )
    parser.add_argument("--beta", type=float, default=SMALL_PROBLEM_BETA)
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="T of the main rows (default: the package's); the results go to <table>_T<T>_b<β>_* files",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stem, title = TABLES[args.table]
    if (
        args.temperature is not None
    ):  # a setting chosen on the calibration grid, kept apart from the main table
        stem += f"_T{args.temperature:g}_b{args.beta:g}"
        title += f" at T = {args.temperature:g}, β = {args.beta:g}"
    kinds = ("search", "confirm", "calibrate", "standardize")
    suffix = args.methods if args.methods in kinds else "accuracy"
    json_path = RESULTS / f"{stem}_{suffix}.json"
    if not args.report_only:
        main4 = main_methods(beta=args.beta, temperature=args.temperature)
        methods, groups, aliases, seeds_for = list(main4), [[m.name for m in main4]], {}, {}
        if args.methods == "all":
            abl, aliases = ablation_methods(main4[-1])
            methods += abl
            groups.append([m.name for m in abl])
        if args.methods in ("all", "probes"):
            probes = probe_methods(main4)
            methods += probes
            groups.append([m.name for m in probes])
            seeds_for = {m.name: args.probe_seeds for m in probes}
        if args.methods in ("search", "confirm"):
            rows, aliases = search_methods(main4)
            if args.methods == "search":
                methods = [m for m in main4 if m.name != "CE"] + rows
                groups = [[m.name for m in methods]]
            else:
                separator = ";" if ";" in args.candidates else ","
                wanted = [c.strip() for c in args.candidates.split(separator) if c.strip()]
                by_name = {m.name: m for m in rows}
                unknown = [c for c in wanted if c not in by_name]
                if unknown:
                    parser.error(f"--candidates: unknown search rows {unknown}; known: {sorted(by_name)}")
                methods = list(main4) + [by_name[c] for c in wanted]
                groups = [[m.name for m in methods]]
        if args.methods == "calibrate":
            methods = calibration_methods()
            groups = [[m.name for m in methods]]
        if args.methods == "standardize":
            methods = [m for m in main4 if m.name != "CE"] + standardize_methods(main4)
            groups = [[m.name for m in methods]]
        if args.main_seeds is not None:
            seeds_for.update({m.name: args.main_seeds for m in main4 if m in methods})
        prepared, batches = _prepare(args.table, progress=not args.no_progress)
        t = prepared.teacher_info
        print(
            f"teacher: {100 * t['accuracy']:.2f}% test ({t['params']} params, cached={t.get('cached')})",
            flush=True,
        )
        run_table(
            prepared,
            methods,
            args.seeds,
            json_path=json_path,
            resume=args.resume,
            progress=not args.no_progress,
            seeds_for=seeds_for,
            groups=groups,
            batches=batches,
            step_factory=getattr(prepared, "step_factory", None) or core_step,
            protocol_extra={
                "aliases": aliases,
                "command": "python benchmarks/accuracy.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                **({"paperlike": prepared.paperlike.describe()} if hasattr(prepared, "paperlike") else {}),
            },
            record_extra={"revision": git_revision()},
        )
    if args.methods == "search":
        print(write_search_report(json_path, stem, title))
    elif args.methods == "calibrate":
        print(write_calibration_report(json_path, stem, title))
    elif args.methods in ("confirm", "standardize"):
        print(write_paired_report(json_path, stem, title, args.methods))
    else:
        print(write_report(json_path, stem, title))
        if args.table.startswith("paperlike-"):
            print(
                "calibration gate (DKD − KD ≥ +1.0 point, interval above 0):",
                gate(read_results(json_path)["runs"]),
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
