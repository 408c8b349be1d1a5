#!/usr/bin/env bash
# The GPU check (issue: speed where users feel it): the CUDA test tier, then the GPU benchmark (DeiT-S/B, bf16 and fp32,
# batch 1 and 256, TPC vs dense vs every peer at matched GMACs; then DeiT-S bf16 replayed from CUDA graphs). On a
# machine without a GPU (CI) both run as a dry run: the CUDA tests are skipped and the benchmark runs on CPU at tiny
# sizes (eager: CUDA graphs need a GPU; their routing is unit-tested), so the script cannot rot.
#   bash scripts/gpu_check.sh                 # results in benchmarks/results/gpu_<gpu name>_*
#   GPU_RESULTS=$OUT bash scripts/gpu_check.sh  # elsewhere; a (model, dtype) already measured there is reused, so a
#                                               # run cut off by the end of a GPU lease resumes where it stopped
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
  R=${GPU_RESULTS:-benchmarks/results}
  $PY -m pytest -m cuda tests
  $PY benchmarks/gpu_bench.py --out "$R/gpu_${GPU}"
  # batch 1 on a GPU is launch-bound: the same comparison replayed from CUDA graphs (budget mode has no host sync)
  $PY benchmarks/gpu_bench.py --cuda-graphs --models deit_small_patch16_224 --dtypes bfloat16 \
    --out "$R/gpu_${GPU}_graphs"
else
  echo "gpu_check: no CUDA device here; dry run (CUDA tests skipped, benchmark on CPU at tiny sizes)"
  $PY -m pytest -q -m cuda tests || [ $? -eq 5 ]   # 5 = every test deselected/skipped: fine without a GPU
  OUT=$(mktemp -d)
  $PY benchmarks/gpu_bench.py --dry-run --out "$OUT/gpu_dry" > "$OUT/log.txt"
  grep -q "tpc-free" "$OUT/gpu_dry_summary.md"   # each check its own command: set -e stops at a failed one
  grep -q "tpc/3" "$OUT/gpu_dry_summary.md"
  # resumable: run again, every finished (model, dtype) is reused, not re-measured
  $PY benchmarks/gpu_bench.py --dry-run --out "$OUT/gpu_dry" > "$OUT/log2.txt"
  test "$(grep -c '^reused' "$OUT/log2.txt")" -eq 2
  grep -q "tpc/3" "$OUT/gpu_dry_summary.md"
  echo "gpu_check: dry run ok ($OUT)"
fi
