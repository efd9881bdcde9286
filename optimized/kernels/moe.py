"""Mixture-of-experts kernels of Gemma 4's MoE block (26B-A4B; GEMMA4_SPEC.md 3.5 and 9): the
router and the routed experts, each public op beside its eager twin (`op_eager`).

    route   = router_input -> logits = F.linear(z, proj_w) (torch) -> softmax_topk
    experts = group_by_expert (one launch) -> grouped gate_up GEMM with gelu_tanh(gate) * up
              -> grouped down GEMM times the routing weight -> ordered combine

Numerics. The kernels compute in float32 and round to the storage dtype exactly where the
reference's op sequence does (every torch op's result is a dtype tensor), so they differ from it
only where no kernel can follow torch:
- Sums run in another order: the sum of squares of router_input's norm, the softmax denominator,
  the float32 accumulation of the expert GEMMs (bf16/fp16 products are exact in float32, so only
  the order differs). tests/test_moe_kernels.py bounds each of these.
- exp and tanh are Triton's (tl.exp, common.tanh_f32), within a few float32 ULP of torch's.
- Ties in the top-k. torch.topk's choice among equal probabilities is implementation-defined and
  differs by device: topk([1, 2, 2, 1, 2, 0], 2) picks ids [2, 4] on the CPU (libstdc++'s
  nth_element) and [2, 1] on an H100. softmax_topk takes the lowest expert id among equal
  probabilities (jax.lax.top_k's rule), on every device. Equal probabilities come from equal
  logits, which bf16/fp16 logits often have; a tie between the k-th and (k+1)-th expert then
  routes the token to a different, equally probable, expert than the reference. The eager twin
  applies the same rule (a stable descending sort instead of torch.topk), and agrees with the
  reference's router wherever there is no tie at the top-k boundary.
- The combine adds each token's expert outputs in ascending expert id, rounding to the dtype after
  every add: the reference's index_add_ order, so a float32 model sums bit for bit alike once the
  expert outputs agree.

Neither op reads device values back to the host (no sync), so both can be captured in a CUDA
graph. Where no accelerator is present, everything runs under Triton's interpreter with float32
tl.dot operands (optimized/kernels/__init__.py: DOT_IN_STORAGE_DTYPE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from reference.model import compute_dtype, moe_experts, moe_router_input
from .common import (check_eps, check_float, check_same, check_weight, dot_args, gelu_tanh_f32, launch_options,
                     rms_rows, round_to, rows_per_program, segment_tile, store_rounded)
from .pdl import pdl_launch, pdl_start

__all__ = [
    "route", "route_eager", "router_input", "router_input_eager", "softmax_topk", "softmax_topk_eager",
    "experts", "experts_eager", "group_by_expert", "group_by_expert_eager",
]

_MAX_EXPERTS = 1024  # one row of logits per program row: BLOCK_E = next_power_of_2(E) lanes

# Grouped GEMM tiles by storage bytes per element: (BLOCK_N, BLOCK_K, num_warps, num_stages).
# BLOCK_M follows the expected rows per expert (_block_m). Chosen, not tuned: 2-byte tiles are the
# usual Hopper starting point for bf16 tensor-core GEMMs; 4-byte storage (float32 models, "ieee"
# dots without tensor cores) is a correctness path and takes smaller tiles. Seen once on an H100
# (bf16, 26B-A4B dims, CUDA-graph replay): 8-512 tokens stream the active experts' weights at
# 2.1-2.4 TB/s; 2048 tokens run at 163 TFLOP/s and 8192 at 244, a third of the chip's peak.
_GEMM_BLOCKS = {2: (128, 64, 8, 3), 4: (64, 32, 4, 2)}
_COMBINE_BLOCK = 1024  # columns per combine program, at most


# -- router ------------------------------------------------------------------------------------

@triton.jit
def _router_input_kernel(r, scale, z, n_rows, stride_r, eps, factor,
                         N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    # z = rms_norm(r) * scale * factor, each of the three ops rounded to the dtype as in torch.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    dtype = z.dtype.element_ty
    x = tl.load(r + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = round_to(rms_rows(x, scale, cols, N, eps, False), dtype)
    x = round_to(x * tl.load(scale + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :], dtype)
    store_rounded(z + rows[:, None] * N + cols[None, :], x * factor, mask)


@triton.jit
def _softmax_topk_kernel(logits, stride_l, expert_scale, top_w, top_i, n_rows,
                         E: tl.constexpr, K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                         ROWS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_E)
    x = tl.load(logits + rows[:, None] * stride_l + cols[None, :], mask=row_ok[:, None] & (cols < E)[None, :],
                other=float("-inf")).to(tl.float32)
    x = tl.where(row_ok[:, None], x, 0.0)  # rows past the end: finite, never stored

    # softmax in float32: exp(x - max) / sum
    e = tl.exp(x - tl.max(x, 1)[:, None])
    p = tl.div_rn(e, tl.sum(e, 1)[:, None])
    p = tl.where((cols < E)[None, :], p, -1.0)  # padding lanes: below every probability

    # top-k by repeated arg-max: highest probability first, the lowest id among equal ones. The
    # renormalising sum adds the picks in that order (torch may associate its sum of the sorted
    # values otherwise: an ULP or two).
    slots = tl.arange(0, BLOCK_K)
    w = tl.zeros([ROWS, BLOCK_K], tl.float32)
    ids = tl.zeros([ROWS, BLOCK_K], tl.int32)
    total = tl.zeros([ROWS], tl.float32)
    for j in tl.static_range(K):
        best = tl.max(p, 1)
        pick = tl.min(tl.where(p == best[:, None], cols[None, :], BLOCK_E), 1)
        w = tl.where(slots[None, :] == j, best[:, None], w)
        ids = tl.where(slots[None, :] == j, pick[:, None], ids)
        total = total + best
        p = tl.where(cols[None, :] == pick[:, None], -1.0, p)

    ids = tl.minimum(ids, E - 1)  # a NaN row matches no maximum; keep its loads in bounds
    out_mask = row_ok[:, None] & (slots < K)[None, :]
    scale = tl.load(expert_scale + ids, mask=out_mask, other=0.0).to(tl.float32)
    w = tl.div_rn(w, total[:, None]) * scale
    tl.store(top_w + rows[:, None] * K + slots[None, :], w, mask=out_mask)
    tl.store(top_i + rows[:, None] * K + slots[None, :], ids.to(tl.int64), mask=out_mask)


def router_input(r: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The router's input z = rms_norm(r) * scale * H**-0.5 for the residual stream r [N, H]
    (rows strided, last dim contiguous); a new contiguous [N, H] in r's dtype."""
    check_float("r", r, dim=2)
    check_eps(eps)
    n, h = r.shape
    check_weight("scale", scale, h, r.device)
    check_same("r", r, scale=scale)
    z = torch.empty((n, h), dtype=r.dtype, device=r.device)
    if n:
        block = triton.next_power_of_2(h)
        rows = rows_per_program(n, block)
        _router_input_kernel[(triton.cdiv(n, rows),)](
            r, scale, z, n, r.stride(0), eps, h ** -0.5, N=h, BLOCK=block, ROWS=rows,
            **launch_options(rows * block), **pdl_launch())
    return z


def router_input_eager(r: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return moe_router_input(r, scale, eps)


def softmax_topk(logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int):
    """Router weights from router logits [N, E] (rows strided, last dim contiguous): float32
    softmax over the E experts, the top_k of them (highest first; the lowest id among equal
    probabilities), renormalised to sum to one, times per_expert_scale[id].

    Returns (top_w float32 [N, top_k], top_i int64 [N, top_k]), as the reference's router does
    for float32, bfloat16 and float16 logits. One program handles a tile of rows in one launch.
    """
    check_float("logits", logits, dim=2)
    n, e = logits.shape
    if not 1 <= e <= _MAX_EXPERTS:
        raise ValueError(f"the number of experts must be in [1, {_MAX_EXPERTS}], got {e}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= e:
        raise ValueError(f"top_k must be an int in [1, {e}], got {top_k!r}")
    check_weight("per_expert_scale", per_expert_scale, e, logits.device)
    top_w = torch.empty((n, top_k), dtype=torch.float32, device=logits.device)
    top_i = torch.empty((n, top_k), dtype=torch.int64, device=logits.device)
    if n:
        block = triton.next_power_of_2(e)
        rows = rows_per_program(n, block)
        _softmax_topk_kernel[(triton.cdiv(n, rows),)](
            logits, logits.stride(0), per_expert_scale, top_w, top_i, n,
            E=e, K=top_k, BLOCK_E=block, BLOCK_K=triton.next_power_of_2(top_k), ROWS=rows,
            **launch_options(rows * block), **pdl_launch())
    return top_w, top_i


def softmax_topk_eager(logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int):
    """The reference router's tail, line for line, with the top-k taken by a stable descending
    sort (the lowest id first among equal probabilities) instead of torch.topk."""
    probs = torch.softmax(logits, dim=-1, dtype=compute_dtype(logits.dtype))
    top_w, top_i = torch.sort(probs, dim=-1, descending=True, stable=True)
    top_w, top_i = top_w[:, :top_k], top_i[:, :top_k]
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w * per_expert_scale[top_i], top_i


def route(r: torch.Tensor, scale: torch.Tensor, proj_w: torch.Tensor, per_expert_scale: torch.Tensor,
          top_k: int, eps: float):
    """Gemma 4's router (GEMMA4_SPEC.md 3.5) for the residual stream r [N, H]: top-k expert
    weights (float32 [N, top_k]) and ids (int64 [N, top_k]), highest weight first.

    z = rms_norm(r) * scale * H**-0.5 (router_input), logits = z @ proj_w.T in r's dtype (torch's
    GEMM), then softmax_topk. proj_w is [E, H]; scale [H] and per_expert_scale [E] are the
    router's weights, all in r's dtype.
    """
    check_float("r", r, dim=2)
    check_float("proj_w", proj_w, dim=2)
    check_same("r", r, proj_w=proj_w)
    if proj_w.shape[1] != r.shape[-1]:
        raise ValueError(f"proj_w must be [E, {r.shape[-1]}], got {list(proj_w.shape)}")
    logits = F.linear(router_input(r, scale, eps), proj_w)
    return softmax_topk(logits, per_expert_scale, top_k)


def route_eager(r: torch.Tensor, scale: torch.Tensor, proj_w: torch.Tensor, per_expert_scale: torch.Tensor,
                top_k: int, eps: float):
    """reference.model.moe_route's math with the lowest-id tie rule (softmax_topk_eager)."""
    logits = F.linear(router_input_eager(r, scale, eps), proj_w)
    return softmax_topk_eager(logits, per_expert_scale, top_k)


# -- experts -----------------------------------------------------------------------------------
#
# The routing of N tokens to top_k experts each makes N * top_k entries; entry t * top_k + j is
# token t's j-th expert in ascending id (not the router's slot j). Sorting the entries by expert
# (stably, so each expert's tokens stay in token order) gives the order in which the GEMM kernels
# visit them: `entries[row]` is the entry at sorted position `row`, and expert e's rows are
# offsets[e]:offsets[e + 1]. The gate_up kernel writes the activation of sorted row `row`
# to act[row]; the down kernel writes entry f's weighted output to y[f], so y holds each token's
# contributions next to each other in ascending expert id, the order the combine adds them in.

@triton.jit
def _expert_tile(offsets, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row) of this program's tile of sorted rows; expert == E for a
    spare program. Tiles are numbered expert by expert, BLOCK_M rows each."""
    expert, tile, start, end = segment_tile(offsets, E, BLOCK_M, BLOCK_E)
    return expert, start + tile * BLOCK_M, end


@triton.jit
def _gate_up_kernel(x, stride_x, w, stride_we, stride_wn, entries, offsets, act, H, I, E,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_E: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    PDL: tl.constexpr = False):
    pdl_start(PDL)
    # act[row] = gelu_tanh(x[tok] @ Wg.T) * (x[tok] @ Wu.T) for expert e's Wg = w[e, :I], Wu = w[e, I:].
    expert, row0, row_end = _expert_tile(offsets, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    tok = tl.load(entries + rows, mask=row_ok, other=0).to(tl.int64) // TOP_K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    k = tl.arange(0, BLOCK_K)
    x_ptrs = x + tok[:, None] * stride_x + k[None, :]
    g_ptrs = w + expert.to(tl.int64) * stride_we + n[:, None].to(tl.int64) * stride_wn + k[None, :]
    u_ptrs = g_ptrs + I * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = k < H - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        wg = tl.load(g_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        wu = tl.load(u_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        gate = tl.dot(a, tl.trans(wg), gate, input_precision=DOT_PRECISION)
        up = tl.dot(a, tl.trans(wu), up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    # The reference's gate_up projection is a dtype tensor, and so is F.gelu's result.
    dtype = act.dtype.element_ty
    h = round_to(gelu_tanh_f32(round_to(gate, dtype)), dtype) * round_to(up, dtype)
    store_rounded(act + rows[:, None].to(tl.int64) * I + n[None, :], h, row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(act, w, stride_we, stride_wn, entries, offsets, weights, y, H, I, E,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    # y[entry] = ((act[row] @ Wd.T) * weight[entry]).to(dtype) for expert e's Wd = w[e].
    expert, row0, row_end = _expert_tile(offsets, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    k = tl.arange(0, BLOCK_K)
    a_ptrs = act + rows[:, None].to(tl.int64) * I + k[None, :]
    w_ptrs = w + expert.to(tl.int64) * stride_we + n[:, None].to(tl.int64) * stride_wn + k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = k < I - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        wd = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, tl.trans(wd), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    entry = tl.load(entries + rows, mask=row_ok, other=0).to(tl.int64)
    weight = tl.load(weights + entry, mask=row_ok, other=0.0).to(tl.float32)
    dtype = y.dtype.element_ty
    # The down projection is a dtype tensor; times the (float32) weight, then cast to the dtype.
    store_rounded(y + entry[:, None] * H + n[None, :], round_to(acc, dtype) * weight[:, None],
                  row_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(y, ids, out, n_tokens, H, E, TOP_K: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    PDL: tl.constexpr = False):
    pdl_start(PDL)
    # out[t] = (((0 + y[t, 0]) + y[t, 1]) + ...), rounded after every add, as index_add_ does.
    # Entries with an id outside [0, E) were never computed; like the reference, skip them.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n_tokens
    mask = row_ok[:, None] & (cols < H)[None, :]
    dtype = out.dtype.element_ty
    acc = tl.zeros([ROWS, BLOCK], tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids + rows * TOP_K + j, mask=row_ok, other=-1)
        part = tl.load(y + (rows * TOP_K + j)[:, None] * H + cols[None, :],
                       mask=mask & ((e >= 0) & (e < E))[:, None], other=0.0)
        acc = round_to(acc + part.to(tl.float32), dtype)
    store_rounded(out + rows[:, None] * H + cols[None, :], acc, mask)


# The layout in one launch (group_by_expert), for up to _LAYOUT_MAX_ENTRIES = N * top_k entries,
# top_k <= _LAYOUT_MAX_TOP_K. Each program takes up to _LAYOUT_ROWS entries in router order
# (o = t * top_k + j) and finds, with no sort and no communication between programs:
#   - f, the entry's place in its token's row sorted by id: t * top_k + (ids below it in the row
#     + equal ids in earlier slots), i.e. a stable sort; ids[f] and weights[f] are stored there;
#   - its sorted position: (entries with a lower id) + (entries with an equal id and a lower o).
#     Sorting the row-sorted ids stably orders equal ids by (t, place in row) = (t, j) = o, so this
#     is the position torch's stable sort of the flattened ids gives f; entries[position] = f;
#   - offsets[e] = (entries with an id below e) for its slice of e in [0, E]: searchsorted's
#     left bound on the sorted ids.
# Every comparison is exact integer work on the ids as given, so ids outside [0, E) land where
# torch's sorts put them (before offsets[0] or from offsets[E] on, where no kernel reads).
# The cost is quadratic: every program compares its entries (and its slice of offsets) with all
# N * k ids, so the program count and each program's work both grow with N * k. At the bound,
# 4096 entries make 128 programs of 32 entries (one wave on an H100's or H200's 132 SMs), each
# comparing about 34 x 4096 pairs; past it a second wave and longer programs make it grow
# quadratically, while torch's sorts grow about linearly: reasoning, not a measurement; the
# bound is a constant to sweep. Decode at batch 1 (8 entries for 26B-A4B) is one program.
_LAYOUT_MAX_ENTRIES = 4096
_LAYOUT_MAX_TOP_K = 128  # the row comparison is a [ROWS, next_power_of_2(top_k)] tile
_LAYOUT_ROWS = 32  # entries per program
_LAYOUT_TILE = 8192  # elements of one program's comparison tiles per step, at most


@triton.jit
def _layout_kernel(top_w, stride_wt, stride_wj, top_i, stride_it, stride_ij, entries, offsets, weights, ids,
                   n_entries, E, K: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_OFF: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    o = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = o < n_entries
    t = (o // K).to(tl.int64)
    j = o % K
    key = tl.load(top_i + t * stride_it + j * stride_ij, mask=ok, other=0)

    # Place in the row sorted by id, stably (ties only among ids outside [0, E)).
    s = tl.arange(0, BLOCK_K)
    s_ok = s < K
    row = tl.load(top_i + t[:, None] * stride_it + s[None, :] * stride_ij, mask=ok[:, None] & s_ok[None, :],
                  other=0)
    # (The loop below binds names of its own: Triton takes a name bound before and inside a loop
    # as loop-carried and refuses a change of shape; compiling for sm_90 said so, the interpreter not.)
    ahead = (row < key[:, None]) | ((row == key[:, None]) & (s[None, :] < j[:, None]))
    f = t * K + tl.sum((ahead & s_ok[None, :]).to(tl.int32), 1)
    tl.store(ids + f, key, mask=ok)
    tl.store(weights + f, tl.load(top_w + t * stride_wt + j * stride_wj, mask=ok), mask=ok)

    # Sorted position of each entry, and offsets[e] for this program's slice of experts.
    e = tl.program_id(0) * BLOCK_OFF + tl.arange(0, BLOCK_OFF)
    pos = tl.zeros([ROWS], tl.int32)
    below = tl.zeros([BLOCK_OFF], tl.int32)
    for c0 in range(0, n_entries, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        c_ok = c < n_entries
        other = tl.load(top_i + (c // K).to(tl.int64) * stride_it + (c % K) * stride_ij, mask=c_ok, other=0)
        first = (other[None, :] < key[:, None]) | ((other[None, :] == key[:, None]) & (c[None, :] < o[:, None]))
        pos += tl.sum((first & c_ok[None, :]).to(tl.int32), 1)
        below += tl.sum(((other[None, :] < e[:, None]) & c_ok[None, :]).to(tl.int32), 1)
    tl.store(entries + pos, f.to(tl.int32), mask=ok)
    tl.store(offsets + e, below, mask=e <= E)


def _layout_launch(top_w: torch.Tensor, top_i: torch.Tensor, num_experts: int):
    """group_by_expert's kernel, for any size (group_by_expert keeps it to the bound above)."""
    n, k = top_i.shape
    m = n * k
    dev = top_i.device
    entries = torch.empty(m, dtype=torch.int32, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    weights = torch.empty(m, dtype=top_w.dtype, device=dev)
    ids = torch.empty((n, k), dtype=top_i.dtype, device=dev)
    rows = min(_LAYOUT_ROWS, triton.next_power_of_2(max(m, 1)))
    grid = max(triton.cdiv(m, rows), 1)
    block_off = triton.next_power_of_2(triton.cdiv(num_experts + 1, grid))  # grid * block_off > E
    chunk = min(triton.next_power_of_2(max(m, 1)), max(1, _LAYOUT_TILE // (rows + block_off)))
    chunk = 1 << (chunk.bit_length() - 1)  # a power of two, for tl.arange
    _layout_kernel[(grid,)](
        top_w, top_w.stride(0), top_w.stride(1), top_i, top_i.stride(0), top_i.stride(1), entries, offsets,
        weights, ids, m, num_experts, K=k, BLOCK_K=triton.next_power_of_2(k), ROWS=rows, BLOCK_OFF=block_off,
        CHUNK=chunk, **launch_options(triton.next_power_of_2((rows + block_off) * chunk)), **pdl_launch())
    return entries, offsets, weights, ids


def group_by_expert(top_w: torch.Tensor, top_i: torch.Tensor, num_experts: int):
    """The layout described above for a routing top_w, top_i [N, k] (any strides) over
    num_experts experts: (entries int32 [N * k], offsets int32 [E + 1], weights [N * k] in top_w's
    dtype, ids [N, k] in top_i's dtype), all contiguous and new. ids[t] is token t's row of ids
    sorted ascending (stably), weights the same permutation of top_w's row, flattened. entries
    lists the entries sorted stably by id and offsets[e] counts the ids below e, so expert e's
    sorted rows are offsets[e]:offsets[e + 1]; ids outside [0, E) sort before or after them.
    Contiguous because the combine kernel reads ids[t * k + j].

    One launch of _layout_kernel up to _LAYOUT_MAX_ENTRIES entries (and top_k up to
    _LAYOUT_MAX_TOP_K), else the twin's torch ops; either way bit for bit group_by_expert_eager's
    result, with no device sync."""
    if top_i.dim() != 2 or top_w.shape != top_i.shape:
        raise ValueError(f"top_w and top_i must both be [N, k], got {list(top_w.shape)} and {list(top_i.shape)}")
    n, k = top_i.shape
    if 0 < n * k <= _LAYOUT_MAX_ENTRIES and k <= _LAYOUT_MAX_TOP_K:
        return _layout_launch(top_w, top_i, num_experts)
    return group_by_expert_eager(top_w, top_i, num_experts)


def group_by_expert_eager(top_w: torch.Tensor, top_i: torch.Tensor, num_experts: int):
    # Each token's experts in ascending id: the combine order. Stable, so that equal ids (only
    # ever outside [0, E), which no kernel reads) still have one defined order. torch.sort keeps
    # its input's strides (torch 2.13), so column-major ids would reach the combine column-major.
    ids, slot = top_i.contiguous().sort(dim=1, stable=True)
    weights = top_w.gather(1, slot).reshape(-1)
    flat, entries = torch.sort(ids.reshape(-1), stable=True)
    # Expert e's rows start at the first sorted id >= e. (torch.bincount would read its input's
    # maximum back to the host, a device sync that CUDA graphs refuse.)
    bounds = torch.arange(num_experts + 1, dtype=flat.dtype, device=flat.device)
    offsets = torch.searchsorted(flat, bounds, out_int32=True)
    return entries.to(torch.int32), offsets, weights, ids


def _block_m(n_entries: int, num_experts: int) -> int:
    """Rows per GEMM tile: the expected rows per expert, between 16 (tl.dot's least) and 64."""
    return min(64, max(16, triton.next_power_of_2(triton.cdiv(n_entries, num_experts))))


def _gemm_blocks(width: int, depth: int, itemsize: int) -> tuple[int, int, int, int]:
    block_n, block_k, num_warps, num_stages = _GEMM_BLOCKS[4 if itemsize >= 4 else 2]
    return (min(block_n, max(16, triton.next_power_of_2(width))),
            min(block_k, max(16, triton.next_power_of_2(depth))), num_warps, num_stages)


def _check_experts(xe, top_w, top_i, gate_up, down) -> None:
    check_float("xe", xe, dim=2)
    check_float("gate_up", gate_up, dim=3)
    check_float("down", down, dim=3)
    check_same("xe", xe, gate_up=gate_up, down=down)
    n, h = xe.shape
    e, two_i, _ = gate_up.shape
    if gate_up.shape[2] != h or two_i % 2 or down.shape != (e, h, two_i // 2):
        raise ValueError(f"expected gate_up [E, 2 * I, {h}] and down [E, {h}, I], got {list(gate_up.shape)} "
                         f"and {list(down.shape)}")
    if not isinstance(top_w, torch.Tensor) or not top_w.dtype.is_floating_point:
        raise ValueError("top_w must be a floating-point tensor")
    if not isinstance(top_i, torch.Tensor) or top_i.dtype not in (torch.int32, torch.int64):
        raise ValueError("top_i must be an int32 or int64 tensor")
    if top_i.dim() != 2 or top_i.shape[0] != n or top_w.shape != top_i.shape:
        raise ValueError(f"top_w and top_i must both be [{n}, k], got {list(top_w.shape)} and {list(top_i.shape)}")
    if top_i.device != xe.device or top_w.device != xe.device:
        raise ValueError("top_w and top_i must be on the activations' device")
    if not 1 <= top_i.shape[1] <= e:
        raise ValueError(f"top_k must be in [1, {e}], got {top_i.shape[1]}")


def experts(xe: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    """The routed experts of GEMMA4_SPEC.md 3.5 for the tokens xe [N, H] (rows strided, last dim
    contiguous): out[t] = sum over j of (down[e] @ (gelu_tanh(gate) * up)) * top_w[t, j] with
    e = top_i[t, j] and gate, up the two halves of gate_up[e] @ xe[t]; in xe's dtype, summed in
    ascending expert id as the reference does.

    gate_up: [E, 2 * I, H], down: [E, H, I] (last dims contiguous), xe's dtype. top_w: [N, k]
    float; top_i: [N, k] int32/int64 ids, distinct within a row, not read back to the host (no
    device sync): as in the reference, an id outside [0, E) contributes nothing.
    Returns a new contiguous [N, H].
    """
    _check_experts(xe, top_w, top_i, gate_up, down)
    n, h = xe.shape
    num_experts, inter, top_k = gate_up.shape[0], down.shape[2], top_i.shape[1]
    out = torch.empty((n, h), dtype=xe.dtype, device=xe.device)
    if n == 0:
        return out
    entries, offsets, weights, ids = group_by_expert(top_w, top_i, num_experts)
    act = torch.empty((n * top_k, inter), dtype=xe.dtype, device=xe.device)
    y = torch.empty((n * top_k, h), dtype=xe.dtype, device=xe.device)

    block_m = _block_m(n * top_k, num_experts)
    # Each expert with rows takes ceil(rows / block_m) tiles: at most N*k/block_m + min(E, N*k) in
    # all, and at most N*k (a tile has a row). The spare programs of this bound exit at once.
    tiles = min(triton.cdiv(n * top_k, block_m) + min(num_experts, n * top_k), n * top_k)
    common = dict(BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts), **dot_args(xe.dtype))

    bn, bk, warps, stages = _gemm_blocks(inter, h, xe.element_size())
    _gate_up_kernel[(tiles, triton.cdiv(inter, bn))](
        xe, xe.stride(0), gate_up, gate_up.stride(0), gate_up.stride(1), entries, offsets, act, h, inter,
        num_experts, TOP_K=top_k, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        enable_fp_fusion=False, **common, **pdl_launch())
    bn, bk, warps, stages = _gemm_blocks(h, inter, xe.element_size())
    _down_kernel[(tiles, triton.cdiv(h, bn))](
        act, down, down.stride(0), down.stride(1), entries, offsets, weights, y, h, inter, num_experts,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, enable_fp_fusion=False, **common,
        **pdl_launch())

    block = min(triton.next_power_of_2(h), _COMBINE_BLOCK)
    rows = rows_per_program(n, block)
    _combine_kernel[(triton.cdiv(n, rows), triton.cdiv(h, block))](
        y, ids, out, n, h, num_experts, TOP_K=top_k, ROWS=rows, BLOCK=block, **launch_options(rows * block),
        **pdl_launch())
    return out


def experts_eager(xe: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor) -> torch.Tensor:
    """The reference's experts (reference.model.moe_experts) themselves."""
    return moe_experts(xe, top_w, top_i, gate_up, down)
