"""BG60k as a TFDS dataset, prepared and read without TensorFlow from a folder laid out like the release
(tests/test_data_convert.py's fixture), and `bgjax train --config.data.tfds=bg60k/bg60k`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds  # the `tfds` extra, which `.[test]` installs
from safetensors.numpy import load_file

from bgjax.cli import main
from bgjax.data.augment import CropConfig
from bgjax.data.dataset import open_tfds
from bgjax.data.example import decode_example
from bgjax.data.images import decode_mask, decode_rgb
from bgjax.data.pipeline import PipelineConfig, make_dataset
from bgjax.data.records import read_records
from bgjax.data.tfds_bg60k import MANUAL_DOWNLOAD_INSTRUCTIONS, Bg60kConfig
from tests.test_data_convert import _photo, make_bg60k
from tests.test_train import SMALL  # the shapes test_train compiles: the session's compilation cache has them

PREPARE = {"file_format": "array_record"}


def _prepare(name_or_config, root: Path, data_dir: Path):
    kwargs = {"config": name_or_config} if isinstance(name_or_config, Bg60kConfig) else {}
    name = "bg60k" if kwargs else f"bg60k/{name_or_config}"
    builder = tfds.builder(name, data_dir=str(data_dir), **PREPARE, **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    return builder


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The release-layout fixture, `bgjax data bg60k`'s records of it, and its TFDS dataset (bg60k, bg1k)."""
    root = tmp_path_factory.mktemp("release")
    make_bg60k(root)
    records = tmp_path_factory.mktemp("records") / "bg60k"
    assert main(["data", "bg60k", "--root", str(root), "--out", str(records), "--workers", "1"]) == 0
    data_dir = tmp_path_factory.mktemp("tfds")
    assert "tensorflow" not in sys.modules
    _prepare("bg60k", root, data_dir)
    assert main(["data", "tfds", "--root", str(root), "--split", "bg1k", "--data-dir", str(data_dir)]) == 0
    assert "tensorflow" not in sys.modules  # written without TensorFlow
    return root, records, data_dir


def _by_id(source) -> dict[str, dict]:
    return {source[i]["id"].decode(): source[i] for i in range(len(source))}


def test_tfds_accounts_for_every_input_as_bgjax_data_does(release):
    """The same reader and writer: the same records (pixels, masks, categories) and the same rejections with
    their reasons, in the dataset's metadata; read back through tfds.data_source with numpy only."""
    root, records, data_dir = release
    manifest = json.loads((records / "manifest.json").read_text())
    builder = tfds.builder("bg60k/bg60k", data_dir=str(data_dir))
    meta = builder.info.metadata
    assert meta["num_inputs"] == manifest["num_inputs"] == meta["num_written"] + len(meta["rejected"])
    assert meta["num_written"] == manifest["num_written"] == builder.info.splits["train"].num_examples == 9
    assert meta["rejected"] == manifest["rejected"] and meta["unmatched"] == manifest["unmatched"]
    assert any("decompression bomb" in r["reason"] for r in meta["rejected"])
    names = builder.info.features["category"].names
    assert {n: i for i, n in enumerate(names)} == manifest["categories"] == meta["categories"]

    ours = {}
    for shard in manifest["shards"]:
        for r in read_records(records / shard["path"]):
            ex = decode_example(r)
            ours[ex["id"][0].decode()] = ex
    theirs = _by_id(tfds.data_source("bg60k/bg60k", split="train", data_dir=str(data_dir)))
    assert sorted(theirs) == sorted(ours)
    for key, ex in ours.items():
        np.testing.assert_array_equal(theirs[key]["image"], decode_rgb(ex["image"][0]), err_msg=key)
        np.testing.assert_array_equal(theirs[key]["mask"][..., 0], decode_mask(ex["mask"][0]), err_msg=key)
        assert names[theirs[key]["category"]] == ex["category"][0].decode()
    np.testing.assert_array_equal(theirs["0"]["image"], _photo())  # BG60k's 0.png, not BG1K's
    bg1k = _by_id(tfds.data_source("bg60k/bg1k", split="test", data_dir=str(data_dir)))
    assert sorted(bg1k) == ["0", "1"]
    np.testing.assert_array_equal(bg1k["0"]["image"], _photo(seed=20))
    assert "tensorflow" not in sys.modules


def test_pairs_carry_their_reference_and_a_low_match_stops(release, tmp_path, capsys):
    root, _, _ = release
    # The fixture's pair list matches 1 of 3 lines: the default config stops, naming them, and writes nothing.
    builder = tfds.builder("bg60k/bgpair", data_dir=str(tmp_path), **PREPARE)
    with pytest.raises(LookupError, match=r"only 1 of 3 lines of bgpair_info.txt .*Bg60kConfig.min_match"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    assert not builder.is_prepared()
    assert main(["data", "tfds", "--root", str(root), "--split", "bgpair", "--data-dir", str(tmp_path)]) == 2
    assert "only 1 of 3 lines of bgpair_info.txt matched" in capsys.readouterr().err
    config = Bg60kConfig(name="bgpair_any", listing="bgpair", min_match=0.0)
    builder = _prepare(config, root, tmp_path)
    assert builder.info.metadata["num_written"] == 1 and len(builder.info.metadata["rejected"]) == 2
    (pair,) = tfds.data_source("bg60k/bgpair_any", split="test", data_dir=str(tmp_path))
    assert pair["id"] == b"3__161" and pair["ref_id"] == b"161"
    np.testing.assert_array_equal(pair["ref_image"], _photo(seed=2))  # 161.png, from bg60k_imgs_1/
    assert pair["ref_mask"].shape == (24, 32, 1) and pair["ref_mask"].max() == 255


def test_without_the_release_tfds_prints_where_to_get_it(tmp_path):
    builder = tfds.builder("bg60k/bg1k", data_dir=str(tmp_path), **PREPARE)
    with pytest.raises(AssertionError, match="Whileherham/BG60k"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "missing")))
    assert "bg60k_imgs_0/" in MANUAL_DOWNLOAD_INSTRUCTIONS


def test_grain_reads_tfds_with_exact_resume_and_per_process_shards(release):
    """Random access through the TFDS data source: a restored iterator continues exactly, processes read
    disjoint parts of each epoch that together are all of it, and each example's prompt is its category's."""
    _, _, data_dir = release
    data = open_tfds("bg60k/bg60k", str(data_dir))
    assert data.num_records == 9 and data.random_access
    prompts = {"input_ids": np.arange(3, dtype=np.int32)[:, None] * np.ones((3, 4), np.int32)}
    config = PipelineConfig(batch_size=2, seed=3, crop=CropConfig(resolution=16))
    reference = [next(it) for it in [iter(make_dataset(data, config, prompts))] for _ in range(6)]
    it = iter(make_dataset(data, config, prompts))
    for _ in range(2):
        next(it)
    resumed = iter(make_dataset(data, config, prompts))
    resumed.set_state(it.get_state())
    for want in reference[2:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for batch in reference:
        np.testing.assert_array_equal(batch["input_ids"][:, 0], batch["category_id"])

    epoch = PipelineConfig(batch_size=1, seed=1, num_epochs=1, crop=CropConfig(resolution=16, flip_probability=0))
    seen = [[b["example_seed"][0] for b in make_dataset(data, epoch, prompts, process_index=i, process_count=2)]
            for i in range(2)]
    assert sorted(seen[0] + seen[1]) == list(range(9)) and len(seen[0]) == 5


def _losses(workdir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (computed again after a resume) keeps its last value."""
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def test_train_on_tfds_resumes_exactly(release, tmp_path, capsys):
    """`bgjax train --config.data.tfds=bg60k/bg60k`: a run of three steps, its last checkpoint and model
    removed, resumes from step 2 and computes step 3's loss and weights again bit for bit; a dataset not
    prepared there is an error naming it."""
    _, _, data_dir = release
    run = tmp_path / "run"
    args = ["train", "--config", "tiny_synthetic", "--workdir", str(run), "--config.data.tfds=bg60k/bg60k",
            f"--config.data.tfds_data_dir={data_dir}", *SMALL, "--config.num_steps=3", "--config.checkpoint_every=1"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"data: 9 records in tfds bg60k/bg60k in {data_dir}" in err
    method = json.loads((run / "model" / "method.json").read_text())
    assert method["categories"] == ["electric kettle with lid", "lamp", "rice cooker"]
    straight = _losses(run)
    weights = load_file(run / "model" / "cg" / "params.safetensors")
    shutil.rmtree(run / "checkpoints" / "3")
    shutil.rmtree(run / "model")
    assert main(args) == 0
    assert "resumed from step 2" in capsys.readouterr().err
    resumed = _losses(run)
    assert sorted(straight) == sorted(resumed) == [1, 2, 3] and resumed == straight
    again = load_file(run / "model" / "cg" / "params.safetensors")
    assert all(np.array_equal(weights[k], again[k]) for k in weights)

    assert main([*args[:3], "--workdir", str(tmp_path / "other"), "--config.data.tfds=bg60k/bgpair",
                 f"--config.data.tfds_data_dir={data_dir}"]) == 2
    assert f"tfds bg60k/bgpair in {data_dir}" in capsys.readouterr().err
