"""Identifiers in JAX: the learned per-category embeddings e_c written into a prompt's token embeddings.

The prompts themselves (token ids, spans, the category vocabulary) are `bgjax.method.prompt_text`, which
needs no JAX; its names are importable from here too, where training has always imported them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bgjax.method.prompt_text import CategoryVocabulary, Prompt, PromptBuilder

__all__ = ["CategoryVocabulary", "Prompt", "PromptBuilder", "embed_with_identifiers", "init_identifiers"]


def init_identifiers(token_embedding: jax.Array, placeholder_id: int, count: int) -> jax.Array:
    """The identifier table (count, hidden), every row starting at the placeholder's embedding."""
    return jnp.tile(token_embedding[placeholder_id][None], (count, 1)).astype(jnp.float32)


def embed_with_identifiers(token_embedding: jax.Array, input_ids: jax.Array, identifier_index: jax.Array,
                           identifiers: jax.Array, identifier_rows: jax.Array) -> jax.Array:
    """Token embeddings (B, L, hidden) with e_c written at each prompt's identifier position.

    `identifier_rows` (B,) picks the table row: the category id, or 0 for a shared identifier.
    Prompts with `identifier_index == -1` keep their token embeddings.
    """
    embeds = token_embedding[input_ids]
    at = jnp.arange(input_ids.shape[1])[None, :, None] == identifier_index[:, None, None]
    return jnp.where(at, identifiers[identifier_rows][:, None, :].astype(embeds.dtype), embeds)
