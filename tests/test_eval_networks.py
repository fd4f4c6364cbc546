"""Metric networks against their references, random weights, no downloads.

CLIP's image tower and preprocessing against transformers; the FID InceptionV3 against
pytorch-fid's network (written out in tests/torch_fid_inception.py: PyPI's torchvision does
not import beside this torch build); clean-fid's resize against PIL; the Frechet distance
against the scipy.linalg.sqrtm formula; the `bgjax metric-weights` converter.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel
from transformers import CLIPVisionConfig as TorchCLIPVisionConfig
from transformers import CLIPVisionModelWithProjection as TorchCLIPVision
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from bgjax.cli import main
from bgjax.eval.clip_similarity import background_similarity, mask_products
from bgjax.eval.clip_vision import CLIP_STD, CLIPVisionConfig, CLIPVisionModelWithProjection, preprocess
from bgjax.eval.fid import ActivationStatistics, clean_resize, frechet_distance, inception_features
from bgjax.eval.inception import FIDInceptionV3, resize_bilinear
from bgjax.eval.weights import clip_vision_params, inception_params, load_clip_vision, load_inception
from bgjax.fileio import CheckpointError
from bgjax.models.configs import ConfigError
from tests.torch_fid_inception import FIDInceptionV3 as TorchFIDInception
from tests.torch_fid_inception import randomize_inception
from tests.torch_reference import nhwc, randomize, rel_err, state_dict

FP32_TOL = 1e-4
CLIP_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8, projection_dim=16)
VIT_B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
               patch_size=32, projection_dim=512)  # openai/clip-vit-base-patch32's image tower


def smooth_images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """uint8 photos stand-ins: 8x8 blocks of colour plus noise (edges and texture for the resizers)."""
    rng = np.random.default_rng(seed)
    b, h, w, c = shape
    blocks = rng.uniform(0, 255, (b, -(-h // 8), -(-w // 8), c))
    x = np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)[:, :h, :w] + rng.normal(0, 20, shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def to_bgjax_clip(ref: torch.nn.Module) -> tuple[CLIPVisionModelWithProjection, dict]:
    cfg = CLIPVisionConfig.from_dict(ref.config.to_dict())
    params, _ = clip_vision_params(state_dict(ref), cfg, "ref")
    return CLIPVisionModelWithProjection(cfg), params


# --- CLIP -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [CLIP_TINY, dict(CLIP_TINY, hidden_act="gelu"),
                                 pytest.param(VIT_B32, marks=pytest.mark.slow)], ids=["tiny", "tiny-gelu", "vit-b32"])
def test_clip_vision_matches_transformers(cfg):
    ref = randomize(TorchCLIPVision(TorchCLIPVisionConfig(**cfg)))
    x = torch.randn(2, 3, cfg["image_size"], cfg["image_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x)
    module, params = to_bgjax_clip(ref)
    got = jax.jit(module.apply)({"params": params}, nhwc(x))
    assert rel_err(got.image_embeds, want.image_embeds.numpy()) <= FP32_TOL
    assert rel_err(got.last_hidden_state, want.last_hidden_state.numpy()) <= FP32_TOL


@pytest.mark.parametrize("hw", [(250, 333), (400, 300), (180, 200), (224, 224)])
def test_preprocess_matches_clip_image_processor(hw):
    """PIL's fixed-point uint8 resize vs ours: measured max 1 grey level, on at most 0.007% of values."""
    img = smooth_images((1, *hw, 3), seed=hw[0])
    want = CLIPImageProcessorPil()(images=img[0], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = np.asarray(preprocess(jnp.asarray(img)))[0]
    assert got.shape == want.shape == (224, 224, 3)
    levels = np.abs(got - want) * np.asarray(CLIP_STD) * 255  # back to grey levels
    assert levels.max() <= 1 + 1e-3
    assert (levels > 0.5).mean() <= 2e-4


def test_clip_config_from_clip_model_and_unsupported_fields():
    full = CLIPConfig(vision_config=CLIP_TINY, projection_dim=24).to_dict()
    cfg = CLIPVisionConfig.from_dict(full)
    assert (cfg.hidden_size, cfg.projection_dim, cfg.patch_size) == (64, 24, 8)  # CLIPModel's projection_dim
    assert CLIPVisionConfig.from_dict(cfg.raw) == cfg
    for field, value in (("hidden_act", "relu"), ("model_type", "siglip_vision_model")):
        with pytest.raises(ConfigError, match=field):
            CLIPVisionConfig.from_dict({**CLIP_TINY, field: value})
    with pytest.raises(ConfigError, match="model_type: 'siglip'"):
        CLIPVisionConfig.from_dict({**full, "model_type": "siglip"})
    with pytest.raises(ConfigError, match="patch_size"):
        CLIPVisionConfig.from_dict({**CLIP_TINY, "patch_size": 5})


def test_background_similarity_ignores_the_product():
    module, params = to_bgjax_clip(randomize(TorchCLIPVision(TorchCLIPVisionConfig(**CLIP_TINY))))
    backgrounds = smooth_images((3, 48, 64, 3), seed=1)
    masks = np.zeros((3, 48, 64), np.float32)
    masks[:, 12:36, 20:44] = 1
    products_a, products_b = smooth_images((3, 48, 64, 3), seed=2), smooth_images((3, 48, 64, 3), seed=3)
    a = np.where(masks[..., None] > 0, products_a, backgrounds)
    b = np.where(masks[..., None] > 0, products_b, backgrounds)
    sim = background_similarity(module, params, a, masks, b, masks, batch_size=2)  # a padded last batch
    np.testing.assert_allclose(sim, 1.0, atol=1e-5)
    unmasked = background_similarity(module, params, a, 0 * masks, b, 0 * masks, batch_size=2)
    assert np.all(unmasked < 1 - 1e-4)
    # the product region is ~0 after CLIP's normalisation
    pixels = preprocess(mask_products(jnp.asarray(a), jnp.asarray(masks)), 32)
    assert float(jnp.abs(pixels[:, 12:20, 14:18]).max()) < 0.004


# --- FID Inception ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception_ref() -> TorchFIDInception:
    return randomize_inception(TorchFIDInception())


def test_inception_matches_pytorch_fid(inception_ref):
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = inception_ref(x).numpy()
    params, ignored = inception_params(state_dict(inception_ref), "ref")
    assert set(ignored) >= {"fc.weight", "fc.bias", "Mixed_7c.branch_pool.bn.num_batches_tracked"}
    # through the jitted feature path, which takes [0, 255] (299 px: no resize)
    got = inception_features(FIDInceptionV3(), params, jnp.asarray(nhwc(x) * 255))
    assert got.shape == (2, 2048)
    assert rel_err(got, want) <= FP32_TOL  # measured 2.5e-7


@pytest.mark.parametrize("size", [64, 256, 512])
def test_resize_bilinear_matches_torch_interpolate(size):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    want = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resize_bilinear(jnp.asarray(nhwc(x))), nhwc(want), atol=1e-5)


@pytest.mark.parametrize("hw", [(512, 512), (256, 320), (128, 96)])
def test_clean_resize_matches_pil_float_bicubic(hw):
    """clean-fid's "clean" resize: each channel a float32 PIL image ('F'), BICUBIC to 299 x 299."""
    img = smooth_images((1, *hw, 3), seed=hw[1])[0]
    want = np.stack([np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F")
                                .resize((299, 299), resample=Image.BICUBIC)) for c in range(3)], axis=-1)
    got = np.asarray(clean_resize(jnp.asarray(img[None])))[0]
    assert np.abs(got - want).max() <= 2e-4  # grey levels; measured 6.1e-5 (float32 vs PIL's float64 sums)


# --- statistics and the Frechet distance ------------------------------------------------------

def random_statistics(dim: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def test_activation_statistics_merge_batches_exactly():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(103, 16)).astype(np.float32)
    stats = ActivationStatistics(16)
    for start, stop in ((0, 1), (1, 40), (40, 40), (40, 103)):
        stats.update(x[start:stop])
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)


def test_frechet_distance_matches_sqrtm_formula():
    mu1, s1 = random_statistics(64, 500, seed=1)
    mu2, s2 = random_statistics(64, 500, seed=2)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert abs(frechet_distance(mu1, s1, mu2, s2) - want) <= 1e-6 * abs(want)


def test_fid_of_features_with_themselves_is_zero():
    # measured 3e-14 and 2e-8 of tr(S); 40 samples in 64 dims give a singular covariance, whose
    # zero eigenvalues come out at ~sqrt(eps) x the largest once square-rooted
    for n, tol in ((500, 1e-12), (40, 1e-7)):
        mu, s = random_statistics(64, n, seed=3)
        assert abs(frechet_distance(mu, s, mu, s)) <= tol * np.trace(s)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu, s, mu[:3], s)


# --- converters -------------------------------------------------------------------------------

def test_metric_weights_cli_clip_round_trip(tmp_path, capsys):
    config = CLIPConfig(text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16),
                        vision_config=CLIP_TINY, projection_dim=24)
    ref = randomize(CLIPModel(config))
    ref.save_pretrained(tmp_path / "clip")  # a full CLIPModel: the text tower is ignored
    assert main(["metric-weights", "clip", str(tmp_path / "clip"), "--out", str(tmp_path / "out")]) == 0
    assert "CLIP text tower" in capsys.readouterr().out
    module, params = load_clip_vision(tmp_path / "out")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=x).pooler_output.numpy()
    assert rel_err(module.apply({"params": params}, nhwc(x)).image_embeds, want) <= FP32_TOL

    # a lone .bin with config.json beside it converts the same
    (tmp_path / "bin").mkdir()
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps(config.to_dict()))
    assert main(["metric-weights", "clip", str(tmp_path / "bin" / "pytorch_model.bin"), "--out",
                 str(tmp_path / "out2")]) == 0
    _, params2 = load_clip_vision(tmp_path / "out2")
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    # a second conversion into a converted folder is refused unless --overwrite
    args = ["metric-weights", "clip", str(tmp_path / "clip"), "--out", str(tmp_path / "out2")]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_metric_weights_cli_inception_round_trip(tmp_path, capsys, inception_ref):
    src = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(inception_ref.state_dict(), src)
    assert main(["metric-weights", "inception", str(src), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "ignored 2 keys (1008-way classifier" in printed and "ignored 94 keys (BatchNorm step counter" in printed
    module, params = load_inception(tmp_path / "out")
    want, _ = inception_params(state_dict(inception_ref), "ref")
    jax.tree.map(np.testing.assert_array_equal, params, want)
    assert module == FIDInceptionV3()


def test_bad_keys_raise_naming_the_file_and_key(tmp_path, capsys, inception_ref):
    state = state_dict(inception_ref)
    with pytest.raises(CheckpointError, match=r"src\.pth: unexpected keys 'Mixed_5b\.branch1x1\.conv\.bias'"):
        inception_params({**state, "Mixed_5b.branch1x1.conv.bias": np.zeros(64, np.float32)}, "src.pth")
    missing = {k: v for k, v in state.items() if k != "Mixed_6a.branch3x3.bn.running_var"}
    with pytest.raises(CheckpointError, match=r"missing keys 'Mixed_6a\.branch3x3\.bn\.running_var'"):
        inception_params(missing, "src.pth")
    wrong = {**state, "Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)}
    with pytest.raises(CheckpointError, match=r"'Conv2d_1a_3x3\.conv\.weight' has shape \(32, 3, 5, 5\)"):
        inception_params(wrong, "src.pth")
    # through the command line: exit status 2, the file and the key on stderr
    ref = randomize(TorchCLIPVision(TorchCLIPVisionConfig(**CLIP_TINY)))
    ref.save_pretrained(tmp_path / "clip")
    cfg = json.loads((tmp_path / "clip" / "config.json").read_text())
    (tmp_path / "clip" / "config.json").write_text(json.dumps({**cfg, "projection_dim": 8}))
    assert main(["metric-weights", "clip", str(tmp_path / "clip"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "'visual_projection.weight' has shape (16, 64)" in err
