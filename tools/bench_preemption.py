"""What the trainer's per-step preemption check costs with several processes: the old check (a
`process_allgather` of each process's SIGTERM flag, a blocking round trip every step) against
jax's preemption sync point, which `bgjax.train.loop.Preemption` uses (orbax's `reached_preemption`).
Then a SIGTERM to the last process only: every process must reach the sync point at the same step.

    P=12355; for i in 0 1; do JAX_PLATFORMS=cpu python tools/bench_preemption.py --port $P --process-id $i & done; wait
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    jax.distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id)
    checks = {
        "process_allgather (before)": lambda step: bool(np.any(multihost_utils.process_allgather(np.asarray(False)))),
        "reached_preemption_sync_point (after)": multihost_utils.reached_preemption_sync_point,
    }
    step = 0
    for name, check in checks.items():
        for _ in range(20):  # warm-up (the allgather compiles once)
            check(step)
            step += 1
        multihost_utils.sync_global_devices(name)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            check(step)
            step += 1
        per_step = (time.perf_counter() - t0) / args.steps
        print(f"process {args.process_id}: {name}: {per_step * 1e6:.2f} us per step", flush=True)
        multihost_utils.sync_global_devices(name + " done")
    if args.process_id == args.num_processes - 1:
        os.kill(os.getpid(), signal.SIGTERM)  # jax's service caught it; the process lives on
    t0 = time.perf_counter()
    while not multihost_utils.reached_preemption_sync_point(step):
        step += 1
        time.sleep(0.001)
    print(f"process {args.process_id}: preemption sync point at step {step}, "
          f"{time.perf_counter() - t0:.2f} s after the SIGTERM", flush=True)


if __name__ == "__main__":
    main()
