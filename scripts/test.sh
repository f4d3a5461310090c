#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, format check, pytest, then the tutorials (nbval).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian's chromium and the built lab extension, for the real-browser tests (tests/browser).
bash scripts/browser_setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# The tutorials (notebooks/) run in environments of their own, kept in .dspex-tutorials: made
# the first time (about 2 minutes: torch and an embedding model for the retrieval tutorial),
# their dspex runtime refreshed when dspex-jupyter changed, reused otherwise.
tutorials_home=$PWD/.dspex-tutorials
if [ "${DSPEX_SKIP_TUTORIALS:-0}" != 1 ]; then
  echo "test.sh: preparing the tutorials' environments in $tutorials_home" >&2
  DSPEX_HOME=$tutorials_home .venv/bin/python scripts/run_tutorial.py --setup-envs
fi
set +e
.venv/bin/python -m pytest "$@"
status=$?
# Every tutorial, run by nbval, its outputs compared with those stored in the notebook
# (sanitizers in notebooks/nbval_sanitize.cfg). DSPEX_SKIP_TUTORIALS=1 skips them.
tutorials_status=0
if [ "${DSPEX_SKIP_TUTORIALS:-0}" != 1 ]; then
  DSPEX_HOME=$tutorials_home .venv/bin/python -m pytest -p tests.notebooks.nbval_kernel \
    --nbval notebooks/ --nbval-sanitize-with notebooks/nbval_sanitize.cfg
  tutorials_status=$?
fi
set -e
for code in "$status" "$tutorials_status"; do
  if [ "$code" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
  fi
done
if [ "$status" -ne 0 ]; then
  exit "$status"
fi
exit "$tutorials_status"
