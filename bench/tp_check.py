"""Tensor parallelism at world size 1 on this machine's device (issue 14, deliverable 4): on a
GPU the group runs NCCL, so every all-reduce and tap gather goes through it, with one rank.

For each test architecture in float32: the engine with tp=1 against the engine without tp (the
same greedy tokens required; the largest logit difference printed: a one-rank all-reduce only
copies, but the unsharded engine may replay decode graphs, whose padded batch can pick other GEMM
kernels, while tp runs decode eagerly), then one scenario under the oracle with tp=1 (parity)
and the shard fault (caught at its tap). Prints one line per check and OK / MISMATCH.

    python bench/tp_check.py [--out docs/results/tp_check.json]
    torchrun --nproc-per-node 1 bench/tp_check.py      (the same, launched as a multi-GPU run is)

The oracle's own launcher for the same path: `torchrun --nproc-per-node 1 -m oracle.cli check --tp 1`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized.kernels import default_device  # noqa: E402  (first: it may switch on the interpreter)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from oracle.faults import FAULTS  # noqa: E402
from oracle.run import run_scenario  # noqa: E402
from optimized import parallel  # noqa: E402
from optimized.runner import Runner  # noqa: E402

PRESETS = ("tiny", "tiny-kv-eq-v", "tiny-moe")
FAULT = "tp-o-proj-shard-one-head-late"
PROMPTS = [[(7 * i + 3) % 256 for i in range(19)], [5, 9, 200, 17, 3, 8, 8, 1]]
RUN = dict(max_new_tokens=[9, 5], chunk_splits=[[8, 8, 3], [5, 3]], return_logits=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    device = default_device()
    tp = parallel.setup(1, device)
    rows, ok = [], True
    print(f"device {tp.device}, backend {tp.backend}, world {tp.world}", flush=True)
    if tp.backend != parallel.backend_for(tp.device):
        print(f"MISMATCH: {tp.device} must run {parallel.backend_for(tp.device)}")
        ok = False
    for preset in PRESETS:
        engine = dict(device=device, page_size=4, chunk_size=8, page_order_seed=3)
        plain = Runner(preset, **engine).run(PROMPTS, **RUN)
        sharded_runner = Runner(preset, tp=tp, **engine)
        sharded = sharded_runner.run(PROMPTS, **RUN)
        same = [a.tokens == b.tokens for a, b in zip(plain, sharded)]
        diff = max(float((a.logits - b.logits).abs().max()) for a, b in zip(plain, sharded))
        clean = run_scenario(FAULTS["window-one-short"].scenario(preset, device=str(device)), tp=tp)
        fault = FAULTS[FAULT]
        faulty = run_scenario(fault.scenario(preset, device=str(device)), faults=[FAULT], tp=tp)
        caught = faulty.comparison.first_divergence
        row = dict(preset=preset, tokens_equal=all(same), max_logit_diff=diff, oracle_parity=clean.passed,
                   fault_first_divergence=None if caught is None else caught.tap,
                   decode=sharded_runner.engine.graphs_off_because or "graphs")
        rows.append(row)
        good = all(same) and clean.passed and caught is not None and (preset != "tiny" or caught.tap == fault.expect)
        ok &= good
        print(f"{preset}: tp=1 vs no tp tokens {'equal' if all(same) else 'DIFFER'}, max logit diff {diff:.3g}; "
              f"oracle {'parity' if clean.passed else 'DIVERGENCE'}; fault caught at {row['fault_first_divergence']}",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=str(tp.device), backend=tp.backend, torch=torch.__version__,
                                                  rows=rows, ok=ok), indent=1) + "\n")
    dist.destroy_process_group()
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
