#!/usr/bin/env bash
# The main job: set up, then train a small dense ViT on Fashion-MNIST, fine-tune it with TPC, evaluate both
# and print one table (top-1, GMACs/img, img/s, speed-up); writes runs/fmnist_main/results.{json,md,png}.
# Extra arguments are config overrides, e.g.  bash scripts/main.sh pipeline.dense_epochs=2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
OUT=${OUT:-runs/fmnist_main}
tpcvit pipeline --config configs/fmnist_main.yaml --output "$OUT" "$@"
