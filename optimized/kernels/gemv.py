"""GEMV kernels for few rows (decode): y = x @ w.T with w [N, K] row-major (F.linear's weight),
with the epilogue the decode layer puts after a projection fused in, each public op beside its
eager twin (`op_eager`, the unfused ops).

    linear_gelu_mul(x, w)                       gelu_tanh(gate) * up, [gate; up] = w  (gate_up + act)
    linear_gelu_mul(x, w, up=u)                 gelu_tanh(x @ w.T) * u                (PLE gate)
    linear(x, w)                                x @ w.T                               (qkv, down, o_proj, PLE proj)

Why: at batch 1 a decode step reads every weight once and does almost no arithmetic, so each
projection is a pass over its weight at memory bandwidth, and the ops around it (the gated
GELU) are extra launches over tiny tensors. Each program here owns BLOCK_N output columns
(for the gated ops BLOCK_N gate columns and the matching up columns, so the activation is
computed where both sums are) and streams those weight rows over K in BLOCK_K chunks: loads
contiguous along K, every weight element read once by one program, float32 accumulation.

Two inner products, a launch setting (DOT) chooses:
- DOT=False: a broadcast multiply and a sum over K, [BLOCK_M, BLOCK_N, BLOCK_K] per step. No
  minimum tile, so BLOCK_N can be small (many programs even for N = 1536); its float32 FMAs cost
  BLOCK_M per weight element, fine for one or a few rows, compute-bound at tens of rows.
- DOT=True: tl.dot with the rows padded to BLOCK_M >= 16 (tensor cores; the padding costs
  nothing that matters in a memory-bound loop), BLOCK_N >= 16. For the larger row counts.
- SPLIT_K > 1: the K loop split over that many programs per output tile, so that a few rows on a
  narrow output (N = 1536 is 48 tiles of 32) still fill the machine; deterministic, in one launch
  (the kernel's docstring says how).

Numerics (shared/DESIGN.md, the bf16 rule): every load is upcast to float32 (dot operands are
the storage dtype only where compiled, `dot_args`), gate and up are rounded to the model dtype
before the activation (as the unfused projection's output is), and the activation rounds where
`gelu_tanh_mul` rounds. Kernel and twin then differ by the order of the float32 sums: now and
then one ULP of the storage dtype.

Calls past the limits (GEMV_MAX_ROWS, FUSED_MAX_ROWS, FLOAT32_MAX_ROWS, GEMV_MAX_WEIGHT below:
prefill chunks, batches for the stacked gate_up, big weights) take the unfused path (the
activation kernel and torch's F.linear), where cuBLAS is faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from reference.model import gelu_tanh as _reference_gelu_tanh
from . import INTERPRETING, capturing
from .activation import gelu_tanh_mul as _gelu_tanh_mul_kernel
from .common import check_float, check_same, dot_args, gelu_tanh_f32, round_to, store_rounded
from .pdl import pdl_launch, pdl_start

# Which calls take the GEMV kernel (the others: the unfused path, cuBLAS): a weight of at most
# GEMV_MAX_WEIGHT elements (the MLP's gate_up: both halves) and at most GEMV_MAX_ROWS rows for the
# plain projection and the PLE gate, FUSED_MAX_ROWS for the stacked gate_up (its fused work grows
# with the rows: each program holds two accumulators). Read at each call (a captured decode graph
# keeps what it saw); GEMV_MAX_ROWS = 0 turns the kernel off.
# From H200 sweeps of bench/gemv_bench.py (docs/results/gemv_bench_h200*.json; bf16; baseline:
# cuBLAS + the separate norm / gated-GELU kernel; us per call, the kernel's default setting):
# - one row: the kernel wins on small weights, where a call is mostly launch, ramp and tail: E2B
#   o_proj 1536 x 2048 3.5 vs 8.0, qkv 2560 x 1536 (norm fused) 5.9 vs 7.0, down 1536 x 6144 8.0 vs
#   10.0, PLE gate 1.7 vs 7.3; 26B-A4B gate_up 2 x 2112 x 2816 (11.9M) 10.9 vs 13.2, o_proj 2816 x
#   4096 (11.5M) 9.5 vs 11.1;
# - cuBLAS streams big weights better: 26B-A4B qkv 8192 x 2816 (23M) 19.7 vs 17.5, every 31B
#   projection (29-116M) 0.81-0.96x; E2B's gate_up (18.9M, 37.7M) ties (24.8 vs 24.2 at 37.7M).
#   One small loss inside the limit: 26B-A4B down 2816 x 2112 (5.9M) 7.9 vs 6.7.
# - 8 and 32 rows (split-K, gemv_bench_split_h200_s8.json), M = 8 / 32: o_proj 2048 5.2 vs 6.0 /
#   6.3 vs 6.2, o_proj 4096 7.3 vs 8.7 / 8.6 vs 9.0, down 6144 9.3 vs 10.1 / 10.4 vs 10.4, PLE gate
#   3.7 vs 7.3 / 4.4 vs 7.5 (the activation's launch saved), PLE proj 2.0 vs 3.2 / 2.1 vs 3.3;
#   but the former norm-fused qkv (each program re-read the rows for their RMS) 14.9 vs 9.4 at
#   M = 8 and the stacked gate_up 17.9 vs 15.0 lose: FUSED_MAX_ROWS = 1.
GEMV_MAX_ROWS = 32
FUSED_MAX_ROWS = 1
# Not a rule: the q/k/v projections (N = 2048-5120 > K = 1536 in E2B) lose to cuBLAS at 32 rows
# when timed alone (bench/gemv_bench.py --rows 8 16 32, docs/results/gemv_rows_h200_s10.json: 7.27
# against 5.92 us for 2560 x 1536, 11.65 against 7.54 for 5120 x 1536; about 42 us a step summed),
# yet sending them to cuBLAS past 16 rows made the whole batch-32 step 2.6% slower in one run of
# bench/decode_variants.py (3.152 / 3.153 ms against 3.072; decode_variants_wide2_h200_s10.log):
# in a graph under PDL the kernel streams its weights while the previous kernel finishes, which
# a call timed alone does not show and cuBLAS cannot do. Judge a row limit end to end.
# Float32 models (the oracle's precise runs; speed is for 16-bit ones) take the kernel at one row
# only, the broadcast sum. Measured on an H200, float32 relative error against float64 at 8 rows
# (mean of 5 draws): tl.dot ("ieee": FMAs accumulated along K) 4.1e-7 at K = 2048 split 4 ways,
# 8.1e-7 unsplit, 1.4e-6 at K = 6144; F.linear 1.2e-7 / 1.4e-7; the broadcast sum (a tree over
# each BLOCK_K) 1.3e-7 / 1.9e-7. In the model it showed: with the tl.dot path at 2-32 rows the
# tiny float32 fault scenario fault-prefix-reuse-after-eviction went 0.71 -> 1.10 of its noise
# budget (a suite failure). Any float32 tl.dot over a long K has this error growth.
FLOAT32_MAX_ROWS = 1
GEMV_MAX_WEIGHT = 12 << 20

# Launch settings per shape class, read at each launch: the first entry whose `rows` covers M.
# One row, the broadcast sum (H200 sweeps above): BLOCK_K = 2048 beat 1024 and 1024 beat 512 on
# most shapes, 4 warps beat 8, BLOCK_N 2-4 beat 8-16 and tl.dot; BLOCK_N is halved, down to 2,
# while the grid has fewer than MIN_PROGRAMS programs: 384 keeps N = 1536 at BLOCK_N 4 (down 6144
# 8.0 us against 8.3 at 2, PLE proj 1.5 against 1.9; o_proj 4096 6.1 against 6.0) and puts the
# 256-wide PLE gate at 2. Split-K did not help at one row (o_proj 2048 5.0 at 4 splits against
# 3.5 unsplit). 2-32 rows, tl.dot: BLOCK_N 32 with 4 splits was best or within 3% of the best on
# every shape that takes the kernel at 8 rows and all but o_proj 2048 at 32 (6.3 against 5.6 at
# BLOCK_N 16 unsplit); unsplit BLOCK_N 16 (96 tiles for N = 1536) lost on the larger weights (down
# 6144 at 32 rows 13.7 against 10.4).
SETTINGS = [
    dict(rows=1, BLOCK_N=4, BLOCK_K=2048, DOT=False, num_warps=4, num_stages=3, SPLIT_K=1),
    dict(rows=32, BLOCK_N=32, BLOCK_K=256, DOT=True, num_warps=4, num_stages=3, SPLIT_K=4),
]
MIN_PROGRAMS = 384
# Under Triton's interpreter (CPU; the kernel runs there only when forced, i.e. in its tests),
# which pays for every program and every op: one program over a test model's whole width.
# Measured here (tiny, one row): the former fused input norm + qkv 68 ms a call at BLOCK_N 32 /
# BLOCK_K 64, 8 ms at 256 / 128 (the unfused pair: 4 ms); the gated MLP 27 -> 9 ms.
INTERPRETER_SETTINGS = dict(BLOCK_N=256, BLOCK_K=128, DOT=True, num_warps=4, num_stages=1)

_MODES = {"linear": 0, "gated": 2, "gated_up": 3}  # 1 was the fused input norm (removed)


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
def _accumulate(acc, acc_up, x_rows, wv, uv, kk, row_ok, K, MODE: tl.constexpr, EVEN_K: tl.constexpr,
                DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc (and acc_up, MODE 2) plus the products of the rows' x at columns kk with the weight
    tiles wv (uv)."""
    if EVEN_K:
        x_mask = row_ok[:, None]
    else:
        x_mask = row_ok[:, None] & (kk < K)[None, :]
    xv = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0).to(tl.float32)
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
def _epilogue(acc, acc_up, out, gate_up_out, up, rows, cols, row_ok, col_ok, N, stride_up, MODE: tl.constexpr,
              STORE_GATE_UP: tl.constexpr):
    """The output tile from the finished float32 sums: stored rounded (MODE 0), or the gate (and
    up) rounded to the model dtype, the activation and the product (MODE 2, 3)."""
    dtype = out.dtype.element_ty
    mask = row_ok[:, None] & col_ok[None, :]
    out_ptrs = out + rows.to(tl.int64)[:, None] * N + cols[None, :]
    if MODE == 0:
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


@triton.jit
def _gemv_kernel(x, w, up, out, gate_up_out, partials, counters, M, N, K, k_split, stride_x, stride_w,
                 stride_up, MODE: tl.constexpr, STORE_GATE_UP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
                 PDL: tl.constexpr = False):
    """MODE 0: out = x @ w.T; 2: w = [gate; up] (N gate rows, then N up rows), out =
    gelu(x @ gate.T) * (x @ up.T), gate_up_out [M, 2N] the two products (STORE_GATE_UP); 3: out =
    gelu(x @ w.T) * up[M, N]. K is a runtime argument so that one compiled kernel serves every K.

    Split-K (SPLIT_K > 1; grid axis 1): program (t, s) sums columns [s * k_split, (s + 1) * k_split)
    of output tile t, stores its float32 sums in `partials` and takes a ticket from counters[t];
    the program that draws the last ticket adds the SPLIT_K partial sums in the order s = 0, 1, ...
    (so the result is the same whichever program finishes last), runs the epilogue and sets the
    counter back to 0 for the next call. One launch, deterministic: what lets few-row calls on
    narrow outputs (N = 1536 at BLOCK_N 16: 96 tiles) fill the machine.

    The first BLOCK_K columns of the program's weight rows are loaded before `pdl_start`: no
    kernel writes weights, so with PDL (pdl.py) their stream starts while the previous kernel
    still runs; everything else is read after the wait. One row's E2B projections (K = 1536 <=
    BLOCK_K = 2048) then have their whole weight slab in flight before the wait returns. Measured
    on an H200 it gained nothing visible (a batch-1 step 2.594 -> 2.587 ms, design note 40)."""
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    tile = tl.program_id(0)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    k_lo = tl.program_id(1) * k_split  # the launcher makes every split non-empty
    k_hi = tl.minimum(k_lo + k_split, K)
    x_rows = x + rows.to(tl.int64)[:, None] * stride_x
    w_rows = w + cols.to(tl.int64)[:, None] * stride_w
    up_rows = w + (cols + N).to(tl.int64)[:, None] * stride_w  # MODE 2: the matching up rows
    wv, uv = _load_weights(w_rows, up_rows, k_lo + ks, col_ok, K, MODE, EVEN_K)
    pdl_start(PDL)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc, acc_up = _accumulate(acc, acc_up, x_rows, wv, uv, k_lo + ks, row_ok, K, MODE, EVEN_K, DOT, DOT_DTYPE,
                              DOT_PRECISION)
    for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        wv, uv = _load_weights(w_rows, up_rows, k0 + ks, col_ok, K, MODE, EVEN_K)
        acc, acc_up = _accumulate(acc, acc_up, x_rows, wv, uv, k0 + ks, row_ok, K, MODE, EVEN_K, DOT, DOT_DTYPE,
                                  DOT_PRECISION)

    if SPLIT_K == 1:
        _epilogue(acc, acc_up, out, gate_up_out, up, rows, cols, row_ok, col_ok, N, stride_up, MODE, STORE_GATE_UP)
    else:
        # partials[s, t, 0 or 1 (up), BLOCK_M, BLOCK_N], float32; every row stored (padding rows
        # are zeros), so no mask
        tile_offs = rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_size = 2 * BLOCK_M * BLOCK_N
        mine = partials + (tl.program_id(1) * tl.num_programs(0) + tile).to(tl.int64) * tile_size
        tl.store(mine + tile_offs, acc)
        if MODE == 2:
            tl.store(mine + BLOCK_M * BLOCK_N + tile_offs, acc_up)
        # Every thread's stores before the ticket, the ticket's release making them visible at
        # device scope; the last program's acquire orders its reads after all the others' stores.
        tl.debug_barrier()
        ticket = tl.atomic_add(counters + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                theirs = partials + (s * tl.num_programs(0) + tile).to(tl.int64) * tile_size
                acc += tl.load(theirs + tile_offs, cache_modifier=".cg")
                if MODE == 2:
                    acc_up += tl.load(theirs + BLOCK_M * BLOCK_N + tile_offs, cache_modifier=".cg")
            tl.atomic_xchg(counters + tile, 0)  # ready for the next call (graph replays included)
            _epilogue(acc, acc_up, out, gate_up_out, up, rows, cols, row_ok, col_ok, N, stride_up, MODE,
                      STORE_GATE_UP)


# -- launch ------------------------------------------------------------------------------------

def launch_settings(rows: int, n: int) -> dict:
    """The launch settings for M = rows and N = n output columns (gate columns for the gated ops)."""
    if INTERPRETING:
        return dict(INTERPRETER_SETTINGS)
    s = dict(next((e for e in SETTINGS if rows <= e["rows"]), SETTINGS[-1]))
    s.pop("rows")
    while not s["DOT"] and s["BLOCK_N"] > 2 and triton.cdiv(n, s["BLOCK_N"]) < MIN_PROGRAMS:
        s["BLOCK_N"] //= 2
    return s


# Split-K scratch, one per device (calls on one device run one after another on its stream; with
# PDL a kernel touches it only after the previous grid has finished): float32 partial sums and a
# ticket counter per output tile, which the last program of a tile sets back to 0. Allocated once
# at a fixed size, never grown, so a captured graph's pointers stay valid; a call that needs more
# (or, first met inside a graph capture, where a zeroed allocation cannot run) runs unsplit.
SPLIT_PARTIAL_FLOATS = 2 << 20
SPLIT_TILES = 4096
_split_scratch: dict = {}


def _scratch(device: torch.device, floats: int, tiles: int):
    """(partials, counters) for a split-K launch, or None where it does not fit or cannot be made."""
    if floats > SPLIT_PARTIAL_FLOATS or tiles > SPLIT_TILES:
        return None
    got = _split_scratch.get(device)
    if got is None:
        if capturing(device):
            return None
        got = (torch.empty(SPLIT_PARTIAL_FLOATS, dtype=torch.float32, device=device),
               torch.zeros(SPLIT_TILES, dtype=torch.int32, device=device))
        _split_scratch[device] = got
    return got


def _launch(mode: str, x, w, out, *, up=None, gate_up=None, settings=None) -> None:
    M, K = x.shape
    N = out.shape[1]
    s = dict(launch_settings(M, N) if settings is None else settings)
    block_n, block_k, use_dot = s.pop("BLOCK_N"), s.pop("BLOCK_K"), s.pop("DOT")
    split_k = s.pop("SPLIT_K", 1)
    block_k = min(block_k, triton.next_power_of_2(K))
    block_m = max(triton.next_power_of_2(M), 16 if use_dot else 1)
    if use_dot:
        block_n = max(block_n, 16)
        block_k = max(block_k, 16)
    tiles = triton.cdiv(N, block_n)
    # K in split_k runs of whole BLOCK_K steps, none empty (fewer splits where K is short)
    k_split = triton.cdiv(triton.cdiv(K, block_k), max(split_k, 1)) * block_k
    split_k = triton.cdiv(K, k_split)
    scratch = None
    if split_k > 1:
        scratch = _scratch(x.device, split_k * tiles * 2 * block_m * block_n, tiles)
        if scratch is None:
            split_k, k_split = 1, K
    partials, counters = scratch if scratch is not None else (out, out)
    _gemv_kernel[(tiles, split_k)](
        x, w, out if up is None else up, out, out if gate_up is None else gate_up, partials, counters, M, N, K,
        k_split, x.stride(0), w.stride(0), 0 if up is None else up.stride(0), MODE=_MODES[mode],
        STORE_GATE_UP=gate_up is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=K % block_k == 0, DOT=use_dot, **dot_args(x.dtype), SPLIT_K=split_k, enable_fp_fusion=False, **s,
        **pdl_launch())


# -- checks ------------------------------------------------------------------------------------

def _check(x, w) -> None:
    """x [M, K] (rows strided, last dim contiguous), w [N, K] likewise, one dtype and device."""
    check_float("x", x, dim=2)
    check_float("w", w, dim=2)
    check_same("x", x, w=w)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be [N, {x.shape[1]}] (x is {list(x.shape)}), got {list(w.shape)}")


def row_limit(fused: bool, dtype: torch.dtype) -> int:
    """The most rows a call takes the kernel at, unforced: FUSED_MAX_ROWS for the stacked gate_up
    (fused=True), GEMV_MAX_ROWS for the plain projections and the PLE gate; float32 models at most
    FLOAT32_MAX_ROWS. The kernel testbed builds its cases from it too."""
    limit = min(FUSED_MAX_ROWS, GEMV_MAX_ROWS) if fused else GEMV_MAX_ROWS
    return min(limit, FLOAT32_MAX_ROWS) if dtype == torch.float32 else limit


def _use_kernel(x, w, settings, fused: bool) -> bool:
    """Whether to run the GEMV kernel: M within row_limit and the weight within GEMV_MAX_WEIGHT,
    or launch settings given (tests, benches: they force the kernel). Never unforced under
    Triton's interpreter: there it is slower than the unfused path by the interpreter's cost per
    op (the former fused input norm + qkv 8 ms a call against 4 at tiny, a decode-heavy test 20.9 s
    against 16.9), and the unfused path is what it replaces; the kernel's own tests force it."""
    fits = x.shape[0] <= row_limit(fused, x.dtype) and w.numel() <= GEMV_MAX_WEIGHT and not INTERPRETING
    return 0 < x.shape[0] and (settings is not None or fits)


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
    if not _use_kernel(x, w, settings, fused=up is None):
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
    if not _use_kernel(x, w, settings, fused=False):
        return F.linear(x, w)
    out = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
    _launch("linear", x, w, out, settings=settings)
    return out


def linear_eager(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)
