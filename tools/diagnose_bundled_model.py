"""Where the bundled model's outputs lose their category's style and gain a halo (issue 18), measured with the
demo's own statistics (`synthetic.classify_background`, `synthetic.halo`):

  vae       ground-truth synthetic images through the model's VAE and back: per category, how many keep their
            style and how much halo the round trip adds (the floor every generated image starts from)
  guidance  the demo's plain rows (same products, seeds and steps) at several guidance scales: styles right and
            the halo above the ground truth's own level
  noise     each category's product from the same initial noise twice, as drawn and with each latent channel's
            mean over the image taken out: styles right and tones. The schedule leaves a little of the image in
            the last timestep's latents, and at 16 x 16 latents the noise's mean is large enough for the model to
            read a tone from it (a signal leak, Lin et al. 2024); more right without the mean means the model
            loses the style at the tones the noise's mean sends it to

    python tools/diagnose_bundled_model.py                        # the bundled model; about 2 min on 2 cores
    python tools/diagnose_bundled_model.py --model runs/tiny_pg/model --guidance 7.5 3
    python tools/diagnose_bundled_model.py --what noise

Prints one JSON line per category and per setting.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from bgjax import demo
from bgjax.data import synthetic
from bgjax.sampling.host import to_uint8
from bgjax.sampling.pipeline import BackgroundPipeline


def vae_round_trip(pipe: BackgroundPipeline, per_category: int, seed: int) -> None:
    vae, params = pipe.models.vae, pipe.params["vae"]
    for category in synthetic.CATEGORIES:
        samples = [synthetic.make_sample(i, seed, pipe.resolution, category) for i in range(per_category)]
        truth = np.stack([s.image for s in samples])
        x = jnp.asarray(truth, jnp.float32) / 127.5 - 1
        mean, _ = vae.apply({"params": params}, x, method=vae.encode)
        decoded = vae.apply({"params": params}, mean, method=vae.decode)
        images = to_uint8(np.asarray(decoded + 1) / 2)
        styles = [synthetic.classify_background(im, s.mask) for im, s in zip(images, samples, strict=True)]
        added = [synthetic.halo(im, s.mask) - synthetic.halo(s.image, s.mask)
                 for im, s in zip(images, samples, strict=True)]
        print(json.dumps({"what": "vae", "category": category, "kept_style": sum(s == category for s in styles),
                          "of": per_category, "read_as": max(set(styles), key=styles.count),
                          "halo_added": round(float(np.mean(added)), 4),
                          "mean_abs_error": round(float(np.abs(images.astype(float) - truth).mean()), 2)}),
              flush=True)


def guidance_sweep(pipe: BackgroundPipeline, scales: list[float], steps: int) -> None:
    truth = demo.ground_truth_halo(pipe.resolution)
    for guidance in scales:
        for category in synthetic.CATEGORIES:
            cutout = demo.cutout_path(category)
            mask = demo.placed_mask(pipe, np.asarray(Image.open(cutout))[..., 3])
            images = pipe(product=cutout, category=category, num_images=4, seed=0, steps=steps, guidance=guidance,
                          keep_product=demo.KEEP_PRODUCT, edge_fill=demo.EDGE_FILL)
            stats = demo.row_statistics(images, mask)
            styles = stats["background_styles"]
            print(json.dumps({"what": "guidance", "guidance": guidance, "category": category,
                              "right": sum(s == category for s in styles), "styles": styles,
                              "halo": round(float(np.mean(stats["halos"])), 4),
                              "ground_truth_halo": truth[category]}), flush=True)


def noise_mean(pipe: BackgroundPipeline, guidance: float, steps: int, num: int) -> None:
    channels = pipe.models.vae.config.latent_channels
    side = pipe.resolution // pipe.models.vae_factor
    noise = np.random.default_rng(0).standard_normal((num, side, side, channels)).astype(np.float32)
    for category in synthetic.CATEGORIES:
        cutout = demo.cutout_path(category)
        mask = demo.placed_mask(pipe, np.asarray(Image.open(cutout))[..., 3])
        for name, latents in (("as drawn", noise), ("mean removed", noise - noise.mean((1, 2), keepdims=True))):
            images = pipe(product=cutout, category=category, num_images=num, steps=steps, guidance=guidance,
                          keep_product=demo.KEEP_PRODUCT, edge_fill=demo.EDGE_FILL, latents=latents)
            stats = demo.row_statistics(images, mask)
            print(json.dumps({"what": "noise", "noise": name, "category": category, "guidance": guidance,
                              "right": sum(s == category for s in stats["background_styles"]), "of": num,
                              "tones": stats["background_tones"]}), flush=True)


MEASURES = ("vae", "guidance", "noise")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=demo.MODEL)
    p.add_argument("--guidance", type=float, nargs="*", default=[7.5, 3.0, 1.5])
    p.add_argument("--steps", type=int, default=demo.STEPS, help="as the demo")
    p.add_argument("--per-category", type=int, default=40, help="ground-truth images per category for the VAE")
    p.add_argument("--seed", type=int, default=99, help="of the ground-truth images (the classifier's is 12345)")
    p.add_argument("--noise-images", type=int, default=8, help="images per category for `noise`")
    p.add_argument("--what", nargs="*", default=list(MEASURES), choices=MEASURES)
    args = p.parse_args()
    pipe = BackgroundPipeline.from_pretrained(args.model)
    if "vae" in args.what:
        vae_round_trip(pipe, args.per_category, args.seed)
    if "guidance" in args.what:
        guidance_sweep(pipe, args.guidance, args.steps)
    if "noise" in args.what:
        noise_mean(pipe, demo.GUIDANCE, args.steps, args.noise_images)


if __name__ == "__main__":
    main()
