"""Moved to :mod:`dspex_jupyter.core.gpu` (the pool manager's health reads it too)."""

from ..core.gpu import gpu_memory, kernel_memory_rows, kernel_refs, load_nvml

__all__ = ["gpu_memory", "kernel_memory_rows", "kernel_refs", "load_nvml"]
