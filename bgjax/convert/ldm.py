"""Original single-file Stable Diffusion checkpoints (CompVis/LDM layout) <-> diffusers key space.

Works on dicts of numpy arrays only. The UNet and VAE key tables are built from the diffusers
configs (block count, layers_per_block, which blocks have attention), so any SD-1.x / SD-2.x
shaped model maps, not only SD-1.5. Every key is either mapped, reported as ignored with a
reason, or rejected with a CheckpointError naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

import numpy as np

from bgjax.fileio import CheckpointError
from bgjax.models.configs import ConfigError, UNetConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
# The original ControlNet release bundles its ControlNet with SD under this prefix.
CONTROL_PREFIX = "control_model."
SD_PREFIXES = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPEN_CLIP_PREFIX)
# Whole-file wrappers that training frameworks add (DDP's `module.`, a Lightning `model.`, a nested state_dict).
WRAPPER_PREFIXES = ("state_dict.", "module.", "model.")

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
_CROSS_MID = "UNetMidBlock2DCrossAttn"

# (LDM sub-module, diffusers sub-module) inside one LDM module; "" is the module itself.
_Parts = tuple[tuple[str, str], ...]
_PLAIN: _Parts = (("", ""),)
_UNET_RESNET: _Parts = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                        ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
                        ("skip_connection", "conv_shortcut"))
_VAE_RESNET: _Parts = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                       ("nin_shortcut", "conv_shortcut"))
_VAE_ATTN: _Parts = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"),
                     ("proj_out", "to_out.0"))
# LDM's VAE attention uses 1x1 convs where diffusers uses Linear layers.
_VAE_ATTN_LINEAR = ("q", "k", "v", "proj_out")

# Inside a SpatialTransformer the LDM and diffusers names agree; only these are weights.
_TRANSFORMER_SUFFIX = re.compile(
    r"(norm|proj_in|proj_out)\.(weight|bias)"
    r"|transformer_blocks\.\d+\.(norm[123]|attn[12]\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2)\.(weight|bias)"
    r"|transformer_blocks\.\d+\.attn[12]\.to_[qkv]\.(weight|bias)")
_CLIP_SUFFIX = re.compile(
    r"embeddings\.(token|position)_embedding\.weight"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias)")
_OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_OPEN_CLIP_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_SCHEDULE_BUFFER = re.compile(
    r"betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|lvlb_weights|logvar")
_NOT_WEIGHTS = {
    "position_ids": "position-id buffer, recomputed",
    "text_projection": "CLIP projection head, unused by Stable Diffusion",
    "logit_scale": "CLIP contrastive temperature, unused by Stable Diffusion",
    "attn_mask": "causal-mask buffer, recomputed",
}


@dataclasses.dataclass
class LdmCheckpoint:
    """A split single-file checkpoint.

    `components` maps 'unet' / 'vae' / 'text_encoder' / 'controlnet' (only those present) to
    diffusers / transformers state dicts; `configs` holds the configs the split used; `ignored`
    lists every input key that was not mapped, with the reason.
    """

    components: dict[str, dict[str, np.ndarray]]
    configs: dict[str, dict]
    ignored: list[tuple[str, str]]
    text_encoder_kind: str | None  # "clip" (SD-1.x), "open_clip" (SD-2.x) or None


@dataclasses.dataclass
class _KeyMap:
    """A bijection between LDM and diffusers keys of one component (without the LDM prefix)."""

    component: str
    exact: dict[str, str] = dataclasses.field(default_factory=dict)
    # Transformer modules: every key under the LDM prefix keeps its suffix.
    trees: dict[str, str] = dataclasses.field(default_factory=dict)
    linear_1x1: set[str] = dataclasses.field(default_factory=set)  # LDM keys of 1x1 convs

    def add(self, ldm: str, diffusers: str, parts: _Parts = _PLAIN) -> None:
        for ldm_part, diff_part in parts:
            for param in ("weight", "bias"):
                self.exact[".".join(p for p in (ldm, ldm_part, param) if p)] = ".".join(
                    p for p in (diffusers, diff_part, param) if p)

    def tree(self, ldm: str, diffusers: str) -> None:
        self.trees[ldm + "."] = diffusers + "."

    def to_diffusers(self, key: str) -> str | None:
        if key in self.exact:
            return self.exact[key]
        for ldm, diff in self.trees.items():
            if key.startswith(ldm) and _TRANSFORMER_SUFFIX.fullmatch(key[len(ldm):]):
                return diff + key[len(ldm):]
        return None

    @functools.cached_property
    def _inverse(self) -> dict[str, str]:
        return {v: k for k, v in self.exact.items()}

    def to_ldm(self, key: str) -> str | None:
        if key in self._inverse:
            return self._inverse[key]
        for ldm, diff in self.trees.items():
            if key.startswith(diff) and _TRANSFORMER_SUFFIX.fullmatch(key[len(diff):]):
                return ldm + key[len(diff):]
        return None


def _layers_per_block(config: Mapping, default: int) -> int:
    value = config.get("layers_per_block", default)
    if not isinstance(value, int):
        raise CheckpointError(f"layers_per_block: per-block lists are not supported, got {value!r}")
    return value


def _unet_keymap(config: Mapping) -> _KeyMap:
    channels = list(config["block_out_channels"])
    n, layers = len(channels), _layers_per_block(config, 2)
    down = list(config.get("down_block_types", [_CROSS_DOWN] * (n - 1) + [_PLAIN_DOWN]))
    up = list(config.get("up_block_types", [_PLAIN_UP] + [_CROSS_UP] * (n - 1)))
    for kinds, ok in ((down, (_CROSS_DOWN, _PLAIN_DOWN)), (up, (_CROSS_UP, _PLAIN_UP))):
        if len(kinds) != n or any(k not in ok for k in kinds):
            raise CheckpointError(f"unet config: block types {kinds} are not {n} of {ok}")
    mid = config.get("mid_block_type", _CROSS_MID)
    if mid not in (_CROSS_MID, None):
        raise CheckpointError(f"unet config: mid_block_type {mid!r} is not supported")

    m = _KeyMap("unet")
    m.add("time_embed.0", "time_embedding.linear_1")
    m.add("time_embed.2", "time_embedding.linear_2")
    m.add("input_blocks.0.0", "conv_in")
    m.add("out.0", "conv_norm_out")
    m.add("out.2", "conv_out")
    idx = 1
    for b in range(n):
        for j in range(layers):
            m.add(f"input_blocks.{idx}.0", f"down_blocks.{b}.resnets.{j}", _UNET_RESNET)
            if down[b] == _CROSS_DOWN:
                m.tree(f"input_blocks.{idx}.1", f"down_blocks.{b}.attentions.{j}")
            idx += 1
        if b < n - 1:
            m.add(f"input_blocks.{idx}.0.op", f"down_blocks.{b}.downsamplers.0.conv")
            idx += 1
    if mid == _CROSS_MID:
        m.add("middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
        m.tree("middle_block.1", "mid_block.attentions.0")
        m.add("middle_block.2", "mid_block.resnets.1", _UNET_RESNET)
    idx = 0
    for b in range(n):
        for j in range(layers + 1):
            m.add(f"output_blocks.{idx}.0", f"up_blocks.{b}.resnets.{j}", _UNET_RESNET)
            if up[b] == _CROSS_UP:
                m.tree(f"output_blocks.{idx}.1", f"up_blocks.{b}.attentions.{j}")
            if j == layers and b < n - 1:
                # The upsampler follows the transformer when the level has one.
                slot = 2 if up[b] == _CROSS_UP else 1
                m.add(f"output_blocks.{idx}.{slot}.conv", f"up_blocks.{b}.upsamplers.0.conv")
            idx += 1
    return m


def _vae_keymap(config: Mapping) -> _KeyMap:
    n, layers = len(config["block_out_channels"]), _layers_per_block(config, 1)
    m = _KeyMap("vae")
    for part in ("encoder", "decoder"):
        m.add(f"{part}.conv_in", f"{part}.conv_in")
        m.add(f"{part}.conv_out", f"{part}.conv_out")
        m.add(f"{part}.norm_out", f"{part}.conv_norm_out")
        m.add(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET)
        m.add(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET)
        if config.get("mid_block_add_attention", True):
            m.add(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTN)
            m.linear_1x1.update(f"{part}.mid.attn_1.{p}.weight" for p in _VAE_ATTN_LINEAR)
    for i in range(n):
        for j in range(layers):
            m.add(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET)
        if i < n - 1:
            m.add(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        # LDM numbers decoder levels by resolution, diffusers in execution order.
        level = n - 1 - i
        for j in range(layers + 1):
            m.add(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET)
        if i < n - 1:
            m.add(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    m.add("quant_conv", "quant_conv")
    m.add("post_quant_conv", "post_quant_conv")
    return m


# ---------------------------------------------------------------------------------------- inference


def _sub(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class _Reader:
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


def _infer_unet(r: _Reader) -> dict:
    # Only contiguous, complete modules shape the inferred layout, so a stray key is later
    # reported as unmappable by name instead of bending the layout around itself.
    blocks: list[list[int]] = [[]]
    i = 1
    while True:
        if f"input_blocks.{i}.0.op.weight" in r:
            blocks.append([])
        elif f"input_blocks.{i}.0.in_layers.0.weight" in r:
            blocks[-1].append(i)
        else:
            break
        i += 1
    layers = {len(b) for b in blocks}
    if len(layers) != 1 or 0 in layers:
        raise CheckpointError(f"cannot infer the unet config: input blocks {blocks} (by level) under "
                              f"{r.prefix!r} do not form levels of equal depth")
    n, lpb = len(blocks), layers.pop()
    has_attn = [all(f"input_blocks.{i}.1.proj_in.weight" in r for i in b) for b in blocks]
    up_attn = [all(f"output_blocks.{b * (lpb + 1) + j}.1.proj_in.weight" in r for j in range(lpb + 1))
               for b in range(n)]
    channels = [r.shape(f"input_blocks.{b[0]}.0.out_layers.3.weight")[0] for b in blocks]
    depth: int | list[int] = [r.count(f"input_blocks.{b[0]}.1.transformer_blocks.{{}}.norm1.weight") or 1
                              for b in blocks]
    # Levels without attention ignore the depth; an int keeps uniform models' configs standard.
    attn_depths = {d for d, a in zip(depth, has_attn, strict=True) if a}
    if len(attn_depths) == 1:
        depth = attn_depths.pop()
    proj_in, cross = r.first(".proj_in.weight"), r.first(".attn2.to_k.weight")
    config: dict = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": r.shape("input_blocks.0.0.weight")[1],
        "out_channels": r.shape("out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "down_block_types": [_CROSS_DOWN if a else _PLAIN_DOWN for a in has_attn],
        "up_block_types": [_CROSS_UP if a else _PLAIN_UP for a in up_attn],
        "mid_block_type": _CROSS_MID if "middle_block.1.proj_in.weight" in r else None,
        "transformer_layers_per_block": depth,
        # Group count and head count are not visible in shapes: SD-1 uses 8 heads per
        # level, SD-2 (OpenCLIP, 1024-d context) 64-channel heads.
        "norm_num_groups": 32,
        "use_linear_projection": bool(proj_in is not None and proj_in.ndim == 2),
    }
    if cross is not None:
        config["cross_attention_dim"] = int(cross.shape[1])
        config["attention_head_dim"] = (8 if config["cross_attention_dim"] < 1024
                                        else [max(1, c // 64) for c in channels])
    return config


def _infer_vae(r: _Reader) -> dict:
    n = r.count("encoder.down.{}.block.0.conv1.weight")
    lpb = r.count("encoder.down.0.block.{}.conv1.weight")
    if n == 0:
        raise CheckpointError(f"cannot infer the vae config: no {r.prefix + 'encoder.down.0.block.0'!r} keys")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": r.shape("encoder.conv_in.weight")[1],
        "out_channels": r.shape("decoder.conv_out.weight")[0],
        "latent_channels": r.shape("decoder.conv_in.weight")[1],
        "block_out_channels": [r.shape(f"encoder.down.{i}.block.{lpb - 1}.conv2.weight")[0]
                               for i in range(n)],
        "layers_per_block": lpb,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "norm_num_groups": 32,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in r,
        "scaling_factor": 0.18215,
    }


def _text_config(vocab_size: int, hidden: int, intermediate: int, layers: int, positions: int, act: str,
                 projection_dim: int) -> dict:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        # CLIP text towers use 64-channel heads (ViT-L/14: 12, OpenCLIP ViT-H: 16).
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "projection_dim": projection_dim,
    }


def _infer_clip(r: _Reader) -> dict:
    vocab, hidden = r.shape("embeddings.token_embedding.weight")
    # SD-2's OpenCLIP ViT-H (1024-d, GELU) lands in this layout too: diffusers' script writes a
    # transformers-5 text encoder (no `text_model.` keys) as if it were SD-1's.
    return _text_config(vocab, hidden, r.shape("encoder.layers.0.mlp.fc1.weight")[0],
                        r.count("encoder.layers.{}.mlp.fc1.weight"),
                        r.shape("embeddings.position_embedding.weight")[0],
                        "gelu" if hidden >= 1024 else "quick_gelu", hidden)


def _infer_open_clip(r: _Reader) -> dict:
    vocab, hidden = r.shape("token_embedding.weight")
    proj = r.first("text_projection")
    # SD-2 conditions on the penultimate block. The original release stores the whole OpenCLIP tower
    # (24 blocks, with its projection head), so one block is dropped; diffusers' own script writes
    # the 23 blocks diffusers keeps and no projection, so all are kept.
    blocks = r.count("transformer.resblocks.{}.mlp.c_fc.weight")
    return _text_config(vocab, hidden, r.shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
                        blocks - (proj is not None), r.shape("positional_embedding")[0], "gelu",
                        int(proj.shape[1]) if proj is not None else hidden)


def _controlnet_keymap(config: Mapping, hint_convs: int) -> _KeyMap:
    """The original ControlNet's `control_model.*`: the UNet's encoder half, zero convs and the hint block."""
    unet = _unet_keymap(config)  # a ControlNet config has no up blocks: the UNet default stands in
    m = _KeyMap("controlnet")
    encoder = ("time_embedding.", "conv_in.", "down_blocks.", "mid_block.")
    m.exact = {k: v for k, v in unet.exact.items() if v.startswith(encoder)}
    m.trees = {k: v for k, v in unet.trees.items() if v.startswith(encoder)}
    n, layers = len(config["block_out_channels"]), _layers_per_block(config, 2)
    for i in range(n * layers + n):  # one zero conv per input block, conv_in's included
        m.add(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}")
    m.add("middle_block_out.0", "controlnet_mid_block")
    m.add("input_hint_block.0", "controlnet_cond_embedding.conv_in")
    for j in range(1, hint_convs - 1):
        m.add(f"input_hint_block.{2 * j}", f"controlnet_cond_embedding.blocks.{j - 1}")
    m.add(f"input_hint_block.{2 * (hint_convs - 1)}", "controlnet_cond_embedding.conv_out")
    return m


def _infer_controlnet(state: Mapping[str, np.ndarray], unet_config: Mapping) -> tuple[dict, int]:
    """The ControlNetModel config of a bundled `control_model.*` (its UNet part is the SD UNet's shape)
    and the number of convs in its hint block."""
    r = _Reader(state, CONTROL_PREFIX)
    convs = []
    while f"input_hint_block.{2 * len(convs)}.weight" in r:  # convs at even indices, SiLUs between
        convs.append(r.shape(f"input_hint_block.{2 * len(convs)}.weight"))
    if len(convs) < 2 or len(convs) % 2:
        raise CheckpointError(f"cannot infer the controlnet config: {len(convs)} convs under "
                              f"{CONTROL_PREFIX + 'input_hint_block'!r}, expected conv_in, pairs of blocks, conv_out")
    try:
        config = UNetConfig.from_dict(dict(unet_config)).controlnet_dict()
    except ConfigError as e:
        raise CheckpointError(f"controlnet config (from the unet's): {e}") from None
    # conv_in, then per level a same-width conv and a stride-2 conv to the next width, then conv_out.
    config["conditioning_channels"] = convs[0][1]
    config["conditioning_embedding_out_channels"] = [convs[0][0]] + [convs[2 * j + 2][0]
                                                                     for j in range((len(convs) - 2) // 2)]
    return config, len(convs)


def _text_kind(state: Mapping[str, np.ndarray]) -> str | None:
    clip = any(k.startswith(CLIP_PREFIX) for k in state)
    open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in state)
    if clip and open_clip:
        raise CheckpointError(f"checkpoint has both {CLIP_PREFIX!r} and {OPEN_CLIP_PREFIX!r} text encoders")
    return "clip" if clip else "open_clip" if open_clip else None


def _present(state: Mapping[str, np.ndarray]) -> list[str]:
    names = [name for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX))
             if any(k.startswith(prefix) for k in state)]
    return names + ["text_encoder"] * (_text_kind(state) is not None)


def _infer(state: Mapping[str, np.ndarray], name: str) -> dict:
    if name == "unet":
        return _infer_unet(_Reader(state, UNET_PREFIX))
    if name == "vae":
        return _infer_vae(_Reader(state, VAE_PREFIX))
    if _text_kind(state) == "clip":
        modern = any(k.startswith(CLIP_PREFIX + "text_model.") for k in state)
        return _infer_clip(_Reader(state, CLIP_PREFIX + "text_model." * modern))
    return _infer_open_clip(_Reader(state, OPEN_CLIP_PREFIX))


def infer_configs(state: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """diffusers / transformers config dicts for the components present in an LDM checkpoint.

    Head counts and norm group counts cannot be read from shapes; the SD-1 / SD-2 defaults
    are used, so pass real configs to `split_ldm_checkpoint` for other models.
    """
    return {name: _infer(state, name) for name in _present(state)}


# ---------------------------------------------------------------------------------------- LDM -> diffusers


def _ignore_reason(key: str) -> str | None:
    """Why a key outside the SD prefixes is not a weight, or None for an unknown (extra) key."""
    if key.startswith(EMA_PREFIX):
        return "EMA copy of the UNet weights; the non-EMA weights are used"
    if _SCHEDULE_BUFFER.fullmatch(key):
        return "diffusion schedule / training buffer, not a network weight"
    return None


def strip_wrappers(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The state dict without whole-file wrapper prefixes (`module.`, `model.`, `state_dict.`), and those
    stripped, outermost first. A prefix is stripped only when every key has it and none is an SD key."""
    state, stripped = dict(state), []
    while state and not any(k.startswith((*SD_PREFIXES, CONTROL_PREFIX)) for k in state):
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
        stripped.append(prefix)
    return state, stripped


def _unmappable(key: str, component: str) -> CheckpointError:
    return CheckpointError(f"key {key!r} cannot be mapped to a diffusers {component} weight "
                           f"(not in the layout the {component} config describes)")


def _split_keymap(state: Mapping[str, np.ndarray], keymap: _KeyMap, prefix: str,
                  ignored: list[tuple[str, str]],
                  skip: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    out = {}
    for key, value in _sub(state, prefix).items():
        if reason := next((r for p, r in (skip or {}).items() if key.startswith(p)), None):
            ignored.append((prefix + key, reason))
            continue
        target = keymap.to_diffusers(key)
        if target is None:
            raise _unmappable(prefix + key, keymap.component)
        if key in keymap.linear_1x1 and value.ndim == 4:
            value = value.reshape(value.shape[:2])
        out[target] = value
    return out


def _split_clip(state: Mapping[str, np.ndarray], ignored: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in _sub(state, CLIP_PREFIX).items():
        rel = key.removeprefix("text_model.")
        if rel == "embeddings.position_ids":
            ignored.append((CLIP_PREFIX + key, _NOT_WEIGHTS["position_ids"]))
        elif _CLIP_SUFFIX.fullmatch(rel):
            out["text_model." + rel] = value
        else:
            raise _unmappable(CLIP_PREFIX + key, "text_encoder")
    return out


def _split_open_clip(state: Mapping[str, np.ndarray], config: Mapping,
                     ignored: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    layers = int(config["num_hidden_layers"])
    out = {}
    for key, value in _sub(state, OPEN_CLIP_PREFIX).items():
        full = OPEN_CLIP_PREFIX + key
        if key in _NOT_WEIGHTS:
            ignored.append((full, _NOT_WEIGHTS[key]))
            continue
        if key in _OPEN_CLIP_TOP:
            out["text_model." + _OPEN_CLIP_TOP[key]] = value
            continue
        m = _OPEN_CLIP_RESBLOCK.fullmatch(key)
        if m is None:
            raise _unmappable(full, "text_encoder")
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
            raise _unmappable(full, "text_encoder")
    return out


def split_ldm_checkpoint(state: Mapping[str, np.ndarray], configs: Mapping[str, dict] | None = None,
                         allow_extra_keys: bool = False) -> LdmCheckpoint:
    """Split an LDM single-file state dict into diffusers 'unet' / 'vae' / 'text_encoder' state dicts,
    and 'controlnet' when a ControlNet is bundled under `control_model.`.

    `configs` (diffusers / transformers config dicts by component) replace the inferred ones.
    Raises CheckpointError naming the first key under a UNet / VAE / text-encoder / ControlNet prefix
    that has no diffusers counterpart, and the keys outside them that are neither EMA copies nor
    schedule buffers (an unmerged LoRA, another network) unless `allow_extra_keys`, which reports
    them as ignored. Arrays are views of the input, not copies.
    """
    kind = _text_kind(state)
    present = _present(state)
    given = dict(configs or {})
    configs = {name: dict(given[name]) if name in given else _infer(state, name) for name in present}
    outside = [k for k in state if not k.startswith((*SD_PREFIXES, CONTROL_PREFIX))]
    extra = sorted(k for k in outside if _ignore_reason(k) is None)
    if extra and not allow_extra_keys:
        raise CheckpointError(f"{len(extra)} key(s) outside Stable Diffusion's UNet, VAE, text encoder and "
                              f"ControlNet: {', '.join(repr(k) for k in extra[:8])}"
                              f"{' and more' if len(extra) > 8 else ''} (--allow-extra-keys to convert without them)")
    ignored = [(k, _ignore_reason(k) or "extra key outside the SD prefixes, left out (--allow-extra-keys)")
               for k in outside]
    components: dict[str, dict[str, np.ndarray]] = {}
    if "unet" in present:
        components["unet"] = _split_keymap(state, _unet_keymap(configs["unet"]), UNET_PREFIX, ignored)
    if "vae" in present:
        components["vae"] = _split_keymap(
            state, _vae_keymap(configs["vae"]), VAE_PREFIX, ignored,
            skip={"loss.": "VAE training loss (LPIPS / discriminator), not part of AutoencoderKL"})
    if kind == "clip":
        components["text_encoder"] = _split_clip(state, ignored)
    elif kind == "open_clip":
        components["text_encoder"] = _split_open_clip(state, configs["text_encoder"], ignored)
    if any(k.startswith(CONTROL_PREFIX) for k in state):
        if "unet" not in configs:
            raise CheckpointError(f"keys under {CONTROL_PREFIX!r} without a UNet: the ControlNet's config is the "
                                  f"UNet's, so a ControlNet-only file cannot be converted here")
        config, hint_convs = _infer_controlnet(state, configs["unet"])
        configs["controlnet"] = config = dict(given.get("controlnet", config))
        components["controlnet"] = _split_keymap(state, _controlnet_keymap(config, hint_convs), CONTROL_PREFIX,
                                                 ignored)
    return LdmCheckpoint(components=components, configs=configs, ignored=ignored, text_encoder_kind=kind)


# ---------------------------------------------------------------------------------------- diffusers -> LDM


def _export_keymap(state: Mapping[str, np.ndarray], keymap: _KeyMap, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        target = keymap.to_ldm(key)
        if target is None:
            raise CheckpointError(f"diffusers {keymap.component} key {key!r} has no LDM counterpart "
                                  f"in the layout its config describes")
        if target in keymap.linear_1x1 and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[prefix + target] = value
    return out


def diffusers_to_ldm(unet: Mapping[str, np.ndarray], vae: Mapping[str, np.ndarray],
                     text_encoder: Mapping[str, np.ndarray], unet_config: Mapping,
                     vae_config: Mapping) -> dict[str, np.ndarray]:
    """diffusers UNet / AutoencoderKL and a transformers CLIPTextModel -> one LDM (SD-1.x) state dict.

    The text encoder is written in the SD-1 layout (`cond_stage_model.transformer.text_model.*`);
    keys may come with or without the `text_model.` prefix.
    """
    out = _export_keymap(unet, _unet_keymap(unet_config), UNET_PREFIX)
    out.update(_export_keymap(vae, _vae_keymap(vae_config), VAE_PREFIX))
    for key, value in text_encoder.items():
        rel = key.removeprefix("text_model.")
        if not (_CLIP_SUFFIX.fullmatch(rel) or rel == "embeddings.position_ids"):
            raise CheckpointError(f"text_encoder key {key!r} is not a CLIPTextModel weight")
        out[CLIP_PREFIX + "text_model." + rel] = value
    return out
