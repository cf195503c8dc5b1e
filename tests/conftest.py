"""Shared test settings: one CPU thread (two make small ops 1000x slower on 2-core machines) and a
hypothesis profile without deadlines (the CI machine is shared and its timings are noisy)."""

import os

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

settings.register_profile(
    "aekt",
    deadline=None,
    max_examples=int(os.environ.get("AEKT_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("CI") is not None,
)
settings.load_profile("aekt")
