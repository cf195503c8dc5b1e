r"""The loss-kernel benchmark behind ``aekt bench``.

Each method -- the fused ``kd_fused``, ``dkd_fused`` and ``aekt_fused`` and the baselines ``kd_plain``
(timm's KD), ``dkd_mdistiller`` (mdistiller's DKD algorithm) and ``aekt_reference`` (the readable autograd
AEKT) -- runs one forward and one backward with respect to the student's ``(B, C)`` logits. For each
method at each shape the result gives:

* its time per call and its *paired* time ratios against the baselines, from interleaved rounds in a
  shuffled order (:mod:`~aekt_plugin.bench.timing`);
* the number of ATen operators one forward+backward dispatches (:mod:`~aekt_plugin.bench.calls`);
* the bytes it keeps for backward, counted through ``saved_tensors_hooks``, and on CUDA the peak memory of
  one call (:mod:`~aekt_plugin.bench.memory`);
* whether the fused AEKT meets its targets (:mod:`~aekt_plugin.bench.targets`), and how close each fused
  loss is to its baseline in value and gradient.

``aekt bench --options`` adds the fused AEKT with each option of the kernel (``standardize``, a learnable
or per-sample temperature, ignored targets), each with its paired ratio to the loss without it.

After the main table come the rows off the tuned path (:mod:`~aekt_plugin.bench.offpath`, ``--offpath``):
the losses compiled with ``torch.compile`` at ``(4096, 8192)``, on dense ``(8, 19, 256, 512)`` logits, and
the extra peak memory of a forward and backward at ``(8192, 16384)`` in float32 and bfloat16, each with its
targets. Every missed target is listed at the top of the report with its limit and by how much it is over.

The result states the device, dtype, thread count and torch version it ran on; :func:`benchmark` returns
it ready for JSON and :func:`to_markdown` renders it. :mod:`~aekt_plugin.bench.methods` defines what is
timed, :mod:`~aekt_plugin.bench.cli` the options (``aekt bench --help``).

``benchmarks/kernel.py`` in the source repository runs the same benchmark and adds the time of a small
CNN's training step with each loss and the git revision measured, for the committed results.

Importing this package imports torch and the standard library only.
"""

from .calls import count_aten_calls
from .cli import add_bench_arguments, main, parse_shapes, run_bench
from .memory import SavedBytes, count_saved_bytes, extra_peak_memory
from .methods import BASELINES, DEFAULT_SHAPES, KERNEL_METHODS, OPTION_METHODS, OPTIONS
from .offpath import OFFPATH_ROWS, OFFPATH_SHAPES, offpath_benchmark
from .report import to_markdown
from .run import SCHEMA, benchmark

__all__ = [
    "BASELINES",
    "DEFAULT_SHAPES",
    "KERNEL_METHODS",
    "OFFPATH_ROWS",
    "OFFPATH_SHAPES",
    "OPTIONS",
    "OPTION_METHODS",
    "SCHEMA",
    "SavedBytes",
    "add_bench_arguments",
    "benchmark",
    "count_aten_calls",
    "count_saved_bytes",
    "extra_peak_memory",
    "main",
    "offpath_benchmark",
    "parse_shapes",
    "run_bench",
    "to_markdown",
]
