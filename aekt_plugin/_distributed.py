r"""The global batch of ``global_batch=True``: the samples of all ranks of a process group as one batch.

Two statistics of the family couple the samples of a batch: AEKT's normalised ratio weight
``w_i / mean(w)`` and the mean over the kept samples (``ignore_index``). Under ``torch.distributed`` each rank
sees its own shard; with a :class:`BatchScope` both run over every rank's samples, from one all-gather of
two numbers per rank — the log-sum-exp of the rank's log weights and its number of kept samples — so that
(``docs/derivations.md``, eq. (B1))

.. math::

    \frac{w_i}{\operatorname{mean}_{\text{global}}(w)} = N\, \exp\!\big(\log w_i - \mathrm{LSE}_{r}(\ell_r)\big),
    \qquad \ell_r = \mathrm{LSE}_{i \in r} \log w_i,\quad N = \textstyle\sum_r n_r .

Each rank's ``"mean"`` loss is then ``(W/N)·Σ_{i∈rank} L_i`` and its ``"sum"`` ``W·Σ_{i∈rank} L_i`` (``W``
ranks): its share of the global loss times ``W``, so the mean of the ranks' values is the global loss and
DDP's averaged gradient is the gradient of the global loss. The gathered numbers are stop-gradient
constants, as the weight is; nothing is read on the host (no synchronisation on CUDA).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["BatchScope", "batch_scope"]


class BatchScope:
    """The ranks of ``group`` whose samples make one batch."""

    __slots__ = ("group", "world_size")

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)

    def _gather(self, log_sum: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """``(LSE over the ranks of log_sum, Σ count)``, from one all-gather of two float64 numbers per rank."""
        import torch.distributed._functional_collectives as funcol

        local = torch.stack((log_sum.to(torch.float64), count.to(torch.float64)))
        gathered = funcol.all_gather_single(local, 0, self.group).view(self.world_size, 2)
        return torch.logsumexp(gathered[:, 0], dim=0), gathered[:, 1].sum()

    def normalized(self, log_weight: Tensor, keep: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
        """``scale · w_i / mean(w)`` over the kept samples of all ranks (0 where ignored), and their number.

        ``log_weight`` is the ``(B,)`` vector of ``log w`` of this rank's samples.
        """
        if keep is None:
            local_log_sum = torch.logsumexp(log_weight, dim=-1)
            local_count = torch.full((), log_weight.shape[-1], dtype=torch.float64, device=log_weight.device)
        else:
            local_log_sum = torch.logsumexp(log_weight.masked_fill(~keep, -torch.inf), dim=-1)
            local_count = keep.sum(dtype=torch.float64)
        log_sum, count = self._gather(local_log_sum, local_count)
        shares = torch.exp(log_weight - log_sum.to(log_weight.dtype)) * (count * scale).to(log_weight.dtype)
        return (shares if keep is None else torch.where(keep, shares, 0.0)), count

    def sample_weight(
        self,
        base: float | Tensor,
        keep: Tensor | None,
        like: Tensor,
        reduction: str,
        count: Tensor | None = None,
    ) -> float | Tensor:
        """The per-sample weight of the reduction over the global batch, times ``W``: ``base · W / N``
        for ``"mean"`` (``N`` gathered here unless a weight rule already did), ``base · W`` for ``"sum"``,
        ``base`` for ``"none"``. ``base`` is 1, or the mask of the kept samples; ``like`` is a ``(B, ...)``
        tensor in the computation's dtype and on its device."""
        if reduction == "none":
            return base
        if reduction == "sum":
            return base * float(self.world_size)
        if count is None:
            zero = torch.zeros((), dtype=torch.float64, device=like.device)
            local = keep.sum(dtype=torch.float64) if keep is not None else zero + like.shape[0]
            count = self._gather(zero, local)[1]
        return base * (self.world_size / count.clamp_min(1.0)).to(like.dtype)


def batch_scope(global_batch: bool, process_group: dist.ProcessGroup | None) -> BatchScope | None:
    """The scope of ``global_batch=True``: ``None`` (one process's batch) unless torch.distributed is
    initialised and the group (default: the world) has more than one rank."""
    if not global_batch or not dist.is_available() or not dist.is_initialized():
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return BatchScope(group) if dist.get_world_size(group) > 1 else None
