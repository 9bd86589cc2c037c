#!/usr/bin/env bash
# Set up (see scripts/setup.sh) and run the whole test suite, slow tests included (CUDA tests skip
# without a GPU). `--quick` first leaves out the slow ones; other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
VENV="${LAWA_VENV:-.venv}"
slow="--runslow"
if [ "${1:-}" = "--quick" ]; then slow=""; shift; fi
set +e
"$VENV/bin/python" -m pytest $slow "$@"
code=$?
set -e
if [ "$code" = "5" ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$code"
