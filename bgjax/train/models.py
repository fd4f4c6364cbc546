"""The models of a training stage: loaded from a base model directory or created from configs,
split into trained params (float32 masters) and frozen ones (in the compute dtype), and written
back as a bgjax model directory when training ends.

One `MethodConfig` per stage (`stage_method`) builds the modules, the prompts, and is what the
exported `method.json` holds, so `load_denoiser` serves what was trained.

An SDXL base (a model with `text_encoder_2/`) brings its second text encoder and tokenizer, a second
identifier table (`identifiers_2`) for the stage that learns the categories, and the added conditioning
(pooled embedding, time ids) that `bgjax.train.losses` builds per example.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bgjax
from bgjax import model_dir
from bgjax.fileio import write_json
from bgjax.method.config import MethodConfig, field_owner
from bgjax.method.denoiser import Denoiser
from bgjax.method.prompts import CategoryVocabulary, PromptBuilder, init_identifiers
from bgjax.method.store import METHOD_FILE, load_identifier_tables, load_method, load_method_config, save_method
from bgjax.method.text import IDENTIFIERS, TextEncoders, zeros_for_empty_prompt
from bgjax.models.byte_tokenizer import write_byte_tokenizer
from bgjax.models.components import build, init_params
from bgjax.models.configs import ConfigError, UNetConfig, read_config_json
from bgjax.models.controlnet import controlnet_params_from_unet
from bgjax.models.text_encoder import load_tokenizer
from bgjax.sampling.schedulers import NoiseSchedule


@dataclasses.dataclass(frozen=True)
class Stage:
    trains: tuple[str, ...]  # identifiers belong to the stage that learns the categories
    needs: tuple[str, ...]  # loaded from the base model, or created
    uses: tuple[str, ...] = ()  # loaded, frozen, when the base model has them


STAGES = {
    "vae": Stage(trains=("vae",), needs=("vae",)),
    "unet": Stage(trains=("unet",), needs=("vae", "text_encoder", "unet")),
    "cg": Stage(trains=("cg", *IDENTIFIERS.values()), needs=("vae", "text_encoder", "unet", "cg")),
    "pg": Stage(trains=("pg",), needs=("vae", "text_encoder", "unet", "pg"), uses=("cg",)),  # stage 1's CG, frozen
}
TRAINED = {name: s.trains for name, s in STAGES.items()}
# SDXL's second text encoder: part of every stage with a text encoder, when the base model has it (or
# config.init gives it); its tokenizer folder beside the first's.
TEXT_2 = "text_encoder_2"
TOKENIZER_DIRS = {"text_encoder": "tokenizer", TEXT_2: "tokenizer_2"}
REMAT_KINDS = ("unet", "cg", "pg")


@dataclasses.dataclass(frozen=True, eq=False)
class StageModels:
    """The modules of a stage (closed over by the jitted step) and what the data needs from them."""

    stage: str
    vae: nn.Module
    denoiser: Denoiser | None
    text_encoder: nn.Module | None
    schedule: NoiseSchedule | None
    method: MethodConfig
    configs: dict  # kind -> the config dict written with the component
    categories: list[str]
    prompts: PromptBuilder | None
    tokenizer_dirs: dict[str, Path]  # "tokenizer" (and "tokenizer_2"): copied into the trained model
    text_encoder_2: nn.Module | None = None  # SDXL's second text encoder
    # SDXL: a dropped prompt's conditioning (context and pooled embedding) is zeros, as the pipeline's
    # unconditional pass makes it for an empty negative prompt (`force_zeros_for_empty_prompt`).
    zeros_for_empty_prompt: bool = False

    @property
    def text_encoders(self) -> TextEncoders:
        return TextEncoders.of({"text_encoder": self.text_encoder, TEXT_2: self.text_encoder_2})

    def prompt_tables(self, data_categories: dict[str, int]) -> dict[str, np.ndarray]:
        """Per data category id: the prompt arrays and the identifier table row it trains."""
        names = [n for n, _ in sorted(data_categories.items(), key=lambda kv: kv[1])]
        tables = self.prompts.batch(names)
        vocab = CategoryVocabulary(self.categories)
        shared = self.method.identifiers == "shared"
        tables["identifier_row"] = np.asarray([0 if shared else vocab.id(n) for n in names], np.int32)
        return tables


def _stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"stage: {name!r} is not one of {sorted(STAGES)}")
    return STAGES[name]


def _has_method(base: Path | None) -> bool:
    return base is not None and (base / METHOD_FILE).is_file()


def stage_method(stage: str, overrides: dict, base: Path | None) -> MethodConfig:
    """The stage's `MethodConfig`: the base model's `method.json` (or the defaults), with the fields
    of `overrides` that are set (not None). A field shaping a component of the base that this stage
    does not retrain (`field_owner`) must keep the base's value: CG, the identifiers and PG were
    trained with it, so the override is refused, naming the field."""
    overrides = {k: v for k, v in dict(overrides).items() if v is not None}
    if not _has_method(base):
        return MethodConfig.from_dict(overrides)
    MethodConfig.from_dict(overrides)  # names unknown fields
    saved = load_method_config(base)
    present = {*model_dir.components(base), "identifiers"}
    for name, value in overrides.items():
        owner = field_owner(name)
        if owner in present and owner not in _stage(stage).trains and value != getattr(saved, name, value):
            raise ConfigError(f"config.method.{name}: {value!r}, but {base / METHOD_FILE} says "
                              f"{getattr(saved, name)!r}, which its {owner} was trained with; the {stage} stage "
                              f"does not retrain {owner} (drop the override)")
    return dataclasses.replace(saved, **overrides)


def _init(kind: str, module: nn.Module, key: jax.Array, shapes_only: bool = False) -> dict:
    init = functools.partial(init_params, kind, module)
    return jax.eval_shape(init, key) if shapes_only else jax.jit(init)(key)  # one compiled init, not op by op


def _controlnet_config(unet_config: dict, vae_config: dict, overrides: dict) -> dict:
    """A branch's config: the UNet's ControlNet config, its conditioning embedding downsampling the
    image by the VAE's factor (diffusers' channels, as many levels as that takes), then `overrides`."""
    levels = len(vae_config["block_out_channels"])
    config = {**UNetConfig.from_dict(unet_config).controlnet_dict(),
              "conditioning_embedding_out_channels": [16, 32, 96, 256][:levels]}
    return {**config, **overrides}


@dataclasses.dataclass(frozen=True)
class _Sources:
    """Where a stage's components come from."""

    stage: str
    base: Path | None
    present: tuple[str, ...]  # the base model's components
    init: dict  # config.init
    method: MethodConfig
    dtype: jnp.dtype
    key: jax.Array
    attention: str = "auto"  # the attention kernel (bgjax.models.attention)
    remat: bool = False  # gradient checkpointing in the UNet and the branches
    shapes_only: bool = False  # a resume restores the trained params: new ones are only ShapeDtypeStructs

    def options(self, kind: str) -> dict:
        """`components.build`'s module fields for `kind`: the method's, the attention kernel and, for the UNet
        and the branches, gradient checkpointing."""
        remat = {"remat": self.remat} if kind in REMAT_KINDS else {}
        return {**self.method.module_options(kind), "attention": self.attention, **remat}

    def where(self, kind: str) -> str:
        return f"{self.base} has no {kind}/" if self.base else "no base model (config.model) is given"


def _from_base(kind: str, src: _Sources):
    dtype = jnp.float32 if kind in TRAINED[src.stage] else src.dtype
    module, params = model_dir.load_component(src.base, kind, src.dtype, dtype, **src.options(kind))
    return module, params, read_config_json(src.base / kind / "config.json")


def _new_branch(kind: str, src: _Sources, built: dict, i: int):
    """A fresh CG / PG starts as a copy of the UNet's encoder (`ControlNetModel.from_unet`)."""
    config = _controlnet_config(built["unet"][2], built["vae"][2], src.init.get(kind, {}))
    module = build(kind, config, src.dtype, **src.options(kind))
    fresh = _init(kind, module, jax.random.fold_in(src.key, i), src.shapes_only)
    params = (jax.eval_shape(controlnet_params_from_unet, built["unet"][1], fresh) if src.shapes_only
              else controlnet_params_from_unet(built["unet"][1], fresh))
    return module, params, config


def _new_component(kind: str, src: _Sources, built: dict, i: int):
    config = dict(src.init[kind])
    module = build(kind, config, src.dtype, **src.options(kind))
    shapes_only = src.shapes_only and kind in TRAINED[src.stage]
    return module, _init(kind, module, jax.random.fold_in(src.key, i), shapes_only), config


def _component(kind: str, src: _Sources, built: dict, i: int):
    """(module, params, config) of `kind`, from the first source that has it; trained params float32."""
    if kind in src.present:
        return _from_base(kind, src)
    if kind in ("cg", "pg"):
        make = _new_branch
    elif kind in src.init:
        make = _new_component
    else:
        raise ConfigError(f"config.init.{kind}: needed by the {src.stage} stage, and {src.where(kind)}")
    module, params, config = make(kind, src, built, i)
    # A new branch copies the frozen UNet's encoder, which is already in the compute dtype: cast back, so
    # trained params are float32 masters (bf16 ones would round lr-1e-5 updates away).
    return module, _cast(params, jnp.float32 if kind in TRAINED[src.stage] else src.dtype), config


def _cast(params, dtype: jnp.dtype):
    """Arrays or ShapeDtypeStructs (a resume's trained params) in `dtype`."""
    def cast(x):
        return jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(dtype)
    return jax.tree.map(cast, params)


def _tokenizer_dir(src: _Sources, workdir: Path, name: str) -> Path:
    """The base model's tokenizer folder `name`, or bgjax's byte-level one (the second pads with "!", as SDXL's)."""
    if src.base and (src.base / name).is_dir():
        return src.base / name
    if src.init.get("tokenizer") != "byte":
        raise ConfigError(f"config.init.tokenizer: the base model has no {name}/; set it to 'byte'")
    return write_byte_tokenizer(Path(workdir) / name, **({"pad_token": "!"} if name == "tokenizer_2" else {}))


def _identifiers(src: _Sources, data_categories: dict[str, int], tokenizers: dict, params: dict
                 ) -> tuple[list[str], dict[str, jax.Array]]:
    """The category vocabulary and the identifier tables, one per text encoder (`IDENTIFIERS`): the base
    model's, or new ones for the stage that learns them (each row at the placeholder token's embedding)."""
    trained = "identifiers" in TRAINED[src.stage]
    if _has_method(src.base):
        saved, categories, _ = load_method(src.base)
        missing = sorted(set(data_categories) - set(categories))
        if missing:
            raise ConfigError(f"{src.base / METHOD_FILE}: the data has categories the model was not trained on: "
                              f"{missing}")
        if saved.identifiers == src.method.identifiers:  # else the cg stage starts a new table
            tables = load_identifier_tables(src.base)
            return categories, {k: jnp.asarray(v, jnp.float32 if trained else src.dtype) for k, v in tables.items()}
    categories = sorted(data_categories, key=data_categories.get)
    if not trained:
        return categories, {}
    rows = len(categories) if src.method.identifiers == "per_category" else 1
    tables = {}
    for kind, tokenizer in tokenizers.items():
        embedding = params[kind]["text_model"]["embeddings.token_embedding"]["embedding"]
        placeholder = tokenizer(src.method.identifier_placeholder, add_special_tokens=False).input_ids[0]
        init_ids = functools.partial(init_identifiers, embedding, placeholder, rows)
        tables[IDENTIFIERS[kind]] = jax.eval_shape(init_ids) if src.shapes_only else init_ids()
    return categories, tables


def _scheduler_config(src: _Sources) -> dict:
    if src.base and (src.base / "scheduler").is_dir():
        return read_config_json(src.base / "scheduler" / "scheduler_config.json")
    if src.init.get("scheduler") is None:
        raise ConfigError("config.init.scheduler: the base model has no scheduler/; give a scheduler config")
    return dict(src.init["scheduler"])


def load_stage(config, data_categories: dict[str, int], dtype: jnp.dtype, workdir: Path, shapes_only: bool = False
               ) -> tuple[StageModels, dict, dict]:
    """(models, trained params in float32, frozen params in `dtype`) for `config.stage`. With
    `shapes_only` (a resume, which restores them) new trained params are ShapeDtypeStructs, not initialised."""
    stage = _stage(config.stage)
    base = Path(config.model) if config.model else None
    present = tuple(model_dir.components(base)) if base else ()
    method = stage_method(config.stage, config.method.to_dict(), base)
    src = _Sources(config.stage, base, present, config.init.to_dict(), method, dtype, jax.random.key(config.seed),
                   config.attention, config.remat, shapes_only)
    built = {}
    for i, kind in enumerate(stage.needs):
        built[kind] = _component(kind, src, built, i)
    if "text_encoder" in stage.needs and (TEXT_2 in present or TEXT_2 in src.init):
        built[TEXT_2] = _component(TEXT_2, src, built, len(stage.needs))
    for kind in stage.uses:
        if kind in present:
            built[kind] = _from_base(kind, src)
    modules = {k: m for k, (m, _, _) in built.items()}
    params = {k: p for k, (_, p, _) in built.items()}
    configs = {k: c for k, (_, _, c) in built.items()}

    prompts, tokenizer_dirs, categories = None, {}, sorted(data_categories, key=data_categories.get)
    if "text_encoder" in stage.needs:
        encoders = [k for k in TOKENIZER_DIRS if k in built]
        tokenizer_dirs = {TOKENIZER_DIRS[k]: _tokenizer_dir(src, workdir, TOKENIZER_DIRS[k]) for k in encoders}
        tokenizers = {k: load_tokenizer(tokenizer_dirs[TOKENIZER_DIRS[k]]) for k in encoders}
        prompts = PromptBuilder(tokenizers["text_encoder"], method, tokenizer_2=tokenizers.get(TEXT_2))
        categories, tables = _identifiers(src, data_categories, tokenizers, params)
        params.update(tables)
    schedule = None
    if config.stage != "vae":
        configs["scheduler"] = _scheduler_config(src)
        schedule = NoiseSchedule.from_config(configs["scheduler"])
    denoiser = Denoiser(modules["unet"], modules.get("cg"), modules.get("pg")) if "unet" in modules else None
    models = StageModels(config.stage, modules["vae"], denoiser, modules.get("text_encoder"), schedule, method,
                         configs, categories, prompts, tokenizer_dirs, modules.get(TEXT_2),
                         TEXT_2 in modules and zeros_for_empty_prompt(base))
    trained = {k: v for k, v in params.items() if k in stage.trains}
    frozen = {k: v for k, v in params.items() if k not in stage.trains}
    return models, trained, frozen


def _link_or_copy(target: Path, link: Path, final: Path) -> None:
    """`link` -> `target`, relative to the model's final place `final` (a sibling of `link`'s folder),
    so the pair can move together; a copy when the target lies inside the installed package, which
    a reinstall moves or deletes."""
    target = target.resolve()
    if target.is_relative_to(Path(bgjax.__file__).parent.resolve()):
        shutil.copytree(target, link, symlinks=False)
    else:
        os.symlink(os.path.relpath(target, final.parent.resolve() / final.name), link, target_is_directory=True)


def _provenance(stage: str, base: Path | None, used: list[str], written: list[str], run: str) -> dict:
    """Per component: the run that made it and, for what this run trained, the runs of the
    components it was trained against (`used`: those in the train step); the base model's own
    records for what it kept."""
    before = model_dir.provenance(base) if base else {}
    made = {k: {"run": run} for k in written}
    trained = [k for k in TRAINED[stage] if k in written]
    against = {k: made[k]["run"] if k in made else before.get(k, {}).get("run", "unknown")
               for k in sorted(used) if k not in trained}
    for k in trained:
        made[k]["against"] = against
    return {**before, **made}


def save_model(models: StageModels, config, params: dict, out: Path, source: str) -> None:
    """A bgjax model directory, so `bgjax export` and generation read a run directly: trained and
    newly created components written from `params`; every other component of the base model (also
    those this stage did not load, like PG under a CG stage) linked, relative to `out`, or copied
    from inside the installed package. `method.json` is the stage's `MethodConfig`."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = Path(config.model) if config.model else None
    present = model_dir.components(base) if base else []
    trained = TRAINED[models.stage]
    kinds = sorted({*present, *(k for k in models.configs if k != "scheduler")})
    written = []
    for kind in kinds:
        if kind in present and kind not in trained:
            _link_or_copy(base / kind, tmp / kind, out)
        else:
            model_dir.save_component(tmp, kind, models.configs[kind], jax.device_get(params[kind]))
            written.append(kind)
    for name, folder in models.tokenizer_dirs.items():
        shutil.copytree(folder, tmp / name)
    if models.text_encoder_2 is not None and base is not None and (base / "model_index.json").is_file():
        shutil.copyfile(base / "model_index.json", tmp / "model_index.json")  # SDXL's force_zeros_for_empty_prompt
    if "scheduler" in models.configs:
        write_json(tmp / "scheduler" / "scheduler_config.json", models.configs["scheduler"])
    if "identifiers" in trained:
        tables = {k: np.asarray(jax.device_get(params[k])) for k in IDENTIFIERS.values() if k in params}
        save_method(tmp, models.method, models.categories, **tables)
        written.append("identifiers")
    elif _has_method(base):
        _, categories, _ = load_method(base)  # the stored fp32 tables, not the compute-dtype copies
        save_method(tmp, models.method, categories, **load_identifier_tables(base))
    (tmp / "train_config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str))
    run = f"{source} in {out.parent.resolve()}"
    model_dir.write_manifest(tmp, kinds, source, _provenance(models.stage, base, list(params), written, run))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
