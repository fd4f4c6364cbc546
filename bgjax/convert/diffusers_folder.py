"""diffusers pipeline folders <-> bgjax model directories."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bgjax import model_dir
from bgjax.convert.checkpoint_io import find_weights, read_weights
from bgjax.convert.torch_layout import params_to_state_dict, state_dict_to_params
from bgjax.fileio import CheckpointError, atomic_write, read_safetensors, write_json, write_safetensors
from bgjax.method.config import MethodConfig
from bgjax.method.store import (
    IDENTIFIERS_DIR,
    METHOD_FILE,
    TORCH_PIPELINE,
    TORCH_PIPELINE_LOADER,
    identifier_tokens,
    load_identifier_tables,
    load_method,
    save_method,
)
from bgjax.models.components import COMPONENTS, TEXT_ENCODERS, build, param_shapes
from bgjax.models.configs import ConfigError, read_config_json
from bgjax.models.text_encoder import load_tokenizer

REQUIRED = ("unet", "vae", "text_encoder")
COPIED = ("tokenizer", "tokenizer_2", "scheduler")
# Each text encoder's tokenizer folder (SDXL has two).
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
# What a diffusers StableDiffusion(XL)(ControlNet)Pipeline loads; the paper's cg/ and pg/ load on their own.
PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet")
# Known non-weight entries, skipped with the reason recorded.
IGNORED = {kind: {"text_model.embeddings.position_ids": "position-id buffer, recomputed"} for kind in TEXT_ENCODERS}
# Other top-level entries a diffusers pipeline folder may hold, and why they are not converted.
UNUSED = {"safety_checker": "bgjax has no safety checker", "feature_extractor": "only the safety checker uses it",
          "image_encoder": "IP-Adapter image encoder, not part of this model", "README.md": "documentation",
          ".gitattributes": "git metadata",
          f"{TORCH_PIPELINE[0]}.py": "the loader of bgjax's PyTorch pipeline; `bgjax export` writes it again"}
# diffusers' SDXL textual-inversion layout: one embedding per text encoder.
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")
_VAE_DEPRECATED = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def canonical_state(kind: str, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Undo naming variants that diffusers / transformers still load.

    transformers >= 5 saves CLIPTextModel without the `text_model.` prefix (CLIPTextModelWithProjection
    keeps it beside `text_projection`); old diffusers VAEs name their attention query/key/value/proj_attn
    and may store those as 1x1 convs.
    """
    out = {}
    for key, value in state.items():
        if kind in TEXT_ENCODERS and not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        if kind == "vae" and ".attentions." in key:
            for old, new in _VAE_DEPRECATED.items():
                key = key.replace(old, new)
            if value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def convert_component(kind: str, state: Mapping[str, np.ndarray], config: dict, source: str,
                      out: Path) -> None:
    """One component's torch-layout state dict -> params in the bgjax model directory `out`."""
    try:
        module = build(kind, config)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {kind} config: {e}") from None
    params = state_dict_to_params(canonical_state(kind, state), param_shapes(kind, module), source=source,
                                  ignore=IGNORED.get(kind))
    model_dir.save_component(out, kind, config, params)


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What `bgjax convert` wrote, and one line per input it did not use (with the reason)."""

    components: list[str]
    notes: list[str]


def check_tokenizer(folder: Path, text_encoder_config: Mapping, source: str) -> None:
    """The tokenizer copied into a model loads, and its ids fit the text encoder's embedding table."""
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: the tokenizer does not load ({e})") from None
    rows = int(text_encoder_config.get("vocab_size", 0))
    if len(tokenizer) > rows:
        raise CheckpointError(f"{source}: the tokenizer has {len(tokenizer)} tokens, more than the text "
                              f"encoder's {rows} embedding rows (vocab_size)")


def import_diffusers(src: Path, out: Path) -> Conversion:
    """A diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, optional
    controlnet/; a bgjax export's cg/, pg/, textual_inversion/ and the method in model_index.json) -> a bgjax
    model directory. Whatever is not converted is listed in the result's notes and conversion_report.json."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder")
    missing = [k for k in REQUIRED if not (src / k).is_dir()]
    if missing:
        raise CheckpointError(f"{src}: not a diffusers pipeline folder (missing {', '.join(m + '/' for m in missing)})")
    kinds = [k for k in COMPONENTS if (src / k).is_dir()]
    notes = []
    for kind in tqdm(kinds, desc="convert", unit="component"):
        weights = find_weights(src / kind)
        config = read_config_json(src / kind / "config.json")
        convert_component(kind, read_weights(weights), config, str(weights), out)
        notes += [f"{p.relative_to(src)}: not used (another copy of {weights.relative_to(src)})"
                  for p in sorted((src / kind).iterdir()) if p != weights and _is_weights(p)]
    copy_folders(src, out)
    for encoder in (k for k in TEXT_ENCODERS if k in kinds):
        tokenizer = TOKENIZERS[encoder]
        if (src / tokenizer).is_dir():
            check_tokenizer(out / tokenizer, read_config_json(out / encoder / "config.json"), str(src / tokenizer))
        else:
            notes.append(f"{src}: no {tokenizer}/; the model cannot encode prompts until one is copied to "
                         f"{out / tokenizer}")
    method = None
    if (src / "model_index.json").is_file():
        shutil.copyfile(src / "model_index.json", out / "model_index.json")
        method = read_config_json(src / "model_index.json").get("method")
    if method:
        import_method(dict(method), src, out)
    elif (src / IDENTIFIERS_DIR).is_dir():
        notes.append(f"{IDENTIFIERS_DIR}/: not used (no method in model_index.json says which categories its "
                     f"tokens are)")
    used = {*kinds, *COPIED, "model_index.json", IDENTIFIERS_DIR}
    notes += [f"{p.name}{'/' * p.is_dir()}: not used ({UNUSED.get(p.name, 'not a part bgjax converts')})"
              for p in sorted(src.iterdir()) if p.name not in used]
    model_dir.write_manifest(out, kinds, source=str(src.resolve()))
    write_json(out / "conversion_report.json", {"source": str(src.resolve()), "not_used": notes})
    return Conversion(kinds, notes)


def _is_weights(path: Path) -> bool:
    return path.is_file() and path.name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".ckpt"))


def copy_folders(src: Path, out: Path) -> None:
    for name in COPIED:
        if (src / name).is_dir():
            shutil.copytree(src / name, out / name, dirs_exist_ok=True)


def import_method(method: dict, src: Path, out: Path) -> None:
    """A bgjax export's method (model_index.json's "method") and textual_inversion/ -> method.json +
    identifiers.safetensors."""
    categories = method.pop("categories", [])
    try:
        config = MethodConfig.from_dict(method)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{src / 'model_index.json'}: method: {e}") from None
    tokens = identifier_tokens(categories, config.identifiers == "shared")
    rows, rows_2 = _identifier_rows(src / IDENTIFIERS_DIR)
    missing = [t for t in tokens if t not in rows]
    if missing:
        raise CheckpointError(f"{src / IDENTIFIERS_DIR}: no embedding for the identifier token(s) "
                              f"{', '.join(missing)} that the method in {src / 'model_index.json'} implies")
    extra = sorted(set(rows) - set(tokens))
    if extra:
        raise CheckpointError(f"{src / IDENTIFIERS_DIR}: token(s) {', '.join(extra)} are not the identifiers of "
                              f"the categories in {src / 'model_index.json'}")
    save_method(out, config, categories, np.stack([rows[t] for t in tokens]),
                np.stack([rows_2[t] for t in tokens]) if rows_2 else None)


def _identifier_rows(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The exported rows by token: SD's files hold {token: row}; SDXL's {"clip_l": (1, d), "clip_g": (1, d2)},
    their token named by the export's tokens.json (file i holds token i)."""
    rows, rows_2 = {}, {}
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        entry = read_safetensors(path)
        if set(entry) != set(SDXL_EMBEDDING_KEYS):
            rows.update(entry)
            continue
        names = read_config_json(folder / "tokens.json").get("tokens", [])
        if len(names) != len(files):
            raise CheckpointError(f"{folder / 'tokens.json'}: {len(names)} tokens for {len(files)} embedding files")
        token = names[files.index(path)]
        rows[token], rows_2[token] = (entry[k].reshape(-1) for k in SDXL_EMBEDDING_KEYS)
    return rows, rows_2


def export_diffusers(model: Path, out: Path) -> list[str]:
    """A bgjax model directory -> a diffusers folder that `from_pretrained` loads key for key. A model with the
    paper's branches or a method becomes a `bgjax.torch_compat.BackgroundTorchPipeline` folder (its
    model_index.json holds the method, `textual_inversion/` the identifiers), any other a
    StableDiffusion(ControlNet)Pipeline folder."""
    model, out = Path(model), Path(out)
    kinds = model_dir.components(model)
    for kind in tqdm(kinds, desc="export", unit="component"):
        _, params = model_dir.load_component(model, kind)
        config = read_config_json(model / kind / "config.json")
        write_json(out / kind / "config.json", config)
        write_safetensors(out / kind / COMPONENTS[kind].weights_name, params_to_state_dict(params),
                          metadata={"format": "pt"})
    copy_folders(model, out)
    method = None
    if (model / METHOD_FILE).is_file():
        config, categories, _ = load_method(model)
        method = {**config.to_dict(), "categories": categories}
        export_identifiers(model, out / IDENTIFIERS_DIR)
    if "text_encoder_2" not in kinds and (method is not None or {"cg", "pg"} & set(kinds)):
        index = torch_pipeline_index(model, kinds, method)
        atomic_write(out / f"{TORCH_PIPELINE[0]}.py", lambda tmp: Path(tmp).write_text(TORCH_PIPELINE_LOADER))
    else:  # SDXL: StableDiffusionXLPipeline's folder (the PyTorch pipeline is SD-1.x/2.x only); diffusers ignores
        # the method entry, `bgjax convert` restores the categories from it
        index = (read_config_json(model / "model_index.json") if (model / "model_index.json").is_file()
                 else pipeline_index(model, kinds))
        if method is not None:
            index["method"] = method
    write_json(out / "model_index.json", index)
    return kinds


def pipeline_index(model: Path, kinds: list[str]) -> dict:
    """A model_index.json for StableDiffusion(XL)(ControlNet)Pipeline."""
    xl = "text_encoder_2" in kinds
    name = "StableDiffusionXL" if xl else "StableDiffusion"
    index = {"_class_name": f"{name}ControlNetPipeline" if "controlnet" in kinds else f"{name}Pipeline",
             "feature_extractor": [None, None]}
    if xl:  # what StableDiffusionXLPipeline.save_pretrained writes for SDXL base
        index.update(image_encoder=[None, None], force_zeros_for_empty_prompt=True)
    else:
        index.update(requires_safety_checker=False, safety_checker=[None, None])
    return _components(index, model, [k for k in kinds if k in PIPELINE_COMPONENTS])


def torch_pipeline_index(model: Path, kinds: list[str], method: dict | None) -> dict:
    """A model_index.json for `bgjax.torch_compat.BackgroundTorchPipeline`, named as diffusers names a custom
    pipeline ([module, class], the module beside it), with the method (settings and categories)."""
    index = {"_class_name": list(TORCH_PIPELINE), "method": method,
             **{k: [None, None] for k in ("cg", "pg") if k not in kinds}}
    return _components(index, model, [k for k in kinds if k in ("unet", "vae", "text_encoder", "cg", "pg")])


def _components(index: dict, model: Path, kinds: list[str]) -> dict:
    """`index` with the [library, class] entries of the components `kinds`, the tokenizers and the scheduler."""
    for kind in kinds:
        library = "transformers" if kind in TEXT_ENCODERS else "diffusers"
        index[kind] = [library, COMPONENTS[kind].diffusers_class]
    for tokenizer in TOKENIZERS.values():
        if (model / tokenizer).is_dir():
            index[tokenizer] = ["transformers", "CLIPTokenizer"]
    if (model / "scheduler" / "scheduler_config.json").is_file():
        scheduler = read_config_json(model / "scheduler" / "scheduler_config.json")
        index["scheduler"] = ["diffusers", scheduler.get("_class_name", "DDIMScheduler")]
    return index


def export_identifiers(model: Path, out: Path) -> list[str]:
    """One diffusers textual-inversion file per identifier token (diffusers loads one token per file): SD's
    {token: row}; SDXL's {"clip_l": row, "clip_g": row_2}, each (1, width), the token given when loading
    (`tokens.json` lists them: file i holds token i)."""
    config, categories, _ = load_method(model)
    tables = load_identifier_tables(model)
    tokens = identifier_tokens(categories, config.identifiers == "shared")
    for i, token in enumerate(tokens):
        if "identifiers_2" in tables:
            entry = dict(zip(SDXL_EMBEDDING_KEYS, (tables["identifiers"][i][None], tables["identifiers_2"][i][None]),
                             strict=True))
        else:
            entry = {token: tables["identifiers"][i]}
        write_safetensors(out / f"{i:04d}.safetensors", entry, metadata={"format": "pt"})
    write_json(out / "tokens.json", {"tokens": tokens, "categories": categories})
    return tokens
