"""Where a pool's kernels come from: a dspex environment, a kernelspec, a Python, or a
gateway.

The first three resolve to a kernelspec in a kernelspec manager, so jupyter_client's own
machinery (and its provisioners) launches every kernel the same way; a gateway pool
resolves to a kernelspec of the gateway and the client that reaches it (core/gateway.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from . import gateway_config
from .errors import InvalidSpec
from .kernel_source import encryption_policy
from .spec import PoolSpec

if TYPE_CHECKING:
    from .gateway import GatewayClient

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
    """A resolved kernel source: which kernelspec, found by which manager, runs which Python
    (for a gateway pool: the gateway's kernelspec, and the client that reaches it)."""

    kernel_spec_manager: KernelSpecManager | None
    kernel_name: str
    python: str
    description: str
    gateway: GatewayClient | None = None

    async def prepare(self, pool: str, allow_unencrypted: str | None) -> str:
        """The checks made once per pool before any kernel starts; the pool's transport
        encryption. A gateway pool: TLS unless on loopback or opted out, then the gateway's
        kernelspecs (one request: a bad token is one GatewayAuthFailed, not one per kernel;
        a kernelspec it lacks is InvalidSpec naming those it has)."""
        if self.gateway is None:
            assert self.kernel_spec_manager is not None
            kernelspec = self.kernel_spec_manager.get_kernel_spec(self.kernel_name)
            return encryption_policy(pool, kernelspec, allow_unencrypted)
        policy = gateway_config.check_encryption(pool, self.gateway.config, allow_unencrypted)
        await self.gateway.check_kernelspec(self.kernel_name)
        return policy

    async def aclose(self) -> None:
        """Release what the source holds (a gateway's HTTP connections)."""
        if self.gateway is not None:
            await self.gateway.close()


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
    if spec.gateway is not None:
        from .gateway import GatewayClient

        config = spec.gateway
        token = gateway_config.resolve_token(spec.name, spec.auth_token, spec.auth_token_env)
        client = GatewayClient(config, token, spec.name)
        assert spec.kernel is not None  # checked by PoolSpec
        return KernelSource(
            None,
            spec.kernel,
            f"{spec.kernel} at {config.url}",
            f"gateway {config.url} kernel {spec.kernel}",
            gateway=client,
        )
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
    """The process environment of a pool kernel: the notebook's, cleaned, plus the pool's.
    A gateway kernel gets what jupyter_server's GatewayClient sends (KERNEL_USERNAME, the
    KERNEL_* variables, the allowed ones) plus the pool's: the notebook's own environment
    (its PATH, its virtual environment) means nothing on the gateway's side."""
    if source.gateway is not None:
        allowed = source.gateway.config.allowed_envs
        env = gateway_config.kernel_start_env(allowed)
        env["DSPEX_POOL"] = spec.name
        # Only the pool's variables the gateway passes on go in the start request (a gateway
        # drops the others silently, and API keys need not sit in its request logs): every
        # one of them follows over the kernel's channel once the runtime is up (Pool._prepare).
        env.update(
            {k: v for k, v in spec.env_vars.items() if k.startswith("KERNEL_") or k in allowed}
        )
        return env
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
