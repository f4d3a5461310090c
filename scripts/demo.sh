#!/usr/bin/env bash
# The main job end to end: the complete-pipeline tutorial (notebooks/07_complete_pipeline.ipynb)
# run cell by cell, its progress in this terminal: features in a light pool, MIPROv2 in the
# optimizer pool, the optimized program evaluated in parallel. The executed notebook goes to
# build/07_complete_pipeline.executed.ipynb.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DSPEX_HOME=${DSPEX_HOME:-$PWD/.dspex-demo}
exec .venv/bin/python scripts/run_tutorial.py notebooks/07_complete_pipeline.ipynb \
  --output build/07_complete_pipeline.executed.ipynb "$@"
