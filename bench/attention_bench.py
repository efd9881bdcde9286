"""Benchmark the paged attention kernels against torch SDPA at Gemma 4 shapes.

    python bench/attention_bench.py --out reports/attention_bench.json      # the full sweep
    python bench/attention_bench.py --quick                                 # a smoke run (any device)
    python bench/attention_bench.py --sweep --out reports/attention_sweep.json  # launch settings
    python bench/attention_bench.py --sweep --quick                         # its smoke run

The comparison (default mode) and the sweep of launch settings (--sweep) share the data and timing.

Layers: "sliding" (head 256, window 512) and "full" (head 512, no window); Hq=8, Hkv in {1, 2};
bf16; page_size 16 with a shuffled page table (and, on sliding layers, the pages before the
window evicted to page 0, as the SWA pool would). SDPA gets the same data laid out densely
([B, H, S, D], GQA through enable_gqa; a sliding decode gets just the last W keys).

Per shape: the median time of repeated runs (device events; the L2 cache is flushed before
each run), the bytes the op must move (K/V of the visible keys once per kv head, plus q and o)
as achieved bandwidth and as a share of a device-to-device copy measured in the same run, the
attention TFLOP/s, and the kernel's max abs error against float32 SDPA on a subset of the rows
(the first requests of a decode; the last query rows of the first request of an extend), so a
fast wrong kernel shows. SDPA is timed only where its estimated memory fits --sdpa-mem-gb (at
head 512 it has no fused kernel and materialises the scores).

--sweep times the kernels alone under candidate launch settings, at the shapes that matter for an
E2B-shape model (Hq=8, Hkv=1): extend as one 8192-token prefill at head 512 (full layers) and 256
(window 512), for each (BLOCK_M, BLOCK_N, num_warps, num_stages) candidate; decode at batch 1/8/32
with ~200, 4k and 16k keys, for each (BLOCK_N, num_warps, num_stages) candidate and split count,
over a page table as wide as a decode graph captures it (--table-keys keys, the rest page 0), and
timed from a device graph as an engine replays it. A candidate that fails to compile or to launch
(out of shared memory or registers) is reported and skipped. Results are written after every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# optimized.kernels first: without an accelerator it switches on Triton's interpreter, which must
# happen before triton itself is imported.
from optimized.kernels import INTERPRETING, default_device, device_name  # noqa: E402
import optimized.kernels.attention as attention  # noqa: E402
from optimized.kernels.attention import decode_attention, extend_attention  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from oracle.kernel_check import Timer, copy_bandwidth  # noqa: E402
from reference.window import first_visible_key, visible  # noqa: E402

LAYERS = {"sliding": (256, 512), "full": (512, None)}  # name: (head dim, window)
HQ = 8
DTYPE = torch.bfloat16


@dataclass
class Shape:
    op: str        # "decode" or "extend"
    layer: str
    d: int
    window: int | None
    hkv: int
    batch: int
    ctx: int       # keys per request (prefix + new)
    new: int       # new tokens per request (1 for decode)

    def visible_keys(self) -> int:
        """Distinct keys per request the op must read: from the first query's first visible key."""
        return self.ctx - first_visible_key(self.ctx - self.new, self.window)

    def pairs(self) -> int:
        """Visible (query, key) pairs per request and head."""
        return sum(q + 1 - first_visible_key(q, self.window) for q in range(self.ctx - self.new, self.ctx))

    def bytes_moved(self) -> int:
        itemsize = torch.finfo(DTYPE).bits // 8
        kv = 2 * self.batch * self.hkv * self.visible_keys() * self.d
        qo = 2 * self.batch * self.new * HQ * self.d
        return (kv + qo) * itemsize

    def flops(self) -> int:
        return 4 * self.batch * HQ * self.d * self.pairs()


# ------------------------------------------------------------------------------------------
# Data: one dense copy for SDPA, one paged copy for the kernels
# ------------------------------------------------------------------------------------------

def build(s: Shape, device, page_size: int, gen, table_pages: int | None = None) -> dict:
    """table_pages: pad the page table with page-0 columns to this width (a decode graph's table
    is captured at max_context / page_size pages whatever the requests' lengths)."""
    B, S, D = s.batch, s.ctx, s.d
    k = torch.randn(B, s.hkv, S, D, device=device, generator=gen, dtype=DTYPE)
    v = torch.randn(B, s.hkv, S, D, device=device, generator=gen, dtype=DTYPE)
    q = torch.randn(B, HQ, s.new, D, device=device, generator=gen, dtype=DTYPE)

    pages = triton.cdiv(S, page_size)
    order = torch.randperm(B * pages, device=device, generator=gen) + 1  # page 0 is the sink
    table = order.view(B, pages).to(torch.int32)
    pos = torch.arange(S, device=device)
    slots = table[:, pos // page_size].long() * page_size + pos % page_size  # [B, S]
    k_pool = torch.zeros((B * pages + 1) * page_size, s.hkv, D, device=device, dtype=DTYPE)
    v_pool = torch.zeros_like(k_pool)
    k_pool[slots.flatten()] = k.transpose(1, 2).reshape(B * S, s.hkv, D)
    v_pool[slots.flatten()] = v.transpose(1, 2).reshape(B * S, s.hkv, D)
    table[:, : first_visible_key(S - s.new, s.window) // page_size] = 0  # evicted pages
    if table_pages is not None and table_pages > pages:
        table = torch.cat([table, table.new_zeros(B, table_pages - pages)], dim=1)

    return dict(
        q=q, k=k, v=v, k_pool=k_pool, v_pool=v_pool, page_table=table,
        seq_lens=torch.full((B,), S, dtype=torch.int32, device=device),
        cu=torch.arange(0, B + 1, dtype=torch.int32, device=device) * s.new,
        q_packed=q.transpose(1, 2).reshape(B * s.new, HQ, D),  # [N, Hq, D], request-major
    )


def run_kernel(s: Shape, t: dict, page_size: int, num_splits: int | None = None) -> torch.Tensor:
    if s.op == "decode":
        return decode_attention(t["q"][:, :, 0], t["k_pool"], t["v_pool"], t["page_table"], page_size,
                                t["seq_lens"], window=s.window, num_splits=num_splits)
    return extend_attention(t["q_packed"], t["k_pool"], t["v_pool"], t["page_table"], page_size,
                            t["cu"], t["seq_lens"], window=s.window)


def sdpa(q, k, v, q_first: int, window):
    """Dense SDPA of queries at positions q_first.. over keys 0..S-1 (scale 1.0, GQA)."""
    T, S = q.shape[2], k.shape[2]
    lo = first_visible_key(q_first, window)
    k, v = k[:, :, lo:], v[:, :, lo:]
    if T == 1:  # decode: the one query sees every key left
        return F.scaled_dot_product_attention(q, k, v, scale=1.0, enable_gqa=True)
    if q_first == 0 and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=True)
    qp = torch.arange(q_first, q_first + T, device=q.device)
    kp = torch.arange(lo, S, device=q.device)
    mask = visible(qp[:, None], kp[None, :], window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)


def sdpa_mem_estimate(s: Shape) -> int:
    """Pessimistic bytes for SDPA's math path: GQA-expanded K/V and float32 scores."""
    keys = s.visible_keys()
    return s.batch * HQ * (2 * keys * s.d * 2 + s.new * keys * 12)


def check(s: Shape, t: dict, out: torch.Tensor) -> float:
    """Max abs error of the kernel against float32 SDPA on a subset of rows."""
    if s.op == "decode":
        n = min(s.batch, 4)
        want = sdpa(t["q"][:n].float(), t["k"][:n].float(), t["v"][:n].float(), s.ctx - 1, s.window)
        return (out[:n].float() - want[:, :, 0]).abs().max().item()
    rows = min(s.new, 128)
    q = t["q"][:1, :, s.new - rows:].float()
    want = sdpa(q, t["k"][:1].float(), t["v"][:1].float(), s.ctx - rows, s.window)[0].transpose(0, 1)
    return (out[s.new - rows:s.new].float() - want).abs().max().item()


# ------------------------------------------------------------------------------------------
# Sweep
# ------------------------------------------------------------------------------------------

def shapes(args) -> list[Shape]:
    out = []
    for layer in args.layers:
        d, window = LAYERS[layer]
        if args.window is not None and window is not None:
            window = args.window
        for hkv in args.hkv:
            for ctx in args.context:
                if "decode" in args.ops:
                    out += [Shape("decode", layer, d, window, hkv, b, ctx, 1) for b in args.batch]
                if "extend" in args.ops:
                    for b in args.extend_batch:
                        new = ctx if b == 1 else min(args.chunk, ctx)  # prefill, or chunks on a prefix
                        out.append(Shape("extend", layer, d, window, hkv, b, ctx, new))
    return out


# ------------------------------------------------------------------------------------------
# --sweep: launch settings of the kernels alone
# ------------------------------------------------------------------------------------------

# Candidates per head dim, bf16: (BLOCK_M, BLOCK_N, num_warps, num_stages) for extend, (BLOCK_N,
# num_warps, num_stages) for decode; the kernel's own table entry is timed first in any case.
# None of these was timed yet. Why these: at D=512 the float32 accumulator of a 64-row tile is
# 128 KB of registers, which 8 warps cannot hold (it spilled when compiled for sm_90, see
# optimized/kernels/attention.py), 16 warps might; 32-row tiles try narrower and wider key blocks
# and deeper pipelines. At D=256 the tile holds only 8 tokens of 8 packed heads: 128-row tiles
# halve the K/V traffic per query row if their registers and shared memory allow.
SWEEP_EXTEND = {
    512: [(32, 32, 4, 2), (32, 32, 8, 2), (32, 64, 4, 2), (32, 64, 8, 3), (32, 128, 8, 2),
          (64, 32, 8, 2), (64, 32, 16, 2), (64, 64, 16, 2)],
    256: [(64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 8, 3), (64, 128, 8, 2), (128, 32, 8, 2),
          (128, 64, 8, 2), (128, 64, 16, 2)],
}
SWEEP_DECODE = {
    512: [(16, 4, 2), (32, 4, 2), (32, 8, 3), (64, 8, 2), (64, 4, 1)],
    256: [(32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 8, 2), (32, 8, 1)],
}
SWEEP_SPLITS = ["default", 1, 2, 4, 8, 16, 32, 64]


def _parse_blocks(specs: list[str]) -> dict[int, list[tuple]]:
    """["512:32,64,8,2", ...] -> {512: [(32, 64, 8, 2)], ...}"""
    out: dict[int, list[tuple]] = {}
    for spec in specs:
        d, cfg = spec.split(":")
        out.setdefault(int(d), []).append(tuple(int(x) for x in cfg.split(",")))
    return out


def _candidates(table: dict, d: int, given: dict, default: dict, quick: bool) -> list[tuple]:
    """The kernel's entry first, then --extend-blocks/--decode-blocks if given, else the defaults."""
    own = table[d]
    cands = given.get(d) if given else default[d]
    if quick and not given:
        cands = cands[:1]
    return [own] + [c for c in dict.fromkeys(cands) if c != own]


def _try(fn):
    """(result, None), or (None, one line) when fn raises: a setting that does not compile (out of
    shared memory or registers, a block shape Triton refuses) must not end the sweep."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 (any compile or launch error is a result of the sweep)
        line = (traceback.format_exception_only(type(e), e)[-1].strip() or type(e).__name__)
        return None, line[:300]


def sweep(args, device, timer, graph_timer, gen, emit) -> None:
    ps = args.page_size
    failed = {}  # (d, decode blocks, one split) -> error: not compiled again for every shape
    for layer in args.layers:
        d, window = LAYERS[layer]
        if args.window is not None and window is not None:
            window = args.window
        bf16 = attention._EXTEND_BLOCKS[2]
        # Extend: one request prefilling --prefill tokens.
        if "extend" in args.ops:
            s = Shape("extend", layer, d, window, 1, 1, args.prefill, args.prefill)
            t = build(s, device, ps, gen)
            tol = 4 * torch.finfo(DTYPE).eps * t["v"].abs().max().item()
            own = bf16[d]
            for cfg in _candidates(bf16, d, args.extend_given, SWEEP_EXTEND, args.quick):
                bf16[d] = cfg
                # Each setting as the kernel runs it, with one masked loop (the kernel before the
                # unmasked interior: more code in the loop can cost registers, both spill at
                # D=512) and with its tiles in id order (before EXTEND_LONGEST_FIRST).
                for interior, longest_first in ((True, True), (False, True), (True, False)):
                    attention.EXTEND_UNMASKED_INTERIOR = interior
                    attention.EXTEND_LONGEST_FIRST = longest_first
                    out, error = _try(lambda: run_kernel(s, t, ps))
                    secs = err = None
                    if error is None:
                        err = check(s, t, out)
                        secs, error = _try(lambda: timer(lambda: run_kernel(s, t, ps)) * 1e-6)
                    emit(dict(asdict(s), hq=HQ, blocks=list(cfg), default=cfg == own, unmasked_interior=interior,
                              longest_first=longest_first,
                              kernel_s=secs, error=error, TFLOPs=None if secs is None else s.flops() / secs / 1e12,
                              max_abs_err=err, tol=tol, ok=error is None and err <= tol))
            bf16[d] = own
            attention.EXTEND_UNMASKED_INTERIOR = attention.EXTEND_LONGEST_FIRST = True
            del t
        # Decode over a full-width page table, timed from a graph.
        if "decode" in args.ops:
            table = attention._DECODE_BLOCKS[2]
            own = table[d]
            for batch in args.batch:
                for ctx in args.context:
                    s = Shape("decode", layer, d, window, 1, batch, ctx, 1)
                    t = build(s, device, ps, gen, table_pages=triton.cdiv(args.table_keys, ps))
                    tol = 4 * torch.finfo(DTYPE).eps * t["v"].abs().max().item()
                    for cfg in _candidates(table, d, args.decode_given, SWEEP_DECODE, args.quick):
                        table[d] = cfg
                        for splits in args.splits:
                            n = None if splits == "default" else int(splits)
                            key = (d, cfg, n == 1)
                            out, error = (None, failed[key]) if key in failed else _try(lambda: run_kernel(s, t, ps, n))
                            if error is not None:
                                failed[key] = error
                            secs = err = None
                            if error is None:
                                err = check(s, t, out)
                                secs, error = _try(lambda: graph_timer(lambda: run_kernel(s, t, ps, n)) * 1e-6)
                            label = splits
                            if n is None:  # what decode_attention picks for this table and block
                                keys = t["page_table"].shape[1] * ps
                                keys = keys if window is None else min(keys, window)
                                label = f"default={attention.default_num_splits(batch, 1, keys, cfg[0])}"
                            emit(dict(asdict(s), hq=HQ, blocks=list(cfg), default=cfg == own, splits=label,
                                      table_keys=args.table_keys, kernel_s=secs, error=error,
                                      graphed=graph_timer.last_graphed,
                                      GBps=None if secs is None else s.bytes_moved() / secs / 1e9,
                                      max_abs_err=err, tol=tol, ok=error is None and err <= tol))
                    table[d] = own
                    del t


def sweep_line(r: dict) -> str:
    what = (f"{r['op']:6} {r['layer']:7} D={r['d']} B={r['batch']:<3} ctx={r['ctx']:<6} "
            f"blocks={','.join(map(str, r['blocks'])):<12}{'*' if r['default'] else ' '}")
    if r["op"] == "decode":
        what += f" splits={str(r['splits']):<10}"
    else:
        what += " interior" if r["unmasked_interior"] else " masked  "
        what += " last-first" if r["longest_first"] else " id-order  "
    if r["error"]:
        return f"{what} SKIPPED: {r['error']}"
    rate = f"{r['GBps']:7.0f} GB/s" if r["op"] == "decode" else f"{r['TFLOPs']:6.1f} TFLOP/s"
    return (f"{what} {r['kernel_s'] * 1e6:9.1f} us {rate}  err {r['max_abs_err']:.1e}"
            f"{'' if r['ok'] else '  FAIL'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: a smoke run")
    p.add_argument("--ops", nargs="+", default=["decode", "extend"], choices=["decode", "extend"])
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--hkv", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch", nargs="+", type=int, default=None,
                   help="decode batch sizes (default 1 8 32 64; --sweep: 1 8 32)")
    p.add_argument("--extend-batch", nargs="+", type=int, default=[1, 4],
                   help="extend batch sizes: 1 prefills the whole context, more extend --chunk tokens each")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--context", nargs="+", type=int, default=None,
                   help="keys per request (default 1024 4096 16384 32768; --sweep: 200 4096 16384)")
    p.add_argument("--window", type=int, default=None, help="override the sliding window (512)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per shape (default 20; --sweep: 10)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--flush-mb", type=int, default=256, help="L2 flush buffer (0: none)")
    p.add_argument("--copy-mb", type=int, default=2048, help="size of the bandwidth-reference copy")
    p.add_argument("--sdpa-mem-gb", type=float, default=24.0, help="skip timing SDPA above this estimate")
    p.add_argument("--extend-blocks", nargs="+", default=[], metavar="D:BM,BN,WARPS,STAGES",
                   help="override the kernel's bf16 extend block table, e.g. 512:64,32,8,1")
    p.add_argument("--decode-blocks", nargs="+", default=[], metavar="D:BN,WARPS,STAGES",
                   help="override the kernel's bf16 decode block table, e.g. 256:32,4,2")
    p.add_argument("--sweep", action="store_true",
                   help="time candidate launch settings (see above) instead of comparing with SDPA; "
                        "--extend-blocks/--decode-blocks then list the candidates (several per head dim allowed)")
    p.add_argument("--prefill", type=int, default=8192, help="--sweep: extend prefill length")
    p.add_argument("--table-keys", type=int, default=32768,
                   help="--sweep: decode page-table capacity in keys (a graph's max context)")
    p.add_argument("--splits", nargs="+", default=None, help="--sweep: decode split counts ('default': the heuristic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = p.parse_args(argv)
    command = " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))
    # Defaults that differ by mode: the sweep's decode batches and contexts are E2B serving's.
    args.batch = args.batch or ([1, 8, 32] if args.sweep else [1, 8, 32, 64])
    args.context = args.context or ([200, 4096, 16384] if args.sweep else [1024, 4096, 16384, 32768])
    args.repeats = args.repeats or (10 if args.sweep else 20)
    if args.quick:
        args.batch, args.extend_batch, args.context, args.hkv = [1, 3], [1, 2], [40], [1]
        args.chunk, args.window, args.repeats, args.warmup, args.copy_mb = 8, 16, 2, 1, 64
        args.prefill, args.table_keys = 40, 64
        args.splits = args.splits or ["default", 1, 4]
    args.splits = args.splits or SWEEP_SPLITS

    if args.sweep:
        args.extend_given, args.decode_given = _parse_blocks(args.extend_blocks), _parse_blocks(args.decode_blocks)
    else:
        for specs, table in ((args.extend_blocks, attention._EXTEND_BLOCKS[2]),
                             (args.decode_blocks, attention._DECODE_BLOCKS[2])):
            for d, cfgs in _parse_blocks(specs).items():
                table[d] = cfgs[-1]
    device = default_device()
    timer = Timer(device, args.repeats, args.warmup, args.flush_mb)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if args.sweep:
        return run_sweep(args, device, timer, gen, command)
    copy_bw = copy_bandwidth(timer, device, args.copy_mb << 20)
    name = device_name(device)
    print(f"device: {name}{' (Triton interpreter)' if INTERPRETING else ''}; "
          f"copy bandwidth {copy_bw / 1e9:.0f} GB/s; bf16; page_size {args.page_size}\n")

    header = ("| op | layer | D | W | Hq:Hkv | B | ctx | new | kernel µs | SDPA µs | speedup | "
              "kernel GB/s | % copy BW | kernel TFLOP/s | max abs err | ok |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for s in shapes(args):
        t = build(s, device, args.page_size, gen)
        out = run_kernel(s, t, args.page_size)
        err = check(s, t, out)
        # Against float32 SDPA: the kernel rounds its output to bf16 and feeds P to the PV dot in
        # bf16, each worth up to one bf16 ULP of max|v|; 4 ULPs leaves margin, and a wrong mask or
        # page lookup is off by far more.
        tol = 4 * torch.finfo(DTYPE).eps * t["v"].abs().max().item()
        k_time = timer(lambda: run_kernel(s, t, args.page_size)) * 1e-6
        s_time = None
        if sdpa_mem_estimate(s) <= args.sdpa_mem_gb * 1e9:
            q_first = s.ctx - s.new
            k_d, v_d = t["k"], t["v"]
            if s.op == "decode" and s.window is not None:  # a dense sliding cache holds W keys
                lo = first_visible_key(q_first, s.window)
                k_d, v_d = k_d[:, :, lo:].contiguous(), v_d[:, :, lo:].contiguous()
                q_first -= lo
                win = None
            else:
                win = s.window
            s_time = timer(lambda: sdpa(t["q"], k_d, v_d, q_first, win)) * 1e-6
        row = dict(asdict(s), hq=HQ, kernel_s=k_time, sdpa_s=s_time, bytes=s.bytes_moved(), flops=s.flops(),
                   kernel_GBps=s.bytes_moved() / k_time / 1e9, copy_fraction=s.bytes_moved() / k_time / copy_bw,
                   kernel_TFLOPs=s.flops() / k_time / 1e12, max_abs_err=err, tol=tol, ok=err <= tol)
        rows.append(row)
        print(f"| {s.op} | {s.layer} | {s.d} | {s.window or '-'} | {HQ}:{s.hkv} | {s.batch} | {s.ctx} | {s.new} "
              f"| {k_time * 1e6:.1f} | {'-' if s_time is None else f'{s_time * 1e6:.1f}'} "
              f"| {'-' if s_time is None else f'{s_time / k_time:.2f}x'} | {row['kernel_GBps']:.0f} "
              f"| {100 * row['copy_fraction']:.1f}% | {row['kernel_TFLOPs']:.1f} | {err:.2e} "
              f"| {'ok' if row['ok'] else 'FAIL'} |", flush=True)
        del t, out

    result = dict(device=str(name), interpreter=INTERPRETING, torch=torch.__version__, triton=triton.__version__,
                  dtype=str(DTYPE), page_size=args.page_size, copy_bandwidth_Bps=copy_bw,
                  extend_blocks=attention._EXTEND_BLOCKS[2], decode_blocks=attention._DECODE_BLOCKS[2], rows=rows,
                  command=command)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1



def run_sweep(args, device, timer, gen, command) -> int:
    graph_timer = Timer(device, args.repeats, args.warmup, args.flush_mb, graphs=True)
    name = device_name(device)
    print(f"device: {name}{' (Triton interpreter)' if INTERPRETING else ''}; bf16; page_size {args.page_size}; "
          f"Hq={HQ}, Hkv=1; decode table {args.table_keys} keys, timed from a device graph; "
          f"* marks the kernel's current entry\n", flush=True)
    result = dict(device=str(name), interpreter=INTERPRETING, torch=torch.__version__, triton=triton.__version__,
                  dtype=str(DTYPE), page_size=args.page_size, hq=HQ, hkv=1, prefill=args.prefill,
                  table_keys=args.table_keys, extend_blocks=dict(attention._EXTEND_BLOCKS[2]),
                  decode_blocks=dict(attention._DECODE_BLOCKS[2]), rows=[], command=command)
    t0 = time.perf_counter()

    def emit(row):
        result["rows"].append(row)
        print(f"[{time.perf_counter() - t0:6.0f} s] {sweep_line(row)}", flush=True)
        if args.out:  # after every row: a sweep cut short by a time limit keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))

    sweep(args, device, timer, graph_timer, gen, emit)
    rows = result["rows"]
    skipped = sum(1 for r in rows if r["error"])
    print(f"\n{len(rows)} settings in {time.perf_counter() - t0:.0f} s; {skipped} skipped; "
          f"{sum(1 for r in rows if not r['error'] and not r['ok'])} wrong")
    for op, key in (("extend", "TFLOPs"), ("decode", "kernel_s")):
        best = {}
        for r in rows:
            if r["op"] == op and r["ok"]:
                k = (r["layer"], r["batch"], r["ctx"])
                if k not in best or (r[key] > best[k][key] if key == "TFLOPs" else r[key] < best[k][key]):
                    best[k] = r
        for r in best.values():
            print(f"best: {sweep_line(r)}")
    return 0 if all(r["ok"] or r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
