"""Serve an exported bgjax model in PyTorch with diffusers: `BackgroundTorchPipeline`, and the attention
processors of the paper's branches that it installs.

Import this where PyTorch and diffusers are installed; it needs no JAX (bgjax never imports it itself).

    from diffusers import DPMSolverMultistepScheduler
    from bgjax.torch_compat import BackgroundTorchPipeline
    pipe = BackgroundTorchPipeline.from_pretrained("exported")          # the folder `bgjax export` wrote
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)   # bgjax's dpmpp_2m
    images = pipe("kettle.jpg", "kettle_mask.png", "rice cooker", num_images_per_prompt=4).images

`DiffusionPipeline.from_pretrained("exported", trust_remote_code=True)` loads the same class: the export's
model_index.json names it as diffusers names custom pipelines, ["bgjax_pipeline", "BackgroundTorchPipeline"],
beside a two-line `bgjax_pipeline.py` that imports it from here. Tensors are diffusers' NCHW (bgjax: NHWC).
The identifiers are diffusers textual-inversion files, one token per file (SDXL's hold `clip_l` and `clip_g`,
loaded into each encoder as diffusers documents); SDXL models take `added_cond_kwargs={"text_embeds": ...,
"time_ids": ...}` in `BackgroundDenoiser` as diffusers' UNet does (the pipeline itself is SD-1.x/2.x only).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from bgjax.method.config import MethodConfig
from bgjax.method.prompt_text import CategoryVocabulary, Prompt, PromptBuilder
from bgjax.method.store import IDENTIFIERS_DIR, TORCH_PIPELINE, TORCH_PIPELINE_LOADER, identifier_tokens
from bgjax.models.area import area_resize_matrix
from bgjax.sampling.host import (
    DEFAULT_PLACEMENT,
    EDGE_FILL_ANISOTROPY,
    EDGE_FILL_NEIGHBOURS,
    ImageLike,
    Inputs,
    paste_back,
    to_uint8,
)


def region_weight(region: dict, tokens: int) -> torch.Tensor:
    """M_r for an attention layer with `tokens` queries: (B, tokens, 1)."""
    mask, (h0, w0) = region["mask"], region["latent_hw"]
    scale = math.isqrt(h0 * w0 // tokens)
    h, w = h0 // scale, w0 // scale
    rows = torch.from_numpy(area_resize_matrix(mask.shape[1], h)).to(mask.device)
    cols = torch.from_numpy(area_resize_matrix(mask.shape[2], w)).to(mask.device)
    return torch.einsum("ih,bhw,jw->bij", rows, mask.float(), cols).reshape(mask.shape[0], h * w, 1)


class _CrossAttention:
    """Shared projections; subclasses say what happens to the attention values."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 region: dict | None = None, **kwargs):
        if region is None or encoder_hidden_states is None:
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        d = q.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        m_r = region_weight(region, n).to(q.dtype)  # (B, N, 1)
        y = self.attend(q, k, v, region, m_r[:, None])  # (B, heads, N, d)
        y = attn.to_out[1](attn.to_out[0](y.transpose(1, 2).reshape(b, n, attn.heads * d)))
        return self.after_projection(y, m_r)

    def attend(self, q, k, v, region, m_r):
        return F.scaled_dot_product_attention(q, k, v)

    def after_projection(self, y, m_r):
        return y


class MaskGuidedAttnProcessor(_CrossAttention):
    """CG: y = M_r softmax(QK^T/sqrt(d) + log m_fg) V + (1 - M_r) softmax(QK^T/sqrt(d) + log m_bg) V."""

    def attend(self, q, k, v, region, m_r):
        def masked(tokens):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=(tokens > 0)[:, None, None, :])

        return m_r * masked(region["fg_tokens"]) + (1 - m_r) * masked(region["bg_tokens"])


class MaskedOutputAttnProcessor(_CrossAttention):
    """PG: each cross-attention output is zeroed at the target's product positions."""

    def after_projection(self, y, m_r):
        return y * (1 - m_r)


def install(model: torch.nn.Module, processor: _CrossAttention) -> None:
    """`processor` on every attention layer of a UNet or ControlNet; self-attention passes through."""
    model.set_attn_processor(processor)


def refill_edge(x: torch.Tensor, mask: torch.Tensor, factor: int) -> torch.Tensor:
    """bgjax's edge_fill (`bgjax.sampling.edge_fill.refill_edge`) on NCHW latents `x` (N, C, h, w) and the
    product's mask (H, W): the cells holding any product pixel and their four neighbours refilled from the others,
    each the structure-tensor-weighted mean of its eight neighbours (Jacobi, 2 max(h, w)^2 iterations)."""
    cells = F.max_pool2d((mask > 0).float()[None, None], factor)[0, 0] > 0
    p = F.pad(cells, (1, 1, 1, 1))
    known = ~(cells | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:])
    if not known.any():
        return x
    x = x.float()
    gy = (x[:, :, 2:, 1:-1] - x[:, :, :-2, 1:-1]) / 2
    gx = (x[:, :, 1:-1, 2:] - x[:, :, 1:-1, :-2]) / 2
    inner = known[1:-1, 1:-1] & known[:-2, 1:-1] & known[2:, 1:-1] & known[1:-1, :-2] & known[1:-1, 2:]
    jxx, jyy, jxy = ((a * b * inner).sum(dim=(1, 2, 3)) for a, b in ((gx, gx), (gy, gy), (gx, gy)))
    theta = 0.5 * torch.atan2(2 * jxy, jxx - jyy)
    coherence = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / torch.clamp(jxx + jyy, min=1e-12)
    d = torch.tensor(EDGE_FILL_NEIGHBOURS, dtype=torch.float32, device=x.device)
    length = d.norm(dim=1)
    across = (d[:, 0] * torch.sin(theta)[:, None] + d[:, 1] * torch.cos(theta)[:, None]) / length
    weights = torch.exp(-EDGE_FILL_ANISOTROPY * coherence[:, None] * across ** 2) / length
    weights = (weights / weights.sum(dim=1, keepdim=True))[:, :, None, None, None]
    height, width = known.shape
    z = torch.where(known, x, x[:, :, known].mean(-1)[..., None, None])
    for _ in range(2 * max(height, width) ** 2):
        p = F.pad(z, (1, 1, 1, 1), mode="replicate")
        shifted = torch.stack([p[:, :, 1 + dy: 1 + dy + height, 1 + dx: 1 + dx + width]
                               for dy, dx in EDGE_FILL_NEIGHBOURS], 1)
        z = torch.where(known, x, (weights * shifted).sum(dim=1))
    return z


def _background_only(residual: torch.Tensor, region: dict) -> torch.Tensor:
    b, _, h, w = residual.shape
    return residual * (1 - region_weight(region, h * w).reshape(b, 1, h, w).to(residual.dtype))


class BackgroundDenoiser(torch.nn.Module):
    """The UNet with the CG and PG branches, as bgjax's `Denoiser` computes it: one noise prediction.

    `denoiser(latents, t, text_embeddings, product_mask, fg_tokens, bg_tokens, cg_cond=..., pg_cond=...)`:
    masks (B, H, W) at any resolution (usually the image's), token sets (B, L) with 1 on the tokens of
    P_fg / P_bg; `lambda_cg` / `lambda_pg` a float or a (B, 1, 1, 1) tensor (per row)."""

    def __init__(self, unet, cg=None, pg=None, mask_guided_unet: bool = False, pg_mask_residuals: bool = False):
        super().__init__()
        self.unet, self.cg, self.pg = unet, cg, pg
        self.mask_guided_unet, self.pg_mask_residuals = mask_guided_unet, pg_mask_residuals
        if cg is not None:
            install(cg, MaskGuidedAttnProcessor())
        if pg is not None:
            install(pg, MaskedOutputAttnProcessor())
        if mask_guided_unet:
            install(unet, MaskGuidedAttnProcessor())

    def forward(self, latents, timesteps, context, product_mask, fg_tokens, bg_tokens, cg_cond=None, pg_cond=None,
                lambda_cg: float = 1.0, lambda_pg: float = 1.0, added_cond_kwargs: dict | None = None):
        region = {"mask": product_mask, "fg_tokens": fg_tokens, "bg_tokens": bg_tokens,
                  "latent_hw": tuple(latents.shape[-2:])}
        kwargs = {"region": region}
        down, mid = None, None
        for branch, cond, scale in ((self.cg, cg_cond, lambda_cg), (self.pg, pg_cond, lambda_pg)):
            if branch is None or cond is None:
                continue
            d, m = branch(latents, timesteps, context, controlnet_cond=cond, conditioning_scale=scale,
                          cross_attention_kwargs=kwargs, added_cond_kwargs=added_cond_kwargs, return_dict=False)
            if branch is self.pg and self.pg_mask_residuals:
                d, m = [_background_only(r, region) for r in d], _background_only(m, region)
            down = list(d) if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        return self.unet(latents, timesteps, context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, added_cond_kwargs=added_cond_kwargs,
                         cross_attention_kwargs=kwargs if self.mask_guided_unet else None).sample



class BackgroundTorchPipeline(DiffusionPipeline, TextualInversionLoaderMixin):
    """bgjax's `BackgroundPipeline` in diffusers, over a folder `bgjax export` wrote: the prompt with the
    category's identifier (its textual-inversion token), CG on the product I * M and PG on a reference's
    background, the sampling loop with classifier-free guidance, the VAE decode and the product pasted back.
    The inputs are prepared (`pipe.inputs.prepare`) and the product pasted back by the same code as in bgjax
    (`bgjax.sampling.host`).

    The sampler is `self.scheduler`, as in every diffusers pipeline; bgjax's names map to
    DDIMScheduler (ddim), DPMSolverMultistepScheduler (dpmpp_2m; `use_karras_sigmas=True`: dpmpp_2m_karras),
    EulerDiscreteScheduler (euler) and DDPMScheduler (ddpm), each `from_config(pipe.scheduler.config)`.
    """

    model_cpu_offload_seq = "text_encoder->cg->pg->unet->vae"
    _optional_components = ["cg", "pg"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: KarrasDiffusionSchedulers, cg: ControlNetModel | None = None,
                 pg: ControlNetModel | None = None, method: dict | None = None):
        """`method`: the bgjax model's method settings and categories (`MethodConfig` fields and "categories",
        as model_index.json holds them); None for a base model (no identifiers: a category is only text)."""
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              cg=cg, pg=pg)
        self.register_to_config(method=method)
        settings = dict(method or {})
        categories = settings.pop("categories", None) or None
        config = MethodConfig.from_dict(settings)
        self.denoiser = BackgroundDenoiser(unet, cg, pg, config.mask_guided_unet, config.pg_mask_residuals)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_scale_factor = factor
        self.inputs = Inputs(PromptBuilder(tokenizer, config, text_encoder.config.max_position_embeddings),
                             CategoryVocabulary(categories) if categories else None,
                             unet.config.sample_size * factor, factor * 2 ** (len(unet.config.block_out_channels) - 1),
                             cg is not None, pg is not None, base_model=categories is None)
        self._identifier_ids: list[int] | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> BackgroundTorchPipeline:
        """diffusers' `from_pretrained`. A folder whose `bgjax_pipeline.py` is exactly the two lines
        `bgjax export` writes loads without `trust_remote_code` (they only import this class)."""
        loader = Path(pretrained_model_name_or_path) / f"{TORCH_PIPELINE[0]}.py"
        if loader.is_file() and loader.read_text() == TORCH_PIPELINE_LOADER:
            kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def load_identifiers(self, folder: str | Path) -> None:
        """The category identifiers of an export (`FOLDER/textual_inversion/`) as textual-inversion tokens
        (diffusers' `load_textual_inversion`); a pipeline loaded with `from_pretrained` does this on first use."""
        files = sorted((Path(folder) / IDENTIFIERS_DIR).glob("*.safetensors"))
        config, vocabulary = self.inputs.prompts.config, self.inputs.vocabulary
        tokens = identifier_tokens(vocabulary.names, config.identifiers == "shared")
        missing = [t for t in tokens if t not in self.tokenizer.get_vocab()]
        if missing and not files:
            raise FileNotFoundError(f"{Path(folder) / IDENTIFIERS_DIR}: no textual-inversion files for the "
                                    f"identifiers {', '.join(missing)}")
        if missing:
            self.load_textual_inversion([str(f) for f in files])
        self._identifier_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in tokens]

    def _input_ids(self, prompt: Prompt, row: int) -> torch.Tensor:
        """The prompt's token ids with its identifier's placeholder replaced by the category's token."""
        ids = prompt.input_ids.astype(np.int64)
        if self.inputs.vocabulary is not None and prompt.identifier_index >= 0:
            if self._identifier_ids is None:
                self.load_identifiers(self.config._name_or_path)
            ids = ids.copy()
            ids[prompt.identifier_index] = self._identifier_ids[row]
        return torch.from_numpy(ids)[None].to(self.device)

    @torch.no_grad()
    def __call__(self, product: ImageLike, mask: ImageLike | None = None, category: str = "",
                 reference: ImageLike | None = None, reference_mask: ImageLike | None = None, *,
                 num_images_per_prompt: int = 1, num_inference_steps: int = 25, guidance_scale: float = 7.5,
                 lambda_cg: float | None = None, lambda_pg: float | None = None, style_guidance: bool = False,
                 prompt: str | None = None, negative_prompt: str = "", latents: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, size: int | None = None, width: int | None = None,
                 height: int | None = None, placement: Sequence[float] = DEFAULT_PLACEMENT,
                 feather: int | None = None, keep_product: bool = False, edge_fill: bool = False,
                 output_type: str = "pil", return_dict: bool = True):
        """Ad images of the product, as `BackgroundPipeline(product, mask, category, reference, ...)` makes them.

        Inputs and canvas (`size`, or `width` x `height`; `placement`, `feather`) as in bgjax. `lambda_cg` /
        `lambda_pg`: the branches' scales (default: the model's). `style_guidance`: the unconditional pass
        runs without PG (by default it keeps PG, as bgjax's). `prompt` replaces the method's template
        (`{category}`, `{identifier}`), `negative_prompt` is the unconditional pass's. `latents`: (N, C, h, w)
        NCHW, scaled by the scheduler's initial sigma (else drawn from `generator`: other noise than bgjax's
        seeds, which are JAX's). `keep_product`: after every step the latent cells the product covers whole
        hold the VAE's encoding of the product, noised to the next timestep by `scheduler.add_noise` with the
        initial latents as the noise (bgjax's `keep_product`). `edge_fill`: before decoding, the latents at the
        product's edge are refilled from the background around them (bgjax's `edge_fill`, `refill_edge`).
        `output_type` "pil" or "np" ((N, H, W, 3) float32 in [0, 1])."""
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type: expected 'pil' or 'np', got {output_type!r}")
        prepared = self.inputs.prepare(product, mask, category, reference, reference_mask, size, placement, feather,
                                       width=width, height=height)
        for note in self.inputs.warnings(prepared, lambda_cg, lambda_pg, prompt):
            warnings.warn(note, stacklevel=2)
        lambda_cg, lambda_pg = self.inputs.lambdas(prepared, lambda_cg, lambda_pg)
        n = num_images_per_prompt
        rows = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.unet.dtype)  # noqa: E731
        prompts = (self.inputs.prompt(prepared, prompt), self.inputs.negative(negative_prompt))
        context = torch.cat([self.text_encoder(self._input_ids(p, r))[0]
                             for p, r in zip(prompts, (prepared.identifier_row, 0), strict=True)])
        # [the n conditional rows; the n unconditional rows], as diffusers batches classifier-free guidance
        context = context.repeat_interleave(n, dim=0)
        fg, bg = (rows(np.stack([getattr(p, k) for p in prompts])).repeat_interleave(n, dim=0)
                  for k in ("fg_tokens", "bg_tokens"))
        product_mask = rows(prepared.mask)[None].expand(2 * n, -1, -1)
        cg_cond = rows(prepared.cg_cond.transpose(2, 0, 1))[None].expand(2 * n, -1, -1, -1) \
            if lambda_cg is not None else None
        pg_cond = rows(prepared.pg_cond.transpose(2, 0, 1))[None].expand(2 * n, -1, -1, -1) \
            if lambda_pg is not None else None
        pg_scales = torch.tensor([lambda_pg or 0.0] * n + [0.0 if style_guidance else lambda_pg or 0.0] * n,
                                 device=self.device, dtype=self.unet.dtype).reshape(2 * n, 1, 1, 1)

        h, w = prepared.mask.shape
        shape = (n, self.vae.config.latent_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected NCHW shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(self.device, torch.float32)
        shift = self.vae.config.shift_factor or 0.0
        if keep_product:
            product = rows(prepared.cg_cond.transpose(2, 0, 1))[None]
            known = (self.vae.encode(product).latent_dist.mean.float() - shift) * self.vae.config.scaling_factor
            cells = -F.max_pool2d(-rows(prepared.mask)[None, None].float(), self.vae_scale_factor)
            covered = cells >= 0.5
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        x = latents.to(self.unet.dtype) * self.scheduler.init_noise_sigma
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = self.scheduler.scale_model_input(torch.cat([x, x]), t)
            eps = self.denoiser(model_input, t, context, product_mask, fg, bg, cg_cond, pg_cond,
                                lambda_cg or 0.0, pg_scales)
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
            if keep_product:
                renoised = self.scheduler.add_noise(known, latents, timesteps[i + 1:i + 2]) \
                    if i + 1 < len(timesteps) else known
                x = torch.where(covered, renoised.to(x.dtype), x)
        if edge_fill:
            x = refill_edge(x, rows(prepared.mask), self.vae_scale_factor).to(x.dtype)
        images = self.vae.decode(x / self.vae.config.scaling_factor + shift).sample
        images = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        out = paste_back(images, prepared)
        if output_type == "pil":
            out = [Image.fromarray(im) for im in to_uint8(out)]
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)
