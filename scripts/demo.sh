#!/usr/bin/env bash
# The main job end to end: the complete-pipeline tutorial (notebooks/07_complete_pipeline.ipynb)
# run cell by cell, its progress in this terminal: features in a light pool, MIPROv2 in the
# optimizer pool, the optimized program evaluated in parallel, each pool in an environment of
# its own (tut-light, tut-opt with DSPy and optuna, tut-eval with DSPy): made the first time,
# each step on a line here, and reused afterwards. The executed notebook goes to
# build/07_complete_pipeline.executed.ipynb.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DSPEX_HOME=${DSPEX_HOME:-$PWD/.dspex-demo}
exec .venv/bin/python scripts/run_tutorial.py notebooks/07_complete_pipeline.ipynb \
  --output build/07_complete_pipeline.executed.ipynb "$@"
