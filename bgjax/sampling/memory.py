"""What a generation needs in memory, before it runs, and a one-line error when a size does not fit.

With XLA's attention the scores of the largest layer dominate: a (rows, T, T) float32 matrix per self-attention
at the UNet's finest attention level (rows = 2 x batch x heads: classifier-free guidance doubles the batch)
and in the VAE decoder's mid block (one head, T = the latent positions). XLA holds the logits and the
probabilities and more at once. On the CPU the attention kernel splits the queries into chunks
(`bgjax.models.attention.cpu_query_chunk`), and only one chunk's scores are alive; cuDNN's fused kernel (GPUs)
and the flash kernel (TPUs) hold none: the estimate follows the kernel `attention.choose` takes. The
activations add a term linear in the pixels. `estimate` is compared with XLA's own account of the compiled
program in tests/test_memory.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from bgjax.models.attention import choose, cpu_query_chunk

# Feature maps alive at the peak, in units of the largest one: fitted to XLA's memory analysis of the
# compiled program on the CPU (tests/test_memory.py checks the estimate against it).
UNET_MAPS, VAE_MAPS = 12, 6
# Score-sized buffers XLA keeps alive at once: four for a whole attention, two per chunk when chunked.
SCORE_COPIES, CHUNK_SCORE_COPIES = 4, 2
_GB = 1e9


class OutOfMemory(ValueError):
    """A size (and batch) whose generation does not fit the device: the message is one line naming the size,
    what it needs, and the largest size that fits."""


@dataclasses.dataclass(frozen=True)
class Need:
    """Bytes a batch needs at one size: the whole, and the attention scores of its largest layer."""

    width: int
    height: int
    batch: int  # images per device
    total: int
    scores: int
    tokens: int  # of that layer
    chunked: bool
    largest: tuple[int, int] | None = None  # (width, height) that fits at this aspect; None: nothing does
    available: int | None = None

    def message(self, device: jax.Device, reason: str) -> str:
        where = "" if self.available is None else f", {self.available / _GB:.1f} GB free"
        if self.largest is not None:
            fits = f"the largest size that fits is {self.largest[0]}x{self.largest[1]} px"
        else:
            fits = "no size fits" if self.available is not None else "a smaller size may fit"
        return (f"{self.width}x{self.height} px with {self.batch} image(s) per device needs about "
                f"{self.total / _GB:.1f} GB ({self.scores / _GB:.1f} GB of attention scores at {self.tokens} "
                f"tokens{', chunked' if self.chunked else ''}) on {device.platform}{where}: {reason}; {fits} "
                f"(or generate fewer images per batch: batch_size / --batch-size)")


def _scores(module, batch: int, heads: int, head_dim: int, tokens: int) -> tuple[int, bool]:
    """(bytes of the float32 scores alive for one self-attention of `module` over `tokens`, chunked), for the
    kernel that `bgjax.models.attention.choose` takes there: none for cuDNN's and the flash kernel, which never
    hold the score matrix."""
    q = jax.ShapeDtypeStruct((batch, tokens, heads, head_dim), module.dtype)
    kernel = choose(module.attention, q, q)
    if kernel in ("cudnn", "flash"):
        return 0, False
    if kernel == "chunked":
        chunk = cpu_query_chunk(batch * heads, tokens, tokens)
        return CHUNK_SCORE_COPIES * batch * heads * min(chunk, tokens) * tokens * 4, True
    return SCORE_COPIES * batch * heads * tokens * tokens * 4, False


def estimate(models, batch: int, height: int, width: int) -> Need:
    """What a batch of `batch` images at `height` x `width` px needs on one device (`models`: the program's
    `Models`). Params are not counted: they are loaded already."""
    unet_module, vae_module = models.denoiser.unet, models.vae
    unet, vae, factor = unet_module.config, vae_module.config, models.vae_factor
    act = jnp.dtype(unet_module.dtype).itemsize
    latent = (height // factor) * (width // factor)
    # The UNet (and its branches, which never run at the same time) over 2 x batch rows.
    level = next((i for i in range(len(unet.block_out_channels)) if unet.has_cross_attention(i)), None)
    unet_scores, unet_tokens, unet_chunked = 0, 0, False
    if level is not None:
        unet_tokens, heads = latent // 4**level, unet.num_attention_heads[level]
        unet_scores, unet_chunked = _scores(unet_module, 2 * batch, heads, unet.block_out_channels[level] // heads,
                                            unet_tokens)
    unet_total = unet_scores + UNET_MAPS * 2 * batch * latent * unet.block_out_channels[0] * act
    # The VAE decoder: one head over the latent positions, then full-resolution maps.
    vae_scores, vae_chunked = (_scores(vae_module, batch, 1, vae.block_out_channels[-1], latent)
                               if vae.mid_block_add_attention else (0, False))
    vae_total = vae_scores + VAE_MAPS * batch * height * width * vae.block_out_channels[0] * act
    if unet_total >= vae_total:
        return Need(width, height, batch, unet_total, unet_scores, unet_tokens, unet_chunked)
    return Need(width, height, batch, vae_total, vae_scores, latent, vae_chunked)


def available(device: jax.Device) -> int | None:
    """Bytes free for a program on `device`: the allocator's limit less what is in use on accelerators, the
    kernel's MemAvailable on the CPU; None when unknown."""
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0) if "bytes_limit" in stats else None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def largest_fitting(models, batch: int, height: int, width: int, free: int, granularity: int
                    ) -> tuple[int, int] | None:
    """The largest (width, height), multiples of `granularity` with about the aspect of `width` x `height`,
    whose `estimate` fits in `free` bytes; None when not even the smallest does."""
    long_side = max(width, height)
    for side in range(long_side - long_side % granularity, 0, -granularity):
        short = max(granularity, round(side * min(width, height) / long_side / granularity) * granularity)
        w, h = (side, short) if width >= height else (short, side)
        if estimate(models, batch, h, w).total <= free:
            return w, h
    return None


def check(models, batch: int, height: int, width: int, device: jax.Device) -> Need:
    """The `estimate` of a batch at this size; raises OutOfMemory when it exceeds what `device` has free."""
    need = estimate(models, batch, height, width)
    free = available(device)
    if free is None:
        return need
    granularity = models.vae_factor * 2 ** (len(models.denoiser.unet.config.block_out_channels) - 1)
    need = dataclasses.replace(need, available=free,
                               largest=largest_fitting(models, batch, height, width, free, granularity))
    if need.total > free:
        raise OutOfMemory(need.message(device, "too large"))
    return need
