"""How a run stops: at the first non-finite step with the last good state, on Ctrl-C (twice: at
once), and on SIGTERM to one of two processes (both save at the same step)."""

from __future__ import annotations

import os
import signal
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bgjax.train import TrainingDiverged
from bgjax.train.checkpoint import Checkpoints, abstract
from bgjax.train.config_file import load_config
from bgjax.train.loop import Preemption, train
from tests.cpu_env import cpu_env
from tests.test_train import CONFIG, SMALL, _free_port, _train_args, _wait_for_step, data_dir  # noqa: F401


def _config(data_dir, *extra):  # noqa: F811
    return load_config(CONFIG, [f"--config.data.dir={data_dir}", *SMALL, *extra])


def test_non_finite_step_stops_there_with_the_last_good_state(tmp_path, data_dir):  # noqa: F811
    """A learning rate of 1e30 after a warm-up step of lr 0 blows the params up, so a later step is
    non-finite. Logging and saving only every 100 steps, the run still stops at that step, and the
    state it holds (params, AdamW state, EMA, step) equals, bit for bit, the final state of a run
    told to stop just before it."""
    diverging = ["--config.optim.learning_rate=1e30", "--config.optim.warmup_steps=4", "--config.optim.grad_clip=0.0",
                 "--config.optim.ema_decay=0.999", "--config.log_every=100", "--config.checkpoint_every=100"]
    with pytest.raises(TrainingDiverged) as caught:
        train(_config(data_dir, *diverging, "--config.num_steps=20"), tmp_path / "diverged")
    bad = caught.value.step
    assert bad >= 2, bad  # good steps came first
    assert f"step {bad}: the loss or gradient is not finite" in str(caught.value)
    assert not (tmp_path / "diverged" / "checkpoints" / str(bad)).exists()
    got = jax.device_get(caught.value.state)

    train(_config(data_dir, *diverging, f"--config.num_steps={bad}"), tmp_path / "reference")
    target = abstract(caught.value.state, jax.tree.map(lambda x: x.sharding, caught.value.state))
    with ocp.CheckpointManager(tmp_path / "reference" / "checkpoints", item_names=("state",)) as manager:
        expected = jax.device_get(manager.restore(bad, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state)
    assert int(got.step) == int(expected.step) == bad
    assert int(got.nan_step) == bad and int(expected.nan_step) == -1
    for part in ("params", "opt_state", "ema", "rng"):
        a, b = jax.tree.leaves(getattr(got, part)), jax.tree.leaves(getattr(expected, part))
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), part
        assert all(np.isfinite(x).all() for x in a), part


def test_ctrl_c_and_sigterm_stop_at_the_next_step_and_ctrl_c_twice_aborts(tmp_path):
    checkpoints = Checkpoints(tmp_path / "ckpt", keep=1)
    preemption = Preemption(checkpoints)
    try:
        assert not preemption(1)
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next bytecode
        assert preemption(2) and preemption.reason == "interrupted"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # give the interpreter a bytecode boundary
                pass
    finally:
        preemption.close()
        checkpoints.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    preemption = Preemption(checkpoints)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption(1) and preemption.reason == "preempted"
    finally:
        preemption.close()


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, data_dir):  # noqa: F811
    """jax's preemption service carries a SIGTERM sent to process 1 to process 0; both save the
    same step and exit 0, with no collective per step."""
    run, port = tmp_path / "run", _free_port()
    procs = [subprocess.Popen(_train_args(run, data_dir, "--config.num_steps=200", "--config.checkpoint_every=200",
                                          "--coordinator", f"localhost:{port}", "--num-processes", "2",
                                          "--process-id", str(i)),
                              env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    _wait_for_step(run, procs[0], 2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "stopped (preempted)" in out, out
    steps = {int(out.split(" at step ")[1].split(";")[0]) for out, _ in outs}
    assert len(steps) == 1, steps
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()] == [str(steps.pop())]
