#!/usr/bin/env bash
# Issue 14's CPU targets, eager PyTorch (and one compiled run), fp32, random weights (speed only: budget mode has
# static shapes, so its speed does not depend on the weights). Run it ALONE on the machine (no other torch process:
# 2 threads each on 2 cores make timings 5-10x slower). Writes benchmarks/results/cpu_*.{json,md}. ~30 min on a
# 2-core CPU.
# Speed-ups are paired per interleaved round (median ratio, 95% interval): the rounds counts below give intervals
# of a few percent on a VM whose batch-1 rounds vary 1.5-3x.
# /K and --decide-every K: the controller decides in every K-th controlled block only (ExecutionPolicy.decide_every).
#   1. main-job model (49 tokens): dense vs TPC (paused keys, as the main job) vs EViT at matched GMACs, b=1 and 256,
#      eager and compiled
#   2. DeiT-S 224: speed-up per FLOPs at keep 30/50/70% (and 100%: the controller's overhead), b=1 and 32; fp32, bf16
#   3. where the time goes: per controlled block parts, both models, and the zero-overhead ceiling (the dense model
#      cut once to the kept tokens: what this machine gives for those FLOPs at all)
#   4. why that ceiling is below FLOPs at DeiT-S batch 1: a block's time against its token count
#   5. DeiT-S again with oneDNN linears in every model (tpcvit.onednn_linears): speed-up per FLOPs and the ceiling
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
R=benchmarks/results
tpcvit bench -c configs/fmnist_main.yaml --no-data --quiet --methods dense,dense-lean,tpc-keys@0.45,tpc-keys@0.45/2,tpc-keys@0.45/5,tpc@0.45,tpc@0.45/5,evit@0.45 \
  --set 'model.peer={evit: {keep_rate: 0.5, evit_blocks: [1, 2, 3]}}' --batch-sizes 1 256 --rounds 41 \
  --calib-images 64 --out $R/cpu_mainjob_methods
# every peer on the same lean executor, TPC deciding once
tpcvit bench -c configs/fmnist_main.yaml --no-data --quiet --methods dense,dense-lean,tpc-keys@0.45/5,tpc@0.45/5,evit@0.45,tome@0.45,idlevit@0.45 \
  --set 'model.peer={evit: {keep_rate: 0.5, evit_blocks: [1, 2, 3]}}' --batch-sizes 1 256 --rounds 21 \
  --calib-images 64 --out $R/cpu_mainjob_peers
# the same model through torch.compile (every model, dense and EViT included; ~3 min of it is compiling)
tpcvit bench -c configs/fmnist_main.yaml --no-data --quiet --compile --methods dense,dense-lean,tpc-keys@0.45,tpc-keys@0.45/5,tpc@0.45/5,evit@0.45 \
  --set 'model.peer={evit: {keep_rate: 0.5, evit_blocks: [1, 2, 3]}}' --batch-sizes 1 256 --rounds 31 \
  --calib-images 64 --out $R/cpu_mainjob_methods_compiled
tpcvit bench --model tpc_deit_small_patch16_224 --keeps 1.0 0.7 0.5 0.3 --batch-sizes 1 32 --rounds 15 \
  --decide-every 1 3 --out $R/cpu_deit_small
# the same in bf16 (CPUs with AVX512-BF16/AMX run bf16 GEMMs ~2x faster than fp32: the controller's share grows)
tpcvit bench --model tpc_deit_small_patch16_224 --keeps 1.0 0.7 0.5 0.3 --batch-sizes 1 32 --rounds 9 --dtype bfloat16 \
  --out $R/cpu_deit_small_bf16
tpcvit bench --breakdown --model tpc_deit_small_patch16_224 --keeps 1.0 0.7 0.5 0.3 --batch-sizes 1 32 --rounds 11 \
  --decide-every 1 3 --out $R/cpu_breakdown_deit_small
tpcvit bench --breakdown -c configs/fmnist_main.yaml --keeps 1.0 0.25 --batch-sizes 1 256 --rounds 21 \
  --decide-every 1 2 5 --out $R/cpu_breakdown_mainjob
# why the ceiling at DeiT-S batch 1 is below FLOPs: a block's time against its token count (weights cached or not)
python benchmarks/block_scaling.py --rounds 21 --out $R/block_scaling_deit_small_cpu
# 5. DeiT-S on oneDNN linears (every model, dense included): the b=1 target and its ceiling on the faster GEMMs
tpcvit bench --model tpc_deit_small_patch16_224 --keeps 1.0 0.7 0.5 0.3 --decide-every 1 3 11 --batch-sizes 1 32 \
  --rounds 21 --onednn on --quiet --out $R/cpu_deit_small_onednn
tpcvit bench --breakdown --model tpc_deit_small_patch16_224 --keeps 1.0 0.7 0.5 0.3 --batch-sizes 1 32 --rounds 11 \
  --decide-every 1 3 11 --onednn on --out $R/cpu_breakdown_deit_small_onednn
