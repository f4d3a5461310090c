"""LMs for test_any_program, importable in pool kernels (the tests name them by path)."""

from __future__ import annotations

from typing import Any

import dspy

from dspex_jupyter.testing import arithmetic
from dspex_jupyter.testing.simulated import SimulatedEngine


class EngineWithoutState:
    """A custom DSPy engine with no ``dump_state()``: DSPy cannot save it, yet an LM built
    on it runs (it answers as the SIMULATED arithmetic engine does)."""

    def __init__(self, inner: SimulatedEngine) -> None:
        self.inner = inner

    def complete(self, request: Any) -> Any:
        return self.inner.complete(request)

    def stream(self, request: Any) -> Any:
        return self.inner.stream(request)

    def close(self) -> None:
        """Nothing to release."""


def custom_engine_lm() -> dspy.LM:
    """An LM whose engine DSPy cannot save: ``lm.dump_state()`` raises TypeError."""
    engine = EngineWithoutState(SimulatedEngine(task="arithmetic", seed=arithmetic().seed))
    return dspy.LM("custom/arithmetic", engine=engine, cache=False)


# An LM object a module defines: named by import path, "...any_program_helpers:ARITHMETIC_LM".
ARITHMETIC_LM = arithmetic().lm()
NOT_AN_LM = "a string, not an LM"


def returns_no_lm() -> int:
    """A zero-argument function that does not make an LM (a bad LM reference)."""
    return 42
