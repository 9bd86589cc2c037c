#!/usr/bin/env bash
# Set up (see scripts/setup.sh) and run the main job: a small LAWA-over-EMA training run on
# Fashion-MNIST that prints FID of EMA and LAWA at each evaluation point and writes a report.
# Extra arguments go to `lawa-diffusion train` (e.g. --output-dir runs/mine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${LAWA_VENV:-.venv}"
exec "$VENV/bin/lawa-diffusion" train --config configs/fashion_mnist_cpu.yaml "$@"
