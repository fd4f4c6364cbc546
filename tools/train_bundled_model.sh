#!/usr/bin/env bash
# Reproduces bgjax/assets/tiny_model, the model `bgjax demo` uses: synthetic data, then the VAE,
# the text-to-image UNet, CG (stage 1) and PG (stage 2), each with `bgjax train`. 2-core CPU: 75 min on one of this
# project's VMs, 113 to 117 min on a slower one (the VAE 33 min, the UNet 30 to 34, CG 18, PG 30 to 32).
set -euo pipefail
RUNS=${RUNS:-runs}
[ -f "$RUNS/synthetic64/manifest.json" ] || bgjax data synthetic --out "$RUNS/synthetic64" --num 2000 --size 64 --seed 0
bgjax train --config tiny_vae --workdir "$RUNS/tiny_vae" --config.data.dir="$RUNS/synthetic64"
bgjax train --config tiny_unet --workdir "$RUNS/tiny_unet" --config.data.dir="$RUNS/synthetic64" \
  --config.model="$RUNS/tiny_vae/model"
bgjax train --config tiny_cg --workdir "$RUNS/tiny_cg" --config.data.dir="$RUNS/synthetic64" \
  --config.model="$RUNS/tiny_unet/model"
bgjax train --config tiny_pg --workdir "$RUNS/tiny_pg" --config.data.dir="$RUNS/synthetic64" \
  --config.model="$RUNS/tiny_cg/model"
rm -rf bgjax/assets/tiny_model
cp -rL "$RUNS/tiny_pg/model" bgjax/assets/tiny_model  # -L: the stages' models link their base's components
