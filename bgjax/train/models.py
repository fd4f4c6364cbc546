"""The models of a training stage: loaded from a base model directory or created from configs,
split into trained params (float32 masters) and frozen ones (in the compute dtype), and written
back as a bgjax model directory when training ends."""

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

from bgjax import model_dir
from bgjax.convert.checkpoint_io import write_json
from bgjax.method.config import MethodConfig
from bgjax.method.denoiser import Denoiser
from bgjax.method.prompts import CategoryVocabulary, PromptBuilder, init_identifiers
from bgjax.models.byte_tokenizer import write_byte_tokenizer
from bgjax.models.components import build, init_params
from bgjax.models.configs import ConfigError, UNetConfig, read_config_json
from bgjax.models.controlnet import controlnet_params_from_unet
from bgjax.models.text_encoder import load_tokenizer
from bgjax.sampling.schedulers import NoiseSchedule

# What each stage trains; identifiers belong to the stage that learns the categories.
TRAINED = {"vae": ("vae",), "unet": ("unet",), "cg": ("cg", "identifiers"), "pg": ("pg",)}
NEEDED = {"vae": ("vae",), "unet": ("vae", "text_encoder", "unet"), "cg": ("vae", "text_encoder", "unet", "cg"),
          "pg": ("vae", "text_encoder", "unet", "pg")}


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
    tokenizer_dir: Path | None  # copied into the trained model

    def prompt_tables(self, data_categories: dict[str, int]) -> dict[str, np.ndarray]:
        """Per data category id: the prompt arrays and the identifier table row it trains."""
        names = [n for n, _ in sorted(data_categories.items(), key=lambda kv: kv[1])]
        tables = self.prompts.batch(names)
        vocab = CategoryVocabulary(self.categories)
        shared = self.method.identifiers == "shared"
        tables["identifier_row"] = np.asarray([0 if shared else vocab.id(n) for n in names], np.int32)
        return tables


def _stage(stage: str) -> tuple[str, ...]:
    if stage not in TRAINED:
        raise ConfigError(f"stage: {stage!r} is not one of {sorted(TRAINED)}")
    return NEEDED[stage]


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


def load_stage(config, data_categories: dict[str, int], dtype: jnp.dtype, workdir: Path, shapes_only: bool = False
               ) -> tuple[StageModels, dict, dict]:
    """(models, trained params in float32, frozen params in `dtype`) for `config.stage`. With
    `shapes_only` (a resume, which restores them) new trained params are ShapeDtypeStructs, not initialised."""
    needed = _stage(config.stage)
    base = Path(config.model) if config.model else None
    present = model_dir.components(base) if base else []
    init = config.init.to_dict()
    key = jax.random.key(config.seed)
    modules, params, configs = {}, {}, {}
    for i, kind in enumerate(needed):
        trained = kind in TRAINED[config.stage]
        options = {"mask_residuals": config.method["pg_mask_residuals"]} if kind == "pg" else {}
        if kind == "unet" and config.method["mask_guided_unet"]:
            options["region_mode"] = "mask_guided"
        if kind in present:
            modules[kind], params[kind] = model_dir.load_component(
                base, kind, dtype, jnp.float32 if trained else dtype, **options)
            configs[kind] = read_config_json(base / kind / "config.json")
            continue
        if kind in ("cg", "pg"):  # a fresh branch starts as a copy of the UNet's encoder
            configs[kind] = _controlnet_config(configs["unet"], configs["vae"], init.get(kind, {}))
            modules[kind] = build(kind, configs[kind], dtype, **options)
            fresh = _init(kind, modules[kind], jax.random.fold_in(key, i), shapes_only)
            params[kind] = (jax.eval_shape(controlnet_params_from_unet, params["unet"], fresh) if shapes_only
                            else controlnet_params_from_unet(params["unet"], fresh))
        elif kind in init:
            configs[kind] = dict(init[kind])
            modules[kind] = build(kind, configs[kind], dtype, **options)
            params[kind] = _init(kind, modules[kind], jax.random.fold_in(key, i), shapes_only and trained)
        else:
            where = f"{base} has no {kind}/" if base else "no base model (config.model) is given"
            raise ConfigError(f"config.init.{kind}: needed by the {config.stage} stage, and {where}")
        if not trained:
            params[kind] = jax.tree.map(lambda x: x.astype(dtype), params[kind])

    method = MethodConfig.from_dict(dict(config.method))
    prompts, categories = None, sorted(data_categories, key=data_categories.get)
    tokenizer_dir = None
    if "text_encoder" in needed:
        tokenizer_dir = base / "tokenizer" if base and (base / "tokenizer").is_dir() else None
        if tokenizer_dir is None and init.get("tokenizer") != "byte":
            raise ConfigError("config.init.tokenizer: the base model has no tokenizer/; set it to 'byte'")
        tokenizer_dir = tokenizer_dir or write_byte_tokenizer(Path(workdir) / "tokenizer")
        tokenizer = load_tokenizer(tokenizer_dir)
        prompts = PromptBuilder(tokenizer, method)
        if base and (base / "method.json").is_file():
            method, categories, table = model_dir.load_method(base)
            prompts = PromptBuilder(tokenizer, method)
            missing = sorted(set(data_categories) - set(categories))
            if missing:
                raise ConfigError(f"{base / 'method.json'}: the data has categories the model was not trained on: "
                                  f"{missing}")
            params["identifiers"] = jnp.asarray(table, jnp.float32 if "identifiers" in TRAINED[config.stage]
                                                else dtype)
        elif "identifiers" in TRAINED[config.stage]:
            embedding = params["text_encoder"]["text_model"]["embeddings.token_embedding"]["embedding"]
            placeholder = tokenizer(method.identifier_placeholder, add_special_tokens=False).input_ids[0]
            rows = len(categories) if method.identifiers == "per_category" else 1
            init_ids = functools.partial(init_identifiers, embedding, placeholder, rows)
            params["identifiers"] = jax.eval_shape(init_ids) if shapes_only else init_ids()
    schedule = None
    if config.stage != "vae":
        scheduler = (read_config_json(base / "scheduler" / "scheduler_config.json")
                     if base and (base / "scheduler").is_dir() else init.get("scheduler"))
        if scheduler is None:
            raise ConfigError("config.init.scheduler: the base model has no scheduler/; give a scheduler config")
        configs["scheduler"] = dict(scheduler)
        schedule = NoiseSchedule.from_config(scheduler)
    denoiser = None
    if "unet" in modules:
        denoiser = Denoiser(modules["unet"], modules.get("cg"), modules.get("pg"))
        if config.stage == "pg" and "cg" in present:  # stage 2 keeps stage 1's CG, frozen
            cg, params["cg"] = model_dir.load_component(base, "cg", dtype, dtype)
            denoiser = dataclasses.replace(denoiser, cg=cg)
            configs["cg"] = read_config_json(base / "cg" / "config.json")
    models = StageModels(config.stage, modules["vae"], denoiser, modules.get("text_encoder"), schedule, method,
                         configs, categories, prompts, tokenizer_dir)
    trained = {k: v for k, v in params.items() if k in TRAINED[config.stage]}
    frozen = {k: v for k, v in params.items() if k not in TRAINED[config.stage]}
    return models, trained, frozen


def save_model(models: StageModels, config, params: dict, out: Path, source: str) -> None:
    """A bgjax model directory, so `bgjax export` and generation read a run directly: trained and
    newly created components written from `params`, the base model's unchanged ones symlinked."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = Path(config.model).resolve() if config.model else None
    kinds = [k for k in models.configs if k != "scheduler"]
    trained = TRAINED[models.stage]
    for kind in kinds:
        if base is not None and kind not in trained and (base / kind).is_dir():
            os.symlink(base / kind, tmp / kind, target_is_directory=True)
        else:
            model_dir.save_component(tmp, kind, models.configs[kind], jax.device_get(params[kind]))
    if models.tokenizer_dir is not None:
        shutil.copytree(models.tokenizer_dir, tmp / "tokenizer")
    if "scheduler" in models.configs:
        write_json(tmp / "scheduler" / "scheduler_config.json", models.configs["scheduler"])
    if "identifiers" in trained:
        model_dir.save_method(tmp, models.method, models.categories, np.asarray(jax.device_get(params["identifiers"])))
    elif base and (base / "method.json").is_file():
        for name in ("method.json", model_dir.IDENTIFIERS_FILE):
            shutil.copy(base / name, tmp / name)
    (tmp / "train_config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str))
    model_dir.write_manifest(tmp, kinds, source)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
