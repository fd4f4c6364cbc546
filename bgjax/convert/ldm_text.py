"""The text encoders of single-file (original LDM / SGM) checkpoints <-> transformers' CLIP key space.

Three layouts, told apart by their prefixes:

- SD-1.x: CLIP ViT-L in transformers' names under `cond_stage_model.transformer.` ("clip").
- SD-2.x: OpenCLIP ViT-H under `cond_stage_model.model.` ("open_clip"); q, k, v packed in `attn.in_proj_*`.
  SD-2 conditions on the penultimate block: the original release's 24 blocks keep 23, and its
  `text_projection` is left out; diffusers' own script writes the 23 blocks and no projection.
- SDXL: SGM's conditioner ("sdxl"): CLIP ViT-L in transformers' names under
  `conditioner.embedders.0.transformer.` -> `text_encoder`, and OpenCLIP ViT-bigG under
  `conditioner.embedders.1.model.` -> `text_encoder_2` (transformers' CLIPTextModelWithProjection), every
  block kept (SDXL reads the penultimate layer's output at run time) and `text_projection` (OpenCLIP's
  (width, dim) matrix, applied as x @ P) the transposed Linear weight.

Works on dicts of numpy arrays only; every key is mapped, reported as ignored with a reason, or rejected.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from bgjax.fileio import CheckpointError

CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
CONDITIONER_PREFIX = "conditioner."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# The SDXL refiner conditions on OpenCLIP ViT-bigG alone, here.
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."
TEXT_PREFIXES = (CLIP_PREFIX, OPEN_CLIP_PREFIX, CONDITIONER_PREFIX)

CLIP_SUFFIX = re.compile(
    r"embeddings\.(token|position)_embedding\.weight"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias)")
_OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_OPEN_CLIP_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_NOT_WEIGHTS = {
    "position_ids": "position-id buffer, recomputed",
    "text_projection": "CLIP projection head, unused by Stable Diffusion 2",
    "logit_scale": "CLIP contrastive temperature, unused by Stable Diffusion",
    "attn_mask": "causal-mask buffer, recomputed",
}


def sub_state(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def unmappable(key: str, component: str) -> CheckpointError:
    return CheckpointError(f"key {key!r} cannot be mapped to a diffusers {component} weight "
                           f"(not in the layout the {component} config describes)")


class Reader:
    """Shape look-ups under one LDM prefix that name the full key when it is missing."""

    def __init__(self, state: Mapping[str, np.ndarray], prefix: str) -> None:
        self.state, self.prefix = state, prefix

    def __contains__(self, key: str) -> bool:
        return self.prefix + key in self.state

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self:
            raise CheckpointError(f"cannot infer the model config: key {self.prefix + key!r} is missing")
        return tuple(int(d) for d in self.state[self.prefix + key].shape)

    def count(self, template: str) -> int:
        """How many of template.format(0), template.format(1), ... are present, in a row."""
        i = 0
        while template.format(i) in self:
            i += 1
        return i

    def first(self, suffix: str) -> np.ndarray | None:
        found = (v for k, v in self.state.items() if k.startswith(self.prefix) and k.endswith(suffix))
        return next(found, None)


@dataclasses.dataclass(frozen=True)
class TextLayout:
    """Where one text encoder lies in a single file, and how it maps."""

    component: str  # "text_encoder" or "text_encoder_2"
    prefix: str
    open_clip: bool  # OpenCLIP's names (else transformers')
    sdxl: bool  # SDXL's: every block kept, the projection a weight, the configs' token ids SDXL's


_LAYOUTS = {
    "clip": (TextLayout("text_encoder", CLIP_PREFIX, False, False),),
    "open_clip": (TextLayout("text_encoder", OPEN_CLIP_PREFIX, True, False),),
    "sdxl": (TextLayout("text_encoder", SDXL_CLIP_PREFIX, False, True),
             TextLayout("text_encoder_2", SDXL_OPEN_CLIP_PREFIX, True, True)),
}


def text_kind(state: Mapping[str, np.ndarray]) -> str | None:
    """"clip" (SD-1.x), "open_clip" (SD-2.x), "sdxl", or None when the file has no text encoder."""
    found = [p for p in TEXT_PREFIXES if any(k.startswith(p) for k in state)]
    if len(found) > 1:
        raise CheckpointError(f"checkpoint has text encoders under both {found[0]!r} and {found[1]!r}")
    if not found:
        return None
    if found[0] == CONDITIONER_PREFIX:
        if any(k.startswith(SDXL_REFINER_PREFIX) for k in state):
            raise CheckpointError(f"keys under {SDXL_REFINER_PREFIX!r}: an SDXL refiner checkpoint (OpenCLIP "
                                  f"ViT-bigG alone), which bgjax does not convert; the SDXL base model converts")
        return "sdxl"
    return "clip" if found[0] == CLIP_PREFIX else "open_clip"


def text_layouts(state: Mapping[str, np.ndarray]) -> tuple[TextLayout, ...]:
    kind = text_kind(state)
    return _LAYOUTS[kind] if kind else ()


def _text_config(vocab_size: int, hidden: int, intermediate: int, layers: int, positions: int, act: str,
                 projection_dim: int, sdxl: bool, projection: bool) -> dict:
    config = {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        # CLIP text towers use 64-channel heads (ViT-L/14: 12, OpenCLIP ViT-H: 16, ViT-bigG: 20).
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "projection_dim": projection_dim,
    }
    if sdxl:  # the token ids SDXL's own configs give (eos 2: pooled at the largest id, transformers' old rule)
        config.update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return config


def _infer_clip(r: Reader, sdxl: bool) -> dict:
    vocab, hidden = r.shape("embeddings.token_embedding.weight")
    # SD-2's OpenCLIP ViT-H (1024-d, GELU) lands in this layout too: diffusers' script writes a
    # transformers-5 text encoder (no `text_model.` keys) as if it were SD-1's.
    return _text_config(vocab, hidden, r.shape("encoder.layers.0.mlp.fc1.weight")[0],
                        r.count("encoder.layers.{}.mlp.fc1.weight"),
                        r.shape("embeddings.position_embedding.weight")[0],
                        "gelu" if hidden >= 1024 else "quick_gelu", hidden, sdxl, projection=False)


def _infer_open_clip(r: Reader, sdxl: bool) -> dict:
    vocab, hidden = r.shape("token_embedding.weight")
    proj = r.first("text_projection")
    blocks = r.count("transformer.resblocks.{}.mlp.c_fc.weight")
    if sdxl and proj is None:
        raise CheckpointError(f"cannot infer the text_encoder_2 config: {r.prefix + 'text_projection'!r} is "
                              f"missing (SDXL's pooled embedding is projected by it)")
    # SD-2 drops the stored tower's last block when the file has the whole tower (its projection head).
    layers = blocks if sdxl else blocks - (proj is not None)
    return _text_config(vocab, hidden, r.shape("transformer.resblocks.0.mlp.c_fc.weight")[0], layers,
                        r.shape("positional_embedding")[0], "gelu",
                        int(proj.shape[1]) if proj is not None else hidden, sdxl, projection=sdxl)


def infer_text_config(state: Mapping[str, np.ndarray], layout: TextLayout) -> dict:
    """A transformers config dict for the encoder at `layout` (head counts: 64-channel heads)."""
    if layout.open_clip:
        return _infer_open_clip(Reader(state, layout.prefix), layout.sdxl)
    modern = any(k.startswith(layout.prefix + "text_model.") for k in state)
    return _infer_clip(Reader(state, layout.prefix + "text_model." * modern), layout.sdxl)


def _split_clip(state: Mapping[str, np.ndarray], layout: TextLayout,
                ignored: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in sub_state(state, layout.prefix).items():
        rel = key.removeprefix("text_model.")
        if rel == "embeddings.position_ids":
            ignored.append((layout.prefix + key, _NOT_WEIGHTS["position_ids"]))
        elif CLIP_SUFFIX.fullmatch(rel):
            out["text_model." + rel] = value
        else:
            raise unmappable(layout.prefix + key, layout.component)
    return out


def _split_open_clip(state: Mapping[str, np.ndarray], layout: TextLayout, config: Mapping,
                     ignored: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    layers = int(config["num_hidden_layers"])
    out = {}
    for key, value in sub_state(state, layout.prefix).items():
        full = layout.prefix + key
        if key == "text_projection" and layout.sdxl:
            out["text_projection.weight"] = np.ascontiguousarray(value.T)
            continue
        if key in _NOT_WEIGHTS:
            ignored.append((full, _NOT_WEIGHTS[key]))
            continue
        if key in _OPEN_CLIP_TOP:
            out["text_model." + _OPEN_CLIP_TOP[key]] = value
            continue
        m = _OPEN_CLIP_RESBLOCK.fullmatch(key)
        if m is None:
            raise unmappable(full, layout.component)
        i, rest = int(m[1]), m[2]
        if i >= layers:
            ignored.append((full, f"OpenCLIP block {i}: SD-2 conditions on the penultimate layer, "
                                  f"diffusers keeps {layers} blocks"))
            continue
        dst = f"text_model.encoder.layers.{i}."
        module, _, param = rest.rpartition(".")
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            # OpenCLIP packs q, k and v into one in_proj of 3 * width rows.
            param = rest.rsplit("_", 1)[1]
            for name, chunk in zip("qkv", np.split(value, 3, axis=0), strict=True):
                out[f"{dst}self_attn.{name}_proj.{param}"] = chunk
        elif module in _OPEN_CLIP_BLOCK and param in ("weight", "bias"):
            out[f"{dst}{_OPEN_CLIP_BLOCK[module]}.{param}"] = value
        else:
            raise unmappable(full, layout.component)
    return out


def split_text(state: Mapping[str, np.ndarray], config: Mapping, layout: TextLayout,
               ignored: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """The transformers state dict of the encoder at `layout`; unused keys go to `ignored` with their reason."""
    if layout.open_clip:
        return _split_open_clip(state, layout, config, ignored)
    return _split_clip(state, layout, ignored)


def check_conditioner(state: Mapping[str, np.ndarray]) -> None:
    """Every key under `conditioner.` belongs to one of SDXL's two text encoders."""
    for key in state:
        if key.startswith(CONDITIONER_PREFIX) and not key.startswith((SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX)):
            raise CheckpointError(f"key {key!r} is under SDXL's conditioner but not one of its text encoders "
                                  f"({SDXL_CLIP_PREFIX!r}, {SDXL_OPEN_CLIP_PREFIX!r})")


def text_to_ldm(text_encoder: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A transformers CLIPTextModel state dict (keys with or without `text_model.`) in SD-1's layout."""
    out = {}
    for key, value in text_encoder.items():
        rel = key.removeprefix("text_model.")
        if not (CLIP_SUFFIX.fullmatch(rel) or rel == "embeddings.position_ids"):
            raise CheckpointError(f"text_encoder key {key!r} is not a CLIPTextModel weight")
        out[CLIP_PREFIX + "text_model." + rel] = value
    return out
