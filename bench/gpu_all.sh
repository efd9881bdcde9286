#!/usr/bin/env bash
# Every GPU measurement of the testbed, in named stages; one device call runs the stages it names:
#
#     bash bench/gpu_all.sh STAGE [STAGE ...]      e.g. bash bench/gpu_all.sh suite check
#     bash bench/gpu_all.sh all                    every stage in the order below (longer than one
#                                                  device call's 10 minutes: pick stages instead)
#
# Stages (each under its own `timeout`, seconds in brackets, overridable as TIMEOUT_<STAGE>, e.g.
# TIMEOUT_SUITE=400; a stage that fails or times out is reported and the next one still runs):
#   suite            the test suite on the GPU, 12 workers [540]            -> suite.log
#   check            gemma4-testbed check, bf16 then float32, timed [280]   -> check-{bfloat16,float32}/, check.log
#   check-real       check e2b, 31b, 26b-a4b in bf16 (seeded checkpoint-like weights) [420] -> check-<model>/, check_real.log
#   calibrate        bf16 calibration of the sharp checks [300]             -> calibration_bf16.json, calibrate.log
#   real-shapes      random-init statistics at real shapes [540]            -> real_shape_stats.jsonl, real_shapes.log
#   kernels          kernel testbed at E2B sizes + bench/kernel_bench.py [560] -> kernels/kernels.json, kernel_bench.*
#   kernels-nographs kernel_bench with plain launches (host cost in) [150]  -> kernel_bench_nographs.*
#   launch-sweep     launch shapes of the memory-bound kernels [560]        -> launch_sweep.*
#   engine           bench/engine_bench.py at E2B [400]                     -> engine_bench.json, engine.log
#   serve            bench/serve_bench.py at E2B: TTFT, tok/s at 1-64 streams (needs the serve extra) [300] -> serve_bench.*
#   tp               tensor parallel at world size 1 over NCCL: bench/tp_check.py and check --tp 1 [240] -> tp_check.json, tp.log
#   prefill          bench/prefill_profile.py: an 8k E2B prefill's wall time and kernel table by group [180]
#                                                                           -> prefill_profile.json, prefill.log
#   profile          bench/decode_profile.py: floor, engine (PDL on and off), kernel tables at batch 1 and 32,
#                    transformers (e2b; PROFILE_MODELS
#                    adds 31b, 26b-a4b) [300] -> decode_profile_<model>.json, decode_profile.log
#   variants         bench/decode_variants.py at E2B: decode under module settings side by side; VARIANTS
#                    holds its --set arguments (default: the defaults against gemv.GEMV_MAX_ROWS=8) [300]
#                                                                           -> decode_variants.json, decode_variants.log
#   chain            bench/launch_chain.py: what one link of a dependent kernel chain costs [120]
#                                                                           -> launch_chain.json, launch_chain.log
#   graphs           decode graphs against eager decode, bench/graph_check.py [300] -> graphs.log
#   attention        paged attention vs SDPA, bench/attention_bench.py [560] -> attention.json, attention.log
#   parity           bf16 parity of the paged path, bench/gpu_parity.py [300] -> parity.json, parity.log
#   taps             cost of disabled taps on a real-shape forward [120]    -> tap_overhead.log
#
# Output goes to $OUT (the device tool's output folder), default reports/gpu; gpu.txt names the
# card and the versions. Exit status: 0 when every stage passed, else 1. docs/measurements.md says
# which stage produced which table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/gpu}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu runs a stage here, for a smoke test of the script
# Appended to, not replaced: a device call may put carried wheels (the serve extra) on PYTHONPATH.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

STAGES=(suite check check-real calibrate real-shapes kernels kernels-nographs launch-sweep engine serve prefill profile
        variants chain tp graphs attention parity taps)

usage() {
  sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

if [ $# -eq 0 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  usage
  [ $# -eq 0 ] && exit 2 || exit 0
fi
if [ "$1" = "all" ]; then
  set -- "${STAGES[@]}"
fi
for s in "$@"; do  # refuse a typo before any work
  [[ " ${STAGES[*]} " == *" $s "* ]] || { echo "unknown stage: $s (stages: ${STAGES[*]})" >&2; exit 2; }
done
mkdir -p "$OUT"

# limit STAGE: the stage's timeout, TIMEOUT_<STAGE> if set.
limit() {
  local var="TIMEOUT_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  echo "${!var:-$2}"
}

# run LIMIT CMD...: CMD under `timeout LIMIT`, saying so when it ran out of time.
run() {
  local secs=$1; shift
  timeout "$secs" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "!! timed out after ${secs}s: $*"
  return $rc
}

stage_suite() {
  run "$(limit suite 540)" python3 -m pytest -n 12 -q -p no:cacheprovider 2>&1 | tee "$OUT/suite.log"
  local rc=$?
  echo "suite: $(grep -E '(passed|failed|error)' "$OUT/suite.log" | tail -n 1)"
  return $rc
}

stage_check() {
  local rc=0 t
  t=$(limit check 280)
  for dtype in bfloat16 float32; do
    echo "-- check $dtype"
    { time run $((t / 2)) python3 -m oracle.cli check --device "$DEVICE" --dtype $dtype --out "$OUT/check-$dtype"; } \
        2>&1 | tee -a "$OUT/check.log" || rc=1
  done
  return $rc
}

stage_check_real() {
  # Each real shape fits one H200 under the oracle: one copy of the bf16 weights serves both paths
  # and the float64 truth casts each weight as it reads it (oracle/run.py). 31B: 62 GB.
  local rc=0 t
  t=$(limit check-real 420)
  for model in ${REAL_MODELS:-e2b 31b 26b-a4b}; do  # REAL_MODELS picks some
    local scenarios=(--scenario one-shot-prefill)
    [ "$model" = e2b ] && scenarios+=(--scenario engine-continuous-batching)
    echo "-- check $model bfloat16"
    { time run $((t / 3)) python3 -m oracle.cli check "$model" --device "$DEVICE" --dtype bfloat16 \
        "${scenarios[@]}" --out "$OUT/check-$model"; } 2>&1 | tee -a "$OUT/check_real.log" || rc=1
  done
  return $rc
}

stage_calibrate() {
  local t extra=()
  t=$(limit calibrate 300)
  # --time-limit stops drawing scenarios in time to write the JSON before the stage's timeout.
  if python3 bench/calibrate_bf16.py --help 2>/dev/null | grep -q -- --time-limit; then
    extra=(--scenarios 200 --time-limit $((t - 60)))
  else
    extra=(--scenarios 40)
  fi
  run "$t" python3 bench/calibrate_bf16.py --device "$DEVICE" "${extra[@]}" --out "$OUT/calibration_bf16.json" \
      2>&1 | tee "$OUT/calibrate.log"
}

stage_real_shapes() {
  # What fits one H200 (139 GiB usable; estimates from the script's own estimate_gb at 256 tokens):
  # e2b at full depth with a float64 truth (54 GB); 26b-a4b (146 GB in full) and 31b (~190 GB)
  # with a float32 truth over 20 of 30 and 30 of 60 layers (100 and 97 GB).
  local rc=0 t json="$OUT/real_shape_stats.jsonl"
  t=$(limit real-shapes 540)
  for args in "--preset e2b" "--preset 26b-a4b --layers 20 --truth-dtype float32" \
              "--preset 31b --layers 30 --truth-dtype float32"; do
    echo "-- real_shape_stats $args"
    # shellcheck disable=SC2086  # $args is a list of words
    run $((t / 3)) python3 bench/real_shape_stats.py $args --device "$DEVICE" --tokens 256 --max-gb 120 \
        --json "$json" 2>&1 | tee -a "$OUT/real_shapes.log" || rc=1
  done
  return $rc
}

stage_kernels() {
  local rc=0 t
  t=$(limit kernels 560)
  run $((t / 4)) python3 -m oracle.cli kernels --device "$DEVICE" --size e2b --dtype bfloat16 float32 --repeats 20 \
      --out "$OUT/kernels" 2>&1 | tee "$OUT/kernels.log" || rc=1
  run $((t * 3 / 4)) python3 bench/kernel_bench.py --out "$OUT/kernel_bench.json" > "$OUT/kernel_bench.log" 2>&1 || rc=1
  tail -n 3 "$OUT/kernel_bench.log"
  echo "kernel_bench FAIL rows: $(grep -c FAIL "$OUT/kernel_bench.log")"
  return $rc
}

stage_kernels_nographs() {
  run "$(limit kernels-nographs 150)" python3 bench/kernel_bench.py --no-graphs --tokens 1 64 8192 --models e2b \
      --repeats 20 --out "$OUT/kernel_bench_nographs.json" > "$OUT/kernel_bench_nographs.log" 2>&1
  local rc=$?
  tail -n 2 "$OUT/kernel_bench_nographs.log"
  return $rc
}

stage_launch_sweep() {
  run "$(limit launch-sweep 560)" python3 bench/launch_sweep.py --tokens 8192 --repeats 20 \
      --out "$OUT/launch_sweep.json" --groups \
      "norms.WARP_ELEMS=1024" "norms.WARP_ELEMS=256" "norms.TILE=2048" "norms.TILE=8192 norms.WARP_ELEMS=1024" \
      "norms.TILE=2048 norms.WARP_ELEMS=256" \
      "activation.TILE=2048" "activation.TILE=2048 activation.WARP_ELEMS=256" \
      "activation.MAX_BLOCK=2048 activation.WARP_ELEMS=1024" "activation.TILE=1024 activation.WARP_ELEMS=128" \
      "activation.TILE=8192 activation.MAX_BLOCK=4096 activation.WARP_ELEMS=1024" \
      "rope.TOKEN_TILE=256" "rope.TOKEN_TILE=512 rope.WARP_ELEMS=256" "rope.WARP_ELEMS=128" \
      "rope.TOKEN_TILE=2048 rope.WARP_ELEMS=256" "rope.TOKEN_TILE=4096 rope.WARP_ELEMS=1024" \
      "rope.QKV_TILE=2048" "rope.QKV_TILE=8192" "rope.QKV_WARP_ELEMS=128" "rope.QKV_WARP_ELEMS=512" \
      2>&1 | tee "$OUT/launch_sweep.log"
}

stage_engine() {
  run "$(limit engine 400)" python3 bench/engine_bench.py --model e2b --out "$OUT/engine_bench.json" \
      2>&1 | tee "$OUT/engine.log"
}

stage_serve() {
  run "$(limit serve 300)" python3 bench/serve_bench.py --model e2b --dtype bfloat16 --device "$DEVICE" \
      --out "$OUT/serve_bench.json" 2>&1 | grep -v "INFO:" | tee "$OUT/serve_bench.log"
}

stage_prefill() {
  run "$(limit prefill 180)" python3 bench/prefill_profile.py --model e2b --tokens 8192 \
      --out "$OUT/prefill_profile.json" 2>&1 | tee "$OUT/prefill.log"
}

stage_profile() {
  # PROFILE_MODELS picks the shapes (default e2b); transformers runs beside e2b only (a 31B or
  # 26B-A4B random model of its own would take minutes to initialize and double the memory).
  local rc=0 t model models=(${PROFILE_MODELS:-e2b})
  t=$(limit profile 300)
  for model in "${models[@]}"; do
    local extra=()
    [ "$model" = e2b ] || extra=(--no-transformers)
    run $((t / ${#models[@]})) python3 bench/decode_profile.py --model "$model" --pdl both "${extra[@]}" \
        --out "$OUT/decode_profile_$model.json" 2>&1 | tee -a "$OUT/decode_profile.log" || rc=1
  done
  return $rc
}

stage_variants() {
  local sets=(${VARIANTS:---set base: --set rows8:gemv.GEMV_MAX_ROWS=8})
  run "$(limit variants 300)" python3 bench/decode_variants.py --model e2b "${sets[@]}" \
      --out "$OUT/decode_variants.json" 2>&1 | tee "$OUT/decode_variants.log"
}

stage_chain() {
  run "$(limit chain 120)" python3 bench/launch_chain.py --out "$OUT/launch_chain.json" 2>&1 \
      | tee "$OUT/launch_chain.log"
}

stage_tp() {
  local rc=0 t
  t=$(limit tp 240)
  run $((t / 2)) torchrun --nproc-per-node 1 bench/tp_check.py --out "$OUT/tp_check.json" 2>&1 | tee "$OUT/tp.log" || rc=1
  run $((t / 2)) torchrun --nproc-per-node 1 -m oracle.cli check --tp 1 --device "$DEVICE" --out "$OUT/check-tp1" \
      2>&1 | tee -a "$OUT/tp.log" || rc=1
  return $rc
}

stage_graphs() {
  run "$(limit graphs 300)" python3 bench/graph_check.py 2>&1 | tee "$OUT/graphs.log"
}

stage_attention() {
  run "$(limit attention 560)" python3 bench/attention_bench.py --repeats 10 --out "$OUT/attention.json" \
      2>&1 | tee "$OUT/attention.log"
}

stage_parity() {
  run "$(limit parity 300)" python3 bench/gpu_parity.py --models tiny e2b --out "$OUT/parity.json" \
      2>&1 | tee "$OUT/parity.log"
}

stage_taps() {
  run "$(limit taps 120)" python3 bench/tap_overhead.py --model e2b --tokens 512 --dtype bfloat16 --repeats 10 \
      2>&1 | tee "$OUT/tap_overhead.log"
}

{
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  fi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "stages: $*; device: $DEVICE; git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} 2>&1 | tee "$OUT/gpu.txt"

failed=()
for s in "$@"; do
  echo
  echo "== $s ($(date -u +%H:%M:%S))"
  start=$SECONDS
  if "stage_${s//-/_}"; then
    echo "== $s: ok in $((SECONDS - start))s"
  else
    echo "== $s: FAILED (exit $?) after $((SECONDS - start))s"
    failed+=("$s")
  fi
done
echo
if [ ${#failed[@]} -eq 0 ]; then
  echo "all stages ok: $*"
else
  echo "failed stages: ${failed[*]}"
  exit 1
fi
