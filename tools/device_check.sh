#!/usr/bin/env bash
# One GPU session: install the carried wheels (diffusers for the peer), then bgjax and the
# diffusers peer one after the other on the same GPU, each in its own process so neither
# allocator starves the other. Logs go to $OUT (or ./.out).
set -uo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 tools/bench.py --no-peer "$@" 2>&1 | tee "$OUT/bgjax.log" \
  || python3 tools/bench.py --no-peer --attention xla "$@" 2>&1 | tee "$OUT/bgjax_xla.log"
python3 tools/bench.py --no-bgjax "$@" 2>&1 | tee "$OUT/peer.log"
grep -h '^|' "$OUT"/*.log
