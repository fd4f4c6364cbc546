"""BG60k as a TFDS dataset: `tfds.builder("bg60k/bg60k")`, `tfds.data_source("bg60k/bg1k")`, ArrayRecord files.

Three configs, one per list file of the release: `bg60k` (the training set, split "train"), `bg1k` (the BG1K
test set, split "test") and `bgpair` (the BG-pair test pairs, split "test", with each target's reference).
The release is read by bgjax's one reader (`bgjax.data.bg60k`) and decoded by the one record writer
(`bgjax.data.convert.record_features`), so the quirks policy is `bgjax data bg60k`'s: every line of the list is
written or rejected with its reason, files no line uses are reported, and all of it is in the dataset's
metadata (`builder.info.metadata`: num_inputs, num_written, rejected, unmatched, categories, category_counts).

Preparing and reading need `tensorflow-datasets` (`pip install "bgjax[tfds]"`), not TensorFlow: the images
are handed to TFDS already encoded. (`tfds build` itself imports TensorFlow; `bgjax data tfds` does not.)

    import tensorflow_datasets as tfds
    import bgjax.data.tfds_bg60k  # registers "bg60k"

    builder = tfds.builder("bg60k/bg60k", data_dir="~/tensorflow_datasets", file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="BG60k"))
    source = tfds.data_source("bg60k/bg60k", split="train", data_dir="~/tensorflow_datasets")
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from bgjax.data import bg60k
from bgjax.data.convert import executor, features_or_rejection

SPLITS = {"bg60k": "train", "bg1k": "test", "bgpair": "test"}
ITEMS_PER_WORKER = 256  # fewer inputs are decoded in this process (a worker costs seconds to start)

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
BG60k cannot be downloaded automatically: it is released for academic use (see the README of
github.com/Whileherham/BG60k for how to obtain it). Unpack it into one folder and pass that folder as the
manual_dir (`tfds.download.DownloadConfig(manual_dir=...)`, or `tfds build --manual_dir=...`). The folder
holds the list files and the image and mask folders as the release unpacks them:

    bg60k_info.txt  bg1k_info.txt  bgpair_info.txt
    bg60k_imgs_0/ ... bg60k_imgs_4/   bg60k_masks_0/ ... bg60k_masks_4/
    bg1k_imgs/  bg1k_masks/
"""

CITATION = """\
@inproceedings{bg60k,
  title = {Generate E-commerce Product Background by Integrating Category Commonality and Personalized Style},
  booktitle = {ICASSP},
  year = {2025},
  eprint = {2312.13309},
  archivePrefix = {arXiv},
}"""


@dataclasses.dataclass(eq=False)
class Bg60kConfig(tfds.core.BuilderConfig):
    """`listing`: which list file of the release (bg60k, bg1k or bgpair); `alpha_threshold`: mask alpha above
    which a pixel is product; `min_match`: preparing stops when fewer of the list's lines match their files."""

    listing: str = "bg60k"
    alpha_threshold: int = bg60k.ALPHA_THRESHOLD
    min_match: float = bg60k.MIN_MATCH


class Bg60k(tfds.core.GeneratorBasedBuilder):
    """The BG60k release (product ads with masks and categories) in bgjax's record layout."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "BG60k, BG1K and BG-pair read by bgjax's release reader."}
    BUILDER_CONFIGS = [
        Bg60kConfig(name="bg60k", listing="bg60k", description="BG60k training set (bg60k_info.txt)"),
        Bg60kConfig(name="bg1k", listing="bg1k", description="BG1K test set (bg1k_info.txt)"),
        Bg60kConfig(name="bgpair", listing="bgpair", description="BG-pair test pairs with references "
                                                                 "(bgpair_info.txt)"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Image(shape=(None, None, 3))  # the release's JPEG bytes as they are, else PNG
        mask = tfds.features.Image(shape=(None, None, 1), encoding_format="png")  # 0 / 255
        features = {"image": image, "mask": mask,
                    # The names are the release's categories, known once the list file is read (sorted: the
                    # ids `bgjax data bg60k` gives).
                    "category": tfds.features.ClassLabel(),
                    "id": tfds.features.Text()}
        if self.builder_config.listing == "bgpair":
            features.update(ref_id=tfds.features.Text(), ref_image=image, ref_mask=mask)
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.split("\n\n")[0], features=tfds.features.FeaturesDict(features),
            homepage="https://github.com/Whileherham/BG60k", citation=CITATION, metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        listing = bg60k.list_bg60k(dl_manager.manual_dir, config.listing, config.alpha_threshold)
        bg60k.check_match(config.listing, listing, config.min_match, option="Bg60kConfig.min_match")
        names = sorted({item.category for item in listing.items})
        self.info.features["category"].names = names
        self.info.metadata.update(num_inputs=listing.num_inputs, num_written=0, rejected=list(listing.rejected),
                                  unmatched=listing.unmatched, categories={n: i for i, n in enumerate(names)},
                                  category_counts=dict.fromkeys(names, 0))
        return {SPLITS[config.listing]: self._generate_examples(listing.items, names)}

    def _generate_examples(self, items, names: list[str]):
        meta, vocab = self.info.metadata, {n: i for i, n in enumerate(names)}
        with executor(min(os.cpu_count() or 1, len(items) // ITEMS_PER_WORKER)) as pool:
            decoded = pool.map(features_or_rejection, [(item, vocab[item.category]) for item in items], chunksize=16)
            for item, (features, rejection) in zip(items, decoded, strict=True):
                if rejection is not None:
                    meta["rejected"].append(rejection)
                    continue
                meta["num_written"] += 1
                meta["category_counts"][item.category] += 1
                yield item.id, {k: features[f] for k, f in _FEATURES.items() if f in features}
        if meta["num_inputs"] != meta["num_written"] + len(meta["rejected"]):
            raise AssertionError("an input was neither written nor rejected")  # a bug, never bad data


def prepare(manual_dir: str | os.PathLike, config: str = "bg60k", data_dir: str | None = None):
    """Write config `config` of BG60k (ArrayRecord) from the release unpacked in `manual_dir`; the builder."""
    builder = tfds.builder(f"bg60k/{config}", data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder


# TFDS feature <- bgjax record feature (`record_features`); the category is stored by its id.
_FEATURES = {"image": "image", "mask": "mask", "category": "category_id", "id": "id", "ref_id": "ref_id",
             "ref_image": "ref_image", "ref_mask": "ref_mask"}
