"""`bgjax train` keeps its compiled programs in the persistent compilation cache: a second run with the
same shapes (a fresh workdir, so nothing else is reused) compiles nothing new; --no-compile-cache turns
it off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bgjax.cli import build_parser, compile_cache_dir, main

CONFIG = Path(__file__).parent.parent / "bgjax" / "configs" / "tiny_synthetic.py"


def _train(workdir: Path, data: Path, cache: Path, *extra: str) -> None:
    args = [sys.executable, "-m", "bgjax.cli", "train", "--config", str(CONFIG), "--workdir", str(workdir),
            f"--config.data.dir={data}", "--config.data.crop.resolution=32", "--config.data.batch_size=4",
            "--config.num_steps=2", "--config.log_every=1", "--config.checkpoint_every=2", *extra]
    # Every program cached, however fast it compiled: with JAX's default (a second or more), a program that
    # compiles in 0.9 s on the first run and 1.1 s on the second (a loaded machine) would be a new entry.
    env = {**os.environ, "BGJAX_COMPILE_CACHE": str(cache), "JAX_PLATFORMS": "cpu",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _entries(cache: Path) -> set[str]:
    return {p.name for p in cache.rglob("*") if p.is_file()} if cache.is_dir() else set()


def test_a_second_train_run_compiles_nothing_new(tmp_path):
    data = tmp_path / "data"
    assert main(["data", "synthetic", "--out", str(data), "--num", "8", "--size", "32", "--workers", "1"]) == 0
    cache = tmp_path / "cache"
    _train(tmp_path / "first", data, cache)
    first = _entries(cache)
    assert first  # the train step (and the init, the sampler...) were written
    _train(tmp_path / "second", data, cache)
    assert _entries(cache) == first  # every program came from the cache


def test_the_cache_directory_and_the_switch(monkeypatch, tmp_path):
    parser = build_parser()
    monkeypatch.setenv("BGJAX_COMPILE_CACHE", str(tmp_path / "env"))
    commands = (["train", "--config", "c.py", "--workdir", "w"], ["demo"],
                ["generate", "--product", "p", "--model", "m", "--out", "o"])
    for command in commands:
        assert compile_cache_dir(parser.parse_args(command)) == tmp_path / "env"
        chosen = parser.parse_args([*command, "--compile-cache", str(tmp_path / "x")])
        assert compile_cache_dir(chosen) == tmp_path / "x"
        assert compile_cache_dir(parser.parse_args([*command, "--no-compile-cache"])) is None
    monkeypatch.setenv("BGJAX_COMPILE_CACHE", "")
    assert compile_cache_dir(parser.parse_args(["demo"])) is None
    monkeypatch.delenv("BGJAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir(parser.parse_args(["demo"])) == tmp_path / "xdg" / "bgjax" / "jax"
