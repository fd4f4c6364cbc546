"""BackgroundPipeline: a product (photo + mask, or cut-out), its category and an optional style
reference in, ad images with the product untouched out.

Three stages:

1. host (`bgjax.sampling.host`): load and check the inputs, place them on the canvas, build the prompt,
   resize to the working size; c_cg = I * M, c_pg = I_ref * (1 - M_ref).
2. device (`bgjax.sampling.program`, one jitted program per shape): text encoder, the whole sampling loop
   as a `lax.scan` with classifier-free guidance, VAE decode to [0, 1]. The batch of images is sharded over
   all local devices; each image's noise comes from (seed, image index), or is the caller's `latents`.
3. host: resize back to the output size and paste the product through a feathered mask.

`text_to_image` is plain Stable Diffusion on the same program (the UNet alone, or with the model's
converted ControlNet), the counterpart of diffusers' StableDiffusion(ControlNet)Pipeline, and of
StableDiffusionXL(ControlNet)Pipeline on an SDXL model (one with `text_encoder_2/`); arrays are NHWC where
diffusers' are NCHW.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from bgjax import model_dir
from bgjax.data.images import load_image
from bgjax.method.config import MethodConfig
from bgjax.method.denoiser import Denoiser, load_denoiser
from bgjax.method.prompt_text import CategoryVocabulary, Prompt, PromptBuilder
from bgjax.method.store import load_identifier_tables, load_method
from bgjax.method.text import SDXL_ZEROS_FOR_EMPTY_PROMPT, zeros_for_empty_prompt
from bgjax.models.attention import Implementation
from bgjax.models.configs import read_config_json
from bgjax.models.region import RegionMode
from bgjax.models.text_encoder import load_tokenizer
from bgjax.sampling import host, program
from bgjax.sampling.host import DEFAULT_PLACEMENT, ImageLike, Inputs, Prepared
from bgjax.sampling.program import Conditions, Models, SamplingSettings

OUTPUT_TYPES = ("pil", "np")


class BackgroundPipeline:
    """`BackgroundPipeline.from_pretrained(MODEL)(product=..., mask=..., category=...)` -> PIL images.

    Categories: a model with per-category identifiers knows the categories of its `method.json` and
    rejects others (the error lists them). With a shared identifier, or a base model without
    `method.json`, any category text works: it only enters the prompt's product span.
    """

    def __init__(self, model: Path, models: Models, params: dict, tokenizer, scheduler_config: dict,
                 config: MethodConfig, categories: list[str] | None, controlnet: nn.Module | None = None,
                 cg_source: str = "cg", *, base_model: bool | None = None, tokenizer_2=None,
                 zeros_for_empty_prompt: bool = SDXL_ZEROS_FOR_EMPTY_PROMPT):
        """Usually called by `from_pretrained`. `params`: {"denoiser": {"unet", "cg", "pg"}, "text_encoder",
        "vae", "identifiers": the (categories or 1, hidden) table, or None for a base model, and "controlnet"
        with `controlnet`, a plain ControlNet (a converted `controlnet/`) for `text_to_image(control_image=)`};
        an SDXL model (`models.text_encoder_2`) adds "text_encoder_2" and "identifiers_2", and `tokenizer_2`.
        `base_model`: whether a category is only words of the prompt (default: no identifiers and no
        categories; a variant keeps its original's, so switching identifiers off on purpose is silent).
        `zeros_for_empty_prompt`: SDXL's `force_zeros_for_empty_prompt` (model_index.json's; unused for SD)."""
        self.model = Path(model)
        self.models, self.config, self.controlnet = models, config, controlnet
        self.sdxl = models.text_encoder_2 is not None
        self.zeros_for_empty_prompt = zeros_for_empty_prompt
        # What sits in the CG slot: "cg" (the paper's branch) or "controlnet" (the converted ControlNet, which
        # like every diffusers ControlNet takes its image in [0, 1]).
        self.cg_source = cg_source
        self.scheduler_config = scheduler_config
        self.vocabulary = CategoryVocabulary(categories) if categories else None
        self.prompts = PromptBuilder(tokenizer, config, models.text_encoder.config.max_position_embeddings,
                                     tokenizer_2=tokenizer_2)
        unet_cfg = models.denoiser.unet.config
        self.vae_factor = models.vae_factor
        # Working sizes are multiples of this, so the latents divide through the UNet's downsamplers.
        self.granularity = self.vae_factor * 2 ** (len(unet_cfg.block_out_channels) - 1)
        self.resolution = int(unet_cfg.raw.get("sample_size", 64)) * self.vae_factor
        hidden = sum(m.config.hidden_size for _, m in models.text_encoders.encoders)
        if hidden != unet_cfg.cross_attention_dim:
            raise ValueError(f"{model}: the text encoders' hidden size {hidden} is not the UNet's "
                             f"cross_attention_dim {unet_cfg.cross_attention_dim}")
        for branch in (models.denoiser.cg, models.denoiser.pg):
            if branch is not None and 2 ** (len(branch.config.conditioning_embedding_out_channels) - 1) != \
                    self.vae_factor:
                raise ValueError(f"{model}: a branch's conditioning embedding does not downsample by the VAE's "
                                 f"factor {self.vae_factor}; its image condition could not be at image resolution")
        if base_model is None:
            base_model = params.get("identifiers") is None and not categories
        self.inputs = Inputs(self.prompts, self.vocabulary, self.resolution, self.granularity, self.has_cg,
                             self.has_pg, base_model)
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
        params = {"denoiser": denoiser_params, "text_encoder": text_params, "vae": vae_params, "identifiers": None}
        categories, text_encoder_2, tokenizer_2 = None, None, None
        if (model / "method.json").is_file():
            _, categories, _ = load_method(model)
            params.update(load_identifier_tables(model))
        if "text_encoder_2" in model_dir.components(model):  # SDXL
            text_encoder_2, params["text_encoder_2"] = model_dir.load_component(model, "text_encoder_2", dtype, dtype,
                                                                                attention=attention)
            tokenizer_2 = load_tokenizer(model / "tokenizer_2")
        controlnet = None
        if "controlnet" in model_dir.components(model):
            controlnet, params["controlnet"] = model_dir.load_component(model, "controlnet", dtype, dtype)
        return cls(model, Models(denoiser, text_encoder, vae, text_encoder_2), params,
                   load_tokenizer(model / "tokenizer"), read_config_json(model / "scheduler" / "scheduler_config.json"),
                   config, categories, controlnet, tokenizer_2=tokenizer_2,
                   zeros_for_empty_prompt=zeros_for_empty_prompt(model))

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
        params = self.params if identifiers else {**self.params, "identifiers": None, "identifiers_2": None}
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
        return type(self)(self.model, dataclasses.replace(self.models, denoiser=denoiser), params,
                          self.prompts.tokenizer, self.scheduler_config, self.config, categories, self.controlnet,
                          "controlnet" if controlnet else self.cg_source if cg else "cg",
                          base_model=self.inputs.base_model, tokenizer_2=self.prompts.tokenizer_2,
                          zeros_for_empty_prompt=self.zeros_for_empty_prompt)

    def unconditional(self, negative_prompt: str | None) -> str | None:
        """What the unconditional pass encodes: None where it is zeros (an SDXL model whose
        `force_zeros_for_empty_prompt` holds, given no negative prompt; "" is encoded, as in diffusers), else
        the negative prompt ("" for None)."""
        if negative_prompt is None and self.sdxl and self.zeros_for_empty_prompt:
            return None
        return "" if negative_prompt is None else negative_prompt

    def _conditions(self, prompt: Prompt, negative_prompt: str | None, identifier_row: int, mask: np.ndarray,
                    cg_cond: np.ndarray | None, pg_cond: np.ndarray | None,
                    known: np.ndarray | None = None, edge_fill: bool = False) -> Conditions:
        negative = self.unconditional(negative_prompt)
        return Conditions(prompt, self.inputs.negative("" if negative is None else negative), identifier_row, mask,
                          cg_cond, pg_cond, zero_negative=negative is None, known=known, edge_fill=edge_fill)

    @property
    def has_cg(self) -> bool:
        return self.models.denoiser.cg is not None

    @property
    def has_pg(self) -> bool:
        return self.models.denoiser.pg is not None

    def prepare(self, product: ImageLike, mask: ImageLike | None = None, category: str = "",
                reference: ImageLike | None = None, reference_mask: ImageLike | None = None,
                size: int | None = None, placement: Sequence[float] = DEFAULT_PLACEMENT,
                feather: int | None = None, *, width: int | None = None, height: int | None = None) -> Prepared:
        """Check and condition the inputs: `host.Inputs.prepare` (raises ValueError naming the input)."""
        return self.inputs.prepare(product, mask, category, reference, reference_mask, size, placement, feather,
                                   width=width, height=height)

    def lambdas(self, prepared: Prepared, lambda_cg: float | None = None,
                lambda_pg: float | None = None) -> tuple[float | None, float | None]:
        """The branch scales a generation uses: None for a branch that does not run."""
        return self.inputs.lambdas(prepared, lambda_cg, lambda_pg)

    def warnings(self, prepared: Prepared, lambda_cg: float | None = None, lambda_pg: float | None = None,
                 prompt: str | None = None) -> list[str]:
        """What a generation with these settings ignores, in words (`host.Inputs.warnings`)."""
        return self.inputs.warnings(prepared, lambda_cg, lambda_pg, prompt)

    def generate(self, prepared: Prepared, num_images: int = 4, seed: int = 0, steps: int = 25,
                 guidance: float = 7.5, lambda_cg: float | None = None, lambda_pg: float | None = None,
                 sampler: str = "dpmpp_2m", batch_size: int | None = None,
                 style_guidance: bool = False, *, prompt: str | None = None, negative_prompt: str | None = None,
                 latents: np.ndarray | None = None, output_type: str = "pil",
                 keep_product: bool = False, edge_fill: bool = False) -> list[Image.Image] | np.ndarray:
        """Images 0 .. num_images - 1 of `seed` for prepared inputs. Image k is the same whatever
        `num_images`, `batch_size` and the device count (up to float rounding).

        `style_guidance`: the unconditional pass of classifier-free guidance runs without PG, so
        `guidance` amplifies the reference's style along with the prompt. By default (DESIGN.md)
        that pass keeps PG too, and a strong guidance can wash a small model's style transfer out
        (the bundled model: the tone of a reference carries over only with it).

        `prompt` replaces the method's template (`{category}` becomes the category and marks the
        product span, `{identifier}` the learned identifier); `negative_prompt` is the unconditional
        pass's prompt (None: the empty one, or zeros on SDXL as diffusers, see `unconditional`); `latents`
        (num_images, h/f, w/f, C), NHWC, replace the seeded noise (as diffusers' `latents=`, they are scaled by
        the sampler's initial sigma). `output_type`: "pil" (a list
        of images) or "np" ((N, H, W, 3) float32 in [0, 1], the product pasted back, before rounding).

        `keep_product`: the latent cells the product covers whole hold the VAE's encoding of the product
        after every step (noised to the next timestep), as diffusers' inpainting pipelines keep the known
        region with a 4-channel UNet, instead of the UNet's own drawing of it: the latents at the product's
        edge then continue the real product, and fewer colours ring it after the paste-back (the bundled
        model's halo: `bgjax demo`). Off by default, as in diffusers' ControlNet pipeline.

        `edge_fill`: before decoding, the latent cells holding any of the product and their four neighbours are
        refilled from the background around them (`edge_fill.refill_edge`), so the decoder does not spread the
        product's colour into the background beside it; the product is pasted back over its own pixels. The
        background within about two latent cells of the product is then a smooth continuation (no contact
        shadow). Off by default; the bundled model's demo uses it (a small VAE's 4 x 4 pixel cells)."""
        _check_output_type(output_type)
        for note in self.warnings(prepared, lambda_cg, lambda_pg, prompt):
            warnings.warn(note, stacklevel=2)
        cg_scale, pg_scale = self.lambdas(prepared, lambda_cg, lambda_pg)
        cg_cond = prepared.cg_cond if self.has_cg else None
        if cg_cond is not None and self.cg_source == "controlnet":
            cg_cond = (cg_cond + prepared.mask[..., None]) / 2  # I * M with I in [0, 1]
        conditions = self._conditions(self.inputs.prompt(prepared, prompt), negative_prompt, prepared.identifier_row,
                                      prepared.mask, cg_cond, prepared.pg_cond if pg_scale is not None else None,
                                      prepared.cg_cond if keep_product else None, edge_fill)
        settings = SamplingSettings(sampler, steps, guidance, cg_scale, pg_scale, 0.0 if style_guidance else None)
        _, images = program.run(self.models, self.params, self.mesh, self.scheduler_config, settings, conditions,
                                num_images, seed, batch_size, latents)
        return _output(host.paste_back(images, prepared), output_type)

    def text_to_image(self, prompt: str, *, negative_prompt: str | None = None, latents: np.ndarray | None = None,
                      num_images: int = 1, seed: int = 0, steps: int = 25, guidance: float = 7.5,
                      sampler: str = "dpmpp_2m", width: int | None = None, height: int | None = None,
                      control_image: ImageLike | None = None, controlnet_conditioning_scale: float = 1.0,
                      output_type: str = "pil", batch_size: int | None = None):
        """Plain Stable Diffusion, as diffusers' `StableDiffusionPipeline(prompt=..., negative_prompt=...,
        latents=...)` (`StableDiffusionXLPipeline` on an SDXL model, its added time ids from the output size and
        no crop): the UNet alone (no CG, PG or identifiers), the prompt as written.

        With `control_image` the model's plain ControlNet (a converted `controlnet/`) runs as in
        `StableDiffusion(XL)ControlNetPipeline`: the image (resized to the output size) in [0, 1], its
        residuals scaled by `controlnet_conditioning_scale`. `latents` are NHWC (diffusers: NCHW).
        `output_type`: "pil" (a list of images), "np" ((N, H, W, 3) float32 in [0, 1]) or "latent"
        (the final latents, (N, h, w, C) NHWC)."""
        if output_type != "latent":
            _check_output_type(output_type)
        size = self.inputs.canvas(width, height)
        d = self.models.denoiser
        unet = d.unet if d.unet.region_mode == "none" else d.unet.clone(region_mode="none")
        denoiser, branch, cond = Denoiser(unet), {"unet": self.params["denoiser"]["unet"]}, None
        if control_image is not None:
            if self.controlnet is None:
                raise ValueError(f"control_image: {self.model} has no controlnet/ (convert a "
                                 f"StableDiffusionControlNetPipeline folder to get one)")
            denoiser, branch["cg"] = Denoiser(unet, cg=self.controlnet), self.params["controlnet"]
            _, image = load_image(host.as_pil(control_image, "control_image"), "control_image")
            colour = host.rgb(image)
            if colour.size != size:
                colour = colour.resize(size, Image.Resampling.LANCZOS)  # diffusers' image processor resamples alike
            cond = np.asarray(colour, np.float32) / 255
        models = dataclasses.replace(self.models, denoiser=denoiser)
        params = {**self.params, "denoiser": branch, "identifiers": None, "identifiers_2": None}
        conditions = self._conditions(self.inputs.plain(prompt), negative_prompt, 0, np.ones(size[::-1], np.float32),
                                      cond, None)
        settings = SamplingSettings(sampler, steps, guidance, float(controlnet_conditioning_scale))
        x, images = program.run(models, params, self.mesh, self.scheduler_config, settings, conditions, num_images,
                                seed, batch_size, latents)
        return x if output_type == "latent" else _output(images, output_type)

    def __call__(self, product: ImageLike, mask: ImageLike | None = None, category: str = "",
                 reference: ImageLike | None = None, reference_mask: ImageLike | None = None,
                 num_images: int = 4, seed: int = 0, steps: int = 25, guidance: float = 7.5,
                 lambda_cg: float | None = None, lambda_pg: float | None = None, sampler: str = "dpmpp_2m",
                 size: int | None = None, placement: Sequence[float] = DEFAULT_PLACEMENT,
                 feather: int | None = None, batch_size: int | None = None,
                 style_guidance: bool = False, *, prompt: str | None = None, negative_prompt: str | None = None,
                 latents: np.ndarray | None = None, width: int | None = None, height: int | None = None,
                 output_type: str = "pil", keep_product: bool = False,
                 edge_fill: bool = False) -> list[Image.Image] | np.ndarray:
        """`num_images` images of the product on generated backgrounds; see `prepare` (`host.Inputs.prepare`)
        for the inputs and the canvas (`size`, or `width` x `height`) and `generate` for the sampling
        arguments."""
        prepared = self.prepare(product, mask, category, reference, reference_mask, size, placement, feather,
                                width=width, height=height)
        return self.generate(prepared, num_images, seed, steps, guidance, lambda_cg, lambda_pg, sampler, batch_size,
                             style_guidance, prompt=prompt, negative_prompt=negative_prompt, latents=latents,
                             output_type=output_type, keep_product=keep_product, edge_fill=edge_fill)


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type: expected one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")


def _output(images: np.ndarray, output_type: str) -> list[Image.Image] | np.ndarray:
    """(N, H, W, 3) images in [0, 1] as `output_type` says."""
    return images if output_type == "np" else [Image.fromarray(im) for im in host.to_uint8(images)]
