"""Fused RMSNorm kernels of Gemma 4, each public op beside its eager twin (`op_eager`).

Numerics follow reference.model.rms_norm (GEMMA4_SPEC.md 3.1 and 9): a norm computes in float32,
x * (mean(x^2) + eps)^-0.5, then times `w` (plain w, not 1 + w), and rounds once to the storage
dtype. Where the unfused sequence rounds an intermediate to the storage dtype (a normed branch
before an add, a residual sum before the next norm or before layer_scalar), the kernel rounds it
the same way. Kernel and twin then differ only in the order of the float32 sum of squares: a few
float32 ULP inside, now and then one ULP of the storage dtype after a rounding.

Kernels work on tiles of ROWS rows x BLOCK columns, BLOCK = next_power_of_2(width): one row per
program at hidden widths, several at head widths (fewer programs; also what keeps Triton's
interpreter, which pays per program and per helper call, fast enough for CI).

The helpers the kernel modules share (rounding, tiling, launch options, input checks, the RMS of
a tile) live in common.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference.model import rms_norm as _reference_rms_norm
from .common import (check_eps, check_float, check_same, check_weight, launch_options, rms_rows, round_to,
                     rows_per_program, store_rounded)
from .pdl import pdl_launch, pdl_start

# Launch shape, read at each launch (bench/kernel_bench.py sweeps them): elements per program at
# most (unless one row is wider), and elements per warp.
TILE = 4096
WARP_ELEMS = 1024  # H100 sweep (docs/measurements.md): 512 left 31B's add_rms_norm at 83% of copy bandwidth, 1024 reaches 100%


# -- kernels -----------------------------------------------------------------------------------

@triton.jit
def _norm_rows(src, stride_t, stride_h, w, dst, first_row, n_rows, eps,
               H: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
               HAS_WEIGHT: tl.constexpr):
    """Norm rows first_row.. of src viewed as [T, H, N] (strided) into contiguous dst [T * H, N]."""
    rows = first_row + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    offsets = (rows // H) * stride_t + (rows % H) * stride_h
    x = tl.load(src + offsets[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    store_rounded(dst + rows[:, None] * N + cols[None, :], rms_rows(x, w, cols, N, eps, HAS_WEIGHT), mask)


@triton.jit
def _rms_norm_kernel(x, w, out, n_rows, stride_t, stride_h, eps,
                     H: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    first_row = tl.program_id(0).to(tl.int64) * ROWS
    _norm_rows(x, stride_t, stride_h, w, out, first_row, n_rows, eps, H, N, BLOCK, ROWS, HAS_WEIGHT)


@triton.jit
def _qkv_norm_kernel(q, k, v, q_w, k_w, q_out, k_out, v_out, T,
                     stride_q0, stride_q1, stride_k0, stride_k1, stride_v0, stride_v1, eps,
                     HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                     ROWS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    # Programs cover the q rows (token, head), then the k rows, then the v rows; HKV == 0 is the
    # q-only launch.
    pid = tl.program_id(0).to(tl.int64)
    q_programs = tl.cdiv(T * HQ, ROWS)
    kv_programs = tl.cdiv(T * HKV, ROWS)
    if pid < q_programs:
        _norm_rows(q, stride_q0, stride_q1, q_w, q_out, pid * ROWS, T * HQ, eps, HQ, D, BLOCK, ROWS, True)
    elif pid < q_programs + kv_programs:
        first_row = (pid - q_programs) * ROWS
        _norm_rows(k, stride_k0, stride_k1, k_w, k_out, first_row, T * HKV, eps, HKV, D, BLOCK, ROWS, True)
    else:
        first_row = (pid - q_programs - kv_programs) * ROWS
        _norm_rows(v, stride_v0, stride_v1, q_w, v_out, first_row, T * HKV, eps, HKV, D, BLOCK, ROWS, False)


@triton.jit
def _add_rms_norm_kernel(x, res, x_w, w, res_out, out, n_rows, stride_x, stride_res, eps,
                         N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, NORM_X: tl.constexpr,
                         PDL: tl.constexpr = False):
    pdl_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    dtype = out.dtype.element_ty
    xv = tl.load(x + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM_X:
        xv = round_to(rms_rows(xv, x_w, cols, N, eps, True), dtype)
    h = xv + tl.load(res + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = round_to(h, dtype)  # the next norm reads the stored residual, as in the unfused ops
    store_rounded(res_out + rows[:, None] * N + cols[None, :], h, mask)
    store_rounded(out + rows[:, None] * N + cols[None, :], rms_rows(h, w, cols, N, eps, True), mask)


@triton.jit
def _post_ffn_kernel(m, m2, res, w1, w2, w, scalar, next_w, out, normed, next_out, n_rows, stride_m, stride_m2,
                     stride_res, eps, N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                     MOE: tl.constexpr, HAS_SCALAR: tl.constexpr, STORE_NORMED: tl.constexpr,
                     NEXT_NORM: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    dtype = out.dtype.element_ty
    x = tl.load(m + rows[:, None] * stride_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if MOE:  # x = post_feedforward_layernorm_1(dense) + post_feedforward_layernorm_2(experts), in dtype
        x2 = tl.load(m2 + rows[:, None] * stride_m2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = round_to(rms_rows(x, w1, cols, N, eps, True), dtype)
        x = round_to(x + round_to(rms_rows(x2, w2, cols, N, eps, True), dtype), dtype)
    y = round_to(rms_rows(x, w, cols, N, eps, True), dtype)
    if STORE_NORMED:
        store_rounded(normed + rows[:, None] * N + cols[None, :], y, mask)
    h = y + tl.load(res + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALAR:
        h = round_to(h, dtype) * tl.load(scalar).to(tl.float32)
    store_rounded(out + rows[:, None] * N + cols[None, :], h, mask)
    if NEXT_NORM:  # the next norm reads the stored output, as the unfused norm would
        next_h = rms_rows(round_to(h, dtype), next_w, cols, N, eps, True)
        store_rounded(next_out + rows[:, None] * N + cols[None, :], next_h, mask)


# -- rms_norm ----------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [N], [rows, N] or [T, heads, N] (strided, last dim
    contiguous), times `weight` [N] when given. Returns a new contiguous tensor of x's shape."""
    check_float("x", x, dim=(1, 2, 3))
    check_eps(eps)
    n = x.shape[-1]
    if weight is not None:
        check_weight("weight", weight, n, x.device)
    x3 = x.reshape(1, 1, n) if x.dim() == 1 else x.unsqueeze(1) if x.dim() == 2 else x  # views, no copy
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x3.shape[0] * x3.shape[1]
    if n_rows:
        block = triton.next_power_of_2(n)
        rows = rows_per_program(n_rows, block, TILE)
        _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
            x3, x if weight is None else weight, out, n_rows, x3.stride(0), x3.stride(1), eps,
            H=x3.shape[1], N=n, BLOCK=block, ROWS=rows, HAS_WEIGHT=weight is not None,
            **launch_options(rows * block, WARP_ELEMS), **pdl_launch())
    return out


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _reference_rms_norm(x, weight, eps)


# -- qkv_norm ----------------------------------------------------------------------------------

def qkv_norm(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
             q_weight: torch.Tensor, k_weight: torch.Tensor | None, eps: float):
    """q_norm, k_norm and v_norm (no weight) of one attention layer, in a single launch.

    q [T, Hq, D], k and v [T, Hkv, D]: strided views with a contiguous last dim, typically head
    views of column slices of one fused QKV projection. On K=V layers pass the same view as k
    and v. On KV-shared layers pass k = v = k_weight = None: only q is normed.
    Returns new contiguous (q, k, v); k and v are None in the q-only mode.
    """
    check_float("q", q, dim=3)
    T, hq, d = q.shape
    hkv = check_qkv(q, k, v, q_weight, k_weight, eps)
    q_out = torch.empty((T, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((T, hkv, d), dtype=q.dtype, device=q.device) if hkv else None
    v_out = torch.empty_like(k_out) if hkv else None
    if T:
        kk, vv = (k, v) if hkv else (q, q)  # stand-ins, never read, in the q-only launch
        block = triton.next_power_of_2(d)
        rows = rows_per_program(T * hq, block, TILE)
        programs = triton.cdiv(T * hq, rows) + 2 * triton.cdiv(T * hkv, rows)
        _qkv_norm_kernel[(programs,)](
            q, kk, vv, q_weight, q_weight if k_weight is None else k_weight,
            q_out, q_out if k_out is None else k_out, q_out if v_out is None else v_out, T,
            q.stride(0), q.stride(1), kk.stride(0), kk.stride(1), vv.stride(0), vv.stride(1), eps,
            HQ=hq, HKV=hkv, D=d, BLOCK=block, ROWS=rows, **launch_options(rows * block, WARP_ELEMS), **pdl_launch())
    return q_out, k_out, v_out


def check_qkv(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, q_weight: torch.Tensor,
              k_weight: torch.Tensor | None, eps: float) -> int:
    """The q/k/v arguments qkv_norm and the fused attention epilogue (rope.qkv_norm_rope_store)
    share, checked (q itself by the caller); returns the KV head count (0 in the q-only mode of a
    KV-shared layer: k = v = k_weight = None)."""
    check_eps(eps)
    T, _, d = q.shape
    check_weight("q_weight", q_weight, d, q.device)
    if k is None:
        if v is not None or k_weight is not None:
            raise ValueError("q-only mode (k=None, a KV-shared layer) takes v=None and k_weight=None")
        return 0
    check_float("k", k, dim=3)
    check_float("v", v, dim=3)
    check_same("q", q, k=k, v=v)
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != d:
        raise ValueError(f"k and v must both be [{T}, Hkv, {d}], got {list(k.shape)} and {list(v.shape)}")
    if k_weight is None:
        raise ValueError("k_weight is required when k is given")
    check_weight("k_weight", k_weight, d, q.device)
    return k.shape[1]


def qkv_norm_eager(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                   q_weight: torch.Tensor, k_weight: torch.Tensor | None, eps: float):
    q = _reference_rms_norm(q, q_weight, eps)
    if k is None:
        return q, None, None
    return q, _reference_rms_norm(k, k_weight, eps), _reference_rms_norm(v, None, eps)


# -- add_rms_norm ------------------------------------------------------------------------------

def _check_stream(name: str, t, like: torch.Tensor | None = None) -> None:
    """A [T, H] residual-stream operand (rows strided, last dim contiguous)."""
    check_float(name, t, dim=2)
    if like is not None:
        check_same("residual", like, **{name: t})
        if t.shape != like.shape:
            raise ValueError(f"{name} has shape {list(t.shape)}, residual has {list(like.shape)}")


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 x_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = residual + x; returns (new_residual, rms_norm(new_residual, weight)).

    With `x_weight`, x is first RMS-normed with it: Gemma 4's sandwich step after attention,
    `x = r + post_attention_layernorm(a)` then `pre_feedforward_layernorm(x)`, in one pass.
    x and residual are [T, H]; the outputs are new and contiguous.
    """
    _check_stream("residual", residual)
    _check_stream("x", x, residual)
    check_eps(eps)
    n = x.shape[1]
    check_weight("weight", weight, n, x.device)
    if x_weight is not None:
        check_weight("x_weight", x_weight, n, x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty_like(new_residual)
    if x.shape[0]:
        block = triton.next_power_of_2(n)
        rows = rows_per_program(x.shape[0], block, TILE)
        _add_rms_norm_kernel[(triton.cdiv(x.shape[0], rows),)](
            x, residual, weight if x_weight is None else x_weight, weight, new_residual, out,
            x.shape[0], x.stride(0), residual.stride(0), eps,
            N=n, BLOCK=block, ROWS=rows, NORM_X=x_weight is not None, **launch_options(rows * block, WARP_ELEMS),
            **pdl_launch())
    return new_residual, out


def add_rms_norm_eager(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                       x_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if x_weight is not None:
        x = _reference_rms_norm(x, x_weight, eps)
    new_residual = residual + x
    return new_residual, _reference_rms_norm(new_residual, weight, eps)


# -- post-feed-forward norm + residual (+ layer_scalar) -----------------------------------------

def _post_ffn(branches, residual, w_dense, w_moe, weight, eps, scalar, return_normed, next_weight):
    """branches: ((name, tensor),) for a dense layer, two of them for an MoE layer."""
    _check_stream("residual", residual)
    for name, t in branches:
        _check_stream(name, t, residual)
    check_eps(eps)
    n = residual.shape[1]
    moe = len(branches) == 2
    for name, w in (("weight", weight), ("w_dense", w_dense), ("w_moe", w_moe))[:3 if moe else 1]:
        check_weight(name, w, n, residual.device)
    if next_weight is not None:
        check_weight("next_weight", next_weight, n, residual.device)
    if scalar is not None:
        if not isinstance(scalar, torch.Tensor) or scalar.numel() != 1:
            raise ValueError("scalar must be a one-element tensor (the layer's layer_scalar buffer)")
        check_same("residual", residual, scalar=scalar)
    m, m2 = branches[0][1], branches[-1][1]  # m2 is m itself, never read, for a dense layer
    out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    normed = torch.empty_like(out) if return_normed else None
    next_h = torch.empty_like(out) if next_weight is not None else None
    if residual.shape[0]:
        block = triton.next_power_of_2(n)
        rows = rows_per_program(residual.shape[0], block, TILE)
        _post_ffn_kernel[(triton.cdiv(residual.shape[0], rows),)](
            m, m2, residual, w_dense if moe else weight, w_moe if moe else weight, weight,
            residual if scalar is None else scalar, weight if next_weight is None else next_weight, out,
            out if normed is None else normed, out if next_h is None else next_h,
            residual.shape[0], m.stride(0), m2.stride(0), residual.stride(0), eps,
            N=n, BLOCK=block, ROWS=rows, MOE=moe, HAS_SCALAR=scalar is not None, STORE_NORMED=return_normed,
            NEXT_NORM=next_weight is not None, **launch_options(rows * block, WARP_ELEMS), **pdl_launch())
    if next_weight is not None:
        return out, normed, next_h
    return (out, normed) if return_normed else out


def post_ffn_residual_scale(m: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            scalar: torch.Tensor | None = None, *, return_normed: bool = False,
                            next_weight: torch.Tensor | None = None):
    """out = (residual + rms_norm(m, weight)) * scalar, all [T, H]: post_feedforward_layernorm,
    the residual add and layer_scalar in one pass (GEMMA4_SPEC.md 3.5, for models without PLE).

    scalar=None skips the multiply (PLE models, whose layer_scalar comes after the PLE block). The
    PLE block's tail is this same pass: (x + post_per_layer_input_norm(projection)) * layer_scalar.
    return_normed=True returns (out, rms_norm(m, weight)), the latter being the `mlp_out` tap.
    next_weight (the pass that ends a layer): also rms_norm(out, next_weight), the next layer's
    input norm (or the final norm), and the result is always (out, normed or None, that).
    """
    return _post_ffn((("m", m),), residual, None, None, weight, eps, scalar, return_normed, next_weight)


def post_ffn_residual_scale_eager(m, residual, weight, eps, scalar=None, *, return_normed=False, next_weight=None):
    normed = _reference_rms_norm(m, weight, eps)
    out = residual + normed
    if scalar is not None:
        out = out * scalar
    if next_weight is not None:
        return out, normed if return_normed else None, _reference_rms_norm(out, next_weight, eps)
    return (out, normed) if return_normed else out


def post_ffn_moe_residual_scale(m_dense: torch.Tensor, m_moe: torch.Tensor, residual: torch.Tensor,
                                w_dense: torch.Tensor, w_moe: torch.Tensor, weight: torch.Tensor, eps: float,
                                scalar: torch.Tensor | None = None, *, return_normed: bool = False,
                                next_weight: torch.Tensor | None = None):
    """The MoE layer's version (GEMMA4_SPEC.md 3.5), all [T, H]:
        m   = post_feedforward_layernorm_1(m_dense) + post_feedforward_layernorm_2(m_moe)
        out = (residual + post_feedforward_layernorm(m)) * scalar
    with w_dense, w_moe, weight the three norms' weights; scalar, return_normed and next_weight as
    in post_ffn_residual_scale (normed = post_feedforward_layernorm(m)).
    """
    return _post_ffn((("m_dense", m_dense), ("m_moe", m_moe)), residual, w_dense, w_moe, weight, eps, scalar,
                     return_normed, next_weight)


def post_ffn_moe_residual_scale_eager(m_dense, m_moe, residual, w_dense, w_moe, weight, eps, scalar=None, *,
                                      return_normed=False, next_weight=None):
    m = _reference_rms_norm(m_dense, w_dense, eps) + _reference_rms_norm(m_moe, w_moe, eps)
    return post_ffn_residual_scale_eager(m, residual, weight, eps, scalar, return_normed=return_normed,
                                         next_weight=next_weight)
