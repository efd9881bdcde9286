"""The fused q/k/v epilogue's launch shape (rope.qkv_launch): query programs and K/V programs in
one axis, the K/V ones wider in tokens, fewer warps at prefill sizes (rope.py says why, with the
instruction counts of bench/isa_count.py qkv). Its numerics are tested in test_fused_kernels.py; here:
the tiling does not change a bit, and the launches it makes compile for sm_90."""

from __future__ import annotations

import pytest
import torch
import triton

from optimized.kernels import INTERPRETING, default_device, rope
from reference.config import RopeSpec
from reference.model import rope_inv_freq
from tests.sm90 import check_compiles

DEVICE = default_device()
E2B = [(8, 1, 256), (8, 1, 512), (8, 0, 256), (8, 0, 512)]  # sliding, full, and their KV-shared layers


@pytest.mark.parametrize("hq,hkv,d", E2B + [(32, 16, 256), (32, 4, 512)])
@pytest.mark.parametrize("T", [1, 3, 64, 255, 256, 8192])
def test_qkv_launch_covers_every_token_and_head(T, hq, hkv, d):
    (programs,), c, options = rope.qkv_launch(T, hq, hkv, d)
    assert c["Q_GROUPS"] * c["Q_HEADS"] >= hq and (c["Q_GROUPS"] - 1) * c["Q_HEADS"] < hq
    kv_programs = triton.cdiv(T, c["KV_TOKENS"]) * c["KV_GROUPS"] if hkv else 0
    assert programs == triton.cdiv(T, c["TOKENS"]) * c["Q_GROUPS"] + kv_programs
    if hkv:
        assert c["KV_GROUPS"] * c["KV_HEADS"] >= hkv and (c["KV_GROUPS"] - 1) * c["KV_HEADS"] < hkv
        # a K/V program holds as many key rows as a q program query rows, where T allows
        assert c["KV_TOKENS"] * c["KV_HEADS"] == c["TOKENS"] * c["Q_HEADS"] or c["KV_TOKENS"] >= T
    if T >= rope.QKV_MANY_TOKENS:  # one thread per column of a half-row
        assert options["num_warps"] * 32 == min(max(c["BLOCK_HALF"], 32), 512)
    else:
        tile = c["TOKENS"] * c["Q_HEADS"] * 2 * c["BLOCK_HALF"]
        assert options["num_warps"] == min(max(tile // rope.QKV_WARP_ELEMS, 1), 16)
    assert options["enable_fp_fusion"] is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["qkv", "k_eq_v", "q_only"])
def test_qkv_norm_rope_store_is_the_same_in_any_tiling(monkeypatch, mode, dtype):
    """Many small programs (ragged last token tiles on both sides, K/V programs wider than q's,
    several head groups) write what one program a side writes, bit for bit (float32 compiled:
    within a few ULP, see below)."""
    gen = torch.Generator().manual_seed(11)
    T, hq, hkv, d, num_slots = 23, 4, 1, 32, 60
    fused = (torch.randn(T, (hq + 2 * hkv) * d + 5, generator=gen) * 3).to(dtype)[:, 5:]
    q = fused[:, :hq * d].view(T, hq, d)
    k = fused[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    v = k if mode == "k_eq_v" else fused[:, (hq + hkv) * d:].view(T, hkv, d)
    q_w, k_w = ((0.5 + torch.rand(d, generator=gen)).to(dtype) for _ in range(2))
    pos = torch.randint(0, 200_000, (T,), generator=gen)
    slots = torch.randperm(num_slots - 1, generator=gen)[:T] + 1
    slots[::4] = 0  # the padding sink and out-of-range ids: never written
    slots[1::7] = num_slots + 3
    inv_freq = rope_inv_freq(RopeSpec("default", 10_000.0), d)
    q, k, v, q_w, k_w, pos, slots, inv_freq = (t.to(DEVICE) for t in (q, k, v, q_w, k_w, pos, slots, inv_freq))
    if mode == "q_only":
        k = v = k_w = None

    def run(tile):
        monkeypatch.setattr(rope, "QKV_TILE", tile)
        pools = [torch.full((num_slots, hkv, d), -77.0, dtype=dtype, device=DEVICE) for _ in range(2)]
        out = rope.qkv_norm_rope_store(q, k, v, q_w, k_w, 1e-6, pos, inv_freq, *pools, slots)
        return out, pools

    monkeypatch.setattr(rope, "QKV_TILE", 64)
    small_grid, small, _ = rope.qkv_launch(T, hq, hkv, d)
    assert small["Q_GROUPS"] == 2 and small["KV_TOKENS"] > small["TOKENS"] and small_grid[0] > 20
    (q_one, pools_one), (q_many, pools_many) = run(1 << 16), run(64)
    for one, many in zip((q_one, *pools_one), (q_many, *pools_many)):
        if dtype == torch.float32 and not INTERPRETING:
            # Compiled, a row's float32 sum of squares is added in an order that follows the
            # tile's layout (seen on an H200: not bit-equal across tilings); the rounding to
            # bfloat16 absorbs that, float32 shows it as a few ULP.
            torch.testing.assert_close(one, many, rtol=4e-7, atol=1e-6)
        else:
            assert torch.equal(one, many)


def test_qkv_launches_compile_for_a_gpu():
    """The E2B launches, prefill and decode, and a 31B-like full layer (32 q heads, 4 K=V heads),
    as qkv_launch makes them, compile for sm_90 (tests/sm90.py says why)."""
    check_compiles("""
        from optimized.kernels import rope
        t = {n: "*bf16" for n in ("q", "k", "v", "q_w", "k_w", "q_out", "k_pool", "v_pool")}
        t.update(positions="*i64", inv_freq="*fp32", slots="*i64", eps="fp32")
        for T in (1, 8192):
            for hq, hkv, d, v_is_k in ((8, 1, 256, False), (8, 1, 512, True), (8, 0, 512, False), (32, 4, 512, True)):
                _, consts, options = rope.qkv_launch(T, hq, hkv, d, v_is_k)
                compile_for_sm90(rope._qkv_norm_rope_store_kernel, t, consts, **options)
    """)
