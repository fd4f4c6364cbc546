"""Original single-file Stable Diffusion checkpoints (CompVis/LDM and SDXL's SGM layout) <-> diffusers key space.

Works on dicts of numpy arrays only. The UNet and VAE key tables are built from the diffusers
configs (block count, layers_per_block, which blocks have attention, SDXL's added embedding), so any
SD-1.x / SD-2.x / SDXL shaped model maps, not only the released ones. The text encoders' layouts are
`bgjax.convert.ldm_text`'s. Every key is either mapped, reported as ignored with a reason, or rejected
with a CheckpointError naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

import numpy as np

from bgjax.convert.ldm_text import (
    TEXT_PREFIXES,
    Reader,
    check_conditioner,
    infer_text_config,
    split_text,
    sub_state,
    text_kind,
    text_layouts,
    text_to_ldm,
    unmappable,
)
from bgjax.fileio import CheckpointError
from bgjax.models.configs import SDXL_TIME_IDS, TEXT_TIME, ConfigError, UNetConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
# The original ControlNet release bundles its ControlNet with SD under this prefix.
CONTROL_PREFIX = "control_model."
SD_PREFIXES = (UNET_PREFIX, VAE_PREFIX, *TEXT_PREFIXES)
SDXL_VAE_SCALING_FACTOR = 0.13025
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
_SCHEDULE_BUFFER = re.compile(
    r"betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|lvlb_weights|logvar")
@dataclasses.dataclass
class LdmCheckpoint:
    """A split single-file checkpoint.

    `components` maps 'unet' / 'vae' / 'text_encoder' / 'text_encoder_2' / 'controlnet' (those present) to
    diffusers / transformers state dicts; `configs` holds the configs the split used; `ignored`
    lists every input key that was not mapped, with the reason.
    """

    components: dict[str, dict[str, np.ndarray]]
    configs: dict[str, dict]
    ignored: list[tuple[str, str]]
    text_encoder_kind: str | None  # "clip" (SD-1.x), "open_clip" (SD-2.x), "sdxl" or None


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
    if config.get("addition_embed_type") == TEXT_TIME:  # SDXL's added embedding
        m.add("label_emb.0.0", "add_embedding.linear_1")
        m.add("label_emb.0.2", "add_embedding.linear_2")
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


def _infer_unet(r: Reader) -> dict:
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


def _infer_vae(r: Reader) -> dict:
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
    r = Reader(state, CONTROL_PREFIX)
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


def _present(state: Mapping[str, np.ndarray]) -> list[str]:
    names = [name for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX))
             if any(k.startswith(prefix) for k in state)]
    return names + [layout.component for layout in text_layouts(state)]


def _add_sdxl(configs: dict[str, dict], given: Mapping[str, dict], state: Mapping[str, np.ndarray]) -> None:
    """What an SDXL file's shapes do not say, in the inferred configs: the added embedding's split into the
    pooled text embedding (text_encoder_2's projection) and 6 time-id sinusoids, and the VAE's scaling factor."""
    unet = None if "unet" in given else configs.get("unet")
    if unet is not None and UNET_PREFIX + "label_emb.0.0.weight" in state:
        width = int(state[UNET_PREFIX + "label_emb.0.0.weight"].shape[1])
        times = width - int(configs["text_encoder_2"]["projection_dim"])
        if times <= 0 or times % SDXL_TIME_IDS:
            raise CheckpointError(f"cannot infer the unet config: {UNET_PREFIX}label_emb.0.0.weight takes {width} "
                                  f"features, not the pooled text embedding plus {SDXL_TIME_IDS} time-id sinusoids")
        unet.update(addition_embed_type=TEXT_TIME, addition_time_embed_dim=times // SDXL_TIME_IDS,
                    projection_class_embeddings_input_dim=width)
    if "vae" in configs and "vae" not in given:
        configs["vae"]["scaling_factor"] = SDXL_VAE_SCALING_FACTOR


def _infer(state: Mapping[str, np.ndarray], name: str) -> dict:
    if name == "unet":
        return _infer_unet(Reader(state, UNET_PREFIX))
    if name == "vae":
        return _infer_vae(Reader(state, VAE_PREFIX))
    return infer_text_config(state, next(t for t in text_layouts(state) if t.component == name))


def _configs(state: Mapping[str, np.ndarray], given: Mapping[str, dict]) -> dict[str, dict]:
    configs = {name: dict(given[name]) if name in given else _infer(state, name) for name in _present(state)}
    if text_kind(state) == "sdxl":
        _add_sdxl(configs, given, state)
    return configs


def infer_configs(state: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """diffusers / transformers config dicts for the components present in an LDM checkpoint.

    Head counts and norm group counts cannot be read from shapes; the SD-1 / SD-2 / SDXL defaults
    are used, so pass real configs to `split_ldm_checkpoint` for other models.
    """
    return _configs(state, {})


# ---------------------------------------------------------------------------------------- LDM -> diffusers


def _ignore_reason(key: str) -> str | None:
    """Why a key outside the SD prefixes is not a weight, or None for an unknown (extra) key."""
    if key.startswith(EMA_PREFIX):
        return "EMA copy of the UNet weights; the non-EMA weights are used"
    if _SCHEDULE_BUFFER.fullmatch(key):
        return "diffusion schedule / training buffer, not a network weight"
    if key.startswith("denoiser."):
        return "SDXL's sampling buffer (the noise levels of SGM's denoiser), not a network weight"
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


def _split_keymap(state: Mapping[str, np.ndarray], keymap: _KeyMap, prefix: str,
                  ignored: list[tuple[str, str]],
                  skip: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    out = {}
    for key, value in sub_state(state, prefix).items():
        if reason := next((r for p, r in (skip or {}).items() if key.startswith(p)), None):
            ignored.append((prefix + key, reason))
            continue
        target = keymap.to_diffusers(key)
        if target is None:
            raise unmappable(prefix + key, keymap.component)
        if key in keymap.linear_1x1 and value.ndim == 4:
            value = value.reshape(value.shape[:2])
        out[target] = value
    return out


def split_ldm_checkpoint(state: Mapping[str, np.ndarray], configs: Mapping[str, dict] | None = None,
                         allow_extra_keys: bool = False) -> LdmCheckpoint:
    """Split an LDM single-file state dict into diffusers 'unet' / 'vae' / 'text_encoder' state dicts (and
    'text_encoder_2' for SDXL), and 'controlnet' when a ControlNet is bundled under `control_model.`.

    `configs` (diffusers / transformers config dicts by component) replace the inferred ones.
    Raises CheckpointError naming the first key under a UNet / VAE / text-encoder / ControlNet prefix
    that has no diffusers counterpart, and the keys outside them that are neither EMA copies nor
    schedule buffers (an unmerged LoRA, another network) unless `allow_extra_keys`, which reports
    them as ignored. Arrays are views of the input, not copies.
    """
    kind = text_kind(state)
    check_conditioner(state)
    present = _present(state)
    given = dict(configs or {})
    configs = _configs(state, given)
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
    for layout in text_layouts(state):
        components[layout.component] = split_text(state, configs[layout.component], layout, ignored)
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
    out.update(text_to_ldm(text_encoder))
    return out
