#!/usr/bin/env bash
# Every speed figure of an accelerator session in one call (issue 14): each workload in its own process under
# its own timeout, a line per phase as it runs, raw JSON lines in $OUT/bench.jsonl, every phase's log in
# $OUT/phases.log, the CG step's and the denoise step's profiles (top ops with floors) in the JSON lines.
#   tools/device_check.sh                              SD-1.5 shapes, every phase (a GPU or TPU host)
#   PHASES="blocks denoise train_cg" tools/device_check.sh    some phases, in the order given
#   SIZE=tiny tools/device_check.sh                    the same phases at tiny shapes: minutes on a CPU
#   PHASES="setup sdxl_train_cg sdxl_denoise sdxl_peer" tools/device_check.sh   SDXL base at 1024 px (issue 15)
# BUDGET_S (default 540) bounds the whole run: a phase gets at most what is left of it, a phase that would start
# with under 20 s left is skipped (and says so). Wheels the host lacks (grain, ml_collections, tensorboardX,
# diffusers, ...) travel in .whl/ and are installed into /tmp/site first.
set -uo pipefail
OUT=${OUT:-.out}; SIZE=${SIZE:-sd15}; BUDGET_S=${BUDGET_S:-540}
PHASES=${PHASES:-"setup blocks denoise train_cg cg_cached train_cg_b32 train_pg peer generate vae flags sdxl_train_cg \
sdxl_denoise sdxl_peer"}
START=$(date +%s)
mkdir -p "$OUT"
LOGS=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
export BGJAX_COMPILE_CACHE=${BGJAX_COMPILE_CACHE:-$LOGS/compile_cache}  # shared by the phases, fresh per run
LOG="$OUT/bench.jsonl"; : > "$LOG"
if [ "$SIZE" = tiny ]; then
  T="--size tiny"; STEPS=2; REPS=2; B=2; B2=4; IB="--train-batch 2 --infer-batch 2 --warm 1"
  GEN="--num-images 2 --steps 4 --reps 1 --what cg"; XB="--train-batch 2 --infer-batch 2 --warm 1"; SB=2
else
  T=""; STEPS=10; REPS=10; B=16; B2=32; IB=""; GEN="--reps 2"; XB="--train-batch 4 --infer-batch 4"; SB=4
fi

phase() {  # phase NAME LIMIT COMMAND...: JSON lines to $LOG (and shortened here), progress lines here
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then echo "[$(( $(date +%s) - START )) s] $name: skipped, budget spent"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0; t0=$(date +%s)
  echo "[$(( t0 - START )) s] $name (at most $limit s) ..."
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local status=$?
  grep -h '^{' "$LOGS/$name.log" | tee -a "$LOG" | cut -c1-240
  grep -h '^\[ *[0-9.]* s\]' "$LOGS/$name.log" | tail -4 | sed 's/^/    /'  # bench_train's own phases
  [ "$status" -ne 0 ] && grep -v '^{' "$LOGS/$name.log" | tail -6 | cut -c1-300 | sed 's/^/    ! /'
  echo "[$(( $(date +%s) - START )) s] $name: exit $status after $(( $(date +%s) - t0 )) s"
}

for p in $PHASES; do
  case $p in
    setup)
      command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem \
        --format=csv,noheader
      phase setup 120 python3 -c "import jax, flax, optax, orbax.checkpoint, grain, ml_collections, bgjax.train.loop, \
bgjax.sampling.pipeline; import json; print(json.dumps({'what': 'setup', 'jax': jax.__version__, 'flax': flax.__version__, \
'devices': [d.device_kind for d in jax.devices()]}))" ;;
    blocks) phase blocks 150 python3 tools/bench_blocks.py $T --reps $(( REPS * 2 )) ;;
    denoise) phase denoise 150 python3 tools/bench.py $T $IB --no-peer --what denoise --reps "$REPS" \
      --branches "${DENOISE_BRANCHES:-controlnet,cg}" \
      --profile "$LOGS/prof_denoise" ;;
    train_cg) phase train_cg 300 python3 tools/bench_train.py $T --stage cg --batch $B --steps "$STEPS" \
      --profile "$LOGS/prof_cg" ;;
    cg_cached) phase cg_cached 120 python3 tools/bench_train.py $T --stage cg --batch $B --memory-only ;;
    train_cg_b32) phase train_cg_b32 240 python3 tools/bench_train.py $T --stage cg --batch $B2 --steps 3 ;;
    train_pg) phase train_pg 240 python3 tools/bench_train.py $T --stage pg --batch $B --steps "$STEPS" ;;
    peer) phase peer 180 python3 tools/bench.py $T $IB --no-bgjax --what train,denoise --no-torch-compile \
      --reps "$REPS" ;;
    generate) phase generate 240 python3 tools/bench_generate.py $T $GEN ;;
    vae) phase vae 120 python3 tools/bench.py $T $IB --what vae --reps "$REPS" ;;
    flags)  # XLA flags one at a time, on the denoise step (it compiles in seconds)
      for f in --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false \
               --xla_gpu_autotune_level=0; do
        XLA_FLAGS="${XLA_FLAGS:-} $f" phase "flags${f%%=*}" 100 python3 tools/bench.py $T $IB --no-peer --what denoise \
          --reps "$REPS"
      done ;;
    sdxl_train_cg) phase sdxl_train_cg 420 python3 tools/bench_train.py --base sdxl $T --stage cg --batch $SB --steps 3 ;;
    sdxl_denoise) phase sdxl_denoise 240 python3 tools/bench.py --base sdxl $T $XB --no-peer --what denoise,vae \
      --reps "$REPS" ;;
    sdxl_peer) phase sdxl_peer 240 python3 tools/bench.py --base sdxl $T $XB --no-bgjax --what train,denoise \
      --no-torch-compile --reps "$REPS" ;;
    *) echo "unknown phase $p" ;;
  esac
done
for f in "$LOGS"/*.log; do echo "=== $(basename "$f")"; cat "$f"; done > "$OUT/phases.log"
for name in cg denoise; do  # the traces and the compiled modules, for a closer look later
  trace=$(find "$LOGS/prof_$name" -name perfetto_trace.json.gz 2>/dev/null | head -1)
  [ -n "$trace" ] && cp "$trace" "$OUT/trace_$name.json.gz"
  [ -f "$LOGS/prof_$name/step.hlo.txt" ] && gzip -c "$LOGS/prof_$name/step.hlo.txt" > "$OUT/hlo_$name.txt.gz"
done
echo "[$(( $(date +%s) - START )) s] done: $(wc -l < "$LOG") JSON lines in $LOG"
