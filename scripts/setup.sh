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
# ipyparallel is here only as the benchmarks' baseline (the bench extra): its JupyterLab panel
# is switched off in .venv's own Jupyter config (sys-prefix level), never the user's.
.venv/bin/jupyter labextension disable --level=sys_prefix ipyparallel-labextension >/dev/null 2>&1
# The SSH tests (tests/integration/test_remote_ssh.py) run a real sshd on 127.0.0.2: Debian's
# openssh-server. Installed when missing and this is root with apt (CI); otherwise those tests
# skip, saying so.
if [ ! -x /usr/sbin/sshd ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's openssh-server (for the SSH tests)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends openssh-server openssh-client >/dev/null
  else
    echo "setup: /usr/sbin/sshd is missing and this is not root: install openssh-server" \
      "(sudo apt-get install openssh-server); the SSH tests will skip" >&2
  fi
fi
# Remote kernels are encrypted with CurveZMQ: pyzmq's libzmq must have it.
.venv/bin/python -c "import zmq; assert zmq.has('curve'), 'libzmq without CurveZMQ'"
bash scripts/gateway_setup.sh  # Enterprise/Kernel Gateway envs for the gateway tests (#17)
.venv/bin/python -c "import dspex_jupyter, jupyter_client, ipykernel, pytest" 
