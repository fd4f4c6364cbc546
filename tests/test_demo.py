"""The bundled model: `bgjax demo` on the CPU, its outputs' styles by category, and the quickstart
notebook executed end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from bgjax.cli import main
from bgjax.data.synthetic import CATEGORIES

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    assert (out / "contact_sheet.png").is_file()
    return json.loads((out / "demo.json").read_text())


def test_demo_backgrounds_follow_the_category(demo):
    """CG gives each category its own background, by the classifier that recognises the training data's
    styles (chance: 1/6). Issue 18's target: 22 of the 24 plain outputs and every category 3 of 4. The bundled
    model, trained without horizontal flips, gives 22 on the demo's seeds at guidance 10 (desk lamp 3, water
    bottle 3, the rest 4; at guidance 7.5 21, desk lamp 2) and 90 of 96 on 16 other seeds per category (seed 2:
    water bottle 10, the rest 16; seed 1 also 90). The model before it (flipped crops: its table fan drawn
    along both diagonals) gives 20 here at 7.5 and 21 at 10, table fan 1 and 2, and fails; the one before that
    21 with its rice cooker at 2 of 16 elsewhere."""
    rows = [r for r in demo["results"] if "reference_tone" not in r]
    assert [r["category"] for r in rows] == list(CATEGORIES)
    right = demo["measures"]["styles_right"]
    assert right == {r["category"]: sum(s == r["category"] for s in r["background_styles"]) for r in rows}
    styles = [(r["category"], r["background_styles"]) for r in rows]
    assert sum(right.values()) >= 22 and min(right.values()) >= 3, styles


def test_demo_reference_carries_its_style_and_tone(demo):
    """PG carries a reference's style. A desk lamp's ad restyles the coffee mug's background: at least 3 of 4
    outputs have the desk lamp's hue and pattern. A synthetic tone (dark to pastel) is in no prompt, only in
    a reference: with the dark coffee-mug ad the mug's backgrounds (same seeds) must be darker than without
    one and with the pastel one lighter, each by at least 0.05 in mean brightness (0-1), and each nearer its
    reference's brightness than those without one are."""
    rows = {r["name"]: r for r in demo["results"]}
    lamp = rows["coffee_mug_ref_desk_lamp"]
    assert lamp["reference_category"] == "desk lamp"
    assert demo["measures"]["reference_styles_right"] == {lamp["name"]: lamp["background_styles"].count("desk lamp")}
    assert lamp["background_styles"].count("desk lamp") >= 3, lamp["background_styles"]
    plain = np.mean(rows["coffee_mug"]["background_tones"])
    dark, pastel = rows["coffee_mug_ref_dark"], rows["coffee_mug_ref_pastel"]
    assert np.mean(dark["background_tones"]) < plain - 0.05 < plain + 0.05 < np.mean(pastel["background_tones"])
    for row in (dark, pastel):
        assert abs(np.mean(row["background_tones"]) - row["reference_tone"]) < abs(plain - row["reference_tone"])


def test_demo_products_halo(demo):
    """The ring of colour around the products (synthetic.halo, per row the mean over its outputs, above the
    synthetic ground truth's own level for its style) are at most issue 18's target, the demo's stated margin
    0.06 (the small VAE's own round trip of ground-truth images adds 0.03 to 0.06). With edge_fill the
    bundled model's rows are at most 0.033 above; without it a model bundled earlier was 0.105 above (coffee
    mug), and the one before that 0.115."""
    measures = demo["measures"]
    assert measures["halo_margin"] == 0.06
    truth = demo["ground_truth_halo"]
    for row in demo["results"]:
        above = np.mean(row["halos"]) - truth[row.get("reference_category", row["category"])]
        assert measures["halo_above_ground_truth"][row["name"]] == pytest.approx(above, abs=1e-3)
        assert above <= measures["halo_margin"], (row["name"], row["halos"])


def _run_notebook(name: str, folder: Path) -> list[dict]:
    """Execute a notebook as Colab would (its install cell finds bgjax installed); its code cells' outputs."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _images(outputs: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def test_quickstart_notebook_runs(tmp_path):
    assert _images(_run_notebook("quickstart.ipynb", tmp_path)) == 2


def test_train_notebook_trains_generates_and_runs_the_export_in_diffusers(tmp_path):
    """notebooks/train.ipynb at its CPU size: trains CG from the bundled base (a model, a loss curve and two
    sample grids), generates, exports, and runs the export in diffusers from the same initial noise as bgjax:
    bgjax's PyTorch pipeline (issue 19) agrees to within half a grey level on the background (8-bit rounding;
    a wrong export, identifier, attention or paste-back differs by several)."""
    outputs = _run_notebook("train.ipynb", tmp_path)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert (tmp_path / "runs" / "cg" / "model" / "cg" / "params.safetensors").is_file()
    assert len(list((tmp_path / "runs" / "cg" / "samples").glob("step_*.png"))) == 2
    assert _images(outputs) == 5  # loss curve, two grids, the bgjax row, the diffusers row
    difference = float(re.search(r"mean background difference ([\d.]+) grey levels", text)[1])
    print(f"bgjax vs diffusers in the notebook: {difference:.2f} grey levels")
    assert difference < 0.5, text[-2000:]
