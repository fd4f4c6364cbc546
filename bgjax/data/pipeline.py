"""The grain input pipeline: record shards or a TFDS dataset -> augmented, tokenised, batched training examples.

ArrayRecord shards and TFDS data sources (`bgjax.data.dataset`) are read as one random-access
`MapDataset` with a global shuffle; every random choice is drawn from a generator seeded by the
element's index, so a batch depends only on (seed, step) and a restored iterator state continues
exactly. TFRecord shards go through grain's TFRecord dataset with interleave.

A batch is a dict of numpy arrays:
    image (B, R, R, 3) uint8, mask (B, R, R) uint8 {0, 1}, category_id (B,) int32, example_seed (B,) uint32,
    original_size / crop_top_left (B, 2) int32 (where the crop came from, `augment.Crop`: SDXL's time ids),
    input_ids (B, 77) int32 (and input_ids_2 for SDXL), fg_tokens / bg_tokens (B, 77) float32,
    identifier_index (B,) int32,
    and with PG augmentation the perturbation's parameters (`augment.draw_pg_params`):
    pg_dilation (B,) int32, pg_shift (B, 2) int32, pg_hole_spans (B, S_hole, R, 2) int32 and
    pg_mix_spans (B, S_mix, R, 2) int32, and the image mixed into its regions, pg_partner_image
    (B, R, R, 3) uint8, from which `bgjax.data.pg_render.pg_condition(batch)` renders c_pg
    (B, R, R, 3) float32 in [-1, 1] on the accelerator.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import grain
import numpy as np

from bgjax.data.augment import CropConfig, PGAugmentConfig, crop_encoded, crop_resize_encoded, draw_pg_params
from bgjax.data.dataset import TrainingData, open_records
from bgjax.data.example import decode_example
from bgjax.data.images import decode_mask, decode_rgb
from bgjax.data.latents import decode_latents


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 16  # per process
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever
    workers: int = 0  # grain worker processes; 0 decodes in the training process
    crop: CropConfig = dataclasses.field(default_factory=CropConfig)
    pg: PGAugmentConfig | None = None  # None: no PG inputs (stage 1)
    interleave_cycle_length: int = 4  # TFRecord only


class Decode(grain.transforms.Map):
    """Record bytes -> image, mask and the category's prompt arrays (looked up, not re-tokenised).

    `example_seed` keys the trainer's per-example randomness: the record's position in the
    shuffled stream (ArrayRecord, TFDS), or a hash of its id (TFRecord, which has no positions).
    With `encoded`, image and mask stay encoded for `Crop`, which decodes them straight into its
    resize (no numpy copies; a JPEG at reduced scale where the crop allows).
    """

    def __init__(self, prompts: dict[str, np.ndarray], encoded: bool = False):
        self.prompts = prompts
        self.encoded = encoded

    def map(self, element: bytes | tuple[int, bytes | dict]) -> dict:
        position, record = element if isinstance(element, tuple) else (None, element)
        ex = _example(record)
        cid = ex["category_id"][0]
        seed = zlib.crc32(ex["id"][0]) if position is None else position % 2**32
        image, mask = ex["image"][0], ex["mask"][0]
        if not self.encoded:
            image, mask = decode_rgb(image), (decode_mask(mask) > 127).view(np.uint8)
        out = {"image": image, "mask": mask, "category_id": np.int32(cid), "example_seed": np.uint32(seed)}
        out.update({k: v[cid] for k, v in self.prompts.items()})
        if "latent_mean" in ex:
            out.update(decode_latents(ex))
        if "crop_top_left" in ex:  # latent caches keep where their crops came from
            out.update(geometry(ex["original_size"], ex["crop_top_left"]))
        return out


def _example(record: bytes | dict) -> dict:
    """A serialized record decoded, or a TFDS element (`TfdsExamples`: already a dict)."""
    return record if isinstance(record, dict) else decode_example(record)


def geometry(original_size, crop_top_left) -> dict[str, np.ndarray]:
    return {"original_size": np.asarray(original_size, np.int32), "crop_top_left": np.asarray(crop_top_left, np.int32)}


def _with_position(position: int, record: bytes | dict) -> tuple[int, bytes | dict]:
    return position, record


def example_rng(seed: int | None, stream: int, element: dict, rng: np.random.Generator) -> np.random.Generator:
    """With a seed, a generator keyed by the example's stream position, so every process layout
    draws the same augmentation for it; without one (TFRecord: no positions), grain's."""
    return rng if seed is None else np.random.default_rng([seed, stream, int(element["example_seed"])])


class Crop(grain.transforms.RandomMap):
    """Encoded image and mask -> the training crop (`crop_resize_encoded`)."""

    def __init__(self, cfg: CropConfig, seed: int | None = None):
        self.cfg, self.seed = cfg, seed

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        rng = example_rng(self.seed, 0, element, rng)
        crop = crop_encoded(element["image"], element["mask"], rng, self.cfg)
        return {**element, "image": crop.image, "mask": (crop.mask > 127).view(np.uint8),
                **geometry(crop.original_size, crop.crop_top_left)}


class Partners:
    """The image PG mixes into an example's reference regions: a record drawn at random from the
    whole data set, keyed by the example's stream position like every draw (so the same on any
    number of devices or processes, with or without micro-batches), decoded and cropped as a
    training example is (`crop` None: latent-cache records hold their crops already)."""

    def __init__(self, source, crop: CropConfig | None, seed: int):
        self.source, self.crop, self.seed = source, crop, seed

    def __call__(self, element: dict) -> np.ndarray:
        rng = example_rng(self.seed, 2, element, None)
        ex = _example(self.source[int(rng.integers(len(self.source)))])
        image, mask = ex["image"][0], ex["mask"][0]
        if self.crop is None:
            return decode_rgb(image)
        return crop_resize_encoded(image, mask, rng, self.crop)[0]


class PGPerturb(grain.transforms.RandomMap):
    """PG's self-supervised reference: only its random parameters (a few KB per image) and the
    partner image are drawn here; the pixels are rendered on the accelerator
    (`bgjax.data.pg_render.pg_condition`). Without `partners` (TFRecord: no random access), the
    partner is the next image of the local batch (`NextInBatch`). With `cfg.prompt_swap_probability`,
    the example's prompt arrays become another category's row of `prompts` (the tables `Decode` used)."""

    def __init__(self, cfg: PGAugmentConfig, seed: int | None = None, partners: Partners | None = None,
                 prompts: dict[str, np.ndarray] | None = None):
        self.num_categories = len(next(iter(prompts.values()))) if prompts else 0
        if cfg.prompt_swap_probability and self.num_categories < 2:
            raise ValueError(f"data.pg.prompt_swap_probability: {cfg.prompt_swap_probability} needs prompts of at "
                             f"least two categories to swap between; the data has {self.num_categories}")
        self.cfg, self.seed, self.partners, self.prompts = cfg, seed, partners, prompts

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        params = draw_pg_params(element["mask"], example_rng(self.seed, 1, element, rng), self.cfg)
        if self.cfg.prompt_swap_probability:
            element = self._swap_prompt(element, example_rng(self.seed, 3, element, rng))
        if self.partners is None:
            return {**element, **params}
        # an example that mixes nothing in (most, by default) reads no partner record
        mixes = (params["pg_mix_spans"][..., 1] > params["pg_mix_spans"][..., 0]).any()
        return {**element, **params, "pg_partner_image": self.partners(element) if mixes else element["image"]}

    def _swap_prompt(self, element: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= self.cfg.prompt_swap_probability:
            return element
        own = int(element["category_id"])
        other = int(rng.integers(self.num_categories - 1))
        other += other >= own  # uniform over the categories other than the image's
        return {**element, **{k: v[other] for k, v in self.prompts.items()}}


class NextInBatch(grain.transforms.Map):
    """TFRecord streams have no positions to draw a partner from: each image is mixed with the next
    of its (local) batch, the last with the first."""

    def map(self, batch: dict) -> dict:
        return {**batch, "pg_partner_image": np.roll(batch["image"], -1, axis=0)}


def make_dataset(data: TrainingData | Path, cfg: PipelineConfig, prompts: dict[str, np.ndarray],
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches for this process from `data` (a folder written by `bgjax data`, or `bgjax.data.dataset`'s
    `open_records` / `open_tfds`). `prompts` maps each prompt array name to a (num_categories, ...) table
    (see `prompt_tables`)."""
    data = data if isinstance(data, TrainingData) else open_records(data)
    crop = data.latents is None  # latent caches hold crops already
    if data.random_access:
        source = data.source()
        ds = grain.MapDataset.source(source).seed(cfg.seed).shuffle()
        ds = ds.repeat(cfg.num_epochs).map_with_index(_with_position)
        ds = ds[process_index::process_count].map(Decode(prompts, encoded=crop))
        if crop:
            ds = ds.random_map(Crop(cfg.crop, cfg.seed))
        if cfg.pg is not None:
            partners = Partners(source, cfg.crop if crop else None, cfg.seed)
            ds = ds.random_map(PGPerturb(cfg.pg, cfg.seed, partners, prompts))
        it = ds.batch(cfg.batch_size, drop_remainder=True).to_iter_dataset()
    else:
        files = grain.MapDataset.source(list(data.paths)).seed(cfg.seed).shuffle().repeat(cfg.num_epochs)
        files = files[process_index::process_count].map(grain.experimental.TFRecordIterDataset)
        it = grain.experimental.InterleaveIterDataset(files, cycle_length=cfg.interleave_cycle_length)
        it = it.map(Decode(prompts, encoded=crop))
        if crop:
            it = it.random_map(Crop(cfg.crop), seed=cfg.seed)
        if cfg.pg is not None:
            it = it.random_map(PGPerturb(cfg.pg, prompts=prompts), seed=cfg.seed + 1)
        it = it.batch(cfg.batch_size, drop_remainder=True)
        if cfg.pg is not None:
            it = it.map(NextInBatch())
    if cfg.workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; bgjax does not use absl.app
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
    return it


def prompt_tables(builder, categories: dict[str, int]) -> dict[str, np.ndarray]:
    """Tokenise each category's prompt once: {name: (num_categories, ...)} arrays for `Decode`."""
    names = [name for name, _ in sorted(categories.items(), key=lambda kv: kv[1])]
    return builder.batch(names)

