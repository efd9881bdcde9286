import os

# Kernels are defined at import time; without an accelerator they must run under Triton's
# interpreter, which has to be switched on before any kernel module is imported.
import optimized.kernels  # noqa: F401  (decides TRITON_INTERPRET by capability)

import pytest
import torch
from hypothesis import HealthCheck, settings

from optimized.kernels import default_device

# The device the suite runs on is the machine's: `default_device()`, cuda where a GPU exists (the
# Triton kernels run compiled there), cpu elsewhere (they run under Triton's interpreter). Every
# test that hands tensors to a kernel or builds a scenario puts them on it: through the `device`
# fixture, or `default_device()` at module level where no fixture reaches (hypothesis strategies,
# module-level tensors). Only a test about a specific device names one (input validation that
# expects "meta", report text). CI is CPU-only; run the same suite on a GPU machine to test the
# compiled kernels.
DEVICE = default_device()


@pytest.fixture(scope="session")  # session scope, so hypothesis @given tests may use it too
def device() -> torch.device:
    return DEVICE


# pytest-xdist runs one worker per core; more intra-op threads than that only contend.
torch.set_num_threads(1)

# Triton's interpreter is slow: keep property tests small by default, larger when asked
# (HYPOTHESIS_PROFILE=thorough) for a local sweep before a kernel change lands. Tests whose
# examples cost seconds (whole scenarios) draw a fraction of the profile's count, e.g.
# @settings(max_examples=settings.default.max_examples // 5), so they scale with the profile too.
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
