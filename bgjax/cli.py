"""The `bgjax` command: one entry point with a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bgjax import __version__


def _convert(args: argparse.Namespace) -> None:
    from bgjax.convert.diffusers_folder import import_diffusers
    from bgjax.convert.single_file import import_single_file

    src = Path(args.src)
    if src.is_dir():
        kinds = import_diffusers(src, Path(args.out))
    else:
        kinds = import_single_file(src, Path(args.out), config_dir=args.config, tokenizer=args.tokenizer,
                                   prediction_type=args.prediction_type)
    print(f"wrote {', '.join(kinds)} to {args.out}")


def _export(args: argparse.Namespace) -> None:
    from bgjax.convert.diffusers_folder import export_diffusers

    kinds = export_diffusers(Path(args.model), Path(args.out))
    print(f"wrote diffusers folder with {', '.join(kinds)} to {args.out}")


def _data(args: argparse.Namespace) -> None:
    from bgjax.data import sources
    from bgjax.data.convert import write_dataset

    if args.source == "bg60k":
        listing, split = sources.list_bg60k(Path(args.root), args.split), args.split
    elif args.source == "folder":
        listing = sources.list_folder(Path(args.images), Path(args.categories), args.masks and Path(args.masks))
        split = "folder"
    else:
        listing, split = sources.list_synthetic(args.num, args.seed, args.size), "synthetic"
    m = write_dataset(listing, Path(args.out), args.format, split, args.records_per_shard, args.workers)
    print(f"{m['num_written']} of {m['num_inputs']} inputs written to {len(m['shards'])} shards in {args.out}; "
          f"{len(m['rejected'])} rejected (reasons in {Path(args.out) / 'manifest.json'})")


def _data_inspect(args: argparse.Namespace) -> None:
    from bgjax.data.inspect import inspect_dataset

    print(inspect_dataset(Path(args.dir), num=args.num))


def _metric_weights(args: argparse.Namespace) -> None:
    from bgjax.eval.weights import convert_metric_weights

    ignored = convert_metric_weights(args.kind, Path(args.src), Path(args.out), args.config)
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


def _demo(args: argparse.Namespace) -> None:
    from bgjax.demo import MODEL, run_demo

    summary = run_demo(Path(args.out), Path(args.model) if args.model else MODEL, args.num_images, args.steps)
    for row in summary["results"]:
        reference = f", reference tone {row['reference_tone']:.2f}" if "reference_tone" in row else ""
        print(f"{row['name']:<24} backgrounds look like: {', '.join(row['background_styles'])}; "
              f"tones {', '.join(f'{t:.2f}' for t in row['background_tones'])}{reference}")
    print(f"{len(summary['results'])} rows in {summary['seconds']:.1f} s; contact sheet: "
          f"{Path(args.out) / 'contact_sheet.png'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bgjax", description="E-commerce product backgrounds with JAX.")
    parser.add_argument("--version", action="version", version=f"bgjax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="diffusers folder or single-file SD checkpoint -> bgjax model dir")
    p.add_argument("src", help="a diffusers pipeline folder, or a .safetensors/.ckpt single-file checkpoint")
    p.add_argument("--out", required=True, help="the bgjax model directory to write")
    p.add_argument("--config", help="single file only: a diffusers folder whose unet/vae/text_encoder "
                                    "config.json to use instead of inferring them from the weights")
    p.add_argument("--tokenizer", help="single file only: a CLIP tokenizer folder to copy into the model")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                   help="single file only: what the UNet predicts (SD-2 768px models: v_prediction)")
    p.set_defaults(run=_convert)

    p = sub.add_parser("export", help="bgjax model dir -> diffusers folder")
    p.add_argument("model", help="a bgjax model directory")
    p.add_argument("--out", required=True, help="the diffusers folder to write")
    p.set_defaults(run=_export)

    p = sub.add_parser("demo", help="the bundled small model on bundled products -> contact sheet")
    p.add_argument("--out", default="bgjax_demo", help="folder for the images and contact_sheet.png")
    p.add_argument("--model", help="another bgjax model directory (default: the bundled one)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.set_defaults(run=_demo)

    p = sub.add_parser("train", help="train a stage (vae, unet, cg, pg) from a config file",
                       epilog="Override any config field with --config.a.b=value.")
    p.add_argument("--config", required=True, help="a config file in configs/ (defines get_config())")
    p.add_argument("--workdir", required=True, help="checkpoints, logs and the trained model; reruns resume")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() from the cluster's environment (TPU pods, SLURM)")
    p.add_argument("--coordinator", help="multi-host by hand: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.set_defaults(run=_train, overrides=[])

    p = sub.add_parser("generate", help="product (+ mask) or cut-out, category [, reference] -> ad images",
                       description="Writes OUT/*.png with a JSON sidecar each; reruns skip finished items. "
                                   "Exit status 1 when some manifest lines failed (see OUT/errors.jsonl), "
                                   "2 for bad input.")
    p.add_argument("--model", required=True, help="a bgjax model directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--product", help="a product photo (with --mask) or an RGBA cut-out (alpha = product)")
    source.add_argument("--manifest", help="CSV or JSONL with product, category and optionally mask, reference, "
                                           "reference_mask, seed, num_images; paths relative to its folder")
    p.add_argument("--mask", help="the product's mask: greyscale (white = product) or RGBA (alpha = product)")
    p.add_argument("--category", help="the product's category, e.g. 'rice cooker'")
    p.add_argument("--reference", help="a style reference: photo with --reference-mask, or RGBA (alpha = its product)")
    p.add_argument("--reference-mask", help="the reference's product mask")
    p.add_argument("--num-images", type=int, default=4, help="images per product (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image k of a seed is the same whatever the batch")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--style-guidance", action="store_true",
                   help="guidance amplifies the reference's style too: its unconditional pass runs without PG")
    p.add_argument("--sampler", default="dpmpp_2m", help="ddim, dpmpp_2m (default), dpmpp_2m_karras, euler, ddpm")
    p.add_argument("--lambda-cg", type=float, help="CG residual scale (default: the model's method.json)")
    p.add_argument("--lambda-pg", type=float, help="PG residual scale (default: the model's method.json)")
    p.add_argument("--size", type=int, help="working resolution: a photo's longer side, a cut-out's square "
                                            "canvas (default: the model's resolution)")
    p.add_argument("--placement", type=float, nargs=3, metavar=("SCALE", "CX", "CY"),
                   help="cut-outs: fit in SCALE x the canvas, centred at (CX, CY) fractions (default 0.6 0.5 0.5)")
    p.add_argument("--batch-size", type=int, help="images per device batch (default: all of a product's at once)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", required=True, help="the folder for the images, sidecars and errors.jsonl")
    p.add_argument("--contact-sheet", action="store_true", help="also write OUT/contact_sheet.png")
    p.set_defaults(run=_generate)

    p = sub.add_parser("eval", help="a BG1K / BG-pair split -> generated images per method variant, CLIP-sim, FID, "
                                    "table, t-SNE",
                       description="Generates with each variant (images cached in OUT/images: reruns skip them), "
                                   "then writes metrics.json, table.md (the paper's Table 1 for bg1k, 2 for bgpair), "
                                   "per_image.jsonl, tsne.png, contact sheets and errors.jsonl. Exit status 1 when "
                                   "some records failed to generate, 2 for bad arguments.")
    p.add_argument("--model", required=True, help="a bgjax model directory")
    p.add_argument("--data", required=True, help="records written by `bgjax data bg60k --split bg1k|bgpair`")
    p.add_argument("--split", required=True, choices=("bg1k", "bgpair"),
                   help="bg1k: CLIP-sim against the original image (Table 1); bgpair: against the reference (Table 2)")
    p.add_argument("--out", required=True, help="the folder for images, metrics and reports; reruns resume")
    p.add_argument("--clip", help="CLIP weights from `bgjax metric-weights clip` (without: no CLIP-sim, no t-SNE)")
    p.add_argument("--inception", help="FID Inception weights from `bgjax metric-weights inception` (without: no FID)")
    p.add_argument("--variants", default="sd,controlnet,cg,cg_pg",
                   help="comma-separated rows: sd, controlnet, cg, cg_pg, real (default sd,controlnet,cg,cg_pg)")
    p.add_argument("--num", type=int, help="evaluate the first N records (default: all)")
    p.add_argument("--images-per-item", type=int, default=1, help="images per record and variant (default 1)")
    p.add_argument("--seed", type=int, default=0, help="each record's noise comes from (seed, record id)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="dpmpp_2m", help="ddim, dpmpp_2m (default), dpmpp_2m_karras, euler, ddpm")
    p.add_argument("--lambda-cg", type=float, help="CG residual scale (default: the model's method.json)")
    p.add_argument("--lambda-pg", type=float, help="PG residual scale (default: the model's method.json)")
    p.add_argument("--size", type=int, help="working resolution of the longer side (default: the model's)")
    p.add_argument("--self-reference", action="store_true",
                   help="bg1k: run cg_pg with each image's own background as the reference (optimistic)")
    p.add_argument("--batch-size", type=int, help="generation: images per device batch")
    p.add_argument("--feature-batch-size", type=int, default=32, help="metric networks: images per batch")
    p.add_argument("--sheet-rows", type=int, default=16, help="records per contact sheet (default 16)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.set_defaults(run=_eval)

    data = sub.add_parser("data", help="datasets -> record shards + manifest; inspect them").add_subparsers(
        dest="source", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="the folder for the shards and manifest.json")
        p.add_argument("--format", choices=("arrayrecord", "tfrecord"), default="arrayrecord")
        p.add_argument("--records-per-shard", type=int, default=1000)
        p.add_argument("--workers", type=int, default=None, help="writer processes (default: one per core)")
        p.set_defaults(run=_data)

    p = data.add_parser("bg60k", help="the BG60k release (info files, *_imgs_*/, *_masks_*/)")
    p.add_argument("--root", required=True)
    p.add_argument("--split", choices=("bg60k", "bg1k", "bgpair"), default="bg60k")
    common(p)
    p = data.add_parser("folder", help="a catalogue: images, masks (or RGBA cut-outs), a CSV/JSONL of categories")
    p.add_argument("--images", required=True)
    p.add_argument("--categories", required=True, help="CSV or JSONL with image, category[, mask]")
    p.add_argument("--masks", help="mask folder; without it each image's alpha channel is its mask")
    common(p)
    p = data.add_parser("synthetic", help="procedural products on category-styled backgrounds")
    p.add_argument("--num", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    common(p)
    p = data.add_parser("inspect", help="counts, categories and a PNG grid of samples")
    p.add_argument("dir")
    p.add_argument("--num", type=int, default=16)
    p.set_defaults(run=_data_inspect)

    p = sub.add_parser("metric-weights", help="CLIP / FID Inception weights (local files) -> config.json + params")
    p.add_argument("kind", choices=("clip", "inception"))
    p.add_argument("src", help="clip: a transformers CLIP folder, or a .safetensors/.bin file with config.json "
                               "beside it; inception: pytorch-fid's pt_inception-2015-12-05-*.pth")
    p.add_argument("--out", required=True, help="the folder for config.json and params.safetensors")
    p.add_argument("--config", help="clip: the config.json to use instead of the one beside SRC")
    p.set_defaults(run=_metric_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    from bgjax.convert.errors import CheckpointError
    from bgjax.data.records import RecordError
    from bgjax.models.configs import ConfigError
    from bgjax.train import TrainingDiverged

    args, unknown = build_parser().parse_known_args(argv)
    if unknown and args.command != "train":
        build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = unknown
    try:
        status = args.run(args)
    except (CheckpointError, ConfigError, RecordError, FileNotFoundError, TrainingDiverged) as e:
        print(f"bgjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
