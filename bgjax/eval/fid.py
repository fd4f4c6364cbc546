"""FID: clean-fid's resize, Inception pool3 features, running float64 statistics, the Frechet distance.

Images go through clean-fid's "clean" pipeline up to the network: each channel resized to
299 x 299 as a float32 image with PIL's BICUBIC filter (clean-fid's `make_resizer("PIL",
False, "bicubic", (299, 299))`: no uint8 rounding, no clipping), here with PIL's weights
applied in float32 (`bgjax.eval.resize`; `tests/test_eval_networks.py` measures the
difference from PIL). The features are then pytorch-fid's network on x / 255
(it maps [0, 1] to [-1, 1] by 2x - 1), where clean-fid's TorchScript copy of the same TF
weights uses (x - 128) / 128 on [0, 255]: inputs differ by at most 0.4% of the range, so
scores are comparable to clean-fid's but not identical to the last digit.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bgjax.eval.inception import FID_SIZE
from bgjax.eval.resize import resize_axis


def clean_resize(images: jax.Array, size: int = FID_SIZE) -> jax.Array:
    """uint8 / float images (B, H, W, C) in [0, 255] -> float32 (B, size, size, C), clean-fid's "clean" resize."""
    return resize_axis(resize_axis(images.astype(jnp.float32), size, axis=2), size, axis=1)


@partial(jax.jit, static_argnums=0)
def inception_features(module: nn.Module, params: dict, images: jax.Array) -> jax.Array:
    """uint8 / float RGB images (B, H, W, 3) in [0, 255] -> pool3 features (B, 2048)."""
    return module.apply({"params": params}, clean_resize(images) / 255.0)


class ActivationStatistics:
    """Mean and covariance of features, accumulated batch by batch in float64.

    Batches are merged with Chan et al.'s pairwise update (mean and centred sums of
    products per batch), which is exact for any batch sizes and does not lose precision
    the way accumulating raw sums of x x^T does. The covariance is unbiased (n - 1), as
    `np.cov` in pytorch-fid and clean-fid.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim)
        self._m2 = np.zeros((dim, dim))

    def update(self, features: np.ndarray | jax.Array) -> None:
        x = np.asarray(features, np.float64).reshape(-1, self.mean.shape[0])
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        delta = batch_mean - self.mean
        total = self.count + n
        self._m2 += centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        return self._m2 / (self.count - 1)


def activation_statistics(module: nn.Module, params: dict, batches: Iterable[np.ndarray]) -> ActivationStatistics:
    """Inception statistics of image batches (each (B, H, W, 3) in [0, 255]); keep B fixed to compile once."""
    stats = ActivationStatistics(2048)
    for images in batches:
        stats.update(inception_features(module, params, jnp.asarray(images)))
    return stats


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) between two Gaussians, in float64.

    S1 S2 is similar to A = S1^(1/2) S2 S1^(1/2) (conjugate by S1^(1/2)), a symmetric PSD
    matrix, so tr((S1 S2)^(1/2)) = sum sqrt(eig(A)). Both the square root of S1 and the
    eigenvalues of A come from symmetric eigendecompositions (`eigh`), with eigenvalues
    that rounding pushed below zero clipped to zero. Unlike `scipy.linalg.sqrtm` of the
    non-symmetric product (pytorch-fid, clean-fid) this never yields complex values and
    needs no eps on the diagonal when a covariance is singular (fewer samples than dims).
    There, the eigenvalues of A that should be zero come out at about eps x its largest,
    ~sqrt(eps) x the largest once square-rooted: FID(x, x) is ~1e-8 x tr(S), not 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = (np.asarray(s, np.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    root1 = _sqrt_psd(s1)
    a = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((a + a.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_of_features(x1: np.ndarray, x2: np.ndarray) -> float:
    """`frechet_distance` of the Gaussians fitted to two feature sets (N1, D) and (N2, D) (means, unbiased
    covariances), computed from the features themselves, in float64.

    With the centred features X1, X2 and S_i = X_i^T X_i / (n_i - 1), the nonzero eigenvalues of S1 S2 are
    those of M M^T, M = X1 X2^T / sqrt((n1 - 1)(n2 - 1)), so tr((S1 S2)^(1/2)) is M's nuclear norm: one SVD
    of an N1 x N2 matrix instead of two D x D eigendecompositions. Cheaper while the sets are not larger
    than D (2048 for FID), and exact where the covariances are singular (fewer samples than dims):
    FID(x, x) is 0 to rounding, since then M = X X^T / (n - 1) and its nuclear norm is tr(S).
    """
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1]:
        raise ValueError(f"shapes do not match: {x1.shape}, {x2.shape}; expected (N1, D) and (N2, D)")
    n1, n2 = len(x1), len(x2)
    if min(n1, n2) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n1} and {n2}")
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    c1, c2 = x1 - mu1, x2 - mu2
    tr_covmean = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(c1 * c1) / (n1 - 1) + np.sum(c2 * c2) / (n2 - 1) - 2 * tr_covmean)
