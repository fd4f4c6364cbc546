"""Generation settings as one value: everything besides the inputs that changes a generated pixel.

`bgjax generate` and `bgjax eval` name their outputs by `GenerationSettings.key()` (with the inputs'
own digest), so a rerun skips exactly the finished images and never returns ones made otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

_CHUNK = 1 << 22


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model: Path) -> str:
    """sha256 over the names and contents of every file of a model directory: retraining or
    converting in place changes it even when sizes and times do not."""
    model = Path(model)
    h = hashlib.sha256()
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(model).as_posix()}\0{file_digest(path)}\0".encode())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """One generation's settings. Lambdas are as requested (None: the model's default); `size` is the
    requested working size (None: the model's resolution), `width` / `height` the requested canvas; the image
    file's format and quality are settings too (a JPEG's pixels depend on its quality)."""

    model: str  # model_fingerprint of the model directory
    sampler: str
    steps: int
    guidance: float
    lambda_cg: float | None
    lambda_pg: float | None
    style_guidance: bool
    size: int | None
    width: int | None
    height: int | None
    placement: tuple[float, float, float] | None  # of a cut-out; None: the default
    dtype: str
    prompt: str | None  # None: the method's template
    negative_prompt: str | None  # None: the unconditional pass is zeros (SDXL, `BackgroundPipeline.unconditional`)
    seed: int
    image_format: str = "png"
    quality: int = 95
    keep_product: bool = False
    edge_fill: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A digest of every field (floats by value, so 7.5 and 7.50 agree)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
