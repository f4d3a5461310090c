"""Where a pool's kernels come from: a dspex environment, a kernelspec, or a Python.

Each resolves to a kernelspec in a kernelspec manager, so jupyter_client's own machinery
(and later its provisioners) launches every kernel the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .errors import InvalidSpec
from .spec import PoolSpec

# Variables of the notebook's own process that must not leak into another environment's
# kernel: they would point it at the notebook's packages or its kernel wiring.
_SCRUBBED_VARS = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "JPY_PARENT_PID",
    "JPY_SESSION_NAME",
    "MPLBACKEND",
    "PYDEVD_USE_FRAME_EVAL",
)


@dataclass(frozen=True)
class KernelSource:
    """A resolved kernel source: which kernelspec, found by which manager, runs which Python."""

    kernel_spec_manager: KernelSpecManager
    kernel_name: str
    python: str
    description: str


def _write_python_kernelspec(python: str, folder: Path, name: str) -> None:
    spec_dir = folder / name
    spec_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    spec = {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"dspex: {python}",
        "language": "python",
        "metadata": {"dspex": {"python": python}},
    }
    path = spec_dir / "kernel.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(spec, indent=1))


def resolve_source(spec: PoolSpec, home: Path | None, scratch: Path) -> KernelSource:
    """Resolve a pool spec's kernel source; ``scratch`` holds kernelspecs made on the fly."""
    if spec.env is not None:
        from . import envs

        env = envs.get_environment(spec.env, home)
        return KernelSource(
            envs.kernel_spec_manager(home), env.kernel_name, str(env.python), f"env {spec.env}"
        )
    if spec.kernel is not None:
        managers = []
        from . import envs

        managers.append(envs.kernel_spec_manager(home))
        managers.append(KernelSpecManager())
        for manager in managers:
            try:
                found = manager.get_kernel_spec(spec.kernel)
            except NoSuchKernel:
                continue
            return KernelSource(manager, spec.kernel, found.argv[0], f"kernel {spec.kernel}")
        known = sorted({n for m in managers for n in m.find_kernel_specs()})
        raise InvalidSpec(
            f"pool {spec.name!r}: no kernelspec named {spec.kernel!r}",
            hint=f"known kernelspecs: {', '.join(known) or 'none'}",
        )
    python = spec.python or sys.executable
    resolved = shutil.which(python) if os.sep not in python else python
    if not resolved or not os.access(resolved, os.X_OK) or not Path(resolved).is_file():
        raise InvalidSpec(
            f"pool {spec.name!r}: Python {python!r} does not exist or is not executable",
            hint="give the full path of the interpreter, e.g. /opt/conda/envs/ml/bin/python",
        )
    folder = scratch / "kernelspecs"
    _write_python_kernelspec(resolved, folder, spec.name)
    return KernelSource(
        KernelSpecManager(kernel_dirs=[str(folder)]), spec.name, resolved, f"python {resolved}"
    )


def kernel_environment(spec: PoolSpec, source: KernelSource) -> dict[str, str]:
    """The process environment of a pool kernel: the notebook's, cleaned, plus the pool's."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_VARS}
    bin_dir = Path(source.python).parent
    prefix = bin_dir.parent
    if (prefix / "pyvenv.cfg").is_file():
        env["VIRTUAL_ENV"] = str(prefix)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    if not spec.gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env["DSPEX_POOL"] = spec.name
    # DSPy's disk cache: shared by a user's pool kernels under DSPEX_HOME (DSPy's own
    # default, ~/.dspy_cache, would mix them with every other process), unless the user's
    # environment or the pool's env_vars name another place.
    if "DSPY_CACHEDIR" not in env and "DSPY_CACHEDIR" not in spec.env_vars:
        cache = dspy_cache_dir()
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)  # prompts and answers: private
        env["DSPY_CACHEDIR"] = str(cache)
    env.update(spec.env_vars)
    return env


def dspy_cache_dir() -> Path:
    """Where pool kernels keep DSPy's cache by default: ``$DSPEX_HOME/dspy-cache``."""
    from .envs import dspex_home

    return dspex_home() / "dspy-cache"
