#!/usr/bin/env bash
# Set up (see scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
VENV="${LAWA_VENV:-.venv}"
set +e
"$VENV/bin/python" -m pytest "$@"
code=$?
set -e
if [ "$code" = "5" ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$code"
