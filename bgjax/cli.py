"""The `bgjax` command: one entry point with a subcommand per job."""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
    from bgjax.convert.errors import CheckpointError
    from bgjax.models.configs import ConfigError

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"bgjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
