"""What a resume may change: the new config and data against what the checkpoint was trained with.

A checkpoint stores the config it was saved under and a fingerprint of the data (the shards'
names, record counts and sha256 from manifest.json, or a TFDS split's files: `bgjax.data.dataset`).
On restore every config field is compared: a change in `HARMLESS` (how long, how often to log, save
or sample, where things are, how the work is laid out) is accepted and logged; any other change, or
other data, would make the rest of the run something no uninterrupted run computes (another stage,
model, batch, crop, augmentation, seed, loss or optimizer), so it is refused naming the field,
unless `resume_force` is set.
"""

from __future__ import annotations

import json
import logging

from bgjax.models.configs import ConfigError

_log = logging.getLogger("bgjax.train")

# Fields (or groups, by prefix) a resume may change. data.dir and data.tfds_data_dir may move: the
# fingerprint checks the records. mesh and accum_steps lay the same batch out differently, remat recomputes
# what it would keep (same losses to rounding).
HARMLESS = ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "sample_steps",
            "num_samples", "peak_tflops", "export_weights", "resume_force", "data.dir", "data.tfds_data_dir",
            "data.workers", "data.synthetic_num", "data.synthetic_size", "mesh", "optim.accum_steps", "remat")


def check_latent_cache(latents: dict | None, config, where: str) -> None:
    """A latent cache holds crops at one resolution; training at another would mix the two."""
    if latents and latents["resolution"] != config.data.crop.resolution:
        raise ConfigError(f"data.crop.resolution: {config.data.crop.resolution}, but the latent cache in "
                          f"{where} was built at {latents['resolution']} px; cache it again "
                          f"(`bgjax data latents --resolution {config.data.crop.resolution}`) or train at "
                          f"{latents['resolution']}")


def check_latent_vae(latents: dict | None, vae_config, where: str) -> None:
    """A latent cache holds one VAE's latents: the model trained on them must scale them as that VAE does
    (SD's 0.18215 and SDXL's 0.13025 VAEs do not mix)."""
    if not latents:
        return
    cached = (latents.get("scaling_factor"), latents.get("shift_factor"))
    if cached != (vae_config.scaling_factor, vae_config.shift_factor):
        raise ConfigError(f"{where}: the latent cache was encoded by a VAE with scaling_factor {cached[0]} and "
                          f"shift_factor {cached[1]} ({latents.get('vae')}), but the model's VAE has "
                          f"{vae_config.scaling_factor} and {vae_config.shift_factor}; cache the data again with "
                          f"this model's VAE")


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _harmless(field: str) -> bool:
    return any(field == h or field.startswith(h + ".") for h in HARMLESS)


def check_resume(config, stored: dict, fingerprint: str, step: int, data_dir) -> None:
    """Refuse (ConfigError) a resume from checkpoint `step` whose config or data breaks exact resume;
    log the harmless changes. `stored` is what `Checkpoints.save` wrote as meta."""
    # Through JSON both ways, so tuples and lists compare equal.
    new = _flat(json.loads(json.dumps(config.to_dict(), default=str)))
    old = _flat(stored.get("config", {}))
    changed = {k: (old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
               if old.get(k, "<absent>") != new.get(k, "<absent>")}
    refused = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items() if not _harmless(k)]
    if stored.get("data_fingerprint") != fingerprint:
        refused.append(f"data: the records in {data_dir} are not those checkpoint "
                       f"{step} was trained on (manifest fingerprint {str(stored.get('data_fingerprint'))[:12]} "
                       f"-> {fingerprint[:12]})")
    for k, (a, b) in changed.items():
        if _harmless(k):
            _log.info("resume: %s changed %r -> %r (accepted)", k, a, b)
    if not refused:
        return
    if config.resume_force:
        for r in refused:
            _log.warning("resume: %s (breaks exact resume; accepted because resume_force is set)", r)
        return
    raise ConfigError(f"resuming from checkpoint {step} would not continue the same run: " + "; ".join(refused)
                      + ". Rerun with --config.resume_force=True to resume anyway, or use a new --workdir")
