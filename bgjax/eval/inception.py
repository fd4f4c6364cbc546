"""The FID InceptionV3 (TF's "inception-2015-12-05" as pytorch-fid ports it) in Flax, NHWC.

pytorch-fid's `fid_inception_v3` is torchvision's Inception3 with the blocks that differ in
TF's graph patched: average pools that do not count the zero padding (FIDInceptionA, C and
E_1) and a max pool in the last block (FIDInceptionE_2). The param tree mirrors that state
dict (`Conv2d_1a_3x3.conv`, `Mixed_5b.branch1x1.bn` with `running_mean` / `running_var`
kept as params: this network is never trained), so conversion is a rename plus transposes.
The output is the 2048-d pool3 feature that FID uses; the 1008-way `fc` is not built.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

FID_SIZE = 299


class BatchNorm(nn.Module):
    """Inference-only BatchNorm2d whose statistics are params named as torch's buffers."""

    eps: float = 1e-3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv2d(nn.Module):
    """torchvision's conv (no bias) + BatchNorm(eps 1e-3) + ReLU; padding is (rows, cols)."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, (self.stride, self.stride), padding=((ph, ph), (pw, pw)),
                    use_bias=False, dtype=self.dtype, name="conv")(x)
        return nn.relu(BatchNorm(name="bn")(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TF's average pool divides by the number of real pixels (torch: count_include_pad=False).
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int = 1) -> jax.Array:
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), (stride, stride), padding=pad)


class _Block(nn.Module):
    dtype: jnp.dtype = jnp.float32

    def conv(self, features: int, kernel: int | tuple[int, int] = 1, stride: int = 1,
             padding: int | tuple[int, int] = 0, *, name: str) -> BasicConv2d:
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (padding, padding) if isinstance(padding, int) else padding
        return BasicConv2d(features, kernel, stride, padding, self.dtype, name=name)


class FIDInceptionA(_Block):
    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv(64, name="branch1x1")(x)
        b5 = self.conv(64, 5, padding=2, name="branch5x5_2")(self.conv(48, name="branch5x5_1")(x))
        b3 = self.conv(64, name="branch3x3dbl_1")(x)
        b3 = self.conv(96, 3, padding=1, name="branch3x3dbl_3")(self.conv(96, 3, padding=1, name="branch3x3dbl_2")(b3))
        bp = self.conv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv(384, 3, stride=2, name="branch3x3")(x)
        bd = self.conv(96, 3, padding=1, name="branch3x3dbl_2")(self.conv(64, name="branch3x3dbl_1")(x))
        bd = self.conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, stride=2)], axis=-1)


class FIDInceptionC(_Block):
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = self.conv(192, name="branch1x1")(x)
        b7 = self.conv(c7, name="branch7x7_1")(x)
        b7 = self.conv(192, **col, name="branch7x7_3")(self.conv(c7, **row, name="branch7x7_2")(b7))
        bd = self.conv(c7, name="branch7x7dbl_1")(x)
        for i, (features, shape) in enumerate(((c7, col), (c7, row), (c7, col), (192, row)), start=2):
            bd = self.conv(features, **shape, name=f"branch7x7dbl_{i}")(bd)
        bp = self.conv(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv(320, 3, stride=2, name="branch3x3_2")(self.conv(192, name="branch3x3_1")(x))
        b7 = self.conv(192, name="branch7x7x3_1")(x)
        b7 = self.conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = self.conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = self.conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, stride=2)], axis=-1)


class FIDInceptionE(_Block):
    """FIDInceptionE_1 (pool="avg", without the padding) or FIDInceptionE_2 (pool="max")."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def split(y: jax.Array, prefix: str) -> jax.Array:
            return jnp.concatenate([self.conv(384, (1, 3), padding=(0, 1), name=f"{prefix}a")(y),
                                    self.conv(384, (3, 1), padding=(1, 0), name=f"{prefix}b")(y)], axis=-1)

        b1 = self.conv(320, name="branch1x1")(x)
        b3 = split(self.conv(384, name="branch3x3_1")(x), "branch3x3_2")
        bd = self.conv(384, 3, padding=1, name="branch3x3dbl_2")(self.conv(448, name="branch3x3dbl_1")(x))
        bd = split(bd, "branch3x3dbl_3")
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x)
        bp = self.conv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images: jax.Array, size: int = FID_SIZE) -> jax.Array:
    """torch's `F.interpolate(mode="bilinear", align_corners=False)`: half-pixel centres, no antialiasing."""
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size, size, c), method="linear", antialias=False)


class FIDInceptionV3(nn.Module):
    """Images (B, H, W, 3) in [0, 1] -> pool3 features (B, 2048), as pytorch-fid's `InceptionV3()`.

    Like pytorch-fid: inputs of another size are resized to 299 x 299 bilinearly (no
    antialiasing; `resize_input`), then mapped to [-1, 1] by 2x - 1 (`normalize_input`).
    """

    resize_input: bool = True
    normalize_input: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32)
        if self.resize_input and x.shape[1:3] != (FID_SIZE, FID_SIZE):
            x = resize_bilinear(x)
        if self.normalize_input:
            x = 2 * x - 1

        def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, *, name: str) -> BasicConv2d:
            return BasicConv2d(features, (kernel, kernel), stride, (padding, padding), self.dtype, name=name)

        x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, 3, name="Conv2d_2a_3x3")(x)
        x = _max_pool_3x3(conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x), stride=2)
        x = conv(80, 1, name="Conv2d_3b_1x1")(x)
        x = _max_pool_3x3(conv(192, 3, name="Conv2d_4a_3x3")(x), stride=2)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(self.dtype, pool_features, name=name)(x)
        x = InceptionB(self.dtype, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(self.dtype, c7, name=name)(x)
        x = InceptionD(self.dtype, name="Mixed_7a")(x)
        x = FIDInceptionE(self.dtype, "avg", name="Mixed_7b")(x)
        x = FIDInceptionE(self.dtype, "max", name="Mixed_7c")(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
