"""GEMV kernels for few rows (decode): y = x @ w.T with w [N, K] row-major (F.linear's weight),
with the prologue or epilogue the decode layer puts around each projection fused in, each public
op beside its eager twin (`op_eager`, the unfused ops).

    rms_norm_linear(x, norm_w, eps, w)          linear(rms_norm(x, norm_w, eps), w)   (input norm + qkv)
    linear_gelu_mul(x, w)                       gelu_tanh(gate) * up, [gate; up] = w  (gate_up + act)
    linear_gelu_mul(x, w, up=u)                 gelu_tanh(x @ w.T) * u                (PLE gate)
    linear(x, w)                                x @ w.T                               (down, o_proj, PLE proj)

Why: at batch 1 a decode step reads every weight once and does almost no arithmetic, so each
projection is a pass over its weight at memory bandwidth, and the ops around it (a norm, the
gated GELU) are extra launches over tiny tensors. Each program here owns BLOCK_N output columns
(for the gated ops BLOCK_N gate columns and the matching up columns, so the activation is
computed where both sums are) and streams those weight rows over K in BLOCK_K chunks: loads
contiguous along K, every weight element read once by one program, float32 accumulation.

Two inner products, a launch setting (DOT) chooses:
- DOT=False: a broadcast multiply and a sum over K, [BLOCK_M, BLOCK_N, BLOCK_K] per step. No
  minimum tile, so BLOCK_N can be small (many programs even for N = 1536); its float32 FMAs cost
  BLOCK_M per weight element, fine for one or a few rows, compute-bound at tens of rows.
- DOT=True: tl.dot with the rows padded to BLOCK_M >= 16 (tensor cores; the padding costs
  nothing that matters in a memory-bound loop), BLOCK_N >= 16. For the larger row counts.
Split-K (more programs for N = 1536 at the dot path's BLOCK_N floor) is not done: a deterministic
one needs a second pass or an in-kernel fix-up; see the notes in bench/gemv_bench.py.

Numerics (shared/DESIGN.md, the bf16 rule): every load is upcast to float32 (dot operands are
the storage dtype only where compiled, `dot_args`), the norm is the norms kernel's float32 math
rounded to the model dtype before the product (as the unfused `rms_norm` output is), gate and up
are rounded to the model dtype before the activation (as the unfused projection's output is),
and the activation rounds where `gelu_tanh_mul` rounds. Kernel and twin then differ by the
order of the float32 sums: now and then one ULP of the storage dtype.

Calls past the limits (GEMV_MAX_ROWS, GEMV_MAX_WEIGHT below: prefill chunks, big weights) take
the unfused path (the norm / activation kernels and torch's F.linear), where cuBLAS is faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from reference.model import gelu_tanh as _reference_gelu_tanh, rms_norm as _reference_rms_norm
from . import INTERPRETING
from .activation import gelu_tanh_mul as _gelu_tanh_mul_kernel
from .common import (check_eps, check_float, check_same, check_weight, dot_args, gelu_tanh_f32, round_to,
                     store_rounded)
from .norms import rms_norm as _rms_norm_kernel
from .pdl import pdl_launch, pdl_start

# Which calls take the GEMV kernel (the others: the unfused path, cuBLAS): at most GEMV_MAX_ROWS
# rows and a weight of at most GEMV_MAX_WEIGHT elements (the MLP's gate_up: both halves). Read at
# each call (a captured decode graph keeps what it saw); GEMV_MAX_ROWS = 0 turns the kernel off.
# From two H200 sweeps of bench/gemv_bench.py (docs/results/gemv_bench_h200*.json; bf16; baseline:
# cuBLAS + the separate norm / gated-GELU kernel; us per call at M = 1, the kernel's best setting):
# - the kernel wins on small weights, where a call is mostly launch, ramp and tail: E2B o_proj
#   1536 x 2048 4.5 vs 7.7, qkv 2560 x 1536 (norm fused) 5.9 vs 7.0, down 1536 x 6144 8.6 vs 9.9,
#   PLE gate 3.7 vs 6.6; 26B-A4B gate_up 2 x 2112 x 2816 (11.9M) 10.9 vs 13.2, o_proj 2816 x 4096
#   (11.5M) 9.5 vs 11.1;
# - cuBLAS streams big weights better: 26B-A4B qkv 8192 x 2816 (23M) 19.7 vs 17.5, every 31B
#   projection (29-116M) 0.81-0.96x; E2B's gate_up (18.9M, 37.7M) ties (13.6 vs 14.4, 23.4 vs 23.4).
#   One small loss inside the limit: 26B-A4B down 2816 x 2112 (5.9M) 7.9 vs 6.7.
# - at M = 2 the kernel still wins on the smallest weights (o_proj 2048: 5.1 vs 7.4), at M = 4
#   mostly and at M = 8 always loses (tl.dot path 1.2-2x slower): GEMV_MAX_ROWS = 1.
GEMV_MAX_ROWS = 1
GEMV_MAX_WEIGHT = 12 << 20

# Launch settings per shape class, read at each launch: the first entry whose `rows` covers M.
# rows = 1 measured (H200 sweeps above): BLOCK_K = 2048 beat 1024 and 1024 beat 512 on most
# shapes, 4 warps beat 8, BLOCK_N 2-4 beat 8-16 and tl.dot (e.g. down 1536 x 6144: 10.4 us at
# BLOCK_N 2, 11.1 at 4, 12.6 at 8, 15.2 with tl.dot at 16, all at BLOCK_K 1024; 8.6 at 2 / 2048). BLOCK_N is halved, down to its floor (16 with DOT, else 2), while
# the grid has fewer than MIN_PROGRAMS programs: 512 puts N = 1536 at BLOCK_N = 2, as measured best.
# The rows > 1 entries are not measured as defaults: at M = 8 the broadcast sum was 3-8x slower
# than cuBLAS (its [8, BLOCK_N, BLOCK_K] products spill), tl.dot at BLOCK_N 16 1.2-2x slower.
SETTINGS = [
    dict(rows=1, BLOCK_N=4, BLOCK_K=2048, DOT=False, num_warps=4, num_stages=3),
    dict(rows=32, BLOCK_N=16, BLOCK_K=256, DOT=True, num_warps=4, num_stages=3),
]
MIN_PROGRAMS = 512
# Under Triton's interpreter (CPU; the kernel runs there only when forced, i.e. in its tests),
# which pays for every program and every op: one program over a test model's whole width.
# Measured here (tiny, one row): the input norm + qkv 68 ms a call at BLOCK_N 32 / BLOCK_K 64,
# 8 ms at 256 / 128 (the unfused pair: 4 ms); the gated MLP 27 -> 9 ms.
INTERPRETER_SETTINGS = dict(BLOCK_N=256, BLOCK_K=128, DOT=True, num_warps=4, num_stages=1)

_MODES = {"linear": 0, "norm": 1, "gated": 2, "gated_up": 3}


# -- kernel ------------------------------------------------------------------------------------

@triton.jit
def _load_weights(w_rows, up_rows, kk, col_ok, K, MODE: tl.constexpr, EVEN_K: tl.constexpr):
    """The weight tile at columns kk of the program's rows, and (MODE 2) of the matching up rows
    (else the same tile again, never read)."""
    if EVEN_K:
        w_mask = col_ok[:, None]
    else:
        w_mask = col_ok[:, None] & (kk < K)[None, :]
    wv = tl.load(w_rows + kk[None, :], mask=w_mask, other=0.0)
    uv = wv
    if MODE == 2:
        uv = tl.load(up_rows + kk[None, :], mask=w_mask, other=0.0)
    return wv, uv


@triton.jit
def _accumulate(acc, acc_up, x_rows, norm_w, rstd, wv, uv, kk, row_ok, K, MODE: tl.constexpr, EVEN_K: tl.constexpr,
                DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc (and acc_up, MODE 2) plus the products of the rows' x at columns kk (normed, MODE 1)
    with the weight tiles wv (uv)."""
    dtype = wv.dtype  # the model dtype: x, w and out share it
    if EVEN_K:
        x_mask = row_ok[:, None]
    else:
        x_mask = row_ok[:, None] & (kk < K)[None, :]
    xv = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0).to(tl.float32)
    if MODE == 1:
        nw = tl.load(norm_w + kk, mask=kk < K, other=0.0).to(tl.float32)
        xv = round_to(xv * rstd[:, None] * nw[None, :], dtype)  # the normed input, as stored unfused
    if DOT:
        xd = xv.to(DOT_DTYPE)
        acc = tl.dot(xd, tl.trans(wv.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
        if MODE == 2:
            acc_up = tl.dot(xd, tl.trans(uv.to(DOT_DTYPE)), acc_up, input_precision=DOT_PRECISION)
    else:
        acc += tl.sum(xv[:, None, :] * wv.to(tl.float32)[None, :, :], axis=2)
        if MODE == 2:
            acc_up += tl.sum(xv[:, None, :] * uv.to(tl.float32)[None, :, :], axis=2)
    return acc, acc_up


@triton.jit
def _gemv_kernel(x, w, norm_w, up, out, gate_up_out, M, N, K, k_float, stride_x, stride_w, stride_up, eps,
                 MODE: tl.constexpr, STORE_GATE_UP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False):
    """MODE 0: out = x @ w.T; 1: out = rms_norm(x, norm_w) @ w.T; 2: w = [gate; up] (N gate rows,
    then N up rows), out = gelu(x @ gate.T) * (x @ up.T), gate_up_out [M, 2N] the two products
    (STORE_GATE_UP); 3: out = gelu(x @ w.T) * up[M, N]. K is a runtime argument (k_float the
    same as a float32 number, for the norm's mean) so that one compiled kernel serves every K.

    The first BLOCK_K columns of the program's weight rows are loaded before `pdl_start`: no
    kernel writes weights, so with PDL (pdl.py) their stream starts while the previous kernel
    still runs; everything else is read after the wait. One row's E2B projections (K = 1536 <=
    BLOCK_K = 2048) then have their whole weight slab in flight before the wait returns. Measured
    on an H200 it gained nothing visible (a batch-1 step 2.594 -> 2.587 ms, design note 40)."""
    dtype = out.dtype.element_ty
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_rows = x + rows.to(tl.int64)[:, None] * stride_x
    w_rows = w + cols.to(tl.int64)[:, None] * stride_w
    up_rows = w + (cols + N).to(tl.int64)[:, None] * stride_w  # MODE 2: the matching up rows
    wv, uv = _load_weights(w_rows, up_rows, ks, col_ok, K, MODE, EVEN_K)
    pdl_start(PDL)

    if MODE == 1:  # each program recomputes the rows' RMS over K (x is M x K, from L2)
        sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + ks) < K
            xv = tl.load(x_rows + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            xv = xv.to(tl.float32)
            sum_sq += tl.sum(xv * xv, axis=1)
        # rms_rows' op order (common.py), the norms kernel's
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(sum_sq, k_float) + eps))
    else:
        rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)  # not read

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc, acc_up = _accumulate(acc, acc_up, x_rows, norm_w, rstd, wv, uv, ks, row_ok, K, MODE, EVEN_K, DOT,
                              DOT_DTYPE, DOT_PRECISION)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        wv, uv = _load_weights(w_rows, up_rows, k0 + ks, col_ok, K, MODE, EVEN_K)
        acc, acc_up = _accumulate(acc, acc_up, x_rows, norm_w, rstd, wv, uv, k0 + ks, row_ok, K, MODE, EVEN_K,
                                  DOT, DOT_DTYPE, DOT_PRECISION)

    mask = row_ok[:, None] & col_ok[None, :]
    out_ptrs = out + rows.to(tl.int64)[:, None] * N + cols[None, :]
    if MODE <= 1:
        store_rounded(out_ptrs, acc, mask)
    else:
        gate = round_to(acc, dtype)  # the projection's output is a dtype tensor, unfused
        if MODE == 2:
            u = round_to(acc_up, dtype)
            if STORE_GATE_UP:
                gu_ptrs = gate_up_out + rows.to(tl.int64)[:, None] * (2 * N) + cols[None, :]
                store_rounded(gu_ptrs, gate, mask)
                store_rounded(gu_ptrs + N, u, mask)
        else:
            u = tl.load(up + rows.to(tl.int64)[:, None] * stride_up + cols[None, :], mask=mask, other=0.0)
            u = u.to(tl.float32)
        g = round_to(gelu_tanh_f32(gate), dtype)  # F.gelu's result is a dtype tensor
        store_rounded(out_ptrs, g * u, mask)


# -- launch ------------------------------------------------------------------------------------

def launch_settings(rows: int, n: int) -> dict:
    """The launch settings for M = rows and N = n output columns (gate columns for the gated ops)."""
    if INTERPRETING:
        return dict(INTERPRETER_SETTINGS)
    s = dict(next((e for e in SETTINGS if rows <= e["rows"]), SETTINGS[-1]))
    s.pop("rows")
    floor = 16 if s["DOT"] else 2
    while s["BLOCK_N"] > floor and triton.cdiv(n, s["BLOCK_N"]) < MIN_PROGRAMS:
        s["BLOCK_N"] //= 2
    return s


def _launch(mode: str, x, w, out, *, norm_w=None, eps=0.0, up=None, gate_up=None, settings=None) -> None:
    M, K = x.shape
    N = out.shape[1]
    s = dict(launch_settings(M, N) if settings is None else settings)
    block_n, block_k, use_dot = s.pop("BLOCK_N"), s.pop("BLOCK_K"), s.pop("DOT")
    block_k = min(block_k, triton.next_power_of_2(K))
    block_m = max(triton.next_power_of_2(M), 16 if use_dot else 1)
    if use_dot:
        block_n = max(block_n, 16)
        block_k = max(block_k, 16)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, w, w if norm_w is None else norm_w, out if up is None else up, out, out if gate_up is None else gate_up,
        M, N, K, float(K), x.stride(0), w.stride(0), 0 if up is None else up.stride(0), float(eps),
        MODE=_MODES[mode], STORE_GATE_UP=gate_up is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=K % block_k == 0, DOT=use_dot, **dot_args(x.dtype), enable_fp_fusion=False, **s,
        **pdl_launch())


# -- checks ------------------------------------------------------------------------------------

def _check(x, w) -> None:
    """x [M, K] (rows strided, last dim contiguous), w [N, K] likewise, one dtype and device."""
    check_float("x", x, dim=2)
    check_float("w", w, dim=2)
    check_same("x", x, w=w)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be [N, {x.shape[1]}] (x is {list(x.shape)}), got {list(w.shape)}")


def _use_kernel(x, w, settings) -> bool:
    """Whether to run the GEMV kernel: M and the weight within the limits above, or launch
    settings given (tests, benches: they force the kernel). Never unforced under Triton's
    interpreter: there it is slower than the unfused path by the interpreter's cost per op (the
    fused input norm + qkv 8 ms a call against 4 at tiny, a decode-heavy test 20.9 s against
    16.9), and the unfused path is what it replaces; the kernel's own tests force it."""
    fits = x.shape[0] <= GEMV_MAX_ROWS and w.numel() <= GEMV_MAX_WEIGHT and not INTERPRETING
    return 0 < x.shape[0] and (settings is not None or fits)


# -- rms_norm_linear ---------------------------------------------------------------------------

def rms_norm_linear(x: torch.Tensor, norm_w: torch.Tensor, eps: float, w: torch.Tensor, *,
                    settings: dict | None = None) -> torch.Tensor:
    """F.linear(rms_norm(x, norm_w, eps), w) for x [M, K], norm_w [K], w [N, K]: the input norm
    computed in the GEMV's prologue (within GEMV_MAX_ROWS and GEMV_MAX_WEIGHT, or always with `settings`). Returns a new contiguous [M, N]."""
    _check(x, w)
    check_eps(eps)
    check_weight("norm_w", norm_w, x.shape[1], x.device)
    check_same("x", x, norm_w=norm_w)
    if not _use_kernel(x, w, settings):
        return F.linear(_rms_norm_kernel(x, norm_w, eps), w)
    out = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
    _launch("norm", x, w, out, norm_w=norm_w, eps=eps, settings=settings)
    return out


def rms_norm_linear_eager(x: torch.Tensor, norm_w: torch.Tensor, eps: float, w: torch.Tensor) -> torch.Tensor:
    return F.linear(_reference_rms_norm(x, norm_w, eps), w)


# -- linear_gelu_mul ---------------------------------------------------------------------------

def linear_gelu_mul(x: torch.Tensor, w: torch.Tensor, up: torch.Tensor | None = None, *,
                    return_gate_up: bool = False, settings: dict | None = None):
    """gelu_tanh(gate) * up for x [M, K].

    up=None: w [2I, K] is [gate; up] stacked (the MLP's gate_up projection), gate, up = the two
    column halves of x @ w.T; returns [M, I], or (that, gate_up [M, 2I]) with `return_gate_up`
    (the `mlp_gate_up` tap, stored by the same kernel). up [M, I] given (the PLE gate, up = the
    layer's slice of the per-layer inputs, rows strided): w [I, K] is the gate alone.
    Each product is rounded to x's dtype before the activation, as the unfused projection's is.
    """
    _check(x, w)
    M = x.shape[0]
    if up is None:
        if w.shape[0] % 2:
            raise ValueError(f"w must stack gate and up rows (an even count), got {list(w.shape)}")
        inter = w.shape[0] // 2
    else:
        if return_gate_up:
            raise ValueError("return_gate_up is for the stacked [gate; up] weight (up=None)")
        check_float("up", up, dim=2)
        check_same("x", x, up=up)
        inter = w.shape[0]
        if tuple(up.shape) != (M, inter):
            raise ValueError(f"up must be [{M}, {inter}] (rows of x, rows of w), got {list(up.shape)}")
    if not _use_kernel(x, w, settings):
        if up is None:
            gate_up = F.linear(x, w)
            act = _gelu_tanh_mul_kernel(gate_up[:, :inter], gate_up[:, inter:])
            return (act, gate_up) if return_gate_up else act
        return _gelu_tanh_mul_kernel(F.linear(x, w), up)
    out = torch.empty((M, inter), dtype=x.dtype, device=x.device)
    gate_up = torch.empty((M, 2 * inter), dtype=x.dtype, device=x.device) if return_gate_up else None
    _launch("gated" if up is None else "gated_up", x, w, out, up=up, gate_up=gate_up, settings=settings)
    return (out, gate_up) if return_gate_up else out


def linear_gelu_mul_eager(x: torch.Tensor, w: torch.Tensor, up: torch.Tensor | None = None, *,
                          return_gate_up: bool = False):
    if up is not None:
        return _reference_gelu_tanh(F.linear(x, w)) * up
    gate_up = F.linear(x, w)
    inter = w.shape[0] // 2
    act = _reference_gelu_tanh(gate_up[:, :inter]) * gate_up[:, inter:]
    return (act, gate_up) if return_gate_up else act


# -- linear ------------------------------------------------------------------------------------

def linear(x: torch.Tensor, w: torch.Tensor, *, settings: dict | None = None) -> torch.Tensor:
    """x @ w.T for x [M, K], w [N, K] (within GEMV_MAX_ROWS and GEMV_MAX_WEIGHT; torch's F.linear
    otherwise)."""
    _check(x, w)
    if not _use_kernel(x, w, settings):
        return F.linear(x, w)
    out = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
    _launch("linear", x, w, out, settings=settings)
    return out


def linear_eager(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)
