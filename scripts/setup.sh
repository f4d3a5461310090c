#!/usr/bin/env bash
# Make .venv with dspex-jupyter (editable) and its test and benchmark tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip honours this machine's own configuration (local wheels, constraints).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import dspex_jupyter, jupyter_client, ipykernel, pytest" 
