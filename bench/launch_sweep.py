"""Sweep the launch shapes (tile sizes, warps) of the memory-bound kernels in one process, to
choose their defaults: every listed setting group is applied in turn and each kernel is timed at
the given model shapes and token counts. The first group is the defaults; it is run twice, first
and last, so the table shows the run-to-run noise.

    python bench/launch_sweep.py --out reports/launch_sweep.json \\
        --groups "norms.WARP_ELEMS=1024" "activation.TILE=2048 activation.WARP_ELEMS=256"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized.kernels import default_device, device_name  # noqa: E402  (first: it may switch on the interpreter)

import torch  # noqa: E402
from kernel_bench import MODELS, apply_settings, launch_settings  # noqa: E402
from oracle.kernel_check import Timer, build_cases, check_case, copy_bandwidth, sizes_for  # noqa: E402

OPS = ["rms_norm", "add_rms_norm", "qkv_norm", "post_ffn_residual_scale", "post_ffn_moe_residual_scale",
       "router_input", "gelu_tanh_mul", "softcap", "apply_rope", "rope_and_store_kv", "qkv_norm_rope_store"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", nargs="+", required=True, help='setting groups, each "module.NAME=INT ..."')
    p.add_argument("--models", nargs="+", default=["e2b", "31b"], choices=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    device = default_device()
    timer = Timer(device, args.repeats, warmup=2, graphs=True)
    copy_bw = copy_bandwidth(timer, device)
    defaults = [f"{k}={v}" for k, v in launch_settings().items()]
    groups = ["defaults"] + args.groups + ["defaults"]
    table: dict[tuple, list] = {}
    for group in groups:
        apply_settings(defaults + ([] if group == "defaults" else group.split()))
        for model in args.models:
            for T in args.tokens:
                gen = torch.Generator(device=device).manual_seed(0)
                for case in build_cases(sizes_for(model, T), torch.bfloat16, device, gen, attention=False):
                    if case.name in args.ops:
                        r = check_case(case, torch.bfloat16, timer, time_twins=False)
                        share = r.gbps * 1e9 / copy_bw if r.gbps else 0.0
                        table.setdefault((case.name, model, T), []).append((r.time_us, share, r.passed))
                        print(f"{group} | {case.name} | {model} | {T} | {r.time_us:.1f} µs | {100 * share:.0f}%"
                              f"{'' if r.passed else ' FAIL'}", flush=True)
    apply_settings(defaults)

    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s; % of it per group (µs in the JSON)\n")
    print("| op | model | T | " + " | ".join(groups) + " |")
    print("|---|---|---|" + "---|" * len(groups))
    for (op, model, T), cells in table.items():
        print(f"| {op} | {model} | {T} | " + " | ".join(
            f"{100 * share:.0f}%{'' if ok else ' FAIL'}" for _, share, ok in cells) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(
            device=device_name(device),
            copy_bandwidth_Bps=copy_bw, groups=groups,
            rows=[dict(op=op, model=m, T=T, us=[c[0] for c in cells], copy_fraction=[c[1] for c in cells])
                  for (op, m, T), cells in table.items()]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
