"""Programs and settings for MIPROv2 tests, importable inside pool kernels."""

from __future__ import annotations

from dspex_jupyter.testing import arithmetic
from dspex_jupyter.testing.faults import OomOnNewInstructions  # noqa: F401 (used by tests)
from dspex_jupyter.testing.mipro_settings import quick_settings

OPTIONS, COMPILE = quick_settings()


def task():
    return arithmetic()


def always_zero(example, prediction, trace=None) -> float:
    """A metric that never scores: the search cannot get anywhere."""
    return 0.0
