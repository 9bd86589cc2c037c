#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with lawa-diffusion and its dependencies,
# the Fashion-MNIST files (Debian package, when apt is available) and the FID Inception weights.
# Usage: bash scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LAWA_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
extra=""
if [ "${1:-}" = "--dev" ]; then extra="[dev]"; fi
# torch/torchvision pairs known to import together; pip takes them from a local wheel cache when one exists.
if [ "$(uname -m)" = "aarch64" ]; then pins="torch==2.9.1 torchvision==0.24.1"; else pins="torch==2.14.1 torchvision==0.29.1"; fi
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing $pins"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check $pins
fi
echo "[setup] installing lawa-diffusion$extra"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".$extra"

# Fashion-MNIST: $LAWA_DATA, or the Debian package's files.
if [ -z "${LAWA_DATA:-}" ] && [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "[setup] installing Debian package dataset-fashion-mnist"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
      (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null)) \
      || echo "[setup] could not install dataset-fashion-mnist; set LAWA_DATA to a folder with the Fashion-MNIST IDX files"
  else
    echo "[setup] Fashion-MNIST not found; set LAWA_DATA to a folder with the IDX files"
  fi
fi

# FID Inception weights (converted once, cached; see README "Inception weights").
"$VENV/bin/lawa-diffusion" inception fetch
echo "[setup] done: activate with 'source $VENV/bin/activate'"
