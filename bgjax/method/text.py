"""Prompts -> the UNet's text conditioning, for SD's one text encoder and SDXL's two, identifiers spliced in.

SD-1.x / SD-2.x: the context E is the encoder's last hidden state. SDXL (as `StableDiffusionXLPipeline.
encode_prompt` without clip skip): E is both encoders' penultimate hidden states (hidden_states[-2])
concatenated feature-wise, (B, 77, 768 + 1280), and the pooled embedding is the second encoder's projected
EOS state (`text_embeds`). A per-category identifier e_c has one row in each encoder's table
(`identifiers`, `identifiers_2`), written at the same token position in both.

Where the pooled state is read with an identifier in the prompt: diffusers gives an exported identifier a
token id past the vocabulary, and SDXL's configs (eos_token_id 2) pool at the largest id, so there it pools at
the identifier, not at EOS. bgjax marks the identifier's position with such an id too, so a model trains on
the pooled embedding diffusers will compute for it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from bgjax.method.prompts import embed_with_identifiers
from bgjax.models.components import TEXT_ENCODERS
from bgjax.models.configs import read_config_json

# Per encoder: its params' key, its prompt ids' key and its identifier table's key.
IDS = {"text_encoder": "input_ids", "text_encoder_2": "input_ids_2"}
IDENTIFIERS = {"text_encoder": "identifiers", "text_encoder_2": "identifiers_2"}
# What diffusers' SDXL pipelines do for an empty negative prompt, unless model_index.json says otherwise.
SDXL_ZEROS_FOR_EMPTY_PROMPT = True


def zeros_for_empty_prompt(model: Path | None) -> bool:
    """An SDXL model's `force_zeros_for_empty_prompt`: its model_index.json's, else diffusers' default (True)."""
    index = Path(model) / "model_index.json" if model else None
    if index is None or not index.is_file():
        return SDXL_ZEROS_FOR_EMPTY_PROMPT
    return bool(read_config_json(index).get("force_zeros_for_empty_prompt", SDXL_ZEROS_FOR_EMPTY_PROMPT))


@flax.struct.dataclass
class TextConditioning:
    context: jax.Array  # (B, L, cross_attention_dim): the cross-attention keys and values
    pooled: jax.Array | None = None  # (B, pooled width): SDXL's text_embeds, None for SD

    def zeroed(self, where: jax.Array) -> TextConditioning:
        """Zeros for the examples where `where` (B,) is true: SDXL's unconditional conditioning when its
        pipeline says `force_zeros_for_empty_prompt` (SDXL base does)."""
        def zero(x):
            return None if x is None else jnp.where(where.reshape((-1,) + (1,) * (x.ndim - 1)), 0, x).astype(x.dtype)
        return TextConditioning(zero(self.context), zero(self.pooled))


@dataclasses.dataclass(frozen=True)
class TextEncoders:
    """The text encoders of a base model, by kind ("text_encoder", and "text_encoder_2" for SDXL), and how
    their outputs become the conditioning. Hashable: a jitted caller may close over it."""

    encoders: tuple[tuple[str, nn.Module], ...]

    @classmethod
    def of(cls, modules: dict[str, nn.Module]) -> TextEncoders:
        return cls(tuple((k, modules[k]) for k in TEXT_ENCODERS if modules.get(k) is not None))

    @property
    def sdxl(self) -> bool:
        return len(self.encoders) == 2

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.encoders)

    def __call__(self, params: dict, prompts: dict) -> TextConditioning:
        """`params` holds each encoder's params under its kind and, when prompts carry identifiers, the tables
        (`identifiers`, `identifiers_2`); `prompts` the ids (`input_ids`, `input_ids_2`) and, for those,
        `identifier_index` and `identifier_row` (`PromptBuilder.batch`, `StageModels.prompt_tables`)."""
        states, pooled = [], None
        for kind, module in self.encoders:
            ids = prompts[IDS[kind]]
            embeds = None
            if IDENTIFIERS[kind] in params:
                table = params[kind]["text_model"]["embeddings.token_embedding"]["embedding"]
                embeds = embed_with_identifiers(table, ids, prompts["identifier_index"], params[IDENTIFIERS[kind]],
                                                prompts["identifier_row"])
                # the id diffusers gives the exported token: past the vocabulary (ids only pool once embedded)
                at = jnp.arange(ids.shape[1])[None] == prompts["identifier_index"][:, None]
                ids = jnp.where(at, module.config.vocab_size, ids)
            out = module.apply({"params": params[kind]}, ids, embeds, method=module.encode)
            if not self.sdxl:
                return TextConditioning(out.last_hidden_state)
            states.append(out.penultimate_hidden_state)
            pooled = out.pooler_output
        return TextConditioning(jnp.concatenate(states, axis=-1), pooled)
