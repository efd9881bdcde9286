"""Property tests: each fused elementwise/normalization kernel against its eager twin.

The twins are the reference's own op sequences (reference.model), so "kernel == twin" means
"kernel == what the reference computes". Hypothesis draws shapes, strides, weights and seeds;
torch draws the values from the seed. Sizes stay small: under Triton's interpreter every program
costs milliseconds.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from optimized.kernels import activation, default_device, norms, rope
from reference.config import RopeSpec
from reference.model import apply_rope as reference_apply_rope, rope_cos_sin, rope_inv_freq

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
