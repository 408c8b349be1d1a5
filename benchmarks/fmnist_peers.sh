#!/usr/bin/env bash
# TPC vs dense vs peers (ToMe, EViT, A-ViT) on Fashion-MNIST, in one harness, at matched GMACs.
# Needs the main job's models (bash scripts/main.sh): its dense model, and its TPC model (paused tokens visible as
# keys/values, "tpc-keys"). Fine-tuned here from that dense model with the same recipe as the main job's TPC stage
# (3 epochs, lr 5e-4, distillation from the dense model; the committed table was made when the main job trained
# on 40k images, it now trains on 20k to finish in <= 15 min, so a re-run gives other numbers): the
# METHOD.md-default TPC (paused tokens masked out of attention, "tpc"), EViT, A-ViT, ToMe with merging on at r = 8.8 (its 45%-GMACs setting; "tome-ft";
# "tome" is ToMe training-free on the dense weights), and the dense model itself (so every row has seen the same
# training: otherwise fine-tuned rows look better than "dense" just for training longer).
# EViT reduces at blocks 1/2/3 of 6 (the first block TPC controls) so it can reach TPC's budgets.
# Writes benchmarks/results/fmnist_peers.{json,md,png}.  ~50 min on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
MAIN=${MAIN:-runs/fmnist_main}
OUT=${OUT:-runs/fmnist_peers}
DENSE=$MAIN/dense/best.safetensors
[ -f "$DENSE" ] || { echo "missing $DENSE: run bash scripts/main.sh first" >&2; exit 1; }
RECIPE=(train.epochs=3 train.lr=5e-4 "model.init=$DENSE" "distill.teacher=$DENSE"
        distill.teacher_model=deit_tiny_patch16_224)
PEERS="model.peer={evit: {keep_rate: 0.5, evit_blocks: [1, 2, 3]}, avit: {target_depth: 0.45}, tome: {tome_r: 8.8}}"
MASKED="model.tpc={start_layer: 1, target_keep: 0.37, paused_keys: false}"
for m in dense tpc evit avit tome; do
  [ -f "$OUT/$m/best.safetensors" ] && [ "$(python -c "import json;print(json.load(open('$OUT/$m/last.json'))['epoch'])")" = 3 ] && continue
  resume=(); [ -f "$OUT/$m/last.json" ] && resume=(--resume)
  name=${m}_deit_tiny_patch16_224; [ "$m" = dense ] && name=deit_tiny_patch16_224
  [ "$m" = tpc ] && name=tpc_deit_tiny_patch16_224
  tpcvit train -c configs/fmnist_main.yaml -o "$OUT/$m" "${resume[@]}" "model.name=$name" "$PEERS" "$MASKED" \
    "${RECIPE[@]}"
done
SPECS=dense,tpc-keys-adaptive,tpc-keys@0.6,tpc-keys@0.45,tpc-keys@0.35,tpc-adaptive,tpc@0.6,tpc@0.45,tpc@0.35
SPECS=$SPECS,tome@0.6,tome@0.45,tome@0.35,tome-ft@0.6,tome-ft@0.45,tome-ft@0.35
SPECS=$SPECS,evit@0.6,evit@0.45,evit@0.35,avit@0.6,avit@0.45,avit@0.35
tpcvit bench -c configs/fmnist_main.yaml --methods "$SPECS" --set "$PEERS" \
  --weights "dense=$OUT/dense/best.safetensors" --weights "tpc-keys=$MAIN/tpc/best.safetensors" \
  --weights "tpc=$OUT/tpc/best.safetensors" --weights "evit=$OUT/evit/best.safetensors" \
  --weights "avit=$OUT/avit/best.safetensors" --weights "tome-ft=$OUT/tome/best.safetensors" \
  --batch-sizes 1 256 --rounds 5 --calib-images 256 --out benchmarks/results/fmnist_peers
