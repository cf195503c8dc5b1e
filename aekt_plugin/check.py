"""``aekt check``: the gradient-equivalence battery, run on the user's device and dtypes.

For KD, DKD and AEKT, on a few shapes and logit scales, it compares

* the fused kernel's loss and gradient with the readable autograd reference (:mod:`aekt_plugin.reference`),
  evaluated in ``float64`` on the same (rounded) inputs;
* the fused gradient with the closed form (G1)–(G2) of ``docs/derivations.md``;
* the invariants every gradient must satisfy: finite values on extreme logits (``|z| = 1e4``), rows that
  sum to zero (G3), a teacher that receives no gradient;
* the options against the reference: ``ignore_index`` (some samples ignored), a temperature tensor that
  requires grad (0-d and one per sample, ``dL/dT`` of (T1) included) and ``standardize``;
* the ways a loss is run besides eagerly: under autocast (the loss stays float32 and equal to the plain
  one), under :mod:`torch.func` (``grad``, and ``vmap`` of ``grad`` for per-sample gradients) and under
  ``torch.compile`` (``--compile-backend``);
* on CUDA, that a step with ``validate_args=False`` never synchronises with the host;

and prints one table row per check with the error, the tolerance and PASS/FAIL.
"""

from __future__ import annotations

import argparse
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import functional, reference

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Relative tolerances against a float64 oracle on the same rounded inputs: the kernel computes in at least
# float32, so the loss error is float32 rounding; half-precision gradients are rounded to their dtype.
LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = ((8, 10), (64, 100), (5, 2), (2, 7, 3, 3))
SCALES = (1.0, 30.0)


@dataclass(frozen=True)
class Check:
    loss: str
    dtype: str
    shape: tuple[int, ...]
    what: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance


@dataclass(frozen=True)
class _Loss:
    name: str
    fused: Callable[..., Tensor]
    reference: Callable[..., Tensor]
    options: dict[str, object]
    scales: tuple[float, ...] = SCALES


LOSSES = (
    _Loss("KD", functional.kd_loss, reference.kd_loss, {}),
    _Loss("DKD", functional.dkd_loss, reference.dkd_loss, {}),
    _Loss("AEKT", functional.aekt_loss, reference.aekt_loss, {}),
    _Loss(
        "AEKT (w_max=inf, no norm)",
        functional.aekt_loss,
        reference.aekt_loss,
        {"max_weight": math.inf, "normalize_weight": False},
        # Unbounded, the ratio weight reaches 1e10 on logits of scale 30: beyond half precision by design.
        scales=(1.0,),
    ),
)


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0))


def _inputs(shape: tuple[int, ...], scale: float, dtype: torch.dtype, device: torch.device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device, dtype)
    teacher = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device, dtype)
    target_shape = shape[:1] + shape[2:]
    target = torch.randint(0, shape[1], target_shape, generator=generator).to(device)
    return student, teacher, target


def _loss_and_grad(fn: Callable[..., Tensor], student: Tensor, *args: Tensor, **options: object):
    student = student.detach().requires_grad_(True)
    loss = fn(student, *args, **options)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def _closed_form(loss: _Loss, student: Tensor, teacher: Tensor, target: Tensor, temperature: float) -> Tensor:
    """(G1)–(G2) for ``(B, C)`` float64 inputs with the loss's weights, divided by ``B`` (mean)."""
    parts = reference.decompose(student, teacher, target, temperature)
    # The options in effect: the loss's own, else the defaults of its signature (DEFAULTS).
    signature = inspect.signature(loss.reference).parameters.values()
    options: dict[str, Any] = {
        **{p.name: p.default for p in signature if p.kind is p.KEYWORD_ONLY},
        **loss.options,
    }
    if loss.name == "KD":
        a, b = 1.0, parts.log_1m_q_t.exp()
    elif loss.name == "DKD":
        a, b = options["alpha"], options["beta"]
    else:
        weight = reference.aekt_weight(
            parts, max_weight=options["max_weight"], normalize_weight=options["normalize_weight"]
        )
        a, b = options["alpha"] * weight, options["beta"]
    grad = reference.closed_form_grad(student, teacher, target, a, b, temperature=temperature)
    return grad / student.shape[0]


def run_checks(
    *,
    device: str | torch.device = "cpu",
    dtypes: Iterable[str] = tuple(DTYPES),
    seed: int = 0,
    compile_backend: str | None = "aot_eager",
) -> list[Check]:
    """Run the battery and return one :class:`Check` per comparison (``compile_backend=None`` skips the
    ``torch.compile`` rows)."""
    device = torch.device(device)
    temperature = 4.0
    checks: list[Check] = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for loss in LOSSES:
            for shape in SHAPES:
                for scale in loss.scales:
                    checks.extend(
                        _check_one(loss, shape, scale, dtype_name, dtype, device, temperature, seed)
                    )
                checks.append(_check_extreme(loss, shape, dtype_name, dtype, device, temperature, seed))
            checks.extend(_check_options(loss, dtype_name, dtype, device, seed))
            checks.extend(_check_torch_func(loss, dtype_name, dtype, device, seed))
            if device.type == "cuda":
                checks.append(_check_no_host_sync(loss, dtype_name, dtype, device, temperature, seed))
    for loss in LOSSES[:3]:
        checks.extend(_check_autocast(loss, device, seed))
        if compile_backend is not None:
            checks.append(_check_compile(loss, device, seed, compile_backend))
    return checks


def _derivatives(fn: Callable[..., Tensor], student: Tensor, teacher: Tensor, target: Tensor, **options):
    """Loss, dL/dz and (for a temperature tensor) dL/dT on fresh leaves, summed over ``"none"`` samples."""
    student = student.detach().requires_grad_(True)
    leaves = [student]
    temperature = options.get("temperature")
    if isinstance(temperature, Tensor):
        options["temperature"] = temperature = temperature.detach().requires_grad_(True)
        leaves.append(temperature)
    loss = fn(student, teacher, target, **options)
    return (loss.detach(), *torch.autograd.grad(loss.sum(), leaves))


def _compare(
    loss: _Loss, dtype_name: str, shape: tuple[int, ...], what: str, actual: tuple, expected: tuple, dtype
) -> list[Check]:
    names = ("loss", "grad", "dL/dT")
    return [
        Check(
            loss.name,
            dtype_name,
            shape,
            f"{what}: {name}",
            _relative_error(a, e),
            LOSS_RTOL[dtype] if name == "loss" else GRAD_RTOL[dtype],
        )
        for name, a, e in zip(names, actual, expected, strict=False)
    ]


def _check_options(
    loss: _Loss, dtype_name: str, dtype: torch.dtype, device: torch.device, seed: int
) -> list[Check]:
    """``ignore_index``, temperature tensors and ``standardize`` against the float64 reference."""
    if loss.scales != SCALES:  # the unbounded AEKT variant adds nothing here
        return []
    shape = (16, 10)
    student, teacher, target = _inputs(shape, 3.0, dtype, device, seed + 1)
    ignored = target.clone()
    ignored[::3] = -100
    temperatures = {
        "a learnable temperature (0-d tensor)": torch.tensor(2.5, dtype=torch.float64, device=device),
        "per-sample temperatures": torch.linspace(1.0, 6.0, shape[0], dtype=torch.float64, device=device),
    }
    cases: list[tuple[str, Tensor, dict[str, object]]] = [
        ("ignore_index: every third sample ignored", ignored, {"temperature": 4.0}),
        ("standardize", target, {"temperature": 4.0, "standardize": True}),
    ]
    cases += [(what, target, {"temperature": t}) for what, t in temperatures.items()]
    checks = []
    for what, classes, extra in cases:
        options = dict(loss.options, **extra, reduction="sum")
        temperature = options.get("temperature")
        fused_options = dict(options)
        if isinstance(temperature, Tensor) and dtype != torch.float64:
            fused_options["temperature"] = temperature.float()
        actual = _derivatives(loss.fused, student, teacher, classes, **fused_options)
        expected = _derivatives(loss.reference, student.double(), teacher.double(), classes, **options)
        checks += _compare(loss, dtype_name, shape, what, actual, expected, dtype)
    return checks


def _check_torch_func(
    loss: _Loss, dtype_name: str, dtype: torch.dtype, device: torch.device, seed: int
) -> list[Check]:
    """``torch.func.grad`` of the loss, and ``vmap(grad(...))`` per-sample gradients, against autograd."""
    shape = (8, 10)
    student, teacher, target = _inputs(shape, 3.0, dtype, device, seed + 2)
    options = dict(loss.options, validate_args=False)
    grad = torch.func.grad(lambda z: loss.fused(z, teacher, target, **options))(student)
    _, expected = _derivatives(loss.fused, student, teacher, target, **options)
    per_sample = torch.func.vmap(
        torch.func.grad(lambda z, v, y: loss.fused(z[None], v[None], y[None], **options))
    )(student, teacher, target)
    one_by_one = torch.stack(
        [
            _derivatives(
                loss.reference,
                student[i : i + 1].double(),
                teacher[i : i + 1].double(),
                target[i : i + 1],
                **loss.options,
            )[1][0]
            for i in range(shape[0])
        ]
    )
    return [
        Check(
            loss.name,
            dtype_name,
            shape,
            "torch.func.grad vs autograd",
            _relative_error(grad, expected),
            0.0 if dtype == torch.float64 else GRAD_RTOL[dtype],
        ),
        Check(
            loss.name,
            dtype_name,
            shape,
            "vmap(grad) per-sample vs reference",
            _relative_error(per_sample, one_by_one),
            GRAD_RTOL[dtype],
        ),
    ]


_AUTOCAST_DTYPES = {"cpu": (torch.bfloat16,), "cuda": (torch.float16, torch.bfloat16)}


def _check_autocast(loss: _Loss, device: torch.device, seed: int) -> list[Check]:
    """Under autocast the loss is float32 and equals the plain loss; the gradient keeps the logits' dtype."""
    shape = (64, 100)
    student, teacher, target = _inputs(shape, 3.0, torch.float32, device, seed + 3)
    plain, plain_grad = _derivatives(loss.fused, student, teacher, target, **loss.options)
    checks = []
    for dtype in _AUTOCAST_DTYPES.get(device.type, ()):
        name = str(dtype).replace("torch.", "")
        with torch.autocast(device.type, dtype=dtype):
            value, grad = _derivatives(loss.fused, student, teacher, target, **loss.options)
        kept = value.dtype == torch.float32 and grad.dtype == student.dtype
        error = max(_relative_error(value, plain), _relative_error(grad, plain_grad)) if kept else math.inf
        checks.append(
            Check(loss.name, "float32", shape, f"under autocast({name}): float32, unchanged", error, 1e-6)
        )
    return checks


def _check_compile(loss: _Loss, device: torch.device, seed: int, backend: str) -> Check:
    """A function compiled with ``backend`` gives the eager loss and gradient."""
    shape = (16, 10)
    student, teacher, target = _inputs(shape, 3.0, torch.float32, device, seed + 4)
    options = dict(loss.options, validate_args=False, temperature=2.7)
    expected = _derivatives(loss.fused, student, teacher, target, **options)
    compiled = torch.compile(lambda z: loss.fused(z, teacher, target, **options), backend=backend)
    z = student.detach().requires_grad_(True)
    value = compiled(z)
    (grad,) = torch.autograd.grad(value, z)
    error = max(_relative_error(value.detach(), expected[0]), _relative_error(grad, expected[1]))
    return Check(loss.name, "float32", shape, f"torch.compile(backend={backend!r}) vs eager", error, 1e-5)


def _check_no_host_sync(loss, dtype_name, dtype, device, temperature, seed) -> Check:
    """With ``validate_args=False`` a CUDA step must not synchronise with the host."""
    shape = (64, 100)
    student, teacher, target = _inputs(shape, 1.0, dtype, device, seed)
    student.requires_grad_(True)
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.fused(
            student, teacher, target, temperature=temperature, validate_args=False, **loss.options
        ).backward()
        error = 0.0
    except RuntimeError:
        error = math.inf
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return Check(loss.name, dtype_name, shape, "no host sync with validate_args=False", error, 0.0)


def _check_one(loss, shape, scale, dtype_name, dtype, device, temperature, seed) -> list[Check]:
    student, teacher, target = _inputs(shape, scale, dtype, device, seed)
    fused_loss, fused_grad = _loss_and_grad(
        loss.fused, student, teacher, target, temperature=temperature, **loss.options
    )
    oracle_loss, oracle_grad = _loss_and_grad(
        loss.reference, student.double(), teacher.double(), target, temperature=temperature, **loss.options
    )
    label = f"{tuple(shape)} ×{scale:g}"
    results = [
        Check(
            loss.name,
            dtype_name,
            shape,
            f"loss vs reference {label}",
            _relative_error(fused_loss, oracle_loss),
            LOSS_RTOL[dtype],
        ),
        Check(
            loss.name,
            dtype_name,
            shape,
            f"grad vs reference {label}",
            _relative_error(fused_grad, oracle_grad),
            GRAD_RTOL[dtype],
        ),
    ]
    if len(shape) == 2:
        closed = _closed_form(loss, student.double(), teacher.double(), target, temperature)
        results.append(
            Check(
                loss.name,
                dtype_name,
                shape,
                f"grad vs closed form (G1-G2) {label}",
                _relative_error(fused_grad, closed),
                GRAD_RTOL[dtype],
            )
        )
        row_sums = fused_grad.double().sum(dim=1).abs().max()
        results.append(
            Check(
                loss.name,
                dtype_name,
                shape,
                f"grad rows sum to 0 (G3) {label}",
                float(row_sums / fused_grad.double().abs().max().clamp_min(1e-30)),
                GRAD_RTOL[dtype] * 10,
            )
        )
    return results


def _check_extreme(loss, shape, dtype_name, dtype, device, temperature, seed) -> Check:
    """Logits of magnitude 1e4 (p_t rounding to 1 or underflowing): everything finite, teacher untouched."""
    student, teacher, target = _inputs(shape, 1.0, torch.float64, device, seed)
    student = (student.sign() * 1e4).to(dtype)
    teacher = (teacher.sign() * 1e4).to(dtype).requires_grad_(True)
    options = dict(loss.options)
    if options.get("max_weight") == math.inf:
        options["max_weight"] = 10.0  # an unbounded ratio weight is allowed to be inf there, by design
    with warnings.catch_warnings():  # the teacher requires grad here on purpose: it must get none
        warnings.simplefilter("ignore", UserWarning)
        fused_loss, fused_grad = _loss_and_grad(
            loss.fused, student, teacher, target, temperature=temperature, **options
        )
    finite = bool(
        torch.isfinite(fused_loss).all() and torch.isfinite(fused_grad).all() and teacher.grad is None
    )
    return Check(
        loss.name,
        dtype_name,
        shape,
        "finite at |logits| = 1e4, teacher gets no grad",
        0.0 if finite else math.inf,
        0.0,
    )


def format_table(checks: Sequence[Check]) -> str:
    header = f"{'loss':<26} {'dtype':<9} {'check':<52} {'error':>10} {'tol':>8}  result"
    lines = [header, "-" * len(header)]
    for check in checks:
        lines.append(
            f"{check.loss:<26} {check.dtype:<9} {check.what:<52} "
            f"{check.error:>10.2e} {check.tolerance:>8.0e}  "
            f"{'PASS' if check.passed else 'FAIL'}"
        )
    failed = sum(not check.passed for check in checks)
    lines.append(f"{len(checks) - failed} passed, {failed} failed")
    return "\n".join(lines)


def add_check_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument(
        "--dtype",
        dest="dtypes",
        action="append",
        choices=sorted(DTYPES),
        help="dtype to check; repeat for several (default: all four)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random logits (default 0)")
    parser.add_argument(
        "--compile-backend",
        default="aot_eager",
        help="torch.compile backend of the compile rows: aot_eager (default, quick), inductor (compiles "
        "kernels, slower), or none to skip them",
    )
    parser.add_argument("--failures-only", action="store_true", help="print only the failing rows")
    return parser


def run_check(args: argparse.Namespace) -> int:
    """Run ``aekt check``; return 0 when every check passes, else 1."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("aekt check: --device cuda requested but torch.cuda.is_available() is False")
    backend = None if args.compile_backend == "none" else args.compile_backend
    checks = run_checks(
        device=device, dtypes=args.dtypes or tuple(DTYPES), seed=args.seed, compile_backend=backend
    )
    shown = [c for c in checks if not c.passed] if args.failures_only else checks
    print(f"aekt check on {device} (torch {torch.__version__})")
    print(format_table(shown) if shown else f"{len(checks)} passed, 0 failed")
    return 0 if all(check.passed for check in checks) else 1
