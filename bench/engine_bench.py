"""Generation throughput of the engine on a real model shape (random weights): decode tokens/s at
several batch sizes and the time to prefill one long prompt, with the fused kernels and with the
torch ops side by side in one run.

    python bench/engine_bench.py --model e2b --out reports/engine_bench.json
    python bench/engine_bench.py --quick          # a smoke run on the tiny preset (any device)

Decode throughput counts the tokens produced after every request of the batch has its first
token, over the time they took (median of --repeats runs): steady-state decode, prefill excluded.
Paths: fused kernels with decode steps replayed from device graphs (the default on a GPU), fused
kernels eagerly, and the torch ops eagerly; eager steps show the host's launch cost.

Each decode figure is measured with the engine's overlap on and off (`--overlap both`, the
default; design note 32), the two interleaved run by run on one engine: with overlap on, the
next decode step is launched before this one's tokens are read. Nothing syncs between steps
(a step returns once its own tokens are on the host), so ms/step is the wall time between
steps; `launches` counts the steps launched ahead that were used and dropped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized.kernels import default_device, device_name, graphs_supported  # noqa: E402  (first: it may switch on the interpreter)

import torch  # noqa: E402
from optimized.engine import Engine, SamplingParams  # noqa: E402
from optimized.model import share_projection_storage  # noqa: E402
from reference.weights import resolve  # noqa: E402


def sync(device):
    if device.type != "cpu":
        torch.accelerator.synchronize()


def decode_rate(engine: Engine, batch: int, prompt_len: int, new: int, gen: torch.Generator) -> dict:
    """Steady decode of one batch: tokens/s, median ms per decode step, and how many steps were
    launched ahead (overlap) and used or dropped. No sync between steps: a step returns when
    its own tokens are on the host, and with overlap the next one is already running then (so
    the first counted step had a head start: at most one step in `new` of bias for overlap)."""
    V = engine.config.vocab_size
    for _ in range(batch):
        engine.add_request(torch.randint(3, V, (prompt_len,), generator=gen).tolist(),
                           SamplingParams(max_new_tokens=new, ignore_eos=True))
    before = dict(getattr(engine, "overlap_stats", {}))
    started, steps, tokens, t0 = set(), [], 0, None
    sync(engine.device)
    while engine.has_work():
        t = time.perf_counter()
        events = engine.step()
        if t0 is not None:
            steps.append(time.perf_counter() - t)
            tokens += len(events)
        started.update(e.rid for e in events)
        if t0 is None and len(started) == batch:
            t0 = time.perf_counter()
    sync(engine.device)
    after = getattr(engine, "overlap_stats", {})
    return dict(tokens_per_s=tokens / (time.perf_counter() - t0), step_ms=1e3 * statistics.median(steps),
                launches={k: after[k] - before.get(k, 0) for k in after})


def prefill_ms(engine: Engine, length: int, gen: torch.Generator) -> float:
    V = engine.config.vocab_size
    engine.add_request(torch.randint(3, V, (length,), generator=gen).tolist(), SamplingParams(max_new_tokens=1))
    sync(engine.device)
    t = time.perf_counter()
    while engine.has_work():
        engine.step()
    sync(engine.device)
    return 1e3 * (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="e2b")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--prefill", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--overlap", choices=["both", "on", "off"], default="both",
                   help="decode with the engine's overlap on, off, or both interleaved (default)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = default_device()
    dtype = torch.bfloat16 if device.type != "cpu" else torch.float32
    if args.quick:
        args.model, args.batch, args.prompt, args.new, args.prefill, args.repeats = "tiny", [1, 4], 8, 4, [32], 1
    config, weights = resolve(args.model, dtype, device, 0)
    # every engine below reads one copy of the q/k/v and gate/up stacks (31B: 62 GB, not 62 + 50 each)
    weights = share_projection_storage(config, weights)
    name = device_name(device)
    print(f"device {name}; model {args.model} (random weights), {str(dtype).removeprefix('torch.')}")
    rows = []
    gen = torch.Generator().manual_seed(0)
    overlaps = {"both": [True, False], "on": [True], "off": [False]}[args.overlap]
    paths = [("fused kernels + decode graphs", True, True), ("fused kernels", True, False), ("torch ops", False, False)]
    if not graphs_supported(device):
        paths = paths[1:]
    for tag, fused, graphs in paths:
        decode_engine = Engine(config, weights=weights, dtype=dtype, device=device, fused=fused, graphs=graphs,
                               max_requests=max(args.batch), max_context=args.prompt + args.new,
                               chunk_size=args.chunk_size)
        decode_rate(decode_engine, 1, args.prompt, 4, gen)  # warm-up: compilation
        for b in args.batch:
            runs = {o: [] for o in overlaps}
            for _ in range(args.repeats):  # on and off interleaved, so drift hits both alike
                for o in overlaps:
                    decode_engine.overlap = o  # between runs: the engine is idle
                    runs[o].append(decode_rate(decode_engine, b, args.prompt, args.new, gen))
            for o in overlaps:
                rate = statistics.median(r["tokens_per_s"] for r in runs[o])
                step_ms = statistics.median(r["step_ms"] for r in runs[o])
                launches = {k: sum(r["launches"].get(k, 0) for r in runs[o]) for k in ("committed", "discarded")}
                rows.append(dict(path=tag, what="decode", batch=b, overlap=o, tokens_per_s=rate, step_ms=step_ms,
                                 launches_ahead=launches))
                ahead = f" (launched ahead: {launches['committed']} used, {launches['discarded']} dropped)"
                print(f"{tag}, overlap {'on ' if o else 'off'}: decode batch {b}: {rate:.0f} tok/s, "
                      f"{step_ms:.2f} ms/step{ahead if o else ''}", flush=True)
        del decode_engine
        if graphs:  # prefill never uses the decode graphs
            continue
        prefill_engine = Engine(config, weights=weights, dtype=dtype, device=device, fused=fused, graphs=False,
                                max_requests=1,
                                max_context=max(args.prefill) + 1, chunk_size=args.chunk_size)
        prefill_ms(prefill_engine, 16, gen)  # warm-up
        for n in args.prefill:
            ms = statistics.median(prefill_ms(prefill_engine, n, gen) for _ in range(args.repeats))
            rows.append(dict(path=tag, what="prefill", tokens=n, ms=ms))
            print(f"{tag}: prefill {n} tokens (chunk {args.chunk_size}): {ms:.1f} ms", flush=True)
        del prefill_engine
        if device.type != "cpu":
            torch.get_device_module(device).empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=name, model=args.model, dtype=str(dtype), torch=torch.__version__,
                                            prompt=args.prompt, new=args.new, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
