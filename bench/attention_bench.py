"""Benchmark the paged attention kernels against torch SDPA at Gemma 4 shapes.

    python bench/attention_bench.py --out reports/attention_bench.json      # the full sweep
    python bench/attention_bench.py --quick                                 # a smoke run (any device)

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
"""

from __future__ import annotations

import argparse
import json
import sys
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

def build(s: Shape, device, page_size: int, gen) -> dict:
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

    return dict(
        q=q, k=k, v=v, k_pool=k_pool, v_pool=v_pool, page_table=table,
        seq_lens=torch.full((B,), S, dtype=torch.int32, device=device),
        cu=torch.arange(0, B + 1, dtype=torch.int32, device=device) * s.new,
        q_packed=q.transpose(1, 2).reshape(B * s.new, HQ, D),  # [N, Hq, D], request-major
    )


def run_kernel(s: Shape, t: dict, page_size: int) -> torch.Tensor:
    if s.op == "decode":
        return decode_attention(t["q"][:, :, 0], t["k_pool"], t["v_pool"], t["page_table"], page_size,
                                t["seq_lens"], window=s.window)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: a smoke run")
    p.add_argument("--ops", nargs="+", default=["decode", "extend"], choices=["decode", "extend"])
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--hkv", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32, 64], help="decode batch sizes")
    p.add_argument("--extend-batch", nargs="+", type=int, default=[1, 4],
                   help="extend batch sizes: 1 prefills the whole context, more extend --chunk tokens each")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--context", nargs="+", type=int, default=[1024, 4096, 16384, 32768])
    p.add_argument("--window", type=int, default=None, help="override the sliding window (512)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--flush-mb", type=int, default=256, help="L2 flush buffer (0: none)")
    p.add_argument("--copy-mb", type=int, default=2048, help="size of the bandwidth-reference copy")
    p.add_argument("--sdpa-mem-gb", type=float, default=24.0, help="skip timing SDPA above this estimate")
    p.add_argument("--extend-blocks", nargs="+", default=[], metavar="D:BM,BN,WARPS,STAGES",
                   help="override the kernel's bf16 extend block table, e.g. 512:64,32,8,1")
    p.add_argument("--decode-blocks", nargs="+", default=[], metavar="D:BN,WARPS,STAGES",
                   help="override the kernel's bf16 decode block table, e.g. 256:32,4,2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.extend_batch, args.context, args.hkv = [1, 3], [1, 2], [40], [1]
        args.chunk, args.window, args.repeats, args.warmup, args.copy_mb = 8, 16, 2, 1, 64

    for specs, table in ((args.extend_blocks, attention._EXTEND_BLOCKS[2]),
                         (args.decode_blocks, attention._DECODE_BLOCKS[2])):
        for spec in specs:
            d, cfg = spec.split(":")
            table[int(d)] = tuple(int(x) for x in cfg.split(","))
    device = default_device()
    timer = Timer(device, args.repeats, args.warmup, args.flush_mb)
    gen = torch.Generator(device=device).manual_seed(args.seed)
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
                  command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
