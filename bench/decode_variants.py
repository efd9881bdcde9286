"""Decode speed under variants of the kernels' module settings, side by side in one run: one engine
per variant (its decode graphs keep the settings they were captured with), the variants taken in
turn within each repeat so that drift hits all alike, medians reported.

    python bench/decode_variants.py --model e2b --set base: --set gateup:gemv.GEMV_MAX_WEIGHT=40000000 \\
        --set nogemv:gemv.GEMV_MAX_ROWS=0 --out reports/variants.json

A variant is NAME:MODULE.CONSTANT=VALUE[,...] with MODULE a module of optimized/kernels and VALUE
a Python literal; NAME: alone runs the modules as they are. Settings are applied before each of
the variant's runs (and its engine's construction) and the defaults restored after.
`--greedy-check B` first compares each variant's greedy tokens for a batch of B with the first
variant's; the exit status is 1 where any differ.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized.kernels import default_device, device_name, graphs_supported  # noqa: E402  (first: it may switch on the interpreter)

import torch  # noqa: E402
from bench.engine_bench import decode_rate  # noqa: E402
from optimized.engine import Engine, SamplingParams  # noqa: E402
from optimized.model import share_projection_storage  # noqa: E402
from reference.weights import resolve  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[tuple[object, str, object]]]:
    """'name:mod.CONST=value,...' -> (name, [(module, CONST, value)]); an error names the bad part."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--set {text!r}: expected NAME:MODULE.CONSTANT=VALUE[,...] (or NAME: for none)")
    settings = []
    for part in filter(None, rest.split(",")):
        target, eq, value = part.partition("=")
        mod, dot, const = target.rpartition(".")
        if not eq or not dot:
            raise SystemExit(f"--set {text!r}: {part!r} is not MODULE.CONSTANT=VALUE")
        module = importlib.import_module(f"optimized.kernels.{mod}")
        if not hasattr(module, const):
            raise SystemExit(f"--set {text!r}: optimized.kernels.{mod} has no {const}")
        settings.append((module, const, ast.literal_eval(value)))
    return name, settings


class applied:
    """Context: a variant's settings in force, the previous values back after."""

    def __init__(self, settings):
        self.settings, self.saved = settings, []

    def __enter__(self):
        self.saved = [(m, c, getattr(m, c)) for m, c, _ in self.settings]
        for m, c, v in self.settings:
            setattr(m, c, v)

    def __exit__(self, *exc):
        for m, c, v in reversed(self.saved):
            setattr(m, c, v)


def greedy_tokens(engine: Engine, prompts: list[list[int]], new: int) -> list[list[int]]:
    rids = [engine.add_request(p, SamplingParams(max_new_tokens=new, ignore_eos=True)) for p in prompts]
    out = {rid: [] for rid in rids}
    while engine.has_work():
        for e in engine.step():
            out[e.rid].append(e.token)
    return [out[r] for r in rids]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="e2b")
    p.add_argument("--set", dest="variants", action="append", required=True, help="NAME:MODULE.CONST=VALUE,...")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--greedy-check", type=int, default=4, help="batch of the greedy-token check (0: none)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants]
    device = default_device()
    dtype = torch.bfloat16 if device.type != "cpu" else torch.float32
    config, weights = resolve(args.model, dtype, device, 0)
    # every engine below reads one copy of the q/k/v and gate/up stacks (31B: 62 GB, not 62 + 50 each)
    weights = share_projection_storage(config, weights)
    gen = torch.Generator().manual_seed(0)
    engines = {}
    for name, settings in variants:
        with applied(settings):
            engines[name] = Engine(config, weights=weights, dtype=dtype, device=device,
                                   graphs=graphs_supported(device) or False, max_requests=max(args.batch),
                                   max_context=args.prompt + max(args.new, 16) + 8)
            decode_rate(engines[name], 1, args.prompt, 4, gen)  # compilation
    out = {"device": device_name(device), "model": args.model, "dtype": str(dtype), "variants": args.variants,
           "results": []}
    print(f"device {out['device']}; {args.model} {out['dtype']}; prompt {args.prompt}, {args.new} new tokens")
    if args.greedy_check:
        prompts = [torch.randint(3, config.vocab_size, (args.prompt,), generator=gen).tolist()
                   for _ in range(args.greedy_check)]
        first = None
        for name, settings in variants:
            with applied(settings):
                toks = greedy_tokens(engines[name], prompts, 16)
            first = toks if first is None else first
            same = toks == first
            out.setdefault("greedy_same", {})[name] = same
            print(f"greedy tokens of {name}: {'same as' if same else 'DIFFER from'} {variants[0][0]}'s")
    for b in args.batch:
        runs = {name: [] for name, _ in variants}
        for _ in range(args.repeats):
            for name, settings in variants:
                with applied(settings):
                    runs[name].append(decode_rate(engines[name], b, args.prompt, args.new, gen))
        for name, rs in runs.items():
            rate = statistics.median(r["tokens_per_s"] for r in rs)
            step = statistics.median(r["step_ms"] for r in rs)
            out["results"].append(dict(variant=name, batch=b, tokens_per_s=rate, step_ms=step))
            print(f"{name:16s} batch {b:3d}: {rate:8.0f} tok/s, {step:.3f} ms/step", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    return 0 if all(out.get("greedy_same", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
