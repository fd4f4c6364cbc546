"""The trainer: exact resume after SIGTERM and SIGKILL, multi-process equivalence, NaN handling,
config overrides (meshes and restores onto another mesh: test_train_meshes.py). Tiny models at 32 px on the CPU."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from bgjax.cli import main
from bgjax.models.configs import ConfigError
from bgjax.train.config_file import load_config
from tests.cpu_env import cpu_env

CONFIG = "tiny_synthetic"  # a bundled config, by name
SMALL = ["--config.data.crop.resolution=32", "--config.data.batch_size=8", "--config.log_every=1",
         "--config.optim.warmup_steps=0", "--config.dtype='float32'"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synthetic"
    assert main(["data", "synthetic", "--out", str(out), "--num", "48", "--size", "48", "--workers", "1"]) == 0
    return out


def _train_args(workdir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bgjax.cli", "train", "--config", str(CONFIG), "--workdir", str(workdir),
            f"--config.data.dir={data_dir}", *SMALL, *extra]


def _losses(workdir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (re-run after a resume) keeps its last value."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _wait_for_step(workdir: Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 900  # building and compiling takes minutes on a loaded 2-core machine
    while time.time() < deadline and proc.poll() is None:
        path = workdir / "metrics.jsonl"
        if path.is_file() and any(json.loads(x)["step"] >= step for x in path.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step}: {proc.communicate()}")


def test_ctrl_c_and_kill_resume_exactly(tmp_path, data_dir):
    """Uninterrupted vs Ctrl-C (SIGINT) at ~step 3, SIGKILL at ~step 7, then a finishing run: the
    losses of every step are bit-identical, Ctrl-C exits cleanly after saving, and the runs show
    their phases on stderr. (SIGTERM takes the same path: tests/test_train_stop.py.)"""
    steps = ["--config.num_steps=10", "--config.checkpoint_every=2"]
    reference = tmp_path / "reference"
    subprocess.run(_train_args(reference, data_dir, *steps), env=cpu_env(), check=True, capture_output=True)

    run = tmp_path / "interrupted"
    proc = subprocess.Popen(_train_args(run, data_dir, *steps), env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, proc, 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "stopped (interrupted)" in out
    for phase in ("data: 48 records in", "building the cg stage's models", "train step compiled in",
                  "Ctrl-C: saving at the next step", "saving checkpoint 2 "):
        assert f"bgjax train: {phase}" in err, (phase, err[-2000:])
    stopped_at = max(_losses(run))
    assert (run / "checkpoints" / str(stopped_at)).is_dir()  # saved at the step it stopped, off the schedule

    proc = subprocess.Popen(_train_args(run, data_dir, *steps), env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _wait_for_step(run, proc, 7)
    proc.kill()
    proc.communicate()
    last = subprocess.run(_train_args(run, data_dir, *steps), env=cpu_env(), check=True, capture_output=True, text=True)
    assert "bgjax train: resumed from step " in last.stderr

    expected, got = _losses(reference), _losses(run)
    assert sorted(got) == list(range(1, 11))
    assert got == expected  # bit for bit
    ref, res = (load_file(d / "model" / "cg" / "params.safetensors") for d in (reference, run))
    assert all(np.array_equal(ref[k], res[k]) for k in ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, data_dir):
    """jax.distributed on localhost, CPU collectives: each process reads its half of every batch;
    the losses and the trained CG match a single process (relative 1e-5)."""
    steps = ["--config.num_steps=4", "--config.checkpoint_every=2"]
    single = tmp_path / "single"
    subprocess.run(_train_args(single, data_dir, *steps), env=cpu_env(2), check=True, capture_output=True)
    multi, port = tmp_path / "multi", _free_port()
    procs = [subprocess.Popen(_train_args(multi, data_dir, *steps, "--coordinator", f"localhost:{port}",
                                          "--num-processes", "2", "--process-id", str(i)),
                              env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a, b = _losses(single), _losses(multi)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    ref, got = (load_file(d / "model" / "cg" / "params.safetensors") for d in (single, multi))
    # Per tensor within 1e-5 of its norm, per element within 1e-5 (1 % of one step's Adam update at lr 1e-3):
    # the two programs reduce in another order, and Adam's normalisation can turn a last-bit gradient difference
    # into 1.2e-6 on one element (seen on one CPU), while a process that trained on other data moves them all.
    for k in ref:
        assert np.linalg.norm(got[k] - ref[k]) <= 1e-5 * np.linalg.norm(ref[k]), k
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-5, err_msg=k)


def test_non_finite_loss_stops_naming_the_step(tmp_path, data_dir, capsys):
    args = ["train", "--config", str(CONFIG), "--workdir", str(tmp_path / "run"), f"--config.data.dir={data_dir}",
            *SMALL, "--config.num_steps=3", "--config.checkpoint_every=1", "--config.loss.noise_offset=nan"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "step 0: the loss or gradient is not finite" in err
    assert not any((tmp_path / "run" / "checkpoints").glob("[0-9]*"))  # nothing saved


def test_config_overrides_are_checked(tmp_path):
    config = load_config(CONFIG, ["--config.optim.learning_rate=3e-4", "--config.mesh.rules=[['embed', None]]",
                                  "--config.model=models/sd15"])
    assert config.optim.learning_rate == 3e-4 and config.model == "models/sd15"
    assert config.mesh.rules == (("embed", None),)
    with pytest.raises(ConfigError, match="optim.nope"):
        load_config(CONFIG, ["--config.optim.nope=1"])
    with pytest.raises(ConfigError, match="num_steps"):
        load_config(CONFIG, ["--config.num_steps='many'"])


def test_loss_falls_training_a_unet_from_scratch(tmp_path, data_dir):
    """The unet stage on synthetic data: a random UNet predicts noise with MSE ~1; 40 AdamW steps
    take the loss well below that."""
    args = ["train", "--config", str(CONFIG), "--workdir", str(tmp_path / "run"), f"--config.data.dir={data_dir}",
            "--config.stage='unet'", *SMALL, "--config.num_steps=40", "--config.checkpoint_every=40",
            "--config.optim.warmup_steps=5"]
    assert main(args) == 0
    losses = _losses(tmp_path / "run")
    first, last = losses[1], np.mean([losses[s] for s in range(36, 41)])
    assert first > 0.8 and last < 0.5 * first, (first, last)
