"""Benchmark every fused (non-attention) kernel against its eager twin and the unfused torch
sequence, at real Gemma 4 shapes, decode and prefill token counts.

    python bench/kernel_bench.py --out docs/results/kernel_bench_h100.json   # the full sweep
    python bench/kernel_bench.py --quick                                    # a smoke run (any device)

Models: E2B and 31B take every dense-path kernel at their sliding-layer shapes; 26B-A4B takes the
MoE kernels (router input, softmax/top-k, the experts, the MoE post-FFN norm). Token counts:
decode T = 1, 8, 32, 64 and prefill T = 2048, 4096, 8192 (softcap sees at most 64 rows: only the
sampled rows get logits). The paged attention kernels have their own sweep, attention_bench.py.

Per row: the kernel's agreement with its eager twin (the same bound as `gemma4-testbed kernels`,
so a fast wrong kernel fails), the median time over repeats of kernel, eager twin and unfused
torch (device events, L2 flushed before each run; each callable captured into a device graph and
its replay timed, so the numbers are device time without the host's launch cost; the "graphs"
column says which of kernel/eager/unfused could be captured), and the kernel's achieved bandwidth on the
least traffic the op needs (inputs read once, outputs written once) as a share of a
device-to-device copy measured in the same run. The expert GEMMs are compute-bound; their row
also gives TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# optimized.kernels first: without an accelerator it switches on Triton's interpreter, which must
# happen before triton itself is imported.
from optimized.kernels import INTERPRETING, activation, default_device, device_name, norms, rope  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from oracle.kernel_check import Timer, build_cases, check_case, copy_bandwidth, sizes_for  # noqa: E402

MOE_OPS = {"router_input", "softmax_topk", "experts", "post_ffn_moe_residual_scale"}
# Decode-only ops: at prefill token counts their cases would repeat the GEMV_MAX_ROWS-row case.
GEMV_OPS = {"linear (qkv)", "linear_gelu_mul", "linear_gelu_mul (ple gate)", "linear"}
MODELS = {"e2b": lambda name: name not in MOE_OPS, "31b": lambda name: name not in MOE_OPS,
          "26b-a4b": lambda name: name in MOE_OPS}
KNOB_MODULES = {"norms": norms, "activation": activation, "rope": rope}
KNOBS = {"norms": ("TILE", "WARP_ELEMS"), "activation": ("MAX_BLOCK", "TILE", "WARP_ELEMS"),
         "rope": ("TOKEN_TILE", "WARP_ELEMS", "QKV_TILE", "QKV_WARP_ELEMS")}
DECODE_T, PREFILL_T = (1, 8, 32, 64), (2048, 4096, 8192)


def launch_settings() -> dict[str, int]:
    """The current launch-shape settings, as "module.NAME": value."""
    return {f"{m}.{n}": getattr(KNOB_MODULES[m], n) for m, ns in KNOBS.items() for n in ns}


def apply_settings(specs: list[str]) -> None:
    """Set launch-shape settings from "module.NAME=INT" strings; ValueError names a bad one."""
    for spec in specs:
        try:
            key, value = spec.split("=")
            module, attr = key.split(".")
            if attr not in KNOBS[module]:
                raise KeyError(attr)
            setattr(KNOB_MODULES[module], attr, int(value))
        except (ValueError, KeyError):
            raise ValueError(f"--set {spec!r}: expected MODULE.NAME=INT with one of the listed settings") from None


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.0f}{unit}"


def _graphs(graphed: list[str]) -> str:
    return "".join(w[0].upper() if w in graphed else "-" for w in ("kernel", "eager", "unfused"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small sizes, few repeats: a smoke run")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=list(DECODE_T + PREFILL_T))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--copy-mb", type=int, default=2048, help="size of the bandwidth-reference copy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-graphs", action="store_true",
                   help="time the launches as they are, host overhead included (default: device-graph replays)")
    p.add_argument("--ops", nargs="+", help="only these ops (default: all)")
    p.add_argument("--set", nargs="+", default=[], metavar="MODULE.NAME=INT",
                   help="override a launch-shape setting, e.g. norms.TILE=2048 activation.WARP_ELEMS=256 "
                        f"(settings: {', '.join(f'{m}.{n}' for m, ns in KNOBS.items() for n in ns)})")
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = p.parse_args(argv)

    try:
        apply_settings(args.set)
    except ValueError as e:
        p.error(str(e))
    launch = launch_settings()
    device = default_device()
    dtype = getattr(torch, args.dtype)
    if args.quick:
        args.repeats, args.copy_mb = 2, 16
        sweep = [("small", sizes_for("small"), lambda name: True)]
    else:
        sweep = [(m, sizes_for(m, T), MODELS[m]) for m in args.models for T in args.tokens]
    timer = Timer(device, args.repeats, warmup=2, flush_mb=256 if device.type != "cpu" else 0,
                  graphs=not args.no_graphs)
    copy_bw = copy_bandwidth(timer, device, args.copy_mb << 20)
    name = device_name(device)
    print(f"device: {name}{' (Triton interpreter)' if INTERPRETING else ''}; copy bandwidth {copy_bw / 1e9:.0f} GB/s; "
          f"{args.dtype}; median of {args.repeats}; launch {launch}\n")
    header = ("| model | T | op | shape | kernel µs | eager µs | unfused µs | vs unfused | GB/s | % copy BW | "
              "TFLOP/s | ULP at scale / rel L2 | ok | graphs |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    rows = []
    for model, sizes, wanted in sweep:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        for case in build_cases(sizes, dtype, device, gen, attention=False):
            if not wanted(case.name) or (args.ops and case.name not in args.ops) or (
                    case.name in GEMV_OPS and sizes["T"] > 64):
                continue
            r = check_case(case, dtype, timer)
            row = dict(r.to_dict(), model=model, T=sizes["T"],
                       copy_fraction=None if r.gbps is None else r.gbps * 1e9 / copy_bw,
                       tflops=r.flops / r.time_us / 1e6 if r.flops else None)
            rows.append(row)
            unf = "-" if r.unfused_us is None else f"{r.unfused_us:.1f}"
            speed = "-" if r.unfused_us is None else f"{r.unfused_us / r.time_us:.2f}x"
            share = None if row["copy_fraction"] is None else 100 * row["copy_fraction"]
            print(f"| {model} | {sizes['T']} | {r.name} | {r.shape} | {r.time_us:.1f} | {r.eager_us:.1f} | {unf} "
                  f"| {speed} | {_fmt(r.gbps)} | {_fmt(share, '%')} | {_fmt(row['tflops'])} "
                  f"| {r.scale_ulp:.1f} / {r.rel:.1e} | {'ok' if r.passed else 'FAIL'} | {_graphs(r.graphed)} |", flush=True)
        del gen
        if device.type != "cpu":
            torch.get_device_module(device).empty_cache()

    prefill = [r["copy_fraction"] for r in rows if r["T"] >= 2048 and r["copy_fraction"] and not r["flops"]]
    if prefill:
        print(f"\nmemory-bound kernels at prefill sizes: median {100 * statistics.median(prefill):.0f}% of copy "
              f"bandwidth, lowest {100 * min(prefill):.0f}%")
    result = dict(device=str(name), interpreter=INTERPRETING, torch=torch.__version__, triton=triton.__version__,
                  dtype=args.dtype, repeats=args.repeats, launch=launch, copy_bandwidth_Bps=copy_bw, rows=rows,
                  command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
