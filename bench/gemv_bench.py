"""Sweep the few-row GEMV kernels (optimized/kernels/gemv.py) against what the fused path runs
without them (torch's F.linear = cuBLAS, plus the separate gated-GELU kernel for the fused
variants), at E2B's decode shapes (31B's and 26B-A4B's dense ones with --models), M = 1, 8, 32.

    python bench/gemv_bench.py --out reports/gemv_bench_h200.json      # about 3 minutes on an H200
    python bench/gemv_bench.py --quick                                 # a smoke run (any device)

How it times: per (shape, M, variant) one device graph of R back-to-back calls, each on its own
copy of the weights (R copies together > 200 MB, four times an H200's 50 MB L2, so every call
reads its weight from memory, as a decode step does), replayed `--repeats` times; the median
replay over R is the per-call time. Back to back in a graph is how a decode step runs them: no
host launch cost, and no event overhead per call (which at 5-20 us a kernel would be most of it).
The activations stay the same tensors across calls (in L2, as in a decode step, where the
previous kernel just wrote them).

Per row: us a call, GB/s on the least traffic (weight + activations read once, outputs written
once), the share of a device-to-device copy measured in the same run, and the relative error
against the baseline (a setting that is fast and wrong shows). A setting that fails to compile is
reported and skipped. The table ends with the best setting per (shape, M), what to copy into
gemv.SETTINGS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# optimized.kernels first: without an accelerator it switches on Triton's interpreter.
from optimized.kernels import INTERPRETING, capture_graph, default_device, device_name, gemv, graphs_supported  # noqa: E402

import torch  # noqa: E402
from oracle.kernel_check import Timer, copy_bandwidth  # noqa: E402

ROTATE_BYTES = 200 << 20
MAX_COPIES = 256

# Launch settings tried, per row count: (BLOCK_N, BLOCK_K, DOT, num_warps, num_stages, SPLIT_K); a
# row count without its own list takes the nearest smaller one's. Small BLOCK_N without tl.dot for
# one row (many programs for N = 1536), tl.dot with split-K at 8 and 32 rows (96 tiles of 16 for
# N = 1536 fill few SMs unsplit). The first H200 sweep (docs/results/gemv_bench_h200.json) had
# BLOCK_K 1024 beat 512 everywhere at M = 1, hence 2048.
GRID = {
    1: [(2, 2048, False, 4, 3, 1), (4, 2048, False, 4, 3, 1), (4, 512, False, 4, 3, 2), (4, 512, False, 4, 3, 4),
        (8, 512, False, 4, 3, 4), (16, 256, True, 4, 3, 4)],
    8: [(16, 256, True, 4, 3, 1), (16, 256, True, 4, 3, 2), (16, 256, True, 4, 3, 4), (16, 128, True, 4, 3, 8),
        (32, 256, True, 4, 3, 4), (16, 512, True, 4, 3, 2), (16, 256, True, 8, 3, 4)],
    32: [(16, 256, True, 4, 3, 1), (16, 256, True, 4, 3, 2), (16, 256, True, 4, 3, 4), (16, 128, True, 4, 3, 8),
         (32, 256, True, 4, 3, 4), (32, 128, True, 4, 3, 4), (16, 256, True, 8, 3, 4), (64, 128, True, 4, 3, 4),
         # wider tiles: at 32 rows a program's x tile is as big as its weight tile at BLOCK_N 32
         (64, 128, True, 4, 3, 8), (64, 256, True, 4, 3, 2), (64, 256, True, 4, 3, 4), (128, 128, True, 8, 3, 4),
         (128, 64, True, 4, 3, 8), (32, 128, True, 4, 4, 8), (64, 64, True, 4, 4, 8)],
}
GRID[16] = GRID[32]  # 16 rows: the 32-row list (more tiles' worth of rows than the 8-row one assumes)
QUICK_GRID = {1: [(4, 32, False, 4, 1, 1), (16, 32, True, 4, 1, 2)], 3: [(16, 32, True, 4, 1, 2)]}


def shapes(model: str) -> list[tuple[str, str, int, int]]:
    """(name, op, N, K) of a model's decode projections; N is the gate width for the gated ops."""
    from reference.presets import get_preset

    c = get_preset(model)
    H, Hq = c.hidden_size, c.num_attention_heads
    out, seen = [], set()
    for s in c.layers:
        q = Hq * s.head_dim
        kv = 0 if s.kv_shared else s.num_kv_heads * s.head_dim * (2 if s.has_v_proj else 1)
        for name, op, n, k in ((f"qkv {s.type[:4]}{' shared' if s.kv_shared else ''}", "linear", q + kv, H),
                               ("gate_up", "linear_gelu_mul", s.mlp_width, H), ("down", "linear", H, s.mlp_width),
                               ("o_proj", "linear", H, q)):
            if (op, n, k) not in seen:
                seen.add((op, n, k))
                out.append((f"{model} {name}", op, n, k))
    if c.has_ple:
        P = c.hidden_size_per_layer_input
        out += [(f"{model} ple_gate", "ple_gate", P, H), (f"{model} ple_proj", "linear", H, P)]
    return out


def make_call(op, x, w, up, settings):
    """The call under test: the GEMV kernel with `settings`, or with settings=None the baseline,
    gemv's unfused path (the gated-GELU kernel and torch's F.linear; main() sets every row limit
    to 0)."""
    if op == "linear_gelu_mul":
        return lambda wi: gemv.linear_gelu_mul(x, wi, settings=settings)
    if op == "ple_gate":
        return lambda wi: gemv.linear_gelu_mul(x, wi, up, settings=settings)
    return lambda wi: gemv.linear(x, wi, settings=settings)


def timed(device, call, weights, repeats) -> tuple[float, torch.Tensor]:
    """Median us a call over `repeats` replays of one graph of len(weights) calls."""
    out = call(weights[0])  # compiles
    if device.type != "cpu":
        torch.accelerator.synchronize()
    if graphs_supported(device):
        graph, _ = capture_graph(device, lambda: [call(wi) for wi in weights])
        times = []
        for _ in range(repeats):
            start, end = torch.Event(enable_timing=True), torch.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / len(weights))
        return statistics.median(times), out
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for wi in weights:
            call(wi)
        times.append((time.perf_counter() - t0) * 1e6 / len(weights))
    return statistics.median(times), out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["e2b"], choices=["e2b", "31b", "26b-a4b"])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ops", nargs="+", choices=["linear", "linear_gelu_mul", "ple_gate"],
                   help="only these ops (default: every op of the model's decode step)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, two settings: a smoke run (CPU included)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    device, dtype = default_device(), torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    if args.quick:
        todo = [("quick qkv", "linear", 40, 72), ("quick gate_up", "linear_gelu_mul", 24, 72),
                ("quick ple_gate", "ple_gate", 8, 72), ("quick down", "linear", 72, 96)]
        rows_list, grid, repeats, copy_bw = [1, 3], QUICK_GRID, 2, None
    else:
        todo = [s for m in args.models for s in shapes(m) if not args.ops or s[1] in args.ops]
        rows_list, grid, repeats = args.rows, GRID, args.repeats
        copy_bw = copy_bandwidth(Timer(device, 10, warmup=2), device) if device.type != "cpu" else None
    gemv.GEMV_MAX_ROWS = 0  # settings=None: the unfused path
    print(f"# {device_name(device)}, bf16, copy bandwidth "
          f"{'-' if copy_bw is None else f'{copy_bw / 1e9:.0f} GB/s'}{' (interpreter)' if INTERPRETING else ''}")
    print("| shape | op | N x K | M | variant | us | GB/s | of copy | rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    results, best = [], {}
    t_start = time.perf_counter()
    for name, op, n, k in todo:
        w_rows = 2 * n if op == "linear_gelu_mul" else n
        w_bytes = w_rows * k * 2
        copies = 1 if args.quick else min(MAX_COPIES, max(4, -(-ROTATE_BYTES // w_bytes)))
        weights = [torch.randn(w_rows, k, generator=gen, device=device).mul_(k ** -0.5).to(dtype)
                   for _ in range(copies)]
        for M in rows_list:
            x = torch.randn(M, k, generator=gen, device=device).to(dtype)
            up = torch.randn(M, 3 * n, generator=gen, device=device).to(dtype)[:, n:2 * n]  # a strided slice
            out_cols = n
            traffic = w_bytes + 2 * M * k + 2 * M * out_cols + (2 * M * n if op == "ple_gate" else 0)
            variants = [("baseline (unfused, cuBLAS)", None)]
            variants += [(f"gemv BN={bn} BK={bk} {'dot' if d else 'sum'} w{nw} s{ns} split{sk}",
                          dict(BLOCK_N=bn, BLOCK_K=bk, DOT=d, num_warps=nw, num_stages=ns, SPLIT_K=sk))
                         for bn, bk, d, nw, ns, sk in grid.get(M, grid[max(g for g in grid if g <= M)])]
            variants.append(("gemv default " + str(gemv.launch_settings(M, n)), gemv.launch_settings(M, n)))
            want = None
            for label, setting in variants:
                try:
                    call = make_call(op, x, None, up, setting)
                    us, out = timed(device, call, weights, repeats)
                except Exception as e:  # a setting that does not compile (or run) is reported and skipped
                    print(f"| {name} | {op} | {n} x {k} | {M} | {label} | failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120] if str(e) else ''} | | | |")
                    results.append(dict(shape=name, op=op, N=n, K=k, M=M, variant=label, error=repr(e)[:500]))
                    continue
                if want is None:
                    want = out
                err = rel(out, want)
                gbps = traffic / us / 1e3
                share = None if copy_bw is None else gbps * 1e9 / copy_bw
                print(f"| {name} | {op} | {n} x {k} | {M} | {label} | {us:.2f} | {gbps:.0f} | "
                      f"{'-' if share is None else f'{share:.0%}'} | {err:.1e} |", flush=True)
                row = dict(shape=name, op=op, N=n, K=k, M=M, variant=label, us=us, gbps=gbps, copy_share=share,
                           rel_err=err, settings=setting)
                results.append(row)
                key = (name, n, k, M)
                if setting is not None and err < 2e-2 and (key not in best or us < best[key]["us"]):
                    best[key] = row
        del weights
    print("\n## best GEMV setting per shape (against the baseline)")
    print("| shape | M | best | us | baseline us | speed-up | of copy |")
    print("|---|---|---|---|---|---|---|")
    for (name, n, k, M), row in best.items():
        base = next(r for r in results if (r["shape"], r["N"], r["K"], r["M"]) == (name, n, k, M)
                    and r["variant"].startswith("baseline"))
        share = "-" if row["copy_share"] is None else f"{row['copy_share']:.0%}"
        print(f"| {name} {n} x {k} | {M} | {row['variant']} | {row['us']:.2f} | {base['us']:.2f} | "
              f"{base['us'] / row['us']:.2f}x | {share} |")
    print(f"\n# {time.perf_counter() - t_start:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=device_name(device), dtype="bfloat16", copy_bandwidth=copy_bw,
                                            rows=results, best=list(best.values()),
                                            settings_table=gemv.SETTINGS, min_programs=gemv.MIN_PROGRAMS,
                                            command=" ".join(sys.argv)),
                                       indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
