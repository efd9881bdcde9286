"""Calibration of the bfloat16 judgements (issue 9): run N property-generated clean scenarios
(oracle/strategies.py, drawn deterministically from a seeded random generator) and the precision
faults, and write per judgement the largest clean ratio (the margin left), the false-alarm count,
and each fault's catch ratio in float32 and bfloat16.

    python bench/calibrate_bf16.py --device cuda --scenarios 200 --time-limit 1500 --out docs/results/calibration_bf16.json
    python bench/calibrate_bf16.py --device cpu --scenarios 8 --dtypes bfloat16,float32

The JSON (`--out`) is rewritten after every scenario and every fault, so a run that is stopped
still leaves its results; `--time-limit SECONDS` stops drawing clean scenarios once that much time
has passed (the faults, ~1 min on a GPU, run after it unless --no-faults).

Judgements (a ratio above 1 fails): global / local relative L2 and max abs against their budgets;
`rounding` (local `o`: error over ROUNDING_MULTIPLE x that of the kernels' documented rounding
points); `drift` (|z| over DRIFT_Z on the input taps, 16-bit only; it fails only where also
`drift_changed` >= 1, the share of changed elements over DRIFT_MIN_CHANGED); `opseq` (local
`mlp_act`: share of elements over OPSEQ_ULPS from the same-dtype op sequence, over OPSEQ_FRACTION);
`opseq_mismatch` (share of elements differing at all; informative, no limit: 0 under the
interpreter, expected <= 1e-3 on a GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized.kernels import INTERPRETING  # noqa: E402,F401  (decides the interpreter first)

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, find, settings  # noqa: E402

from oracle.faults import FAULTS, PRECISION_FAULTS, UNCAUGHT_PRECISION_FAULTS  # noqa: E402
from oracle.run import run_scenario  # noqa: E402
from oracle.strategies import scenarios  # noqa: E402
from oracle.tolerance import DRIFT_MIN_CHANGED, DRIFT_Z, OPSEQ_FRACTION, ROUNDING_MULTIPLE  # noqa: E402


def draw_scenarios(n: int, dtype: str, device: str, seed: int):
    """n scenarios drawn from the hypothesis strategy, deterministically (seed i + seed)."""
    import random

    out = []
    for i in range(n):
        # find() returns the first example it accepts, and hypothesis generates its simplest examples
        # first: accept one in four by a hash of its content (deterministic, so never flaky).
        salt = f"{seed}/{i}/"
        sc = find(scenarios(dtype=dtype, device=device),
                  lambda s: hashlib.sha256((salt + json.dumps(s.to_dict(), sort_keys=True)).encode()).digest()[0] < 64,
                  settings=settings(database=None, phases=[Phase.generate], max_examples=1000,
                                    suppress_health_check=list(HealthCheck)),
                  random=random.Random(seed * 100003 + i))
        out.append(sc)
    return out


def ratios(run) -> dict[str, tuple[float, str]]:
    """judgement -> (largest ratio, tap)."""
    best: dict[str, tuple[float, str]] = {}

    def put(key, value, tap):
        if value is not None and value > best.get(key, (-1.0, ""))[0]:
            best[key] = (float(value), tap)

    for req in run.comparison.requests:
        for row in req.rows:
            v = row.verdict
            for key, value in _row_ratios(row).items():
                put(key, value, row.tap)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", type=int, default=8, help="clean scenarios per dtype")
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated dtypes of the clean scenarios")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds after which no further clean scenario starts (results are kept)")
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    margins: dict[str, dict] = {}
    runs, alarms, faults = [], [], {}
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    state = {"stopped_by_time_limit": False}

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.out).with_suffix(".tmp")
            tmp.write_text(json.dumps({"device": args.device, "dtypes": dtypes, "scenarios": len(runs),
                                       "seconds": time.perf_counter() - t0, **state, "false_alarms": alarms,
                                       "margins": margins, "faults": faults, "runs": runs}, indent=1))
            tmp.replace(args.out)

    def out_of_time() -> bool:
        return args.time_limit is not None and time.perf_counter() - t0 > args.time_limit

    for dtype in dtypes:
        if out_of_time():
            break
        for i, sc in enumerate(draw_scenarios(args.scenarios, dtype, args.device, args.seed)):
            if out_of_time():
                state["stopped_by_time_limit"] = True
                print(f"time limit reached after {len(runs)} scenarios", flush=True)
                break
            t = time.perf_counter()
            run = run_scenario(sc)
            best = ratios(run)
            for key, (value, tap) in best.items():
                mkey = f"{dtype}/{key}"
                if value > margins.get(mkey, {}).get("ratio", -1):
                    margins[mkey] = {"ratio": value, "tap": tap, "scenario": i, "dtype": dtype}
            runs.append({"dtype": dtype, "index": i, "passed": run.passed, "seconds": time.perf_counter() - t,
                         "model": sc.model.source, "ratios": {k: v[0] for k, v in best.items()},
                         "taps": {k: v[1] for k, v in best.items()}, "scenario": sc.to_dict()})
            if not run.passed:
                alarms.append({"dtype": dtype, "scenario": i, "summary": run.comparison.summary()})
                print(f"FALSE ALARM [{dtype} {i}] {run.comparison.summary().splitlines()[0]}", flush=True)
            print(f"[{dtype} {i + 1}/{args.scenarios}] {sc.model.source}: " +
                  ", ".join(f"{k} {v[0]:.2f}" for k, v in sorted(best.items())) + f" ({runs[-1]['seconds']:.1f}s)",
                  flush=True)
            save()

    # Faults kept out of the registry (none at present) are measured too: in this process only,
    # run_scenario may inject them.
    FAULTS.update(UNCAUGHT_PRECISION_FAULTS)
    if not args.no_faults:
        for name, fault in {**PRECISION_FAULTS, **UNCAUGHT_PRECISION_FAULTS}.items():
            faults[name] = {"expect": fault.expect}
            for dtype in ("float32", "bfloat16"):
                run = run_scenario(fault.scenario(dtype=dtype, device=args.device), faults=[name])
                first = run.comparison.first_divergence
                row = next((r for r in run.comparison.requests[0].rows if r.tap == fault.expect), None)
                best = {k: v[0] for k, v in ratios(run).items()} if row is None else _row_ratios(row)
                faults[name][dtype] = {"first": first.tap if first else None,
                                       "judgement": first.judgement if first else None,
                                       "catch_ratio_at_expect": _catch_ratio(best), "ratios": best}
                print(f"fault {name} {dtype}: first {faults[name][dtype]['first']} "
                      f"({faults[name][dtype]['judgement']}); at {fault.expect}: "
                      f"{faults[name][dtype]['catch_ratio_at_expect']:.2f}", flush=True)
                save()

    print(f"\n{len(runs)} clean scenarios ({', '.join(dtypes)}) on {args.device} in {time.perf_counter() - t0:.0f}s; "
          f"false alarms: {len(alarms)}")
    print(f"{'judgement':26s} {'largest clean ratio':>20s}  tap")
    for key, m in sorted(margins.items()):
        print(f"{key:26s} {m['ratio']:20.3g}  {m['tap']} (scenario {m['scenario']})")
    if faults:
        print(f"\n{'fault':28s} {'expect':18s} {'fp32 first':18s} {'fp32 ratio':>10s} {'bf16 first':18s} {'bf16 ratio':>10s}")
        for name, f in faults.items():
            print(f"{name:28s} {f['expect']:18s} {str(f['float32']['first']):18s} "
                  f"{f['float32']['catch_ratio_at_expect']:10.2f} {str(f['bfloat16']['first']):18s} "
                  f"{f['bfloat16']['catch_ratio_at_expect']:10.2f}")
    save()


INFORMATIVE = ("opseq_mismatch", "opseq_max_ulps", "drift", "drift_changed")  # not limits on their own


def _catch_ratio(best: dict[str, float]) -> float:
    """How far over its limit the failing judgement is: the largest ratio of the judgements that fail
    on their own, and the drift test's min(|z| / DRIFT_Z, changed share / DRIFT_MIN_CHANGED)."""
    values = [v for k, v in best.items() if k not in INFORMATIVE]
    if "drift" in best:
        values.append(min(best["drift"], best.get("drift_changed", 0.0)))
    return max(values, default=0.0)


def _row_ratios(row) -> dict[str, float]:
    out = {}
    v = row.verdict
    if v is not None:
        out.update(global_rel_l2=v.ratio, global_max_abs=v.max_abs_ratio)
        if v.precision.drift_z is not None:
            out["drift"] = abs(v.precision.drift_z) / DRIFT_Z
            out["drift_changed"] = v.precision.drift_changed_fraction / DRIFT_MIN_CHANGED
    lv = row.local.verdict if row.local is not None else None
    if lv is not None:
        out.update(local_rel_l2=lv.ratio, local_max_abs=lv.max_abs_ratio)
        if lv.precision.rounding_ratio is not None:
            out["rounding"] = lv.precision.rounding_ratio / ROUNDING_MULTIPLE
        if lv.precision.opseq_far_fraction is not None:
            out["opseq"] = lv.precision.opseq_far_fraction / OPSEQ_FRACTION
            out["opseq_mismatch"] = lv.precision.opseq_mismatch_fraction
            out["opseq_max_ulps"] = lv.precision.opseq_max_ulps
    return {k: float(x) for k, x in out.items()}


if __name__ == "__main__":
    main()
