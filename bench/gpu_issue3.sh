#!/usr/bin/env bash
# One device call for "Optimized path I": bf16 (compiled kernels, bf16 tl.dot branch)
# parity of the paged path against the reference (tiny and the e2b shape), and the attention
# benchmark against SDPA. Results land in $OUT (device tool) or ./reports/gpu.
set -uo pipefail
OUT=${OUT:-reports/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 bench/gpu_parity.py --models tiny e2b --out "$OUT/parity.json" 2>&1 | tee "$OUT/parity.log"
timeout 600 python3 bench/attention_bench.py --repeats 10 --out "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log"
