"""The bundled model: `bgjax demo` on the CPU, its outputs' styles by category, and the quickstart
notebook executed end to end."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from bgjax.cli import main
from bgjax.data.synthetic import CATEGORIES

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    assert (out / "contact_sheet.png").is_file()
    return json.loads((out / "demo.json").read_text())


def test_demo_backgrounds_follow_the_category(demo):
    """Each synthetic category has its own background style; the classifier that recognises the
    training data's styles must recognise most of the demo's outputs as their category's (chance: 1/6)."""
    rows = [r for r in demo["results"] if "reference_tone" not in r]
    assert [r["category"] for r in rows] == list(CATEGORIES)
    hits = sum(s == r["category"] for r in rows for s in r["background_styles"])
    total = sum(len(r["background_styles"]) for r in rows)
    assert hits / total >= 0.5, [(r["category"], r["background_styles"]) for r in rows]


def test_demo_reference_carries_its_tone(demo):
    """A synthetic background's tone (dark to pastel) is not in the prompt, only in a reference:
    PG must carry it over. With the dark reference the coffee mug's backgrounds (same seeds) must
    be darker than without one and with the pastel reference lighter, each by at least 0.05 in
    mean brightness (0-1), and each nearer its reference's brightness than those without one are."""
    rows = {r["name"]: r for r in demo["results"]}
    plain = np.mean(rows["coffee_mug"]["background_tones"])
    dark, pastel = rows["coffee_mug_ref_dark"], rows["coffee_mug_ref_pastel"]
    assert np.mean(dark["background_tones"]) < plain - 0.05 < plain + 0.05 < np.mean(pastel["background_tones"])
    for row in (dark, pastel):
        assert abs(np.mean(row["background_tones"]) - row["reference_tone"]) < abs(plain - row["reference_tone"])


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2
