"""The command line a newcomer meets: bundled configs by name, override errors, --help, inputs checked
before anything loads, output folders, file modes, labelled grids."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgjax.cli import build_parser, main
from bgjax.demo import MODEL, PRODUCTS
from bgjax.fileio import atomic_write, write_json
from bgjax.models.configs import ConfigError
from bgjax.train.config_file import BUNDLED, bundled_configs, load_config


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "bgjax") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix} {name}"] = sub
                found.update(_subparsers(sub, f"{prefix} {name}"))
    return found


def _examples(parser: argparse.ArgumentParser) -> list[list[str]]:
    lines = (parser.epilog or "").splitlines()
    return [shlex.split(line)[1:] for line in lines[1:]]


# configs -------------------------------------------------------------------------------------------------

def test_configs_load_by_name_or_path_and_are_listed(tmp_path, capsys):
    """Catches: configs only in a clone's configs/ folder; a listing that runs or misses a file."""
    assert BUNDLED.parent.name == "bgjax" and (BUNDLED / "tiny_synthetic.py").is_file()
    assert load_config("tiny_synthetic").stage == "cg" and load_config("tiny_synthetic.py").stage == "cg"
    mine = tmp_path / "mine.py"
    mine.write_text((BUNDLED / "tiny_synthetic.py").read_text().replace('c.stage = "cg"', 'c.stage = "unet"'))
    assert load_config(mine).stage == "unet"  # a path wins over a bundled name
    with pytest.raises(FileNotFoundError, match="did you mean tiny_synthetic"):
        load_config("tiny_synthetc")
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for name in ("cg_sd15_512", "pg_sd15_512", "cg_sdxl_1024", "pg_sdxl_1024", "tiny_cg", "tiny_pg",
                 "tiny_synthetic", "tiny_unet", "tiny_vae"):
        assert f"{name} " in out
    assert "CG (stage 1) of a small model on synthetic data" in out
    assert set(bundled_configs()) == {p.stem for p in BUNDLED.glob("[!_]*.py")}


def test_override_errors_name_field_type_value_and_close_names():
    """Catches: ml_collections' wording passed through, no typo suggestion, True accepted as an int,
    a numeric-looking string refused for a string field."""
    with pytest.raises(ConfigError) as e:
        load_config("tiny_synthetic", ["--config.num_steps=ten"])
    assert str(e.value) == "--config.num_steps=ten: num_steps must be an integer, got 'ten' (its default is 200)"
    with pytest.raises(ConfigError, match=r"no field 'optim.learnig_rate'; did you mean optim.learning_rate\?"):
        load_config("tiny_synthetic", ["--config.optim.learnig_rate=1e-4"])
    with pytest.raises(ConfigError, match="did you mean num_steps"):
        load_config("tiny_synthetic", ["--config.num_step=3"])
    with pytest.raises(ConfigError, match="must be an integer, got 'True'"):
        load_config("tiny_synthetic", ["--config.num_steps=True"])
    with pytest.raises(ConfigError, match="must be a number, got 'fast'"):
        load_config("tiny_synthetic", ["--config.optim.learning_rate=fast"])
    assert load_config("tiny_synthetic", ["--config.model=2024"]).model == "2024"
    with pytest.raises(ConfigError) as e:
        load_config("tiny_synthetic", ["--config.num_steps=ten"])
    assert "original type" not in str(e.value) and "Could not override" not in str(e.value)


# --help --------------------------------------------------------------------------------------------------

def test_every_command_has_a_description_examples_and_option_help():
    """Catches: options without help, no examples, examples that use options that do not exist."""
    parsers = _subparsers(build_parser())
    assert len(parsers) == 15
    for name, p in parsers.items():
        assert p.description and len(p.description) > 60, name
        assert (p.epilog or "").startswith("examples:") and len(_examples(p)) >= 2, name
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        for example in _examples(p):
            build_parser().parse_known_args(example)  # exits (SystemExit) on an unknown option


def test_help_shows_defaults_and_the_bundled_model(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sampler steps (default: 25)" in text and "(default: dpmpp_2m)" in text
    assert f"the default is the bundled one) (default: {MODEL})" in text
    args = build_parser().parse_args(["generate", "--product", "p.png", "--category", "lamp", "--out", "o"])
    assert Path(args.model) == MODEL


def test_help_examples_work_as_printed(tmp_path, monkeypatch, capsys):
    """The examples that need nothing but bgjax: run as printed, from an empty folder."""
    monkeypatch.chdir(tmp_path)
    parsers = _subparsers(build_parser())
    runnable = [parsers["bgjax configs"], parsers["bgjax data synthetic"], parsers["bgjax data inspect"]]
    examples = [e for p in runnable for e in _examples(p) if "train" not in e and "2000" not in e and "32" not in e]
    examples.append(_examples(parsers["bgjax export"])[0])
    assert [e[0] for e in examples] == ["configs", "data", "data", "export"]
    for example in examples:
        assert main(example + (["--workers", "1"] if example[:2] == ["data", "synthetic"] else [])) == 0, example
    assert (tmp_path / "data" / "synthetic" / "inspect.png").is_file()
    assert (tmp_path / "tiny_diffusers" / "model_index.json").is_file()


# inputs checked before loading ----------------------------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    from bgjax.sampling.pipeline import BackgroundPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(BackgroundPipeline, "from_pretrained", refuse)


def test_generate_checks_files_and_model_before_loading(tmp_path, capsys, no_loading):
    """Catches: a missing file found only after the model loaded, its path not named, an empty output
    folder left behind, a non-model folder reported as a missing unet/config.json."""
    out = tmp_path / "out"
    missing = tmp_path / "nothing.png"
    assert main(["generate", "--product", str(missing), "--category", "lamp", "--out", str(out)]) == 2
    assert f"product: {missing}: file not found" in capsys.readouterr().err
    assert main(["generate", "--product", str(PRODUCTS / "lamp.png"), "--category", "lamp", "--reference",
                 str(PRODUCTS / "reference_dark.png"), "--reference-mask", str(tmp_path / "no_mask.png"),
                 "--out", str(out)]) == 2
    assert f"reference_mask: {tmp_path / 'no_mask.png'}: file not found" in capsys.readouterr().err
    (tmp_path / "not_a_model").mkdir()
    assert main(["generate", "--model", str(tmp_path / "not_a_model"), "--product", str(PRODUCTS / "lamp.png"),
                 "--category", "lamp", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not_a_model: not a bgjax model (no bgjax.json)" in err and "unet/config.json" not in err
    (tmp_path / "m.csv").write_text("product,categry\nlamp.png,lamp\n")
    assert main(["generate", "--manifest", str(tmp_path / "m.csv"), "--out", str(out)]) == 2
    assert "unknown column 'categry'; did you mean category?" in capsys.readouterr().err
    assert not out.exists()


def test_failed_export_and_convert_leave_nothing(tmp_path, capsys):
    """Catches: an output folder (or a half-written model) left behind by a command that failed."""
    (tmp_path / "folder").mkdir()
    assert main(["export", str(tmp_path / "folder"), "--out", str(tmp_path / "exported")]) == 2
    assert "not a bgjax model directory" in capsys.readouterr().err and not (tmp_path / "exported").exists()
    (tmp_path / "src" / "unet").mkdir(parents=True)
    assert main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "model")]) == 2
    assert "missing vae/, text_encoder/" in capsys.readouterr().err and not (tmp_path / "model").exists()
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "empty")]) == 2
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


# one table vocabulary -------------------------------------------------------------------------------------

def _cutout(size: int = 24) -> Image.Image:
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[6:18, 6:18, 3] = 255
    return Image.fromarray(rgba, "RGBA")


def test_tables_share_columns_case_and_report_unknown_fields(tmp_path, capsys):
    """Catches: `image` only in data folders and `product` only in manifests, case-sensitive headers,
    unknown JSONL keys dropped silently, a CSV's unclosed quote reported where the file ends."""
    from bgjax.data.sources import list_folder
    from bgjax.sampling.generate import read_manifest

    (tmp_path / "img").mkdir()
    _cutout().save(tmp_path / "img" / "a.png")
    _cutout().save(tmp_path / "img" / "b.png")
    (tmp_path / "t.csv").write_text("Product, CATEGORY \na.png,lamp\n")
    (tmp_path / "u.csv").write_text("image,category\nb.png,lamp\n")
    for table in ("t.csv", "u.csv"):
        assert [(line, row) for line, row, _ in read_manifest(tmp_path / table)][0][1]["product"] in ("a.png", "b.png")
        assert len(list_folder(tmp_path / "img", tmp_path / table).items) == 1
    (tmp_path / "v.jsonl").write_text('{"image": "a.png", "categry": "lamp"}\n{"Image": "b.png", "Category": "x"}\n')
    listing = list_folder(tmp_path / "img", tmp_path / "v.jsonl")
    assert [i.id for i in listing.items] == ["b"]
    assert "unknown field 'categry'; did you mean category?" in listing.rejected[0]["reason"]
    rows = list(read_manifest(tmp_path / "v.jsonl"))
    assert rows[0][2].startswith("unknown field 'categry'") and rows[1][1] == {"product": "b.png", "category": "x"}
    (tmp_path / "q.csv").write_text('product,category\na.png,lamp\n"b.png,lamp\nc.png,mug\n')
    rows = list(read_manifest(tmp_path / "q.csv"))
    assert [r[0] for r in rows] == [2, 3] and "to line 4" in rows[1][2]  # the quote opens on line 3
    (tmp_path / "multi.csv").write_text('product,category\n\n"a\n.png",lamp\nb.png,mug\n')
    assert [r[0] for r in read_manifest(tmp_path / "multi.csv")] == [3, 5]  # a row's first line
    (tmp_path / "bad.csv").write_text("image,Categry\na.png,lamp\n")
    assert main(["data", "folder", "--images", str(tmp_path / "img"), "--categories", str(tmp_path / "bad.csv"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "bad.csv:1: unknown column 'Categry'; did you mean category?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_folder_uses_alpha_when_a_mask_folder_lacks_the_image(tmp_path):
    """Catches: with --masks, an RGBA cut-out without a mask file rejected instead of using its alpha."""
    from bgjax.data.convert import write_dataset
    from bgjax.data.sources import list_folder

    (tmp_path / "img").mkdir()
    (tmp_path / "masks").mkdir()
    _cutout().save(tmp_path / "img" / "cut.png")
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(tmp_path / "img" / "photo.png")
    mask = np.zeros((24, 24), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "photo.png")
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(tmp_path / "img" / "bare.png")
    (tmp_path / "cats.csv").write_text("image,category\ncut.png,lamp\nphoto.png,lamp\nbare.png,mug\n")
    listing = list_folder(tmp_path / "img", tmp_path / "cats.csv", tmp_path / "masks")
    assert {i.id: i.mask and i.mask.name for i in listing.items} == {"cut": None, "photo": "photo.png", "bare": None}
    m = write_dataset(listing, tmp_path / "out", workers=1)
    assert m["num_written"] == 2 and "bare.png: no mask file and no alpha channel" in m["rejected"][0]["reason"]


# output folders and modes ----------------------------------------------------------------------------------

def test_data_refuses_a_non_empty_out_unless_overwrite(tmp_path, capsys):
    """Catches: a dataset overwritten silently, a stale inspect.png surviving --overwrite, an interrupted
    run no longer resumable."""
    out = tmp_path / "d"
    args = ["data", "synthetic", "--num", "6", "--size", "48", "--out", str(out), "--workers", "1"]
    assert main(args) == 0 and main(["data", "inspect", str(out), "--num", "2"]) == 0
    first = (out / "manifest.json").read_text()
    assert main(args[:3] + ["12"] + args[4:]) == 2
    assert f"{out}: not empty" in capsys.readouterr().err and (out / "manifest.json").read_text() == first
    assert main(args[:3] + ["12"] + args[4:] + ["--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["num_inputs"] == 12 and not (out / "inspect.png").exists()
    (out / "manifest.json").unlink()  # as if interrupted before the manifest: the shards resume
    shard = next(out.glob("*.array_record"))
    stamp = shard.stat().st_mtime_ns
    (out / "synthetic-00000-of-00009.array_record.done.json").write_text("{}")  # another interrupted run's
    assert main(args[:3] + ["12"] + args[4:]) == 0 and shard.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", shard.name, shard.name + ".done.json"])  # the stale marker is gone


def test_overwrite_never_deletes_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["data", "synthetic", "--num", "6", "--size", "48", "--out", ".", "--overwrite"]) == 2
    assert "is the current folder" in capsys.readouterr().err and (tmp_path / "keep.txt").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umasks_mode(tmp_path, umask):
    """Catches: mkstemp's 0600 kept (generated images, exported weights unreadable to others)."""
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.png", lambda tmp: Image.new("RGB", (2, 2)).save(tmp, format="PNG"))
        write_json(tmp_path / "b.json", {})
    finally:
        os.umask(old)
    for name in ("a.png", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.json"]  # no temporary files left


# labelled grids -------------------------------------------------------------------------------------------

def test_validation_set_shows_every_category_when_few(tmp_path):
    """Catches: num_samples=4 showing 4 of the 6 synthetic categories."""
    from bgjax.train.samples import validation_set

    assert main(["data", "synthetic", "--num", "18", "--size", "48", "--out", str(tmp_path), "--workers", "1"]) == 0
    chosen = validation_set(tmp_path, 4)
    assert len(chosen) == 6 and len({c["category"] for c in chosen}) == 6
    assert len(validation_set(tmp_path, 8)) == 8


def test_contact_sheet_has_a_settings_line(tmp_path):
    from bgjax.sampling.generate import LABEL_HEIGHT, THUMB, contact_sheet

    rows = [("lamp  (a.png, seed 0, reference r.png)", Image.new("RGB", (8, 8), "red"), [Image.new("RGB", (8, 8))])]
    contact_sheet(rows, tmp_path / "plain.png")
    contact_sheet(rows, tmp_path / "titled.png", "dpmpp_2m, 25 steps, guidance 7.5")
    assert Image.open(tmp_path / "plain.png").size == (2 * THUMB, THUMB + LABEL_HEIGHT)
    titled = np.asarray(Image.open(tmp_path / "titled.png"))
    assert titled.shape[:2] == (THUMB + 2 * LABEL_HEIGHT, 2 * THUMB) and (titled[:LABEL_HEIGHT] < 128).any()


def test_demo_refuses_a_previous_demo_and_a_non_model(tmp_path, capsys, no_loading):
    (tmp_path / "contact_sheet.png").write_bytes(b"old")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not empty (contact_sheet.png)" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path), "--out", str(tmp_path / "demo")]) == 2
    assert "not a bgjax model (no bgjax.json)" in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_gitignore_covers_the_demo_output():
    root = Path(__file__).parent.parent
    if shutil.which("git") and (root / ".git").exists():
        import subprocess

        proc = subprocess.run(["git", "check-ignore", "-q", "bgjax_demo/contact_sheet.png"], cwd=root)
        assert proc.returncode == 0
    assert "bgjax_demo/" in (root / ".gitignore").read_text()
