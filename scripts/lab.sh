#!/usr/bin/env bash
# JupyterLab on the tutorials (notebooks/), with dspex-jupyter's extension (the DSPex sidebar
# and status bar): open a notebook and run it. Listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The tutorials' environments live here (the notebooks create what is missing).
export DSPEX_HOME=${DSPEX_HOME:-$PWD/.dspex-tutorials}
if ! .venv/bin/jupyter labextension list 2>&1 | grep -q "dspex-jupyter.*enabled.*OK"; then
  echo "lab.sh: the dspex-jupyter extension is not built (needs node and npm):" \
    "bash scripts/browser_setup.sh builds it; the magics and widgets work without it" >&2
fi
root=()
if [ "$(id -u)" = 0 ]; then
  root=(--allow-root)  # these machines run as root; JupyterLab refuses that without it
fi
exec .venv/bin/jupyter lab --ip 127.0.0.1 --notebook-dir notebooks "${root[@]}" "$@"
