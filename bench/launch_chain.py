"""What one link of a chain of dependent kernels costs on this GPU, replayed from a graph: the
latency floor under a batch-1 decode step, which is a chain of about 500 kernels where each one
reads what the one before wrote.

    python bench/launch_chain.py --out reports/launch_chain.json

Chains (each `--links` kernels long, one graph, median of `--repeats` replays, us per link):
- `touch G`: a kernel of G programs, each reading one float the previous kernel wrote and writing
  it back plus one: no work, only the dependency (launch, wait, one global round trip, drain).
- `gemv K`: the decode GEMV kernel (optimized/kernels/gemv.py, one row) on K x K weights, each
  link's input the previous link's output, the weights rotating over enough copies to miss L2;
  beside it the time its bytes take at the measured copy bandwidth.
Each with PDL (optimized/kernels/pdl.py) on and off.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized.kernels import default_device, device_name, gemv, graphs_supported, pdl  # noqa: E402  (first: it may switch on the interpreter)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from bench.decode_profile import copy_bandwidth  # noqa: E402
from bench.gemv_bench import timed  # noqa: E402
from optimized.kernels.pdl import pdl_launch, pdl_start  # noqa: E402


@triton.jit
def _touch_kernel(buf, PDL: tl.constexpr = False):
    pdl_start(PDL)
    i = tl.program_id(0)
    tl.store(buf + i, tl.load(buf + i) + 1.0)


def per_link_us(device, links: int, repeats: int, run) -> float:
    """Median us per link over `repeats` replays of one graph of run(i) for i < links."""
    return timed(device, run, list(range(links)), repeats)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--links", type=int, default=500)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--programs", nargs="+", type=int, default=[1, 132, 528, 1056])
    p.add_argument("--gemv-k", nargs="+", type=int, default=[1536, 2048])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = default_device()
    if not graphs_supported(device):
        raise SystemExit("launch_chain measures graph replays: it needs a GPU with device graphs")
    bw = copy_bandwidth(device)
    out = {"device": device_name(device), "links": args.links, "copy_gb_s": bw, "chains": []}
    print(f"device {out['device']}; copy bandwidth {bw:.0f} GB/s; {args.links} links per graph")
    for setting in (True, False):
        pdl.ENABLED = setting
        label = "on " if setting and pdl.supported() else "off"
        for g in args.programs:
            buf = torch.zeros(g, device=device)
            us = per_link_us(device, args.links, args.repeats,
                             lambda i: _touch_kernel[(g,)](buf, **pdl_launch()))
            out["chains"].append(dict(chain=f"touch {g}", pdl=label.strip(), us_per_link=us))
            print(f"PDL {label} touch {g:5d} programs: {us:6.2f} us per link", flush=True)
        for k in args.gemv_k:
            copies = max(2, triton.cdiv(200 << 20, k * k * 2))  # 200 MB of weights: past L2
            ws = [torch.randn(k, k, device=device, dtype=torch.bfloat16) * k ** -0.5 for _ in range(copies)]
            xs = [torch.randn(1, k, device=device, dtype=torch.bfloat16)]

            def link(i):
                xs.append(gemv.linear(xs[-1], ws[i % copies]))

            us = per_link_us(device, args.links, args.repeats, link)
            floor = k * k * 2 / bw / 1e3
            out["chains"].append(dict(chain=f"gemv {k}", pdl=label.strip(), us_per_link=us, bandwidth_us=floor))
            print(f"PDL {label} gemv {k}x{k}, one row: {us:6.2f} us per link ({floor:.2f} us of bytes at copy "
                  f"bandwidth)", flush=True)
    pdl.ENABLED = True
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
