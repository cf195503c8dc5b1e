"""Autograd around the fused kernel, and the choice of its formulation for each call.

:func:`decoupled_kd` runs the loss through the autograd function that fits the call: eagerly, the
single-block kernel of :mod:`~aekt_plugin._kernel` (the gradient formed in the forward pass and saved), or
for large and dense inputs and under ``torch.compile`` the row-statistics formulation of
:mod:`~aekt_plugin._blocked`; under :mod:`torch.func`, :class:`DecoupledKDFunction` with its ``vmap`` rule.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from ._blocked import Saved, row_statistics_backward, row_statistics_forward, samples, uses_row_statistics
from ._kernel import WeightRule, compute_dtype, decoupled_forward

if TYPE_CHECKING:
    from ._distributed import BatchScope


class KernelOptions(NamedTuple):
    """The non-tensor arguments of the kernel's autograd functions."""

    weight_rule: WeightRule
    reduction: str
    needs_grad: bool
    needs_temperature_grad: bool = False
    standardize: bool = False
    propagate_non_finite: bool = False
    batch_scope: BatchScope | None = None


def _forward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float | Tensor,
    keep: Tensor | None,
    options: KernelOptions,
    *,
    eager: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The reduced loss and the two derivatives that backward multiplies by the incoming gradient."""
    dtype = compute_dtype(student_logits, teacher_logits)
    sample_weight = _sample_weight(student_logits.shape[-2], keep, options, dtype)
    # Eager, the kernel runs in inference mode, which spares each of its small operations autograd's
    # dispatch (the cost that dominates small batches); a compiled graph has no such cost and cannot trace
    # inference mode. Autograd saves only normal tensors, so the gradient's buffer is made out here and the
    # other results leave inference mode through a functional operation.
    grad_buffer = (
        torch.empty_like(student_logits, dtype=dtype)
        if options.needs_grad and not options.standardize and keep is None
        else None
    )
    with _kernel_mode(student_logits, eager=eager):
        loss, grad, temperature_grad = decoupled_forward(
            student_logits,
            teacher_logits,
            target,
            temperature,
            options.weight_rule,
            sample_weight=sample_weight,
            needs_grad=options.needs_grad,
            needs_temperature_grad=options.needs_temperature_grad,
            keep=keep,
            standardize=options.standardize,
            propagate_non_finite=options.propagate_non_finite,
            out=grad_buffer,
            batch_scope=options.batch_scope,
            reduction=options.reduction,
        )
    if grad is not None and grad is not grad_buffer or dtype != student_logits.dtype and grad is not None:
        grad = grad.to(student_logits.dtype, copy=True)
    if temperature_grad is not None:
        temperature_grad = temperature_grad.clone()
    # "mean" is weighted by 1/B above, so both reductions are a sum here.
    if options.reduction == "none":
        return loss.clone(), grad, temperature_grad
    return (loss.sum() if loss.dim() == 1 else loss.sum(dim=-1)), grad, temperature_grad


def _sample_weight(
    count: int, keep: Tensor | None, options: KernelOptions, dtype: torch.dtype
) -> float | Tensor:
    """The weight of each of ``count`` samples in the reduction: ``1/B`` for a local ``"mean"`` (over the
    kept samples, (I1)), 1 otherwise; the mask itself where samples are ignored."""
    local_mean = options.reduction == "mean" and options.batch_scope is None  # a global one is (B1)'s
    if keep is None:
        return 1.0 / max(count, 1) if local_mean else 1.0
    sample_weight = keep.to(dtype)
    if local_mean:
        sample_weight = sample_weight / keep.sum(dim=-1, keepdim=True).clamp_min(1)
    return sample_weight


def is_eager() -> bool:
    """Neither under ``torch.compile`` nor inside a :mod:`torch.func` transform."""
    return _functorch_level() is None and not torch.compiler.is_compiling()


def decoupled_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float | Tensor,
    keep: Tensor | None,
    options: KernelOptions,
    *,
    eager: bool,
) -> Tensor:
    """The loss through the formulation and autograd function that fit the context (``eager``:
    :func:`is_eager`). The logits are ``(B, C)`` or dense ``(N, C, S)``; ``target``, ``keep`` and a
    per-sample temperature hold one value per sample, flattened.

    * eagerly, :class:`_EagerDecoupledKD` (the single-block kernel, its gradient formed in the forward pass
      and saved) up to :data:`~aekt_plugin._blocked.SINGLE_BLOCK_LIMIT` logits, and
      :class:`_RowStatisticsKD` in blocks for larger and dense inputs;
    * under ``torch.compile``, :class:`_RowStatisticsKD` in one fusable piece;
    * under :mod:`torch.func`, :class:`DecoupledKDFunction`, whose ``vmap`` rule treats the rows of a
      vmapped instance as one batch (PyTorch binds the arguments of a ``setup_context`` function with
      :mod:`inspect` on every call, a cost as large as a tenth of the kernel at small batch sizes, so the
      eager kernel has a classic-form twin).
    """
    arguments = (student_logits, teacher_logits, target, temperature, keep, options)
    if eager:
        if uses_row_statistics(student_logits):
            return _RowStatisticsKD.apply(*arguments, True)
        return _EagerDecoupledKD.apply(*arguments)
    if _functorch_level() is None:
        return _RowStatisticsKD.apply(*arguments, False)
    if student_logits.dim() > 2:  # the rows of a dense input, for the single-block kernel
        student_logits, teacher_logits = (
            x.movedim(1, -1).reshape(-1, x.shape[1]) for x in (student_logits, teacher_logits)
        )
    return DecoupledKDFunction.apply(student_logits, teacher_logits, target, temperature, keep, options)[0]


class _RowStatisticsKD(torch.autograd.Function):
    """The row-statistics formulation (:mod:`~aekt_plugin._blocked`): forward keeps per-sample statistics
    and the logits, backward forms the gradient from them; block by block eagerly (``eager``), in one piece
    under ``torch.compile``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        temperature: float | Tensor,
        keep: Tensor | None,
        options: KernelOptions,
        eager: bool,
    ) -> Tensor:
        dtype = compute_dtype(student_logits, teacher_logits)
        sample_weight = _sample_weight(samples(student_logits), keep, options, dtype)
        with _kernel_mode(student_logits, eager=eager, inference=False):  # a forward runs without grad
            loss, saved = row_statistics_forward(
                student_logits,
                teacher_logits,
                target,
                temperature,
                keep,
                options,
                sample_weight=sample_weight,
                eager=eager,
            )
        if saved is not None:
            ctx.save_for_backward(
                student_logits,
                teacher_logits,
                target,
                temperature if isinstance(temperature, Tensor) else None,
                *(x if isinstance(x, Tensor) else None for x in saved),
            )
            # The numbers among them (a temperature, a q̂ weight that is one number) stay on ctx.
            ctx.numbers = tuple(None if isinstance(x, Tensor) else x for x in (temperature, *saved))  # type: ignore[attr-defined]
            ctx.options, ctx.eager = options, eager  # type: ignore[attr-defined]
        return loss

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor | None, None, None, Tensor | None, None, None, None]:
        if torch.is_grad_enabled() and _functorch_level() is None:
            _refuse_double_backward()
        return _row_statistics_backward(ctx, grad_loss)


@torch.autograd.function.once_differentiable
def _row_statistics_backward(
    ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor
) -> tuple[Tensor | None, None, None, Tensor | None, None, None, None]:
    student_logits, teacher_logits, target, *tensors = ctx.saved_tensors  # type: ignore[attr-defined]
    options: KernelOptions = ctx.options  # type: ignore[attr-defined]
    temperature, *rest = (x if x is not None else n for x, n in zip(tensors, ctx.numbers, strict=True))  # type: ignore[attr-defined]
    saved = Saved(*rest)
    student_grad = temperature_total = None
    if options.needs_grad:
        with _kernel_mode(student_logits, eager=ctx.eager, inference=False):  # type: ignore[attr-defined]
            student_grad = row_statistics_backward(
                student_logits,
                teacher_logits,
                target,
                temperature,
                saved,
                grad_loss,
                standardize=options.standardize,
                reduction=options.reduction,
                eager=ctx.eager,  # type: ignore[attr-defined]
            )
    if saved.temperature_grad is not None:
        by_sample = saved.temperature_grad * grad_loss.to(saved.temperature_grad.dtype)
        temperature_total = by_sample.sum_to_size(temperature.shape)
    return student_grad, None, None, temperature_total, None, None, None


class DecoupledKDFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`decoupled_forward`: the loss, differentiable in the student's logits and,
    when the temperature is a tensor that requires grad, in the temperature; the teacher, the target and
    the mask get no gradient.

    ``forward`` returns ``(loss, grad, temperature_grad)``; the two derivatives (``None`` where not asked
    for) are what backward multiplies by the incoming gradient. Written in the ``setup_context`` form with a
    ``vmap`` rule, so :mod:`torch.func` transforms (``grad``, ``vmap``, ``jacrev``) work on it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        temperature: float | Tensor,
        keep: Tensor | None,
        options: KernelOptions,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        return _forward(student_logits, teacher_logits, target, temperature, keep, options, eager=False)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        _, _, _, temperature, _, options = inputs
        _, grad, temperature_grad = output
        ctx.mark_non_differentiable(*(t for t in (grad, temperature_grad) if t is not None))
        ctx.set_materialize_grads(False)  # the derivatives' own incoming gradients are never used
        _save(ctx, grad, temperature_grad, temperature, options)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *_: Tensor
    ) -> tuple[Tensor | None, None, None, Tensor | None, None, None]:
        # create_graph=True would give a gradient without its own derivative, hence a silently wrong
        # second derivative; torch.func runs every backward with grad mode on, and there
        # once_differentiable raises when a second derivative is actually taken.
        if torch.is_grad_enabled() and _functorch_level() is None:
            _refuse_double_backward()
        return _backward(ctx, grad_loss)

    @staticmethod
    def vmap(
        info: object,
        in_dims: tuple,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        temperature: float | Tensor,
        keep: Tensor | None,
        options: KernelOptions,
    ) -> tuple[tuple, tuple]:
        """Each vmapped instance is a leading dimension of rows: its samples stay one batch for the
        reductions and for AEKT's batch normalisation."""
        size = info.batch_size  # type: ignore[attr-defined]

        def leading(value: Tensor | None, dim: int | None) -> Tensor | None:
            if not isinstance(value, Tensor):
                return value
            return value.movedim(dim, 0) if dim is not None else value.expand(size, *value.shape)

        student, teacher, classes = (
            leading(x, d) for x, d in zip((student_logits, teacher_logits, target), in_dims[:3], strict=True)
        )
        if isinstance(temperature, Tensor):
            temperature = leading(temperature, in_dims[3])
            if temperature.dim() == 1:  # one temperature per instance: broadcast over its samples
                temperature = temperature.unsqueeze(-1)
        outputs = _forward(
            student, teacher, classes, temperature, leading(keep, in_dims[4]), options, eager=False
        )
        return outputs, tuple(None if x is None else 0 for x in outputs)


class _EagerDecoupledKD(torch.autograd.Function):
    """:class:`DecoupledKDFunction` in the classic form (``forward(ctx, ...)``), for eager calls."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        temperature: float | Tensor,
        keep: Tensor | None,
        options: KernelOptions,
    ) -> Tensor:
        loss, grad, temperature_grad = _forward(
            student_logits, teacher_logits, target, temperature, keep, options, eager=True
        )
        _save(ctx, grad, temperature_grad, temperature, options)
        return loss

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor | None, None, None, Tensor | None, None, None]:
        if torch.is_grad_enabled():
            _refuse_double_backward()
        # Unless the graph is kept (retain_graph=True), autograd frees the saved gradient right after this
        # call: its buffer becomes the result, and .grad then takes it over without a copy.
        return _multiply(ctx, grad_loss, reuse=not _keeps_graph())


def _save(
    ctx: torch.autograd.function.FunctionCtx,
    grad: Tensor | None,
    temperature_grad: Tensor | None,
    temperature: float | Tensor,
    options: KernelOptions,
) -> None:
    if temperature_grad is None:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(grad, temperature_grad)
        ctx.temperature_shape = temperature.shape  # type: ignore[attr-defined]
    ctx.reduction = options.reduction  # type: ignore[attr-defined]


def _refuse_double_backward() -> None:
    raise RuntimeError(
        "double backward through the fused distillation loss is not supported: its saved gradient is a "
        "constant; use aekt_plugin.reference for higher-order derivatives"
    )


def _multiply(
    ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor | None, *, reuse: bool = False
) -> tuple[Tensor | None, None, None, Tensor | None, None, None]:
    """Multiply the saved derivatives by the incoming gradient (per sample for ``"none"``); with ``reuse``,
    in the saved gradient's own buffer (the same products), which the graph then no longer needs."""
    saved = ctx.saved_tensors  # type: ignore[attr-defined]
    grad, temperature_grad = saved if len(saved) == 2 else (saved[0], None)
    if grad_loss is None:
        return None, None, None, None, None, None
    multiply = Tensor.mul_ if reuse else Tensor.mul
    if temperature_grad is None and grad is not None and grad_loss.dim() == 0:  # the common case
        return (
            multiply(grad, grad_loss if grad_loss.dtype == grad.dtype else grad_loss.to(grad.dtype)),
            None,
            None,
            None,
            None,
            None,
        )
    # "mean"/"sum" give one incoming gradient per instance, "none" one per sample.
    per_row = grad_loss if ctx.reduction == "none" or grad_loss.dim() == 0 else grad_loss.unsqueeze(-1)  # type: ignore[attr-defined]
    student_grad = None
    if grad is not None:
        factor = per_row if per_row.dim() == 0 else per_row.unsqueeze(-1)
        student_grad = multiply(grad, factor if factor.dtype == grad.dtype else factor.to(grad.dtype))
    temperature_total = None
    if temperature_grad is not None:
        by_row = temperature_grad * per_row.to(temperature_grad.dtype)
        temperature_total = by_row.sum_to_size(ctx.temperature_shape)  # type: ignore[attr-defined]
    return student_grad, None, None, temperature_total, None, None


_backward = torch.autograd.function.once_differentiable(_multiply)


_keeps_graph = torch._C._autograd._get_current_graph_task_keep_graph
"""Whether the backward pass under way keeps the graph (``retain_graph=True``, ``create_graph=True``)."""


def _functorch_level() -> int | None:
    """The current ``torch.func`` transform level, or ``None`` outside any transform."""
    return torch._C._functorch.maybe_current_level()


def _kernel_mode(like: Tensor, *, eager: bool, inference: bool = True) -> AbstractContextManager:
    """Autocast off (the loss is computed in float32 or float64 whatever autocast would choose) and, for the
    eager kernel with ``inference``, inference mode, which spares each small operation autograd's dispatch
    (torch.inference_mode's own guard, without its Python wrapper: a few µs a call). Under
    ``torch.compile`` and ``torch.func``, which cannot trace inference mode, autocast off only."""
    if not eager:
        return torch.autocast(like.device.type, enabled=False)
    autocast = _any_autocast_enabled()
    if not inference:
        return torch.autocast(like.device.type, enabled=False) if autocast else nullcontext()
    if autocast:
        return _inference_without_autocast(like.device.type)
    return torch._C._InferenceMode(True)


_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu")
)


class _inference_without_autocast:
    def __init__(self, device_type: str) -> None:
        self._modes = (torch.inference_mode(), torch.autocast(device_type, enabled=False))

    def __enter__(self) -> None:
        for mode in self._modes:
            mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
