"""Decode graphs against eager decode on a device that can capture them: the same greedy tokens
on `tiny` in float32 (and the reference's), and how close the first decode logits are at a real
shape in bf16, where a padded batch may pick other GEMM kernels than the eager one.

    python bench/graph_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized.kernels import default_device  # noqa: E402  (first: it may switch on the interpreter)

import torch  # noqa: E402
import reference  # noqa: E402
from optimized.engine import Engine, SamplingParams  # noqa: E402


def main() -> int:
    device = default_device()
    ok = True
    for preset, dtype in (("tiny", torch.float32), ("tiny-kv-eq-v", torch.float32), ("tiny-moe", torch.float32),
                          ("e2b", torch.bfloat16)):
        cfg, w = reference.resolve(preset, dtype=dtype, device=device, seed=0)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 3, 40, 9)]
        params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (6, 3, 8, 5, 7)]
        outs = {}
        for graphs in (True, False):
            e = Engine(cfg, weights=w, dtype=dtype, device=device, graphs=None if graphs else False, max_requests=6,
                       max_context=64,
                       chunk_size=16, page_size=4)
            outs[graphs] = [o.tokens for o in e.generate(prompts, params)]
            if graphs and e.decode_graphs is None:
                print(f"{preset}: no decode graphs ({e.graphs_off_because})")
        same = sum(a == b for a, b in zip(outs[True], outs[False]))
        line = f"{preset} {str(dtype).removeprefix('torch.')}: graphs vs eager, {same}/{len(prompts)} requests identical"
        if preset != "e2b":
            ref = reference.Gemma4Reference(cfg, w)
            want = []
            for p, sp in zip(prompts, params):
                ids = list(p)
                for _ in range(sp.max_new_tokens):
                    ids.append(int(ref.forward(torch.tensor(ids, device=device))[-1].argmax()))
                want.append(ids[len(p):])
            ref_same = sum(a == b for a, b in zip(outs[True], want))
            line += f"; graphs vs reference {ref_same}/{len(prompts)}"
            ok &= same == ref_same == len(prompts)
        print(line, flush=True)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
