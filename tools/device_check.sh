#!/usr/bin/env bash
# One GPU session: install the carried wheels (.whl/: grain, ml_collections, tensorboardX, diffusers for
# the peer), then each benchmark in its own process so no allocator starves another. Logs go to $OUT.
#   tools/device_check.sh            the trainer's CG step (bgjax) and the peer's ControlNet step
#   tools/device_check.sh all        also denoise / VAE / attention (tools/bench.py) and generation
set -uo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 tools/bench_train.py --batch 16 --steps 10 2>&1 | tee "$OUT/train_bgjax.log"
python3 tools/bench.py --no-bgjax --what train 2>&1 | tee "$OUT/train_peer.log"
if [ "${1:-}" = all ]; then
  python3 tools/bench.py --no-peer 2>&1 | tee "$OUT/bgjax.log"
  python3 tools/bench.py --no-bgjax 2>&1 | tee "$OUT/peer.log"
  python3 tools/bench_generate.py 2>&1 | tee "$OUT/generate.log"
fi
grep -h '^{' "$OUT"/train_*.log
