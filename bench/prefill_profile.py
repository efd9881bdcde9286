"""Where a long prefill's time goes: the engine's wall time for one prompt, then the profiler's
kernel table of the same prefill grouped by what each kernel does, with the TFLOP/s of the
projections (GEMMs) and of the extend attention at each head dim.

    python bench/prefill_profile.py --model e2b --tokens 8192 --out reports/prefill_profile.json
    python bench/prefill_profile.py --quick      # a smoke run on the tiny preset (any device)

One request of --tokens random ids, prefilled in one chunk (chunk size = tokens), the fused path,
no decode graphs (prefill never uses them). Wall time is the median of --repeats prefills; the
kernel table is one more prefill under torch.profiler (device time per kernel, summed by group),
and from the same profile the device's idle time and its largest idle stretches (`idle_time`).

FLOPs counted: projections 2 * tokens * (weights read per token, the per-layer embedding table and
lm_head excluded: a prefill computes the logits of its last token only); attention, per layer,
4 * Hq * D * (visible (query, key) pairs), the pairs of a causal prompt (n(n+1)/2) or of a window
(sum of min(pos + 1, window)). Kernels are split by name: `_extend_kernel` is attention; the
extend launches alternate head dims by layer type, so attention FLOPs are summed over all layers
and set against all its launches together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized.kernels import default_device, device_name  # noqa: E402  (first: it may switch on the interpreter)

import torch  # noqa: E402
from decode_profile import kernel_group, kernel_table, profiled_events  # noqa: E402
from engine_bench import prefill_ms, sync  # noqa: E402
from optimized.engine import Engine, SamplingParams  # noqa: E402
from reference.weights import expected_shapes, resolve  # noqa: E402

# Kernel name patterns, first match wins: what each group of a prefill's kernels does.
GROUPS = (
    ("attention", ("_extend_kernel",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul", "_gate_up_kernel", "_down_kernel")),
    ("norms/rope/store", ("norm", "rope", "_post_ffn", "qkv")),
    ("activation", ("gelu", "softcap")),
    ("moe routing", ("topk", "router", "sort", "searchsorted", "_combine", "group")),
    ("copies", ("copy", "memcpy", "memset", "fill", "cat")),
)


def group_of(kernel: str) -> str:
    low = kernel.lower()
    for group, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return group
    return "other"


def attention_flops(config, n: int) -> float:
    """Multiply-adds x 2 of QK^T and PV over every layer's visible pairs of an n-token prompt."""
    total = 0.0
    for spec in config.layers:
        w = spec.window
        if w is None or w >= n:
            pairs = n * (n + 1) / 2
        else:  # positions < w see pos + 1 keys, the rest see w
            pairs = w * (w + 1) / 2 + (n - w) * w
        total += 4.0 * config.num_attention_heads * spec.head_dim * pairs
    return total


def projection_flops(config, n: int) -> float:
    skip = ("embed_tokens_per_layer.weight", "embed_tokens.weight")
    params = sum(torch.Size(s).numel() for k, s in expected_shapes(config).items()
                 if k not in skip and len(s) >= 2 and ".experts." not in k)
    if config.enable_moe_block:  # each token runs top_k of the experts
        params += sum(torch.Size(s).numel() for k, s in expected_shapes(config).items()
                      if ".experts." in k) * config.top_k_experts / config.num_experts
    return 2.0 * n * params


def profile_prefill(engine: Engine, n: int, gen) -> tuple[list[dict], dict]:
    """One n-token prefill under the profiler: its kernels (name, group, launches, device us;
    largest first) and the device's idle stretches (`idle_time`)."""
    ids = torch.randint(3, engine.config.vocab_size, (n,), generator=gen).tolist()
    engine.add_request(ids, SamplingParams(max_new_tokens=1))
    sync(engine.device)

    def prefill():
        while engine.has_work():
            engine.step()

    events = profiled_events(engine, prefill)
    rows = sorted(({"kernel": k, "group": group_of(k), "launches": c, "us": us}
                   for k, (c, us) in kernel_table(events).items()), key=lambda r: -r["us"])
    return rows, idle_time(events)


def _gaps(events: list) -> tuple[list[tuple[float, float, str, str]], float, float]:
    """The device's idle stretches (start us, end us, kernel before, kernel after) from the run's
    first host op to its last host op or kernel, and that span's ends."""
    cuda = torch.autograd.DeviceType.CUDA
    dev = sorted((e.time_range.start, e.time_range.end, kernel_group(e.name)) for e in events if e.device_type == cuda)
    host = [e for e in events if e.device_type != cuda]
    if not dev or not host:
        return [], 0.0, 0.0
    t0 = min(e.time_range.start for e in host)
    t1 = max(max(e.time_range.end for e in host), dev[-1][1])
    gaps, at, before = [], t0, "(start)"
    for start, end, name in dev:
        if start > at:
            gaps.append((at, start, before, name))
        if end > at:
            at, before = end, name
    if t1 > at:
        gaps.append((at, t1, before, "(end)"))
    return gaps, t0, t1


def idle_time(events: list) -> dict:
    """The device's idle time in a profiled run (its span less the union of the kernels' spans)
    and its largest idle stretches, each between the kernels it separates."""
    gaps, t0, t1 = _gaps(events)
    if not gaps:
        return {}
    largest = sorted(gaps, key=lambda g: g[1] - g[0], reverse=True)[:8]
    return {"span_ms": (t1 - t0) / 1e3, "idle_ms": sum(b - a for a, b, *_ in gaps) / 1e3, "idle_gaps": len(gaps),
            "largest": [{"at_ms": (a - t0) / 1e3, "ms": (b - a) / 1e3, "after": k0, "before": k1}
                        for a, b, k0, k1 in sorted(largest)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="e2b")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = default_device()
    dtype = torch.bfloat16 if device.type != "cpu" else torch.float32
    if args.quick:
        args.model, args.tokens, args.repeats = "tiny", 64, 1
    config, weights = resolve(args.model, dtype, device, 0)
    gen = torch.Generator().manual_seed(0)
    n = args.tokens
    engine = Engine(config, weights=weights, dtype=dtype, device=device, fused=True, graphs=False,
                    max_context=n + 1, chunk_size=n)
    prefill_ms(engine, n, gen)  # warm-up: compilation at these shapes
    ms = statistics.median(prefill_ms(engine, n, gen) for _ in range(args.repeats))
    out = {"device": device_name(device), "model": args.model, "dtype": str(dtype), "torch": torch.__version__,
           "tokens": n, "prefill_ms": ms}
    print(f"device {out['device']}; {args.model} {out['dtype']}; prefill of {n} tokens in one chunk: "
          f"{ms:.1f} ms (median of {args.repeats})", flush=True)

    rows, idle = profile_prefill(engine, n, gen)
    out["kernels"] = rows
    out["idle"] = idle
    by_group: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for r in rows:
        by_group[r["group"]][0] += r["launches"]
        by_group[r["group"]][1] += r["us"]
    device_ms = sum(us for _, us in by_group.values()) / 1e3
    flops = {"attention": attention_flops(config, n), "gemm": projection_flops(config, n)}
    out["device_ms"] = device_ms
    out["groups"] = []
    print(f"profiled prefill: device time {device_ms:.1f} ms over {sum(c for c, _ in by_group.values()):.0f} launches")
    print(f"{'group':18s} {'launches':>8s} {'ms':>8s} {'share':>6s} {'TFLOP/s':>8s}")
    for g, (c, us) in sorted(by_group.items(), key=lambda kv: -kv[1][1]):
        tflops = flops[g] / (us * 1e-6) / 1e12 if g in flops and us > 0 else None
        out["groups"].append(dict(group=g, launches=c, ms=us / 1e3, tflops=tflops))
        print(f"{g:18s} {c:8.0f} {us / 1e3:8.2f} {100 * us / 1e3 / max(device_ms, 1e-9):5.1f}% "
              f"{'' if tflops is None else f'{tflops:8.1f}'}")
    print(f"{'kernel':80s} {'launches':>8s} {'ms':>8s}")
    for r in rows[:20]:
        print(f"{r['kernel']:80s} {r['launches']:8.0f} {r['us'] / 1e3:8.2f}")
    if idle:
        print(f"profiled prefill: span {idle['span_ms']:.1f} ms, device idle {idle['idle_ms']:.1f} ms in "
              f"{idle['idle_gaps']} stretches; the largest:")
        for g in idle["largest"]:
            print(f"  at {g['at_ms']:7.2f} ms: {g['ms']:6.2f} ms idle after {g['after'][:40]}, before {g['before'][:40]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
