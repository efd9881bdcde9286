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


# -- what lands on disk ----------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_reports_and_captures_are_written_with_the_umask_modes(tmp_path, umask_022):
    import torch

    from oracle.capture import CaptureBuilder, save_capture
    from oracle.report import write_report

    facts = {"title": "t", "verdict": "parity", "summary": "s", "scenarios": [], "command": "c",
             "environment": {"versions": {}, "device": "cpu", "dtype": "float32", "git": None, "host": ""}}
    html, data = write_report(facts, tmp_path / "report")
    assert [p.stat().st_mode & 0o777 for p in (html, data)] == [0o644, 0o644]  # were 0600 (mkstemp)
    builder = CaptureBuilder({"path": "truth"})
    builder.add("r0", "embed", torch.arange(2), torch.zeros(2, 4))
    where = save_capture(builder.build(), tmp_path / "capture")
    assert where.stat().st_mode & 0o777 == 0o755  # was 0700 (mkdtemp)
    assert {p.stat().st_mode & 0o777 for p in where.iterdir()} == {0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capture", "report"]  # no temporaries left
