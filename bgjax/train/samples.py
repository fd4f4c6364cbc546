"""Sample grids during training: the current weights generate backgrounds for a fixed validation
set (the first records of the data, one per category where possible), one row per product:
product | generated (| reference for PG), each row under a label naming its category (and the
reference's), the grid under a line with the sampling settings. Written to WORKDIR/samples/ and
TensorBoard."""

from __future__ import annotations

import itertools
from pathlib import Path

from PIL import Image, ImageDraw

from bgjax.data.dataset import TrainingData, open_records
from bgjax.data.images import decode_mask, decode_rgb
from bgjax.method.text import IDENTIFIERS
from bgjax.sampling.pipeline import BackgroundPipeline, Models
from bgjax.train.models import StageModels

ALL_CATEGORIES_UP_TO = 8  # a grid shows every category when there are at most this many
LABEL = 14  # pixels of a label line
MIN_CELL = 96  # small models' images are enlarged (nearest) so a label fits beside them
GUIDANCE = 7.5
SAMPLER = "dpmpp_2m"


def validation_set(data: TrainingData | Path, num: int) -> list[dict]:
    """The first record of each category, then further records, up to `num` (product, mask, category);
    `num` grows to the number of categories when there are at most ALL_CATEGORIES_UP_TO, so a few
    categories are all seen however small `config.num_samples` is."""
    data = data if isinstance(data, TrainingData) else open_records(data)
    categories = data.categories
    if len(categories) <= ALL_CATEGORIES_UP_TO:
        num = max(num, len(categories))
    chosen, seen = [], set()
    for ex in itertools.islice(data.examples(), 64 * num):
        category = ex["category"][0].decode()
        if category not in seen or len(seen) >= min(num, len(categories)):
            seen.add(category)
            chosen.append({"product": decode_rgb(ex["image"][0]), "mask": decode_mask(ex["mask"][0]),
                           "category": category})
        if len(chosen) == num:
            break
    return chosen


def sample_grid(models: StageModels, params: dict, items: list[dict], steps: int, seed: int = 0) -> Image.Image:
    """Generate with host `params` (every component's) and tile the rows. PG rows use the next item
    as the style reference. The unconditional pass is the empty prompt's, or zeros where an SDXL model's
    dropped prompts were zeros in training (`StageModels.zeros_for_empty_prompt`)."""
    denoiser = {k: params[k] for k in ("unet", "cg", "pg") if k in params}
    text = {k: params.get(k) for k in ("text_encoder", "text_encoder_2", *IDENTIFIERS.values())}
    modules = Models(models.denoiser, models.text_encoder, models.vae, models.text_encoder_2)
    pipe = BackgroundPipeline(Path("."), modules,
                              {"denoiser": denoiser, "vae": params["vae"], **text}, models.prompts.tokenizer,
                              models.configs["scheduler"], models.method, models.categories,
                              tokenizer_2=models.prompts.tokenizer_2,
                              zeros_for_empty_prompt=models.zeros_for_empty_prompt)
    rows = []
    side = max(pipe.resolution, MIN_CELL)
    for i, item in enumerate(items):
        reference = items[(i + 1) % len(items)] if models.denoiser.pg is not None else None
        image = pipe(product=item["product"], mask=item["mask"], category=item["category"],
                     reference=reference and reference["product"], reference_mask=reference and reference["mask"],
                     num_images=1, seed=seed, steps=steps, guidance=GUIDANCE,
                     sampler=SAMPLER)[0]
        cells = [Image.fromarray(item["product"]), image]
        label = f"{item['category']}: product | generated"
        if reference is not None:
            cells.append(Image.fromarray(reference["product"]))
            label += f" | reference ({reference['category']})"
        rows.append(_labelled([c.convert("RGB").resize((side, side), Image.Resampling.NEAREST) for c in cells], label))
    width = max(r.width for r in rows)
    title = f"{SAMPLER}, {steps} steps, guidance {GUIDANCE}, seed {seed}"
    grid = Image.new("RGB", (width, LABEL + sum(r.height for r in rows)), "white")
    ImageDraw.Draw(grid).text((2, 1), title, fill="black")
    y = LABEL
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height
    return grid


def _labelled(cells: list[Image.Image], label: str) -> Image.Image:
    """The cells side by side under a label line."""
    row = Image.new("RGB", (sum(c.width for c in cells), LABEL + cells[0].height), "white")
    ImageDraw.Draw(row).text((2, 1), label, fill="black")
    for k, cell in enumerate(cells):
        row.paste(cell, (k * cells[0].width, LABEL))
    return row
