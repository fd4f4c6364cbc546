"""The `bgjax` command: one entry point with a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from pathlib import Path

from bgjax import __version__
from bgjax.data.bg60k import ALPHA_THRESHOLD, MIN_MATCH
from bgjax.fileio import DEFAULT_QUALITY, IMAGE_FORMATS
from bgjax.outputs import claim_output, fresh_output


def _convert(args: argparse.Namespace) -> None:
    from bgjax.convert.diffusers_folder import import_diffusers
    from bgjax.convert.single_file import import_single_file

    src = Path(args.src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    with fresh_output(Path(args.out), args.overwrite) as out:
        if src.is_dir():
            done = import_diffusers(src, out)
        else:
            done = import_single_file(src, out, config_dir=args.config, tokenizer=args.tokenizer,
                                      prediction_type=args.prediction_type, allow_extra_keys=args.allow_extra_keys,
                                      tokenizer_2=args.tokenizer_2)
    for note in done.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(done.components)} to {args.out} (report: {Path(args.out) / 'conversion_report.json'})")


def _export(args: argparse.Namespace) -> None:
    from bgjax.convert.diffusers_folder import export_diffusers
    from bgjax.model_dir import components

    components(Path(args.model))  # a folder that is not a bgjax model fails here, before OUT is touched
    with fresh_output(Path(args.out), args.overwrite) as out:
        kinds = export_diffusers(Path(args.model), out)
    print(f"wrote diffusers folder with {', '.join(kinds)} to {args.out}")


# A shard (or its marker / temporary file) of `bgjax data`: group 1 is the shard's name.
_SHARD_FILE = re.compile(r"^(.+-\d{5}-of-\d{5}\.(?:array_record|tfrecord))(?:\.done\.json|\.tmp)?$")


def _data(args: argparse.Namespace) -> int | None:
    from bgjax.data import bg60k, sources
    from bgjax.data.convert import write_dataset

    if args.source == "bg60k":
        listings, split = bg60k.list_all(Path(args.root), args.alpha_threshold), args.split
        if split not in listings:
            raise FileNotFoundError(f"{Path(args.root) / bg60k.LIST_FILES[split]}: not found (is {args.root} the "
                                    f"folder the BG60k release unpacks to?)")
        print(bg60k.describe(Path(args.root), listings))
        listing = listings[split]
        try:
            bg60k.check_match(split, listing, args.min_match)
        except LookupError as e:
            print(f"bgjax data bg60k: error: {e}", file=sys.stderr)
            return 2
    elif args.source == "folder":
        listing = sources.list_folder(Path(args.images), Path(args.categories), args.masks and Path(args.masks))
        split = "folder"
    else:
        listing, split = sources.list_synthetic(args.num, args.seed, args.size), "synthetic"
    out = Path(args.out)  # OUT is touched only once the inputs are listed
    # An interrupted run left only shards and their markers: rerunning resumes it (each shard is verified).
    interrupted = out.is_dir() and not (out / "manifest.json").exists() and any(out.iterdir()) and all(
        _SHARD_FILE.match(e.name) for e in out.iterdir())
    if not interrupted:
        claim_output(out, args.overwrite)
    m = write_dataset(listing, out, args.format, split, args.records_per_shard, args.workers)
    kept = {s["path"] for s in m["shards"]}
    for stale in [e for e in out.iterdir() if (hit := _SHARD_FILE.match(e.name)) and hit.group(1) not in kept]:
        stale.unlink()  # an interrupted run's shards that this conversion did not use
    print(f"{m['num_written']} of {m['num_inputs']} inputs written to {len(m['shards'])} shards in {args.out}; "
          f"{len(m['rejected'])} rejected, {len(m['unmatched'])} files unmatched (reasons in "
          f"{Path(args.out) / 'manifest.json'})")


def _data_tfds(args: argparse.Namespace) -> int | None:
    from bgjax.data.tfds_bg60k import prepare

    if not Path(args.root).is_dir():
        raise FileNotFoundError(f"{args.root}: no such folder (give the folder the BG60k release unpacks to)")
    for config in args.split:
        try:
            info = prepare(Path(args.root), config, args.data_dir).info
        except LookupError as e:
            print(f"bgjax data tfds: error: {e}", file=sys.stderr)
            return 2
        meta = info.metadata
        print(f"bg60k/{config}: {meta['num_written']} of {meta['num_inputs']} inputs written to {info.data_dir}; "
              f"{len(meta['rejected'])} rejected, {len(meta['unmatched'])} files unmatched (reasons in "
              f"{Path(info.data_dir) / 'metadata.json'})")


def _data_inspect(args: argparse.Namespace) -> None:
    from bgjax.data.inspect import inspect_dataset

    print(inspect_dataset(Path(args.dir), num=args.num))


def _metric_weights(args: argparse.Namespace) -> None:
    from bgjax.eval.weights import convert_metric_weights

    with fresh_output(Path(args.out), args.overwrite) as out:
        ignored = convert_metric_weights(args.kind, Path(args.src), out, args.config)
    reasons: dict[str, list[str]] = {}
    for key, reason in ignored.items():
        reasons.setdefault(reason, []).append(key)
    for reason, keys in reasons.items():
        print(f"ignored {len(keys)} keys ({reason}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
    print(f"wrote {args.kind} weights to {args.out}")


def _train(args: argparse.Namespace) -> None:
    import jax

    from bgjax.train.config_file import load_config
    from bgjax.train.loop import train

    config = load_config(Path(args.config), args.overrides)  # before jax starts: a bad config fails fast
    if args.coordinator or args.distributed:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    # The loop's phases (data, models, compile, resume, saves), one line each on stderr as they happen.
    tag = f"[{jax.process_index()}]" if jax.process_count() > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"bgjax train{tag}: %(message)s"))
    logger = logging.getLogger("bgjax")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a library's root handler would print each line twice
    try:
        summary = train(config, Path(args.workdir))
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    if summary["stopped"]:
        print(f"stopped ({summary['stopped']}) at step {summary['step']}; checkpoint saved in {args.workdir}")
    else:
        print(f"trained to step {summary['step']}; model written to {Path(args.workdir) / 'model'}")


def _generate(args: argparse.Namespace) -> int:
    from bgjax.sampling.generate import generate_command

    return generate_command(args)


def _eval(args: argparse.Namespace) -> int:
    from bgjax.eval.harness import eval_command

    return eval_command(args)


def _configs(args: argparse.Namespace) -> None:
    from bgjax.train.config_file import BUNDLED, bundled_configs

    configs = bundled_configs()
    width = max(map(len, configs))
    for name, summary in configs.items():
        print(f"{name:<{width}}  {summary}")
    print(f"\n`bgjax train --config NAME --workdir DIR` trains one; the files are in {BUNDLED}")


def _demo(args: argparse.Namespace) -> None:
    from bgjax.demo import run_demo
    from bgjax.sampling.generate import check_model

    check_model(Path(args.model))
    with fresh_output(Path(args.out), args.overwrite) as out:
        summary = run_demo(out, Path(args.model), args.num_images, args.steps)
    for row in summary["results"]:
        style = row.get("reference_category", row["category"])
        reference = (f"; reference: {row['reference_category']}, tone {row['reference_tone']:.2f}"
                     if "reference_tone" in row else "")
        halo = sum(row["halos"]) / len(row["halos"])
        print(f"{row['name']:<24} backgrounds look like: {', '.join(row['background_styles'])}; "
              f"tones {', '.join(f'{t:.2f}' for t in row['background_tones'])}; "
              f"halo {halo:.3f} (ground truth {summary['ground_truth_halo'][style]:.3f}){reference}")
    m = summary["measures"]
    right = m["styles_right"]
    fewest = min(right, key=right.get)
    print(f"category styles: {sum(right.values())} of {args.num_images * len(right)} outputs have their category's "
          f"(fewest: {fewest}, {right[fewest]} of {args.num_images})")
    for name, hits in m["reference_styles_right"].items():
        print(f"{name}: {hits} of {args.num_images} outputs have the reference's style")
    print("tones: " + ", ".join(f"{name} {tone:.2f}" for name, tone in m["tones"].items()))
    worst = max(m["halo_above_ground_truth"], key=m["halo_above_ground_truth"].get)
    print(f"halo: at most {m['halo_above_ground_truth'][worst]:.3f} above the ground truth's ({worst}; "
          f"target: at most {m['halo_margin']})")
    print(f"{len(summary['results'])} rows in {summary['seconds']:.1f} s; contact sheet: "
          f"{Path(args.out) / 'contact_sheet.png'}")


def _serve(args: argparse.Namespace) -> int | None:
    import importlib.util
    import signal

    from bgjax.sampling.generate import check_model

    if importlib.util.find_spec("gradio") is None:
        print('bgjax serve: error: Gradio is not installed; install it with: pip install "bgjax[serve]"',
              file=sys.stderr)
        return 2
    from bgjax.serve import Defaults, serve

    check_model(Path(args.model))

    def stop(signum, frame):
        raise KeyboardInterrupt  # Gradio closes its server on it; then the temporary folder is removed

    signal.signal(signal.SIGTERM, stop)
    serve(Path(args.model), args.port, args.host, args.share, Defaults(steps=args.steps, num_images=args.num_images),
          args.dtype)


def _compile_cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", metavar="DIR",
                   help="JAX's persistent compilation cache: reruns with the same shapes skip compiling "
                        "(default: $BGJAX_COMPILE_CACHE, else ~/.cache/bgjax/jax)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, cache nothing")


def compile_cache_dir(args: argparse.Namespace) -> Path | None:
    """Where a command's compiled programs are cached (None: nowhere)."""
    from bgjax import compile_cache

    if args.no_compile_cache:
        return None
    return Path(args.compile_cache) if args.compile_cache else compile_cache.default_dir()


class _Formatter(argparse.HelpFormatter):
    """Descriptions wrapped, examples as written; an option's default after its help (unless None or off)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        off = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "%(default)" in text or not action.option_strings or off:
            return text
        return f"{text} (default: %(default)s)"


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    from bgjax.demo import MODEL, PRODUCTS, STEPS

    model, products = shlex.quote(str(MODEL)), shlex.quote(str(PRODUCTS))
    parser = argparse.ArgumentParser(
        prog="bgjax", formatter_class=_Formatter,
        description="E-commerce product backgrounds with JAX: a product photo (with its mask) or cut-out and its "
                    "category in, ad images with the product's pixels untouched out. A small model trained on "
                    f"synthetic data ships with bgjax ({MODEL}); convert Stable Diffusion weights and train on "
                    "your catalogue for real use. `bgjax COMMAND --help` explains each command.",
        epilog=_examples("bgjax demo", "bgjax configs",
                         f"bgjax generate --product {products}/rice_cooker.png --category 'rice cooker' --out ads"))
    parser.add_argument("--version", action="version", version=f"bgjax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")

    def command(name: str, summary: str, description: str, examples: tuple[str, ...], run) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=description, epilog=_examples(*examples),
                           formatter_class=_Formatter)
        if run is not None:
            p.set_defaults(run=run)
        return p

    p = command("demo", "the bundled small model on bundled products -> images and a contact sheet",
                "Runs the bundled small model (64 px, trained on bgjax's synthetic data) on one bundled product "
                "per category and on a coffee mug restyled after a dark and a pastel coffee-mug ad and after a "
                "desk-lamp ad; writes the images, OUT/contact_sheet.png and OUT/demo.json, and prints each output's "
                "background style, tone and halo (beside the synthetic ground truth's own halo).",
                ("bgjax demo", "bgjax demo --out my_demo --num-images 2 --steps 10"), _demo)
    p.add_argument("--out", default="bgjax_demo", help="folder for the images, contact_sheet.png and demo.json")
    p.add_argument("--model", default=str(MODEL), help="a bgjax model directory (the default is the bundled one)")
    p.add_argument("--num-images", type=int, default=4, help="images per product")
    p.add_argument("--steps", type=int, default=STEPS, help="sampler steps per image")
    p.add_argument("--overwrite", action="store_true", help="replace what OUT holds (else a non-empty OUT is refused)")
    _compile_cache_options(p)

    p = command("configs", "list the training configs that ship with bgjax",
                "Lists the configs bundled with bgjax, each with the first line of its docstring. "
                "`bgjax train --config NAME` loads one by name; `--config path/to/mine.py` loads your own "
                "(copy a bundled one to start).",
                ("bgjax configs", "bgjax train --config tiny_synthetic --workdir runs/tiny_cg"), _configs)

    p = command("train", "train a stage (vae, unet, cg, pg) from a config",
                "Trains one stage (vae, unet, cg = the paper's stage 1, pg = stage 2) as a config describes. "
                "Override any field with --config.a.b=value (typed like the field). WORKDIR gets checkpoints, "
                "TensorBoard logs, sample grids (WORKDIR/samples, every --config.sample_every=N steps) and, at "
                "the end, the trained model in WORKDIR/model; rerunning the same command resumes from the last "
                "checkpoint.",
                ("bgjax train --config tiny_synthetic --workdir runs/tiny_cg",
                 "bgjax train --config tiny_synthetic --workdir runs/quick --config.num_steps=10 "
                 "--config.data.synthetic_num=64",
                 "bgjax train --config cg_sd15_512 --config.model=models/sd15 --workdir runs/cg"), _train)
    p.add_argument("--config", required=True,
                   help="a bundled config's name (see `bgjax configs`) or the path of a .py file defining "
                        "get_config()")
    p.add_argument("--workdir", required=True, help="checkpoints, logs, samples and the trained model; reruns resume")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() from the cluster's environment (TPU pods, SLURM)")
    p.add_argument("--coordinator", help="multi-host by hand: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, help="multi-host by hand: the number of processes")
    p.add_argument("--process-id", type=int, help="multi-host by hand: this process's index (0 = coordinator)")
    _compile_cache_options(p)
    p.set_defaults(overrides=[])

    p = command("generate", "product (+ mask) or cut-out, category [, reference] -> ad images",
                "Generates backgrounds for one product (--product) or for each line of a CSV / JSONL manifest "
                "(--manifest, columns product (or image), category, and optionally mask, reference, reference_mask, "
                "seed, num_images; paths relative to the manifest's folder). Writes OUT/*.png with a JSON sidecar "
                "each; reruns skip finished items. Inputs are checked before the model loads. Exit status 1 when "
                "some manifest lines failed (see OUT/errors.jsonl), 2 for bad input.",
                (f"bgjax generate --product {products}/rice_cooker.png --category 'rice cooker' --out ads",
                 f"bgjax generate --product {products}/coffee_mug.png --category 'coffee mug' "
                 f"--reference {products}/reference_dark.png --reference-mask {products}/reference_dark_mask.png "
                 "--style-guidance --out ads_dark",
                 "bgjax generate --model runs/tiny_cg/model --manifest products.csv --out ads --contact-sheet"),
                _generate)
    p.add_argument("--model", default=str(MODEL), help="a bgjax model directory (the default is the bundled one)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--product", help="a product photo (with --mask) or an RGBA cut-out (alpha = product)")
    source.add_argument("--manifest", help="CSV or JSONL, one product per row (columns above)")
    p.add_argument("--mask", help="the product's mask: greyscale (white = product) or RGBA (alpha = product)")
    p.add_argument("--category", help="the product's category, e.g. 'rice cooker' (one the model was trained on)")
    p.add_argument("--reference", help="a style reference: photo with --reference-mask, or RGBA (alpha = its product)")
    p.add_argument("--reference-mask", help="the reference's product mask")
    p.add_argument("--num-images", type=int, default=4, help="images per product")
    p.add_argument("--seed", type=int, default=0, help="image k of a seed is the same whatever the batch")
    p.add_argument("--steps", type=int, default=25, help="sampler steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--style-guidance", action="store_true",
                   help="guidance amplifies the reference's style too: its unconditional pass runs without PG")
    p.add_argument("--keep-product", action="store_true",
                   help="the latents the product covers whole stay the VAE's encoding of the product at every step "
                        "(as diffusers' inpainting keeps a known region): less colour rings the pasted-back product")
    p.add_argument("--edge-fill", action="store_true",
                   help="before decoding, the latents at the product's edge are refilled from the background around "
                        "them, so the decoder does not spread the product's colour into it (a smooth background "
                        "within about two latent cells of the product)")
    p.add_argument("--sampler", default="dpmpp_2m", help="ddim, dpmpp_2m, dpmpp_2m_karras, euler or ddpm")
    p.add_argument("--lambda-cg", type=float, help="CG residual scale (default: the model's method.json)")
    p.add_argument("--lambda-pg", type=float, help="PG residual scale (default: the model's method.json)")
    p.add_argument("--prompt", help="replaces the method's prompt template; {category} becomes the category")
    p.add_argument("--negative-prompt", help="the unconditional pass's prompt (default: none: the empty prompt, or "
                                             "zeros for an SDXL model whose model_index.json says "
                                             "force_zeros_for_empty_prompt, as diffusers)")
    p.add_argument("--size", type=int, help="working resolution: a photo's longer side, a cut-out's square "
                                            "canvas (default: the model's resolution)")
    p.add_argument("--width", type=int, help="the canvas width in pixels: a photo is fitted into width x height "
                                             "(the rest generated), a cut-out placed on it (default: the model's "
                                             "resolution when --height is given)")
    p.add_argument("--height", type=int, help="the canvas height (see --width)")
    p.add_argument("--placement", type=float, nargs=3, metavar=("SCALE", "CX", "CY"),
                   help="cut-outs: fit in SCALE x the canvas, centred at (CX, CY) fractions (default 0.6 0.5 0.5)")
    p.add_argument("--batch-size", type=int, help="images per device batch (default: all of a product's at once)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (bfloat16 on GPUs and TPUs)")
    p.add_argument("--format", choices=tuple(IMAGE_FORMATS), default="png", dest="image_format",
                   help="image files: png (lossless), jpeg or webp")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="jpeg / webp quality, 1-100")
    p.add_argument("--out", required=True, help="the folder for the images, sidecars and errors.jsonl")
    p.add_argument("--contact-sheet", action="store_true", help="also write OUT/contact_sheet.png")
    p.add_argument("--num-shards", type=int, help="split a manifest over N runs (default: a Slurm job array's task "
                                                  "count, else the JAX process count, else 1)")
    p.add_argument("--shard-index", type=int, help="this run's shard, 0 .. N-1 (default: the Slurm array task or "
                                                   "JAX process index)")
    _compile_cache_options(p)

    p = command("serve", "a web page (Gradio) to generate backgrounds without code",
                "Serves a page on which people upload a product photo with its mask (a mask file, brush strokes, or "
                "the photo's alpha) or a cut-out, pick its category, optionally a style reference, and generate "
                "images to download. The model is loaded and compiled once at start; one queue shares the "
                "accelerator. Uploads stay in a temporary folder removed when the server stops. Needs "
                "`pip install \"bgjax[serve]\"`.",
                ("bgjax serve", "bgjax serve --model runs/cg/model --port 8080", "bgjax serve --share"),
                _serve)
    p.add_argument("--model", default=str(MODEL), help="a bgjax model directory (the default is the bundled one)")
    p.add_argument("--port", type=int, default=7860, help="the port to listen on")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (0.0.0.0: every interface, for other machines on your network)")
    p.add_argument("--share", action="store_true",
                   help="also make a public link through Gradio's share tunnel (uploads then travel through it)")
    p.add_argument("--steps", type=int, default=20, help="the page's default sampler steps (compiled at start)")
    p.add_argument("--num-images", type=int, default=4, help="the page's default number of images (compiled at "
                                                             "start)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default: float32 on a CPU, bfloat16 on GPUs and TPUs)")
    _compile_cache_options(p)

    p = command("export", "bgjax model dir -> diffusers folder",
                "Writes a bgjax model as a diffusers folder (UNet, VAE, text encoder, tokenizer, scheduler; CG and "
                "PG as ControlNet folders, identifiers as textual inversion) that diffusers and transformers load "
                "with from_pretrained; a model with CG / PG loads as bgjax.torch_compat.BackgroundTorchPipeline "
                "(BackgroundTorchPipeline.from_pretrained(OUT)), which generates as bgjax does.",
                (f"bgjax export {model} --out tiny_diffusers", "bgjax export runs/tiny_cg/model --out exported"),
                _export)
    p.add_argument("model", help="a bgjax model directory (the bundled one is " + str(MODEL) + ")")
    p.add_argument("--out", required=True, help="the diffusers folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace what OUT holds (else a non-empty OUT is refused)")

    p = command("convert", "diffusers folder or single-file SD checkpoint -> bgjax model dir",
                "Converts Stable Diffusion weights you have locally, a diffusers pipeline folder or a single "
                ".safetensors / .ckpt file (read without running pickled code), into a bgjax model directory "
                "for `bgjax train --config.model=OUT` and `bgjax generate --model OUT`.",
                ("bgjax convert stable-diffusion-v1-5/ --out models/sd15",
                 "bgjax convert v1-5-pruned-emaonly.safetensors --out models/sd15",
                 "bgjax convert sd_xl_base_1.0.safetensors --out models/sdxl --tokenizer sdxl/tokenizer "
                 "--tokenizer-2 sdxl/tokenizer_2"), _convert)
    p.add_argument("src", help="a diffusers pipeline folder, or a .safetensors/.ckpt single-file checkpoint")
    p.add_argument("--out", required=True, help="the bgjax model directory to write")
    p.add_argument("--config", help="single file only: a diffusers folder whose unet/vae/text_encoder(_2) "
                                    "config.json (and tokenizers, scheduler) to use instead of inferring them")
    p.add_argument("--tokenizer", help="single file only: a CLIP tokenizer folder to copy into the model")
    p.add_argument("--tokenizer-2", help="single file only, SDXL: the second encoder's tokenizer folder")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                   help="single file only: what the UNet predicts (SD-2 768px models: v_prediction)")
    p.add_argument("--allow-extra-keys", action="store_true",
                   help="single file only: convert even when keys lie outside SD's UNet, VAE, text encoder and "
                        "ControlNet (an unmerged LoRA, another network); they are left out and listed in the report")
    p.add_argument("--overwrite", action="store_true", help="replace what OUT holds (else a non-empty OUT is refused)")

    p = command("eval", "a BG1K / BG-pair split -> images per method variant, CLIP-sim, FID, table, t-SNE",
                "Generates with each variant (images cached in OUT/images: reruns skip them), then writes "
                "metrics.json, table.md (the paper's Table 1 for bg1k, 2 for bgpair), per_image.jsonl, tsne.png, "
                "contact sheets and errors.jsonl. Exit status 1 when some records failed to generate, 2 for bad "
                "arguments.",
                ("bgjax eval --model runs/cg/model --data data/bg1k --split bg1k --clip weights/clip "
                 "--inception weights/inception --out eval/bg1k",
                 "bgjax eval --model runs/pg/model --data data/bgpair --split bgpair --variants cg,cg_pg --num 100 "
                 "--out eval/bgpair"), _eval)
    p.add_argument("--model", required=True, help="a bgjax model directory")
    p.add_argument("--data", required=True, help="records written by `bgjax data bg60k --split bg1k|bgpair`")
    p.add_argument("--split", required=True, choices=("bg1k", "bgpair"),
                   help="bg1k: CLIP-sim against the original image (Table 1); bgpair: against the reference (Table 2)")
    p.add_argument("--out", required=True, help="the folder for images, metrics and reports; reruns resume")
    p.add_argument("--clip", help="CLIP weights from `bgjax metric-weights clip` (without: no CLIP-sim, no t-SNE)")
    p.add_argument("--inception", help="FID Inception weights from `bgjax metric-weights inception` (without: no FID)")
    p.add_argument("--variants", default="sd,controlnet,cg,cg_pg",
                   help="comma-separated rows: sd, controlnet, cg, cg_pg, real")
    p.add_argument("--num", type=int, help="evaluate the first N records (default: all)")
    p.add_argument("--images-per-item", type=int, default=1, help="images per record and variant")
    p.add_argument("--seed", type=int, default=0, help="each record's noise comes from (seed, record id)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--sampler", default="dpmpp_2m", help="ddim, dpmpp_2m, dpmpp_2m_karras, euler or ddpm")
    p.add_argument("--lambda-cg", type=float, help="CG residual scale (default: the model's method.json)")
    p.add_argument("--lambda-pg", type=float, help="PG residual scale (default: the model's method.json)")
    p.add_argument("--size", type=int, help="working resolution of the longer side (default: the model's)")
    p.add_argument("--self-reference", action="store_true",
                   help="bg1k: run cg_pg with each image's own background as the reference (optimistic)")
    p.add_argument("--batch-size", type=int, help="generation: images per device batch (default: a record's)")
    p.add_argument("--feature-batch-size", type=int, default=32, help="metric networks: images per batch")
    p.add_argument("--sheet-rows", type=int, default=16, help="records per contact sheet")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (bfloat16 on GPUs and TPUs)")
    _compile_cache_options(p)

    data = command("data", "datasets -> record shards + manifest; inspect them",
                   "Writes training / evaluation records (ArrayRecord or TFRecord shards plus OUT/manifest.json, "
                   "which lists every input written or rejected with its reason) from BG60k, your own folder or "
                   "bgjax's synthetic generator; `bgjax data inspect` summarises a dataset and draws a grid.",
                   ("bgjax data synthetic --num 64 --out data/synthetic", "bgjax data inspect data/synthetic"), None)
    data = data.add_subparsers(dest="source", required=True, metavar="SOURCE",
                               help="where the inputs come from (or inspect a written dataset):")

    def source(name: str, summary: str, description: str, examples: tuple[str, ...]) -> argparse.ArgumentParser:
        p = data.add_parser(name, help=summary, description=description, epilog=_examples(*examples),
                            formatter_class=_Formatter)
        if name not in ("inspect", "tfds"):
            p.add_argument("--out", required=True, help="the folder for the shards and manifest.json")
            p.add_argument("--format", choices=("arrayrecord", "tfrecord"), default="arrayrecord",
                           help="the record format")
            p.add_argument("--records-per-shard", type=int, default=1000, help="records per shard file")
            p.add_argument("--workers", type=int, default=None, help="writer processes (default: one per core)")
            p.add_argument("--overwrite", action="store_true",
                           help="replace a dataset OUT holds (an interrupted run's shards resume without it)")
            p.set_defaults(run=_data)
        return p

    p = source("bg60k", "the BG60k release (bg60k_info.txt, bg60k_imgs_i/, bg60k_masks_i/, bg1k_*, bgpair_info.txt)",
               "Reads the BG60k release as it unpacks: a list file (bg60k_info.txt, bg1k_info.txt or "
               "bgpair_info.txt), images in bg60k_imgs_0/ ... (bg1k_imgs/ without an index), masks named after "
               "them (161.png <-> bg60k_masks_1/161_mask.png). Prints the folders and list files it found and how "
               "many lines matched an image and a mask, then writes the split's records; stops without writing "
               "anything when fewer than --min-match of the lines matched.",
               ("bgjax data bg60k --root BG60k --out data/bg60k",
                "bgjax data bg60k --root BG60k --split bg1k --out data/bg1k"))
    p.add_argument("--root", required=True, help="the folder the BG60k release unpacks to")
    p.add_argument("--split", choices=("bg60k", "bg1k", "bgpair"), default="bg60k",
                   help="which list file: training set, BG1K test set, or BG-pair test pairs")
    p.add_argument("--alpha-threshold", type=int, default=ALPHA_THRESHOLD,
                   help="mask pixels whose alpha (or grey value) is above this are product, as the release's "
                        "users read its RGBA masks")
    p.add_argument("--min-match", type=float, default=MIN_MATCH,
                   help="stop, writing nothing, when fewer than this share of the list's lines match their files")
    p = source("folder", "a catalogue: images, masks (or RGBA cut-outs), a CSV/JSONL of categories",
               "Your own catalogue: a folder of images, optionally a folder of masks (found by the image's name "
               "or the table's mask column), and a CSV or JSONL table with the columns product (or image), "
               "category and optionally mask, headers in any case. An image without a mask file uses its alpha "
               "channel as the mask.",
               ("bgjax data folder --images shop/images --categories shop/categories.csv --out data/shop",
                "bgjax data folder --images shop/images --masks shop/masks --categories shop/categories.jsonl "
                "--out data/shop"))
    p.add_argument("--images", required=True, help="the folder of product images")
    p.add_argument("--categories", required=True, help="CSV or JSONL with product (or image), category[, mask]")
    p.add_argument("--masks", help="mask folder; an image without a mask file there uses its alpha channel")
    p = source("synthetic", "procedural products on category-styled backgrounds",
               "bgjax's synthetic data: procedural products of six categories, each category with its own "
               "background hue and pattern and each image its own tone (what the bundled model learned).",
               ("bgjax data synthetic --num 64 --out data/synthetic",
                "bgjax data synthetic --num 2000 --size 64 --out data/synthetic64"))
    p.add_argument("--num", type=int, required=True, help="how many samples")
    p.add_argument("--seed", type=int, default=0, help="sample i of a seed is always the same")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p = source("tfds", "the BG60k release -> a TFDS dataset (bg60k/bg60k, bg60k/bg1k, bg60k/bgpair)",
               "Prepares BG60k as a TFDS dataset in ArrayRecord files (bgjax.data.tfds_bg60k; needs "
               "`pip install \"bgjax[tfds]\"`, not TensorFlow), read by the same reader as `bgjax data bg60k`: "
               "rejections and unmatched files are in the dataset's metadata.json. Train on it with "
               "`bgjax train ... --config.data.tfds=bg60k/bg60k --config.data.tfds_data_dir=DIR`.",
               ("bgjax data tfds --root BG60k", "bgjax data tfds --root BG60k --split bg1k bgpair "
                                                "--data-dir data/tfds"))
    p.add_argument("--root", required=True, help="the folder the BG60k release unpacks to (TFDS's manual_dir)")
    p.add_argument("--split", nargs="+", choices=("bg60k", "bg1k", "bgpair"), default=["bg60k"],
                   help="the configs to prepare, one per list file")
    p.add_argument("--data-dir", help="TFDS's data_dir (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    p.set_defaults(run=_data_tfds)
    p = source("inspect", "counts, categories and a PNG grid of samples",
               "Prints a dataset's counts per category and per rejection reason, and writes DIR/inspect.png: per "
               "sample the image, mask, a training crop, its mask and a PG reference.",
               ("bgjax data inspect data/synthetic", "bgjax data inspect data/shop --num 32"))
    p.add_argument("dir", help="a folder written by `bgjax data ...`")
    p.add_argument("--num", type=int, default=16, help="samples in the grid")
    p.set_defaults(run=_data_inspect)

    p = command("metric-weights", "CLIP / FID Inception weights (local files) -> config.json + params",
                "Converts the metric networks `bgjax eval` uses from local files: a transformers CLIP model for "
                "CLIP-sim and t-SNE, pytorch-fid's Inception for FID.",
                ("bgjax metric-weights clip clip-vit-large-patch14/ --out weights/clip",
                 "bgjax metric-weights inception pt_inception-2015-12-05-6726825d.pth --out weights/inception"),
                _metric_weights)
    p.add_argument("kind", choices=("clip", "inception"), help="which network")
    p.add_argument("src", help="clip: a transformers CLIP folder, or a .safetensors/.bin file with config.json "
                               "beside it; inception: pytorch-fid's pt_inception-2015-12-05-*.pth")
    p.add_argument("--out", required=True, help="the folder for config.json and params.safetensors")
    p.add_argument("--config", help="clip: the config.json to use instead of the one beside SRC")
    p.add_argument("--overwrite", action="store_true", help="replace what OUT holds (else a non-empty OUT is refused)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from bgjax.data.records import RecordError
    from bgjax.fileio import CheckpointError
    from bgjax.models.configs import ConfigError
    from bgjax.tables import TableError
    from bgjax.train import TrainingDiverged

    args, unknown = build_parser().parse_known_args(argv)
    if unknown and args.command != "train":
        build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = unknown
    if hasattr(args, "no_compile_cache"):
        from bgjax import compile_cache

        compile_cache.enable(compile_cache_dir(args))
    try:
        status = args.run(args)
    except (CheckpointError, ConfigError, RecordError, TableError, FileNotFoundError, FileExistsError,
            TrainingDiverged) as e:
        print(f"bgjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
