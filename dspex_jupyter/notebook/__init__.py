"""What a person sees in a notebook: the ``%dspex`` magics and the widgets.

``%load_ext dspex_jupyter`` loads the magics (``dspex_jupyter.notebook.magics``). The
widgets can also be used directly::

    from dspex_jupyter.notebook import RunDashboard, PoolDashboard, GpuMemoryWidget
    RunDashboard(run)        # or just `run` as a cell's last line, once the extension is loaded
    PoolDashboard()          # pools, kernels, sessions; restart kernel, release session
    GpuMemoryWidget()        # GPU memory per device and per kernel

Imported lazily: ipywidgets loads only when a widget is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RunDashboard": "dspex_jupyter.notebook.run_dashboard",
    "dashboard_for": "dspex_jupyter.notebook.run_dashboard",
    "CheckpointControls": "dspex_jupyter.notebook.checkpoint_controls",
    "PoolDashboard": "dspex_jupyter.notebook.pool_dashboard",
    "GpuMemoryWidget": "dspex_jupyter.notebook.gpu_widget",
    "RunProgress": "dspex_jupyter.notebook.run_progress",
    "snapshot": "dspex_jupyter.notebook.snapshot",
    "gpu_memory": "dspex_jupyter.core.gpu",
    "LabBridge": "dspex_jupyter.notebook.lab_bridge",
    "DspexMagics": "dspex_jupyter.notebook.magics",
    "load_ipython_extension": "dspex_jupyter.notebook.magics",
    "unload_ipython_extension": "dspex_jupyter.notebook.magics",
    "default_manager": "dspex_jupyter.notebook.registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dspex_jupyter.notebook' has no attribute {name!r}")


__all__ = list(_LAZY)
