"""Config files: `configs/X.py` defines `get_config()`; `--config.a.b=value` overrides a field."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import ml_collections

from bgjax.models.configs import ConfigError


def _parse(text: str, current):
    """The override's value, typed like the field it replaces."""
    if isinstance(current, float) and not isinstance(current, bool):
        try:
            return float(text)  # also nan and inf, which literal_eval refuses
        except ValueError:
            pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string: --config.model=models/sd15
    return _tuples(value) if isinstance(current, tuple) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def load_config(path: Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"bgjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    config = module.get_config()
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ConfigError(f"{item!r}: overrides look like --config.optim.learning_rate=1e-4")
        name, value = item[len("--config."):].split("=", 1)
        *parents, leaf = name.split(".")
        node = config
        for p in parents:
            node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(f"--config.{name}: no such field in {path}")
        try:
            node[leaf] = _parse(value, node[leaf])
        except TypeError as e:
            raise ConfigError(f"--config.{name}: {e}") from None
    return config
