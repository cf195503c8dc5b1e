#!/usr/bin/env python
"""Loss-kernel benchmark of SPEC §5 -- the same code as ``aekt bench`` (:mod:`aekt_plugin.bench`).

Reproduce the committed CPU figures (one pinned thread, fp32)::

    .venv/bin/python benchmarks/kernel.py --device cpu --threads 1 \
        --json benchmarks/results/kernel_cpu.json --markdown benchmarks/results/kernel_cpu.md

``--help`` lists the options (shapes, methods, rounds, dtype, CUDA, ``--strict``).
"""

from __future__ import annotations

import sys

from aekt_plugin.bench import main

if __name__ == "__main__":
    sys.exit(main())
