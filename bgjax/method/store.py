"""Where a model directory keeps the method: `method.json` (the `MethodConfig` fields and the
category vocabulary) and `identifiers.safetensors` (the learned embeddings e_c, rows = categories:
`identifiers` in the first text encoder's token space, and for SDXL `identifiers_2` in the second's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bgjax.fileio import CheckpointError, read_safetensors, write_json, write_safetensors
from bgjax.method.config import MethodConfig
from bgjax.models.configs import ConfigError, read_config_json

METHOD_FILE = "method.json"
IDENTIFIERS_FILE = "identifiers.safetensors"
# In a diffusers folder (`bgjax export`): one textual-inversion file per identifier token.
IDENTIFIERS_DIR = "textual_inversion"


def save_method(model_dir: Path, config: MethodConfig, categories: list[str], identifiers: np.ndarray,
                identifiers_2: np.ndarray | None = None) -> None:
    """The method's choices, the category vocabulary and the identifier table (one row per
    category, or one row when the identifier is shared); SDXL's second table beside it."""
    rows = len(categories) if config.identifiers == "per_category" else 1
    tables = {"identifiers": identifiers, "identifiers_2": identifiers_2}
    for name, table in tables.items():
        if table is not None and np.shape(table)[0] != rows:
            raise ValueError(f"{name}: {np.shape(table)[0]} rows for {rows} expected "
                             f"({config.identifiers}, {len(categories)} categories)")
    write_json(Path(model_dir) / METHOD_FILE, {**config.to_dict(), "categories": list(categories)})
    write_safetensors(Path(model_dir) / IDENTIFIERS_FILE,
                      {k: np.asarray(v, np.float32) for k, v in tables.items() if v is not None})


def load_identifier_tables(model_dir: Path) -> dict[str, np.ndarray]:
    """{"identifiers": ...} and, for SDXL, "identifiers_2": the stored tables."""
    return read_safetensors(Path(model_dir) / IDENTIFIERS_FILE)


def load_method(model_dir: Path) -> tuple[MethodConfig, list[str], np.ndarray]:
    """(config, categories, the first text encoder's identifier table)."""
    path = Path(model_dir) / METHOD_FILE
    d = read_config_json(path)
    categories = d.pop("categories", [])
    try:
        config = MethodConfig.from_dict(d)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, categories, load_identifier_tables(model_dir)["identifiers"]


def load_method_config(model_dir: Path) -> MethodConfig:
    """The model's `MethodConfig`; the defaults for a model without one (a base model)."""
    path = Path(model_dir) / METHOD_FILE
    return load_method(model_dir)[0] if path.is_file() else MethodConfig()


def identifier_tokens(categories: list[str], shared: bool) -> list[str]:
    """The tokens the identifiers take in a diffusers tokenizer: <bg-rice_cooker>, or <bg-shared>."""
    return ["<bg-shared>"] if shared else ["<bg-" + "_".join(name.split()) + ">" for name in categories]


# `bgjax export` names the PyTorch pipeline in model_index.json as diffusers' custom pipelines are named,
# [module, class], and writes the module beside it: two lines that import the class from bgjax.torch_compat
# (diffusers runs a folder's module only with `trust_remote_code=True`).
TORCH_PIPELINE = ("bgjax_pipeline", "BackgroundTorchPipeline")
TORCH_PIPELINE_LOADER = ('"""diffusers loads bgjax\'s pipeline through this file: '
                         'DiffusionPipeline.from_pretrained(folder, trust_remote_code=True). pip install bgjax."""\n'
                         "from bgjax.torch_compat import BackgroundTorchPipeline  # noqa: F401\n")
