"""Training on an SDXL base: the crop geometry behind SDXL's time ids (loader and latent cache at 1024 px), and a
short CG run over a tiny SDXL-structured base (both text encoders, identifiers in both, the added conditioning)
that lowers the loss and exports a model diffusers loads."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import ControlNetModel, StableDiffusionXLPipeline
from PIL import Image

from bgjax import model_dir
from bgjax.cli import main
from bgjax.data.augment import CropConfig, crop_encoded, sample_crop
from bgjax.data.images import encode_png
from bgjax.data.latents import cache_latents
from bgjax.data.pipeline import PipelineConfig, make_dataset
from bgjax.method.config import MethodConfig
from bgjax.method.prompts import PromptBuilder
from bgjax.method.store import load_identifier_tables
from bgjax.method.text import TextConditioning, zeros_for_empty_prompt
from bgjax.models.components import build, init_params, param_shapes
from bgjax.models.configs import ConfigError, VAEConfig
from bgjax.models.layers import ResnetBlock2D
from bgjax.models.text_encoder import load_tokenizer
from bgjax.models.unet import AddedCond, Transformer2DModel
from bgjax.train.config_file import load_config
from bgjax.train.losses import diffusion_loss, time_ids
from bgjax.train.models import load_stage
from bgjax.train.resume import check_latent_vae
from bgjax.train.samples import MIN_CELL
from tests.test_sdxl_parity import sdxl_inputs
from tests.torch_reference import SDXL_TINY, nhwc, rel_err

STEPS = 40
TINY = ["--config.data.crop.resolution=32", "--config.data.batch_size=4", "--config.mesh.fsdp=1",
        "--config.optim.accum_steps=1", "--config.remat=False",
        "--config.dtype='float32'", "--config.optim.learning_rate=3e-3", "--config.optim.warmup_steps=0",
        "--config.optim.schedule='constant'", "--config.optim.ema_decay=0.0", "--config.optim.weight_decay=0.0",
        "--config.loss.min_snr_gamma=0.0", "--config.log_every=10", "--config.checkpoint_every=1000",
        "--config.sample_every=0", "--config.data.workers=0", f"--config.num_steps={STEPS}"]


@pytest.mark.parametrize("flip", [0.0, 1.0], ids=["plain", "flipped"])
def test_crop_geometry_is_sdxls_time_ids(flip):
    """original_size is the source's (h, w); crop_top_left the crop's corner in the source scaled as the crop is
    (SDXL's coordinates after its resize), from the right edge when flipped."""
    height, width, resolution = 600, 900, 256
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[250:350, 500:640] = 255
    cfg = CropConfig(resolution=resolution, flip_probability=flip)
    for trial in range(5):
        top, left, side = sample_crop(mask, np.random.default_rng(trial), cfg)
        crop = crop_encoded(encode_png(image), encode_png(mask), np.random.default_rng(trial), cfg)
        zoom = resolution / side
        want_left = round(left * zoom) if not flip else round(width * zoom) - round(left * zoom) - resolution
        assert crop.original_size == (height, width)
        assert crop.crop_top_left == (round(top * zoom), want_left), (trial, top, left, side)
        assert crop.image.shape == (resolution, resolution, 3)


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _kept(f, *args) -> int:
    """Bytes the vjp of `f` keeps from the forward for the backward, beyond `args` themselves (shapes only)."""
    return _bytes(jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *args)) - _bytes(args)


def test_remat_keeps_gradients_and_saves_memory():
    """Gradient checkpointing (config.remat): a transformer and a resnet recomputed in the backward give the same
    gradients (params and context: what trains the identifiers), and the UNet and ControlNet built with it keep
    far fewer bytes for the backward (the vjp's residuals: backend-independent, unlike a CPU compile's schedule)."""
    x, ctx = jax.random.normal(jax.random.key(0), (2, 16, 16, 32)), jax.random.normal(jax.random.key(1), (2, 7, 24))
    temb = jax.random.normal(jax.random.key(2), (2, 64))
    grads = {}
    for remat in (False, True):
        block = Transformer2DModel(4, 8, depth=2, use_linear_projection=True, groups=8, remat=remat)
        resnet = (nn.remat(ResnetBlock2D) if remat else ResnetBlock2D)(32, 8)
        params = (block.init(jax.random.key(3), x, ctx), resnet.init(jax.random.key(4), x, temb))

        def loss(p, c, block=block, resnet=resnet):
            return jnp.sum(block.apply(p[0], resnet.apply(p[1], x, temb), c) ** 2)

        grads[remat] = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, ctx)
    worst = max(rel_err(b, a) for a, b in zip(*(jax.tree.leaves(grads[r]) for r in (False, True)), strict=True))
    assert worst <= 1e-5, worst  # rounding only: the recomputation fuses differently

    sample, t, context, added = sdxl_inputs(SDXL_TINY, size=32)
    a = AddedCond(added["text_embeds"].numpy(), added["time_ids"].numpy())
    cnet_config = {**SDXL_TINY, "conditioning_embedding_out_channels": (8, 16)}
    kept = {}
    for remat in (False, True):
        unet, cnet = build("unet", SDXL_TINY, remat=remat), build("controlnet", cnet_config, remat=remat)

        def unet_out(p, c, unet=unet):
            return unet.apply({"params": p}, nhwc(sample), t.numpy(), c, added=a)

        def cnet_out(p, c, cnet=cnet):
            return cnet.apply({"params": p}, nhwc(sample), t.numpy(), c, jnp.ones((2, 64, 64, 3)), added=a)

        kept[remat] = [_kept(unet_out, param_shapes("unet", unet), context.numpy()),
                       _kept(cnet_out, param_shapes("controlnet", cnet), context.numpy())]
    print(f"tiny SDXL UNet, ControlNet: kept for the backward {kept[False]} -> {kept[True]} bytes with remat; "
          f"gradients within {worst:.1e}")
    assert all(r < 0.25 * p for p, r in zip(kept[False], kept[True], strict=True))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdxl_data") / "synthetic"
    assert main(["data", "synthetic", "--out", str(out), "--num", "16", "--size", "48", "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def base(tiny_sdxl_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdxl_base") / "model"
    assert main(["convert", str(tiny_sdxl_dir), "--out", str(out)]) == 0
    return out


# SDXL VAE's 8x downsampling and scaling factor at tiny widths; no mid-block attention, whose 16384-token
# score matrices would dominate a 1024 px test on a CPU.
VAE_1024 = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1,
            "latent_channels": 4, "norm_num_groups": 4, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "mid_block_add_attention": False, "scaling_factor": 0.13025}


def test_latent_cache_and_loader_at_1024(data_dir, tiny_sdxl_dir, tmp_path):
    """1024 px crops, their VAE posteriors (the cache records the VAE's 0.13025) and where each crop came from,
    through the loader with both tokenizers' prompt tables."""
    vae = build("vae", VAE_1024)
    model_dir.save_component(tmp_path / "vae_model", "vae", VAE_1024, init_params("vae", vae, jax.random.key(0)))
    manifest = cache_latents(data_dir, tmp_path / "vae_model", tmp_path / "cache", resolution=1024, batch_size=2)
    assert manifest["latents"]["scaling_factor"] == 0.13025
    names = sorted(manifest["categories"], key=manifest["categories"].get)
    prompts = PromptBuilder(load_tokenizer(tiny_sdxl_dir / "tokenizer"), MethodConfig(),
                            tokenizer_2=load_tokenizer(tiny_sdxl_dir / "tokenizer_2")).batch(names)
    batch = next(iter(make_dataset(tmp_path / "cache", PipelineConfig(batch_size=2, crop=CropConfig(resolution=1024)),
                                   prompts)))
    assert batch["image"].shape == (2, 1024, 1024, 3) and batch["latent_mean"].shape == (2, 128, 128, 4)
    assert batch["input_ids_2"].shape == (2, 77)
    ids = np.asarray(time_ids(batch))
    np.testing.assert_array_equal(ids[:, :2], 48)  # the synthetic images are 48 px
    np.testing.assert_array_equal(ids[:, 4:], 1024)
    assert (ids[:, 2:4] >= 0).all() and (ids[:, 2:4] < 1024).all()


def _losses(base: Path, trained_model: Path, categories: dict, data_dir: Path, work: Path) -> tuple[float, float]:
    """The CG stage's training loss on fixed images, noise and timesteps (no prompt dropout) with the base
    model's fresh CG and identifiers, and with those `trained_model` holds (one compiled loss for both)."""
    config = load_config("cg_sdxl_1024", [*TINY, f"--config.model={base}", "--config.loss.prompt_dropout=0.0"])
    models, fresh, frozen = load_stage(config, categories, jnp.float32, work)
    frozen = jax.tree.map(jnp.asarray, frozen)
    trained = {"cg": model_dir.load_component(trained_model, "cg")[1], **load_identifier_tables(trained_model)}
    assert jax.tree.structure(trained) == jax.tree.structure(fresh)
    batch = next(iter(make_dataset(data_dir, PipelineConfig(batch_size=8, crop=CropConfig(resolution=32)),
                                   models.prompt_tables(categories))))
    empty = {k: v[0] for k, v in models.prompts.batch([""], empty=True).items()}
    loss = jax.jit(lambda p, k: diffusion_loss(models, {**frozen, **p}, batch, k, config.loss, empty)[0])
    return tuple(float(np.mean([loss(p, jax.random.key(i)) for i in range(8)])) for p in (fresh, trained))


def test_cg_training_on_an_sdxl_base_lowers_the_loss_and_exports(base, data_dir, tmp_path):
    """...and draws a sample grid (2 sampling steps) with the SDXL pipeline on the trained CG and identifiers."""
    work = tmp_path / "run"
    assert main(["train", "--config", "cg_sdxl_1024", "--workdir", str(work), f"--config.model={base}",
                 f"--config.data.dir={data_dir}", *TINY, f"--config.sample_every={STEPS}", "--config.sample_steps=2",
                 "--config.num_samples=1"]) == 0
    grid = Image.open(work / "samples" / f"step_{STEPS:07d}.png")
    assert grid.width == 2 * MIN_CELL and grid.height > MIN_CELL  # product | generated, a row per category
    model = work / "model"
    tables = load_identifier_tables(model)
    assert tables["identifiers"].shape[1] == 32 and tables["identifiers_2"].shape[1] == 48
    categories = json.loads((data_dir / "manifest.json").read_text())["categories"]
    before, after = _losses(base, model, categories, data_dir, tmp_path / "eval")
    print(f"tiny SDXL CG, {STEPS} steps: loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before
    assert main(["export", str(model), "--out", str(tmp_path / "out")]) == 0
    _, info = ControlNetModel.from_pretrained(tmp_path / "out" / "cg", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ControlNetModel.from_pretrained(tmp_path / "out" / "cg").config.addition_embed_type == "text_time"
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "out")
    assert len(list((tmp_path / "out" / "textual_inversion").glob("0*.safetensors"))) == len(categories)
    assert pipe.tokenizer_2 is not None


def test_other_vaes_latents_are_refused(tmp_path):
    sd_cache = {"scaling_factor": 0.18215, "shift_factor": 0.0, "vae": "models/sd15"}
    with pytest.raises(ConfigError, match="scaling_factor 0.18215 .* the model's VAE has 0.13025"):
        check_latent_vae(sd_cache, VAEConfig.from_dict(VAE_1024), str(tmp_path / "cache"))
    check_latent_vae({**sd_cache, "scaling_factor": 0.13025}, VAEConfig.from_dict(VAE_1024), str(tmp_path / "cache"))


def test_dropped_prompts_are_zeros_where_the_pipeline_says(tmp_path):
    """force_zeros_for_empty_prompt (model_index.json; diffusers' SDXL default when absent): a dropped prompt's
    context and pooled embedding become zeros, the others are untouched."""
    assert zeros_for_empty_prompt(tmp_path) and zeros_for_empty_prompt(None)
    (tmp_path / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": False}))
    assert not zeros_for_empty_prompt(tmp_path)
    text = TextConditioning(jnp.ones((3, 77, 8)), jnp.full((3, 4), 2.0)).zeroed(jnp.array([True, False, True]))
    np.testing.assert_array_equal(text.context[:, 0, 0], [0, 1, 0])
    np.testing.assert_array_equal(text.pooled[:, 0], [0, 2, 0])
