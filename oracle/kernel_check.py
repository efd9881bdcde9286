"""`gemma4-testbed kernels`: every public Triton op against its eager twin on the current device,
on freshly generated inputs, with strided (column-view) inputs where the model feeds them.

Per op: max error in ULPs of the compared dtype and relative L2 error against the eager twin,
pass/fail against the op's bound, and the median time of the kernel, the eager twin and the
unfused torch sequence the paged model otherwise runs (`optimized/ops.py`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from optimized import ops
from optimized.kernels import activation, attention, moe, norms, rope
from reference.config import RopeSpec

from .metrics import rel_l2, ulp, ulp_distance

# Elementwise and norm kernels do the twin's float32 math and round once: a few ULPs at most
# (see tests/test_fused_kernels.py for the exact argument). The bound is in ULPs at the scale of
# the output (its largest magnitude): an element that cancels to near zero (residual + branch)
# has a huge ULP distance at its own tiny magnitude from one rounding of its inputs. The table
# also shows the elementwise maximum. Attention (online softmax over key blocks) and the MoE
# experts (grouped GEMMs) sum in another order, so they are bounded relatively, by dtype. The
# router's weights are float32 whatever the model dtype, and compared as such.
ULP_BOUND = {torch.float32: 8.0, torch.bfloat16: 2.0, torch.float16: 2.0}
ATTN_REL_BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# Tokens, hidden, heads q and kv, head dim, intermediate, vocab, context; then the MoE block's
# hidden, experts, top k and expert intermediate: E2B has no MoE block, so "e2b" takes 26B-A4B's.
SIZES = {
    "small": dict(T=24, H=64, Hq=4, Hkv=2, D=32, I=96, V=256, ctx=40, moe_H=64, E=16, top_k=4, moe_I=32),
    "e2b": dict(T=2048, H=1536, Hq=8, Hkv=1, D=256, I=6144, V=262144, ctx=4096,
                moe_H=2816, E=128, top_k=8, moe_I=704),
}


class Case(NamedTuple):
    name: str
    shape: str
    kernel: Callable
    eager: Callable
    unfused: Callable | None = None  # the torch sequence the paged model runs without the kernel
    relative: bool = False  # bounded by relative L2 error (sums in another order), not by ULPs
    compare_dtype: torch.dtype | None = None  # the outputs' dtype, where it is not the model's


@dataclass
class KernelResult:
    name: str
    shape: str
    dtype: str
    max_ulp: float  # elementwise, at each element's own magnitude
    scale_ulp: float  # max |error| in ULPs of the output's largest magnitude
    rel: float
    passed: bool
    time_us: float
    eager_us: float
    unfused_us: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _time_us(fn: Callable, device: torch.device, repeats: int) -> float:
    def sync():  # the device's own backend module (torch.cuda, torch.xpu, ...), whatever it is
        if device.type != "cpu":
            getattr(torch, device.type).synchronize()

    fn()  # warm-up: compilation stays out of the numbers
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _cases(s: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    """One Case per op."""
    T, H, Hq, Hkv, D, inter, V = s["T"], s["H"], s["Hq"], s["Hkv"], s["D"], s["I"], s["V"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    def weight(n):
        return (0.5 + torch.rand(n, generator=gen)).to(device=device, dtype=dtype)

    eps = 1e-6
    x, r, w, w2, w3 = rnd(T, H), rnd(T, H), weight(H), weight(H), weight(H)
    scalar = weight(1)
    qkv = rnd(T, (Hq + 2 * Hkv) * D)  # one fused projection; q/k/v are column views of it
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    wq, wk = weight(D), weight(D)
    gate_up = rnd(T, 2 * inter)
    logits = rnd(min(T, 64), V, scale=20.0)
    positions = torch.arange(T, device=device) + 1000
    inv = ops.rope_inv_freq(RopeSpec("proportional", 1e6, 0.25), D, device)
    slots = (torch.randperm(2 * T, generator=gen)[:T] + 1).to(device)

    def pools():
        return torch.zeros(2 * T + 1, Hkv, D, device=device, dtype=dtype), \
            torch.zeros(2 * T + 1, Hkv, D, device=device, dtype=dtype)

    def store(fn, *args):
        kp, vp = pools()
        fn(*args, kp, vp, slots)
        return torch.cat([kp, vp])

    cases = [
        ("rms_norm", f"[{T}, {H}]", lambda: norms.rms_norm(x, w, eps), lambda: norms.rms_norm_eager(x, w, eps),
         lambda: ops.rms_norm(x, w, eps)),
        ("add_rms_norm", f"[{T}, {H}]", lambda: norms.add_rms_norm(x, r, w, eps, x_weight=w2),
         lambda: norms.add_rms_norm_eager(x, r, w, eps, x_weight=w2),
         lambda: ops.add_rms_norm(x, r, w, eps, x_weight=w2)),
        ("qkv_norm", f"q [{T}, {Hq}, {D}] strided", lambda: norms.qkv_norm(q, k, v, wq, wk, eps),
         lambda: norms.qkv_norm_eager(q, k, v, wq, wk, eps), lambda: ops.qkv_norm(q, k, v, wq, wk, eps)),
        ("post_ffn_residual_scale", f"[{T}, {H}]", lambda: norms.post_ffn_residual_scale(x, r, w, eps, scalar),
         lambda: norms.post_ffn_residual_scale_eager(x, r, w, eps, scalar),
         lambda: ops.post_ffn_residual_scale(x, r, w, eps, scalar)),
        ("post_ffn_moe_residual_scale", f"[{T}, {H}]",
         lambda: norms.post_ffn_moe_residual_scale(x, r, r, w, w2, w3, eps, scalar),
         lambda: norms.post_ffn_moe_residual_scale_eager(x, r, r, w, w2, w3, eps, scalar),
         lambda: ops.post_ffn_moe_residual_scale(x, r, r, w, w2, w3, eps, scalar)),
        ("gelu_tanh_mul", f"[{T}, {inter}] halves", lambda: activation.gelu_tanh_mul(gate_up[:, :inter], gate_up[:, inter:]),
         lambda: activation.gelu_tanh_mul_eager(gate_up[:, :inter], gate_up[:, inter:]),
         lambda: ops.gelu_tanh_mul(gate_up[:, :inter], gate_up[:, inter:])),
        ("softcap", f"[{logits.shape[0]}, {V}]", lambda: activation.softcap(logits, 30.0),
         lambda: activation.softcap_eager(logits, 30.0), lambda: ops.softcap(logits, 30.0)),
        ("apply_rope", f"q [{T}, {Hq}, {D}] proportional", lambda: rope.apply_rope(q, positions, inv),
         lambda: rope.apply_rope_eager(q, positions, inv), lambda: ops.apply_rope(q, positions, inv)),
        ("rope_and_store_kv", f"k/v [{T}, {Hkv}, {D}]",
         lambda: store(rope.rope_and_store_kv, k, v, positions, inv),
         lambda: store(rope.rope_and_store_kv_eager, k, v, positions, inv),
         lambda: store(ops.rope_and_store_kv, k, v, positions, inv)),
    ]
    out = [Case(*c) for c in cases]
    out += _attention_cases(s, dtype, device, gen)
    out += _moe_cases(s, dtype, device, gen)
    return out


def _attention_cases(s: dict, dtype, device, gen):
    Hq, Hkv, D, ctx, page = s["Hq"], s["Hkv"], s["D"], s["ctx"], 16
    B, new = 4, min(s["T"], ctx) // 4
    n_pages = B * (-(-ctx // page)) + 1
    k_pool = torch.randn(n_pages * page, Hkv, D, generator=gen).to(device=device, dtype=dtype)
    v_pool = torch.randn(n_pages * page, Hkv, D, generator=gen).to(device=device, dtype=dtype)
    table = (torch.randperm(n_pages - 1, generator=gen) + 1).view(B, -1).to(device=device, dtype=torch.int32)
    seq = torch.full((B,), ctx, dtype=torch.int32, device=device)
    cu = torch.arange(0, (B + 1) * new, new, dtype=torch.int32, device=device)
    q_ext = torch.randn(B * new, Hq, D, generator=gen).to(device=device, dtype=dtype)
    q_dec = torch.randn(B, Hq, D, generator=gen).to(device=device, dtype=dtype)
    window = 512 if D >= 256 else 5
    cases = []
    for win in (None, window):
        tag = "full" if win is None else f"window {win}"
        cases.append((f"extend_attention ({tag})", f"B {B}, {new} new of {ctx}, {Hq}:{Hkv}, D {D}",
                      lambda w=win: attention.extend_attention(q_ext, k_pool, v_pool, table, page, cu, seq, window=w),
                      lambda w=win: attention.extend_attention_eager(q_ext, k_pool, v_pool, table, page, cu, seq, window=w),
                      None, True))
        cases.append((f"decode_attention ({tag})", f"B {B}, {ctx} keys, {Hq}:{Hkv}, D {D}",
                      lambda w=win: attention.decode_attention(q_dec, k_pool, v_pool, table, page, seq, window=w),
                      lambda w=win: attention.decode_attention_eager(q_dec, k_pool, v_pool, table, page, seq, window=w),
                      None, True))
    return [Case(*c) for c in cases]


def _moe_cases(s: dict, dtype, device, gen):
    """The router's two kernels (route = router_input, torch's GEMM, softmax_topk) and the experts.
    The router's stages are checked apart: a one-ULP difference in z moves the logits, and with
    them the near-ties of the top-k, so only equal logits make the top-k comparable."""
    T, H, E, k, inter, eps = s["T"], s["moe_H"], s["E"], s["top_k"], s["moe_I"], 1e-6

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    def weight(n):
        return (0.5 + torch.rand(n, generator=gen)).to(device=device, dtype=dtype)

    r = rnd(T, 2 * H)[:, H:]  # a column view, as the stream is in the fused path's buffers
    scale, pes, proj_w = weight(H), weight(E), rnd(E, H, scale=H ** -0.5)
    logits = F.linear(moe.router_input_eager(r, scale, eps), proj_w)
    top_w, top_i = moe.route_eager(r, scale, proj_w, pes, k, eps)
    xe = rnd(T, H)
    gate_up, down = rnd(E, 2 * inter, H, scale=H ** -0.5), rnd(E, H, inter, scale=inter ** -0.5)

    def dense(routing):  # weights scattered to [T, E]: a different expert shows as a large error
        w, i = routing
        return torch.zeros(T, E, dtype=w.dtype, device=device).scatter(1, i, w)

    def torch_softmax_topk():  # ops.route's tail
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, i = torch.topk(probs, k=k, dim=-1)
        return w / w.sum(-1, keepdim=True) * pes[i], i

    return [
        Case("router_input", f"[{T}, {H}] strided", lambda: moe.router_input(r, scale, eps),
             lambda: moe.router_input_eager(r, scale, eps), lambda: ops.rms_norm(r, None, eps) * scale * H ** -0.5),
        Case("softmax_topk", f"[{T}, {E}] top {k}", lambda: dense(moe.softmax_topk(logits, pes, k)),
             lambda: dense(moe.softmax_topk_eager(logits, pes, k)), torch_softmax_topk, compare_dtype=torch.float32),
        Case("experts", f"[{T}, {H}], {E} experts, top {k}, I {inter}",
             lambda: moe.experts(xe, top_w, top_i, gate_up, down),
             lambda: moe.experts_eager(xe, top_w, top_i, gate_up, down),
             lambda: ops.experts(xe, top_w, top_i, gate_up, down), relative=True),
    ]


def _flat(out) -> torch.Tensor:
    if isinstance(out, tuple):
        return torch.cat([t.reshape(-1) for t in out if t is not None])
    return out.reshape(-1)


def run_kernel_check(device: torch.device, dtypes=(torch.float32, torch.bfloat16), size: str = "small",
                     repeats: int = 5, seed: int = 0, progress: Callable[[str], None] | None = None) -> list[KernelResult]:
    results = []
    for dtype in dtypes:
        gen = torch.Generator().manual_seed(seed)
        for case in _cases(SIZES[size], dtype, device, gen):
            if progress:
                progress(f"{case.name} {str(dtype).removeprefix('torch.')}")
            out_dtype = case.compare_dtype or dtype
            got, want = _flat(case.kernel()), _flat(case.eager())
            finite = torch.isfinite(want)
            ulps = ulp_distance(got[finite], want[finite], out_dtype)
            max_ulp = float(ulps.max()) if ulps.numel() else 0.0
            top = want[finite].abs().max() if finite.any() else torch.zeros((), device=want.device)
            err = (got[finite].double() - want[finite].double()).abs().max() if finite.any() else top
            scale_ulp = float(err / ulp(top, out_dtype)) if finite.any() else 0.0
            rel = rel_l2(got, want)
            ok = bool(torch.isfinite(got[finite]).all()) and (
                rel <= ATTN_REL_BOUND[out_dtype] if case.relative else scale_ulp <= ULP_BOUND[out_dtype])
            results.append(KernelResult(
                case.name, case.shape, str(dtype).removeprefix("torch."), max_ulp, scale_ulp, rel, ok,
                _time_us(case.kernel, device, repeats), _time_us(case.eager, device, repeats),
                None if case.unfused is None else _time_us(case.unfused, device, repeats)))
    return results


def format_table(results: list[KernelResult]) -> str:
    lines = ["| op | shape | dtype | max ULP (own / at scale) | rel L2 | ok | kernel µs | eager µs | unfused µs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        unf = "-" if r.unfused_us is None else f"{r.unfused_us:.1f}"
        lines.append(f"| {r.name} | {r.shape} | {r.dtype} | {r.max_ulp:.0f} / {r.scale_ulp:.1f} | {r.rel:.2e} | "
                     f"{'ok' if r.passed else 'FAIL'} | {r.time_us:.1f} | {r.eager_us:.1f} | {unf} |")
    return "\n".join(lines)
