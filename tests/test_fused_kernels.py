"""Property tests: each fused elementwise/normalization kernel against its eager twin.

The twins are the reference's own op sequences (reference.model), so "kernel == twin" means
"kernel == what the reference computes". Hypothesis draws shapes, strides, weights and seeds;
torch draws the values from the seed. Sizes stay small: under Triton's interpreter every program
costs milliseconds.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, strategies as st

from optimized.kernels import INTERPRETING, activation, attention, default_device, norms, rope
from optimized.kernels.common import tanh_f32
from reference.config import RopeSpec
from reference.model import apply_rope as reference_apply_rope, rope_cos_sin, rope_inv_freq
from tests.sm90 import check_compiles

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WIDTHS = [16, 32, 64, 96, 192, 24, 40, 100]  # the tiny presets' widths and a few odd ones
HEAD_DIMS = [16, 32, 64, 96, 24]
EPS = 1e-6
DEVICE = default_device()  # the interpreter on a CPU-only machine
SENTINEL = -77.0  # exact in every dtype; no kernel output here lands on it

seeds = st.integers(0, 2**31 - 1)
rows_ = st.integers(1, 40)


# -- tolerance ---------------------------------------------------------------------------------

def ulp(t: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of t's dtype at |t|, as float64."""
    fi = torch.finfo(t.dtype)
    mag = t.double().abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, slack: torch.Tensor | float = 0.0) -> None:
    """The kernel agrees with its twin up to the noise the two legitimately differ by.

    Both compute in float32 in the same op order and round to the storage dtype at the same
    points; they differ only in float32 details (the order of the sum of squares, the tanh,
    cos and sin implementations): a few float32 ULP. Hence:
    - float32: within 8 ULP of the twin;
    - float16/bfloat16: within 1 ULP of the twin's dtype (one rounding on store, of float32
      values a few float32 ULP apart), and almost every element bit-identical: those few ULP
      move a 16-bit rounding only when they straddle a rounding boundary, about 1e-4 of the
      time. A kernel that skipped one of the twin's intermediate roundings would differ on a
      large fraction of elements and fail here.
    `slack` is what a one-ULP flip of a rounded intermediate (a normed branch before an add, a
    cos rounded to the dtype) can propagate to each output element; tests build it from the
    twin's own intermediates. It scales with the same factor as the ULP bound.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a, e = actual.double(), expected.double()
    assert torch.equal(a.isnan(), e.isnan()), "NaNs differ"
    same = (a == e) | (a.isnan() & e.isnan())
    err = torch.where(same, 0.0, (a - e).abs())
    factor = 8 if expected.dtype == torch.float32 else 1
    bound = factor * (ulp(expected) + slack)
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(f"{int((err > bound).sum())} elements beyond tolerance; worst at flat index {i}: "
                             f"kernel {a.flatten()[i].item()!r}, twin {e.flatten()[i].item()!r}, "
                             f"bound {bound.flatten()[i].item():.3g}")
    if expected.dtype != torch.float32:
        mismatched = int((~same).sum())
        assert mismatched <= 1 + actual.numel() // 100, f"{mismatched} of {actual.numel()} elements not bit-identical"


def inv_rms(x: torch.Tensor) -> torch.Tensor:
    return (x.double().pow(2).mean(-1, keepdim=True) + EPS).rsqrt()


# -- inputs --------------------------------------------------------------------------------------

def randn(gen: torch.Generator, rows: int, width: int, dtype: torch.dtype, *, strided: bool, scale: float = 1.0):
    """[rows, width]; with strided=True a column slice of a wider tensor (row stride > width)."""
    pad = 24 if strided else 0
    base = (torch.randn(rows, width + pad, generator=gen) * scale).to(DEVICE, dtype)
    return base[:, 8:8 + width] if strided else base


def norm_weight(gen: torch.Generator, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Around 1 +- 0.5, never all ones: a (1 + w) norm would stand out."""
    return (0.5 + torch.rand(width, generator=gen)).to(DEVICE, dtype)


def fused_qkv(gen, T, hq, hkv, d, dtype, scale=1.0):
    """q [T, Hq, D], k, v [T, Hkv, D] as head views of column slices of one fused projection."""
    fused = randn(gen, T, (hq + 2 * hkv) * d, dtype, strided=True, scale=scale)
    q = fused[:, :hq * d].view(T, hq, d)
    k = fused[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    v = fused[:, (hq + hkv) * d:].view(T, hkv, d)
    return q, k, v


# -- norms -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, rows=rows_, width=st.sampled_from(WIDTHS), heads=st.integers(0, 3),
       weighted=st.booleans(), strided=st.booleans())
def test_rms_norm(dtype, seed, rows, width, heads, weighted, strided):
    gen = torch.Generator().manual_seed(seed)
    if heads:  # [T, heads, D] head view of a wider projection
        x = randn(gen, rows, heads * width, dtype, strided=strided).view(rows, heads, width)
    else:
        x = randn(gen, rows, width, dtype, strided=strided)
    w = norm_weight(gen, width, dtype) if weighted else None
    assert_matches(norms.rms_norm(x, w, EPS), norms.rms_norm_eager(x, w, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, rows=rows_, width=st.sampled_from(WIDTHS), norm_x=st.booleans(), strided=st.booleans())
def test_add_rms_norm(dtype, seed, rows, width, norm_x, strided):
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, rows, width, dtype, strided=strided, scale=3.0)
    residual = randn(gen, rows, width, dtype, strided=strided, scale=2.0)
    w, x_w = norm_weight(gen, width, dtype), norm_weight(gen, width, dtype) if norm_x else None

    new_res, out = norms.add_rms_norm(x, residual, w, EPS, x_weight=x_w)
    want_res, want_out = norms.add_rms_norm_eager(x, residual, w, EPS, x_weight=x_w)
    # A flip of the normed x moves the sum by its ULP (plus the sum's own rounding), and the
    # second norm scales that by w / rms.
    res_slack = ulp(norms.rms_norm_eager(x, x_w, EPS)) + ulp(want_res) if norm_x else 0.0
    assert_matches(new_res, want_res, res_slack)
    assert_matches(out, want_out, res_slack * w.double().abs() * inv_rms(want_res))


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, T=st.integers(1, 12), hq=st.integers(1, 4), hkv=st.integers(1, 2),
       d=st.sampled_from(HEAD_DIMS), mode=st.sampled_from(["qkv", "k_eq_v", "q_only"]))
def test_qkv_norm(dtype, seed, T, hq, hkv, d, mode):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = fused_qkv(gen, T, hq, hkv, d, dtype, scale=4.0)
    q_w, k_w = norm_weight(gen, d, dtype), norm_weight(gen, d, dtype)
    if mode == "k_eq_v":  # full layers without v_proj: V is the raw key projection
        v = k
    if mode == "q_only":  # KV-shared layers
        k = v = k_w = None
    got = norms.qkv_norm(q, k, v, q_w, k_w, EPS)
    want = norms.qkv_norm_eager(q, k, v, q_w, k_w, EPS)
    for g, e in zip(got, want):
        if e is None:
            assert g is None
        else:
            assert g.is_contiguous()
            assert_matches(g, e)


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, rows=rows_, width=st.sampled_from(WIDTHS), moe=st.booleans(),
       scaled=st.booleans(), strided=st.booleans())
def test_post_ffn_residual_scale(dtype, seed, rows, width, moe, scaled, strided):
    gen = torch.Generator().manual_seed(seed)
    m, m2 = (randn(gen, rows, width, dtype, strided=strided, scale=5.0) for _ in range(2))
    residual = randn(gen, rows, width, dtype, strided=strided, scale=2.0)
    w, w1, w2 = (norm_weight(gen, width, dtype) for _ in range(3))
    s = (0.25 + 1.5 * torch.rand(1, generator=gen)).to(DEVICE, dtype) if scaled else None

    if moe:
        got = norms.post_ffn_moe_residual_scale(m, m2, residual, w1, w2, w, EPS, s, return_normed=True)
        want = norms.post_ffn_moe_residual_scale_eager(m, m2, residual, w1, w2, w, EPS, s, return_normed=True)
        # Flips of the two normed branches move their sum, and the shared norm scales that by w / rms.
        a, b = norms.rms_norm_eager(m, w1, EPS), norms.rms_norm_eager(m2, w2, EPS)
        normed_slack = (ulp(a) + ulp(b) + ulp(a + b)) * w.double().abs() * inv_rms(a + b)
    else:
        got = norms.post_ffn_residual_scale(m, residual, w, EPS, s, return_normed=True)
        want = norms.post_ffn_residual_scale_eager(m, residual, w, EPS, s, return_normed=True)
        normed_slack = 0.0
    (out, normed), (want_out, want_normed) = got, want
    assert_matches(normed, want_normed, normed_slack)
    # A flip of the normed branch moves the sum by its ULP, plus the sum's rounding before * scalar.
    sum_slack = normed_slack + ulp(want_normed)
    if s is not None:
        sum_slack = (sum_slack + ulp(residual + want_normed)) * s.double().abs()
    assert_matches(out, want_out, sum_slack)
    plain = (norms.post_ffn_moe_residual_scale(m, m2, residual, w1, w2, w, EPS, s) if moe
             else norms.post_ffn_residual_scale(m, residual, w, EPS, s))
    assert torch.equal(plain, out)


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, rows=rows_, width=st.sampled_from(WIDTHS), moe=st.booleans(), normed=st.booleans())
def test_the_pass_that_ends_a_layer_also_norms_its_output_for_the_next(dtype, seed, rows, width, moe, normed):
    """next_weight: the next layer's input norm (or the final norm) of the pass's own stored output,
    in the same launch; the output (and the normed branch) are those of the call without it."""
    gen = torch.Generator().manual_seed(seed)
    m, m2 = (randn(gen, rows, width, dtype, strided=True, scale=5.0) for _ in range(2))
    residual = randn(gen, rows, width, dtype, strided=False, scale=2.0)
    w, w1, w2, nxt = (norm_weight(gen, width, dtype) for _ in range(4))
    s = (0.25 + 1.5 * torch.rand(1, generator=gen)).to(DEVICE, dtype)
    if moe:
        got = norms.post_ffn_moe_residual_scale(m, m2, residual, w1, w2, w, EPS, s, return_normed=normed,
                                                next_weight=nxt)
        plain = norms.post_ffn_moe_residual_scale(m, m2, residual, w1, w2, w, EPS, s, return_normed=True)
    else:
        got = norms.post_ffn_residual_scale(m, residual, w, EPS, s, return_normed=normed, next_weight=nxt)
        plain = norms.post_ffn_residual_scale(m, residual, w, EPS, s, return_normed=True)
    out, got_normed, next_h = got
    assert torch.equal(out, plain[0])
    assert torch.equal(got_normed, plain[1]) if normed else got_normed is None
    assert_matches(next_h, norms.rms_norm_eager(out, nxt, EPS))


# -- activations -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, rows=rows_, width=st.sampled_from(WIDTHS), fused=st.booleans())
def test_gelu_tanh_mul(dtype, seed, rows, width, fused):
    gen = torch.Generator().manual_seed(seed)
    if fused:  # the two halves of one gate_up projection
        gate_up = randn(gen, rows, 2 * width, dtype, strided=False, scale=2.0)
        gate, up = gate_up[:, :width], gate_up[:, width:]
    else:
        gate = randn(gen, rows, width, dtype, strided=True, scale=2.0)
        up = randn(gen, rows, width, dtype, strided=True, scale=2.0)
    want = activation.gelu_tanh_mul_eager(gate, up)
    # gelu = 0.5 x (1 + tanh(.)): a float32 ULP of tanh near +-1 is 2^-24, and where 1 + tanh
    # cancels (x < -1) that absolute error, times 0.5 |x|, is all either side can promise.
    g = activation.gelu_tanh_mul_eager(gate, torch.ones_like(up))
    slack = up.double().abs() * (ulp(g) + gate.double().abs() * 2.0**-23)
    assert_matches(activation.gelu_tanh_mul(gate, up), want, slack)


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, rows=rows_, width=st.sampled_from(WIDTHS + [1000, 1500]), cap=st.sampled_from([30.0, 15.0, 2.5]),
       strided=st.booleans(), in_place=st.booleans())
def test_softcap(dtype, seed, rows, width, cap, strided, in_place):
    gen = torch.Generator().manual_seed(seed)
    logits = randn(gen, rows, width, dtype, strided=strided, scale=25.0)
    want = activation.softcap_eager(logits, cap)
    t = torch.tanh(logits / cap)
    if in_place:
        got = activation.softcap(logits, cap, out=logits)
        assert got is logits
    else:
        got = activation.softcap(logits, cap)
    assert_matches(got, want, cap * ulp(t))


@triton.jit
def _tanh_f32_kernel(x, out, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + i, tanh_f32(tl.load(x + i, mask=i < n, other=0.0)), mask=i < n)


def _f32_range(lo: float, hi: float, stride: int) -> torch.Tensor:
    """Every `stride`-th float32 in [lo, hi) (0 <= lo < hi), by bit pattern."""
    bits = torch.tensor([lo, hi], dtype=torch.float32).view(torch.int32).tolist()
    return torch.arange(bits[0], bits[1], stride, dtype=torch.int32).view(torch.float32)


def test_tanh_f32_is_within_2_ulp_of_the_correctly_rounded_tanh():
    """tanh_f32 (common.py) on a dense grid: float32 in [0, 12) at a stride (tiny values, the
    polynomial, the exp branch, saturation), every float32 near the branch switch at |z| = 0.55,
    both signs, and the special values. Within 2 ULP of float64 tanh rounded to float32, odd
    (bit for bit, zero aside: tanh_f32(-0) is +0), NaN stays NaN, +-inf gives +-1. The bound is the interpreter's
    (its tl.exp is numpy's, under 1 ULP); a GPU's tl.exp is ex2.approx (CUDA documents __expf
    within 2 + floor(1.173 |x|) ULP), which near the switch can add about 1.7 ULP: 4 there,
    a bound derived from that document, not measured."""
    pos = torch.cat([_f32_range(0.0, 12.0, 4099), _f32_range(0.545, 0.555, 1), _f32_range(0.3, 1.2, 257),
                     torch.tensor([0.0, 1e-45, 1e-38, 1e-20, 2.0**-12, 0.55, 9.0, 9.02, 10.0, 44.0, 88.0, 1e4, 3e38])])
    x = torch.cat([pos, -pos]).to(DEVICE)
    out = torch.empty_like(x)
    block = 4096
    _tanh_f32_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block)
    got, x = out.cpu(), x.cpu()
    want = torch.tanh(x.double()).float()

    def ordinal(t):  # float32 -> integers in float order (+0 and -0 both 0)
        i = t.view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    err = (ordinal(got) - ordinal(want)).abs()
    bound = 2 if INTERPRETING else 4
    worst = int(err.argmax())
    assert int(err.max()) <= bound, f"{int(err.max())} ULP at {x[worst].item()!r}: {got[worst].item()!r} " \
                                    f"vs {want[worst].item()!r}"
    n = pos.numel()
    nonzero = pos != 0
    assert torch.equal(got[n:][nonzero].view(torch.int32), (-got[:n][nonzero]).view(torch.int32)), "not odd"
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], device=DEVICE)
    out = torch.empty_like(specials)
    _tanh_f32_kernel[(1,)](specials, out, 4, BLOCK=4)
    got = out.cpu()
    assert got[0].isnan() and got[1].item() == 1.0 and got[2].item() == -1.0
    assert got[3].item() == 0.0


# -- RoPE --------------------------------------------------------------------------------------

ROPES = {
    "default": RopeSpec("default", 10_000.0),
    "proportional": RopeSpec("proportional", 1_000_000.0, partial_rotary_factor=0.25),
    "proportional_half": RopeSpec("proportional", 1_000_000.0, partial_rotary_factor=0.5),
}

positions_ = st.lists(st.one_of(st.integers(0, 4096), st.integers(0, 500_000), st.just(100_000)),
                      min_size=1, max_size=12)


def rope_slack(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """What a one-ULP flip of the dtype-rounded cos or sin moves x*cos + rotate_half(x)*sin by."""
    cos, sin = (t.unsqueeze(-2) for t in rope.rope_cos_sin_eager(positions, inv_freq, x.dtype))
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.double().abs() * ulp(cos) + ulp(x * cos) + rot.double().abs() * ulp(sin) + ulp(rot * sin))


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, positions=positions_, heads=st.integers(1, 8), d=st.sampled_from(HEAD_DIMS),
       kind=st.sampled_from(sorted(ROPES)), int32=st.booleans())
def test_apply_rope(dtype, seed, positions, heads, d, kind, int32):
    gen = torch.Generator().manual_seed(seed)
    T = len(positions)
    pos = torch.tensor(positions, dtype=torch.int32 if int32 else torch.int64, device=DEVICE)
    inv_freq = rope_inv_freq(ROPES[kind], d, device=DEVICE)
    q, k, _ = fused_qkv(gen, T, heads, 2, d, dtype, scale=3.0)
    for x in (q, k):
        assert_matches(rope.apply_rope(x, pos, inv_freq), rope.apply_rope_eager(x, pos, inv_freq),
                       rope_slack(x, pos, inv_freq))


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rope_twin_is_the_reference(kind):
    spec, d = ROPES[kind], 64
    pos = torch.tensor([0, 1, 7, 4095, 100_000, 499_999], device=DEVICE)
    x = torch.randn(len(pos), 3, d).to(DEVICE, torch.bfloat16)
    inv_freq = rope_inv_freq(spec, d, device=DEVICE)
    cos, sin = rope_cos_sin(spec, d, pos, x.dtype)
    assert torch.equal(rope.apply_rope_eager(x, pos, inv_freq), reference_apply_rope(x, cos, sin))
    if spec.kind == "proportional":  # only the pairs (i, i + d/2) with a nonzero frequency rotate
        n_rot = int(spec.partial_rotary_factor * d // 2)
        out = rope.apply_rope(x, pos, inv_freq)
        idle = [i for i in range(d) if i % (d // 2) >= n_rot]
        assert torch.equal(out[..., idle], x[..., idle])


# -- KV pool stores ----------------------------------------------------------------------------

def make_pools(num_slots, hkv, d, dtype, layout):
    """Two pools [num_slots, Hkv, D] filled with SENTINEL, each with the buffer it lives in: its
    own, one layer of a stacked [layers, ...] buffer, or a column view of a wider buffer (so the
    pool itself is non-contiguous)."""
    def one():
        if layout == "stacked":
            buffer = torch.full((3, num_slots, hkv, d), SENTINEL, dtype=dtype, device=DEVICE)
            return buffer[1], buffer
        if layout == "padded":
            buffer = torch.full((num_slots, hkv, d + 8), SENTINEL, dtype=dtype, device=DEVICE)
            assert not buffer[..., 4:4 + d].is_contiguous()
            return buffer[..., 4:4 + d], buffer
        buffer = torch.full((num_slots, hkv, d), SENTINEL, dtype=dtype, device=DEVICE)
        return buffer, buffer
    return one(), one()


store_cases = dict(seed=seeds, T=st.integers(1, 12), hkv=st.integers(1, 3), d=st.sampled_from(HEAD_DIMS),
                   layout=st.sampled_from(["contiguous", "stacked", "padded"]), int32=st.booleans(),
                   invalid=st.booleans())


def draw_slots(gen, T, num_slots, int32, invalid):
    """T distinct slot ids in [1, num_slots); with `invalid`, some replaced by ids the kernel must skip."""
    slots = torch.randperm(num_slots - 1, generator=gen)[:T] + 1
    if invalid:
        bad = torch.tensor([0, num_slots, num_slots + 5, -1])
        where = torch.rand(T, generator=gen) < 0.4
        slots = torch.where(where, bad[torch.randint(0, 4, (T,), generator=gen)], slots)
    return slots.to(DEVICE, torch.int32 if int32 else torch.int64)


def assert_only_slots_written(pool: torch.Tensor, buffer: torch.Tensor, slots: torch.Tensor) -> None:
    """Exactly the valid slots of `pool` changed, and nothing else in the buffer it lives in."""
    assert int((buffer != SENTINEL).sum()) == int((pool != SENTINEL).sum()), "wrote outside the pool view"
    valid = slots[(slots >= 1) & (slots < pool.shape[0])].long()
    untouched = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
    untouched[valid] = False
    assert bool((pool[untouched] == SENTINEL).all()), "a slot outside out_slots was written"
    assert bool((pool[valid] != SENTINEL).any(-1).all()), "a slot in out_slots was not written"


@pytest.mark.parametrize("dtype", DTYPES)
@given(kind=st.sampled_from(sorted(ROPES)), positions=positions_, **store_cases)
def test_rope_and_store_kv(dtype, seed, T, hkv, d, layout, int32, invalid, kind, positions):
    gen = torch.Generator().manual_seed(seed)
    positions = (positions * T)[:T]
    pos = torch.tensor(positions, dtype=torch.int32 if int32 else torch.int64, device=DEVICE)
    inv_freq = rope_inv_freq(ROPES[kind], d, device=DEVICE)
    _, k, v = fused_qkv(gen, T, 2, hkv, d, dtype, scale=3.0)
    num_slots = 2 * T + 3
    slots = draw_slots(gen, T, num_slots, int32, invalid)
    (k_pool, k_buffer), (v_pool, v_buffer) = make_pools(num_slots, hkv, d, dtype, layout)
    want_k, want_v = (p.clone() for p in (k_pool, v_pool))

    rope.rope_and_store_kv(k, v, pos, inv_freq, k_pool, v_pool, slots)
    rope.rope_and_store_kv_eager(k, v, pos, inv_freq, want_k, want_v, slots)
    assert_only_slots_written(k_pool, k_buffer, slots)
    assert_only_slots_written(v_pool, v_buffer, slots)
    assert torch.equal(v_pool, want_v)
    # the slack of the rotation, scattered to the pool rows the tokens landed in
    slack = torch.zeros(k_pool.shape, dtype=torch.float64, device=DEVICE)
    ok = (slots >= 1) & (slots < num_slots)
    slack[slots[ok].long()] = rope_slack(k, pos, inv_freq)[ok]
    assert_matches(k_pool, want_k, slack)


@pytest.mark.parametrize("dtype", DTYPES)
@given(**store_cases)
def test_store_kv(dtype, seed, T, hkv, d, layout, int32, invalid):
    gen = torch.Generator().manual_seed(seed)
    _, k, v = fused_qkv(gen, T, 2, hkv, d, dtype)
    num_slots = 2 * T + 3
    slots = draw_slots(gen, T, num_slots, int32, invalid)
    (k_pool, k_buffer), (v_pool, v_buffer) = make_pools(num_slots, hkv, d, dtype, layout)
    want_k, want_v = (p.clone() for p in (k_pool, v_pool))

    rope.store_kv(k, v, k_pool, v_pool, slots)
    rope.store_kv_eager(k, v, want_k, want_v, slots)
    assert_only_slots_written(k_pool, k_buffer, slots)
    assert_only_slots_written(v_pool, v_buffer, slots)
    assert torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)  # a copy: bit for bit


@pytest.mark.parametrize("bad_slot", [0, -1, 9, 100])
@pytest.mark.parametrize("with_rope", [False, True])
def test_store_rejects_out_of_range_slots(bad_slot, with_rope):
    k = torch.randn(3, 2, 16, device=DEVICE)
    v = torch.randn(3, 2, 16, device=DEVICE)
    k_pool = torch.full((9, 2, 16), SENTINEL, device=DEVICE)
    v_pool = k_pool.clone()
    slots = torch.tensor([4, bad_slot, 2], device=DEVICE)
    pos, inv_freq = torch.arange(3, device=DEVICE), rope_inv_freq(ROPES["default"], 16, device=DEVICE)
    with pytest.raises(ValueError, match="out_slots"):
        if with_rope:
            rope.rope_and_store_kv(k, v, pos, inv_freq, k_pool, v_pool, slots, check=True)
        else:
            rope.store_kv(k, v, k_pool, v_pool, slots, check=True)
    assert bool((k_pool == SENTINEL).all() and (v_pool == SENTINEL).all()), "rejected call wrote to a pool"


# -- q/k/v norms + RoPE + KV store in one launch -----------------------------------------------

def epilogue_slack(x_normed: torch.Tensor, positions, inv_freq) -> torch.Tensor:
    """rope_slack of the normed rows, plus what a one-ULP flip of a normed element (kernel and
    twin round the norm to the dtype from float32 inverse RMS that may differ by an ULP) moves
    the rotation by: |cos| * ulp(x_i) + |sin| * ulp(x_j), j the element rotated into i."""
    cos, sin = (t.unsqueeze(-2).double().abs() for t in rope.rope_cos_sin_eager(positions, inv_freq, x_normed.dtype))
    half = x_normed.shape[-1] // 2
    flip = ulp(x_normed)
    return rope_slack(x_normed, positions, inv_freq) + cos * flip + sin * torch.cat([flip[..., half:], flip[..., :half]], -1)


def run_epilogue(fn, q, k, v, q_w, k_w, pos, inv_freq, pools, slots):
    (k_pool, _), (v_pool, _) = pools
    return fn(q, k, v, q_w, k_w, EPS, pos, inv_freq, k_pool, v_pool, slots)


def check_epilogue(q, k, v, q_w, k_w, pos, inv_freq, slots, num_slots, layout="contiguous"):
    """The fused kernel against its eager twin (and the pools against the twin's), every pool
    write inside the valid slots; on KV-shared layers (k = None) the pools untouched."""
    hkv, d, dtype = (1 if k is None else k.shape[1]), q.shape[-1], q.dtype
    pools, want_pools = (make_pools(num_slots, hkv, d, dtype, layout) for _ in range(2))
    got = run_epilogue(rope.qkv_norm_rope_store, q, k, v, q_w, k_w, pos, inv_freq, pools, slots)
    want = run_epilogue(rope.qkv_norm_rope_store_eager, q, k, v, q_w, k_w, pos, inv_freq, want_pools, slots)
    assert got.is_contiguous() and got.shape == q.shape
    q_normed, k_normed, _ = norms.qkv_norm_eager(q, k, v, q_w, k_w, EPS)
    assert_matches(got, want, epilogue_slack(q_normed, pos, inv_freq))
    (k_pool, k_buffer), (v_pool, v_buffer) = pools
    if k is None:
        for buffer in (k_buffer, v_buffer):
            assert bool((buffer == SENTINEL).all()), "a KV-shared layer wrote to a pool"
        return got
    assert_only_slots_written(k_pool, k_buffer, slots)
    assert_only_slots_written(v_pool, v_buffer, slots)
    ok = (slots >= 1) & (slots < num_slots)
    slack = torch.zeros(k_pool.shape, dtype=torch.float64, device=DEVICE)
    slack[slots[ok].long()] = epilogue_slack(k_normed, pos, inv_freq)[ok]
    assert_matches(k_pool, want_pools[0][0], slack)
    assert_matches(v_pool, want_pools[1][0])
    return got


MODES = ["qkv", "k_eq_v", "q_only"]  # sliding/full layers with v_proj; K=V full layers; KV-shared layers


def epilogue_inputs(gen, T, hq, hkv, d, dtype, mode):
    q, k, v = fused_qkv(gen, T, hq, hkv, d, dtype, scale=4.0)  # strided column views, as model.py passes them
    q_w, k_w = norm_weight(gen, d, dtype), norm_weight(gen, d, dtype)
    if mode == "k_eq_v":  # V is the raw key projection: the same view
        v = k
    if mode == "q_only":
        k = v = k_w = None
    return q, k, v, q_w, k_w


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, T=st.integers(1, 10), hq=st.integers(1, 4), hkv=st.integers(1, 2), d=st.sampled_from(HEAD_DIMS),
       mode=st.sampled_from(MODES), kind=st.sampled_from(sorted(ROPES)), positions=positions_,
       layout=st.sampled_from(["contiguous", "stacked", "padded"]), int32=st.booleans(), invalid=st.booleans())
def test_qkv_norm_rope_store(dtype, seed, T, hq, hkv, d, mode, kind, positions, layout, int32, invalid):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.tensor((positions * T)[:T], dtype=torch.int32 if int32 else torch.int64, device=DEVICE)
    inv_freq = rope_inv_freq(ROPES[kind], d, device=DEVICE)
    q, k, v, q_w, k_w = epilogue_inputs(gen, T, hq, hkv, d, dtype, mode)
    num_slots = 2 * T + 3
    slots = draw_slots(gen, T, num_slots, int32, invalid)
    check_epilogue(q, k, v, q_w, k_w, pos, inv_freq, slots, num_slots, layout)


# The real head sizes and head counts at a few tokens: E2B's sliding (256, default RoPE) and full
# (512, proportional) layers, its KV-shared layers, 31B's K=V full layers (32 query heads: several
# head groups per token) and its sliding layers (16 KV heads).
REAL_SHAPES = {
    "e2b-sliding": (8, 1, 256, "qkv", "default"),
    "e2b-full": (8, 1, 512, "qkv", "proportional"),
    "e2b-shared-sliding": (8, 1, 256, "q_only", "default"),
    "e2b-shared-full": (8, 1, 512, "q_only", "proportional"),
    "31b-full-k-eq-v": (32, 4, 512, "k_eq_v", "proportional"),
    "31b-sliding": (32, 16, 256, "qkv", "default"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", sorted(REAL_SHAPES))
def test_qkv_norm_rope_store_real_head_shapes(shape, dtype):
    hq, hkv, d, mode, kind = REAL_SHAPES[shape]
    gen = torch.Generator().manual_seed(len(shape))
    T = 3
    q, k, v, q_w, k_w = epilogue_inputs(gen, T, hq, hkv, d, dtype, mode)
    pos = torch.tensor([5, 4097, 131_000], device=DEVICE)
    inv_freq = rope_inv_freq(ROPES[kind], d, device=DEVICE)
    slots = torch.tensor([7, 2, 5], device=DEVICE)
    check_epilogue(q, k, v, q_w, k_w, pos, inv_freq, slots, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_qkv_norm_rope_store_matches_the_three_kernels_it_replaces(mode, dtype):
    """Against qkv_norm, apply_rope(q) and rope_and_store_kv, the launches the model made before:
    the same rounding points, so the two differ only where their float32 sums of squares do (the
    fused kernel sums each half, then adds the two), which a 16-bit rounding almost never sees.
    (Under the interpreter at the real head sizes they agreed bit for bit: design note 31.)"""
    gen = torch.Generator().manual_seed(3)
    T, hq, hkv, d, num_slots = 9, 4, 2, 64, 12
    q, k, v, q_w, k_w = epilogue_inputs(gen, T, hq, hkv, d, dtype, mode)
    pos = torch.randint(0, 200_000, (T,), generator=gen).to(DEVICE)
    inv_freq = rope_inv_freq(ROPES["proportional"], d, device=DEVICE)
    slots = draw_slots(gen, T, num_slots, False, True)
    pools, old_pools = (make_pools(num_slots, hkv, d, dtype, "contiguous") for _ in range(2))
    got = run_epilogue(rope.qkv_norm_rope_store, q, k, v, q_w, k_w, pos, inv_freq, pools, slots)
    qn, kn, vn = norms.qkv_norm(q, k, v, q_w, k_w, EPS)
    assert_matches(got, rope.apply_rope(qn, pos, inv_freq), epilogue_slack(qn, pos, inv_freq))
    if k is None:
        return
    (k_old, _), (v_old, _) = old_pools
    rope.rope_and_store_kv(kn, vn, pos, inv_freq, k_old, v_old, slots)
    ok = (slots >= 1) & (slots < num_slots)
    slack = torch.zeros(k_old.shape, dtype=torch.float64, device=DEVICE)
    slack[slots[ok].long()] = epilogue_slack(kn, pos, inv_freq)[ok]
    assert_matches(pools[0][0], k_old, slack)
    assert_matches(pools[1][0], v_old)


# -- input validation --------------------------------------------------------------------------

_x = torch.randn(4, 32, device=DEVICE)
_w = torch.ones(32, device=DEVICE)
_q = torch.randn(4, 2, 32, device=DEVICE)
_inv = rope_inv_freq(ROPES["default"], 32, device=DEVICE)
_pos = torch.arange(4, device=DEVICE)
_pool = torch.zeros(8, 2, 32, device=DEVICE)
_slots = torch.arange(1, 5, device=DEVICE)

BAD_CALLS = {
    "rms_norm float64": lambda: norms.rms_norm(_x.double(), None, EPS),
    "rms_norm int": lambda: norms.rms_norm(_x.int(), None, EPS),
    "rms_norm last dim strided": lambda: norms.rms_norm(_x.t(), None, EPS),
    "rms_norm 4-D": lambda: norms.rms_norm(_x.view(1, 1, 4, 32), None, EPS),
    "rms_norm weight size": lambda: norms.rms_norm(_x, torch.ones(16, device=DEVICE), EPS),
    "rms_norm weight device": lambda: norms.rms_norm(_x, torch.ones(32, device="meta"), EPS),
    "rms_norm eps": lambda: norms.rms_norm(_x, _w, -1.0),
    "add_rms_norm shapes": lambda: norms.add_rms_norm(_x, _x[:2], _w, EPS),
    "add_rms_norm dtypes": lambda: norms.add_rms_norm(_x, _x.half(), _w, EPS),
    "qkv_norm v without k": lambda: norms.qkv_norm(_q, None, _q, _w, None, EPS),
    "qkv_norm k without weight": lambda: norms.qkv_norm(_q, _q, _q, _w, None, EPS),
    "qkv_norm head size": lambda: norms.qkv_norm(_q, _q[..., :16], _q[..., :16], _w, _w[:16], EPS),
    "post_ffn scalar shape": lambda: norms.post_ffn_residual_scale(_x, _x, _w, EPS, _w[:2]),
    "post_ffn scalar dtype": lambda: norms.post_ffn_residual_scale(_x, _x, _w, EPS, _w[:1].half()),
    "post_ffn_moe missing weight": lambda: norms.post_ffn_moe_residual_scale(_x, _x, _x, _w, None, _w, EPS),
    "gelu_tanh_mul shapes": lambda: activation.gelu_tanh_mul(_x, _x[:, :16]),
    "softcap cap": lambda: activation.softcap(_x, 0.0),
    "softcap out shape": lambda: activation.softcap(_x, 30.0, out=_x[:2]),
    "rope odd head": lambda: rope.apply_rope(torch.randn(4, 2, 15, device=DEVICE), _pos, torch.ones(7, device=DEVICE)),
    "rope float positions": lambda: rope.apply_rope(_q, _pos.float(), _inv),
    "rope positions length": lambda: rope.apply_rope(_q, _pos[:3], _inv),
    "rope inv_freq dtype": lambda: rope.apply_rope(_q, _pos, _inv.double()),
    "rope inv_freq size": lambda: rope.apply_rope(_q, _pos, _inv[:8]),
    "store pool dtype": lambda: rope.store_kv(_q, _q, _pool.half(), _pool.half(), _slots),
    "store pool shape": lambda: rope.store_kv(_q, _q, _pool[:, :1], _pool[:, :1], _slots),
    "store slots dtype": lambda: rope.store_kv(_q, _q, _pool, _pool.clone(), _slots.float()),
    "store slots length": lambda: rope.store_kv(_q, _q, _pool, _pool.clone(), _slots[:3]),
    "epilogue v without k": lambda: rope.qkv_norm_rope_store(_q, None, _q, _w, None, EPS, _pos, _inv),
    "epilogue k without weight": lambda: rope.qkv_norm_rope_store(_q, _q, _q, _w, None, EPS, _pos, _inv, _pool,
                                                                  _pool.clone(), _slots),
    "epilogue k without pools": lambda: rope.qkv_norm_rope_store(_q, _q, _q, _w, _w, EPS, _pos, _inv),
    "epilogue k head size": lambda: rope.qkv_norm_rope_store(_q, _q[..., :16], _q[..., :16], _w, _w, EPS, _pos, _inv,
                                                             _pool, _pool.clone(), _slots),
    "epilogue k tokens": lambda: rope.qkv_norm_rope_store(_q, _q[:3], _q[:3], _w, _w, EPS, _pos, _inv, _pool,
                                                          _pool.clone(), _slots),
    "epilogue k dtype": lambda: rope.qkv_norm_rope_store(_q, _q.half(), _q.half(), _w, _w, EPS, _pos, _inv,
                                                         _pool.half(), _pool.half(), _slots),
    "epilogue pool dtype": lambda: rope.qkv_norm_rope_store(_q, _q, _q, _w, _w, EPS, _pos, _inv, _pool.half(),
                                                            _pool.half(), _slots),
    "epilogue q weight size": lambda: rope.qkv_norm_rope_store(_q, None, None, _w[:16], None, EPS, _pos, _inv),
    "epilogue eps": lambda: rope.qkv_norm_rope_store(_q, None, None, _w, None, -1.0, _pos, _inv),
    "epilogue positions length": lambda: rope.qkv_norm_rope_store(_q, None, None, _w, None, EPS, _pos[:3], _inv),
    "epilogue q last dim strided": lambda: rope.qkv_norm_rope_store(_q.transpose(1, 2).contiguous().transpose(1, 2),
                                                                    None, None, _w, None, EPS, _pos, _inv),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_rejects_bad_inputs(name):
    with pytest.raises(ValueError):
        BAD_CALLS[name]()


def test_empty_and_single_row_inputs():
    x = torch.randn(0, 32, device=DEVICE)
    assert norms.rms_norm(x, None, EPS).shape == (0, 32)
    assert activation.softcap(x, 30.0).shape == (0, 32)
    one = torch.randn(32, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.bfloat16)
    # Not bitwise: the kernel's and torch's sums of squares differ in order on every backend (and
    # compiled code may contract them into FMAs), which flips a bf16 rounding now and then.
    assert_matches(norms.rms_norm(one, None, EPS), norms.rms_norm_eager(one, None, EPS))
    empty = torch.randn(0, 2, 32, device=DEVICE)
    rope.store_kv(empty, empty, _pool, _pool.clone(), _slots[:0])
    assert rope.qkv_norm_rope_store(empty, empty, empty, _w, _w, EPS, _slots[:0], _inv, _pool, _pool.clone(),
                                    _slots[:0]).shape == (0, 2, 32)


def test_kernels_launched_from_two_threads_at_once_match_their_twins(device):
    """Two engines' worker threads launch kernels at the same time (the server tests do). Triton's
    interpreter patches triton.language globally for each launch; unserialized, launches from two
    threads failed with "Did you forget to add @triton.jit?" or "x >= grid_dim[0]"."""
    import threading

    gen = torch.Generator().manual_seed(11)
    inputs = [(torch.randn(7, 3, 32, generator=gen).to(device), torch.randn(32, generator=gen).to(device))
              for _ in range(2)]
    errors = []

    def launch(x, w):
        try:
            for _ in range(15):
                assert_matches(norms.rms_norm(x, w, EPS), norms.rms_norm_eager(x, w, EPS))
                g, u = x.flatten(1), x.flip(0).flatten(1)
                torch.testing.assert_close(activation.gelu_tanh_mul(g, u), activation.gelu_tanh_mul_eager(g, u))
        except Exception as e:  # reported below: an assertion in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=launch, args=xw) for xw in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.skipif(not INTERPRETING, reason="about Triton's interpreter, which runs only where no GPU is")
def test_an_interpreted_launch_patches_the_language_once_not_per_helper_call(device, monkeypatch):
    """optimized.kernels skips the interpreter's re-patching of triton.language on every @jit helper
    call inside a launch (a fifth of an interpreted launch's time). The results stay the twin's, the
    patching happens about once per launch rather than once per helper call, and afterwards
    triton.language is as it was."""
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    calls = []
    real = interpreter._patch_lang
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: calls.append(fn) or real(fn))
    before = tl.zeros
    q = torch.randn(9, 4, 16, device=device)
    pool_k, pool_v = torch.randn(12, 2, 16, device=device), torch.randn(12, 2, 16, device=device)
    table = torch.arange(12, dtype=torch.int32, device=device).view(1, 12)
    cu = torch.tensor([0, 9], dtype=torch.int32, device=device)
    lens = torch.tensor([11], dtype=torch.int32, device=device)
    got = attention.extend_attention(q, pool_k, pool_v, table, 1, cu, lens, window=5)
    # float32 softmax sums in another order than the twin's: test_attention_kernels bounds that
    torch.testing.assert_close(got, attention.extend_attention_eager(q, pool_k, pool_v, table, 1, cu, lens, window=5),
                               atol=1e-5, rtol=1e-5)
    programs = (triton.cdiv(9, 8) + 1) * 2  # (tiles of 8 tokens at G=2, + a spare) per KV head; each calls helpers
    assert 1 <= len(calls) <= 2 < programs, len(calls)  # the launch's modules, then tl.core's for tl.sum
    assert tl.zeros is before


# -- the paged model: fused ops against the torch ops ------------------------------------------

class _Taps(dict):
    """(name, position) -> row, for one request."""

    def __call__(self, rid, name, positions, tensor):
        for p, row in zip(positions.tolist(), tensor):
            self[(name, p)] = row.cpu()


def _paged_run(preset, dtype, fused, prompt_len=7, new=3):
    """One request through the engine: two prefill chunks over pages of 2, then teacher-forced
    decode steps (past tiny's window of 5); its logits and every tap."""
    import reference
    from optimized.runner import Runner

    cfg, w = reference.resolve(preset, dtype=dtype, seed=0)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = Runner(cfg, weights=w, dtype=dtype, device=DEVICE, page_size=2, chunk_size=4, fused=fused,
                    page_order_seed=3)
    taps = _Taps()
    [result] = runner.run([prompt], max_new_tokens=new, teacher_tokens=[[5, 9, 200][:new]], return_logits=True,
                          taps=taps)
    return result.logits, taps


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# float32: both op sets compute the same ops in float32 and differ in summation order only (measured
# worst tap 3e-6 on tiny). bfloat16: they round at the same points (measured identical on tiny under
# the interpreter); the bound is for wiring (a wrong weight, slot, head or layer type is O(1)),
# the kernels' rounding is held by the tests above.
MODEL_RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("preset, dtype", [("tiny", torch.float32), ("tiny", torch.bfloat16),
                                           ("tiny-kv-eq-v", torch.float32)])
def test_paged_model_fused_matches_the_torch_ops(preset, dtype):
    """tiny: PLE (its tail on the post-FFN kernel), sliding and full layers, KV-shared layers (q only);
    tiny-kv-eq-v: K=V full layers. Every tap, the pool taps included, and the logits."""
    logits, taps = _paged_run(preset, dtype, fused=True)
    want_logits, want = _paged_run(preset, dtype, fused=False)
    assert taps.keys() == want.keys()
    assert _rel(logits, want_logits) < MODEL_RTOL[dtype]
    for name in sorted({n for n, _ in want}):
        keys = sorted(k for k in want if k[0] == name)
        got, exp = (torch.stack([t[k] for k in keys]) for t in (taps, want))
        assert _rel(got, exp) < MODEL_RTOL[dtype], f"{name}: relative error {_rel(got, exp):.3g}"


def test_every_fault_on_an_op_reaches_both_op_sets(monkeypatch):
    """A fault is data: it patches the ops the paged model calls. After fusing ops (three launches
    into qkv_norm_rope_store, three onto the post-FFN kernel), every fault that patches an op set must
    still patch one the model calls, on the fused path and on the torch one."""
    import optimized.fused_ops
    import optimized.ops
    from oracle.faults import FAULTS

    op_sets = {"fused": optimized.fused_ops, "torch": optimized.ops}
    patched = {(p.owner, p.attr) for f in FAULTS.values() for p in f.patches if p.owner in op_sets.values()}
    called = set()

    def counting(owner, attr, fn):
        def wrapper(*args, **kwargs):
            called.add((owner, attr))
            return fn(*args, **kwargs)
        return wrapper

    for owner, attr in patched:
        monkeypatch.setattr(owner, attr, counting(owner, attr, getattr(owner, attr)))
    for fused in (True, False):
        _paged_run("tiny", torch.float32, fused, prompt_len=3, new=1)
    for fault in FAULTS.values():
        for path, owner in op_sets.items():
            attrs = [p.attr for p in fault.patches if p.owner is owner]
            if attrs:
                assert any((owner, a) in called for a in attrs), f"{fault.name} patches {attrs}, which the {path} " \
                                                                 f"paged model never calls"


def test_the_post_ffn_kernel_compiles_for_a_gpu():
    """The post-FFN kernel (the PLE tail's too), with the next norm or without, compiles for sm_90
    (tests/sm90.py says why; the fused q/k/v epilogue's launches: tests/test_rope_launch.py)."""
    check_compiles("""
        from optimized.kernels import norms
        t = {n: "*bf16" for n in ("m", "m2", "res", "w1", "w2", "w", "scalar", "next_w", "out", "normed", "next_out")}
        t.update(eps="fp32")
        for moe, next_norm in ((True, True), (False, True), (True, False)):
            compile_for_sm90(norms._post_ffn_kernel, t, dict(N=2816, BLOCK=4096, ROWS=1, MOE=moe, HAS_SCALAR=True,
                                                             STORE_NORMED=True, NEXT_NORM=next_norm),
                             num_warps=4, enable_fp_fusion=False)
    """)
