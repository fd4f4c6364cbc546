"""The records a run trains on: a folder written by `bgjax data ...`, or a prepared TFDS dataset whose features
are named like bgjax's records (`bgjax.data.tfds_bg60k`: image, mask, category as a ClassLabel, id).

Both are random-access sources for grain except TFRecord shards, which are streamed; elements read like
`bgjax.data.example.decode_example`'s output, {feature: [value]}, images still encoded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from bgjax.data.convert import read_manifest
from bgjax.data.example import decode_example
from bgjax.data.records import read_records

# TFDS image features handed over still encoded: the loader decodes them straight into its crop.
_ENCODED = ("image", "mask", "ref_image", "ref_mask")


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
    name: str  # "bg60k/bg60k"
    data_dir: str  # "": TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
    split: str
    encoded: tuple[str, ...]  # the image features, read still encoded


@dataclasses.dataclass(frozen=True)
class TrainingData:
    where: str  # for messages: the folder, or "tfds NAME (split S) in DIR"
    format: str  # "arrayrecord", "tfrecord" or "tfds"
    categories: dict[str, int]  # name -> category id
    num_records: int
    fingerprint: str  # what a resume compares (`data_fingerprint`, `tfds_fingerprint`)
    paths: tuple[str, ...] = ()  # record shards
    tfds: TfdsSplit | None = None
    latents: dict | None = None  # a latent cache's settings

    @property
    def random_access(self) -> bool:
        return self.format != "tfrecord"

    def source(self):
        """A random-access source of records (ArrayRecord: serialized examples; TFDS: example dicts)."""
        if self.tfds is None:
            import grain

            return grain.sources.ArrayRecordDataSource(list(self.paths))
        import tensorflow_datasets as tfds

        t = self.tfds
        source = tfds.data_source(t.name, split=t.split, data_dir=t.data_dir or None, download=False,
                                  decoders={k: tfds.decode.SkipDecoding() for k in t.encoded})
        return TfdsExamples(source, sorted(self.categories, key=self.categories.get))

    def examples(self) -> Iterator[dict]:
        """Every record in stored order, as `decode_example` gives it."""
        if self.tfds is not None:
            source = self.source()
            return (source[i] for i in range(len(source)))
        return (decode_example(r) for path in self.paths for r in read_records(path))


class TfdsExamples:
    """A TFDS data source whose elements read like bgjax records: {feature: [value]}, with `category_id` the
    ClassLabel's index and `category` its name."""

    def __init__(self, source, names: list[str]):
        self.source, self.names = source, names

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        element = self.source[index]
        example = {k: [v] for k, v in element.items() if k != "category"}
        cid = int(element["category"])
        example.update(category_id=[cid], category=[self.names[cid].encode()])
        return example


def data_fingerprint(manifest: dict) -> str:
    """sha256 over the shards (name, record count, sha256) and the latent cache's settings, if any."""
    shards = [(s["path"], s["num_records"], s["sha256"]) for s in manifest["shards"]]
    text = json.dumps({"shards": shards, "latents": manifest.get("latents")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def open_records(data_dir: str | os.PathLike) -> TrainingData:
    """A folder written by `bgjax data ...` (its manifest.json)."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    paths = tuple(str(data_dir / s["path"]) for s in manifest["shards"] if s["num_records"])
    if not paths:
        raise ValueError(f"{data_dir}: the manifest lists no records")
    return TrainingData(str(data_dir), manifest["format"], manifest["categories"], manifest["num_written"],
                        data_fingerprint(manifest), paths, latents=manifest.get("latents"))


def _builder(name: str, data_dir: str):
    import tensorflow_datasets as tfds

    import bgjax.data.tfds_bg60k  # noqa: F401 (registers "bg60k")

    return tfds.builder(name, data_dir=data_dir or None)


def open_tfds(name: str, data_dir: str = "", split: str = "") -> TrainingData:
    """A prepared TFDS dataset with bgjax's features; `split` may be left out when it has one. Its fingerprint
    covers the dataset's name, version, split, files (names and sizes), record counts and categories: not a
    checksum of the contents, which TFDS does not record."""
    builder = _builder(name, data_dir)
    where = f"tfds {name} in {builder.data_dir}"
    if not builder.is_prepared():
        raise FileNotFoundError(f"{where}: not prepared (prepare it first: `builder.download_and_prepare(...)`, "
                                f"see bgjax.data.tfds_bg60k) or set --config.data.tfds_data_dir to where it is")
    info = builder.info
    splits = sorted(info.splits)
    if not split and len(splits) == 1:
        split = splits[0]
    if split not in splits:
        raise ValueError(f"{where}: no split {split!r}; it has {', '.join(splits)} (--config.data.tfds_split)")
    if "category" not in info.features or not hasattr(info.features["category"], "names"):
        raise ValueError(f"{where}: no ClassLabel feature 'category' (bgjax trains on image, mask, category)")
    names = list(info.features["category"].names)
    files = sorted(Path(f) for f in info.splits[split].filepaths)
    text = json.dumps({"tfds": info.full_name, "split": split, "files": [(f.name, f.stat().st_size) for f in files],
                       "shard_lengths": list(info.splits[split].shard_lengths), "categories": names}, sort_keys=True)
    return TrainingData(f"{where} (split {split})", "tfds", {n: i for i, n in enumerate(names)},
                        info.splits[split].num_examples, hashlib.sha256(text.encode()).hexdigest(),
                        tfds=TfdsSplit(name, data_dir, split, tuple(k for k in _ENCODED if k in info.features)))
