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
