"""The host side of generation: inputs read and checked, placed on the canvas and conditioned (c_cg = I * M,
c_pg = I_ref * (1 - M_ref)); afterwards the product pasted back through a feathered mask, and files written.

NumPy, PIL and OpenCV only, no JAX: `BackgroundPipeline` and the PyTorch pipeline (`bgjax.torch_compat`)
prepare and finish their images here, so both treat the same inputs alike.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageOps

from bgjax.data.augment import binary_mask, to_float
from bgjax.data.images import load_image, load_mask
from bgjax.method.conditions import product_condition, reference_condition
from bgjax.method.prompt_text import CategoryVocabulary, Prompt, PromptBuilder

ImageLike = Image.Image | np.ndarray | str | os.PathLike | bytes

# A cut-out (or a photo smaller than its canvas) is placed on a canvas of this colour, never seen by the
# model (CG sees only I * M) nor pasted back (the paste-back weight is 0 there). White is the cut-out
# convention of `bgjax.data.images.load_image`.
CANVAS_COLOUR = (255, 255, 255)
# (scale, cx, cy): the cut-out's bounding box fits in `scale` x the canvas, centred at (cx, cy)
# in fractions of the canvas width and height.
DEFAULT_PLACEMENT = (0.6, 0.5, 0.5)
# The paste-back feather of a photo's mask, as a fraction of the longer side (at least 1 px).
FEATHER_FRACTION = 0.01
# edge_fill's stencil (`bgjax.sampling.edge_fill`, and the PyTorch pipeline's): the fill's eight neighbours
# (dy, dx), and how strongly it follows the background's orientation: a neighbour across the pattern weighs
# e^(-EDGE_FILL_ANISOTROPY * coherence) of one along it. 60 continues the bundled model's stripes past the product
# (an isotropic fill blurs them out near it and 3 of 16 desk-lamp backgrounds lose their style; 8 changes nothing).
EDGE_FILL_NEIGHBOURS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1))
EDGE_FILL_ANISOTROPY = 60.0


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One product's inputs, checked and at the working resolution; see `Inputs.prepare`."""

    category: str  # as it enters the prompt (the vocabulary's spelling when the model has one)
    prompt: Prompt
    identifier_row: int
    mask: np.ndarray  # (h, w) float32 M at the working resolution
    cg_cond: np.ndarray  # (h, w, 3) float32 I * M in [-1, 1]
    pg_cond: np.ndarray | None  # (h, w, 3) float32 I_ref * (1 - M_ref), None without a reference
    source: np.ndarray  # (H, W, 3) uint8: the pixels pasted back, at the output size
    weight: np.ndarray  # (H, W) float32 paste-back weight: exactly 1 on the product
    product: np.ndarray  # (H, W, 3) uint8: the product as a person sees it (photo, or cut-out on the canvas)
    placement: tuple[float, float, float] | None  # for a cut-out


class _Canvas(NamedTuple):
    source: np.ndarray  # (H, W, 3) uint8 at the output size
    weight: np.ndarray  # (H, W) float32 paste-back weight
    product: np.ndarray  # (H, W, 3) uint8 as a person sees it
    work: np.ndarray  # (h, w, 3) uint8 at the working size
    work_mask: np.ndarray  # (h, w) uint8, >= 128 on the product


def as_pil(source: ImageLike, what: str) -> Image.Image | Path | bytes:
    """A source `load_image` / `load_mask` read: a path, encoded bytes, or a PIL image (arrays become one)."""
    if isinstance(source, str | os.PathLike):
        return Path(source)
    if isinstance(source, bytes | Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.ndim == 3 and source.shape[-1] in (3, 4) and source.dtype == np.uint8:
            return Image.fromarray(source)
        if source.ndim == 2 or (source.ndim == 3 and source.shape[-1] == 1):  # a mask: bool, 0/1, 0/255 or [0, 1]
            return Image.fromarray(binary_mask(source).astype(np.uint8) * 255, "L")
        raise ValueError(f"{what}: expected a uint8 (H, W, 3) or (H, W, 4) array or an (H, W) mask, "
                         f"got {source.dtype} {source.shape}")
    raise TypeError(f"{what}: expected a PIL image, a numpy array or a path, got {type(source).__name__}")


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def rgb(img: Image.Image) -> Image.Image:
    """The colour channels as stored (an alpha channel is dropped, not composited)."""
    return img.convert("RGBA").convert("RGB") if has_alpha(img) else img.convert("RGB")


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """1 on the mask, falling linearly to 0 over `radius` px outside it: (radius + 1 - d) / (radius + 1) at
    Chebyshev distance d from the mask, 0 beyond `radius`; only outward.

    One exact Chebyshev distance transform: the same values as averaging the mask dilated by 0 .. radius px
    (a pixel at distance d lies in radius + 1 - d of them), without a dilation per pixel of radius.
    """
    mask = np.asarray(mask, bool)
    outside = np.where(mask, 0, 255).astype(np.uint8)
    distance = cv2.distanceTransform(outside, cv2.DIST_C, 3)  # to the nearest mask pixel; 0 on the mask
    return np.maximum(np.float32(radius + 1) - distance, 0).astype(np.float32) / np.float32(radius + 1)


def place_cutout(cutout: Image.Image, canvas: tuple[int, int],
                 placement: Sequence[float] = DEFAULT_PLACEMENT) -> tuple[np.ndarray, np.ndarray]:
    """(rgb (H, W, 3) uint8, alpha (H, W) uint8) of an RGBA cut-out placed on a (width, height) canvas.

    The cut-out is cropped to its alpha's bounding box, resized (aspect kept, premultiplied so transparent
    pixels do not bleed into the edge) to fit in `scale` x the canvas and centred at (cx, cy) x the canvas
    size; parts outside the canvas are cut off. Where alpha is 0 the colour is CANVAS_COLOUR.
    """
    scale, cx, cy = placement
    if not (0 < scale <= 1 and 0 <= cx <= 1 and 0 <= cy <= 1):
        raise ValueError(f"placement: expected (scale, cx, cy) with 0 < scale <= 1 and centres in [0, 1], "
                         f"got {tuple(placement)}")
    cutout = cutout.convert("RGBA")
    box = cutout.getchannel("A").getbbox()
    if box is None:
        raise ValueError("product: the cut-out's alpha channel is empty (no product pixels)")
    cutout = cutout.crop(box)
    width, height = canvas
    factor = scale * min(width / cutout.width, height / cutout.height)
    size = (max(1, round(cutout.width * factor)), max(1, round(cutout.height * factor)))
    cutout = cutout.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    layer = Image.new("RGBA", canvas, (*CANVAS_COLOUR, 0))
    layer.paste(cutout, (round(cx * width - size[0] / 2), round(cy * height - size[1] / 2)))
    rgba = np.asarray(layer)
    alpha = rgba[..., 3]
    colour = np.where(alpha[..., None] > 0, rgba[..., :3], np.uint8(CANVAS_COLOUR))
    return colour.astype(np.uint8), alpha


def place_photo(photo: np.ndarray, mask: np.ndarray, canvas: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb (H, W, 3) uint8, mask (H, W) uint8, inside (H, W) bool) of a photo fitted into a (width, height)
    canvas: resized with its aspect kept to touch the canvas's nearer sides, centred; the rest of the canvas
    is CANVAS_COLOUR and background to generate (`inside` marks the photo's pixels)."""
    width, height = canvas
    factor = min(width / photo.shape[1], height / photo.shape[0])
    size = (max(1, min(width, round(photo.shape[1] * factor))), max(1, min(height, round(photo.shape[0] * factor))))
    x0, y0 = (width - size[0]) // 2, (height - size[1]) // 2
    colour = np.full((height, width, 3), CANVAS_COLOUR, np.uint8)
    placed = np.zeros((height, width), np.uint8)
    inside = np.zeros((height, width), bool)
    colour[y0:y0 + size[1], x0:x0 + size[0]] = resize(photo, size, Image.Resampling.LANCZOS)
    placed[y0:y0 + size[1], x0:x0 + size[0]] = resize(mask, size, Image.Resampling.BILINEAR)
    inside[y0:y0 + size[1], x0:x0 + size[0]] = True
    return colour, placed, inside


def resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """A uint8 (H, W) or (H, W, 3) array, or a float32 (H, W, C) one channel by channel, at (width, height)."""
    if array.dtype == np.uint8:
        return np.asarray(Image.fromarray(array).resize(size, resample))
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(array[..., c]), "F").resize(size, resample))
                     for c in range(array.shape[-1])], axis=-1)


def paste_back(generated: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Images (N, h, w, 3) in [0, 1] at the working size -> (N, H, W, 3) float32 in [0, 1] at the output size,
    the product's pixels blended back: out = w src + (1 - w) gen, w = 1 on the product (so those pixels are
    exactly the input's: `to_uint8` gives them back bit for bit)."""
    height, width = prepared.source.shape[:2]
    source = prepared.source.astype(np.float32)
    source *= np.float32(1 / 255)
    keep = (1 - prepared.weight)[..., None]
    out = np.empty((len(generated), height, width, 3), np.float32)
    for k, image in enumerate(np.asarray(generated, np.float32)):
        if image.shape[:2] != (height, width):
            image = np.clip(resize(image, (width, height), Image.Resampling.LANCZOS), 0, 1)
        # src + (1 - w) (gen - src), in place: a 6000 x 4000 photo's temporaries are 290 MB each
        np.subtract(image, source, out=out[k])
        out[k] *= keep
        out[k] += source
    return out


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded."""
    return np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a string, got {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class Inputs:
    """How a model takes its inputs: the prompts it builds, the categories it knows, its working sizes and
    its branches. Categories: a model with per-category identifiers knows its vocabulary's and rejects
    others (the error lists them); with a shared identifier or none, any category text works (it only
    enters the prompt's product span)."""

    prompts: PromptBuilder
    vocabulary: CategoryVocabulary | None
    resolution: int  # the default working size (square), pixels
    granularity: int  # working sizes are multiples of this: the latents divide through the UNet's downsamplers
    has_cg: bool
    has_pg: bool
    base_model: bool  # no learned identifiers: `warnings` says that a category is only words of the prompt

    def category(self, category: str) -> tuple[str, int]:
        """(the name for the prompt, the identifier table row)."""
        if not (isinstance(category, str) and category.strip()):
            raise ValueError(f"category: must be a non-empty name, got {category!r}")
        if self.vocabulary is None or self.prompts.config.identifiers == "shared":
            return " ".join(category.split()), 0
        try:
            row = self.vocabulary.id(category)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return self.vocabulary.names[row], row

    def check_size(self, size: int, what: str = "size") -> int:
        g = self.granularity
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < g or size % g:
            raise ValueError(f"{what}: must be a positive multiple of {g} for this model, got {size!r}")
        return int(size)

    def canvas(self, width: int | None, height: int | None) -> tuple[int, int]:
        """(width, height) of an explicit canvas; a side not given is the model's resolution."""
        return (self.check_size(self.resolution if width is None else width, "width"),
                self.check_size(self.resolution if height is None else height, "height"))

    def work_size(self, width: int, height: int, long_side: int) -> tuple[int, int]:
        """(width, height) with the longer side `long_side`, the aspect kept to the nearest multiple."""
        g, short = self.granularity, long_side * min(width, height) / max(width, height)
        short = max(g, round(short / g) * g)
        return (long_side, short) if width >= height else (short, long_side)

    def prepare(self, product: ImageLike, mask: ImageLike | None = None, category: str = "",
                reference: ImageLike | None = None, reference_mask: ImageLike | None = None,
                size: int | None = None, placement: Sequence[float] = DEFAULT_PLACEMENT,
                feather_px: int | None = None, *, width: int | None = None,
                height: int | None = None) -> Prepared:
        """Check and condition the inputs (raises ValueError naming the input and the problem).

        - `product` + `mask`: a photo and its product mask (file, PIL image, uint8 array; the mask may be an
          RGBA cut-out whose alpha marks the product, or an (H, W) array). Without `width` / `height`:
          generated at `size` (default: the model's resolution) on the longer side, the aspect kept, and
          returned at the photo's own size. With them: fitted into a `width` x `height` canvas (aspect kept,
          centred; the rest of the canvas is generated background), returned at the canvas size.
        - `product` alone, with an alpha channel: a cut-out, placed (see `place_cutout`) on a `width` x
          `height` canvas (default `size` x `size`, or the model's resolution), which is the output size.
        - `reference` + `reference_mask`, or a `reference` whose alpha marks its product: the style reference,
          resized to cover the working size (centre crop).
        - `feather_px`: the paste-back feather of a photo's mask in output pixels (default 1% of the longer
          side); a cut-out's own alpha is its soft edge.
        Sizes are multiples of `granularity`; `size` and `width` / `height` exclude each other.
        """
        name, row = self.category(category)
        if size is not None and (width is not None or height is not None):
            raise ValueError("size: give either size (the longer side) or width / height, not both")
        side = self.check_size(self.resolution if size is None else size)
        if width is not None or height is not None:
            canvas = self.canvas(width, height)
        else:  # a cut-out's square canvas; a photo keeps its aspect on `side`
            canvas = (side, side) if mask is None else None
        _, image = load_image(as_pil(product, "product"), "product")
        if mask is None:
            if feather_px is not None:
                raise ValueError("feather: applies to a photo's mask; a cut-out's alpha is its own soft edge")
            placed = self._cutout(image, canvas, placement)
        else:
            placed = self._photo(image, mask, canvas, side, feather_px)
        cg_cond, m = product_condition(to_float(placed.work), (placed.work_mask >= 128).astype(np.float32))
        pg_cond = None
        if reference is not None and not self.has_pg:
            raise ValueError("reference: this model has no PG branch (no pg/ folder), so a reference cannot change "
                             "the images; generate without one, or use a model trained with PG")
        if reference is not None:
            pg_cond = self._reference(reference, reference_mask, (placed.work.shape[1], placed.work.shape[0]))
        elif reference_mask is not None:
            raise ValueError("reference_mask: given without a reference")
        return Prepared(name, self.prompts(name), row, m, cg_cond, pg_cond, placed.source, placed.weight,
                        placed.product, None if mask is not None else tuple(placement))

    @staticmethod
    def _cutout(image: Image.Image, canvas: tuple[int, int], placement: Sequence[float]) -> _Canvas:
        if not has_alpha(image):
            raise ValueError("product: an image without an alpha channel needs a mask (or give an RGBA cut-out)")
        source, alpha = place_cutout(image, canvas, placement)
        binary = alpha >= 128
        weight = np.where(binary, np.float32(1), alpha.astype(np.float32) / 255)  # the alpha is the soft edge
        view = weight[..., None] * source + (1 - weight[..., None]) * np.float32(CANVAS_COLOUR)
        return _Canvas(source, weight, np.rint(view).astype(np.uint8), source, binary.astype(np.uint8) * 255)

    def _photo(self, image: Image.Image, mask: ImageLike, canvas: tuple[int, int] | None, long_side: int,
               feather_px: int | None) -> _Canvas:
        source = np.asarray(rgb(image))
        full_mask = load_mask(as_pil(mask, "mask"), source.shape[:2], "mask")
        out_shape = source.shape[:2] if canvas is None else canvas[::-1]
        radius = max(1, round(FEATHER_FRACTION * max(out_shape))) if feather_px is None else feather_px
        if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
            raise ValueError(f"feather: must be a non-negative number of pixels, got {feather_px!r}")
        if canvas is None:
            size = self.work_size(source.shape[1], source.shape[0], long_side)
            work = resize(source, size, Image.Resampling.LANCZOS)
            return _Canvas(source, feather(full_mask > 0, radius), source, work,
                           resize(full_mask, size, Image.Resampling.BILINEAR))
        placed, placed_mask, inside = place_photo(source, full_mask, canvas)
        weight = feather(placed_mask >= 128, radius) * inside  # never the canvas colour outside the photo
        return _Canvas(placed, weight, placed, placed, placed_mask)

    @staticmethod
    def _reference(reference: ImageLike, reference_mask: ImageLike | None, size: tuple[int, int]) -> np.ndarray:
        _, image = load_image(as_pil(reference, "reference"), "reference")
        colour = rgb(image)
        if reference_mask is None and not has_alpha(image):
            raise ValueError("reference: an image without an alpha channel needs its product mask (reference_mask), "
                             "so that its product can be removed")
        ref_mask = load_mask(image if reference_mask is None else as_pil(reference_mask, "reference mask"),
                             (colour.height, colour.width), "reference mask")
        colour = ImageOps.fit(colour, size, Image.Resampling.LANCZOS)
        ref_mask = np.asarray(ImageOps.fit(Image.fromarray(ref_mask), size, Image.Resampling.BILINEAR)) >= 128
        return reference_condition(to_float(np.asarray(colour)), ref_mask.astype(np.float32))

    def lambdas(self, prepared: Prepared, lambda_cg: float | None, lambda_pg: float | None
                ) -> tuple[float | None, float | None]:
        """The branch scales a generation uses: None for a branch that does not run."""
        config = self.prompts.config
        cg = (config.lambda_cg if lambda_cg is None else float(lambda_cg)) if self.has_cg else None
        run_pg = self.has_pg and prepared.pg_cond is not None
        pg = (config.lambda_pg if lambda_pg is None else float(lambda_pg)) if run_pg else None
        return cg, pg

    def warnings(self, prepared: Prepared, lambda_cg: float | None = None, lambda_pg: float | None = None,
                 prompt: str | None = None) -> list[str]:
        """What a generation with these settings ignores, in words (the pipelines warn with them and
        `bgjax generate` / `bgjax eval` record them in the sidecars)."""
        notes = []
        if lambda_cg is not None and not self.has_cg:
            notes.append(f"lambda_cg={lambda_cg}: ignored, the model has no CG branch")
        if lambda_pg is not None and prepared.pg_cond is None:
            notes.append(f"lambda_pg={lambda_pg}: ignored, PG runs only with a reference and none was given")
        if self.base_model and prompt is None:
            notes.append(f"category {prepared.category!r}: the model has no learned identifiers; the category only "
                         f"enters the prompt as text")
        if prompt is not None and "{category}" not in prompt:
            notes.append(f"category {prepared.category!r}: not in the prompt (it has no {{category}}), so it does "
                         f"not reach the model")
        return notes

    def prompt(self, prepared: Prepared, prompt: str | None) -> Prompt:
        """The conditional prompt: the method's, or the caller's template (`PromptBuilder.custom`)."""
        return prepared.prompt if prompt is None else self.prompts.custom(_text(prompt, "prompt"), prepared.category)

    def negative(self, negative_prompt: str) -> Prompt:
        """The unconditional pass's prompt; the empty one is the method's (every token in both spans)."""
        return self.prompts.encode(_text(negative_prompt, "negative_prompt"), None, (-1, -1))

    def plain(self, prompt: str) -> Prompt:
        """A prompt as written, every token in both spans (plain text-to-image)."""
        return self.prompts.encode(_text(prompt, "prompt"), None, (-1, -1))
