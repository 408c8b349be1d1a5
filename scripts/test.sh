#!/usr/bin/env bash
# Set up, lint, and run the test suite (CPU only, no downloads at run time). What CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
$PY -m ruff check .
# The GPU script must not rot: without a GPU it dry-runs (CUDA tests skipped, benchmark on CPU at tiny sizes).
bash scripts/gpu_check.sh
# The model tests again on the oldest timm we support (pyproject: timm>=1.0.17), beside the same torch.
OLD=.venv-timm-oldest
[ -x $OLD/bin/python ] || $PY -m venv --system-site-packages $OLD
$OLD/bin/python -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps timm==1.0.17
$OLD/bin/python -m pip install -q --disable-pip-version-check --root-user-action=ignore "huggingface_hub<1"  # its era
$OLD/bin/python -c "import tpcvit, timm; assert timm.__version__ == '1.0.17', timm.__version__"
$OLD/bin/python -m pytest -p no:cacheprovider tests/test_models.py tests/test_layers.py tests/test_peers.py tests/test_families.py \
  tests/test_flops_checkpoint.py tests/test_controller.py tests/test_patch.py
# The unit tier first (seconds: fails fast on a broken core), then the slow pipeline tier; together the whole
# suite. The slow tier is mostly single-threaded CLI subprocesses, so it runs one pytest-xdist worker per core (each
# worker and its subprocesses on one thread: tests/conftest.py), which halves it on 2 cores; it lists its 10 slowest
# tests (CI must stay under 20 minutes: where the time goes); the last summary line ("N passed") closes the output.
$PY -m pytest -m "not slow" tests
$PY -m pytest -m slow -n auto --maxprocesses 4 --durations=10 tests
