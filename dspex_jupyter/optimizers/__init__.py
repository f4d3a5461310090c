"""Notebook-side handles of optimizer runs in pool kernels: ``compile`` runs any DSPy
optimizer (``runs.py``); ``MIPROv2`` is the thin layer dspex started with (``mipro.py``)."""

from .mipro import MIPROv2
from .runs import OptimizationRun, OptimizedModule, RunCancelled, RunFailed, resume
from .runs import compile as compile  # dspex_jupyter.optimizers.compile

__all__ = [
    "MIPROv2",
    "OptimizationRun",
    "OptimizedModule",
    "RunCancelled",
    "RunFailed",
    "resume",
]  # not "compile": a star import must not shadow Python's own
