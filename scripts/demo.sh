#!/usr/bin/env bash
# The main job end to end: two environments, their pools, calls, a session, health.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DSPEX_HOME=${DSPEX_HOME:-$PWD/.dspex-demo}
exec .venv/bin/python scripts/demo.py "$@"
