"""The demo and the accuracy benchmark's shared code (``aekt demo``, ``benchmarks/accuracy.py``).

Needs the ``demo`` extra (scikit-learn, tqdm, matplotlib), imported only when used::

    pip install "aekt-plugin[demo]"

Modules: :mod:`.data` (digits, Fashion-MNIST, Fashion-MNIST-100), :mod:`.models` (small CNNs),
:mod:`.train` (one training loop for every method, cached teacher, collapse detection), :mod:`.stats`
(mean ± std, paired differences with t-intervals), :mod:`.report` (JSON, markdown, PNG),
:mod:`.protocol` (the embedded settings) and :mod:`.run` (``run_demo``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_demo_arguments", "run_demo"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
