"""tools/device_check.sh, the one script an accelerator session runs, runs end to end at tiny shapes on the
CPU: every phase exits 0 and writes the JSON lines the closing notes quote (issue 14's fields), the profiles'
top ops carry floors, and the budget skips phases instead of overrunning."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TIMING = ("side", "what", "batch", "img_per_s", "s_per_step", "compile_s", "device")


def run(tmp_path: Path, phases: str, budget: int = 3000) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {**os.environ, "SIZE": "tiny", "OUT": str(tmp_path), "PHASES": phases, "BUDGET_S": str(budget)}
    done = subprocess.run(["bash", "tools/device_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3000)
    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    return done, rows


@pytest.mark.slow
def test_every_phase_runs_at_tiny_size(tmp_path):
    done, rows = run(tmp_path, "setup blocks denoise train_cg cg_cached train_cg_b32 train_pg peer generate vae "
                               "sdxl_train_cg sdxl_denoise sdxl_peer")
    assert done.returncode == 0, done.stdout + done.stderr
    exits = [line for line in done.stdout.splitlines() if ": exit " in line]
    assert len(exits) == 13 and all(": exit 0 " in line for line in exits), done.stdout
    by_what = {}
    for row in rows:
        by_what.setdefault(row["what"], []).append(row)
    for what in ("train_cg_step", "train_pg_step", "train_cg_step_sdxl"):
        timed = [r for r in by_what[what] if "img_per_s" in r]
        assert timed and all(set(TIMING) <= set(r) for r in timed), by_what[what]
        assert all(r["img_per_s"] > 0 and r["flops"] > 0 and r["total_gib"] > 0 for r in timed)
    assert {r["batch"] for r in by_what["train_cg_step"]} == {2, 4}
    cached = [r for r in by_what["train_cg_step"] if "img_per_s" not in r and r["batch"] == 2]
    assert cached, "cg_cached wrote no compile line"
    assert {r["side"] for r in by_what["denoise_step_cfg"]} == {"bgjax", "peer"}
    assert {r.get("branch") for r in by_what["denoise_step_cfg"] if r["side"] == "bgjax"} == {"controlnet", "cg"}
    assert {r["side"] for r in by_what["train_controlnet_step"]} == {"peer"}
    # SDXL base (issue 15): both sides' denoise step, the peer's ControlNet step, the trainer's CG step.
    assert {(r["side"], r.get("branch")) for r in by_what["denoise_step_cfg_sdxl"]} == {
        ("bgjax", "controlnet"), ("bgjax", "cg"), ("peer", None)}
    assert [r["side"] for r in by_what["train_controlnet_step_sdxl"]] == ["peer"]
    assert all(r["remat"] for r in by_what["train_cg_step_sdxl"])
    assert by_what["generate_cg"][0]["img_per_s"] > 0
    profiles = by_what["profile_top_ops"]
    assert len(profiles) == 2 and all(p["top"] and p["total_ms_per_step"] > 0 for p in profiles)
    assert any("floor_ms" in op for p in profiles for op in p["top"])  # the module's text was matched
    assert {r["impl"] for r in by_what["groupnorm_silu"]} == {"flax", "by_channel"}
    assert all(r["rel_err_out"] < 1e-2 for r in by_what["groupnorm_silu"] + by_what["mask_guided_attention"])
    assert (tmp_path / "phases.log").is_file() and (tmp_path / "trace_cg.json.gz").is_file()


def test_a_spent_budget_skips_phases(tmp_path):
    done, rows = run(tmp_path, "blocks train_cg", budget=10)
    assert done.returncode == 0
    assert "blocks: skipped, budget spent" in done.stdout and "train_cg: skipped, budget spent" in done.stdout
    assert rows == []
