"""The method's interpretive choices, each a field (docs/method.md says which is which)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from bgjax.models.configs import ConfigError


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    # The prompt is foreground + joiner + background; P_fg is the first part, P_bg the second.
    foreground_template: str = "A photo of {category}"
    background_template: str = "in the background of {identifier}"
    joiner: str = ", "
    # The text standing for {D} in the prompt; its single token's embedding is replaced by e_c.
    identifier_placeholder: str = "*"
    identifiers: Literal["per_category", "shared"] = "per_category"
    # BOS and the trailing EOS/padding tokens belong to both spans.
    special_tokens_in_both_spans: bool = True
    # Where mask-guided cross-attention applies: CG only (paper) or also the frozen UNet.
    mask_guided_unet: bool = False
    # PG: also zero its residuals at product positions, not only its cross-attention outputs.
    pg_mask_residuals: bool = False
    lambda_cg: float = 1.0
    lambda_pg: float = 1.0

    def __post_init__(self):
        if "{category}" not in self.foreground_template:
            raise ConfigError("foreground_template: must contain {category}")
        if self.background_template.count("{identifier}") != 1:
            raise ConfigError("background_template: must contain {identifier} exactly once")
        if self.identifiers not in ("per_category", "shared"):
            raise ConfigError(f"identifiers: {self.identifiers!r} is not per_category or shared")
        if not self.identifier_placeholder.strip():
            raise ConfigError("identifier_placeholder: must not be blank")

    @classmethod
    def from_dict(cls, d: dict) -> MethodConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"method config: unknown fields {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def module_options(self, kind: str) -> dict:
        """The module fields of component `kind` that the method decides (`components.build`'s options):
        training, saving and `load_denoiser` all build through this."""
        if kind == "unet":
            return {"region_mode": "mask_guided" if self.mask_guided_unet else "none"}
        if kind == "pg":
            return {"mask_residuals": self.pg_mask_residuals}
        return {}


# The component whose training a field shapes: the prompt's fields shape the identifiers e_c,
# mask-guided UNet attention and lambda_cg what CG learned to add, the rest PG. A later stage may
# only change the fields of the components it trains.
FIELD_OWNERS = {"mask_guided_unet": "cg", "lambda_cg": "cg", "pg_mask_residuals": "pg", "lambda_pg": "pg"}


def field_owner(name: str) -> str:
    return FIELD_OWNERS.get(name, "identifiers")
