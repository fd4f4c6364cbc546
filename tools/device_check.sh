#!/usr/bin/env bash
# One accelerator session measures every speed figure in one call (issue 14), each workload in its own
# process under its own timeout, printing a line per phase as it goes; raw JSON lines go to $OUT/bench.jsonl.
#   tools/device_check.sh                 SD-1.5 shapes (a GPU or TPU host)
#   SIZE=tiny tools/device_check.sh       the same phases at tiny shapes: minutes on a CPU
# Phases: (1) compile only: the CG and PG steps' compile seconds, memory_analysis() and XLA's FLOPs at batch
# 16 and 32; (2) timing, bgjax then the PyTorch peer in the same run: training steps, denoise steps, VAE
# decode, attention kernels, generation; (3) a jax.profiler trace of the CG step if BUDGET_S is not spent.
# Wheels the host lacks (grain, ml_collections, tensorboardX, diffusers) travel in .whl/.
set -uo pipefail
OUT=${OUT:-.out}; SIZE=${SIZE:-sd15}; BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
LOG="$OUT/bench.jsonl"; : > "$LOG"
START=$(date +%s)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
if [ "$SIZE" = tiny ]; then T="--size tiny"; STEPS=1; REPS=1; LIMIT=900; else T=""; STEPS=10; REPS=10; LIMIT=300; fi

phase() {  # phase NAME SECONDS COMMAND...: JSON lines to $LOG, the rest to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "[$(( t0 - START )) s] $name ..."
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  grep -h '^{' "$OUT/$name.log" | tee -a "$LOG" | cut -c1-200
  echo "[$(( $(date +%s) - START )) s] $name: exit $status after $(( $(date +%s) - t0 )) s"
}

# (1) compile and memory
for stage in cg pg; do
  for batch in 16 32; do
    phase "compile_${stage}_b${batch}" "$LIMIT" python3 tools/bench_train.py $T --stage "$stage" --batch "$batch" --memory-only
  done
done
# (2) timing: bgjax, then the peer
phase train_cg "$LIMIT" python3 tools/bench_train.py $T --stage cg --batch 16 --steps "$STEPS"
phase train_pg "$LIMIT" python3 tools/bench_train.py $T --stage pg --batch 16 --steps "$STEPS"
phase bgjax_blocks "$LIMIT" python3 tools/bench.py $T --no-peer --what train,denoise,vae,attention --reps "$REPS"
phase peer_blocks "$LIMIT" python3 tools/bench.py $T --no-bgjax --what train,denoise,vae --reps "$REPS"
phase generate "$LIMIT" python3 tools/bench_generate.py $T --reps "$REPS"
# (3) a profile while time is left
if [ $(( $(date +%s) - START )) -lt "$BUDGET_S" ]; then
  phase profile "$LIMIT" python3 tools/bench_train.py $T --stage cg --batch 16 --steps 1 --profile "$OUT/profile"
fi
echo "[$(( $(date +%s) - START )) s] done: $(wc -l < "$LOG") JSON lines in $LOG"
