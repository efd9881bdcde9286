"""Elementwise kernels of Gemma 4: the MLP's gated GELU and the final logit softcap, each beside
its eager twin.

Both run in the model dtype in the reference (GEMMA4_SPEC.md 9), op by op: every torch op computes
in float32 and rounds its result to the dtype. The kernels compute in float32 and round exactly
where the reference does, so they differ from it only by the float32 error of tanh.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference.model import gelu_tanh
from .common import (check_float, check_same, gelu_tanh_f32, launch_options, round_to, rows_per_program,
                     store_rounded, tanh_f32)
from .pdl import pdl_launch, pdl_start

# Launch shape, read at each launch (bench/kernel_bench.py sweeps them): columns per program at
# most, elements per program at most, elements per warp.
MAX_BLOCK = 1024
TILE = 2048  # with 256 elements a warp: 84% -> 93% of copy bandwidth for gelu_tanh_mul on an H100
WARP_ELEMS = 256


@triton.jit
def _tile(n_rows, N, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return rows, cols, (rows < n_rows)[:, None] & (cols < N)[None, :]


@triton.jit
def _gelu_tanh_mul_kernel(gate, up, out, n_rows, N, stride_gate, stride_up,
                          ROWS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    rows, cols, mask = _tile(n_rows, N, ROWS, BLOCK)
    g = tl.load(gate + rows[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up + rows[:, None] * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = round_to(gelu_tanh_f32(g), out.dtype.element_ty)  # F.gelu's result is a dtype tensor
    store_rounded(out + rows[:, None] * N + cols[None, :], g * u, mask)


@triton.jit
def _softcap_kernel(x, out, n_rows, N, stride_x, stride_out, cap,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    rows, cols, mask = _tile(n_rows, N, ROWS, BLOCK)
    dtype = out.dtype.element_ty
    v = tl.load(x + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = round_to(tanh_f32(round_to(tl.div_rn(v, cap), dtype)), dtype)  # tanh(logits / c) * c, op by op
    store_rounded(out + rows[:, None] * stride_out + cols[None, :], t * cap, mask)


def _grid(n_rows: int, n: int):
    block = min(triton.next_power_of_2(n), MAX_BLOCK)
    rows = rows_per_program(n_rows, block, TILE)
    return (triton.cdiv(n_rows, rows), triton.cdiv(n, block)), rows, block


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for gate, up [T, I] (rows strided, last dim contiguous; e.g. the two
    column halves of one fused gate_up projection). Returns a new contiguous [T, I]."""
    check_float("gate", gate, dim=2)
    check_float("up", up, dim=2)
    check_same("gate", gate, up=up)
    if up.shape != gate.shape:
        raise ValueError(f"gate and up must have one shape, got {list(gate.shape)} and {list(up.shape)}")
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        grid, rows, block = _grid(*gate.shape)
        _gelu_tanh_mul_kernel[grid](gate, up, out, gate.shape[0], gate.shape[1], gate.stride(0), up.stride(0),
                                    ROWS=rows, BLOCK=block, **launch_options(rows * block, WARP_ELEMS), **pdl_launch())
    return out


def gelu_tanh_mul_eager(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gelu_tanh(gate) * up


def softcap(logits: torch.Tensor, cap: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """cap * tanh(logits / cap) for logits [T, V] (rows strided, last dim contiguous), each op
    rounded to the dtype as in the reference head. `out` (same shape and dtype; may be `logits`
    itself, for in place) receives the result; by default a new contiguous tensor does."""
    check_float("logits", logits, dim=2)
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"cap must be a positive float, got {cap!r}")
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    else:
        check_float("out", out, dim=2)
        check_same("logits", logits, out=out)
        if out.shape != logits.shape:
            raise ValueError(f"out has shape {list(out.shape)}, logits has {list(logits.shape)}")
    if out.numel():
        grid, rows, block = _grid(*logits.shape)
        _softcap_kernel[grid](logits, out, logits.shape[0], logits.shape[1], logits.stride(0), out.stride(0),
                              float(cap), ROWS=rows, BLOCK=block, **launch_options(rows * block, WARP_ELEMS),
                              **pdl_launch())
    return out


def softcap_eager(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap
