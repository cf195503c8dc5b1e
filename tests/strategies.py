"""Hypothesis strategies drawing the inputs a user could pass to the losses."""

from __future__ import annotations

import math

import torch
from hypothesis import assume
from hypothesis import strategies as st

LOSS_NAMES = ("kd_loss", "dkd_loss", "aekt_loss")


@st.composite
def logit_batches(draw, *, max_batch: int = 12, max_classes: int = 300, dtype=torch.float64):
    """``(student, teacher, target, temperature)`` with logit scales from 1e-3 to 1e3."""
    batch = draw(st.integers(1, max_batch))
    classes = draw(st.integers(2, max_classes))
    scale = 10.0 ** draw(st.floats(-3.0, 3.0))
    temperature = draw(st.floats(0.5, 8.0))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale
    target = torch.randint(0, classes, (batch,), generator=generator)
    # Rare draws whose every row lies in [0, 1] and sums to 1 set off the losses' "these look like
    # probabilities" warning, which is not what these properties are about (tests/test_reliability.py is).
    assume(not (_probability_rows(student) or _probability_rows(teacher)))
    return student.to(dtype), teacher.to(dtype), target, temperature


def _probability_rows(logits: torch.Tensor) -> bool:
    in_range = bool(logits.min() >= 0) and bool(logits.max() <= 1)
    return in_range and bool(
        torch.allclose(logits.sum(-1), torch.ones(logits.shape[0], dtype=logits.dtype), atol=1e-2)
    )


@st.composite
def loss_options(draw, name: str):
    """Keyword options of ``name`` (weights and reduction); AEKT's ``max_weight`` includes ``inf``."""
    options: dict[str, object] = {"reduction": draw(st.sampled_from(("mean", "sum", "none")))}
    if name in ("dkd_loss", "aekt_loss"):
        options["alpha"] = draw(st.floats(0.0, 4.0))
        options["beta"] = draw(st.floats(0.0, 10.0))
    if name == "aekt_loss":
        options["max_weight"] = draw(st.sampled_from((1.0, 2.0, 5.0, 10.0, math.inf)))
        options["normalize_weight"] = draw(st.booleans())
    return options
