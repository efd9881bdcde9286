"""Paged attention of the optimized path: extend (prefill, chunked prefill) and decode.

Each public op has its eager twin beside it (`*_eager`): plain torch, keys gathered through the
page table, float32 math. The twins are the spec the kernels are tested against.

Layout (shared/DESIGN.md "Pools", "Forward metadata"):
- k_pool, v_pool: [num_slots, Hkv, D], last dim contiguous, other strides free. The key at
  logical position p of request b lives at slot
      page_table[b, p // page_size] * page_size + p % page_size.
  Slot/page 0 is a padding sink; pages wholly before the sliding window may be evicted (entry 0).
  The kernels therefore only ever touch keys in [first visible key, query position].
- The new K/V of this step are already in the pool; seq_lens[b] counts all keys of request b.
- Queries are bottom-right aligned: the last query row of request b sits at seq_lens[b] - 1.

Math (GEMMA4_SPEC.md 3.5, 5): scores = q . k with scale 1.0; optional softcap
c * tanh(s / c) before masking; softmax in float32; GQA: kv head j serves query heads
j*G .. j*G+G-1. Visibility is reference/window.py's rule; the kernels compute the same bound as
`first_visible_key`.

Kernel shape, in one paragraph. Both kernels pack the G query heads of one kv head into the rows
of a tile ("GQA packing"), so each K/V block is loaded once per kv head, not once per query head.
Decode is flash-decoding: one program per (request, kv head, split) streams its share of the
visible keys once and writes a partial output with its log-sum-exp; a small merge kernel combines
the splits. Extend is flash attention over tiles of (token, head) rows whose key loop is bounded by
[first visible key of the tile's first token, the tile's last position], so a sliding layer does
O(W) work per query and never reads an evicted page.

Neither op reads tensor values on the host (no device sync): metadata values (cu_seqlens_q,
seq_lens, page tables) are trusted; the eager twins check them. A query row with no visible key
(seq_len 0, e.g. a padding row) comes out as zeros from the kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference.window import first_visible_key, visible

from . import INTERPRETING
from .common import dot_args, segment_tile, store_rounded
from .pdl import pdl_launch, pdl_start

if INTERPRETING and type(tl.zeros).__name__ != "InterpretedFunction":
    # Triton's own library (tl.zeros, tl.cdiv, ...) is made of @jit functions defined when triton
    # is first imported; optimized.kernels rewraps them for the interpreter when triton came first.
    # If a future triton hides them where that does not reach, every kernel calling them would fail
    # at launch with "Cannot call @triton.jit'd outside of the scope of a kernel": say so here.
    raise ImportError("triton's library is not in interpreter mode although optimized.kernels switched the "
                      "interpreter on (this triton version is not supported when imported first): import "
                      "optimized.kernels (or set TRITON_INTERPRET=1) before importing triton")

__all__ = [
    "extend_attention", "extend_attention_eager",
    "decode_attention", "decode_attention_eager",
    "default_num_splits",
]

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # the kernels work in base 2: exp2 is native

# Block sizes by storage bytes per element, then by head dim: (BLOCK_M, BLOCK_N, num_warps,
# num_stages) for extend, (BLOCK_N, num_warps, num_stages) for decode. BLOCK_M counts packed
# (token, head) rows.
# - Head dims <= 64 only occur in tiny test models: small blocks keep the interpreter quick and
#   make short test sequences cross several key blocks and query tiles.
# - Every entry was compiled for sm_90 ahead of time (Triton 3.9, no GPU at hand) and fits an
#   H100's 227 KB of shared memory. Recompiled for sm_90a (ptxas -v on Triton's PTX, Triton 3.9,
#   default options) the bf16 entries spill some registers: extend (64, 32, 8, 2) at D=512 496
#   bytes, (128, 32, 8, 2) at D=256 854; decode D=256 136-344, D=512 none. Spilling is not the
#   whole story: these two were the fastest of the sweep all the same.
# - 4-byte storage (float32 models on a GPU: a correctness path, "ieee" dots without tensor cores)
#   needs much smaller tiles to stay out of local memory.
# bf16 extend at 256 and 512 chosen by `bench/attention_bench.py --sweep` on an H200
# (docs/measurements.md, session 6; one 8192-token prefill, Hq 8, Hkv 1, window 512 at D=256):
# D=512 (64, 32, 8, 2) 156 TFLOP/s against 119 for the earlier (32, 64, 8, 2); D=256 (128, 32, 8, 2)
# 187 against 108 for (64, 64, 8, 2); both with the unmasked interior (without it 131 and 144).
# The decode entries were within 5% of the sweep's best at batch 1/8/32 with 200 keys, so stay.
_EXTEND_BLOCKS = {
    2: {64: (16, 16, 4, 1), 128: (64, 64, 4, 2), 256: (128, 32, 8, 2), 512: (64, 32, 8, 2)},
    4: {64: (16, 16, 4, 1), 128: (16, 16, 4, 1), 256: (16, 16, 4, 1), 512: (16, 16, 4, 1)},
}
_DECODE_BLOCKS = {
    2: {64: (16, 4, 1), 128: (64, 4, 2), 256: (64, 8, 2), 512: (32, 8, 2)},
    4: {64: (16, 4, 1), 128: (32, 4, 2), 256: (32, 8, 1), 512: (16, 8, 1)},
}

# Extend splits its key loop into masked edge blocks and an unmasked interior (see _extend_kernel).
# False runs every block through the masked path: the same blocks in the same order, so the same
# results; kept for tests (which check that) and for bench/attention_bench.py --sweep (which times
# both).
EXTEND_UNMASKED_INTERIOR = True

# Extend starts its tiles last first (segment_tile's REVERSE). A causal tile's key loop grows with
# its position, so in id order the longest tiles start in the last wave and a few SMs finish
# alone; started first, the short ones fill in behind them. A list-scheduling model of an
# 8192-token prefill at head 512 (1024 tiles of 8 tokens on 132 SMs, one program per SM) puts
# id order 12.7% over the perfect balance and last-first 0.6%. Every tile computes the same
# values either way; False is kept for bench/attention_bench.py --sweep.
EXTEND_LONGEST_FIRST = True

# Decode split heuristic: aim for a few programs per SM of a large GPU (an H100 has 132), but keep
# at least this many keys per split so each split's fixed cost (loading q, writing a partial row,
# the merge) stays small against streaming its keys.
_TARGET_PROGRAMS = 512
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64
# Programs of one wave on a large GPU (an H100 or H200 has 132 SMs): below it, decode shortens its
# splits down to one key block (default_num_splits). A constant, not the device's count: the split
# count must depend on shapes only, the same on every machine and in every test.
_ONE_WAVE = 132

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EAGER_DTYPES = _KERNEL_DTYPES + (torch.float64,)


def _blocks(tables: dict, head_dim: int, itemsize: int) -> tuple:
    """The entry for the smallest tabled head dim >= head_dim (the largest one past the end)."""
    table = tables[4 if itemsize >= 4 else 2]
    return next((cfg for limit, cfg in sorted(table.items()) if head_dim <= limit), table[max(table)])


# --------------------------------------------------------------------------------------------
# Triton building blocks
# --------------------------------------------------------------------------------------------

@triton.jit
def _tanh(x):
    # Triton's core language has no tanh (libdevice is vendor-specific). e^{2x} overflowing to
    # inf or flushing to 0 saturates this to +-1, which is the right limit.
    e = tl.exp2(x * (2.0 * LOG2E))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _slots(page_row_ptr, pos, ok, page_size):
    """Pool slots (int64) of key positions `pos` of one request; lanes with `ok` false read no
    page-table entry and get slot 0, which the caller masks."""
    page = tl.load(page_row_ptr + pos // page_size, mask=ok, other=0)
    return page.to(tl.int64) * page_size + pos % page_size


@triton.jit
def _attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, stride_ks, stride_vs, slots, k_ok, visible_,
                  softcap, HAS_SOFTCAP: tl.constexpr, D: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr = True):
    """One step of the online softmax: fold a block of keys into (m_i, l_i, acc).

    q: [M, D] in DOT_DTYPE; slots/k_ok: [N]; visible_: [M, N]. k_ptr/v_ptr already point at the
    kv head. m_i is kept in log2 units (scores times log2(e)) so the loop uses exp2.
    K and V feed only tl.dot: they are loaded straight into DOT_DTYPE, which is the float32
    upcast under the interpreter and a no-op cast where compiled.
    MASKED false: every key of the block is real and visible to every row (k_ok, visible_ are
    ignored): no load masks, no score select. On such a block both ways compute the same values.
    """
    d = tl.arange(0, D)
    if MASKED:
        k = tl.load(k_ptr + slots[:, None] * stride_ks + d[None, :], mask=k_ok[:, None], other=0.0).to(DOT_DTYPE)
        v = tl.load(v_ptr + slots[:, None] * stride_vs + d[None, :], mask=k_ok[:, None], other=0.0).to(DOT_DTYPE)
    else:
        k = tl.load(k_ptr + slots[:, None] * stride_ks + d[None, :]).to(DOT_DTYPE)
        v = tl.load(v_ptr + slots[:, None] * stride_vs + d[None, :]).to(DOT_DTYPE)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # float32 scores, scale 1.0
    if HAS_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    if MASKED:
        s = tl.where(visible_, s * LOG2E, float("-inf"))
    else:
        s = s * LOG2E
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet has m_new = -inf; subtract 0 instead so that
    # exp2(-inf - (-inf)) never makes a NaN. (After an unmasked block m_new is finite.)
    if MASKED:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# --------------------------------------------------------------------------------------------
# Extend
# --------------------------------------------------------------------------------------------

# Launch arguments that change from step to step and need no specialization (design note 34).
# Triton compiles a kernel once per combination of its constexprs and of, for every int argument,
# "== 1" and "divisible by 16"; a serving engine meets new combinations mid-stream (a batch of 1,
# of 16, of 5; a page table 1 or 32 pages wide) and stalls on each compile. These are used only
# in address arithmetic of gathers and scalar loads/stores (page-table rows, the per-request
# segment search, log-sum-exp entries) and loop bounds, where divisibility buys no vector access.
_EXTEND_DYNAMIC = ("batch", "stride_pt")
_DECODE_DYNAMIC = ("stride_lb", "stride_lh", "stride_pt")
_MERGE_DYNAMIC = ("n_splits", "stride_lb", "stride_lh")

# BLOCK_B, the lanes of extend's per-request segment search, is a power of two at least this
# large: one compiled variant for every batch up to 64 requests instead of one per power of two.
# Each program loads and scans BLOCK_B + 1 entries of cu_seqlens once, next to a tile's attention.
MIN_BLOCK_B = 64
# BLOCK_S, the lanes of decode's split merge, likewise: _MAX_SPLITS covers default_num_splits.
MIN_BLOCK_S = _MAX_SPLITS


def extend_block_b(batch: int) -> int:
    """BLOCK_B of an extend launch over `batch` requests (what a warm-up must cover)."""
    return max(MIN_BLOCK_B, triton.next_power_of_2(batch))


def merge_block_s(num_splits: int) -> int:
    """BLOCK_S of a decode merge over `num_splits` splits."""
    return max(MIN_BLOCK_S, triton.next_power_of_2(num_splits))


@triton.jit
def _extend_blocks(q, m_i, l_i, acc, start, stop, hi, q_pos, window, page_row, page_size, k_head, v_head,
                   stride_ks, stride_vs, softcap, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold the key blocks starting at start, start + BLOCK_N, ... < stop into (m_i, l_i, acc).
    MASKED: keys past hi, and keys a row may not see, are masked; otherwise every key of every
    block must be in range and visible to every row."""
    for k_start in range(start, stop, BLOCK_N):
        k_pos = k_start + tl.arange(0, BLOCK_N)
        if MASKED:
            k_ok = k_pos < hi
            vis = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                vis = vis & (q_pos[:, None] - k_pos[None, :] < window)
            slots = _slots(page_row, k_pos, k_ok, page_size)
        else:
            k_ok = None
            vis = None
            slots = tl.load(page_row + k_pos // page_size).to(tl.int64) * page_size + k_pos % page_size
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_head, v_head, stride_ks, stride_vs, slots, k_ok, vis,
                                      softcap, HAS_SOFTCAP, D, DOT_DTYPE, DOT_PRECISION, MASKED)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=_EXTEND_DYNAMIC)
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, page_table_ptr, cu_q_ptr, seq_lens_ptr,
    stride_qn, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_on, stride_oh,
    stride_pt, batch, page_size, window, softcap,
    G: tl.constexpr, D: tl.constexpr, TOKENS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UNMASKED_INTERIOR: tl.constexpr, LONGEST_FIRST: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    kvh = tl.program_id(1)

    # Tiles are numbered request by request, TOKENS new tokens per tile; the grid is an upper
    # bound and spare programs exit. LONGEST_FIRST: see EXTEND_LONGEST_FIRST.
    b, tile_in_req, row0, q_end = segment_tile(cu_q_ptr, batch, TOKENS, BLOCK_B, LONGEST_FIRST)
    if b >= batch:
        return
    extend_len = q_end - row0
    seq_len = tl.load(seq_lens_ptr + b)

    # Rows are (token, head) pairs, token-major: row r is token r // G, head kvh*G + r % G.
    r = tl.arange(0, BLOCK_M)
    tok = tile_in_req * TOKENS + r // G
    row_ok = (r < TOKENS * G) & (tok < extend_len)
    head = kvh * G + r % G
    q_pos = seq_len - extend_len + tok
    d = tl.arange(0, D)
    q_off = (row0 + tok).to(tl.int64)[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)  # feeds only tl.dot

    # Keys this tile can see: from the first visible key of its first token (same bound as
    # reference.window.first_visible_key) to its last token's position.
    first_pos = seq_len - extend_len + tile_in_req * TOKENS
    hi = tl.minimum(first_pos + TOKENS, seq_len)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    page_row = page_table_ptr + b.to(tl.int64) * stride_pt
    k_head, v_head = k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh
    if UNMASKED_INTERIOR:
        # Key blocks start at lo, lo + BLOCK_N, ... as one loop cuts them; those wholly inside
        # [full_lo, full_hi), the keys every row of the tile sees, need no mask: full_hi - 1 is the
        # first token's position (causal), full_lo the first key in the last token's window. So
        # the loop runs in three parts: masked blocks at the window's edge, the unmasked interior,
        # masked blocks at the causal diagonal; the same blocks in the same order as one loop.
        full_hi = first_pos + 1
        mid_lo = lo
        if HAS_WINDOW:
            full_lo = tl.maximum(hi - window, 0)
            mid_lo = lo + (full_lo - lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # full_lo >= lo
        mid_hi = mid_lo + tl.maximum(full_hi - mid_lo, 0) // BLOCK_N * BLOCK_N
        m_i, l_i, acc = _extend_blocks(q, m_i, l_i, acc, lo, tl.minimum(mid_lo, hi), hi, q_pos, window, page_row,
                                       page_size, k_head, v_head, stride_ks, stride_vs, softcap, True,
                                       HAS_WINDOW, HAS_SOFTCAP, D, BLOCK_N, DOT_DTYPE, DOT_PRECISION)
        m_i, l_i, acc = _extend_blocks(q, m_i, l_i, acc, mid_lo, mid_hi, hi, q_pos, window, page_row,
                                       page_size, k_head, v_head, stride_ks, stride_vs, softcap, False,
                                       HAS_WINDOW, HAS_SOFTCAP, D, BLOCK_N, DOT_DTYPE, DOT_PRECISION)
        m_i, l_i, acc = _extend_blocks(q, m_i, l_i, acc, mid_hi, hi, hi, q_pos, window, page_row,
                                       page_size, k_head, v_head, stride_ks, stride_vs, softcap, True,
                                       HAS_WINDOW, HAS_SOFTCAP, D, BLOCK_N, DOT_DTYPE, DOT_PRECISION)
    else:  # one masked loop over every block
        m_i, l_i, acc = _extend_blocks(q, m_i, l_i, acc, lo, hi, hi, q_pos, window, page_row,
                                       page_size, k_head, v_head, stride_ks, stride_vs, softcap, True,
                                       HAS_WINDOW, HAS_SOFTCAP, D, BLOCK_N, DOT_DTYPE, DOT_PRECISION)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_off = (row0 + tok).to(tl.int64)[:, None] * stride_on + head[:, None] * stride_oh + d[None, :]
    # Rounded to nearest with integer ops: the interpreter's cast truncates bf16 (common.round_to),
    # which left outputs one ULP low where the float32 result sat just under a bf16 value.
    store_rounded(o_ptr + o_off, o, row_ok[:, None])


def extend_attention(q, k_pool, v_pool, page_table, page_size, cu_seqlens_q, seq_lens,
                     window=None, softcap=None, out=None):
    """Attention of the new tokens of a batch (prefill or a prefill chunk) over paged K/V.

    q: [N_new, Hq, D], packed: request b's rows are cu_seqlens_q[b]:cu_seqlens_q[b+1], its last
    row at position seq_lens[b] - 1. cu_seqlens_q: int32 [B+1]; seq_lens: int32 [B] (keys of
    request b, prefix and new, all already in the pool). Returns o [N_new, Hq, D] in q's dtype
    (written into `out` if given).
    """
    batch = _check_common(q, k_pool, v_pool, page_table, page_size, seq_lens, window, softcap, out)
    _check_index(cu_seqlens_q, "cu_seqlens_q", batch + 1, q.device)
    n, hq, d = q.shape
    hkv = k_pool.shape[1]
    if out is None:
        out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    if n == 0 or batch == 0:
        return out
    g = hq // hkv
    block_m, block_n, num_warps, num_stages = _blocks(_EXTEND_BLOCKS, d, q.element_size())
    block_m = max(block_m, triton.next_power_of_2(g))
    tokens = block_m // g
    # Each request needs ceil(len / tokens) tiles; summed, that is at most ceil(N / tokens) + B.
    grid = (triton.cdiv(n, tokens) + batch, hkv)
    _extend_kernel[grid](
        q, k_pool, v_pool, out, page_table, cu_seqlens_q, seq_lens,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0),
        v_pool.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        batch, page_size, window or 0, float(softcap or 0.0),
        G=g, D=d, TOKENS=tokens, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_B=extend_block_b(batch), HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, **dot_args(q.dtype), UNMASKED_INTERIOR=EXTEND_UNMASKED_INTERIOR,
        LONGEST_FIRST=EXTEND_LONGEST_FIRST,
        num_warps=num_warps, num_stages=num_stages, **pdl_launch(),
    )
    return out


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------

@triton.jit
def _decode_splits(seq_len, window, n_splits, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first visible key, keys per split, splits that hold keys) of a request of seq_len keys
    cut into n_splits runs of whole BLOCK_N blocks. The split kernel and the merge both call this,
    so the merge reads exactly the splits that were written, and nothing tells it but seq_len."""
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    keys = seq_len - lo
    per_split = (keys + n_splits - 1) // n_splits
    split_len = tl.maximum((per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N, BLOCK_N)
    return lo, split_len, (keys + split_len - 1) // split_len


@triton.jit(do_not_specialize=_DECODE_DYNAMIC)
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, page_table_ptr, seq_lens_ptr,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    stride_pt, page_size, window, softcap,
    G: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FINAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    """One (request, kv head, split). FINAL: a single split, which writes the normalised output
    in the output dtype; otherwise writes a float32 partial output and its log2-sum-exp2."""
    pdl_start(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)

    # The query sits at seq_len - 1 and sees every key of [lo, seq_len). Splits are whole key
    # blocks; a short request leaves its last splits empty. An empty split exits before it loads
    # anything and writes nothing: the merge reads only the first n_used splits. (The one split of
    # FINAL writes zeros for a request with no key.)
    seq_len = tl.load(seq_lens_ptr + b)
    lo, split_len, n_used = _decode_splits(seq_len, window, n_splits, HAS_WINDOW, BLOCK_N)
    if not FINAL:
        if split >= n_used:
            return
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    r = tl.arange(0, BLOCK_H)  # the G query heads of this kv head, padded to a dot-able tile
    row_ok = r < G
    head = kvh * G + r
    d = tl.arange(0, D)
    q_off = b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)  # feeds only tl.dot

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    page_row = page_table_ptr + b.to(tl.int64) * stride_pt
    for k_start in range(start, end, BLOCK_N):
        k_pos = k_start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < end
        slots = _slots(page_row, k_pos, k_ok, page_size)
        vis = k_ok[None, :] & row_ok[:, None]
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh,
                                      stride_ks, stride_vs, slots, k_ok, vis, softcap,
                                      HAS_SOFTCAP, D, DOT_DTYPE, DOT_PRECISION)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_off = b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + split * stride_os + d[None, :]
    if FINAL:
        store_rounded(o_ptr + o_off, o, row_ok[:, None])
    else:
        tl.store(o_ptr + o_off, o, mask=row_ok[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(lse_ptr + b * stride_lb + head * stride_lh + split, lse, mask=row_ok)


@triton.jit(do_not_specialize=_MERGE_DYNAMIC)
def _decode_merge_kernel(
    part_ptr, lse_ptr, o_ptr, seq_lens_ptr, n_splits, window,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Combine the splits of one (request, query head) that hold keys: weights 2^(lse_s - max lse).
    Entries of the empty splits were never written (they may hold anything) and are not read."""
    pdl_start(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    _, _, n_used = _decode_splits(tl.load(seq_lens_ptr + b), window, n_splits, HAS_WINDOW, BLOCK_N)
    s = tl.arange(0, BLOCK_S)
    lse_row = lse_ptr + b * stride_lb + h * stride_lh
    lse = tl.load(lse_row + s, mask=s < n_used, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no key at all: output zeros
    total = tl.sum(tl.exp2(lse - lse_max), 0)
    d = tl.arange(0, D)
    part_row = part_ptr + b.to(tl.int64) * stride_pb + h * stride_ph
    acc = tl.zeros([D], tl.float32)
    for i in range(0, n_used):
        acc += tl.exp2(tl.load(lse_row + i) - lse_max) * tl.load(part_row + i * stride_ps + d)
    o = acc / tl.where(total == 0.0, 1.0, total)
    store_rounded(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, o, None)


def default_num_splits(batch: int, kv_heads: int, max_keys: int, block_n: int = 64, short: bool = True) -> int:
    """Flash-decoding split count from shapes alone (no device sync; fixed while a graph replays).

    Two candidates, the larger wins (at most _MAX_SPLITS):
    - long splits: enough (request, kv head, split) programs to fill a large GPU a few times over
      (_TARGET_PROGRAMS), none shorter than _MIN_KEYS_PER_SPLIT keys at `max_keys`, so that each
      split's fixed cost (q, a partial row written and merged) stays small against its keys;
    - short splits, for batches that leave most SMs idle: up to one wave of programs
      (_ONE_WAVE), as short as one key block of `block_n` keys. A 190-key request at batch 1 then
      runs as a few one-block programs in parallel instead of one program streaming them in turn.
    `max_keys` is the longest possible key range (a graph's full-width page table, or the window);
    a request with fewer keys leaves splits empty, which exit at once and are never merged.
    short=False leaves the short splits out (decode_attention under Triton's interpreter, which
    pays host time for every program, empty or not: they made the CPU main job 7 s slower)."""
    programs = max(batch * kv_heads, 1)
    keys = max(max_keys, 1)
    long = min(triton.cdiv(_TARGET_PROGRAMS, programs), triton.cdiv(keys, _MIN_KEYS_PER_SPLIT))
    few = min(triton.cdiv(_ONE_WAVE, programs), triton.cdiv(keys, block_n)) if short else 1
    return max(1, min(max(long, few), _MAX_SPLITS))


def decode_attention(q, k_pool, v_pool, page_table, page_size, seq_lens, window=None,
                     softcap=None, out=None, num_splits=None):
    """One query per request (at position seq_lens[b] - 1) over paged K/V, split over keys.

    q: [B, Hq, D]. Returns o [B, Hq, D] in q's dtype (written into `out` if given).
    num_splits: how many ways to split each request's keys (an upper bound: a request with fewer
    key blocks leaves splits empty; they exit at once and the merge skips them). None picks
    `default_num_splits` from B, Hkv, the key block size and the longest possible key range (the
    page table's capacity, or the window), without a device sync.
    """
    batch = _check_common(q, k_pool, v_pool, page_table, page_size, seq_lens, window, softcap, out)
    if q.shape[0] != batch:
        raise ValueError(f"decode q has {q.shape[0]} rows but the batch has {batch} requests")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    _, hq, d = q.shape
    hkv = k_pool.shape[1]
    if out is None:
        out = torch.empty((batch, hq, d), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    block_n, num_warps, num_stages = _blocks(_DECODE_BLOCKS, d, q.element_size())
    if num_splits is None:
        max_keys = page_table.shape[1] * page_size
        if window is not None:
            max_keys = min(max_keys, window)
        num_splits = default_num_splits(batch, hkv, max_keys, block_n, short=not INTERPRETING)
    g = hq // hkv
    block_h = max(16, triton.next_power_of_2(g))  # tl.dot wants at least 16 rows
    common = dict(G=g, D=d, BLOCK_H=block_h, BLOCK_N=block_n, HAS_WINDOW=window is not None,
                  HAS_SOFTCAP=softcap is not None, **dot_args(q.dtype),
                  num_warps=num_warps, num_stages=num_stages)
    args = (page_table, seq_lens)
    q_strides = (q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
                 v_pool.stride(0), v_pool.stride(1))
    tail = (page_table.stride(0), page_size, window or 0, float(softcap or 0.0))

    if num_splits == 1:  # no partials, no merge: write the output directly
        _decode_split_kernel[(batch, hkv, 1)](
            q, k_pool, v_pool, out, out, *args, *q_strides,
            out.stride(0), out.stride(1), 0, 0, 0, *tail, FINAL=True, **common, **pdl_launch())
        return out

    part, lse = _split_buffers(batch, hq, num_splits, d, q.device)
    _decode_split_kernel[(batch, hkv, num_splits)](
        q, k_pool, v_pool, part, lse, *args, *q_strides,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        *tail, FINAL=False, **common, **pdl_launch())
    _decode_merge_kernel[(batch, hq)](
        part, lse, out, seq_lens, num_splits, window or 0, part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        D=d, BLOCK_S=merge_block_s(num_splits), BLOCK_N=block_n, HAS_WINDOW=window is not None,
        **pdl_launch())
    return out


def _split_buffers(batch: int, hq: int, num_splits: int, d: int, device):
    """Partial outputs [B, Hq, splits, D] and log2-sum-exp2s [B, Hq, splits] of a split decode,
    float32 and uninitialised: only the splits that hold keys are written, and only they are read
    (the tests fill these with NaN to hold the kernels to it)."""
    part = torch.empty((batch, hq, num_splits, d), dtype=torch.float32, device=device)
    lse = torch.empty((batch, hq, num_splits), dtype=torch.float32, device=device)
    return part, lse


# --------------------------------------------------------------------------------------------
# Input checks (shapes, dtypes, devices; never values, which would need a device sync)
# --------------------------------------------------------------------------------------------

def _check_index(t, name: str, length: int, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int32 tensor, got "
                         f"{getattr(t, 'dtype', type(t))} of shape {tuple(getattr(t, 'shape', ()))}")
    if t.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {t.shape[0]}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _check_common(q, k_pool, v_pool, page_table, page_size, seq_lens, window, softcap, out,
                  dtypes=_KERNEL_DTYPES) -> int:
    """Checks shared by both ops (and their twins); returns the batch size."""
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor, got shape {tuple(getattr(t, 'shape', ()))}")
        if t.dtype not in dtypes:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} differ in shape")
    if not (q.dtype == k_pool.dtype == v_pool.dtype):
        raise ValueError(f"q, k_pool, v_pool dtypes differ: {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    _, hq, d = q.shape
    hkv, dk = k_pool.shape[1], k_pool.shape[2]
    if dk != d:
        raise ValueError(f"head dim of q ({d}) and of the pools ({dk}) differ")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {d}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
    if (not isinstance(page_table, torch.Tensor) or page_table.dtype != torch.int32
            or page_table.dim() != 2 or page_table.stride(-1) != 1):
        raise ValueError("page_table must be a 2-D int32 tensor [B, max_pages] with a contiguous last dim, "
                         f"got {getattr(page_table, 'dtype', type(page_table))} "
                         f"of shape {tuple(getattr(page_table, 'shape', ()))}")
    if page_table.device != q.device:
        raise ValueError(f"page_table is on {page_table.device} but q is on {q.device}")
    batch = page_table.shape[0]
    _check_index(seq_lens, "seq_lens", batch, q.device)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[1:] != q.shape[1:]:
            raise ValueError(f"out must be a 3-D tensor [*, {hq}, {d}], got shape {tuple(getattr(out, 'shape', ()))}")
        if out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
            raise ValueError(f"out must match q's dtype ({q.dtype}) and device ({q.device}) and have a "
                             f"contiguous last dim; got {out.dtype} on {out.device}, strides {out.stride()}")
    return batch


# --------------------------------------------------------------------------------------------
# Eager twins: the spec. Gather each request's visible keys through its page table, attend
# densely in float32 (float64 stays float64) with reference/window.py's mask.
# --------------------------------------------------------------------------------------------

def _gather(pool, page_row, page_size: int, positions):
    """Pool rows of a request's key positions: [len(positions), Hkv, D]."""
    slots = page_row[positions // page_size].long() * page_size + positions % page_size
    return pool[slots]


def _attend_dense(q, k, v, q_pos, k_pos, window, softcap):
    """q [T, Hq, D], k/v [S, Hkv, D], all in the compute dtype -> [T, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = torch.einsum("thd,shd->hts", q, k)  # scale 1.0
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible(q_pos[:, None], k_pos[None, :], window), float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(s, dim=-1), v)


def extend_attention_eager(q, k_pool, v_pool, page_table, page_size, cu_seqlens_q, seq_lens,
                           window=None, softcap=None, out=None):
    """Eager twin of `extend_attention` (same arguments and result); also checks metadata values."""
    batch = _check_common(q, k_pool, v_pool, page_table, page_size, seq_lens, window, softcap, out,
                          dtypes=_EAGER_DTYPES)
    _check_index(cu_seqlens_q, "cu_seqlens_q", batch + 1, q.device)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0] or any(a > b for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens_q must rise from 0 to N_new={q.shape[0]}, got {cu}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    for b in range(batch):
        n, seq_len = cu[b + 1] - cu[b], lens[b]
        if n > seq_len:
            raise ValueError(f"request {b}: {n} new tokens but seq_len {seq_len}")
        if triton.cdiv(seq_len, page_size) > page_table.shape[1]:
            raise ValueError(f"request {b}: seq_len {seq_len} needs more than {page_table.shape[1]} pages")
        if n == 0:
            continue
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        k_pos = torch.arange(first_visible_key(seq_len - n, window), seq_len, device=q.device)
        k = _gather(k_pool, page_table[b], page_size, k_pos).to(compute)
        v = _gather(v_pool, page_table[b], page_size, k_pos).to(compute)
        o = _attend_dense(q[cu[b]:cu[b + 1]].to(compute), k, v, q_pos, k_pos, window, softcap)
        out[cu[b]:cu[b + 1]] = o.to(out.dtype)
    return out


def decode_attention_eager(q, k_pool, v_pool, page_table, page_size, seq_lens, window=None,
                           softcap=None, out=None, num_splits=None):
    """Eager twin of `decode_attention`: an extend of one token per request (num_splits is
    accepted for a matching signature and has no effect)."""
    batch = _check_common(q, k_pool, v_pool, page_table, page_size, seq_lens, window, softcap, out,
                          dtypes=_EAGER_DTYPES)
    if q.shape[0] != batch:
        raise ValueError(f"decode q has {q.shape[0]} rows but the batch has {batch} requests")
    cu = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    return extend_attention_eager(q, k_pool, v_pool, page_table, page_size, cu, seq_lens,
                                  window, softcap, out)
