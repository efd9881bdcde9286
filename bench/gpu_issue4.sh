#!/usr/bin/env bash
# One device call (issue 4's benchmark): every fused kernel against its eager twin and the unfused
# torch sequence at E2B, 31B and 26B-A4B shapes, decode and prefill token counts; then a sweep of
# the launch shapes of the memory-bound kernels at T=8192, to pick the defaults.
set -uo pipefail
OUT=${OUT:-reports/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 300 python3 bench/kernel_bench.py --out "$OUT/kernel_bench.json" 2>&1 | tee "$OUT/kernel_bench.log"
OPS="rms_norm add_rms_norm qkv_norm post_ffn_residual_scale gelu_tanh_mul softcap apply_rope rope_and_store_kv"
for cfg in "--tile 8192" "--tile 16384" "--tile 2048" "--warp-elems 256" "--warp-elems 1024" \
           "--max-block 4096" "--max-block 2048 --tile 8192" "--token-tile 4096" "--token-tile 256"; do
  name=$(echo "$cfg" | tr -d ' -')
  timeout 60 python3 bench/kernel_bench.py --models e2b 31b --tokens 8192 --repeats 10 --ops $OPS $cfg \
      --out "$OUT/tune_$name.json" 2>&1 | tail -n 20 > "$OUT/tune_$name.log"
  echo "== $cfg"; grep -E "^\| (e2b|31b)" "$OUT/tune_$name.log" | awk -F'|' '{print $2,$4,$6,$11}'
done
