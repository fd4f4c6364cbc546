"""Model configs read from diffusers / transformers `config.json` dicts.

Each config keeps the raw dict it was read from (`raw`), so export writes back exactly
what diffusers expects, and exposes the parsed fields the Flax modules need.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

CROSS_ATTN_DOWN = "CrossAttnDownBlock2D"
PLAIN_DOWN = "DownBlock2D"
CROSS_ATTN_UP = "CrossAttnUpBlock2D"
PLAIN_UP = "UpBlock2D"
# SDXL's added conditioning: the pooled text embedding and the time ids (original size, crop top-left,
# target size, each (h, w) / (top, left)), their sinusoids concatenated into `add_embedding`.
TEXT_TIME = "text_time"
SDXL_TIME_IDS = 6


class ConfigError(ValueError):
    """A config.json that bgjax cannot build a model from; the message names the field."""


def _per_block(value: Any, n: int, field: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, list | tuple) and len(value) == n:
        return tuple(int(v) for v in value)
    raise ConfigError(f"{field}: expected an int or a list of {n}, got {value!r}")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel / ControlNetModel fields (SD-1.x, SD-2.x and SDXL families).

    `upcast_attention` needs no field: attention logits and softmax always run in fp32
    (`bgjax.models.attention`), which is what it asks for.
    """

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    num_attention_heads: tuple[int, ...]
    transformer_layers_per_block: tuple[int, ...]
    cross_attention_dim: int
    use_linear_projection: bool
    only_cross_attention: tuple[bool, ...]
    norm_num_groups: int
    norm_eps: float
    flip_sin_to_cos: bool
    freq_shift: int
    downsample_padding: int
    conditioning_channels: int
    conditioning_embedding_out_channels: tuple[int, ...]
    addition_embed_type: str | None = None  # "text_time" (SDXL) or None
    addition_time_embed_dim: int = 0  # width of each time id's sinusoid
    projection_class_embeddings_input_dim: int = 0  # add_embedding's input: pooled text + time sinusoids
    raw: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        n = len(d.get("block_out_channels", ()))
        _require(n > 0, "block_out_channels: missing or empty")
        down = tuple(d.get("down_block_types", (CROSS_ATTN_DOWN,) * (n - 1) + (PLAIN_DOWN,)))
        up = tuple(d.get("up_block_types", (PLAIN_UP,) + (CROSS_ATTN_UP,) * (n - 1)))
        _require(len(down) == n, f"down_block_types: {len(down)} entries for {n} blocks")
        for t in down:
            _require(t in (CROSS_ATTN_DOWN, PLAIN_DOWN), f"down_block_types: unsupported block {t!r}")
        # ControlNetModel configs have no up blocks; keep the UNet default for them.
        _require(len(up) == n, f"up_block_types: {len(up)} entries for {n} blocks")
        for t in up:
            _require(t in (CROSS_ATTN_UP, PLAIN_UP), f"up_block_types: unsupported block {t!r}")
        for field, ok in (
            ("mid_block_type", ("UNetMidBlock2DCrossAttn", None)),
            ("resnet_time_scale_shift", ("default", None)),
            ("class_embed_type", (None,)),
            ("addition_embed_type", (None, TEXT_TIME)),
            ("encoder_hid_dim", (None,)),
            ("encoder_hid_dim_type", (None,)),
            ("time_cond_proj_dim", (None,)),
            ("num_class_embeds", (None,)),
            ("reverse_transformer_layers_per_block", (None,)),
            ("attention_type", ("default", None)),
            ("conv_in_kernel", (3, None)),
            ("conv_out_kernel", (3, None)),
            ("timestep_post_act", (None,)),
            ("time_embedding_dim", (None,)),
            ("class_embeddings_concat", (False, None)),
            ("mid_block_only_cross_attention", (None, False)),
            ("cross_attention_norm", (None,)),
            ("time_embedding_type", ("positional", None)),
            ("dual_cross_attention", (False, None)),
            ("act_fn", ("silu", None)),
        ):
            _require(d.get(field) in ok, f"{field}: {d.get(field)!r} is not supported (supported: {ok})")
        _require(d.get("layers_per_block", 2) == int(d.get("layers_per_block", 2)),
                 "layers_per_block: per-block lists are not supported")
        # diffusers reads `attention_head_dim` as the number of heads when
        # `num_attention_heads` is absent (a historical naming slip kept for checkpoints).
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        only_cross = d.get("only_cross_attention", False)
        cfg = cls(
            in_channels=int(d.get("in_channels", 4)),
            out_channels=int(d.get("out_channels", 4)),
            block_out_channels=tuple(int(c) for c in d["block_out_channels"]),
            down_block_types=down,
            up_block_types=up,
            layers_per_block=int(d.get("layers_per_block", 2)),
            num_attention_heads=_per_block(heads, n, "attention_head_dim"),
            transformer_layers_per_block=_per_block(d.get("transformer_layers_per_block", 1), n,
                                                    "transformer_layers_per_block"),
            cross_attention_dim=int(d.get("cross_attention_dim", 768)),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            only_cross_attention=tuple(bool(v) for v in (
                only_cross if isinstance(only_cross, list | tuple) else [only_cross] * n)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
            freq_shift=int(d.get("freq_shift", 0)),
            downsample_padding=int(d.get("downsample_padding", 1)),
            conditioning_channels=int(d.get("conditioning_channels", 3)),
            conditioning_embedding_out_channels=tuple(
                d.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
            addition_embed_type=d.get("addition_embed_type"),
            addition_time_embed_dim=int(d.get("addition_time_embed_dim") or 0),
            projection_class_embeddings_input_dim=int(d.get("projection_class_embeddings_input_dim") or 0),
            raw=dict(d),
        )
        if cfg.addition_embed_type == TEXT_TIME:
            _require(cfg.addition_time_embed_dim > 0 and cfg.addition_time_embed_dim % 2 == 0,
                     f"addition_time_embed_dim: {d.get('addition_time_embed_dim')!r}, expected an even width "
                     f"for addition_embed_type 'text_time'")
            _require(cfg.projection_class_embeddings_input_dim > SDXL_TIME_IDS * cfg.addition_time_embed_dim,
                     f"projection_class_embeddings_input_dim: {d.get('projection_class_embeddings_input_dim')!r} "
                     f"leaves no room for the pooled text embedding beside {SDXL_TIME_IDS} time ids of "
                     f"{cfg.addition_time_embed_dim}")
        for c, h in zip(cfg.block_out_channels, cfg.num_attention_heads, strict=True):
            _require(c % h == 0, f"attention_head_dim: {h} heads do not divide {c} channels")
            _require(c % cfg.norm_num_groups == 0,
                     f"norm_num_groups: {cfg.norm_num_groups} does not divide {c} channels")
        return cfg

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def pooled_text_dim(self) -> int:
        """The width of the pooled text embedding a "text_time" model takes beside SDXL's 6 time ids."""
        return self.projection_class_embeddings_input_dim - SDXL_TIME_IDS * self.addition_time_embed_dim

    def has_cross_attention(self, down_index: int) -> bool:
        return self.down_block_types[down_index] == CROSS_ATTN_DOWN

    def controlnet_dict(self) -> dict:
        """The diffusers `ControlNetModel` config that `ControlNetModel.from_unet` would write."""
        keep = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
                "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
                "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
                "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
                "use_linear_projection", "upcast_attention", "resnet_time_scale_shift", "addition_embed_type",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim")
        d = {k: self.raw[k] for k in keep if k in self.raw}
        d.update(_class_name="ControlNetModel", conditioning_channels=self.conditioning_channels,
                 conditioning_embedding_out_channels=list(self.conditioning_embedding_out_channels),
                 controlnet_conditioning_channel_order="rgb", global_pool_conditions=False)
        return d


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL fields."""

    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    scaling_factor: float
    shift_factor: float
    mid_block_add_attention: bool
    # diffusers runs a VAE with this flag in fp32 when asked for fp16, whose range its activations
    # overflow (SDXL's); bgjax does the same for float16. bf16 has fp32's range and is kept.
    force_upcast: bool = True
    raw: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        n = len(d.get("block_out_channels", ()))
        _require(n > 0, "block_out_channels: missing or empty")
        for field, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            for t in d.get(field, [want] * n):
                _require(t == want, f"{field}: unsupported block {t!r}")
        _require(d.get("use_quant_conv", True) and d.get("use_post_quant_conv", True),
                 "use_quant_conv/use_post_quant_conv: VAEs without quant convs are not supported")
        return cls(
            in_channels=int(d.get("in_channels", 3)),
            out_channels=int(d.get("out_channels", 3)),
            latent_channels=int(d.get("latent_channels", 4)),
            block_out_channels=tuple(int(c) for c in d["block_out_channels"]),
            layers_per_block=int(d.get("layers_per_block", 1)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            shift_factor=float(d.get("shift_factor") or 0.0),
            mid_block_add_attention=bool(d.get("mid_block_add_attention", True)),
            force_upcast=bool(d.get("force_upcast", True)),
            raw=dict(d),
        )


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers CLIPTextConfig fields (CLIP ViT-L/14 for SD-1.x and SDXL, OpenCLIP ViT-H for SD-2.x,
    OpenCLIP ViT-bigG with its projection for SDXL's second encoder)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    projection_dim: int = 512  # CLIPTextModelWithProjection's text_projection width
    # The pooled output is taken at the first `eos_token_id`; transformers keeps the old rule for
    # configs saying 2 (SD's and SDXL's): the position of the largest token id.
    eos_token_id: int = 49407
    raw: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> CLIPTextConfig:
        if "text_config" in d:  # a full CLIPConfig: the text tower is what SD uses
            d = d["text_config"]
        act = d.get("hidden_act", "quick_gelu")
        _require(act in ("quick_gelu", "gelu"), f"hidden_act: {act!r} is not supported")
        cfg = cls(
            vocab_size=int(d.get("vocab_size", 49408)),
            hidden_size=int(d.get("hidden_size", 512)),
            intermediate_size=int(d.get("intermediate_size", 2048)),
            num_hidden_layers=int(d.get("num_hidden_layers", 12)),
            num_attention_heads=int(d.get("num_attention_heads", 8)),
            max_position_embeddings=int(d.get("max_position_embeddings", 77)),
            hidden_act=act,
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            projection_dim=int(d.get("projection_dim") or 512),
            eos_token_id=int(49407 if d.get("eos_token_id") is None else d["eos_token_id"]),
            raw=dict(d),
        )
        _require(cfg.hidden_size % cfg.num_attention_heads == 0,
                 "num_attention_heads: does not divide hidden_size")
        return cfg


def read_config_json(path: Path) -> dict:
    """Read a config.json, naming the file in any error."""
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config.json not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d
