"""No traceback reaches a user: malformed input to the CLI and the HTTP server is refused with one
line that names the field, exit code 2 (or a 4xx answer), nothing half-written on disk, and a
server that keeps answering.

Every input here fails before any model work (the CLI checks up front), so the whole file stays
fast: most CLI calls run in-process through `oracle.cli.main`, a few as real subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh interpreter (import order matters there), from the repo root."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)  # the fresh process decides it, as a user's would
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


# -- import order ----------------------------------------------------------------------------


def test_transformers_imported_before_optimized_still_runs_kernels():
    # transformers' model classes import triton; on a machine without a GPU, optimized.kernels then
    # has to turn triton's already-defined library over to the interpreter (docs/design_notes.md).
    pytest.importorskip("triton")
    first = "from transformers import PreTrainedModel" if _installed("transformers") else "import triton"
    proc = run_python(f"""
        {first}  # imports triton before optimized does
        import sys
        import torch
        import optimized
        from optimized.kernels import default_device
        from optimized.kernels.norms import rms_norm, rms_norm_eager

        assert "triton" in sys.modules
        x = torch.randn(5, 64, device=default_device())
        w = torch.randn(64, device=default_device())
        torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_eager(x, w, 1e-6))
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
