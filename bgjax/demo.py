"""`bgjax demo`: the bundled small model generates backgrounds for bundled products, one per
synthetic category, plus one product restyled after a reference, and writes a contact sheet.

The bundled model (bgjax/assets/tiny_model, reproduced by tools/train_bundled_model.sh) was
trained on bgjax's synthetic data, where each category has its own background style; the demo
reports which style each output has (`synthetic.classify_background`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bgjax.data import synthetic

ASSETS = Path(__file__).parent / "assets"
MODEL = ASSETS / "tiny_model"
PRODUCTS = ASSETS / "products"
# The reference example: a product of this category restyled after a background of that one.
REFERENCE_EXAMPLE = ("coffee mug", "table fan")


def sample_products(out: Path = PRODUCTS, size: int = 64, seed: int = 7) -> list[Path]:
    """Write one RGBA cut-out per category and one full reference photo + mask (how the bundled
    products were made)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for category in synthetic.CATEGORIES:
        sample = synthetic.make_sample(0, seed, size, category)
        path = out / f"{category.replace(' ', '_')}.png"
        synthetic.save_rgba_cutout(sample).save(path)
        paths.append(path)
    reference = synthetic.make_sample(1, seed, size, REFERENCE_EXAMPLE[1])
    Image.fromarray(reference.image).save(out / "reference.png")
    Image.fromarray(reference.mask).save(out / "reference_mask.png")
    return paths


def _label(image: Image.Image, text: str) -> Image.Image:
    from PIL import ImageDraw

    canvas = Image.new("RGB", (image.width, image.height + 14), "white")
    canvas.paste(image, (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), text[:18], fill="black")
    return canvas


def run_demo(out: Path, model: Path = MODEL, num_images: int = 4, steps: int = 20, seed: int = 0) -> dict:
    """Generate, write the images, `contact_sheet.png` and `demo.json`; returns the summary."""
    from bgjax.sampling.pipeline import BackgroundPipeline

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = BackgroundPipeline.from_pretrained(model)
    rows, results = [], []

    def add_row(name: str, category: str, images: list[Image.Image], first: Image.Image, **extra) -> None:
        styles = []
        for k, image in enumerate(images):
            image.save(out / f"{name}_{k}.png")
            mask = np.asarray(Image.open(PRODUCTS / f"{category.replace(' ', '_')}.png"))[..., 3]
            styles.append(synthetic.classify_background(np.asarray(image), _placed_mask(pipe, mask)))
        results.append({"name": name, "category": category, "background_styles": styles, **extra})
        rows.append([_label(first, name)] + [_label(im, s) for im, s in zip(images, styles, strict=True)])

    for category in synthetic.CATEGORIES:
        product = PRODUCTS / f"{category.replace(' ', '_')}.png"
        images = pipe(product=product, category=category, num_images=num_images, seed=seed, steps=steps)
        add_row(category.replace(" ", "_"), category, images, Image.open(product).convert("RGB"))
    category, style = REFERENCE_EXAMPLE
    product = PRODUCTS / f"{category.replace(' ', '_')}.png"
    images = pipe(product=product, category=category, reference=PRODUCTS / "reference.png",
                  reference_mask=PRODUCTS / "reference_mask.png", num_images=num_images, seed=seed, steps=steps)
    add_row(f"{category.replace(' ', '_')}_ref_{style.replace(' ', '_')}", category, images,
            Image.open(PRODUCTS / "reference.png").convert("RGB"), reference_style=style)
    sheet = _grid(rows)
    sheet.save(out / "contact_sheet.png")
    summary = {"model": str(model), "seconds": time.perf_counter() - t0, "steps": steps, "results": results}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    return summary


def _placed_mask(pipe, alpha: np.ndarray) -> np.ndarray:
    """The cut-out's mask where the pipeline placed it on its canvas (default placement)."""
    from bgjax.sampling.pipeline import place_cutout

    rgba = np.dstack([np.zeros(alpha.shape + (3,), np.uint8), alpha])
    return place_cutout(Image.fromarray(rgba, "RGBA"), (pipe.resolution, pipe.resolution))[1]


def _grid(rows: list[list[Image.Image]]) -> Image.Image:
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            sheet.paste(image.resize((w, h)), (j * w, i * h))
    return sheet
