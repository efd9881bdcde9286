"""Paged attention kernels against their eager twins, and the twins against dense truth.

Every pool slot that does not hold a key the kernel may read is NaN: slot/page 0 (the padding
sink), spare pages, the tail of a request's last page, keys before the first visible one, and the
pages wholly before the window, whose page-table entries are evicted to 0. A kernel that reads
outside [first visible key, query position] therefore turns its output into NaN.

Inputs are drawn on the CPU from a seeded generator (the same values on every machine) and moved
to the machine's device (the `device` fixture): compiled kernels on a GPU, the interpreter here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import triton
from hypothesis import given, strategies as st

from optimized.kernels.attention import (
    decode_attention, decode_attention_eager, default_num_splits, extend_attention,
    extend_attention_eager,
)
from reference.model import attend, attention_mask
from reference.window import first_visible_key, visible
from tests.sm90 import check_compiles

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS32 = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------

@dataclass
class Paged:
    k_pool: torch.Tensor      # [slots, Hkv, D], a strided view (K and V interleaved in one buffer)
    v_pool: torch.Tensor
    page_table: torch.Tensor  # int32 [B, max_pages]
    seq_lens: torch.Tensor    # int32 [B]
    k: list                   # per request, the dense keys [seq_len, Hkv, D] in position order
    v: list


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def build_paged(gen, seq_lens, live_from, hkv, d, page_size, dtype, device, spare_pages=3, evict=True) -> Paged:
    """Pages handed out from a shuffled free list (fragmented, out of order). Only keys at
    positions live_from[b] .. seq_lens[b]-1 are written; every other slot is NaN. With `evict`,
    page-table entries of pages wholly before live_from[b] are 0, as after sliding-window eviction."""
    pages = [cdiv(s, page_size) for s in seq_lens]
    n_pages = 1 + sum(pages) + spare_pages
    free = (torch.randperm(n_pages - 1, generator=gen) + 1).tolist()
    # One trailing zero column: entries past a request's last page must never be used either.
    table = torch.zeros(len(seq_lens), max(pages, default=0) + 1, dtype=torch.int32)
    buf = torch.full((n_pages * page_size, hkv, 2, d), float("nan"), dtype=dtype)
    k_pool, v_pool = buf[:, :, 0], buf[:, :, 1]
    ks, vs = [], []
    for b, (s, lo) in enumerate(zip(seq_lens, live_from)):
        k = torch.randn(s, hkv, d, generator=gen).to(dtype)
        v = torch.randn(s, hkv, d, generator=gen).to(dtype)
        ks.append(k)
        vs.append(v)
        for j in range(pages[b]):
            table[b, j] = free.pop()
        pos = torch.arange(lo, s)
        slots = table[b, pos // page_size].long() * page_size + pos % page_size
        k_pool[slots], v_pool[slots] = k[pos], v[pos]
        if evict:
            table[b, : lo // page_size] = 0
    buf = buf.to(device)
    return Paged(buf[:, :, 0], buf[:, :, 1], table.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device),
                 [k.to(device) for k in ks], [v.to(device) for v in vs])


def make_q(gen, n, hq, hkv, d, dtype, layout, device):
    """Queries [n, hq, d], contiguous or as the non-contiguous views kernels meet in practice."""
    if layout == "fused_qkv":  # the q columns of a fused QKV projection output
        qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=gen).to(device, dtype)
        return qkv[:, : hq * d].view(n, hq, d)
    if layout == "strided_heads":  # every other head of a bigger tensor
        return torch.randn(n, 2 * hq, d, generator=gen).to(device, dtype)[:, ::2]
    return torch.randn(n, hq, d, generator=gen).to(device, dtype)


def make_out(n, hq, d, dtype, strided, device):
    if strided:  # a column slice of a wider buffer
        return torch.full((n, hq, 2 * d), float("nan"), dtype=dtype, device=device)[:, :, :d]
    return None


def i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def upcast(*ts):
    return [t.float() for t in ts]


def assert_attention_close(actual, expected, q, k_pool, v_live, softcap=None):
    """Compare a kernel output in q's dtype with the float32 eager twin run on the same inputs
    upcast to float32 (or with a float64 truth cast to float32).

    Why these bounds. Both sides compute in float32 from identical operands, so they differ by
    rounding only. A computed score q.k is off by about eps32 * sum_d |q_d k_d| <= eps32 |q| |k|
    (Cauchy-Schwarz, bounded by max|q| max|k|); the exp2-based tanh of the softcap adds a few eps32
    times the cap; exp2 and the sums a few eps32 more. A score error delta moves each softmax
    weight by a relative ~delta, so the output moves by at most ~2 delta max|v|. That is the float32
    bound: about 1e-5 of max|v| at the test shapes; the largest error seen over a few hundred
    examples is under a tenth of it.
    In bf16/fp16 the kernel also rounds its output to the dtype (half an ULP of |o| <= max|v|),
    and on a GPU it feeds P to the PV dot in the storage dtype (half an ULP per weight, at most
    half an ULP of max|v| in all): 2 ULPs of max|v| cover both (about half of it is used).
    """
    dtype = q.dtype
    assert actual.dtype == dtype and actual.shape == expected.shape
    if q.numel() == 0:
        return
    qn = q.float().norm(dim=-1).max().item()
    kn = torch.nan_to_num(k_pool.float(), nan=0.0).norm(dim=-1).max().item()
    vmax = v_live.float().abs().max().item() if v_live.numel() else 1.0
    atol = 2 * EPS32 * (qn * kn + 4 * (softcap or 0.0) + 8) * vmax
    if dtype != torch.float32:
        atol += 2 * torch.finfo(dtype).eps * vmax
    assert torch.isfinite(actual).all(), "kernel output has NaN/Inf: it read a slot it must not read"
    torch.testing.assert_close(actual.float(), expected, atol=atol, rtol=0)


def live_v(paged, live_from):
    return torch.cat([v[lo:] for v, lo in zip(paged.v, live_from)] or [torch.zeros(0, device=paged.v_pool.device)])


# ------------------------------------------------------------------------------------------
# Property tests: kernel vs eager twin
# ------------------------------------------------------------------------------------------

common = dict(
    page_size=st.sampled_from([1, 2, 3, 4, 16]),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([16, 32]),
    window=st.one_of(st.none(), st.just(1), st.integers(2, 12)),
    softcap=st.sampled_from([None, 30.0]),
    dtype=st.sampled_from(list(DTYPES)),
    q_layout=st.sampled_from(["contiguous", "fused_qkv", "strided_heads"]),
    strided_out=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


@given(
    requests=st.lists(st.tuples(st.integers(0, 16), st.integers(0, 12)), min_size=1, max_size=3),
    **common,
)
def test_extend_matches_eager(requests, page_size, hkv, group, d, window, softcap, dtype,
                              q_layout, strided_out, seed, device):
    """requests: (prefix already in the pool, new tokens) per request; 0 new tokens is allowed."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dtype]
    hq = hkv * group
    ext = [e for _, e in requests]
    seq_lens = [p + e for p, e in requests]
    live_from = [first_visible_key(s - e, window) for s, e in zip(seq_lens, ext)]
    paged = build_paged(gen, seq_lens, live_from, hkv, d, page_size, dtype, device)
    n = sum(ext)
    cu = i32([0] + ext, device).cumsum(0, dtype=torch.int32)
    q = make_q(gen, n, hq, hkv, d, dtype, q_layout, device)
    out = make_out(n, hq, d, dtype, strided_out, device)

    args = (paged.page_table, page_size, cu, paged.seq_lens)
    got = extend_attention(q, paged.k_pool, paged.v_pool, *args, window=window, softcap=softcap, out=out)
    want = extend_attention_eager(*upcast(q, paged.k_pool, paged.v_pool), *args, window=window, softcap=softcap)
    if out is not None:
        assert got is out
    assert_attention_close(got, want, q, paged.k_pool, live_v(paged, live_from), softcap)


@given(
    seq_lens=st.lists(st.integers(1, 48), min_size=1, max_size=4),
    num_splits=st.sampled_from([None, 1, 2, 3, 4, 7]),
    **common,
)
def test_decode_matches_eager(seq_lens, num_splits, page_size, hkv, group, d, window, softcap,
                              dtype, q_layout, strided_out, seed, device):
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dtype]
    hq = hkv * group
    live_from = [first_visible_key(s - 1, window) for s in seq_lens]
    paged = build_paged(gen, seq_lens, live_from, hkv, d, page_size, dtype, device)
    q = make_q(gen, len(seq_lens), hq, hkv, d, dtype, q_layout, device)
    out = make_out(len(seq_lens), hq, d, dtype, strided_out, device)

    args = (paged.page_table, page_size, paged.seq_lens)
    got = decode_attention(q, paged.k_pool, paged.v_pool, *args, window=window, softcap=softcap,
                           out=out, num_splits=num_splits)
    want = decode_attention_eager(*upcast(q, paged.k_pool, paged.v_pool), *args, window=window, softcap=softcap)
    assert_attention_close(got, want, q, paged.k_pool, live_v(paged, live_from), softcap)


# ------------------------------------------------------------------------------------------
# The twins against dense truth (float64), and the kernels against the same truth
# ------------------------------------------------------------------------------------------

def dense_truth(q, k, v, window, softcap):
    """Dense attention of a whole sequence, q [S, Hq, D], k/v [S, Hkv, D] -> [S, Hq, D].
    Without softcap it is the reference model's own `attend` with its additive mask."""
    pos = torch.arange(q.shape[0], device=q.device)
    if softcap is None:
        heads_first = [t.transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, S, D]
        return attend(*heads_first, attention_mask(pos, window, q.dtype))[0].transpose(0, 1)
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("thd,shd->hts", q, k.repeat_interleave(g, 1))
    s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible(pos[:, None], pos[None, :], window), float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v.repeat_interleave(g, 1))


CHUNKS = [1, 6, 1, 9, 2]  # chunk lengths of one 19-token prefill: 1-token chunks, page-unaligned cuts


def run_chunks(op, q, paged, page_size, window, softcap):
    """Prefill one request chunk by chunk: each chunk's keys (and all before) are in the pool."""
    outs, end = [], 0
    for n in CHUNKS:
        end += n
        cu = i32([0, n], q.device)
        seq = i32([end], q.device)
        # The first key any query of this chunk may see; pages before it stay evicted.
        table = paged.page_table.clone()
        table[0, : first_visible_key(end - n, window) // page_size] = 0
        outs.append(op(q[end - n:end], paged.k_pool, paged.v_pool, table, page_size, cu, seq,
                       window=window, softcap=softcap))
    return torch.cat(outs)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_eager_twins_match_dense_truth(window, softcap, device):
    gen = torch.Generator().manual_seed(1000 + (window or 0) + int(softcap or 0))
    S, page_size, hkv, hq, d = sum(CHUNKS), 4, 2, 4, 16
    paged = build_paged(gen, [S], [0], hkv, d, page_size, torch.float64, device, evict=False)
    q = torch.randn(S, hq, d, generator=gen, dtype=torch.float64).to(device)
    truth = dense_truth(q, paged.k[0], paged.v[0], window, softcap)

    chunked = run_chunks(extend_attention_eager, q, paged, page_size, window, softcap)
    torch.testing.assert_close(chunked, truth, atol=1e-12, rtol=1e-12)
    for s in (1, 5, S):  # decode at a few positions: the query at s-1 over keys 0..s-1
        last = decode_attention_eager(q[s - 1:s], paged.k_pool, paged.v_pool, paged.page_table, page_size,
                                      i32([s], device), window=window, softcap=softcap)
        torch.testing.assert_close(last[0], dense_truth(q[:s], paged.k[0][:s], paged.v[0][:s], window, softcap)[-1],
                                   atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("window,softcap", [(None, None), (1, None), (5, 30.0), (7, None)])
def test_chunked_prefill_kernel_matches_dense_truth(window, softcap, device):
    gen = torch.Generator().manual_seed(2000 + (window or 0))
    S, page_size, hkv, hq, d = sum(CHUNKS), 2, 1, 4, 32
    paged = build_paged(gen, [S], [0], hkv, d, page_size, torch.float32, device, evict=False)
    q = torch.randn(S, hq, d, generator=gen).to(device)
    truth = dense_truth(q.double(), paged.k[0].double(), paged.v[0].double(), window, softcap).float()
    chunked = run_chunks(extend_attention, q, paged, page_size, window, softcap)
    assert_attention_close(chunked, truth, q, paged.k_pool, paged.v[0], softcap)
    whole = extend_attention(q, paged.k_pool, paged.v_pool, paged.page_table, page_size,
                             i32([0, S], device), paged.seq_lens,
                             window=window, softcap=softcap)
    assert_attention_close(whole, truth, q, paged.k_pool, paged.v[0], softcap)


# ------------------------------------------------------------------------------------------
# Decode splits, eviction, edge cases
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 20])
def test_decode_num_splits_agree(window, device):
    gen = torch.Generator().manual_seed(3000 + (window or 0))
    seq_lens, page_size, hkv, hq, d = [1, 37, 70], 4, 1, 4, 16
    live_from = [first_visible_key(s - 1, window) for s in seq_lens]
    paged = build_paged(gen, seq_lens, live_from, hkv, d, page_size, torch.float32, device)
    q = torch.randn(len(seq_lens), hq, d, generator=gen).to(device)
    args = (q, paged.k_pool, paged.v_pool, paged.page_table, page_size, paged.seq_lens)
    want = decode_attention_eager(*args, window=window)
    single = decode_attention(*args, window=window, num_splits=1)
    for n in (2, 3, 8, None):  # 70 keys are 5 blocks of 16: 8 splits leave some empty
        got = decode_attention(*args, window=window, num_splits=n)
        assert_attention_close(got, want, q, paged.k_pool, live_v(paged, live_from))
        # Splitting only reorders float32 sums: far tighter than the bound against the twin.
        torch.testing.assert_close(got, single, atol=5e-6, rtol=5e-6)


def test_evicted_pages_are_never_read(device):
    """Same pool, once fully mapped with real keys everywhere, once with the pages before the
    window evicted (entry 0) and their old contents, slot 0 and every spare slot set to NaN: the
    outputs must be bitwise equal (on every backend: the same kernel on the same visible keys)."""
    gen = torch.Generator().manual_seed(4000)
    window, page_size, S, n_new, hkv, hq, d = 5, 2, 23, 4, 1, 2, 16
    full = build_paged(gen, [S, S - 3], [0, 0], hkv, d, page_size, torch.float32, device, evict=False)
    full.k_pool.nan_to_num_(7.0)  # slot 0 and spare slots hold finite junk here
    full.v_pool.nan_to_num_(-3.0)
    evicted_pool_k, evicted_pool_v = full.k_pool.clone(), full.v_pool.clone()
    table = full.page_table.clone()
    for b, s in enumerate(full.seq_lens.tolist()):
        first_page = first_visible_key(s - n_new, window) // page_size
        dead = table[b, :first_page].long()
        for pool in (evicted_pool_k, evicted_pool_v):
            pool[:page_size] = float("nan")  # page 0, the padding sink
            for p in dead.tolist():
                pool[p * page_size:(p + 1) * page_size] = float("nan")
        table[b, :first_page] = 0

    q = torch.randn(2 * n_new, hq, d, generator=gen).to(device)
    cu = i32([0, n_new, 2 * n_new], device)
    a = extend_attention(q, full.k_pool, full.v_pool, full.page_table, page_size, cu, full.seq_lens, window=window)
    b = extend_attention(q, evicted_pool_k, evicted_pool_v, table, page_size, cu, full.seq_lens, window=window)
    assert torch.isfinite(b).all() and torch.equal(a, b)

    qd = q[n_new - 1::n_new]  # one query per request
    for splits in (1, 3):
        a = decode_attention(qd, full.k_pool, full.v_pool, full.page_table, page_size, full.seq_lens,
                             window=window, num_splits=splits)
        b = decode_attention(qd, evicted_pool_k, evicted_pool_v, table, page_size, full.seq_lens,
                             window=window, num_splits=splits)
        assert torch.isfinite(b).all() and torch.equal(a, b)


@pytest.mark.parametrize("d,window", [(256, 4), (512, None)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gemma4_head_dims(d, window, dtype, device):
    """The real head sizes, with the real block sizes, on a handful of tokens."""
    gen = torch.Generator().manual_seed(5000 + d)
    dtype = DTYPES[dtype]
    prefix, n_new, page_size, hkv, hq = 5, 6, 4, 1, 4
    seq_lens = [prefix + n_new]
    live = [first_visible_key(prefix, window)]
    paged = build_paged(gen, seq_lens, live, hkv, d, page_size, dtype, device)
    q = make_q(gen, n_new, hq, hkv, d, dtype, "fused_qkv", device)
    args = (paged.page_table, page_size, i32([0, n_new], device), paged.seq_lens)
    got = extend_attention(q, paged.k_pool, paged.v_pool, *args, window=window)
    want = extend_attention_eager(*upcast(q, paged.k_pool, paged.v_pool), *args, window=window)
    assert_attention_close(got, want, q, paged.k_pool, live_v(paged, live))

    qd = q[-1:]
    for splits in (1, 2):
        got = decode_attention(qd, paged.k_pool, paged.v_pool, paged.page_table, page_size, paged.seq_lens,
                               window=window, num_splits=splits)
        want = decode_attention_eager(*upcast(qd, paged.k_pool, paged.v_pool), paged.page_table, page_size,
                                      paged.seq_lens, window=window)
        assert_attention_close(got, want, qd, paged.k_pool, live_v(paged, live))


def test_rows_without_keys_and_empty_batches(device):
    """A padding row (seq_len 0) decodes to zeros without touching the pool; empty inputs work."""
    gen = torch.Generator().manual_seed(6000)
    paged = build_paged(gen, [0, 9], [0, 0], 1, 16, 4, torch.float32, device)
    q = torch.randn(2, 2, 16, generator=gen).to(device)
    for splits in (1, 4):
        o = decode_attention(q, paged.k_pool, paged.v_pool, paged.page_table, 4, paged.seq_lens, num_splits=splits)
        assert torch.equal(o[0], torch.zeros_like(o[0]))
        want = decode_attention_eager(q[1:], paged.k_pool, paged.v_pool, paged.page_table[1:], 4, paged.seq_lens[1:])
        assert_attention_close(o[1:], want, q, paged.k_pool, paged.v[1])
    empty = extend_attention(q[:0], paged.k_pool, paged.v_pool, paged.page_table, 4,
                             torch.zeros(3, dtype=torch.int32, device=device), paged.seq_lens)
    assert empty.shape == (0, 2, 16)


def test_default_num_splits():
    assert default_num_splits(1, 1, 32768) == 64              # long context, tiny batch: split wide
    assert default_num_splits(64, 2, 32768) == 4              # big batch already fills the GPU
    assert default_num_splits(256, 8, 100) == 1
    # Batches far below one wave of SMs split down to one key block: a 512-key window at batch 1
    # in 8 blocks of 64, a 192-key eager table in 3; at batch 32 up to 132/32 -> 5 splits.
    assert default_num_splits(1, 2, 512, 64) == 8
    assert default_num_splits(1, 1, 192, 64) == 3
    assert default_num_splits(1, 1, 192, 32) == 6
    assert default_num_splits(32, 1, 512, 64) == 5
    assert default_num_splits(256, 1, 512, 64) == 2           # a full GPU keeps 256-key splits
    # short=False (what decode_attention asks for under the interpreter): the long splits alone.
    assert default_num_splits(1, 1, 192, 64, short=False) == 1
    assert default_num_splits(1, 2, 512, 64, short=False) == 2
    assert default_num_splits(1, 1, 32768, 64, short=False) == 64
    assert all(1 <= default_num_splits(b, h, k, n) <= 64
               for b in (1, 7, 64) for h in (1, 2) for k in (0, 1, 255, 10**6) for n in (16, 64))


def nan_split_buffers(monkeypatch):
    """Decode's partial-output buffers filled with NaN: a merge that reads a split the split
    kernel did not write (an empty one), or a split kernel that skips one the merge reads,
    makes the output NaN."""
    import optimized.kernels.attention as attn

    def filled(*args):
        return tuple(t.fill_(float("nan")) for t in split_buffers(*args))

    split_buffers = attn._split_buffers
    monkeypatch.setattr(attn, "_split_buffers", filled)


@pytest.mark.parametrize("window", [None, 7, 40])
@pytest.mark.parametrize("num_splits", [None, 5, 64, 70])
def test_decode_short_contexts_over_a_full_width_table(window, num_splits, monkeypatch, device):
    """As a decode graph sees it: the page table at full width (256 pages of 4, mostly page 0),
    requests of 0 to 61 keys, so the default split count is 64 and most splits are empty; split
    counts above the number of key blocks (16 keys each at D=16). Partial buffers start as NaN."""
    nan_split_buffers(monkeypatch)
    gen = torch.Generator().manual_seed(8000 + 3 * (window or 0) + (num_splits or 0))
    seq_lens, page_size, hkv, hq, d = [1, 0, 17, 61, 33, 16], 4, 1, 4, 16
    live_from = [first_visible_key(max(s - 1, 0), window) for s in seq_lens]
    paged = build_paged(gen, seq_lens, live_from, hkv, d, page_size, torch.float32, device)
    wide = torch.zeros(len(seq_lens), 256, dtype=torch.int32, device=device)
    wide[:, : paged.page_table.shape[1]] = paged.page_table
    assert default_num_splits(len(seq_lens), hkv, 256 * page_size if window is None else window, 16) == \
        (22 if window is None else 3 if window == 40 else 1)
    q = torch.randn(len(seq_lens), hq, d, generator=gen).to(device)
    args = (q, paged.k_pool, paged.v_pool, wide, page_size, paged.seq_lens)
    got = decode_attention(*args, window=window, num_splits=num_splits)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # no key: zeros (the twin refuses the row)
    keep = torch.tensor([s > 0 for s in seq_lens], device=device)
    want = decode_attention_eager(q[keep], paged.k_pool, paged.v_pool, wide[keep], page_size,
                                  paged.seq_lens[keep], window=window)
    assert_attention_close(got[keep], want, q, paged.k_pool, live_v(paged, live_from))
    single = decode_attention(*args, window=window, num_splits=1)
    torch.testing.assert_close(got, single, atol=5e-6, rtol=5e-6)


@pytest.mark.parametrize("d,window", [(16, None), (16, 21), (256, 70)])
def test_decode_batch_one_splits_by_block(d, window, monkeypatch, device):
    """Batch 1, the shape that left the GPU idle: the default splits run one key block each over a
    full-width table (a window's worth or 64 splits), and agree with the eager twin."""
    nan_split_buffers(monkeypatch)
    gen = torch.Generator().manual_seed(8100 + d + (window or 0))
    seq, page_size, hkv, hq = 190, 16, 1, 8
    live = [first_visible_key(seq - 1, window)]
    paged = build_paged(gen, [seq], live, hkv, d, page_size, torch.float32, device)
    wide = torch.zeros(1, 64, dtype=torch.int32, device=device)  # 1024 keys of capacity
    wide[:, : paged.page_table.shape[1]] = paged.page_table
    q = torch.randn(1, hq, d, generator=gen).to(device)
    args = (q, paged.k_pool, paged.v_pool, wide, page_size, paged.seq_lens)
    assert_attention_close(decode_attention(*args, window=window), decode_attention_eager(*args, window=window),
                           q, paged.k_pool, live_v(paged, live))


PREFILL_CHUNKS = [3, 29, 1, 47, 16]  # 96 tokens: tiles of 8 tokens (D=16, G=2) cut at odd places


@pytest.mark.parametrize("window", [None, 3, 9, 20, 40])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_extend_unmasked_interior(window, softcap, monkeypatch, device):
    """Extend's key loop in masked edges and an unmasked interior: a chunked prefill (each chunk's
    earlier keys in the pool, pages before its window evicted) long enough for tiles with several
    interior blocks, windows shorter and longer than a tile, matches the eager twin; and the same
    kernel with every block masked (EXTEND_UNMASKED_INTERIOR False) agrees to float32 rounding
    (bitwise where no fused multiply-add is formed, as under the interpreter)."""
    import optimized.kernels.attention as attn

    gen = torch.Generator().manual_seed(8200 + (window or 0) + int(softcap or 0))
    S, page_size, hkv, hq, d = sum(PREFILL_CHUNKS), 4, 1, 2, 16
    paged = build_paged(gen, [S], [0], hkv, d, page_size, torch.float32, device, evict=False)
    q = torch.randn(S, hq, d, generator=gen).to(device)
    outs, want, end = [], [], 0
    for n in PREFILL_CHUNKS:
        end += n
        table = paged.page_table.clone()
        table[0, : first_visible_key(end - n, window) // page_size] = 0
        a = (q[end - n:end], paged.k_pool, paged.v_pool, table, page_size, i32([0, n], device), i32([end], device))
        outs.append(extend_attention(*a, window=window, softcap=softcap))
        want.append(extend_attention_eager(*a, window=window, softcap=softcap))
        monkeypatch.setattr(attn, "EXTEND_UNMASKED_INTERIOR", False)
        masked = extend_attention(*a, window=window, softcap=softcap)
        monkeypatch.setattr(attn, "EXTEND_UNMASKED_INTERIOR", True)
        torch.testing.assert_close(outs[-1], masked, atol=5e-6, rtol=5e-6)
        if device.type == "cpu":
            assert torch.equal(outs[-1], masked)
    assert_attention_close(torch.cat(outs), torch.cat(want), q, paged.k_pool, paged.v[0], softcap)


@pytest.mark.parametrize("d,window", [(256, 70), (512, None)])
def test_extend_unmasked_interior_real_head_dims(d, window, device):
    """The real head sizes and block tables (bf16): a 150-token prefill on a 60-token prefix has
    interior blocks in every tile; the kernel matches its eager twin."""
    gen = torch.Generator().manual_seed(8300 + d)
    prefix, n, page_size, hkv, hq = 60, 150, 16, 1, 8
    seq_lens = [prefix + n]
    live = [first_visible_key(prefix, window)]
    paged = build_paged(gen, seq_lens, live, hkv, d, page_size, torch.bfloat16, device)
    q = make_q(gen, n, hq, hkv, d, torch.bfloat16, "fused_qkv", device)
    args = (paged.page_table, page_size, i32([0, n], device), paged.seq_lens)
    got = extend_attention(q, paged.k_pool, paged.v_pool, *args, window=window)
    want = extend_attention_eager(*upcast(q, paged.k_pool, paged.v_pool), *args, window=window)
    assert_attention_close(got, want, q, paged.k_pool, live_v(paged, live))


# ------------------------------------------------------------------------------------------
# Fewer compiled variants (design note 34): bucketed block sizes, unspecialized int arguments
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 2, 5, 16, 17, 64, 65])
def test_bucketed_block_b_changes_no_result(batch, monkeypatch, device):
    """Extend at batch sizes in and across BLOCK_B's buckets (64 and 128 lanes), fresh random
    inputs each: the kernel matches its eager twin and is bitwise what it gave with BLOCK_B the
    batch's own power of two (the old launch): BLOCK_B only sizes the per-request segment search."""
    import optimized.kernels.attention as attn

    gen = torch.Generator().manual_seed(5000 + batch)
    page_size, hkv, hq, d, window = 4, 1, 2, 16, 6
    ext = torch.randint(0, 4, (batch,), generator=gen).tolist()  # 0 new tokens is allowed
    seq_lens = [e + p for e, p in zip(ext, torch.randint(0, 9, (batch,), generator=gen).tolist())]
    live_from = [first_visible_key(s - e, window) for s, e in zip(seq_lens, ext)]
    paged = build_paged(gen, seq_lens, live_from, hkv, d, page_size, torch.float32, device)
    q = torch.randn(sum(ext), hq, d, generator=gen).to(device)
    cu = i32([0] + ext, device).cumsum(0, dtype=torch.int32)
    args = (q, paged.k_pool, paged.v_pool, paged.page_table, page_size, cu, paged.seq_lens)
    got = extend_attention(*args, window=window)
    assert attn.extend_block_b(batch) == max(64, triton.next_power_of_2(batch))
    assert_attention_close(got, extend_attention_eager(*args, window=window), q, paged.k_pool,
                           live_v(paged, live_from))
    monkeypatch.setattr(attn, "MIN_BLOCK_B", 1)
    assert attn.extend_block_b(batch) == triton.next_power_of_2(batch)
    assert torch.equal(extend_attention(*args, window=window), got)


@pytest.mark.parametrize("window", [None, 5])
def test_extend_tile_order_changes_no_result(window, monkeypatch, device):
    """Extend's tiles started last first (EXTEND_LONGEST_FIRST) over a batch of requests with
    prefixes, empty extends and several tiles each: the kernel matches its eager twin and is
    bitwise what id order gives: the order moves tiles between programs, not any tile's math."""
    import optimized.kernels.attention as attn

    gen = torch.Generator().manual_seed(5100 + (window or 0))
    page_size, hkv, hq, d = 4, 2, 4, 16
    ext = [19, 0, 7, 33, 1]
    seq_lens = [e + p for e, p in zip(ext, [0, 5, 12, 3, 40])]
    live_from = [first_visible_key(s - e, window) for s, e in zip(seq_lens, ext)]
    paged = build_paged(gen, seq_lens, live_from, hkv, d, page_size, torch.float32, device)
    q = torch.randn(sum(ext), hq, d, generator=gen).to(device)
    cu = i32([0] + ext, device).cumsum(0, dtype=torch.int32)
    args = (q, paged.k_pool, paged.v_pool, paged.page_table, page_size, cu, paged.seq_lens)
    assert attn.EXTEND_LONGEST_FIRST
    got = extend_attention(*args, window=window)
    assert_attention_close(got, extend_attention_eager(*args, window=window), q, paged.k_pool,
                           live_v(paged, live_from))
    monkeypatch.setattr(attn, "EXTEND_LONGEST_FIRST", False)
    assert torch.equal(extend_attention(*args, window=window), got)


@pytest.mark.parametrize("num_splits", [2, 3, 9, 64, 70])
def test_bucketed_block_s_changes_no_result(num_splits, monkeypatch, device):
    """Decode's merge at split counts under and over its 64 lanes: bitwise what the merge gave
    with BLOCK_S the split count's own power of two, and the eager twin's result."""
    import optimized.kernels.attention as attn

    gen = torch.Generator().manual_seed(6000 + num_splits)
    seq_lens, page_size, hkv, hq, d = [3, 40, 77], 4, 1, 2, 16
    live_from = [0] * len(seq_lens)
    paged = build_paged(gen, seq_lens, live_from, hkv, d, page_size, torch.float32, device)
    q = torch.randn(len(seq_lens), hq, d, generator=gen).to(device)
    args = (q, paged.k_pool, paged.v_pool, paged.page_table, page_size, paged.seq_lens)
    got = decode_attention(*args, num_splits=num_splits)
    assert_attention_close(got, decode_attention_eager(*args), q, paged.k_pool, live_v(paged, live_from))
    monkeypatch.setattr(attn, "MIN_BLOCK_S", 1)
    assert torch.equal(decode_attention(*args, num_splits=num_splits), got)


def test_unspecialized_arguments_are_kernel_parameters():
    """do_not_specialize silently ignores a name the kernel does not have: every name must be a
    parameter of its kernel, and the kernel (compiled or interpreted) must have been given it."""
    import inspect

    import optimized.kernels.attention as attn

    for kernel, names in ((attn._extend_kernel, attn._EXTEND_DYNAMIC), (attn._decode_split_kernel, attn._DECODE_DYNAMIC),
                          (attn._decode_merge_kernel, attn._MERGE_DYNAMIC)):
        params = list(inspect.signature(kernel.fn).parameters)
        assert names and set(names) <= set(params), (kernel.fn.__name__, names)
        if hasattr(kernel, "params"):  # compiled: JITFunction
            assert {p.name for p in kernel.params if p.do_not_specialize} == set(names)
        else:  # the interpreter's InterpretedFunction keeps the decorator's arguments
            assert tuple(kernel.kwargs["do_not_specialize"]) == tuple(names)


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------

def _valid_inputs(op, device):
    """Good arguments for `op`: 2 requests, 5 new tokens for extend, 2 queries for decode."""
    gen = torch.Generator().manual_seed(7000)
    paged = build_paged(gen, [6, 3], [0, 0], 2, 16, 2, torch.float32, device)
    n = 2 if op.startswith("decode") else 5
    a = dict(q=torch.randn(n, 4, 16, generator=gen).to(device), k_pool=paged.k_pool, v_pool=paged.v_pool,
             page_table=paged.page_table, page_size=2, seq_lens=paged.seq_lens)
    if not op.startswith("decode"):
        a["cu_seqlens_q"] = i32([0, 3, 5], device)
    return a


def _n(a):
    return a["q"].shape[0]


def _randn(a, *shape):
    """A replacement input on the valid inputs' device (only the mutated property is wrong)."""
    return torch.randn(*shape, device=a["q"].device)


def _empty(a, *shape, **kw):
    return torch.empty(*shape, device=a["q"].device, **kw)


BAD = {  # name: (mutation of valid arguments, expected message)
    "q 2-D": (lambda a: a.update(q=a["q"][:, 0]), "q must be a 3-D"),
    "int dtype": (lambda a: a.update(q=a["q"].int()), "q has dtype"),
    "float64 (twins only)": (lambda a: a.update(q=a["q"].double(), k_pool=a["k_pool"].double(),
                                                v_pool=a["v_pool"].double()), "q has dtype"),
    "dtype mismatch": (lambda a: a.update(q=a["q"].half()), "dtypes differ"),
    "q last dim strided": (lambda a: a.update(q=_randn(a, _n(a), 4, 32)[:, :, ::2]), "contiguous last dim"),
    "head dim mismatch": (lambda a: a.update(q=_randn(a, _n(a), 4, 32)), "head dim of q"),
    "head dim not pow2": (lambda a: a.update(q=_randn(a, _n(a), 4, 24), k_pool=_randn(a, 9, 2, 24),
                                             v_pool=_randn(a, 9, 2, 24)), "power of two"),
    "heads not multiple": (lambda a: a.update(q=_randn(a, _n(a), 3, 16)), "multiple of kv heads"),
    "k/v shapes differ": (lambda a: a.update(v_pool=a["v_pool"][:-1]), "differ in shape"),
    "page_table int64": (lambda a: a.update(page_table=a["page_table"].long()), "page_table must be"),
    "page_size 0": (lambda a: a.update(page_size=0), "page_size must be"),
    "seq_lens int64": (lambda a: a.update(seq_lens=a["seq_lens"].long()), "seq_lens must be"),
    "seq_lens length": (lambda a: a.update(seq_lens=a["seq_lens"][:1]), "seq_lens must have 2"),
    "window 0": (lambda a: a.update(window=0), "window must be"),
    "softcap negative": (lambda a: a.update(softcap=-1.0), "softcap must be"),
    "out wrong shape": (lambda a: a.update(out=_empty(a, _n(a), 4, 8)), "out must be"),
    "out wrong dtype": (lambda a: a.update(out=_empty(a, _n(a), 4, 16, dtype=torch.bfloat16)), "out must match"),
    "device mismatch": (lambda a: a.update(seq_lens=a["seq_lens"].to("meta")), "seq_lens is on meta"),
}
OPS = {"extend": extend_attention, "extend_eager": extend_attention_eager,
       "decode": decode_attention, "decode_eager": decode_attention_eager}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise(op, case, device):
    if case.startswith("float64") and op.endswith("eager"):
        pytest.skip("the eager twins compute float64 inputs in float64")
    a = _valid_inputs(op, device)
    mutate, message = BAD[case]
    mutate(a)
    with pytest.raises(ValueError, match=message):
        OPS[op](**a)


@pytest.mark.parametrize("op", ["extend", "extend_eager"])
def test_bad_cu_seqlens_raise(op, device):
    a = _valid_inputs(op, device)
    with pytest.raises(ValueError, match="cu_seqlens_q must have 3"):
        OPS[op](**{**a, "cu_seqlens_q": a["cu_seqlens_q"][:2]})
    with pytest.raises(ValueError, match="cu_seqlens_q must be a 1-D int32"):
        OPS[op](**{**a, "cu_seqlens_q": a["cu_seqlens_q"].long()})


@pytest.mark.parametrize("op", ["decode", "decode_eager"])
def test_decode_rows_must_match_batch(op, device):
    a = _valid_inputs(op, device)
    with pytest.raises(ValueError, match="decode q has 3 rows"):
        OPS[op](**{**a, "q": torch.randn(3, 4, 16, device=device)})


@pytest.mark.parametrize("num_splits", [0, -1, 1.5])
def test_bad_num_splits(num_splits, device):
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(**_valid_inputs("decode", device), num_splits=num_splits)


def test_eager_checks_metadata_values(device):
    a = _valid_inputs("extend_eager", device)
    with pytest.raises(ValueError, match="cu_seqlens_q must rise"):
        extend_attention_eager(**{**a, "cu_seqlens_q": i32([0, 3, 4], device)})
    with pytest.raises(ValueError, match="new tokens but seq_len"):
        extend_attention_eager(**{**a, "seq_lens": i32([6, 1], device)})
    with pytest.raises(ValueError, match="pages"):
        extend_attention_eager(**{**a, "seq_lens": i32([60, 3], device)})


# ------------------------------------------------------------------------------------------
# Compiled for a GPU: the interpreter accepts code the compiler refuses (tests/test_fused_kernels.py)
# ------------------------------------------------------------------------------------------

def test_attention_kernels_compile_for_a_gpu():
    """Extend (with the unmasked interior and last-first tiles, and with neither), decode's split kernel (FINAL and partial)
    and merge compile for sm_90 with the bf16 table settings of head sizes 256 and 512
    (tests/sm90.py says why)."""
    check_compiles("""
        from optimized.kernels import attention as a
        t = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", o_ptr="*bf16", page_table_ptr="*i32",
                 cu_q_ptr="*i32", seq_lens_ptr="*i32", softcap="fp32", lse_ptr="*fp32", part_ptr="*fp32")
        dot = dict(DOT_DTYPE=tl.bfloat16, DOT_PRECISION=None)
        for d in (256, 512):  # the bf16 table entries of Gemma 4's head sizes, sliding (windowed) and full
            bm, bn, w, st = a._EXTEND_BLOCKS[2][d]
            for interior in (True, False):
                compile_for_sm90(a._extend_kernel, t, dict(
                    G=8, D=d, TOKENS=bm // 8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_B=64, HAS_WINDOW=d == 256,
                    HAS_SOFTCAP=False, UNMASKED_INTERIOR=interior, LONGEST_FIRST=interior, **dot),
                    num_warps=w, num_stages=st)
            bn, w, st = a._DECODE_BLOCKS[2][d]
            for final in (True, False):
                compile_for_sm90(a._decode_split_kernel, dict(t, o_ptr="*bf16" if final else "*fp32"), dict(
                    G=8, D=d, BLOCK_H=16, BLOCK_N=bn, HAS_WINDOW=d == 256, HAS_SOFTCAP=False, FINAL=final, **dot),
                    num_warps=w, num_stages=st)
            compile_for_sm90(a._decode_merge_kernel, t, dict(D=d, BLOCK_S=64, BLOCK_N=bn, HAS_WINDOW=d == 256),
                             num_warps=4, num_stages=3)
    """, timeout=600)
