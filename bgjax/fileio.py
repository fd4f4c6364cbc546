"""File I/O every part of bgjax shares: safetensors, JSON, image files, atomic writes and the one error type
for unreadable or mismatched files. A leaf module: it imports nothing from bgjax."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# Image files: format name -> (PIL format, suffix). PNG is lossless; the quality applies to JPEG and WebP.
IMAGE_FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}
DEFAULT_QUALITY = 95


class CheckpointError(ValueError):
    """A weights or model file that cannot be read or converted; the message names the file and the key or field."""


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        # The flax framework hands back bf16 too, which numpy's cannot.
        with safe_open(str(path), framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` then rename into place, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # mkstemp would make the file 0600; opened with 0666 the umask decides, like any new file
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def check_image_format(image_format: str, quality: int) -> None:
    """ValueError unless `image_format` is one of IMAGE_FORMATS and `quality` an int from 1 to 100."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"format: expected one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality: expected an int from 1 to 100, got {quality!r}")


def save_image(image, path: Path, image_format: str = "png", quality: int = DEFAULT_QUALITY) -> None:
    """A PIL image written atomically as PNG, JPEG or WebP (IMAGE_FORMATS); `quality` for JPEG and WebP."""
    check_image_format(image_format, quality)
    name = IMAGE_FORMATS[image_format][0]
    options = {} if image_format == "png" else {"quality": quality}
    atomic_write(path, lambda tmp: image.save(tmp, format=name, **options))
