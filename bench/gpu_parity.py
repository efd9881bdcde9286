"""bf16 parity of the optimized path against the reference on a GPU (run through the device tool).

For each model: the reference in a wide dtype is the truth; the reference in bf16 gives the noise
a bf16 implementation is expected to have; the optimized path in bf16 (chunked prefill over
several windows, shuffled pages, decode teacher-forced from the reference's greedy tokens) is
judged against that noise, tap by tap. Prints a table; --out writes JSON.

    python bench/gpu_parity.py --models tiny e2b --out parity.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import reference
from optimized.runner import Runner


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Collect:
    def __init__(self):
        self.rows = {}

    def __call__(self, rid, name, positions, tensor):
        self.rows.setdefault(name, {}).update(zip(positions.tolist(), tensor))

    def tensor(self, name):
        d = self.rows[name]
        pos = sorted(d)
        return torch.tensor(pos), torch.stack([d[p] for p in pos])


SETTINGS = {
    "tiny": dict(prompt=40, new=12, chunk=7, page=4, truth=torch.float64),
    "e2b": dict(prompt=1500, new=16, chunk=512, page=16, truth=torch.float32),
}


def run_model(name: str, seed: int = 0) -> dict:
    s = SETTINGS[name]
    dev = "cuda"
    cfg, w_truth = reference.resolve(name, dtype=s["truth"], device=dev, seed=seed)
    w_bf16 = {k: v.to(torch.bfloat16) for k, v in w_truth.items()}
    w_truth = {k: v.to(s["truth"]) for k, v in w_bf16.items()}  # same (bf16-representable) weights
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (s["prompt"],), generator=g).tolist()

    ref_bf16 = reference.Gemma4Reference(cfg, w_bf16)
    greedy = ref_bf16(torch.tensor(prompt, device=dev))[-1].argmax().item()
    seq = list(prompt)
    for _ in range(s["new"]):  # the reference's own greedy continuation, used as teacher tokens
        seq.append(int(ref_bf16(torch.tensor(seq, device=dev))[-1].argmax()))
    teacher = seq[len(prompt):]
    del greedy

    truth_taps, ref_taps = {}, {}
    reference.Gemma4Reference(cfg, w_truth)(torch.tensor(seq, device=dev), taps=truth_taps)
    del w_truth
    ref_bf16(torch.tensor(seq, device=dev), taps=ref_taps)
    sink = Collect()
    t0 = time.perf_counter()
    runner = Runner(cfg, weights=w_bf16, dtype=torch.bfloat16, device=dev, page_size=s["page"],
                    chunk_size=s["chunk"], page_order_seed=seed + 1)
    res = runner.run([prompt], max_new_tokens=s["new"], teacher_tokens=[teacher], return_logits=True, taps=sink)[0]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0

    rows = []
    for tap in truth_taps:
        pos, opt = sink.tensor(tap)
        truth, ref = truth_taps[tap][pos.to(dev)], ref_taps[tap][pos.to(dev)]
        noise, err = rel(ref, truth), rel(opt, truth)
        rows.append(dict(tap=tap, ref_err=noise, opt_err=err, ratio=err / max(noise, 1e-12)))
    logits_truth = truth_taps["logits"]
    argmax_agree = (res.logits.to(dev).argmax(-1) == logits_truth.argmax(-1)).float().mean().item()
    ref_agree = (ref_taps["logits"].argmax(-1) == logits_truth.argmax(-1)).float().mean().item()
    worst = max(rows, key=lambda r: r["ratio"])
    return dict(model=name, tokens=len(seq), prompt=len(prompt), chunk=s["chunk"], page=s["page"],
                truth_dtype=str(s["truth"]), logits_ref_err=rel(ref_taps["logits"], logits_truth),
                logits_opt_err=rel(res.logits.to(dev), logits_truth), argmax_agree_opt=argmax_agree,
                argmax_agree_ref=ref_agree, worst_tap=worst, runner_seconds=elapsed, taps=rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "e2b"])
    ap.add_argument("--out")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": []}
    print(f"device: {out['device']}, torch {torch.__version__}")
    print("| model | tokens | logits rel err: ref bf16 | optimized bf16 | argmax agree ref / opt | worst tap (opt/ref err) |")
    print("|---|---|---|---|---|---|")
    for m in args.models:
        r = run_model(m)
        out["results"].append(r)
        w = r["worst_tap"]
        print(f"| {m} | {r['tokens']} | {r['logits_ref_err']:.3e} | {r['logits_opt_err']:.3e} | "
              f"{r['argmax_agree_ref']:.3f} / {r['argmax_agree_opt']:.3f} | {w['tap']} {w['ratio']:.2f}x |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
