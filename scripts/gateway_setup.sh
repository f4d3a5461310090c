#!/usr/bin/env bash
# Make the two gateways the gateway tests and benchmark start (tests/integration/gateway_fixtures.py),
# each in an environment of its own under .gateways/. Idempotent.
#   .gateways/eg: Jupyter Enterprise Gateway 3.3.0. It pins jupyter_client<7, jupyter_server<2 and
#                 pyzmq<25, which cannot share .venv (jupyter_client 8), so it gets its own venv.
#   .gateways/kg: Jupyter Kernel Gateway 3.0.1 on current jupyter_client (with provisioners).
# The kernels both gateways start run .venv/bin/python (dspex_jupyter installed): only the gateway
# server lives in these environments, never the kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EG_VERSION=3.3.0
KG_VERSION=3.0.1

# pip honours this machine's own configuration (local wheels, constraints), as in setup.sh.
quiet_pip() {
  "$1"/bin/python -m pip install --quiet --disable-pip-version-check "${@:2}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
}

make_env() {  # make_env DIR MODULE VERSION PIP_ARGS...: a venv holding the gateway at VERSION
  local dir=$1 module=$2 version=$3
  if [ -x "$dir/bin/python" ] \
    && "$dir/bin/python" -c "import importlib.metadata as m, sys;
sys.exit(m.version('$module') != '$version')" 2>/dev/null; then
    return 0
  fi
  mkdir -p .gateways
  chmod 700 .gateways
  [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
  quiet_pip "$dir" "${@:4}"
  "$dir/bin/python" -c "import importlib.metadata as m;
assert m.version('$module') == '$version', m.version('$module')"
}

make_env .gateways/eg jupyter_enterprise_gateway "$EG_VERSION" \
  "jupyter_enterprise_gateway==$EG_VERSION" "jupyter_client<7" "jupyter_server<2" "pyzmq<25"
make_env .gateways/kg jupyter_kernel_gateway "$KG_VERSION" "jupyter_kernel_gateway==$KG_VERSION"

# Each imports its whole application (server, kernel manager, websocket handlers): a broken
# pin shows up here, not in the middle of a test.
.gateways/eg/bin/python -c "import enterprise_gateway.enterprisegatewayapp as a; a.EnterpriseGatewayApp"
.gateways/kg/bin/python -c "import kernel_gateway.gatewayapp as a, kernel_gateway.jupyter_websocket"
