"""The few-row GEMV kernels (optimized/kernels/gemv.py) against their eager twins (the unfused ops)
on fresh random inputs: every mode, both inner products (tl.dot and the broadcast sum), float32
and bfloat16, few rows, odd N and K, strided inputs as the paged model passes them.

Tolerance: the kernel sums the K products in another order than torch's F.linear, in float32, so
its float32 result differs by float32 rounding (bounded here relative to the output's scale);
after the rounding to bfloat16, now and then by one bfloat16 ULP of the element (more where a
one-ULP flip of the rounded gate feeds the activation). The bounds are in ULPs at the output's
largest magnitude, as `gemma4-testbed kernels` measures (oracle/kernel_check.py). A kernel that
skips a rounding the twin does (the gate before the GELU) or reads a wrong column misses them
by far.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from optimized import fused_ops, ops
from optimized.kernels import default_device, gemv
from tests.sm90 import check_compiles

DEVICE = default_device()
DTYPES = [torch.float32, torch.bfloat16]
SCALE_ULPS = {torch.float32: 64.0, torch.bfloat16: 2.0}
# Both inner products, with small blocks so that several programs and K steps (a ragged last one
# for odd K) run even at test sizes; and whatever the module picks on this machine.
SETTINGS = {
    "dot": dict(BLOCK_N=16, BLOCK_K=32, DOT=True, num_warps=4, num_stages=1),
    "sum": dict(BLOCK_N=4, BLOCK_K=32, DOT=False, num_warps=4, num_stages=1),
    "dot-split": dict(BLOCK_N=16, BLOCK_K=16, DOT=True, num_warps=4, num_stages=1, SPLIT_K=3),
    "sum-split": dict(BLOCK_N=4, BLOCK_K=16, DOT=False, num_warps=4, num_stages=1, SPLIT_K=4),
    "module": None,
}


def at_scale(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| in ULPs of want's dtype at want's largest magnitude."""
    assert got.shape == want.shape and got.dtype == want.dtype
    top = want.double().abs().max().clamp_min(torch.finfo(want.dtype).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(top))) * torch.finfo(want.dtype).eps
    return float((got.double() - want.double()).abs().max() / ulp)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = at_scale(got, want)
    assert err <= SCALE_ULPS[want.dtype], f"{err:.2f} ULPs at scale (bound {SCALE_ULPS[want.dtype]})"


def rows_of(gen, m, k, dtype, *, offset=0, pad=0):
    """[m, k] random rows; with pad a column slice (row stride k + pad, starting at `offset`)."""
    t = torch.randn(m, k + pad, generator=gen).to(DEVICE, dtype)
    return t[:, offset:offset + k]


def weight(gen, n, k, dtype):
    return (torch.randn(n, k, generator=gen) * k ** -0.5).to(DEVICE, dtype)


shapes = st.tuples(st.integers(1, 16), st.integers(1, 70), st.integers(1, 90))  # M past the default limits: settings force the kernel


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=settings.default.max_examples // 4)
@given(shape=shapes, strided=st.booleans(), store=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_linear_gelu_mul_matches_the_projection_then_the_activation(setting, dtype, shape, strided, store, seed):
    m, inter, k = shape
    gen = torch.Generator().manual_seed(seed)
    x = rows_of(gen, m, k, dtype, offset=5 if strided else 0, pad=11 if strided else 0)
    w = weight(gen, 2 * inter, k, dtype)
    got = gemv.linear_gelu_mul(x, w, return_gate_up=store, settings=SETTINGS[setting])
    want = gemv.linear_gelu_mul_eager(x, w, return_gate_up=store)
    if store:
        assert got[1].shape == (m, 2 * inter) and got[1].is_contiguous()
        assert_close(got[1], want[1])  # the mlp_gate_up tap, from the same kernel
        got, want = got[0], want[0]
    assert_close(got, want)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=settings.default.max_examples // 4)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_the_ple_gate_takes_up_from_a_strided_slice(setting, dtype, shape, seed):
    m, p, k = shape
    gen = torch.Generator().manual_seed(seed)
    x = rows_of(gen, m, k, dtype)
    w = weight(gen, p, k, dtype)
    layers = 3
    ple = torch.randn(m, layers, p, generator=gen).to(DEVICE, dtype)  # [T, L, P]; the model passes ple[:, l, :]
    up = ple[:, 1, :]
    assert_close(gemv.linear_gelu_mul(x, w, up, settings=SETTINGS[setting]), gemv.linear_gelu_mul_eager(x, w, up))


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=settings.default.max_examples // 4)
@given(shape=shapes, strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_linear_matches_f_linear(setting, dtype, shape, strided, seed):
    m, n, k = shape
    gen = torch.Generator().manual_seed(seed)
    x = rows_of(gen, m, k, dtype, offset=1 if strided else 0, pad=4 if strided else 0)
    w_big = weight(gen, n, k + 6, dtype)
    w = w_big[:, 2:2 + k] if strided else w_big[:, :k].contiguous()  # a column slice: rows strided
    assert_close(gemv.linear(x, w, settings=SETTINGS[setting]), gemv.linear_eager(x, w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_at_a_real_width_and_every_row_count(dtype):
    """K = 1536 (E2B's hidden size, several K steps), M = 1 .. 16, both inner products."""
    gen = torch.Generator().manual_seed(7)
    k, inter = 1536, 24
    w = weight(gen, 2 * inter, k, dtype)
    for m in (1, 2, 3, 16):
        x = rows_of(gen, m, k, dtype)
        for s in (dict(BLOCK_N=16, BLOCK_K=512, DOT=True, num_warps=4, num_stages=1),
                  dict(BLOCK_N=8, BLOCK_K=512, DOT=False, num_warps=4, num_stages=1)):
            assert_close(gemv.linear(x, w, settings=s), gemv.linear_eager(x, w))
            assert_close(gemv.linear_gelu_mul(x, w, settings=s), gemv.linear_gelu_mul_eager(x, w))


def test_bfloat16_outputs_are_mostly_bit_identical():
    """Rounding where the unfused ops round leaves almost every bf16 output identical to the twin's
    (the sums differ in float32 details only); a skipped rounding would change many."""
    gen = torch.Generator().manual_seed(3)
    m, inter, k = 4, 64, 96
    x, w = rows_of(gen, m, k, torch.bfloat16), weight(gen, 2 * inter, k, torch.bfloat16)
    s = gemv.launch_settings(m, inter)  # forces the kernel whatever the row limits
    got, want = gemv.linear_gelu_mul(x, w, settings=s), gemv.linear_gelu_mul_eager(x, w)
    assert (got != want).float().mean() < 0.05  # measured here: 0 of 256 differ


def test_calls_past_the_limits_take_the_unfused_path(monkeypatch):
    """Past GEMV_MAX_ROWS rows (prefill) or GEMV_MAX_WEIGHT weight elements it is the unfused
    kernels + F.linear, exactly; the stacked gate_up takes the kernel only within FUSED_MAX_ROWS,
    and float32 models within FLOAT32_MAX_ROWS; GEMV_MAX_ROWS = 0 turns the kernel off; under the
    interpreter it runs only when forced."""
    gen = torch.Generator().manual_seed(2)
    calls = []
    monkeypatch.setattr(gemv, "_launch", lambda *a, **k: calls.append(a[0]))
    monkeypatch.setattr(gemv, "INTERPRETING", False)  # the rule where kernels compile
    bf = torch.bfloat16
    x, w = rows_of(gen, 5, 24, bf), weight(gen, 16, 24, bf)
    up = rows_of(gen, 5, 16, bf)
    F = torch.nn.functional
    monkeypatch.setattr(gemv, "GEMV_MAX_ROWS", 4)  # 5 rows: past it
    monkeypatch.setattr(gemv, "FUSED_MAX_ROWS", 2)
    gate_up = F.linear(x, w)
    assert torch.equal(gemv.linear_gelu_mul(x, w), fused_ops.gelu_tanh_mul(gate_up[:, :8], gate_up[:, 8:]))
    assert torch.equal(gemv.linear_gelu_mul(x, w, up), fused_ops.gelu_tanh_mul(gate_up, up))
    assert torch.equal(gemv.linear(x, w), F.linear(x, w))
    assert calls == []
    gemv.linear_gelu_mul(x[:3], w)  # 3 rows: past FUSED_MAX_ROWS, within GEMV_MAX_ROWS
    assert calls == []
    gemv.linear_gelu_mul(x[:3].float(), w.float(), up[:3].float())  # float32: one row only
    gemv.linear(x[:3].float(), w.float())
    assert calls == []
    gemv.linear(x[:1].float(), w.float())
    gemv.linear_gelu_mul(x[:3], w, up[:3])
    gemv.linear(x[:3], w)
    assert calls == ["linear", "gated_up", "linear"]
    calls.clear()
    monkeypatch.setattr(gemv, "GEMV_MAX_WEIGHT", w.numel() - 1)  # a weight past the limit
    gemv.linear_gelu_mul(x[:2], w)
    gemv.linear(x[:2], w)
    assert calls == []
    monkeypatch.setattr(gemv, "GEMV_MAX_WEIGHT", w.numel())
    gemv.linear_gelu_mul(x[:2], w)
    gemv.linear_gelu_mul(x[:4], w, up[:4])
    gemv.linear(x[:4], w)
    assert calls == ["gated", "gated_up", "linear"]
    monkeypatch.setattr(gemv, "INTERPRETING", True)
    gemv.linear_gelu_mul(x[:1], w)
    gemv.linear(x[:1], w)
    assert calls == ["gated", "gated_up", "linear"]
    monkeypatch.setattr(gemv, "INTERPRETING", False)
    monkeypatch.setattr(gemv, "GEMV_MAX_ROWS", 0)
    gemv.linear_gelu_mul(x[:1], w)
    gemv.linear(x[:1], w)
    assert calls == ["gated", "gated_up", "linear"]


def test_row_limits_per_op_and_dtype(monkeypatch):
    """The plain projection and the PLE gate up to GEMV_MAX_ROWS, the stacked gate_up up to
    FUSED_MAX_ROWS, float32 up to FLOAT32_MAX_ROWS; GEMV_MAX_ROWS = 0 is off for all."""
    bf, f32 = torch.bfloat16, torch.float32
    assert (gemv.row_limit(False, bf), gemv.row_limit(True, bf)) == (gemv.GEMV_MAX_ROWS, gemv.FUSED_MAX_ROWS)
    assert gemv.row_limit(False, f32) == gemv.FLOAT32_MAX_ROWS == 1
    monkeypatch.setattr(gemv, "GEMV_MAX_ROWS", 0)
    assert gemv.row_limit(False, bf) == gemv.row_limit(True, bf) == gemv.row_limit(False, f32) == 0


def test_the_torch_ops_are_the_old_unfused_sequence():
    """ops.py's versions (fused=False) are the previous op sequence bit for bit."""
    gen = torch.Generator().manual_seed(4)
    x, w = rows_of(gen, 3, 24, torch.bfloat16), weight(gen, 16, 24, torch.bfloat16)
    up = rows_of(gen, 3, 16, torch.bfloat16)
    gate_up = torch.nn.functional.linear(x, w)
    act, gu = ops.linear_gelu_mul(x, w, return_gate_up=True)
    assert torch.equal(gu, gate_up) and torch.equal(act, ops.gelu_tanh_mul(gate_up[:, :8], gate_up[:, 8:]))
    assert torch.equal(ops.linear_gelu_mul(x, w, up), ops.gelu_tanh_mul(gate_up, up))


@pytest.mark.parametrize("setting", ["dot-split", "sum-split"])
def test_split_k_is_deterministic_and_leaves_its_counters_at_zero(setting):
    """Whichever program of a tile finishes last adds the partial sums in one order: repeated calls
    (on a GPU, racing programs) give the same bits; every ticket counter is back at 0 after each
    call, so the next call (or graph replay) starts clean. Sizes where compiled: many tiles and
    splits racing."""
    gen = torch.Generator().manual_seed(9)
    m, n, k = (8, 1536, 2048) if DEVICE.type != "cpu" else (5, 40, 96)
    s = dict(SETTINGS[setting], BLOCK_K=256) if DEVICE.type != "cpu" else SETTINGS[setting]
    x, w = rows_of(gen, m, k, torch.bfloat16), weight(gen, 2 * n, k, torch.bfloat16)
    first = gemv.linear_gelu_mul(x, w, settings=s, return_gate_up=True)
    for _ in range(3 if DEVICE.type == "cpu" else 50):
        again = gemv.linear_gelu_mul(x, w, settings=s, return_gate_up=True)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        assert int(gemv._split_scratch[x.device][1].abs().sum()) == 0
    want = gemv.linear_gelu_mul_eager(x, w, return_gate_up=True)
    assert_close(first[1], want[1])


def test_split_k_runs_unsplit_where_its_scratch_is_too_small_or_cannot_be_made(monkeypatch):
    """A call whose partial sums would not fit the fixed scratch, or that would first make it inside
    a graph capture, runs unsplit: same result, no scratch touched."""
    gen = torch.Generator().manual_seed(3)
    x, w = rows_of(gen, 3, 64, torch.float32), weight(gen, 24, 64, torch.float32)
    split = gemv.linear(x, w, settings=SETTINGS["dot-split"])
    monkeypatch.setattr(gemv, "SPLIT_PARTIAL_FLOATS", 1)
    monkeypatch.setattr(gemv, "_split_scratch", {})
    assert_close(gemv.linear(x, w, settings=SETTINGS["dot-split"]), split)
    assert gemv._split_scratch == {}
    # Nor is the scratch first made inside a graph capture (its zeroing would be recorded, not run).
    monkeypatch.setattr(gemv, "SPLIT_PARTIAL_FLOATS", 2 << 20)
    monkeypatch.setattr(gemv, "capturing", lambda device: True)
    assert_close(gemv.linear(x, w, settings=SETTINGS["dot-split"]), split)
    assert gemv._split_scratch == {}


def test_cuda_graph_style_zero_rows_and_empty_outputs():
    gen = torch.Generator().manual_seed(1)
    w = weight(gen, 8, 16, torch.float32)
    x = torch.empty(0, 16, device=DEVICE)
    assert gemv.linear(x, w).shape == (0, 8)
    assert gemv.linear_gelu_mul(x, w).shape == (0, 4)


@pytest.mark.parametrize("call, match", [
    (lambda x, w, up: gemv.linear(x.double(), w.double()), "x must be float16, bfloat16 or float32"),
    (lambda x, w, up: gemv.linear(x, w.half()), "w has dtype torch.float16 but x has torch.float32"),
    (lambda x, w, up: gemv.linear(x, w[:, :5]), r"w must be \[N, 8\]"),
    (lambda x, w, up: gemv.linear(x[0], w), "x must have 2 dimensions"),
    (lambda x, w, up: gemv.linear(x.t(), w.t()), "contiguous last dimension"),
    (lambda x, w, up: gemv.linear_gelu_mul(x, w[:5]), "an even count"),
    (lambda x, w, up: gemv.linear_gelu_mul(x, w, up[:, :3]), r"up must be \[3, 6\]"),
    (lambda x, w, up: gemv.linear_gelu_mul(x, w, up, return_gate_up=True), "return_gate_up is for the stacked"),
    (lambda x, w, up: gemv.linear_gelu_mul(x, w, up.half()), "up has dtype torch.float16"),
])
def test_bad_inputs_name_what_is_wrong(call, match):
    gen = torch.Generator().manual_seed(0)
    x, w = rows_of(gen, 3, 8, torch.float32), weight(gen, 6, 8, torch.float32)
    up = rows_of(gen, 3, 6, torch.float32)
    with pytest.raises(ValueError, match=match):
        call(x, w, up)


def test_fused_ops_export_the_gemv_ops_under_the_torch_ops_names():
    for name in ("linear_gelu_mul", "linear"):
        assert getattr(fused_ops, name) is getattr(gemv, name) and callable(getattr(ops, name))


def test_launch_settings_fill_the_machine(monkeypatch):
    """One row: the broadcast sum, BLOCK_N halved (down to 2) until MIN_PROGRAMS programs; more rows:
    tl.dot at BLOCK_N >= 16, split over K."""
    monkeypatch.setattr(gemv, "INTERPRETING", False)
    for rows in (1, 4, 8, 16, 32):
        for n in (256, 1536, 2560, 12288):
            s = gemv.launch_settings(rows, n)
            if rows == 1:
                assert not s["DOT"] and s["SPLIT_K"] == 1
                assert s["BLOCK_N"] == 2 or -(-n // s["BLOCK_N"]) >= gemv.MIN_PROGRAMS
            else:
                assert s["DOT"] and s["BLOCK_N"] >= 16 and s["SPLIT_K"] > 1


def test_the_gemv_kernels_compile_for_a_gpu():
    """Every mode, both inner products, unsplit and split-K, for sm_90 (tests/sm90.py says why);
    split-K's ticket is an acq_rel atomic after a barrier and the last program reads the partials
    past L1."""
    check_compiles("""
        from optimized.kernels import gemv
        t = {n: "*bf16" for n in ("x", "w", "up", "out", "gate_up_out")}
        t.update(partials="*fp32", counters="*i32")
        for mode in (0, 2, 3):  # linear, gated (stacked), gated (external up)
            for block_m, block_n, block_k, dot, split in ((1, 4, 2048, False, 1), (8, 2, 256, False, 1),
                                                          (16, 16, 256, True, 1), (32, 32, 128, True, 1),
                                                          (1, 4, 256, False, 4), (32, 16, 256, True, 3)):
                k = compile_for_sm90(gemv._gemv_kernel, t, dict(
                    MODE=mode, STORE_GATE_UP=mode == 2, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                    EVEN_K=mode % 2 == 0, DOT=dot, DOT_DTYPE=tl.bfloat16, DOT_PRECISION=None, SPLIT_K=split),
                    num_warps=4, num_stages=3, enable_fp_fusion=False)
                ptx = k.asm["ptx"]
                if split > 1:
                    ticket = ptx.index("atom.global.gpu.acq_rel.add")
                    assert "bar.sync" in ptx[:ticket] and "ld.global.cg" in ptx[ticket:], "split-K's ordering"
                else:
                    assert "atom." not in ptx
    """)
