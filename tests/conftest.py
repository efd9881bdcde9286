import os

# Kernels are defined at import time; without an accelerator they must run under Triton's
# interpreter, which has to be switched on before any kernel module is imported.
import optimized.kernels  # noqa: F401  (decides TRITON_INTERPRET by capability)

import torch
from hypothesis import HealthCheck, settings

# pytest-xdist runs one worker per core; more intra-op threads than that only contend.
torch.set_num_threads(1)

# Triton's interpreter is slow: keep property tests small by default, larger when asked
# (HYPOTHESIS_PROFILE=thorough) for a local sweep before a kernel change lands.
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
