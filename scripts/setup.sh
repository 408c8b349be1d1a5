#!/usr/bin/env bash
# Install everything tpcvit needs on a fresh machine (Python, pip and gcc only).
# Exact pins for this machine (the package itself takes ranges): unpinned, torch/torchvision resolve to
# multi-GB CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore torch==2.13.0 torchvision==0.28.0 \
  timm==1.0.31
$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".[test]"
# Real offline data for the main job and the tests: Debian's Fashion-MNIST (idx files).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
