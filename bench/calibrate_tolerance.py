"""Evidence for the tolerance multiple (shared/DESIGN.md "Tolerance"): run many property-generated
clean scenarios and report how close the optimized path ever came to its budgets (the largest
error/budget ratio per tap kind). A ratio near 1 on clean runs would mean false alarms; the
injected faults (oracle/faults.py, when present) must land far above 1.

    python bench/calibrate_tolerance.py --examples 40 [--dtype bfloat16] [--out docs/results/calibration.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized.kernels import INTERPRETING  # noqa: E402,F401  (decides the interpreter first)

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from oracle.run import run_scenario  # noqa: E402
from oracle.strategies import save_failing, scenarios  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    worst: dict[str, dict] = {}
    runs = []

    @settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(sc=scenarios(dtype=args.dtype, device=args.device))
    def one(sc):
        t0 = time.perf_counter()
        run = run_scenario(sc)
        ratios = []
        for req in run.comparison.requests:
            for row in req.rows:
                if row.verdict is None:
                    continue
                kind = row.kind
                r = max(row.verdict.ratio, row.verdict.max_abs_ratio)
                ratios.append(r)
                if r > worst.get(kind, {}).get("ratio", -1):
                    worst[kind] = {"ratio": r, "tap": row.tap, "scenario": sc.to_dict()}
        runs.append({"passed": run.passed, "max_ratio": max(ratios), "seconds": time.perf_counter() - t0,
                     "model": sc.model.source, "page_size": sc.engine.page_size,
                     "requests": len(sc.requests)})
        if not run.passed:
            print(f"FALSE ALARM? {run.comparison.summary()}\nsaved: {save_failing(sc)}", flush=True)
        print(f"[{len(runs)}] {sc.model.source} page {sc.engine.page_size} chunk {sc.engine.chunk_size} "
              f"reqs {len(sc.requests)}: max ratio {max(ratios):.3f} ({runs[-1]['seconds']:.1f}s)", flush=True)

    torch.manual_seed(args.seed)
    one()
    overall = max(r["max_ratio"] for r in runs)
    print(f"\n{len(runs)} scenarios, {sum(not r['passed'] for r in runs)} flagged; "
          f"largest error/budget ratio on clean runs: {overall:.3f}")
    for kind, w in sorted(worst.items(), key=lambda kv: -kv[1]["ratio"]):
        print(f"  {kind:10s} {w['ratio']:.3f} ({w['tap']})")
    if args.out:
        Path(args.out).write_text(json.dumps({"dtype": args.dtype, "device": args.device, "runs": runs,
                                              "worst_by_kind": worst}, indent=1))


if __name__ == "__main__":
    main()
