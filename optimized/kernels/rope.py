"""RoPE and KV-pool store kernels of Gemma 4, each beside its eager twin.

RoPE follows GEMMA4_SPEC.md 3.4 and reference.model (rope_cos_sin, apply_rope): angles
pos * inv_freq in float32, cos/sin rounded to the model dtype, then rotate-half over the whole
head, x * cos + rotate_half(x) * sin, with each product and the sum rounded to the dtype. The
kernels compute cos/sin from the positions themselves (no table in memory) and round at the same
points, so they differ from the reference only where float32 cos/sin differ by an ULP.
Proportional RoPE needs nothing special: its zero frequencies give cos = 1, sin = 0 exactly.

Pools are [num_slots, Hkv, D]; slot 0 is the padding sink (shared/DESIGN.md "Pools"), so only
slots in [1, num_slots) are ever written.

qkv_norm_rope_store is the paged model's attention epilogue in one launch: q_norm, k_norm and
v_norm (norms.py's qkv_norm), RoPE of q and k and the K/V store, rounded where those three ops
round. apply_rope, rope_and_store_kv, store_kv and qkv_norm stay as ops of their own (the
testbed, benchmarks, and the twins the fused one is held to).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from reference.model import apply_rope as _reference_apply_rope
from .common import (check_float, check_same, launch_options, round_to, rows_per_program,
                     store_rounded)
from .norms import check_qkv, qkv_norm_eager
from .pdl import pdl_launch, pdl_start

_INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _cos_sin(positions, inv_freq, tokens, token_ok,
             HALF: tl.constexpr, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    """The reference's cos/sin tables [tokens, BLOCK] (one half; they repeat across the two):
    float32 angles pos * inv_freq, rounded to DTYPE."""
    cols = tl.arange(0, BLOCK)
    pos = tl.load(positions + tokens, mask=token_ok, other=0).to(tl.float32)
    angle = pos[:, None] * tl.load(inv_freq + cols, mask=cols < HALF, other=0.0)[None, :]
    return round_to(tl.cos(angle), DTYPE), round_to(tl.sin(angle), DTYPE)


@triton.jit
def _rotate_halves(lo, hi, cos, sin, DTYPE: tl.constexpr):
    """x * cos + rotate_half(x) * sin of a head row given as its two float32 halves, with
    rotate_half(x) = cat(-hi, lo) and every product rounded to DTYPE (the sum is rounded on
    store). Returns the two halves."""
    new_lo = round_to(lo * cos, DTYPE) - round_to(hi * sin, DTYPE)
    new_hi = round_to(hi * cos, DTYPE) + round_to(lo * sin, DTYPE)
    return new_lo, new_hi


@triton.jit
def _rotate(src, cos, sin, mask, HALF: tl.constexpr, DTYPE: tl.constexpr):
    """_rotate_halves of the head rows whose first halves `src` points at."""
    lo = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    return _rotate_halves(lo, hi, cos, sin, DTYPE)


# Both kernels: a program takes TOKENS tokens and HEADS consecutive heads (HEADS divides H);
# cos/sin, the costly part, are computed once per token and reused across those heads.

@triton.jit
def _rope_kernel(x, positions, inv_freq, out, T, stride_t, stride_h,
                 H: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, TOKENS: tl.constexpr,
                 HEADS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    tokens = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    cols = tl.arange(0, BLOCK)
    token_ok = tokens < T
    dtype = out.dtype.element_ty
    cos, sin = _cos_sin(positions, inv_freq, tokens, token_ok, HALF, BLOCK, dtype)
    mask = token_ok[:, None] & (cols < HALF)[None, :]
    for i in range(HEADS):
        h = tl.program_id(1) * HEADS + i
        lo, hi = _rotate(x + (tokens * stride_t + h * stride_h)[:, None] + cols[None, :], cos, sin, mask, HALF, dtype)
        dst = out + ((tokens * H + h) * (2 * HALF))[:, None] + cols[None, :]
        store_rounded(dst, lo, mask)
        store_rounded(dst + HALF, hi, mask)


@triton.jit
def _store_kv_kernel(k, v, positions, inv_freq, slots, k_pool, v_pool, T, num_slots,
                     stride_k0, stride_k1, stride_v0, stride_v1,
                     stride_kp0, stride_kp1, stride_vp0, stride_vp1,
                     H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     TOKENS: tl.constexpr, HEADS: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    tokens = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    slot = tl.load(slots + tokens, mask=tokens < T, other=0).to(tl.int64)
    token_ok = (tokens < T) & (slot >= 1) & (slot < num_slots)  # slot 0 is the padding sink: never written
    cols = tl.arange(0, BLOCK_D)
    mask = token_ok[:, None] & (cols < D)[None, :]
    if ROPE:
        half_cols = tl.arange(0, BLOCK_HALF)
        half_mask = token_ok[:, None] & (half_cols < D // 2)[None, :]
        dtype = k_pool.dtype.element_ty
        cos, sin = _cos_sin(positions, inv_freq, tokens, token_ok, D // 2, BLOCK_HALF, dtype)
    for i in range(HEADS):
        h = tl.program_id(1) * HEADS + i
        k_src = k + (tokens * stride_k0 + h * stride_k1)[:, None]
        k_dst = k_pool + (slot * stride_kp0 + h * stride_kp1)[:, None]
        if ROPE:
            lo, hi = _rotate(k_src + half_cols[None, :], cos, sin, half_mask, D // 2, dtype)
            store_rounded(k_dst + half_cols[None, :], lo, half_mask)
            store_rounded(k_dst + D // 2 + half_cols[None, :], hi, half_mask)
        else:  # a copy, bit for bit
            tl.store(k_dst + cols[None, :], tl.load(k_src + cols[None, :], mask=mask), mask=mask)
        v_row = tl.load(v + (tokens * stride_v0 + h * stride_v1)[:, None] + cols[None, :], mask=mask)
        tl.store(v_pool + (slot * stride_vp0 + h * stride_vp1)[:, None] + cols[None, :], v_row, mask=mask)


# Launch shape, read at each launch (bench/kernel_bench.py sweeps them): elements a head per
# program at most, elements per warp.
TOKEN_TILE = 512  # with 256 elements a warp: apply_rope 75-82% -> 85-99% of copy bandwidth on an H100
WARP_ELEMS = 256


def _grid(T: int, heads: int, block: int):
    """(grid, TOKENS, HEADS): token tiles of at most TOKEN_TILE elements a head (more programs:
    each loops over its heads), groups of up to 8 heads."""
    tokens = rows_per_program(T, block, tile=TOKEN_TILE)
    group = math.gcd(heads, 8)
    return (triton.cdiv(T, tokens), heads // group), tokens, group


# -- checks ------------------------------------------------------------------------------------

def _check_index(name: str, t, length: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _INDEX_DTYPES or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int32 or int64 tensor")
    if t.shape[0] != length:
        raise ValueError(f"{name} has {t.shape[0]} entries for {length} tokens")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the activations on {device}")
    if length > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")


def _check_rope_inputs(x: torch.Tensor, positions, inv_freq, name: str = "x") -> None:
    check_float(name, x, dim=3)
    T, _, d = x.shape
    if d % 2:
        raise ValueError(f"the head size must be even for rotate-half RoPE, got {d}")
    _check_index("positions", positions, T, x.device)
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dtype != torch.float32 or inv_freq.shape != (d // 2,):
        raise ValueError(f"inv_freq must be a float32 tensor of shape [{d // 2}]")
    if inv_freq.device != x.device or (d > 2 and inv_freq.stride(0) != 1):
        raise ValueError("inv_freq must be contiguous and on the activations' device")


def _check_kv_inputs(k, v, k_pool, v_pool, out_slots, check: bool) -> None:
    for name, t in (("k", k), ("v", v), ("k_pool", k_pool), ("v_pool", v_pool)):
        check_float(name, t, dim=3)
    check_same("k", k, v=v, k_pool=k_pool, v_pool=v_pool)
    if v.shape != k.shape:
        raise ValueError(f"k has shape {list(k.shape)}, v has {list(v.shape)}")
    if k_pool.shape != v_pool.shape or k_pool.shape[1:] != k.shape[1:]:
        raise ValueError(f"k_pool and v_pool must both be [num_slots, {k.shape[1]}, {k.shape[2]}], "
                         f"got {list(k_pool.shape)} and {list(v_pool.shape)}")
    _check_index("out_slots", out_slots, k.shape[0], k.device)
    if check and out_slots.numel():
        bad = (out_slots < 1) | (out_slots >= k_pool.shape[0])
        if bool(bad.any()):
            raise ValueError(f"out_slots must lie in [1, {k_pool.shape[0]}), got {out_slots[bad].tolist()[:8]} "
                             f"at tokens {bad.nonzero().flatten().tolist()[:8]}")


# -- apply_rope --------------------------------------------------------------------------------

def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE of q or k, x [T, heads, D] (strided, last dim contiguous), at integer positions [T]
    (int32/int64) with the layer type's inv_freq (float32 [D/2], reference.model.rope_inv_freq).
    Returns a new contiguous [T, heads, D]."""
    _check_rope_inputs(x, positions, inv_freq)
    T, h, d = x.shape
    out = torch.empty((T, h, d), dtype=x.dtype, device=x.device)
    if out.numel():
        block = triton.next_power_of_2(d // 2)
        grid, tokens, heads = _grid(T, h, block)
        _rope_kernel[grid](x, positions, inv_freq, out, T, x.stride(0), x.stride(1),
                           H=h, HALF=d // 2, BLOCK=block, TOKENS=tokens, HEADS=heads,
                           **launch_options(tokens * block, WARP_ELEMS), **pdl_launch())
    return out


def rope_cos_sin_eager(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """reference.model.rope_cos_sin for a given inv_freq: [T, D] tables, float32 angles, cast to dtype."""
    freqs = positions[:, None].to(torch.float32) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope_eager(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    return _reference_apply_rope(x, *rope_cos_sin_eager(positions, inv_freq, x.dtype))


# -- KV pool stores ----------------------------------------------------------------------------

def _launch_store(k, v, positions, inv_freq, k_pool, v_pool, out_slots, rope: bool) -> None:
    T, h, d = k.shape
    if not T * h * d:
        return
    block_d = triton.next_power_of_2(d)
    grid, tokens, heads = _grid(T, h, block_d)
    _store_kv_kernel[grid](
        k, v, positions, inv_freq, out_slots, k_pool, v_pool, T, k_pool.shape[0],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        H=h, D=d, BLOCK_D=block_d, BLOCK_HALF=max(block_d // 2, 1), TOKENS=tokens, HEADS=heads, ROPE=rope,
        **launch_options(tokens * block_d, WARP_ELEMS), **pdl_launch())


def rope_and_store_kv(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                      k_pool: torch.Tensor, v_pool: torch.Tensor, out_slots: torch.Tensor, *,
                      check: bool = False) -> None:
    """k_pool[out_slots] = apply_rope(k, positions, inv_freq); v_pool[out_slots] = v.

    k (already k_normed) and v (already v_normed) are [T, Hkv, D], strided with a contiguous last
    dim; the pools are [num_slots, Hkv, D] of the same dtype; out_slots [T] (int32/int64) holds
    translated slot ids. A slot outside [1, num_slots) is never written; with check=True the
    wrapper raises ValueError for one instead (a host sync, so off by default). With duplicate
    slots, which token lands is unspecified.
    """
    _check_rope_inputs(k, positions, inv_freq, "k")
    _check_kv_inputs(k, v, k_pool, v_pool, out_slots, check)
    _launch_store(k, v, positions, inv_freq, k_pool, v_pool, out_slots, rope=True)


def rope_and_store_kv_eager(k, v, positions, inv_freq, k_pool, v_pool, out_slots, *, check=False) -> None:
    store_kv_eager(apply_rope_eager(k, positions, inv_freq), v, k_pool, v_pool, out_slots, check=check)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             out_slots: torch.Tensor, *, check: bool = False) -> None:
    """k_pool[out_slots] = k; v_pool[out_slots] = v, bit for bit (no RoPE); the slot contract of
    rope_and_store_kv."""
    _check_kv_inputs(k, v, k_pool, v_pool, out_slots, check)
    # positions/inv_freq are never read without RoPE: out_slots stands in for both.
    _launch_store(k, v, out_slots, out_slots, k_pool, v_pool, out_slots, rope=False)


def store_kv_eager(k, v, k_pool, v_pool, out_slots, *, check=False) -> None:
    _check_kv_inputs(k, v, k_pool, v_pool, out_slots, check)
    slots = out_slots.long()
    ok = (slots >= 1) & (slots < k_pool.shape[0])
    k_pool[slots[ok]] = k[ok]
    v_pool[slots[ok]] = v[ok]


# -- q/k/v norms + RoPE + KV store, one launch ---------------------------------------------------

@triton.jit
def _head_ptrs(base, stride_t, stride_h, tokens, heads, cols):
    """Pointers [TOKENS, HEADS, BLOCK] to the first halves of the head rows (token, head) of a
    [T, H, D] view (strided, last dim contiguous), or of a pool's rows when `tokens` are slots."""
    return base + (tokens * stride_t)[:, None, None] + (heads * stride_h)[None, :, None] + cols[None, None, :]


@triton.jit
def _load_halves(ptrs, mask, HALF: tl.constexpr):
    """The two halves of the head rows whose first halves `ptrs` points at, as float32; zero where masked."""
    return (tl.load(ptrs, mask=mask, other=0.0).to(tl.float32),
            tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _inv_rms(lo, hi, D: tl.constexpr, eps):
    """(mean(x^2) + eps)^-0.5 of each head row [TOKENS, HEADS, 1], in common.rms_rows' formula;
    the float32 sum of squares is taken half by half."""
    mean_sq = tl.div_rn(tl.sum(lo * lo, axis=2) + tl.sum(hi * hi, axis=2), D)
    return tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))[:, :, None]


@triton.jit
def _norm_rope_store(lo, hi, inv, w, cos, sin, dst, mask, cols, HALF: tl.constexpr):
    """q_norm or k_norm of the head rows (x * inv * w, rounded to the dtype as the norm op's
    output is), then RoPE (every product rounded), stored at dst (first halves)."""
    dtype = dst.dtype.element_ty
    ok = cols < HALF
    w_lo = tl.load(w + cols, mask=ok, other=0.0).to(tl.float32)[None, None, :]
    w_hi = tl.load(w + HALF + cols, mask=ok, other=0.0).to(tl.float32)[None, None, :]
    lo, hi = _rotate_halves(round_to(lo * inv * w_lo, dtype), round_to(hi * inv * w_hi, dtype), cos, sin, dtype)
    store_rounded(dst, lo, mask)
    store_rounded(dst + HALF, hi, mask)


@triton.jit
def _tile_cos_sin(positions, inv_freq, tile, T, TOKENS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, DTYPE: tl.constexpr):
    """(tokens, in range, cols, cos, sin) of token tile `tile`: cos/sin as [TOKENS, 1, BLOCK_HALF]."""
    tokens = tile.to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    in_range = tokens < T
    cos, sin = _cos_sin(positions, inv_freq, tokens, in_range, HALF, BLOCK_HALF, DTYPE)
    return tokens, in_range, tl.arange(0, BLOCK_HALF), cos[:, None, :], sin[:, None, :]


@triton.jit
def _q_heads(q, stride_q0, stride_q1, q_w, q_out, positions, inv_freq, tile, group, T, eps,
             HQ: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
             TOKENS: tl.constexpr, HEADS: tl.constexpr):
    """q_norm + RoPE of query heads group * HEADS.. of token tile `tile`, into contiguous q_out [T, HQ, D]."""
    tokens, in_range, cols, cos, sin = _tile_cos_sin(positions, inv_freq, tile, T, TOKENS, HALF, BLOCK_HALF,
                                                     q_out.dtype.element_ty)
    heads = group * HEADS + tl.arange(0, HEADS)
    mask = in_range[:, None, None] & (heads < HQ)[None, :, None] & (cols < HALF)[None, None, :]
    lo, hi = _load_halves(_head_ptrs(q, stride_q0, stride_q1, tokens, heads, cols), mask, HALF)
    _norm_rope_store(lo, hi, _inv_rms(lo, hi, D, eps), q_w, cos, sin,
                     _head_ptrs(q_out, HQ * D, D, tokens, heads, cols), mask, cols, HALF)


@triton.jit
def _kv_heads(k, v, stride_k0, stride_k1, stride_v0, stride_v1, k_w, positions, inv_freq, slots, k_pool, v_pool,
              stride_kp0, stride_kp1, stride_vp0, stride_vp1, tile, group, T, num_slots, eps, HKV: tl.constexpr,
              D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, TOKENS: tl.constexpr,
              HEADS: tl.constexpr, V_IS_K: tl.constexpr):
    """k_norm + RoPE and v_norm of key/value heads group * HEADS.. of token tile `tile`, into the
    pools at their slots; a slot outside [1, num_slots) (0 is the padding sink) is never written."""
    tokens, in_range, cols, cos, sin = _tile_cos_sin(positions, inv_freq, tile, T, TOKENS, HALF, BLOCK_HALF,
                                                     k_pool.dtype.element_ty)
    heads = group * HEADS + tl.arange(0, HEADS)
    slot = tl.load(slots + tokens, mask=in_range, other=0).to(tl.int64)
    ok = in_range & (slot >= 1) & (slot < num_slots)
    mask = ok[:, None, None] & (heads < HKV)[None, :, None] & (cols < HALF)[None, None, :]
    lo, hi = _load_halves(_head_ptrs(k, stride_k0, stride_k1, tokens, heads, cols), mask, HALF)
    inv = _inv_rms(lo, hi, D, eps)
    if V_IS_K:  # K=V layers: V is the raw key row and v_norm has no weight, so its RMS is k's
        v_lo, v_hi = lo * inv, hi * inv
    else:
        v_lo, v_hi = _load_halves(_head_ptrs(v, stride_v0, stride_v1, tokens, heads, cols), mask, HALF)
        v_inv = _inv_rms(v_lo, v_hi, D, eps)
        v_lo, v_hi = v_lo * v_inv, v_hi * v_inv
    _norm_rope_store(lo, hi, inv, k_w, cos, sin, _head_ptrs(k_pool, stride_kp0, stride_kp1, slot, heads, cols),
                     mask, cols, HALF)
    v_dst = _head_ptrs(v_pool, stride_vp0, stride_vp1, slot, heads, cols)
    store_rounded(v_dst, v_lo, mask)
    store_rounded(v_dst + HALF, v_hi, mask)


@triton.jit
def _qkv_norm_rope_store_kernel(
        q, k, v, q_w, k_w, positions, inv_freq, slots, q_out, k_pool, v_pool, T, num_slots, eps,
        stride_q0, stride_q1, stride_k0, stride_k1, stride_v0, stride_v1,
        stride_kp0, stride_kp1, stride_vp0, stride_vp1,
        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
        TOKENS: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, Q_GROUPS: tl.constexpr,
        V_IS_K: tl.constexpr, KV_TOKENS: tl.constexpr, KV_GROUPS: tl.constexpr, PDL: tl.constexpr = False):
    # One axis: first the q programs, token tile by token tile, each with Q_GROUPS groups of
    # Q_HEADS query heads of TOKENS tokens; then the K/V programs (none in the q-only launch,
    # HKV = 0), each with KV_GROUPS groups of KV_HEADS key/value heads of KV_TOKENS tokens, more
    # tokens than a q program where it has fewer heads, so both hold tiles of about the same size
    # (the launch has one number of warps for both). A program holds its group as one
    # [tokens, heads, BLOCK_HALF] tile per half: the cos/sin of its tokens, the costly part, are
    # computed once, in the program's branch (shapes differ), and shared by the heads, and no
    # head waits on another. HALF = D // 2. The branches only call helpers: names bound in both
    # branches of a runtime `if` must have one type when compiled, and their tiles differ.
    pdl_start(PDL)
    pid = tl.program_id(0)
    q_programs = tl.cdiv(T, TOKENS) * Q_GROUPS
    if HKV == 0:
        _q_heads(q, stride_q0, stride_q1, q_w, q_out, positions, inv_freq, pid // Q_GROUPS, pid % Q_GROUPS, T,
                 eps, HQ, D, HALF, BLOCK_HALF, TOKENS, Q_HEADS)
    elif pid < q_programs:
        _q_heads(q, stride_q0, stride_q1, q_w, q_out, positions, inv_freq, pid // Q_GROUPS, pid % Q_GROUPS, T,
                 eps, HQ, D, HALF, BLOCK_HALF, TOKENS, Q_HEADS)
    else:
        _kv_heads(k, v, stride_k0, stride_k1, stride_v0, stride_v1, k_w, positions, inv_freq, slots, k_pool,
                  v_pool, stride_kp0, stride_kp1, stride_vp0, stride_vp1, (pid - q_programs) // KV_GROUPS,
                  (pid - q_programs) % KV_GROUPS, T, num_slots, eps, HKV, D, HALF, BLOCK_HALF, KV_TOKENS,
                  KV_HEADS, V_IS_K)


# Launch shape of the fused q/k/v kernel, read at each launch (qkv_launch): elements (both halves,
# all heads of a group) per program at most, unless one token's group is wider; elements per warp
# below QKV_MANY_TOKENS tokens; from QKV_MANY_TOKENS on, a program has one thread per column of a
# half-row (BLOCK_HALF / 32 warps: 4 at head size 256, 8 at 512) instead.
#
# Why, from bench/isa_count.py qkv (the kernel compiled for sm_90 without a GPU; SASS instructions of all
# a program's threads per element written, E2B bf16, T = 8192, q + K/V launch, head 256 / 512): as
# it was, 16 warps and the K/V programs as many tokens wide as the q programs: 135.5 / 136.6 (K/V
# programs 329 / el: 2 elements a thread). With bf16 rounded by the cast (common.round_to where
# compiled; the q programs 88.4 -> 62.5 at 16 warps) and K/V programs of KV_TOKENS: 48.8 / 50.2 at
# 16 warps; with one thread per half-row column: 21.0 / 24.2. With 16 warps a thread holds 8
# elements, so what it does once (addresses, the row reductions across warps, cos/sin) weighs 8x;
# and there the compiler keeps cos/sin in the tile's layout, where every warp along the heads
# computes them again, while at one thread a column it computes them once per column and shares them
# through shared memory (TTGIR). Measured too: head 512 at 4 warps (32 elements a thread) 27.8, at 2
# warps 20.8 but 204 registers a thread; head 256 at 8 warps 40.3. Decode launches keep 16 warps: a
# few programs, one an SM, where a launch's time is its programs' latency, i.e. a thread's
# instruction count (2-4x more at 4-8 warps). GPU time not measured (no GPU where this was chosen);
# QKV_MANY_TOKENS is a guess at where a launch has several programs an SM (an H200 has 132 SMs).
QKV_TILE = 4096
QKV_WARP_ELEMS = 256
QKV_MANY_TOKENS = 256


def qkv_norm_rope_store(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                        q_weight: torch.Tensor, k_weight: torch.Tensor | None, eps: float,
                        positions: torch.Tensor, inv_freq: torch.Tensor,
                        k_pool: torch.Tensor | None = None, v_pool: torch.Tensor | None = None,
                        out_slots: torch.Tensor | None = None, *, check: bool = False) -> torch.Tensor:
    """An attention layer's q/k/v epilogue in one launch, for what three launches did
    (qkv_norm, apply_rope of q, rope_and_store_kv), with their rounding points:

        q = apply_rope(rms_norm(q, q_weight), positions, inv_freq)          -> returned
        k_pool[out_slots] = apply_rope(rms_norm(k, k_weight), positions, inv_freq)
        v_pool[out_slots] = rms_norm(v, None)

    Each norm rounds to the model dtype before RoPE rotates it (cos/sin in the dtype, every
    product rounded), as the unfused ops do. q [T, Hq, D], k and v [T, Hkv, D]: strided views
    with a contiguous last dim (head views of column slices of one fused QKV projection). On K=V
    layers pass the same view as k and v (V is the raw key projection, normed without a weight).
    On KV-shared layers pass k = v = k_weight = None: only q is computed, and the pools and
    out_slots are not touched (they may be None). positions [T] and inv_freq as for apply_rope;
    pools and out_slots as for rope_and_store_kv (slots outside [1, num_slots) are skipped, or
    with check=True refused). Returns a new contiguous q [T, Hq, D].
    """
    _check_rope_inputs(q, positions, inv_freq, "q")
    T, hq, d = q.shape
    hkv = check_qkv(q, k, v, q_weight, k_weight, eps)
    if hkv:
        if k_pool is None or v_pool is None or out_slots is None:
            raise ValueError("k_pool, v_pool and out_slots are required when k is given")
        _check_kv_inputs(k, v, k_pool, v_pool, out_slots, check)
    q_out = torch.empty((T, hq, d), dtype=q.dtype, device=q.device)
    if q_out.numel():
        # stand-ins, never read, in the q-only launch
        kk, vv, kp, vp, sl = (k, v, k_pool, v_pool, out_slots) if hkv else (q, q, q_out, q_out, positions)
        v_is_k = bool(hkv) and v.data_ptr() == k.data_ptr() and v.stride() == k.stride()
        grid, consts, options = qkv_launch(T, hq, hkv, d, v_is_k)
        _qkv_norm_rope_store_kernel[grid](
            q, kk, vv, q_weight, q_weight if k_weight is None else k_weight, positions, inv_freq, sl, q_out, kp, vp,
            T, kp.shape[0], eps, q.stride(0), q.stride(1), kk.stride(0), kk.stride(1), vv.stride(0), vv.stride(1),
            kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1), **consts, **options, **pdl_launch())
    return q_out


def qkv_launch(T: int, hq: int, hkv: int, d: int, v_is_k: bool = False) -> tuple[tuple[int], dict, dict]:
    """(grid, constexpr arguments, launch options) of _qkv_norm_rope_store_kernel for T tokens,
    hq query and hkv key/value heads (0 in the q-only launch) of size d; bench/isa_count.py qkv
    compiles the kernel with these to count its instructions."""
    block_half = triton.next_power_of_2(d // 2)
    most_heads = max(1, QKV_TILE // (2 * block_half))
    q_heads = min(triton.next_power_of_2(hq), most_heads)
    kv_heads = min(triton.next_power_of_2(max(hkv, 1)), most_heads)
    tokens = rows_per_program(T, 2 * block_half * q_heads, QKV_TILE)
    kv_tokens = rows_per_program(T, 2 * block_half * kv_heads, QKV_TILE)
    q_groups, kv_groups = triton.cdiv(hq, q_heads), triton.cdiv(hkv, kv_heads)
    grid = (triton.cdiv(T, tokens) * q_groups + triton.cdiv(T, kv_tokens) * kv_groups,)
    consts = dict(HQ=hq, HKV=hkv, D=d, HALF=d // 2, BLOCK_HALF=block_half, TOKENS=tokens, Q_HEADS=q_heads,
                  Q_GROUPS=q_groups, KV_TOKENS=kv_tokens, KV_HEADS=kv_heads, KV_GROUPS=max(kv_groups, 1),
                  V_IS_K=v_is_k)
    tile = tokens * q_heads * 2 * block_half
    warp_elems = tile * 32 // block_half if T >= QKV_MANY_TOKENS else QKV_WARP_ELEMS
    return grid, consts, launch_options(tile, warp_elems)


def qkv_norm_rope_store_eager(q, k, v, q_weight, k_weight, eps, positions, inv_freq, k_pool=None, v_pool=None,
                              out_slots=None, *, check=False) -> torch.Tensor:
    q, k, v = qkv_norm_eager(q, k, v, q_weight, k_weight, eps)
    if k is not None:
        rope_and_store_kv_eager(k, v, positions, inv_freq, k_pool, v_pool, out_slots, check=check)
    return apply_rope_eager(q, positions, inv_freq)
