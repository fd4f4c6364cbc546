"""Single-file original SD checkpoints (.safetensors / .ckpt, CompVis layout) -> bgjax model directories."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from bgjax import model_dir
from bgjax.convert.checkpoint_io import read_weights
from bgjax.convert.diffusers_folder import REQUIRED, TOKENIZERS, Conversion, check_tokenizer, convert_component
from bgjax.convert.ldm import split_ldm_checkpoint, strip_wrappers
from bgjax.fileio import CheckpointError, write_json
from bgjax.models.configs import read_config_json

_log = logging.getLogger(__name__)
_CLASS_NAMES = {"unet": {"_class_name": "UNet2DConditionModel"}, "vae": {"_class_name": "AutoencoderKL"},
                "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"},
                "text_encoder_2": {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model"},
                "controlnet": {"_class_name": "ControlNetModel"}}
KINDS = (*REQUIRED, "text_encoder_2", "controlnet")


def default_scheduler_config(prediction_type: str, sdxl: bool = False) -> dict:
    """The noise schedule every SD-1.x / SD-2.x / SDXL model was trained with, in the scheduler its
    diffusers folder names (SDXL base: Euler, timesteps spaced as its own scheduler_config.json says)."""
    config = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
              "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
              "steps_offset": 1, "prediction_type": prediction_type}
    if sdxl:
        config.update(_class_name="EulerDiscreteScheduler", interpolation_type="linear", timestep_spacing="leading",
                      use_karras_sigmas=False)
    return config


def import_single_file(path: Path, out: Path, config_dir: str | Path | None = None,
                       tokenizer: str | Path | None = None, prediction_type: str = "epsilon",
                       allow_extra_keys: bool = False, tokenizer_2: str | Path | None = None) -> Conversion:
    """Convert one checkpoint file. `config_dir` (a diffusers folder) supplies the component configs,
    which otherwise are inferred from the weights with SD-1/SD-2/SDXL head counts. A whole-file wrapper
    prefix (`module.`, `model.`, `state_dict.`) is stripped; a bundled `control_model.*` ControlNet
    becomes `controlnet/`. Keys that are not model weights (noise-schedule buffers, EMA copies, VAE
    loss nets) are listed with their reason in `conversion_report.json`; keys outside SD's prefixes
    are an error unless `allow_extra_keys`; any other unmapped key is an error."""
    path, out = Path(path), Path(out)
    config_dir = Path(config_dir) if config_dir else None
    configs = {}
    if config_dir is not None:
        configs = {k: read_config_json(config_dir / k / "config.json") for k in KINDS
                   if (config_dir / k / "config.json").is_file()}
    state, wrappers = strip_wrappers(read_weights(path))
    try:
        ckpt = split_ldm_checkpoint(state, configs, allow_extra_keys)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    missing = [k for k in REQUIRED if k not in ckpt.components]
    if missing:
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint: no {', '.join(missing)} weights "
                              f"(found {', '.join(ckpt.components) or 'none'})")
    kinds = [k for k in KINDS if k in ckpt.components]
    for kind in tqdm(kinds, desc="convert", unit="component"):
        config = {**_CLASS_NAMES[kind], **ckpt.configs[kind]}
        convert_component(kind, ckpt.components[kind], config, f"{path} [{kind}]", out)

    notes = [f"stripped the wrapper prefix {p!r} from every key" for p in wrappers]
    given = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
    for encoder in (k for k in TOKENIZERS if k in kinds):
        name = TOKENIZERS[encoder]
        folder = Path(given[name]) if given[name] else (config_dir / name if config_dir else None)
        if folder is not None and folder.is_dir():
            shutil.copytree(folder, out / name, dirs_exist_ok=True)
            check_tokenizer(out / name, ckpt.configs[encoder], str(folder))
        else:
            notes.append(f"no {name} given (--{name.replace('_', '-')} DIR); the model cannot encode prompts "
                         f"until one is copied to {out / name}")
            _log.warning("%s: %s", path, notes[-1])
    if config_dir is not None and (config_dir / "scheduler").is_dir():
        shutil.copytree(config_dir / "scheduler", out / "scheduler", dirs_exist_ok=True)
    else:
        write_json(out / "scheduler" / "scheduler_config.json",
                   default_scheduler_config(prediction_type, sdxl="text_encoder_2" in kinds))
    reasons: dict[str, int] = {}
    for _, reason in ckpt.ignored:
        reasons[reason] = reasons.get(reason, 0) + 1
    notes += [f"ignored {n} key(s): {reason}" for reason, n in reasons.items()]
    write_json(out / "conversion_report.json", {
        "source": str(path.resolve()), "text_encoder": ckpt.text_encoder_kind,
        "text_layers": ckpt.configs["text_encoder"]["num_hidden_layers"], "wrappers_stripped": wrappers,
        "ignored": [{"key": k, "reason": r} for k, r in ckpt.ignored]})
    model_dir.write_manifest(out, kinds, source=str(path.resolve()))
    return Conversion(kinds, notes)
