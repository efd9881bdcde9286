#!/usr/bin/env bash
# One device call: the kernel benchmark with the launch shapes chosen from the sweep.
set -uo pipefail
OUT=${OUT:-reports/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 400 python3 bench/kernel_bench.py --out "$OUT/kernel_bench.json" > "$OUT/kernel_bench.log" 2>&1
tail -n 3 "$OUT/kernel_bench.log"; grep -c FAIL "$OUT/kernel_bench.log"
timeout 150 python3 bench/kernel_bench.py --no-graphs --tokens 1 64 8192 --models e2b --repeats 20 \
    --out "$OUT/kernel_bench_nographs.json" > "$OUT/kernel_bench_nographs.log" 2>&1; tail -n 2 "$OUT/kernel_bench_nographs.log"
