"""Where a decode step's time goes, beside the bandwidth floor and transformers, in one run.

    python bench/decode_profile.py --model e2b --out reports/decode_profile.json
    python bench/decode_profile.py --quick        # a smoke run on the tiny preset (any device)

One run measures, on random weights of a real model shape in bf16:
- the card's copy bandwidth (a large device-to-device copy, median of repeats) and from it the
  floor of a decode step: every weight a step reads (all but the per-layer embedding table, of
  which a step reads one row per token) read once;
- the engine's steady decode (tok/s and ms/step) at each batch size, decode steps replayed from
  device graphs where the device has them (bench/engine_bench.py's measure), with the engine's
  overlap on and off (design note 32), interleaved run by run; with --pdl both, also with programmatic dependent
  launch on and off (optimized/kernels/pdl.py);
- the profiler's view of eager decode steps at batch 1 and 32 (overlap off, so each profiled step is
  one step's kernels): kernel launches per step and device time per kernel (grouped by name),
  the table issue 12 asks for before and after each change;
- transformers' `generate` (sdpa, greedy) on the same shape at the same batch sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized.kernels import default_device, device_name, graphs_supported  # noqa: E402  (first: it may switch on the interpreter)

import torch  # noqa: E402
from engine_bench import decode_rate, sync  # noqa: E402
from optimized.engine import Engine, SamplingParams  # noqa: E402
from optimized.kernels import pdl  # noqa: E402
from optimized.model import share_projection_storage  # noqa: E402
from reference.weights import expected_shapes, resolve  # noqa: E402


def copy_bandwidth(device, mb: int = 1024, repeats: int = 10) -> float:
    """GB/s of a device-to-device copy (read + write counted), median of repeats."""
    src = torch.empty(mb << 18, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times[1:]) / 1e9


def decode_bytes(config, dtype, batch: int = 1) -> int:
    """Bytes of weights one decode step of `batch` requests reads: everything but the per-layer
    embedding table, and of a MoE layer's experts only those the batch routes to: with top-k of E
    drawn about evenly, the expected share is 1 - (1 - k/E)^batch (8 of 128 at batch 1: 6%)."""
    size = torch.empty((), dtype=dtype).element_size()
    share = 1.0
    if config.enable_moe_block:
        share = 1.0 - (1.0 - config.top_k_experts / config.num_experts) ** batch
    total = 0.0
    for k, s in expected_shapes(config).items():
        if k != "embed_tokens_per_layer.weight":
            total += math.prod(s) * (share if ".experts." in k else 1.0)
    return int(total) * size


def kernel_group(name: str) -> str:
    """A kernel's name without template arguments and launch suffixes, so repeats group together."""
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"\(.*", "", name)
    return name[:80]


def profiled_events(engine: Engine, run) -> list:
    """Run `run()` (then wait for the device) under torch.profiler: its host and device events."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        run()
        sync(engine.device)
    return list(prof.events())


def device_kernels(engine: Engine, run) -> dict[str, tuple[int, float]]:
    """{kernel group: (launches, device us)} of `run()` under torch.profiler."""
    return kernel_table(profiled_events(engine, run))


def kernel_table(events: list) -> dict[str, tuple[int, float]]:
    """{kernel group: (launches, device us)} of profiled events, each kernel's (or copy's) own
    span on the device; empty without CUDA."""
    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            g = groups[kernel_group(e.name)]
            g[0] += 1
            g[1] += e.time_range.elapsed_us()
    return {k: (n, us) for k, (n, us) in groups.items()}


def profile_steps(engine: Engine, batch: int, steps: int, prompt: int, gen) -> dict:
    """Kernel launches and device time per eager decode step at `batch`, from torch.profiler."""
    V = engine.config.vocab_size
    for _ in range(batch):
        engine.add_request(torch.randint(3, V, (prompt,), generator=gen).tolist(),
                           SamplingParams(max_new_tokens=steps + 2, ignore_eos=True))
    while any(s.prefilling for s in engine._sequences.values()):  # prefill outside the profile
        engine.step()
    engine.step()  # one decode step to settle
    sync(engine.device)
    t = time.perf_counter()
    groups = device_kernels(engine, lambda: [engine.step() for _ in range(steps)])
    wall_ms = 1e3 * (time.perf_counter() - t) / steps
    while engine.has_work():
        engine.step()
    rows = sorted(({"kernel": k, "launches_per_step": n / steps, "us_per_step": us / steps}
                   for k, (n, us) in groups.items()), key=lambda r: -r["us_per_step"])
    return {"batch": batch, "steps": steps, "wall_ms_per_step": wall_ms,
            "launches_per_step": sum(r["launches_per_step"] for r in rows),
            "device_ms_per_step": sum(r["us_per_step"] for r in rows) / 1e3, "kernels": rows}


def transformers_rate(config, dtype, device, batch: int, prompt: int, new: int, gen) -> float | None:
    """transformers' greedy generate, tok/s of new tokens (prefill included, as users see it)."""
    try:
        from transformers import Gemma4ForCausalLM, Gemma4TextConfig
    except ImportError:
        return None
    d = config.to_hf_dict()
    d.pop("model_type"), d.pop("architectures")
    with torch.device(device):
        model = Gemma4ForCausalLM._from_config(Gemma4TextConfig(**d), attn_implementation="sdpa", dtype=dtype).eval()
    ids = torch.randint(3, config.vocab_size, (batch, prompt), generator=gen).to(device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    sync(device)
    t = time.perf_counter()
    model.generate(ids, **kw)
    sync(device)
    rate = batch * new / (time.perf_counter() - t)
    del model
    return rate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="e2b")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--profile-batch", nargs="+", type=int, default=[1, 32], help="batch sizes of the eager profiles")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--pdl", choices=["on", "off", "both"], default="on",
                   help="programmatic dependent launch (optimized/kernels/pdl.py) in the engine runs; "
                        "both: side by side")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = default_device()
    dtype = torch.bfloat16 if device.type != "cpu" else torch.float32
    if args.quick:
        args.model, args.batch, args.prompt, args.new, args.profile_steps, args.repeats = "tiny", [1, 2], 8, 4, 2, 1
        args.profile_batch = [1, 2]
    config, weights = resolve(args.model, dtype, device, 0)
    # every engine below reads one copy of the q/k/v and gate/up stacks (31B: 62 GB, not 62 + 50 each)
    weights = share_projection_storage(config, weights)
    gen = torch.Generator().manual_seed(0)
    out = {"device": device_name(device), "model": args.model, "dtype": str(dtype), "torch": torch.__version__,
           "prompt": args.prompt, "new": args.new}
    bw = copy_bandwidth(device, mb=64 if args.quick else 1024)
    floor_ms = decode_bytes(config, dtype) / bw / 1e6
    out.update(copy_gb_s=bw, decode_gb=decode_bytes(config, dtype) / 1e9, floor_ms=floor_ms)
    print(f"device {out['device']}; {args.model} {out['dtype']}; copy bandwidth {bw:.0f} GB/s; a decode step reads "
          f"{out['decode_gb']:.2f} GB at batch 1: floor {floor_ms:.3f} ms"
          f"{' (MoE: the experts a batch routes to grow with the batch)' if config.enable_moe_block else ''}", flush=True)

    graphs = graphs_supported(device)
    # One engine per PDL setting (its graphs keep the setting they were captured with).
    pdl_settings = {"on": [True], "off": [False], "both": [True, False]}[args.pdl]
    engines = {}
    for setting in pdl_settings:
        pdl.ENABLED = setting
        engines[setting] = Engine(config, weights=weights, dtype=dtype, device=device, graphs=graphs or False,
                                  max_requests=max(args.batch), max_context=args.prompt + args.new + 8)
        decode_rate(engines[setting], 1, args.prompt, 4, gen)  # warm-up: compilation
    out["pdl_supported"] = pdl.supported()
    out["engine"] = []
    for b in args.batch:
        runs = {(p_, o): [] for p_ in pdl_settings for o in (True, False)}
        for _ in range(args.repeats):  # every variant in turn, so drift hits all alike
            for p_, o in runs:
                pdl.ENABLED = p_
                engines[p_].overlap = o  # between runs: the engine is idle
                runs[p_, o].append(decode_rate(engines[p_], b, args.prompt, args.new, gen))
        for (p_, o), rs in runs.items():
            rate = statistics.median(r["tokens_per_s"] for r in rs)
            step_ms = statistics.median(r["step_ms"] for r in rs)
            floor_b = decode_bytes(config, dtype, b) / bw / 1e6
            out["engine"].append(dict(batch=b, overlap=o, pdl=p_ and pdl.supported(), tokens_per_s=rate,
                                      step_ms=step_ms, floor_ms=floor_b, floor_share=floor_b / step_ms))
            print(f"engine{' (decode graphs)' if graphs else ''}, overlap {'on ' if o else 'off'}, PDL "
                  f"{'on ' if p_ and pdl.supported() else 'off'}: batch {b}: {rate:.0f} tok/s, {step_ms:.3f} ms/step, "
                  f"{100 * floor_b / step_ms:.0f}% of the floor ({floor_b:.3f} ms)", flush=True)
    pdl.ENABLED = pdl_settings[0]
    del engines

    for b in args.profile_batch:
        eager = Engine(config, weights=weights, dtype=dtype, device=device, graphs=False, max_requests=b,
                       max_context=args.prompt + args.profile_steps + 8, overlap=False)
        decode_rate(eager, b, args.prompt, 4, gen)
        prof = profile_steps(eager, b, args.profile_steps, args.prompt, gen)
        del eager
        out[f"profile_batch{b}_eager"] = prof
        print(f"eager decode, batch {b}: {prof['launches_per_step']:.0f} kernel launches per step, device "
              f"{prof['device_ms_per_step']:.3f} ms, wall {prof['wall_ms_per_step']:.3f} ms per step")
        print(f"{'kernel':80s} {'launches':>9s} {'us/step':>9s} {'share':>6s}")
        total_us = max(1e-9, 1e3 * prof["device_ms_per_step"])
        for r in prof["kernels"][:25]:
            print(f"{r['kernel']:80s} {r['launches_per_step']:9.1f} {r['us_per_step']:9.1f} "
                  f"{100 * r['us_per_step'] / total_us:5.1f}%")

    if not args.no_transformers:
        out["transformers"] = []
        for b in args.batch:
            rate = transformers_rate(config, dtype, device, b, args.prompt, args.new, gen)
            out["transformers"].append(dict(batch=b, tokens_per_s=rate))
            print(f"transformers generate (sdpa, greedy): batch {b}: "
                  f"{'not installed' if rate is None else f'{rate:.0f} tok/s'}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
