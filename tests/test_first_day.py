"""A new user's first day, scripted: the wheel built from this checkout installed into a fresh venv,
then, from an empty folder outside the checkout, the commands the README and `--help` show, each
exiting 0 with its outputs where the help says. What it catches: files the docs use that the wheel
lacks (configs, assets), commands that only work from a clone, outputs written elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgjax.train.samples import LABEL, MIN_CELL

ROOT = Path(__file__).parent.parent
SKIP = shutil.ignore_patterns(".git", "__pycache__", "build", "*.egg-info", "runs", ".pytest_cache", ".ruff_cache",
                              "bgjax_demo", ".whl", ".out", "dist")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(the venv's bin folder, an environment that imports bgjax from the wheel only)."""
    tmp = tmp_path_factory.mktemp("first_day")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)  # the build writes build/ and *.egg-info: not into the checkout
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True)
    wheel, = (tmp / "dist").glob("bgjax-*.whl")
    # The system's packages (jax, torch, ...) are visible; bgjax itself comes from the wheel alone.
    venv.create(tmp / "venv", system_site_packages=True, with_pip=True)
    bin_dir = tmp / "venv" / "bin"
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    where = subprocess.run([str(bin_dir / "python"), "-c", "import bgjax; print(bgjax.__file__)"], env=env,
                           cwd=tmp, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(tmp / "venv"), where  # not the checkout, not an editable install
    return bin_dir, env


def _bgjax(installed, cwd: Path, *args: str) -> str:
    bin_dir, env = installed
    proc = subprocess.run([str(bin_dir / "bgjax"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"bgjax {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_first_day_from_the_wheel(installed, tmp_path):
    day = tmp_path / "day"  # an empty folder outside the checkout
    day.mkdir()
    assert "examples:" in _bgjax(installed, day, "--help")
    listed = _bgjax(installed, day, "configs")
    assert {line.split()[0] for line in listed.splitlines()[:9]} == {
        "cg_sd15_512", "cg_sdxl_1024", "pg_sd15_512", "pg_sdxl_1024", "tiny_cg", "tiny_pg", "tiny_synthetic",
        "tiny_unet", "tiny_vae"}

    _bgjax(installed, day, "demo")  # as the README says it, defaults and all
    assert Image.open(day / "bgjax_demo" / "contact_sheet.png").size[0] > 0
    assert len(json.loads((day / "bgjax_demo" / "demo.json").read_text())["results"]) == 9  # 6 categories, 3 references

    # `bgjax train --help`'s quick example, smaller still: 10 steps on 24 synthetic images.
    _bgjax(installed, day, "train", "--config", "tiny_synthetic", "--workdir", "run", "--config.num_steps=10",
           "--config.data.synthetic_num=24", "--config.data.batch_size=8", "--config.log_every=5",
           "--config.checkpoint_every=10", "--config.sample_every=10", "--config.sample_steps=2")
    assert (day / "run" / "model" / "bgjax.json").is_file()
    # The help: sample grids in WORKDIR/samples. CG rows are product | generated under a label; all 6
    # synthetic categories although num_samples is 4; a settings line on top.
    grid = np.asarray(Image.open(day / "run" / "samples" / "step_0000010.png").convert("L"))
    assert grid.shape == (LABEL + 6 * (LABEL + MIN_CELL), 2 * MIN_CELL)
    label_rows = [0] + [LABEL + k * (LABEL + MIN_CELL) for k in range(6)]
    assert all((grid[y:y + LABEL] < 100).any() for y in label_rows)  # text on each label line

    site = Path(subprocess.run([str(installed[0] / "python"), "-c", "import bgjax.demo; print(bgjax.demo.PRODUCTS)"],
                               env=installed[1], capture_output=True, text=True, check=True).stdout.strip())
    _bgjax(installed, day, "generate", "--model", "run/model", "--product", str(site / "rice_cooker.png"),
           "--category", "rice cooker", "--num-images", "2", "--steps", "4", "--out", "ads")
    pngs = sorted((day / "ads").glob("*.png"))
    assert len(pngs) == 2 and all(p.with_suffix(".json").is_file() for p in pngs)

    _bgjax(installed, day, "export", "run/model", "--out", "exported")
    assert json.loads((day / "exported" / "model_index.json").read_text())["_class_name"]
    assert sorted(p.name for p in day.iterdir()) == ["ads", "bgjax_demo", "exported", "run"]  # nothing elsewhere
