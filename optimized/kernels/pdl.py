"""Programmatic dependent launch (PDL) for every kernel of the optimized path.

Why: a decode step is a chain of ~500 dependent kernels of a few microseconds each, and between
two of them the GPU drains the first (its tail), then launches and ramps up the second. With PDL
(sm_90 and later) a kernel is launched while the previous one in the stream still runs: its
programs become resident, set up, and wait in `griddepcontrol.wait` until the previous grid has
finished and its writes are visible. The launch and the ramp overlap the previous kernel's tail.
CUDA graphs keep this: a captured PDL launch becomes a programmatic edge.

The contract, for every kernel here (each takes `PDL: tl.constexpr = False`):
- `pdl_start(PDL)` is its first statement: nothing written by an earlier kernel is read, and
  nothing is written, before the wait returns (that also covers a write to memory the previous
  kernel still reads).
- Right after the wait it lets the next kernel launch (`griddepcontrol.launch_dependents`): that
  one waits in turn for this one to finish, so at most two kernels overlap, one working and one
  waiting, and correctness never depends on what the next kernel is.
- A kernel launched without PDL (cuBLAS, torch's) waits for everything before it, as always; a
  PDL kernel after it gains only its launch latency.

Launches pass `**pdl_launch()`: PDL=True with `launch_pdl=True` where kernels compile for an
NVIDIA GPU of compute capability 9 or more, else PDL=False (the interpreter, older GPUs, other
vendors; the branch is then compiled out). GEMMA4_PDL=0 in the environment turns it off, for
side-by-side measurements; `ENABLED` is read at each launch (a captured graph keeps what it saw).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import INTERPRETING


@functools.cache
def supported() -> bool:
    """Whether this process's kernels can use PDL: compiled (not interpreted) for a CUDA device
    of compute capability >= 9. Asked at the first launch, not at import (no CUDA init then)."""
    if INTERPRETING or torch.version.cuda is None or getattr(torch.version, "hip", None):
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


ENABLED = os.environ.get("GEMMA4_PDL", "1") != "0"


def pdl_launch() -> dict:
    """The launch arguments that turn PDL on for one kernel launch, or leave it off."""
    if ENABLED and supported():
        return dict(PDL=True, launch_pdl=True)
    return dict(PDL=False)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """A kernel's first statement: wait for the previous kernel's grid (and its writes), then let
    the next kernel launch. Nothing when PDL is off."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
