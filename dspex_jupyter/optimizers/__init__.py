"""Notebook-side handles of optimizer runs in pool kernels (MIPROv2 first)."""

from .mipro import MIPROv2, OptimizationRun, OptimizedModule, RunCancelled, RunFailed

__all__ = ["MIPROv2", "OptimizationRun", "OptimizedModule", "RunCancelled", "RunFailed"]
