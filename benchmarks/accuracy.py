"""Accuracy benchmark (SPEC §6, issue 7): which loss trains the better student?

Main table: Fashion-MNIST-100 (pairs of Fashion-MNIST images side by side, class ``10·left + right``),
a teacher trained once and cached, students that differ only in the loss: CE, KD, DKD, AEKT with the
package defaults (``aekt_plugin.DEFAULTS``), and the ablations that set those defaults -- the serial
layer's ``order`` (none, ``cls_kd``, ``kd_cls``), ``max_weight`` ∈ {1, 2, 5, 10, ∞}, ``normalize_weight``,
residual and no-weight-decay variants of ``S`` -- plus β = 8 probes of the collapse
hazard. Secondary tables: 10-class Fashion-MNIST and scikit-learn's digits.

Everything (data, models, training loop, statistics, report) is :mod:`aekt_plugin.demo`'s code; this
script only lists the methods and the order in which they run. Accuracy is the last epoch's top-1 on
the test split (nothing is selected on it); collapsed runs are flagged and kept out of means.

Usage (one CPU thread; the JSON is rewritten after every run and ``--resume`` continues it)::

    python benchmarks/accuracy.py --table fmnist100 --seeds 5 --resume
    python benchmarks/accuracy.py --table fashion-mnist --seeds 5 --methods main --resume
    python benchmarks/accuracy.py --table digits --seeds 5 --resume
    python benchmarks/accuracy.py --table fmnist100 --report-only     # tables and plot from the JSON
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from aekt_plugin.demo.protocol import SETTINGS, prepare
from aekt_plugin.demo.report import format_table, plot_results, read_results
from aekt_plugin.demo.run import SMALL_PROBLEM_BETA, _parse_seeds, main_methods, run_table
from aekt_plugin.demo.train import MethodConfig

RESULTS = Path(__file__).resolve().parent / "results"
FILE_STEM = {"fmnist100": "fmnist100", "fashion-mnist": "fmnist10", "digits": "digits"}


def _fmt_w(w: float) -> str:
    return "inf" if math.isinf(w) else f"{w:g}"


def ablation_methods(aekt: MethodConfig) -> tuple[list[MethodConfig], dict[str, str]]:
    """The AEKT variants around the default ``aekt``, each changing one thing; returns the methods and the
    aliases of variants whose configuration equals the default (those rows are the ``AEKT`` runs)."""
    variants: list[MethodConfig] = []
    for order in (None, "cls_kd", "kd_cls"):
        variants.append(replace(aekt, name=f"AEKT order={order}", order=order))
    for w in (1.0, 2.0, 5.0, 10.0, math.inf):
        variants.append(replace(aekt, name=f"AEKT w_max={_fmt_w(w)}", max_weight=w))
    variants.append(
        replace(
            aekt,
            name=f"AEKT normalize_weight={not aekt.normalize_weight}",
            normalize_weight=not aekt.normalize_weight,
        )
    )
    s_order = aekt.order or "cls_kd"
    variants.append(replace(aekt, name=f"AEKT {s_order} residual S", order=s_order, residual=True))
    variants.append(replace(aekt, name=f"AEKT {s_order} S no wd", order=s_order, s_weight_decay=False))
    methods, aliases, seen = [], {}, {_key(aekt): aekt.name}
    for v in variants:
        k = _key(v)
        if k in seen:
            aliases[v.name] = seen[k]
        else:
            seen[k] = v.name
            methods.append(v)
    return methods, aliases


def _key(m: MethodConfig) -> tuple[Any, ...]:
    d = m.to_dict()
    d.pop("name")
    return tuple(sorted(d.items(), key=lambda kv: kv[0]))


def probe_methods(main: Sequence[MethodConfig]) -> list[MethodConfig]:
    """β = 8 (the CIFAR-100 default) for DKD and AEKT: the collapse hazard of SPEC §6."""
    by = {m.name: m for m in main}
    return [
        replace(by["DKD"], name="DKD beta=8", beta=8.0),
        replace(by["AEKT"], name="AEKT beta=8", beta=8.0),
    ]


def describe(m: MethodConfig) -> str:
    if m.loss == "ce":
        return "cross-entropy only"
    parts = [f"T={m.temperature:g}"]
    if m.loss == "kd":
        return "Hinton KD, " + parts[0]
    parts += [f"α={m.alpha:g}", f"β={m.beta:g}"]
    if m.loss == "aekt":
        parts += [f"w_max={_fmt_w(m.max_weight)}", f"normalize={m.normalize_weight}", f"order={m.order}"]
        if m.order is not None:
            parts.append(
                ("residual S" if m.residual else "S=I init")
                + ("" if m.s_weight_decay else ", S no wd")
                + ("" if m.s_lr_scale == 1 else f", S lr×{m.s_lr_scale:g}")
            )
    return ", ".join(parts)


def _common_seeds(runs: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[int]:
    per = [{r["seed"] for r in runs if r["method"] == m} for m in methods]
    return sorted(set.intersection(*per)) if per else []


def _seed_text(seeds: Sequence[int]) -> str:
    if seeds and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def write_report(json_path: Path, stem: str, title: str) -> None:
    """Markdown tables (main rows, ablations, probes) and the PNG plot from a results JSON."""
    blob = read_results(json_path)
    runs, proto = blob["runs"], blob["protocol"]
    cfgs = proto["methods"]

    def desc(name: str) -> str:
        c = dict(cfgs[name])
        c["max_weight"] = float(c["max_weight"])
        return describe(MethodConfig(**c))

    main = [r for r in runs if r["method"] in ("CE", "KD", "DKD", "AEKT")]
    teacher = proto["teacher_result"]
    sp = proto["splits"]
    head = (
        f"{title}. Teacher {teacher['model']} ({teacher['params']} params): "
        f"{100 * teacher['accuracy']:.2f}% test. "
        f"Student {proto['student']['model']} ({runs[0]['params'] if runs else '?'} params), "
        f"{proto['student']['epochs']} epochs, {sp['n_train']} training / {sp['n_val']} validation / "
        f"{sp['n_test']} test examples, last epoch, accuracy in %."
    )
    parts = [
        head,
        "",
        format_table(main, descriptions={m: desc(m) for m in ("CE", "KD", "DKD", "AEKT") if m in cfgs}),
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
    print(md)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", choices=sorted(FILE_STEM), default="fmnist100")
    parser.add_argument("--seeds", type=_parse_seeds, default=_parse_seeds("5"))
    parser.add_argument(
        "--main-seeds",
        type=_parse_seeds,
        default=None,
        help="seeds of the four main rows (default: --seeds); more seeds narrow their intervals",
    )
    parser.add_argument("--probe-seeds", type=_parse_seeds, default=_parse_seeds("3"))
    parser.add_argument(
        "--methods",
        choices=("main", "probes", "all"),
        default="all",
        help="main: CE, KD, DKD, AEKT only; probes: plus the β=8 probes; all: plus ablations too",
    )
    parser.add_argument("--beta", type=float, default=SMALL_PROBLEM_BETA)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stem = FILE_STEM[args.table]
    json_path = RESULTS / f"{stem}_accuracy.json"
    title = {
        "fmnist100": "Fashion-MNIST-100",
        "fashion-mnist": "Fashion-MNIST (10 classes)",
        "digits": "digits",
    }[args.table]
    if not args.report_only:
        main4 = main_methods(beta=args.beta)
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
        if args.main_seeds is not None:
            seeds_for.update({m.name: args.main_seeds for m in main4})
        prepared = prepare(SETTINGS[args.table], progress=not args.no_progress)
        t = prepared.teacher_info
        print(
            f"teacher: {100 * t['accuracy']:.2f}% ({t['params']} params, cached={t.get('cached')})",
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
            protocol_extra={
                "aliases": aliases,
                "command": "python benchmarks/accuracy.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
            },
        )
    write_report(json_path, stem, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
