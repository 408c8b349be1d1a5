#!/usr/bin/env bash
# TPC vs dense vs peers (ToMe, EViT, A-ViT) on Fashion-MNIST, in one harness, at matched GMACs.
# Needs the main job's models (bash scripts/main.sh). The learned peers are fine-tuned from the same dense model
# with the same recipe as TPC (3 epochs, lr 5e-4, distillation from the dense model, 40k images); ToMe is
# training-free. EViT reduces at blocks 1/2/3 of 6 (the first block TPC controls) so it can reach TPC's budgets.
# Writes benchmarks/results/fmnist_peers.{json,md,png}.  ~25 min on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
MAIN=${MAIN:-runs/fmnist_main}
OUT=${OUT:-runs/fmnist_peers}
DENSE=$MAIN/dense/best.safetensors
[ -f "$DENSE" ] || { echo "missing $DENSE: run bash scripts/main.sh first" >&2; exit 1; }
RECIPE=(train.epochs=3 train.lr=5e-4 "model.init=$DENSE" "distill.teacher=$DENSE"
        distill.teacher_model=deit_tiny_patch16_224)
PEERS="model.peer={evit: {keep_rate: 0.5, evit_blocks: [1, 2, 3]}, avit: {target_depth: 0.45}}"
for m in evit avit; do
  resume=(); [ -f "$OUT/$m/last.json" ] && resume=(--resume)
  tpcvit train -c configs/fmnist_main.yaml -o "$OUT/$m" "${resume[@]}" "model.name=${m}_deit_tiny_patch16_224" \
    "$PEERS" "${RECIPE[@]}"
done
SPECS=dense,tpc-adaptive,tpc@0.6,tpc@0.45,tpc@0.35,tome@0.6,tome@0.45,tome@0.35,evit@0.6,evit@0.45,evit@0.35
SPECS=$SPECS,avit@0.6,avit@0.45,avit@0.35
tpcvit bench -c configs/fmnist_main.yaml --methods "$SPECS" --set "$PEERS" \
  --weights "dense=$DENSE" --weights "tpc=$MAIN/tpc/best.safetensors" \
  --weights "evit=$OUT/evit/best.safetensors" --weights "avit=$OUT/avit/best.safetensors" \
  --batch-sizes 1 256 --rounds 5 --calib-images 256 --out benchmarks/results/fmnist_peers
