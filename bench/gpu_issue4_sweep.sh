#!/usr/bin/env bash
# One device call: sweep the launch shapes of the memory-bound kernels (bench/launch_sweep.py).
set -uo pipefail
OUT=${OUT:-reports/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 560 python3 bench/launch_sweep.py --tokens 8192 --repeats 20 --out "$OUT/launch_sweep.json" --groups \
  "norms.WARP_ELEMS=1024" "norms.WARP_ELEMS=256" "norms.TILE=2048" "norms.TILE=8192 norms.WARP_ELEMS=1024" \
  "norms.TILE=2048 norms.WARP_ELEMS=256" \
  "activation.TILE=2048" "activation.TILE=2048 activation.WARP_ELEMS=256" \
  "activation.MAX_BLOCK=2048 activation.WARP_ELEMS=1024" "activation.TILE=1024 activation.WARP_ELEMS=128" \
  "activation.TILE=8192 activation.MAX_BLOCK=4096 activation.WARP_ELEMS=1024" \
  "rope.TOKEN_TILE=256" "rope.TOKEN_TILE=512 rope.WARP_ELEMS=256" "rope.WARP_ELEMS=128" \
  "rope.TOKEN_TILE=2048 rope.WARP_ELEMS=256" "rope.TOKEN_TILE=4096 rope.WARP_ELEMS=1024" \
  2>&1 | tee "$OUT/launch_sweep.log"
