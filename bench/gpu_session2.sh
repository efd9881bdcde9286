#!/usr/bin/env bash
# One device call: the kernel testbed at E2B sizes, bf16 parity of the paged path now running the
# fused kernels, and the cost of disabled taps on a real-shape forward.
set -uo pipefail
OUT=${OUT:-reports/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu2.txt"
timeout 150 python3 -m oracle.cli kernels --device cuda --size e2b --dtype bfloat16 float32 --repeats 20 \
    --out "$OUT/kernels.json" 2>/dev/null | tee "$OUT/kernels.log"
timeout 150 python3 bench/gpu_parity.py --models tiny e2b --out "$OUT/parity_fused.json" 2>&1 | tee "$OUT/parity_fused.log"
timeout 120 python3 bench/tap_overhead.py --model e2b --tokens 512 --dtype bfloat16 --repeats 10 2>&1 | tee "$OUT/tap_overhead.log"
