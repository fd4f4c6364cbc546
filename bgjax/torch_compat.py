"""Run an exported bgjax model in diffusers: attention processors for the paper's branches.

Import this only where PyTorch and diffusers are installed (bgjax never imports it itself).

    from bgjax.torch_compat import BackgroundDenoiser
    denoiser = BackgroundDenoiser(unet, cg=ControlNetModel.from_pretrained("out/cg"),
                                  pg=ControlNetModel.from_pretrained("out/pg"))
    eps = denoiser(latents, t, text_embeddings, product_mask, fg_tokens, bg_tokens, cg_cond=..., pg_cond=...)

Tensors are diffusers' NCHW; masks are (B, H, W) at any resolution (usually the image's),
token sets (B, L) with 1 on the tokens of P_fg / P_bg. The identifiers export as diffusers
textual-inversion files, one token per file: `pipe.load_textual_inversion(...)` (SDXL's files hold
`clip_l` and `clip_g`, loaded into each encoder as diffusers documents). SDXL models take
`added_cond_kwargs={"text_embeds": ..., "time_ids": ...}` as diffusers' UNet does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from bgjax.models.area import area_resize_matrix


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


def _background_only(residual: torch.Tensor, region: dict) -> torch.Tensor:
    b, _, h, w = residual.shape
    return residual * (1 - region_weight(region, h * w).reshape(b, 1, h, w).to(residual.dtype))


class BackgroundDenoiser(torch.nn.Module):
    """The UNet with the CG and PG branches, as bgjax's `Denoiser` computes it."""

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

