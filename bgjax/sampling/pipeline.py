"""BackgroundPipeline: a product (photo + mask, or cut-out), its category and an optional style
reference in, ad images with the product untouched out.

Three stages:

1. host (`prepare`): load and check the inputs, place a cut-out on the canvas, build the prompt,
   resize to the working resolution; c_cg = I * M, c_pg = I_ref * (1 - M_ref).
2. device (`_sample`, one jitted program): text encoder, the whole sampling loop as a `lax.scan`
   over the sampler's step index with classifier-free guidance, VAE decode to [0, 1]. The batch of
   images is sharded over all local devices; each image's noise comes from (seed, image index), or is
   the caller's `latents`.
3. host: resize back to the product's own size and paste the product through a feathered mask.

`text_to_image` is plain Stable Diffusion on the same program (the UNet alone, or with the model's
converted ControlNet), the counterpart of diffusers' StableDiffusion(ControlNet)Pipeline; arrays are
NHWC where diffusers' are NCHW.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageOps

from bgjax import model_dir
from bgjax.data.augment import binary_mask, dilate, to_float
from bgjax.data.images import load_image, load_mask
from bgjax.method.conditions import product_condition, reference_condition
from bgjax.method.config import MethodConfig
from bgjax.method.denoiser import Denoiser, load_denoiser
from bgjax.method.prompts import CategoryVocabulary, Prompt, PromptBuilder, embed_with_identifiers
from bgjax.method.store import load_method
from bgjax.models.attention import Implementation
from bgjax.models.configs import read_config_json
from bgjax.models.region import Region, RegionMode
from bgjax.models.text_encoder import load_tokenizer
from bgjax.sampling.schedulers import Sampler, make_sampler

ImageLike = Image.Image | np.ndarray | str | os.PathLike | bytes

# A cut-out is placed on a canvas of this colour (never seen by the model: CG sees only I * M,
# and the paste-back weight is 0 wherever the cut-out's alpha is 0). White is the cut-out
# convention of `bgjax.data.images.load_image`.
CANVAS_COLOUR = (255, 255, 255)
# (scale, cx, cy): the cut-out's bounding box fits in `scale` x the canvas, centred at (cx, cy)
# in fractions of the canvas width and height.
DEFAULT_PLACEMENT = (0.6, 0.5, 0.5)
# The paste-back feather of a photo's mask, as a fraction of the longer side (at least 1 px).
FEATHER_FRACTION = 0.01

_TRACES: collections.Counter = collections.Counter()


def traces() -> int:
    """How often the sampling program has been traced in this process (a retrace detector)."""
    return _TRACES["sample"]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One product's inputs, checked and at the working resolution; see `BackgroundPipeline.prepare`."""

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


@dataclasses.dataclass(frozen=True)
class Models:
    """The modules of the jitted program: a static argument, hashable by value, so pipelines loaded
    from the same model share compiled programs."""

    denoiser: Denoiser
    text_encoder: nn.Module
    vae: nn.Module


@functools.lru_cache(maxsize=32)
def _sampler(name: str, scheduler_json: str, steps: int) -> Sampler:
    # Samplers hash by identity: one object per setting keeps the jit cache warm across calls.
    return make_sampler(name, json.loads(scheduler_json), steps)


def _vae_factor(vae: nn.Module) -> int:
    """How many pixels one latent position spans along each axis."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _encode_prompts(models: Models, params: dict, prompts: dict) -> jax.Array:
    """Text-encoder hidden states (2, L, D) of the conditional and the empty prompt."""
    text = {"params": params["text_encoder"]}
    if params["identifiers"] is None:  # a base model: the placeholder stays an ordinary token
        return models.text_encoder.apply(text, prompts["input_ids"])
    table = params["text_encoder"]["text_model"]["embeddings.token_embedding"]["embedding"]
    embeds = embed_with_identifiers(table, prompts["input_ids"], prompts["identifier_index"], params["identifiers"],
                                    prompts["identifier_rows"])
    return models.text_encoder.apply(text, prompts["input_ids"], embeds)


@functools.partial(jax.jit, static_argnames=("models", "sampler"))
def _sample(models: Models, sampler: Sampler, params: dict, prompts: dict, seed: jax.Array, indices: jax.Array,
            latents: jax.Array | None, mask: jax.Array, cg_cond: jax.Array | None, pg_cond: jax.Array | None,
            guidance: jax.Array, lambda_cg: jax.Array, lambda_pg: jax.Array,
            lambda_pg_uncond: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(final latents (B, h/f, w/f, C), images (B, h, w, 3) in [0, 1]) for the images `indices` (B,) of `seed`,
    or from `latents` (B, h/f, w/f, C) instead of the seeded noise; conditions are (B, h, w, ...). The prompts'
    row 0 is the conditional, row 1 the unconditional (negative) prompt. PG's residuals are scaled by
    `lambda_pg` in the conditional pass, by `lambda_pg_uncond` in the other."""
    _TRACES["sample"] += 1  # runs only while tracing
    vae_cfg, factor = models.vae.config, _vae_factor(models.vae)
    batch, height, width = mask.shape
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(jax.random.key(seed), i)))(indices)
    init_keys, step_keys = keys[:, 0], keys[:, 1]
    shape = (height // factor, width // factor, vae_cfg.latent_channels)
    if latents is None:
        latents = jax.vmap(lambda k: jax.random.normal(k, shape))(init_keys)
    x = latents.astype(jnp.float32) * sampler.init_noise_sigma  # as diffusers' prepare_latents, given or drawn

    # Each image's conditional and unconditional rows sit next to each other ((B, 2, ...) -> (2B, ...)),
    # so the doubled batch stays on the image's device. The unconditional pass keeps the branch conditions
    # (PG's at lambda_pg_uncond: 0 with style guidance).
    def pair(a: jax.Array) -> jax.Array:
        return jnp.stack([a, a], axis=1).reshape(2 * batch, *a.shape[1:])

    def pair_prompts(a: jax.Array) -> jax.Array:  # (2, ...) cond / uncond -> (2B, ...)
        return jnp.broadcast_to(a, (batch, *a.shape)).reshape(2 * batch, *a.shape[1:])

    context = pair_prompts(_encode_prompts(models, params, prompts))
    region = Region(pair(mask), pair_prompts(prompts["fg_tokens"]), pair_prompts(prompts["bg_tokens"]))
    cg2 = None if cg_cond is None else pair(cg_cond)
    pg2 = None if pg_cond is None else pair(pg_cond)
    pg_scales = pair_prompts(jnp.stack([lambda_pg, lambda_pg_uncond])).reshape(2 * batch, 1, 1, 1)

    def step(carry, i):
        x, state = carry
        out = models.denoiser(params["denoiser"], pair(sampler.scale_model_input(x, i)), sampler.timestep(i), context,
                              region, cg2, pg2, lambda_cg, pg_scales).reshape(batch, 2, *x.shape[1:])
        eps = out[:, 1] + guidance * (out[:, 0] - out[:, 1])
        noise = None
        if sampler.name == "ddpm":
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:]))(step_keys)
        return sampler.step(state, eps, i, x, noise=noise), None

    (x, _), _ = jax.lax.scan(step, (x, sampler.init_state(x)), jnp.arange(sampler.num_inference_steps))
    images = models.vae.apply({"params": params["vae"]}, x / vae_cfg.scaling_factor + vae_cfg.shift_factor,
                              method=models.vae.decode)
    return x, (jnp.clip(images.astype(jnp.float32), -1, 1) + 1) / 2


def _uint8(images: np.ndarray) -> np.ndarray:
    return np.round(images * 255).astype(np.uint8)


def _pil(source: ImageLike, what: str) -> Image.Image | Path | bytes:
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


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _rgb(img: Image.Image) -> Image.Image:
    """The colour channels as stored (an alpha channel is dropped, not composited)."""
    return img.convert("RGBA").convert("RGB") if _has_alpha(img) else img.convert("RGB")


def _feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """1 on the mask, falling linearly to 0 over `radius` px outside it (Chebyshev distance): only outward.

    The mean of the mask dilated by 0 .. radius px: a pixel at distance d lies in radius + 1 - d of them.
    """
    total, grown = mask.astype(np.float32), mask
    for _ in range(radius):
        grown = dilate(grown, 1)
        total += grown
    return total / np.float32(radius + 1)


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
    rgb = np.where(alpha[..., None] > 0, rgba[..., :3], np.uint8(CANVAS_COLOUR))
    return rgb.astype(np.uint8), alpha


def _resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(size, resample))


def paste_back(generated: np.ndarray, prepared: Prepared) -> np.ndarray:
    """The generated image with the product's pixels blended back: out = w src + (1 - w) gen, w = 1 on the
    product (so those pixels are exactly the input's: 1 * src + 0 * gen is exact in float32)."""
    w = prepared.weight[..., None]
    out = w * prepared.source.astype(np.float32) + (1 - w) * generated.astype(np.float32)
    return np.rint(out).astype(np.uint8)


class BackgroundPipeline:
    """`BackgroundPipeline.from_pretrained(MODEL)(product=..., mask=..., category=...)` -> PIL images.

    Categories: a model with per-category identifiers knows the categories of its `method.json` and
    rejects others (the error lists them). With a shared identifier, or a base model without
    `method.json`, any category text works: it only enters the prompt's product span.
    """

    def __init__(self, model: Path, models: Models, params: dict, tokenizer, scheduler_config: dict,
                 config: MethodConfig, categories: list[str] | None, controlnet: nn.Module | None = None,
                 cg_source: str = "cg"):
        """Usually called by `from_pretrained`. `params`: {"denoiser": {"unet", "cg", "pg"}, "text_encoder",
        "vae", "identifiers": the (categories or 1, hidden) table, or None for a base model, and "controlnet"
        with `controlnet`, a plain ControlNet (a converted `controlnet/`) for `text_to_image(control_image=)`}."""
        self.model = Path(model)
        self.models, self.config, self.controlnet = models, config, controlnet
        # What sits in the CG slot: "cg" (the paper's branch) or "controlnet" (the converted ControlNet, which
        # like every diffusers ControlNet takes its image in [0, 1]).
        self.cg_source = cg_source
        # A model without learned identifiers: a category only enters the prompt as text (`warnings` says so;
        # a variant keeps its original's value, so switching identifiers off on purpose is silent).
        self.base_model = params.get("identifiers") is None and not categories
        self.scheduler_config = scheduler_config
        self.vocabulary = CategoryVocabulary(categories) if categories else None
        self.prompts = PromptBuilder(tokenizer, config, models.text_encoder.config.max_position_embeddings)
        unet_cfg = models.denoiser.unet.config
        self.vae_factor = _vae_factor(models.vae)
        # Working sizes are multiples of this, so the latents divide through the UNet's downsamplers.
        self.granularity = self.vae_factor * 2 ** (len(unet_cfg.block_out_channels) - 1)
        self.resolution = int(unet_cfg.raw.get("sample_size", 64)) * self.vae_factor
        if models.text_encoder.config.hidden_size != unet_cfg.cross_attention_dim:
            raise ValueError(f"{model}: the text encoder's hidden size {models.text_encoder.config.hidden_size} is "
                             f"not the UNet's cross_attention_dim {unet_cfg.cross_attention_dim}")
        for branch in (models.denoiser.cg, models.denoiser.pg):
            if branch is not None and 2 ** (len(branch.config.conditioning_embedding_out_channels) - 1) != \
                    self.vae_factor:
                raise ValueError(f"{model}: a branch's conditioning embedding does not downsample by the VAE's "
                                 f"factor {self.vae_factor}; its image condition could not be at image resolution")
        self.mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, dtype: jnp.dtype = jnp.float32,
                        attention: Implementation = "auto") -> BackgroundPipeline:
        """Load a bgjax model directory; `dtype` is the compute dtype and that of the (frozen) params,
        `attention` the attention kernel (`bgjax.models.attention`; "auto" chooses per backend)."""
        model = Path(model)
        denoiser, denoiser_params, config = load_denoiser(model, dtype, dtype, attention)
        text_encoder, text_params = model_dir.load_component(model, "text_encoder", dtype, dtype, attention=attention)
        vae, vae_params = model_dir.load_component(model, "vae", dtype, dtype, attention=attention)
        categories, identifiers = None, None
        if (model / "method.json").is_file():
            _, categories, identifiers = load_method(model)
        params = {"denoiser": denoiser_params, "text_encoder": text_params, "vae": vae_params,
                  "identifiers": identifiers}
        controlnet = None
        if "controlnet" in model_dir.components(model):
            controlnet, params["controlnet"] = model_dir.load_component(model, "controlnet", dtype, dtype)
        return cls(model, Models(denoiser, text_encoder, vae), params, load_tokenizer(model / "tokenizer"),
                   read_config_json(model / "scheduler" / "scheduler_config.json"), config, categories, controlnet)

    def variant(self, cg: bool = True, pg: bool = True, identifiers: bool = True,
                cg_region_mode: RegionMode | None = None,
                unet_region_mode: RegionMode | None = None, controlnet: bool = False) -> BackgroundPipeline:
        """This pipeline with parts switched off, sharing its params (nothing is reloaded): for ablations
        and the baselines of `bgjax eval`.

        - `cg=False` / `pg=False`: drop the branch (the UNet alone is plain text-to-image).
        - `identifiers=False`: no learned identifier embeddings; the placeholder stays an ordinary token and
          any category text is accepted (a base model's behaviour).
        - `cg_region_mode`: rebuild CG's cross-attention, e.g. "none" for plain cross-attention (ControlNet)
          instead of the mask-guided one, with the same weights; `unet_region_mode` the same for the UNet
          (mask-guided only when the model's `MethodConfig.mask_guided_unet` is set).
        - `controlnet=True`: the model's plain ControlNet (a converted `controlnet/`) in CG's place, given the
          product condition I * M in [0, 1] as diffusers ControlNets are trained.
        """
        d = self.models.denoiser
        cg_module = d.cg if cg else None
        params = {**self.params, "identifiers": self.params["identifiers"] if identifiers else None}
        if controlnet:
            if self.controlnet is None:
                raise ValueError(f"controlnet: {self.model} has no controlnet/")
            cg_module = self.controlnet
            params["denoiser"] = {**self.params["denoiser"], "cg": self.params["controlnet"]}
        if cg_module is not None and cg_region_mode is not None:
            cg_module = cg_module.clone(region_mode=cg_region_mode)
        unet = d.unet if unet_region_mode is None else d.unet.clone(region_mode=unet_region_mode)
        denoiser = dataclasses.replace(d, unet=unet, cg=cg_module, pg=d.pg if pg else None)
        categories = self.vocabulary.names if identifiers and self.vocabulary is not None else None
        out = type(self)(self.model, dataclasses.replace(self.models, denoiser=denoiser), params,
                         self.prompts.tokenizer, self.scheduler_config, self.config, categories, self.controlnet,
                         "controlnet" if controlnet else self.cg_source if cg else "cg")
        out.base_model = self.base_model
        return out

    @property
    def has_cg(self) -> bool:
        return self.models.denoiser.cg is not None

    @property
    def has_pg(self) -> bool:
        return self.models.denoiser.pg is not None

    def _category(self, category: str) -> tuple[str, int]:
        """(the name for the prompt, the identifier table row)."""
        if not (isinstance(category, str) and category.strip()):
            raise ValueError(f"category: must be a non-empty name, got {category!r}")
        if self.vocabulary is None or self.config.identifiers == "shared":
            return " ".join(category.split()), 0
        try:
            row = self.vocabulary.id(category)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return self.vocabulary.names[row], row

    def _check_size(self, size: int, what: str = "size") -> int:
        g = self.granularity
        if isinstance(size, bool) or not isinstance(size, int) or size < g or size % g:
            raise ValueError(f"{what}: must be a positive multiple of {g} for this model, got {size!r}")
        return size

    def _work_size(self, width: int, height: int, long_side: int) -> tuple[int, int]:
        """(width, height) with the longer side `long_side`, the aspect kept to the nearest multiple."""
        g, short = self.granularity, long_side * min(width, height) / max(width, height)
        short = max(g, round(short / g) * g)
        return (long_side, short) if width >= height else (short, long_side)

    def prepare(self, product: ImageLike, mask: ImageLike | None = None, category: str = "",
                reference: ImageLike | None = None, reference_mask: ImageLike | None = None,
                size: int | None = None, placement: Sequence[float] = DEFAULT_PLACEMENT,
                feather: int | None = None) -> Prepared:
        """Check and condition the inputs (raises ValueError naming the input and the problem).

        - `product` + `mask`: a photo and its product mask (file, PIL image, uint8 array; the mask may be an
          RGBA cut-out whose alpha marks the product, or an (H, W) array). Generated at `size` (default: the
          model's resolution) on the longer side, the aspect kept; returned at the photo's own size.
        - `product` alone, with an alpha channel: a cut-out, placed (see `place_cutout`) on a `size` x `size`
          canvas (default the model's resolution), which is also the output size.
        - `reference` + `reference_mask`, or a `reference` whose alpha marks its product: the style reference,
          resized to cover the working size (centre crop).
        - `feather`: the paste-back feather of a photo's mask in output pixels (default 1% of the longer side);
          a cut-out's own alpha is its soft edge.
        """
        name, row = self._category(category)
        side = self._check_size(self.resolution if size is None else size)
        _, image = load_image(_pil(product, "product"), "product")
        canvas = self._cutout(image, side, placement) if mask is None else self._photo(image, mask, side, feather)
        cg_cond, m = product_condition(to_float(canvas.work), (canvas.work_mask >= 128).astype(np.float32))
        pg_cond = None
        if reference is not None and not self.has_pg:
            raise ValueError("reference: this model has no PG branch (no pg/ folder), so a reference cannot change "
                             "the images; generate without one, or use a model trained with PG")
        if reference is not None:
            pg_cond = self._reference(reference, reference_mask, (canvas.work.shape[1], canvas.work.shape[0]))
        elif reference_mask is not None:
            raise ValueError("reference_mask: given without a reference")
        return Prepared(name, self.prompts(name), row, m, cg_cond, pg_cond, canvas.source, canvas.weight,
                        canvas.product, None if mask is not None else tuple(placement))

    @staticmethod
    def _cutout(image: Image.Image, side: int, placement: Sequence[float]) -> _Canvas:
        if not _has_alpha(image):
            raise ValueError("product: an image without an alpha channel needs a mask (or give an RGBA cut-out)")
        source, alpha = place_cutout(image, (side, side), placement)
        binary = alpha >= 128
        weight = np.where(binary, np.float32(1), alpha.astype(np.float32) / 255)  # the alpha is the soft edge
        view = weight[..., None] * source + (1 - weight[..., None]) * np.float32(CANVAS_COLOUR)
        return _Canvas(source, weight, np.rint(view).astype(np.uint8), source, binary.astype(np.uint8) * 255)

    def _photo(self, image: Image.Image, mask: ImageLike, side: int, feather: int | None) -> _Canvas:
        source = np.asarray(_rgb(image))
        full_mask = load_mask(_pil(mask, "mask"), source.shape[:2], "mask")
        radius = max(1, round(FEATHER_FRACTION * max(source.shape[:2]))) if feather is None else feather
        if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
            raise ValueError(f"feather: must be a non-negative number of pixels, got {feather!r}")
        size = self._work_size(source.shape[1], source.shape[0], side)
        return _Canvas(source, _feather(full_mask > 0, radius), source, _resize(source, size, Image.Resampling.LANCZOS),
                       _resize(full_mask, size, Image.Resampling.BILINEAR))

    def _reference(self, reference: ImageLike, reference_mask: ImageLike | None,
                   size: tuple[int, int]) -> np.ndarray:
        _, image = load_image(_pil(reference, "reference"), "reference")
        rgb = _rgb(image)
        if reference_mask is None and not _has_alpha(image):
            raise ValueError("reference: an image without an alpha channel needs its product mask (reference_mask), "
                             "so that its product can be removed")
        ref_mask = load_mask(image if reference_mask is None else _pil(reference_mask, "reference mask"),
                             (rgb.height, rgb.width), "reference mask")
        rgb = ImageOps.fit(rgb, size, Image.Resampling.LANCZOS)
        ref_mask = np.asarray(ImageOps.fit(Image.fromarray(ref_mask), size, Image.Resampling.BILINEAR)) >= 128
        return reference_condition(to_float(np.asarray(rgb)), ref_mask.astype(np.float32))

    def lambdas(self, prepared: Prepared, lambda_cg: float | None = None,
                lambda_pg: float | None = None) -> tuple[float | None, float | None]:
        """The branch scales a generation uses: None for a branch that does not run."""
        cg = (self.config.lambda_cg if lambda_cg is None else float(lambda_cg)) if self.has_cg else None
        run_pg = self.has_pg and prepared.pg_cond is not None
        pg = (self.config.lambda_pg if lambda_pg is None else float(lambda_pg)) if run_pg else None
        return cg, pg

    def warnings(self, prepared: Prepared, lambda_cg: float | None = None, lambda_pg: float | None = None,
                 prompt: str | None = None) -> list[str]:
        """What a generation with these settings ignores, in words (`generate` warns with them and
        `bgjax generate` records them in the sidecars)."""
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

    def generate(self, prepared: Prepared, num_images: int = 4, seed: int = 0, steps: int = 25,
                 guidance: float = 7.5, lambda_cg: float | None = None, lambda_pg: float | None = None,
                 sampler: str = "dpmpp_2m", batch_size: int | None = None,
                 style_guidance: bool = False, *, prompt: str | None = None, negative_prompt: str = "",
                 latents: np.ndarray | None = None) -> list[Image.Image]:
        """Images 0 .. num_images - 1 of `seed` for prepared inputs. Image k is the same whatever
        `num_images`, `batch_size` and the device count (up to float rounding).

        `style_guidance`: the unconditional pass of classifier-free guidance runs without PG, so
        `guidance` amplifies the reference's style along with the prompt. By default (DESIGN.md)
        that pass keeps PG too, and a strong guidance can wash a small model's style transfer out
        (the bundled model: the tone of a reference carries over only with it).

        `prompt` replaces the method's template (`{category}` becomes the category and marks the
        product span, `{identifier}` the learned identifier); `negative_prompt` is the unconditional
        pass's prompt; `latents` (num_images, h/f, w/f, C), NHWC, replace the seeded noise (as
        diffusers' `latents=`, they are scaled by the sampler's initial sigma)."""
        for note in self.warnings(prepared, lambda_cg, lambda_pg, prompt):
            warnings.warn(note, stacklevel=2)
        cg_scale, pg_scale = self.lambdas(prepared, lambda_cg, lambda_pg)
        cond = prepared.prompt if prompt is None else self.prompts.custom(_text(prompt, "prompt"), prepared.category)
        cg_cond = prepared.cg_cond if self.has_cg else None
        if cg_cond is not None and self.cg_source == "controlnet":
            cg_cond = (cg_cond + prepared.mask[..., None]) / 2  # I * M with I in [0, 1]
        _, images = self._run(
            self.models, self.params, cond, self._negative(negative_prompt), prepared.identifier_row, prepared.mask,
            cg_cond, prepared.pg_cond if pg_scale is not None else None,
            (cg_scale, pg_scale, 0.0 if style_guidance else pg_scale), num_images, seed, steps, guidance, sampler,
            batch_size, latents)
        height, width = prepared.source.shape[:2]
        return [Image.fromarray(paste_back(_resize(im, (width, height), Image.Resampling.LANCZOS)
                                           if im.shape[:2] != (height, width) else im, prepared))
                for im in map(_uint8, images)]

    def text_to_image(self, prompt: str, *, negative_prompt: str = "", latents: np.ndarray | None = None,
                      num_images: int = 1, seed: int = 0, steps: int = 25, guidance: float = 7.5,
                      sampler: str = "dpmpp_2m", width: int | None = None, height: int | None = None,
                      control_image: ImageLike | None = None, controlnet_conditioning_scale: float = 1.0,
                      output_type: str = "pil", batch_size: int | None = None):
        """Plain Stable Diffusion, as diffusers' `StableDiffusionPipeline(prompt=..., negative_prompt=...,
        latents=...)`: the UNet alone (no CG, PG or identifiers), the prompt as written.

        With `control_image` the model's plain ControlNet (a converted `controlnet/`) runs as in
        `StableDiffusionControlNetPipeline`: the image (resized to the output size) in [0, 1], its
        residuals scaled by `controlnet_conditioning_scale`. `latents` are NHWC (diffusers: NCHW).
        `output_type`: "pil" (a list of images), "np" ((N, H, W, 3) float32 in [0, 1]) or "latent"
        (the final latents, (N, h, w, C) NHWC)."""
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type: expected 'pil', 'np' or 'latent', got {output_type!r}")
        size = (self._check_size(self.resolution if width is None else width, "width"),
                self._check_size(self.resolution if height is None else height, "height"))
        d = self.models.denoiser
        unet = d.unet if d.unet.region_mode == "none" else d.unet.clone(region_mode="none")
        denoiser, branch, cond = Denoiser(unet), {"unet": self.params["denoiser"]["unet"]}, None
        if control_image is not None:
            if self.controlnet is None:
                raise ValueError(f"control_image: {self.model} has no controlnet/ (convert a "
                                 f"StableDiffusionControlNetPipeline folder to get one)")
            denoiser, branch["cg"] = Denoiser(unet, cg=self.controlnet), self.params["controlnet"]
            _, image = load_image(_pil(control_image, "control_image"), "control_image")
            rgb = _rgb(image)
            if rgb.size != size:
                rgb = rgb.resize(size, Image.Resampling.LANCZOS)  # diffusers' image processor resamples alike
            cond = np.asarray(rgb, np.float32) / 255
        models = dataclasses.replace(self.models, denoiser=denoiser)
        params = {**self.params, "denoiser": branch, "identifiers": None}
        x, images = self._run(models, params, self.prompts.encode(_text(prompt, "prompt"), None, (-1, -1)),
                              self._negative(negative_prompt), 0, np.ones(size[::-1], np.float32), cond, None,
                              (float(controlnet_conditioning_scale), 0.0, 0.0), num_images, seed, steps, guidance,
                              sampler, batch_size, latents)
        if output_type == "latent":
            return x
        return images if output_type == "np" else [Image.fromarray(_uint8(im)) for im in images]

    def _negative(self, negative_prompt: str) -> Prompt:
        # The empty negative prompt is the method's unconditional prompt (every token in both spans).
        return self.prompts.encode(_text(negative_prompt, "negative_prompt"), None, (-1, -1))

    def _run(self, models: Models, params: dict, cond: Prompt, uncond: Prompt, identifier_row: int,
             mask: np.ndarray, cg_cond: np.ndarray | None, pg_cond: np.ndarray | None,
             scales: tuple[float | None, float | None, float | None], num_images: int, seed: int, steps: int,
             guidance: float, sampler: str, batch_size: int | None,
             latents: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(final latents, images in [0, 1]) of the sampling program, in batches sharded over the devices."""
        for value, what, low in ((num_images, "num_images", 1), (seed, "seed", 0), (steps, "steps", 1)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"{what}: expected an int >= {low}, got {value!r}")
        if seed >= 2**32:
            raise ValueError(f"seed: expected an int < 2**32, got {seed}")
        batch_size = num_images if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        shape = (num_images, mask.shape[0] // self.vae_factor, mask.shape[1] // self.vae_factor,
                 self.models.vae.config.latent_channels)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != shape:
                raise ValueError(f"latents: expected NHWC shape {shape} (num_images, height / {self.vae_factor}, "
                                 f"width / {self.vae_factor}, channels), got {latents.shape}")
        sampler_obj = _sampler(sampler, json.dumps(self.scheduler_config, sort_keys=True), steps)
        prompts = {k: np.stack([getattr(cond, k), getattr(uncond, k)]) for k in ("input_ids", "fg_tokens", "bg_tokens")}
        prompts["identifier_index"] = np.array([cond.identifier_index, -1], np.int32)
        prompts["identifier_rows"] = np.array([identifier_row, 0], np.int32)
        scalars = [np.float32(v or 0.0) for v in (guidance, *scales)]

        devices, batched = self.mesh.size, NamedSharding(self.mesh, P("data"))
        xs, images = [], []
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            padded = -(-n // devices) * devices  # every device gets the same number of images; extras dropped

            def put(a: np.ndarray | None, padded: int = padded) -> jax.Array | None:
                return None if a is None else jax.device_put(np.broadcast_to(a, (padded, *a.shape)), batched)

            given = None
            if latents is not None:
                chunk = latents[start:start + n]
                given = jax.device_put(np.concatenate([chunk, np.zeros((padded - n, *shape[1:]), np.float32)]),
                                       batched)
            indices = jax.device_put(np.arange(start, start + padded, dtype=np.int32), batched)
            x, out = _sample(models, sampler_obj, params, prompts, np.uint32(seed), indices, given, put(mask),
                             put(cg_cond), put(pg_cond), *scalars)
            xs.append(np.asarray(x)[:n])
            images.append(np.asarray(out)[:n])
        return np.concatenate(xs), np.concatenate(images)

    def __call__(self, product: ImageLike, mask: ImageLike | None = None, category: str = "",
                 reference: ImageLike | None = None, reference_mask: ImageLike | None = None,
                 num_images: int = 4, seed: int = 0, steps: int = 25, guidance: float = 7.5,
                 lambda_cg: float | None = None, lambda_pg: float | None = None, sampler: str = "dpmpp_2m",
                 size: int | None = None, placement: Sequence[float] = DEFAULT_PLACEMENT,
                 feather: int | None = None, batch_size: int | None = None,
                 style_guidance: bool = False, *, prompt: str | None = None, negative_prompt: str = "",
                 latents: np.ndarray | None = None) -> list[Image.Image]:
        """`num_images` PIL images of the product on generated backgrounds; see `prepare` for the inputs
        and `generate` for the sampling arguments."""
        prepared = self.prepare(product, mask, category, reference, reference_mask, size, placement, feather)
        return self.generate(prepared, num_images, seed, steps, guidance, lambda_cg, lambda_pg, sampler, batch_size,
                             style_guidance, prompt=prompt, negative_prompt=negative_prompt, latents=latents)


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a string, got {type(value).__name__}")
    return value
