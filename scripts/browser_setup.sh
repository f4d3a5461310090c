#!/usr/bin/env bash
# What the real-browser tests (tests/browser) need beyond what scripts/setup.sh installs:
#  - Debian's chromium: Playwright cannot download its own browser on these machines, so the
#    tests drive /usr/bin/chromium (or $DSPEX_CHROMIUM) through the `playwright` PyPI package,
#    whose driver ships inside its wheel (no `playwright install`, no browser download);
#  - the JupyterLab extension built and installed in .venv (scripts/setup.sh's editable install
#    builds it with npm when labextension/ changed; this checks it is there).
# Idempotent; run after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

chromium=${DSPEX_CHROMIUM:-$(command -v chromium || true)}
if [ -z "$chromium" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "browser_setup: installing Debian's chromium" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
    chromium=$(command -v chromium)
  else
    echo "browser_setup: chromium is missing and this is not root: install Debian's chromium" \
      "package (sudo apt-get install chromium) or set DSPEX_CHROMIUM; browser tests will skip" >&2
  fi
fi
[ -n "$chromium" ] && echo "browser_setup: $("$chromium" --version 2>/dev/null || echo "$chromium")" >&2

ext=.venv/share/jupyter/labextensions/dspex-jupyter
if [ ! -f "$ext/package.json" ] || [ ! -f dspex_jupyter/labextension/static/style.js ]; then
  echo "browser_setup: the JupyterLab extension is not built; building it (needs node and npm)" >&2
  (cd labextension && npm install --no-audit --no-fund && npm run build:prod)
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e . 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
fi
.venv/bin/jupyter labextension list 2>&1 | grep -q "dspex-jupyter.*enabled.*OK" || {
  echo "browser_setup: dspex-jupyter is not enabled in 'jupyter labextension list':" >&2
  .venv/bin/jupyter labextension list >&2 || true
  exit 1
}
