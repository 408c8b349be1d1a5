#!/usr/bin/env bash
# Set up, lint, and run the test suite (CPU only, no downloads at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
$PY -m ruff check .
$PY -m pytest tests
