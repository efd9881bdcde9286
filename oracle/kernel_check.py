"""`gemma4-testbed kernels`: every public Triton op against its eager twin on the current device,
on freshly generated inputs, with strided (column-view) inputs where the model feeds them.

Per op: max error in ULPs of the compared dtype and relative L2 error against the eager twin,
pass/fail against the op's bound, and the median time of the kernel, the eager twin and the
unfused torch sequence the paged model otherwise runs (`optimized/ops.py`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from optimized import ops
from optimized.kernels import activation, attention, capture_graph, gemv, graphs_supported, moe, norms, rope
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

# Tokens, hidden, heads q and kv, head dim, intermediate, vocab, context; then, for a model with a
# MoE block, its experts, top k and expert intermediate. "e2b" keeps 26B-A4B's MoE block (E2B has
# none) so that one run covers every kernel.
SMALL = dict(T=24, H=64, Hq=4, Hkv=2, D=32, I=96, V=256, ctx=40, moe_H=64, E=16, top_k=4, moe_I=32)


def sizes_for(name: str, T: int = 2048) -> dict:
    """The kernels' input sizes: "small" (CPU, interpreter), or a preset's sliding-layer shapes at
    T tokens (the MoE sizes from 26B-A4B where the preset has no MoE block)."""
    if name == "small":
        return dict(SMALL)
    from reference.presets import get_preset

    c = get_preset(name)
    moe = c if c.enable_moe_block else get_preset("26b-a4b")
    return dict(T=T, H=c.hidden_size, Hq=c.num_attention_heads, Hkv=c.num_key_value_heads, D=c.head_dim,
                I=c.intermediate_size, V=c.vocab_size, ctx=4096, moe_H=moe.hidden_size, E=moe.num_experts,
                top_k=moe.top_k_experts, moe_I=moe.moe_intermediate_size)


class Case(NamedTuple):
    name: str
    shape: str
    kernel: Callable
    eager: Callable
    unfused: Callable | None = None  # the torch sequence the paged model runs without the kernel
    relative: bool = False  # bounded by relative L2 error (sums in another order), not by ULPs
    compare_dtype: torch.dtype | None = None  # the outputs' dtype, where it is not the model's
    bytes: int = 0  # the least memory traffic the op needs (inputs read once, outputs written once)
    flops: int = 0  # for the compute-bound ops (the expert GEMMs)
    sum_len: int = 0  # the GEMVs: products summed per output; widens the float32 bound (see _ulp_bound)


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
    bytes: int = 0
    flops: int = 0
    graphed: list[str] = field(default_factory=list)  # which times are device-graph replays (no host launch cost)

    @property
    def gbps(self) -> float | None:
        return self.bytes / self.time_us / 1e3 if self.bytes and self.time_us > 0 else None

    def to_dict(self) -> dict:
        return dict(self.__dict__, gbps=self.gbps)


class Timer:
    """Median time of a callable in µs. On an accelerator: device events around each run, with the
    L2 cache flushed before it (so a kernel re-reading last run's inputs does not look faster than
    memory allows); on the CPU, the host clock.

    With `graphs`, a callable is captured once into a device graph where the device supports them
    and the graph's replay is timed: the device time of its kernels without the host's launch cost
    (which at decode sizes is larger than the kernels, and which an engine removes the same way).
    A callable that cannot be captured (it syncs with the host) is timed as it is; `last_graphed`
    says which happened.

    Semantics are triton.testing.do_bench's (warm-up runs, then per-run device events with the L2
    flushed by zeroing a 256 MB buffer before each run, the same flush do_bench does;
    return_mode="median"), plus the per-run graph replay. Why not call triton.testing itself
    (checked against Triton 3.9):
    - do_bench times plain launches, host launch cost included, and repeats for a time budget
      (`rep` ms), not a count: `--repeats 1` could not mean one run.
    - do_bench_cudagraph unrolls n calls into one graph and times the whole replay without
      flushing L2 between them, so a decode-sized kernel re-reads its inputs from L2 and looks
      faster than memory allows; it is CUDA-only (torch.cuda streams) and raises on a callable
      that syncs with the host, where this falls back to plain launches.
    - Both go through triton's active driver, which has no CPU backend: under the interpreter
      (`gemma4-testbed kernels` on a CPU box) they cannot run, so the host clock is used here."""

    def __init__(self, device: torch.device, repeats: int, warmup: int = 1, flush_mb: int = 256,
                 graphs: bool = False):
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.accel = device.type != "cpu"
        self.flush = torch.empty(flush_mb << 18, dtype=torch.int32, device=device) if self.accel and flush_mb else None
        self.graphs = graphs and graphs_supported(device)
        self.last_graphed = False

    def _capture(self, fn: Callable) -> Callable | None:
        try:
            graph, _ = capture_graph(self.device, fn)
        except RuntimeError:  # a host sync inside fn; the capture is abandoned
            torch.accelerator.synchronize()
            return None
        return graph.replay

    def __call__(self, fn: Callable) -> float:
        for _ in range(self.warmup):  # compilation stays out of the numbers
            fn()
        if self.accel:
            torch.accelerator.synchronize()
        run = self._capture(fn) if self.graphs else None
        self.last_graphed = run is not None
        run = run or fn
        times = []
        for _ in range(self.repeats):
            if self.flush is not None:
                self.flush.zero_()
            if self.accel:
                start, end = torch.Event(enable_timing=True), torch.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)


def copy_bandwidth(timer: Timer, device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy, read and write counted: the bandwidth a memory-bound
    kernel can hope for. Never timed from a device graph: on an H100 a graphed copy measured
    2.4 TB/s where the plain one measured 3.0 (in a graph the copy may go to a copy engine)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    plain = Timer(timer.device, timer.repeats, timer.warmup, flush_mb=0)
    return 2 * nbytes / (plain(lambda: dst.copy_(src)) * 1e-6)


def build_cases(s: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator, attention: bool = True):
    """One Case per op; the paged attention kernels only with `attention` (they need a context).
    Inputs are drawn with `gen` on its own device (a device generator keeps large sizes fast) and
    moved to `device`."""
    T, H, Hq, Hkv, D, inter, V = s["T"], s["H"], s["Hq"], s["Hkv"], s["D"], s["I"], s["V"]
    b = torch.finfo(dtype).bits // 8

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=gen.device) * scale).to(device=device, dtype=dtype)

    def weight(n):
        return (0.5 + torch.rand(n, generator=gen, device=gen.device)).to(device=device, dtype=dtype)

    eps = 1e-6
    x, r, w, w2, w3 = rnd(T, H), rnd(T, H), weight(H), weight(H), weight(H)
    scalar = weight(1)
    qkv = rnd(T, (Hq + 2 * Hkv) * D)  # one fused projection; q/k/v are column views of it
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    wq, wk = weight(D), weight(D)
    gate_up = rnd(T, 2 * inter)
    rows = min(T, 64)  # logits are computed for the sampled rows only
    logits = rnd(rows, V, scale=20.0)
    positions = torch.arange(T, device=device) + 1000
    inv = ops.rope_inv_freq(RopeSpec("proportional", 1e6, 0.25), D, device)
    slots = (torch.randperm(2 * T, generator=gen, device=gen.device)[:T] + 1).to(device)

    def store(fn):  # each variant writes its own pools in place (the same slots every run)
        pools = [torch.zeros(2 * T + 1, Hkv, D, device=device, dtype=dtype) for _ in range(2)]

        def run():
            fn(k, v, positions, inv, *pools, slots)
            return tuple(pools)
        return run

    def epilogue(fn, mode):  # the q/k/v norms + RoPE + store: q, and each variant's own pools
        pools = [torch.zeros(2 * T + 1, Hkv, D, device=device, dtype=dtype) for _ in range(2)]
        kk, vv, wk_ = (None, None, None) if mode == "q only" else (k, k if mode == "k=v" else v, wk)

        def run():
            return (fn(q, kk, vv, wq, wk_, eps, positions, inv, *pools, slots), *pools)
        return run

    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    stream = T * H * b
    out = [
        Case("rms_norm", f"[{T}, {H}]", lambda: norms.rms_norm(x, w, eps), lambda: norms.rms_norm_eager(x, w, eps),
             lambda: ops.rms_norm(x, w, eps), bytes=2 * stream),
        Case("add_rms_norm", f"[{T}, {H}]", lambda: norms.add_rms_norm(x, r, w, eps, x_weight=w2),
             lambda: norms.add_rms_norm_eager(x, r, w, eps, x_weight=w2),
             lambda: ops.add_rms_norm(x, r, w, eps, x_weight=w2), bytes=4 * stream),
        Case("qkv_norm", f"q [{T}, {Hq}, {D}] strided", lambda: norms.qkv_norm(q, k, v, wq, wk, eps),
             lambda: norms.qkv_norm_eager(q, k, v, wq, wk, eps), lambda: ops.qkv_norm(q, k, v, wq, wk, eps),
             bytes=2 * qkv.numel() * b),
        Case("post_ffn_residual_scale", f"[{T}, {H}]", lambda: norms.post_ffn_residual_scale(x, r, w, eps, scalar),
             lambda: norms.post_ffn_residual_scale_eager(x, r, w, eps, scalar),
             lambda: ops.post_ffn_residual_scale(x, r, w, eps, scalar), bytes=3 * stream),
        Case("post_ffn_residual_scale (next norm)", f"[{T}, {H}], normed stored",  # the pass that ends a layer
             lambda: norms.post_ffn_residual_scale(x, r, w, eps, scalar, return_normed=True, next_weight=w3),
             lambda: norms.post_ffn_residual_scale_eager(x, r, w, eps, scalar, return_normed=True, next_weight=w3),
             lambda: ops.post_ffn_residual_scale(x, r, w, eps, scalar, return_normed=True, next_weight=w3),
             bytes=5 * stream),
        Case("post_ffn_moe_residual_scale", f"[{T}, {H}]",
             lambda: norms.post_ffn_moe_residual_scale(x, r, r, w, w2, w3, eps, scalar),
             lambda: norms.post_ffn_moe_residual_scale_eager(x, r, r, w, w2, w3, eps, scalar),
             lambda: ops.post_ffn_moe_residual_scale(x, r, r, w, w2, w3, eps, scalar), bytes=4 * stream),
        Case("gelu_tanh_mul", f"[{T}, {inter}] halves", lambda: activation.gelu_tanh_mul(gate, up),
             lambda: activation.gelu_tanh_mul_eager(gate, up), lambda: ops.gelu_tanh_mul(gate, up),
             bytes=3 * T * inter * b),
        Case("softcap", f"[{rows}, {V}]", lambda: activation.softcap(logits, 30.0),
             lambda: activation.softcap_eager(logits, 30.0), lambda: ops.softcap(logits, 30.0),
             bytes=2 * logits.numel() * b),
        Case("apply_rope", f"q [{T}, {Hq}, {D}] proportional", lambda: rope.apply_rope(q, positions, inv),
             lambda: rope.apply_rope_eager(q, positions, inv), lambda: ops.apply_rope(q, positions, inv),
             bytes=2 * T * Hq * D * b),
        Case("rope_and_store_kv", f"k/v [{T}, {Hkv}, {D}]",
             store(rope.rope_and_store_kv), store(rope.rope_and_store_kv_eager), store(ops.rope_and_store_kv),
             bytes=4 * T * Hkv * D * b),
    ]
    # q/k/v read, q written, k and v written to the pools (k=v: the keys read once; q only: no pools)
    for mode, heads in (("q/k/v", 2 * Hq + 4 * Hkv), ("k=v", 2 * Hq + 3 * Hkv), ("q only", 2 * Hq)):
        out.append(Case("qkv_norm_rope_store" + ("" if mode == "q/k/v" else f" ({mode})"),
                        f"q [{T}, {Hq}, {D}] strided, proportional",
                        epilogue(rope.qkv_norm_rope_store, mode), epilogue(rope.qkv_norm_rope_store_eager, mode),
                        epilogue(ops.qkv_norm_rope_store, mode), bytes=heads * T * D * b))
    out += _gemv_cases(s, dtype, device, gen)
    if attention:
        out += _attention_cases(s, dtype, device, gen)
    return out + _moe_cases(s, dtype, device, gen)


def _gemv_cases(s: dict, dtype, device, gen):
    """The few-row GEMVs at the most rows the model runs them at (min(T, gemv.row_limit), at least
    one), the kernel forced by its launch settings (an op whose limit is 0 or below the rows would
    otherwise take the unfused path): the q/k/v projection (plain, of the already normed input),
    gate_up + gated GELU (the mlp_gate_up tap stored), the PLE gate (up a strided slice of the
    per-layer inputs) and a plain projection (down); all but gate_up split over K where compiled,
    past one row."""
    H, Hq, Hkv, D, inter = s["H"], s["Hq"], s["Hkv"], s["D"], s["I"]
    P, b = 256 if H >= 1024 else 8, torch.finfo(dtype).bits // 8
    m1 = min(s["T"], max(gemv.row_limit(True, dtype), 1))  # the stacked gate_up
    m = min(s["T"], max(gemv.row_limit(False, dtype), 1))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=gen.device) * scale).to(device=device, dtype=dtype)

    x, act = rnd(m, H), rnd(m, inter)
    x1 = x[:m1]
    w_qkv, w_gu = rnd((Hq + 2 * Hkv) * D, H, scale=H ** -0.5), rnd(2 * inter, H, scale=H ** -0.5)
    w_down, w_gate = rnd(H, inter, scale=inter ** -0.5), rnd(P, H, scale=H ** -0.5)
    ple = rnd(m, 3, P)[:, 1, :]  # one layer's slice of [T, L, P]: rows strided
    n_qkv = w_qkv.shape[0]

    def ls(n, rows=m):
        return gemv.launch_settings(rows, n)

    return [
        Case("linear (qkv)", f"[{m}, {H}] x [{n_qkv}, {H}]",
             lambda: gemv.linear(x, w_qkv, settings=ls(n_qkv)),
             lambda: gemv.linear_eager(x, w_qkv), lambda: ops.linear(x, w_qkv),
             bytes=(w_qkv.numel() + m * H + m * n_qkv) * b, sum_len=H),
        Case("linear_gelu_mul", f"[{m1}, {H}] x [{2 * inter}, {H}], gate_up stored",
             lambda: gemv.linear_gelu_mul(x1, w_gu, return_gate_up=True, settings=ls(inter, m1)),
             lambda: gemv.linear_gelu_mul_eager(x1, w_gu, return_gate_up=True),
             lambda: ops.linear_gelu_mul(x1, w_gu, return_gate_up=True),
             bytes=(w_gu.numel() + m1 * H + 3 * m1 * inter) * b, sum_len=H),
        Case("linear_gelu_mul (ple gate)", f"[{m}, {H}] x [{P}, {H}], up strided",
             lambda: gemv.linear_gelu_mul(x, w_gate, ple, settings=ls(P)), lambda: gemv.linear_gelu_mul_eager(x, w_gate, ple),
             lambda: ops.linear_gelu_mul(x, w_gate, ple), bytes=(w_gate.numel() + m * H + 2 * m * P) * b, sum_len=H),
        Case("linear", f"[{m}, {inter}] x [{H}, {inter}]", lambda: gemv.linear(act, w_down, settings=ls(H)),
             lambda: gemv.linear_eager(act, w_down), lambda: ops.linear(act, w_down),
             bytes=(w_down.numel() + m * inter + m * H) * b, sum_len=inter),
    ]


def _attention_cases(s: dict, dtype, device, gen):
    Hq, Hkv, D, ctx, page = s["Hq"], s["Hkv"], s["D"], s["ctx"], 16
    B, new = 4, min(s["T"], ctx) // 4
    n_pages = B * (-(-ctx // page)) + 1
    k_pool = torch.randn(n_pages * page, Hkv, D, generator=gen, device=gen.device).to(device=device, dtype=dtype)
    v_pool = torch.randn(n_pages * page, Hkv, D, generator=gen, device=gen.device).to(device=device, dtype=dtype)
    table = (torch.randperm(n_pages - 1, generator=gen, device=gen.device) + 1).view(B, -1).to(device=device, dtype=torch.int32)
    seq = torch.full((B,), ctx, dtype=torch.int32, device=device)
    cu = torch.arange(0, (B + 1) * new, new, dtype=torch.int32, device=device)
    q_ext = torch.randn(B * new, Hq, D, generator=gen, device=gen.device).to(device=device, dtype=dtype)
    q_dec = torch.randn(B, Hq, D, generator=gen, device=gen.device).to(device=device, dtype=dtype)
    window = 512 if D >= 256 else 5
    cases = []
    for win in (None, window):
        tag = "full" if win is None else f"window {win}"
        cases.append(Case(f"extend_attention ({tag})", f"B {B}, {new} new of {ctx}, {Hq}:{Hkv}, D {D}",
                          lambda w=win: attention.extend_attention(q_ext, k_pool, v_pool, table, page, cu, seq, window=w),
                          lambda w=win: attention.extend_attention_eager(q_ext, k_pool, v_pool, table, page, cu, seq,
                                                                         window=w),
                          relative=True))
        cases.append(Case(f"decode_attention ({tag})", f"B {B}, {ctx} keys, {Hq}:{Hkv}, D {D}",
                          lambda w=win: attention.decode_attention(q_dec, k_pool, v_pool, table, page, seq, window=w),
                          lambda w=win: attention.decode_attention_eager(q_dec, k_pool, v_pool, table, page, seq,
                                                                         window=w),
                          relative=True))
    return cases


def _moe_cases(s: dict, dtype, device, gen):
    """The router's two kernels (route = router_input, torch's GEMM, softmax_topk) and the experts.
    The router's stages are checked apart: a one-ULP difference in z moves the logits, and with
    them the near-ties of the top-k, so only equal logits make the top-k comparable."""
    T, H, E, k, inter, eps = s["T"], s["moe_H"], s["E"], s["top_k"], s["moe_I"], 1e-6
    b = torch.finfo(dtype).bits // 8

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=gen.device) * scale).to(device=device, dtype=dtype)

    def weight(n):
        return (0.5 + torch.rand(n, generator=gen, device=gen.device)).to(device=device, dtype=dtype)

    r = rnd(T, 2 * H)[:, H:]  # a column view, as the stream is in the fused path's buffers
    scale, pes, proj_w = weight(H), weight(E), rnd(E, H, scale=H ** -0.5)
    logits = F.linear(moe.router_input_eager(r, scale, eps), proj_w)
    top_w, top_i = moe.route_eager(r, scale, proj_w, pes, k, eps)
    xe = rnd(T, H)
    gate_up, down = rnd(E, 2 * inter, H, scale=H ** -0.5), rnd(E, H, inter, scale=inter ** -0.5)
    used = int(top_i.unique().numel())  # experts whose weights the experts op must read

    def dense(routing):  # weights scattered to [T, E]: a different expert shows as a large error
        w, i = routing
        return torch.zeros(T, E, dtype=w.dtype, device=device).scatter(1, i, w)

    def torch_softmax_topk():  # ops.route's tail
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, i = torch.topk(probs, k=k, dim=-1)
        return w / w.sum(-1, keepdim=True) * pes[i], i

    return [
        Case("router_input", f"[{T}, {H}] strided", lambda: moe.router_input(r, scale, eps),
             lambda: moe.router_input_eager(r, scale, eps), lambda: ops.rms_norm(r, None, eps) * scale * H ** -0.5,
             bytes=2 * T * H * b),
        Case("softmax_topk", f"[{T}, {E}] top {k}", lambda: dense(moe.softmax_topk(logits, pes, k)),
             lambda: dense(moe.softmax_topk_eager(logits, pes, k)), torch_softmax_topk, compare_dtype=torch.float32),
        # Integers (and the weights, permuted): compared as float32, exact (ids < 2^24); any
        # difference is a wrong layout.
        Case("group_by_expert", f"[{T}, {k}] over {E} experts", lambda: moe.group_by_expert(top_w, top_i, E),
             lambda: moe.group_by_expert_eager(top_w, top_i, E), compare_dtype=torch.float32,
             bytes=T * k * (top_w.element_size() + top_i.element_size()) * 2 + T * k * 4 + (E + 1) * 4),
        Case("experts", f"[{T}, {H}], {E} experts, top {k}, I {inter}",
             lambda: moe.experts(xe, top_w, top_i, gate_up, down),
             lambda: moe.experts_eager(xe, top_w, top_i, gate_up, down),
             lambda: ops.experts(xe, top_w, top_i, gate_up, down), relative=True,
             bytes=(used * 3 * inter * H + 2 * T * H) * b, flops=2 * T * k * 3 * inter * H),
    ]


def _flat(out) -> torch.Tensor:
    if isinstance(out, tuple):
        return torch.cat([t.reshape(-1) for t in out if t is not None])
    return out.reshape(-1)


def _ulp_bound(case: Case, dtype: torch.dtype) -> float:
    """ULP_BOUND, except for a float32 GEMV: its sum of `sum_len` products in another order than
    cuBLAS's drifts like a random walk of roundings, about sqrt(K) float32 ULPs at the output's
    scale; a bf16/fp16 output's one rounding hides that drift (its ULP is 2^16 times larger)."""
    if case.sum_len and dtype == torch.float32:
        return ULP_BOUND[dtype] + case.sum_len ** 0.5
    return ULP_BOUND[dtype]


def check_case(case: Case, dtype: torch.dtype, timer: Timer, time_twins: bool = True) -> KernelResult:
    """Run one case: kernel against eager twin on the same inputs, then time the kernel and (with
    `time_twins`) the eager twin and the unfused torch sequence."""
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
        rel <= ATTN_REL_BOUND[out_dtype] if case.relative else scale_ulp <= _ulp_bound(case, out_dtype))
    graphed = []

    def time_us(what: str, fn: Callable | None) -> float | None:
        if fn is None:
            return None
        t = timer(fn)
        if timer.last_graphed:
            graphed.append(what)
        return t

    times = (time_us("kernel", case.kernel), time_us("eager", case.eager) if time_twins else float("nan"),
             time_us("unfused", case.unfused) if time_twins else None)
    return KernelResult(case.name, case.shape, str(dtype).removeprefix("torch."), max_ulp, scale_ulp, rel, ok,
                        *times, case.bytes, case.flops, graphed)


def run_kernel_check(device: torch.device, dtypes=(torch.float32, torch.bfloat16), size: str = "small",
                     repeats: int = 5, seed: int = 0, progress: Callable[[str], None] | None = None) -> list[KernelResult]:
    """Every case at `size` (see sizes_for) in each dtype."""
    timer = Timer(device, repeats)
    results = []
    for dtype in dtypes:
        gen = torch.Generator().manual_seed(seed)
        for case in build_cases(sizes_for(size), dtype, device, gen):
            if progress:
                progress(f"{case.name} {str(dtype).removeprefix('torch.')}")
            results.append(check_case(case, dtype, timer))
    return results


def format_table(results: list[KernelResult]) -> str:
    lines = ["| op | shape | dtype | max ULP (own / at scale) | rel L2 | ok | kernel µs | eager µs | unfused µs "
             "| kernel GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        unf = "-" if r.unfused_us is None else f"{r.unfused_us:.1f}"
        gbps = "-" if r.gbps is None else f"{r.gbps:.0f}"
        lines.append(f"| {r.name} | {r.shape} | {r.dtype} | {r.max_ulp:.0f} / {r.scale_ulp:.1f} | {r.rel:.2e} | "
                     f"{'ok' if r.passed else 'FAIL'} | {r.time_us:.1f} | {r.eager_us:.1f} | {unf} | {gbps} |")
    return "\n".join(lines)
