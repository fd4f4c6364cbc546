"""Config files: `get_config()` in a file that ships with bgjax (`bgjax/configs/NAME.py`, loaded by NAME)
or any other path; `--config.a.b=value` overrides a field."""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path

import ml_collections

from bgjax.models.configs import ConfigError

BUNDLED = Path(__file__).parent.parent / "configs"
_KINDS = {bool: "true or false (True / False)", int: "an integer", float: "a number", str: "a string",
          tuple: "a tuple, e.g. (0.8, 1.0)", list: "a list, e.g. [1, 2]", dict: "a dict, e.g. {'a': 1}"}


def bundled_configs() -> dict[str, str]:
    """Name -> the first line of its docstring, for every config that ships with bgjax (read, not run)."""
    out = {}
    for path in sorted(BUNDLED.glob("[!_]*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        out[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def resolve_config(spec: str | Path) -> Path:
    """A config file's path: an existing file as given, else a bundled config's name (with or without .py)."""
    path = Path(spec)
    if path.is_file():
        return path
    bundled = BUNDLED / f"{path.stem}.py"
    if path.parent == Path(".") and path.suffix in ("", ".py") and bundled.is_file():
        return bundled
    names = bundled_configs()
    close = difflib.get_close_matches(path.stem, names, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise FileNotFoundError(f"{spec}: config file not found, and not a bundled config; {hint}"
                            f"bundled: {', '.join(names)} (`bgjax configs` says what each trains)")


def _kind(value) -> str:
    return _KINDS.get(type(value), type(value).__name__)


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
    if isinstance(current, str) and not isinstance(value, str):
        return text  # a string field keeps what was written: --config.model=2024
    return _tuples(value) if isinstance(current, tuple) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted field name, sub-dicts included."""
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            names += _fields(value, f"{prefix}{key}.")
    return names


def _close(config: ml_collections.ConfigDict, name: str) -> list[str]:
    """Field names like a misspelt `name`: its siblings by leaf name when its parent exists, else any field."""
    *parents, leaf = name.split(".")
    node = config
    for p in parents:
        node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
    if isinstance(node, ml_collections.ConfigDict) and parents:
        prefix = ".".join(parents) + "."
        return [prefix + k for k in difflib.get_close_matches(leaf, list(node.keys()), n=3, cutoff=0.7)]
    return difflib.get_close_matches(name, _fields(config), n=3, cutoff=0.7)


def _override(config: ml_collections.ConfigDict, item: str, path: Path) -> None:
    if not item.startswith("--config.") or "=" not in item:
        raise ConfigError(f"{item!r}: overrides look like --config.optim.learning_rate=1e-4")
    name, text = item[len("--config."):].split("=", 1)
    *parents, leaf = name.split(".")
    node = config
    for p in parents:
        node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        close = _close(config, name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"--config.{name}: {path} has no field {name!r}{hint}")
    current, value = node[leaf], _parse(text, node[leaf])
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
        value = ml_collections.ConfigDict(value)
    # ml_collections lets True into an int field and words into none; bgjax says which type it wants.
    wrong = (current is not None and not isinstance(current, ml_collections.ConfigDict)
             and isinstance(value, bool) != isinstance(current, bool))
    try:
        if wrong:
            raise TypeError
        node[leaf] = value
    except TypeError:
        expected = "a group of fields (set them one by one)" if isinstance(current, ml_collections.ConfigDict) \
            else _kind(current)
        raise ConfigError(f"--config.{name}={text}: {name} must be {expected}, got {text!r} "
                          f"(its default is {current!r})") from None


def load_config(spec: str | Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """A bundled config's name or a config file's path, with `--config.a.b=value` overrides applied."""
    path = resolve_config(spec)
    module_spec = importlib.util.spec_from_file_location(f"bgjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    config = module.get_config()
    for item in overrides:
        _override(config, item, path)
    return config
