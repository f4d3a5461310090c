"""dspex-jupyter: run DSPy optimization from Jupyter on pools of managed kernels.

The public API is imported lazily so that pool kernels, which import
``dspex_jupyter.runtime``, never pay for the client side.
"""

from __future__ import annotations

import importlib
from typing import Any

from .core import errors as _errors

__version__ = "0.1.0"

_LAZY = {
    "PoolSpec": "dspex_jupyter.core.spec",
    "load_pool_specs": "dspex_jupyter.core.spec",
    "GatewayConfig": "dspex_jupyter.core.gateway_config",
    "PoolManager": "dspex_jupyter.core.manager",
    "Pool": "dspex_jupyter.core.pool",
    "Session": "dspex_jupyter.core.session",
    "ExecuteResult": "dspex_jupyter.core.session",
    "Stream": "dspex_jupyter.core.streams",
    "ExchangeConfig": "dspex_jupyter.exchange",
    "ExchangeError": "dspex_jupyter.exchange",
    "compile": "dspex_jupyter.optimizers.runs",
    "resume": "dspex_jupyter.optimizers.runs",
    "MIPROv2": "dspex_jupyter.optimizers.mipro",
    "OptimizationRun": "dspex_jupyter.optimizers.runs",
    "OptimizedModule": "dspex_jupyter.optimizers.runs",
    "RecoveryPolicy": "dspex_jupyter.core.recovery",
    "CheckpointError": "dspex_jupyter.checkpoint",
    "UntrustedCheckpointError": "dspex_jupyter.checkpoint",
    "ForbiddenReferenceError": "dspex_jupyter.checkpoint",
    "RunCancelled": "dspex_jupyter.optimizers.runs",
    "RunFailed": "dspex_jupyter.optimizers.runs",
    "DspyVersionError": "dspex_jupyter.runtime.dspy_support",
    "RunHistory": "dspex_jupyter.core.history",
    "load_program": "dspex_jupyter.core.history",
    "to_mlflow": "dspex_jupyter.optimizers.export",
    "sweep": "dspex_jupyter.optimizers.sweep",
    "grid": "dspex_jupyter.optimizers.sweep",
    "attach_sweep": "dspex_jupyter.optimizers.sweep",
    "Sweep": "dspex_jupyter.optimizers.sweep",
    "write_kernelspec": "dspex_jupyter.core.kernelspecs",
}
# Every error class of core/errors.py (standard library only, so cheap to import even in
# a kernel): one appended there is exported without a second list to keep in step.
_ERRORS = tuple(
    name
    for name, obj in vars(_errors).items()
    if isinstance(obj, type) and issubclass(obj, _errors.DspexError)
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _ERRORS:
        return getattr(_errors, name)
    raise AttributeError(f"module 'dspex_jupyter' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext dspex_jupyter``: the ``%dspex`` magics, run dashboards, the lab comm."""
    from .notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .notebook.magics import unload_ipython_extension as unload

    unload(ipython)


# ``dspex.compile`` is reached as an attribute only: a star import must not shadow
# Python's own ``compile``.
__all__ = ["__version__", *(name for name in _LAZY if name != "compile"), *_ERRORS]
