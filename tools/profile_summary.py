"""Where a compiled step's time goes: the top ops of a `jax.profiler` trace, with a floor for each.

    python tools/profile_summary.py TRACE_DIR --steps 3 [--hlo step.hlo.txt] [--top 25]

Reads the Perfetto trace that `jax.profiler.start_trace(..., create_perfetto_trace=True)` wrote under
TRACE_DIR, sums the device's op durations (GPU or TPU kernels; on a CPU, the XLA runtime's thunks) by
XLA op (`hlo_op` where the trace names one, else the kernel), and divides by the number of steps traced.
With `--hlo` (the compiled module's text, `compiled.as_text()`), each top op also gets the bytes its
operands and result occupy and, for convolutions and dots, its FLOPs: the time it could not beat at the
measured H200 ceilings (4.3 TB/s, 793 TFLOP/s bf16; `--bandwidth`, `--peak`).

Prints a table and one JSON line (`what`: "profile_top_ops").
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import re
import sys
from pathlib import Path

import jax

CATEGORIES = (  # first match wins; op and kernel names, lower case ("convert" is not a convolution)
    ("attention", r"fmha|flash|attention|attn|splash|sdpa|dot_do_o|convert_dq"),
    ("convolution", r"cudnn-conv|convolution|conv_general|implicit_gemm|xmma_fprop|xmma_dgrad|xmma_wgrad|nhwc"),
    ("matmul", r"gemm|cublas|matmul|dot|nvjet|sm90_xmma"),
    ("reduction", r"reduc|norm"),
    ("copy", r"memcpy|memset|copy|transpose"),
    ("elementwise", r"fusion|loop|elementwise|convert|add|multiply|concatenate"),
)
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, low)), "other")


def find_trace(path: Path) -> Path:
    if path.is_file():
        return path
    traces = sorted(path.rglob("perfetto_trace.json.gz")) or sorted(path.rglob("*.trace.json.gz"))
    if not traces:
        raise SystemExit(f"{path}: no perfetto_trace.json.gz below it (was the trace written with "
                         "create_perfetto_trace=True?)")
    return traces[-1]


def device_events(trace: dict) -> tuple[list[dict], str]:
    """The op events of the accelerator, or of the XLA CPU runtime's threads when there is none."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e["name"] == "thread_name"}
    devices = {pid for pid, name in processes.items() if "/device:" in name and "CPU" not in name}
    if devices:
        ops = [e for e in events if e.get("ph") == "X" and e["pid"] in devices]
        # GPU kernels run on "Stream #N" threads, TPU ops on "XLA Ops"; other device rows (modules, steps)
        # span those and would count twice.
        op_rows = [e for e in ops if re.search(r"Stream|XLA Ops", threads.get((e["pid"], e["tid"]), ""))]
        return op_rows or ops, ", ".join(sorted(processes[p] for p in devices))
    ops = [e for e in events if e.get("ph") == "X" and threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
           and not e["name"].startswith(("ThreadpoolListener", "end:"))]
    return ops, "host CPU (XLA runtime threads)"


def hlo_instructions(text: str) -> dict[str, dict]:
    """name -> {bytes, flops} for every instruction of the optimized module's text: bytes of its result and
    operands, FLOPs of the convolutions and dots in it or in the computations it calls (a fusion)."""
    parsed, computation, members = {}, None, collections.defaultdict(list)
    for line in text.splitlines():
        header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$", line)
        if header and "=" not in line.split("(")[0]:
            computation = header.group(1)
            continue
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, result, opcode, rest = m.groups()
        args = rest.split("), ")[0]
        parsed[name] = {"result": result, "opcode": opcode, "operands": re.findall(r"%([\w.\-]+)", args),
                        "line": line, "calls": re.findall(r"calls=%?([\w.\-]+)", line)}
        members[computation].append(name)

    def dims(name: str) -> list[int]:
        return _dims(parsed[name]["result"]) if name in parsed else []

    def own_flops(info: dict) -> float:
        line, ops = info["line"], info["operands"]
        out = _dims(info["result"])
        if "dim_labels=" in line and len(ops) >= 2 and out:  # a convolution, forward or backward (cuDNN's too)
            # 2 x (kernel elements) x (batch x spatial positions of the forward output), whichever of the three
            # tensors the call computes: the kernel is the smallest, activations are NHWC (b01f).
            tensors = sorted([out, dims(ops[0]), dims(ops[1])], key=math.prod)
            return 2.0 * math.prod(tensors[0]) * min(math.prod(t[:-1]) for t in tensors[1:])
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        if contracting and ops and out:
            lhs = dims(ops[0])
            return 2.0 * math.prod(out) * math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
        return 0.0

    def flops(name: str, seen: frozenset = frozenset()) -> float:
        info = parsed[name]
        total = own_flops(info)
        for called in info["calls"]:
            if called not in seen:
                total += sum(flops(n, seen | {called}) for n in members.get(called, ()))
        return total

    out = {}
    for name, info in parsed.items():
        nbytes = _shape_bytes(info["result"]) + sum(_shape_bytes(parsed[o]["result"]) for o in info["operands"]
                                                    if o in parsed)
        out[name] = {"bytes": nbytes, "flops": flops(name) or None, "opcode": info["opcode"]}
    return out


def _shape_bytes(text: str) -> int:
    return sum(DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in SHAPE.findall(text))


def _dims(text: str) -> list[int]:
    m = SHAPE.search(text)
    return [int(x) for x in m.group(2).split(",") if x] if m else []


def summarize(trace_path: Path, steps: int, hlo: dict[str, dict] | None, top: int, bandwidth: float,
              peak: float) -> dict:
    with gzip.open(trace_path) as f:
        trace = json.load(f)
    ops, where = device_events(trace)
    by_op = collections.defaultdict(lambda: {"us": 0.0, "kernels": collections.Counter(), "kernel": ""})
    for e in ops:
        args = e.get("args") or {}
        key = args.get("hlo_op") or e["name"]
        if key.startswith("command_buffer"):  # a CUDA graph of many fusions: each kernel is one of them
            key = re.sub(r"_(\d+)$", r".\1", e["name"])
        entry = by_op[key]
        entry["us"] += float(e.get("dur", 0.0))
        entry["kernels"][e["name"]] += 1  # an op may launch several kernels (a memset, then the conv)
        entry["kernel"] = entry["kernel"] if entry["kernel"] and "Memset" not in entry["kernel"] else e["name"]
    total_us = sum(v["us"] for v in by_op.values())
    cats, floors = collections.Counter(), collections.Counter()
    for op, v in by_op.items():
        cat = category(f"{op} {v['kernel']}")
        cats[cat] += v["us"]
        floors[cat] += _floor_s(hlo, op, max(v["kernels"].values()) / steps, bandwidth, peak) * 1e3
    rows = []
    for op, v in sorted(by_op.items(), key=lambda kv: -kv[1]["us"])[:top]:
        row = {"op": op, "kernel": v["kernel"][:80], "category": category(f"{op} {v['kernel']}"),
               "ms_per_step": v["us"] / steps / 1e3, "share": v["us"] / total_us if total_us else 0.0,
               "calls_per_step": max(v["kernels"].values()) / steps}
        info = (hlo or {}).get(op)
        if info:
            row["mbytes"] = info["bytes"] / 1e6
            if info["flops"]:
                row["gflop"] = info["flops"] / 1e9
            row["floor_ms"] = _floor_s(hlo, op, row["calls_per_step"], bandwidth, peak) * 1e3
        rows.append(row)
    arg_keys = sorted({k for e in ops[:200] for k in (e.get("args") or {})})
    return {"what": "profile_top_ops", "trace": str(trace_path), "device": where, "steps": steps,
            "event_arg_keys": arg_keys,
            "total_ms_per_step": total_us / steps / 1e3,
            "by_category_ms_per_step": {k: v / steps / 1e3 for k, v in cats.most_common()},
            # the floors of the ops found in the module's text (cuBLAS kernels inside CUDA graphs are not)
            "floor_ms_per_step_by_category": {k: floors[k] for k, _ in cats.most_common()}, "top": rows}


def _floor_s(hlo: dict | None, op: str, calls: float, bandwidth: float, peak: float) -> float:
    """Seconds per step the op cannot beat: its bytes at `bandwidth` or its FLOPs at `peak`; 0 if unknown."""
    info = (hlo or {}).get(op)
    if not info:
        return 0.0
    return max(info["bytes"] / bandwidth, (info["flops"] or 0.0) / peak) * calls


def table(summary: dict) -> str:
    lines = [f"{summary['device']}: {summary['total_ms_per_step']:.2f} ms of device ops per step",
             "  " + ", ".join(f"{k} {v:.2f} ms (floor {summary['floor_ms_per_step_by_category'][k]:.2f})"
                              for k, v in summary["by_category_ms_per_step"].items()),
             f"{'ms/step':>8} {'share':>6} {'floor':>7}  {'category':<12} op / kernel"]
    for r in summary["top"]:
        floor = f"{r['floor_ms']:.3f}" if "floor_ms" in r else "-"
        lines.append(f"{r['ms_per_step']:8.3f} {r['share']:6.1%} {floor:>7}  {r['category']:<12} "
                     f"{r['op'][:40]}  {r['kernel'][:50]}")
    return "\n".join(lines)


def profile(trace_dir: str, compiled, run_step, steps: int) -> dict:
    """Trace `steps` calls of `run_step` (which runs `compiled` and returns an array), print the top ops with
    their floors (the module's text is kept beside the trace) and their JSON line; returns the summary."""
    hlo_path = Path(trace_dir) / "step.hlo.txt"
    hlo_path.parent.mkdir(parents=True, exist_ok=True)
    hlo_path.write_text(compiled.as_text())
    jax.block_until_ready(run_step())  # nothing left over from before the trace
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
        out = run_step()
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    summary = summarize(find_trace(Path(trace_dir)), steps, hlo_instructions(hlo_path.read_text()), top=30,
                        bandwidth=4.3e12, peak=793e12)
    print(table(summary), file=sys.stderr, flush=True)
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path, help="the trace directory (or the .json.gz)")
    p.add_argument("--steps", type=int, default=1, help="steps the trace covers")
    p.add_argument("--hlo", type=Path, help="the compiled module's text, for floors")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s")
    p.add_argument("--peak", type=float, default=793e12, help="FLOP/s")
    args = p.parse_args()
    hlo = hlo_instructions(args.hlo.read_text()) if args.hlo else None
    summary = summarize(find_trace(args.trace), args.steps, hlo, args.top, args.bandwidth, args.peak)
    print(table(summary))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
