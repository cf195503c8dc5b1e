"""``aekt demo``: train a cached teacher, distil students with CE, KD, DKD and AEKT, print the table.

The same functions drive ``benchmarks/accuracy.py``: :func:`main_methods` (the four main rows),
:func:`run_table` (seeds × methods, resumable, JSON written after every run).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import torch

from ._deps import require
from .data import FASHION_MNIST_DIR, FILE_DATASETS
from .protocol import SETTINGS, Prepared, Setting, prepare
from .report import format_table, plot_results, read_results, write_results
from .train import BatchFn, MethodConfig, StepFactory, core_step, train_student

__all__ = ["add_demo_arguments", "main_methods", "package_defaults", "parse_seeds", "run_demo", "run_table"]

_logger = logging.getLogger(__name__)

# Protocol settings of the decoupled losses on these small problems: β = 2, as for mdistiller's
# res56→res20 pair; β = 8 (the CIFAR-100 default) can kill a small student in its first steps.
SMALL_PROBLEM_BETA = 2.0


def package_defaults() -> dict[str, Any]:
    """A copy of :data:`aekt_plugin.DEFAULTS` (read when called, so a run records what it used)."""
    import aekt_plugin

    return dataclasses.asdict(aekt_plugin.DEFAULTS)


def main_methods(*, beta: float = SMALL_PROBLEM_BETA, temperature: float | None = None) -> list[MethodConfig]:
    """The four main rows: ``CE``, ``KD``, ``DKD`` and ``AEKT``, each with the package defaults except the
    protocol's ``beta`` (shared by DKD and AEKT) and, if given, ``temperature``."""
    shared = {} if temperature is None else {"temperature": temperature}
    return [
        MethodConfig("CE", loss="ce"),
        MethodConfig("KD", loss="kd", options=shared),
        MethodConfig("DKD", loss="dkd", options={**shared, "beta": beta}),
        MethodConfig("AEKT", loss="aekt", options={**shared, "beta": beta}),
    ]


def _tqdm(iterable: Any, *, show: bool, **kwargs: Any) -> Any:
    if not show:
        return iterable
    from ._deps import require

    return require("tqdm").tqdm(iterable, **kwargs)


def protocol_record(
    prepared: Prepared, methods: Sequence[MethodConfig], seeds: Sequence[int]
) -> dict[str, Any]:
    """Everything that defines a table except the per-run results (stored in the JSON's ``protocol``)."""
    import aekt_plugin

    return {
        **prepared.setting.to_dict(),
        "splits": prepared.data.describe(),
        "teacher_result": {
            k: v for k, v in prepared.teacher_info.items() if k not in ("path", "train_config", "data")
        },
        "methods": {m.name: m.to_dict() for m in methods},
        "seeds": list(seeds),
        "selection": "last epoch (no model selection on the test set)",
        "accuracy": "top-1 on the test split, in [0, 1]",
        "collapse_rule": f"accuracy < {prepared.setting.student.collapse_factor} / num_classes",
        "package_defaults": package_defaults(),
        "aekt_plugin_version": aekt_plugin.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def run_table(
    prepared: Prepared,
    methods: Sequence[MethodConfig],
    seeds: Sequence[int],
    *,
    json_path: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    seeds_for: Mapping[str, Sequence[int]] | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    protocol_extra: Mapping[str, Any] | None = None,
    record_extra: Mapping[str, Any] | None = None,
    batches: Callable[[int], BatchFn] | None = None,
    step_factory: StepFactory = core_step,
) -> list[dict[str, Any]]:
    """Train every (method, seed) student; returns the run records.

    ``batches(seed)``, when given, supplies each run's training batches (see
    :func:`~aekt_plugin.demo.train.train_student`); ``record_extra`` is added to every new run's record
    (e.g. the source revision it ran on); ``step_factory`` is passed to ``train_student`` (a step through
    a toolkit's training task, say).

    With ``json_path`` the results file is rewritten after every run; with ``resume`` the runs already in
    it (same method name and seed) are kept instead of rerun. ``seeds_for`` overrides the seeds of some
    methods. The work runs group by group (``groups``: lists of method names, default one group of all),
    seed by seed inside a group (every method of seed 0 first), so a table cut short still has complete
    pairs for its first groups.
    """
    runs: list[dict[str, Any]] = []
    if resume and json_path is not None and json_path.exists():
        names = {m.name for m in methods}
        runs = [r for r in read_results(json_path)["runs"] if r["method"] in names]
    done = {(r["method"], r["seed"]) for r in runs}
    seeds_for = dict(seeds_for or {})
    by_name = {m.name: m for m in methods}
    if len(by_name) != len(methods):
        raise ValueError("methods must have distinct names")
    unknown = [n for g in (groups or []) for n in g if n not in by_name] + [
        n for n in seeds_for if n not in by_name
    ]
    if unknown:
        raise ValueError(f"groups/seeds_for name unknown methods: {unknown}")
    protocol = protocol_record(prepared, methods, seeds)
    protocol["seeds_per_method"] = {m.name: list(seeds_for.get(m.name, seeds)) for m in methods}
    protocol.update(protocol_extra or {})
    grouped = [list(g) for g in groups] if groups else [[m.name for m in methods]]
    grouped.append([m.name for m in methods if all(m.name not in g for g in grouped)])
    work = []
    for group in grouped:
        all_seeds = sorted({s for n in group for s in seeds_for.get(n, seeds)})
        work += [(by_name[n], s) for s in all_seeds for n in group if s in seeds_for.get(n, seeds)]
    work = [(m, s) for m, s in work if (m.name, s) not in done]
    bar = _tqdm(work, show=progress, desc=f"{prepared.setting.dataset} runs", unit="run")
    for method, seed in bar:
        _, rec = train_student(
            prepared.data,
            prepared.teacher_logits,
            method,
            prepared.setting.student,
            seed=seed,
            progress=progress,
            desc=f"{method.name} s{seed}",
            batches=None if batches is None else batches(seed),
            step_factory=step_factory,
        )
        rec.update(record_extra or {})
        runs.append(rec)
        if rec["collapsed"]:
            _logger.warning("run %s seed %d collapsed (accuracy %.4f)", method.name, seed, rec["accuracy"])
        if progress and hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{method.name} s{seed}: {100 * rec['accuracy']:.2f}%")
        if json_path is not None:
            write_results(json_path, protocol, _ordered(runs, methods))
    return _ordered(runs, methods)


def _ordered(runs: Sequence[dict[str, Any]], methods: Sequence[MethodConfig]) -> list[dict[str, Any]]:
    rank = {m.name: i for i, m in enumerate(methods)}
    return sorted(runs, key=lambda r: (rank.get(r["method"], len(rank)), r["seed"]))


def parse_seeds(text: str) -> list[int]:
    """``N`` (seeds 0..N-1), ``A-B`` or ``a,b,c``, as the ``--seeds`` options take them."""
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(x) for x in text.split("-"))
            seeds = list(range(lo, hi + 1))
        elif "," in text:
            seeds = [int(x) for x in text.split(",")]
        else:
            seeds = list(range(int(text)))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--seeds: expected N, A-B or a,b,c; got {text!r}") from err
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds: no seeds in {text!r}")
    return seeds


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``aekt demo`` to ``parser`` (the ``aekt`` CLI's sub-command parser)."""
    parser.add_argument(
        "--dataset",
        choices=sorted(SETTINGS),
        default="digits100",
        help="digits100 (default: pairs of scikit-learn's digits, 100 classes), digits (10 classes), "
        "fashion-mnist or fmnist100 (Fashion-MNIST's files: Debian's dataset-fashion-mnist, or --data-dir)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"directory of Fashion-MNIST's IDX files for {' and '.join(FILE_DATASETS)} "
        f"(default {FASHION_MNIST_DIR}, where Debian's dataset-fashion-mnist puts them)",
    )
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        default=parse_seeds("10"),
        help="number of seeds N (0..N-1), a range A-B, or a list a,b,c (default 10)",
    )
    parser.add_argument(
        "--epochs", type=_positive_int, default=None, help="student epochs (default: the dataset's setting)"
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=SMALL_PROBLEM_BETA,
        help=f"β of DKD and AEKT (default {SMALL_PROBLEM_BETA}, the small-network setting; "
        "aekt_plugin.DEFAULTS holds the CIFAR-100 value)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="also write results.json, results.md and results.png here"
    )
    parser.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--no-cache", action="store_true", help="retrain the teacher instead of using the cache"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _usage_error(message: str) -> NoReturn:
    """Stop as argparse does on a bad option: one line on stderr, exit status 2."""
    print(f"aekt demo: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_demo(argv: Sequence[str] | argparse.Namespace | None = None) -> dict[str, Any]:
    """Run ``aekt demo`` with ``argv`` (a list of strings, or a parsed namespace); print and return the
    results ``{"protocol", "runs", "table"}``."""
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        args = add_demo_arguments(argparse.ArgumentParser(prog="aekt demo")).parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.data_dir is not None and args.dataset not in FILE_DATASETS:
        _usage_error(f"--data-dir applies to {' and '.join(FILE_DATASETS)}, not to {args.dataset}")
    # Optional packages are checked before any training, not when the results are written.
    if not args.no_progress:
        require("tqdm")
    if args.out is not None:
        require("matplotlib")
    torch.set_num_threads(args.threads)
    setting: Setting = SETTINGS[args.dataset]
    if args.epochs is not None:
        setting = replace(setting, student=replace(setting.student, epochs=args.epochs))
    if args.data_dir is not None:  # only when given, so the default's teacher cache key stays as it was
        setting = replace(setting, data={**setting.data, "root": str(args.data_dir)})
    show = not args.no_progress
    t0 = time.perf_counter()
    try:
        prepared = prepare(setting, cache=not args.no_cache, progress=show)
    except FileNotFoundError as err:  # the data files are read before any training
        _usage_error(str(err))
    teacher = prepared.teacher_info
    print(
        f"teacher ({teacher['model']}, {teacher['params']} params): "
        f"test accuracy {100 * teacher['accuracy']:.2f}%"
        f"{' (cached)' if teacher.get('cached') else ''}"
    )
    methods = main_methods(beta=args.beta)
    json_path = args.out / "results.json" if args.out is not None else None
    runs = run_table(prepared, methods, args.seeds, json_path=json_path, progress=show)
    table = format_table(
        runs, title=f"{args.dataset}: student accuracy over {len(args.seeds)} seed(s), last epoch"
    )
    print(table)
    protocol = protocol_record(prepared, methods, args.seeds)
    if args.out is not None:
        protocol = read_results(args.out / "results.json")["protocol"]
        (args.out / "results.md").write_text(table)
        plot_results(runs, args.out / "results.png", title=f"aekt demo: {args.dataset}")
        print(f"wrote {args.out / 'results.json'}, results.md and results.png")
    print(f"done in {time.perf_counter() - t0:.0f} s with {args.threads} thread(s)")
    return {"protocol": protocol, "runs": runs, "table": table}
