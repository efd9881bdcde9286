"""Programmatic dependent launch (optimized/kernels/pdl.py): where it is on, that every kernel
compiles with it for sm_90, and that a chain of dependent kernels gives the same bits with and
without it (on a GPU, in a CUDA graph, as decode runs them)."""

from __future__ import annotations

import pytest
import torch

from optimized.kernels import INTERPRETING, pdl
from tests.sm90 import check_compiles

ON_SM90 = torch.cuda.is_available() and not INTERPRETING and torch.cuda.get_device_capability()[0] >= 9


def test_pdl_is_off_where_kernels_do_not_compile_for_sm90():
    assert pdl.pdl_launch() == (dict(PDL=True, launch_pdl=True) if ON_SM90 else dict(PDL=False))


def test_pdl_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert pdl.pdl_launch() == dict(PDL=False)


def test_every_kernel_compiles_with_pdl_for_sm90():
    """Each kernel family's decode kernels with PDL=True: the wait and the trigger are in the PTX,
    and the wait comes before any read (the GEMV's weight prefetch excepted)."""
    check_compiles("""
        import triton.language as tl
        from optimized.kernels import activation, attention, gemv, moe, norms, rope
        on = dict(PDL=True)
        bf = lambda *names: {n: "*bf16" for n in names}
        compiled = [
            compile_for_sm90(norms._rms_norm_kernel, dict(bf("x", "w", "out"), eps="fp32"),
                             dict(H=1, N=1536, BLOCK=2048, ROWS=1, HAS_WEIGHT=True, **on), launch_pdl=True),
            compile_for_sm90(activation._gelu_tanh_mul_kernel, bf("gate", "up", "out"),
                             dict(ROWS=1, BLOCK=1024, **on), launch_pdl=True),
            *(compile_for_sm90(gemv._gemv_kernel, dict(bf("x", "w", "up", "out", "gate_up_out"),
                                                       partials="*fp32", counters="*i32"),
                               dict(MODE=mode, STORE_GATE_UP=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                    EVEN_K=True, DOT=dot, DOT_DTYPE=tl.bfloat16, DOT_PRECISION=None, SPLIT_K=split,
                                    **on), num_warps=4, launch_pdl=True)
              for mode, block_m, block_n, block_k, dot, split in ((2, 1, 4, 2048, False, 1), (0, 16, 32, 256, True, 4))),
            compile_for_sm90(attention._decode_merge_kernel, dict(part_ptr="*fp32", lse_ptr="*fp32", o_ptr="*bf16",
                                                                  seq_lens_ptr="*i32"),
                             dict(D=256, BLOCK_S=16, BLOCK_N=64, HAS_WINDOW=True, **on), launch_pdl=True),
            compile_for_sm90(moe._combine_kernel, bf("y", "out") | dict(ids="*i32"),
                             dict(TOP_K=8, ROWS=1, BLOCK=1024, **on), launch_pdl=True),
        ]
        _, consts, options = rope.qkv_launch(1, 8, 1, 256)
        compiled.append(compile_for_sm90(
            rope._qkv_norm_rope_store_kernel,
            dict(bf("q", "k", "v", "q_w", "k_w", "q_out", "k_pool", "v_pool"), positions="*i32", inv_freq="*fp32",
                 slots="*i32", eps="fp32"), dict(consts, **on), **options, launch_pdl=True))
        for k in compiled:
            ptx = k.asm["ptx"]
            assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx, k.name
            # Each waits before it reads, but the GEMV, which streams its first weight tile first.
            first_read_waits = ptx.index("griddepcontrol.wait") < ptx.index("ld.global")
            assert first_read_waits == (k.name != "_gemv_kernel"), k.name
            if "atom." in ptx:  # split-K's ticket, after the wait like every other access
                assert ptx.index("griddepcontrol.wait") < ptx.index("atom."), k.name
    """)


@pytest.mark.skipif(not ON_SM90, reason="PDL needs a CUDA GPU of compute capability 9 or more")
@pytest.mark.parametrize("rows", [1, 8])
def test_a_graphed_decode_step_is_bit_identical_with_and_without_pdl(monkeypatch, rows):
    """Ten steps of the fused decode chain (norm + q/k/v GEMV, o_proj, gated MLP) of a small random
    model, captured in a CUDA graph with PDL on and off: the same bits. At 8 rows the projections
    within the GEMV's limits run split over K (ticket counters and partial sums between programs)."""
    from optimized.kernels import gemv, norms

    gen = torch.Generator(device="cuda").manual_seed(0)
    h, inter = 1536, 6144
    ws = [torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * k ** -0.5
          for n, k in ((2 * inter, h), (h, inter), (2560, h))] * 4
    norm_w = 1 + 0.1 * torch.randn(h, generator=gen, device="cuda", dtype=torch.bfloat16)
    x0 = torch.randn(rows, h, generator=gen, device="cuda", dtype=torch.bfloat16)

    def chain(x):
        for i in range(0, len(ws), 3):
            a = gemv.linear_gelu_mul(norms.rms_norm(x, norm_w, 1e-6), ws[i])
            x = x + gemv.linear(a, ws[i + 1])
            x = x + gemv.linear(norms.rms_norm(x, norm_w, 1e-6), ws[i + 2])[:, :h]
        return x

    outs = []
    for enabled in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", enabled)
        x = x0.clone()
        chain(x)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = chain(x)
        results = []
        for _ in range(10):
            graph.replay()
            results.append(y.clone())
            x.copy_(y)
        torch.cuda.synchronize()
        outs.append(torch.stack(results))
    assert torch.equal(outs[0], outs[1])
