"""Programs and settings for MIPROv2 tests, importable inside pool kernels."""

from __future__ import annotations

import dspy

from dspex_jupyter.testing import arithmetic
from dspex_jupyter.testing.mipro_settings import quick_settings

OPTIONS, COMPILE = quick_settings()


def task():
    return arithmetic()


class OomOnNewInstructions(dspy.Module):
    """Runs out of (GPU) memory as soon as a proposed instruction is tried: the error is
    torch's own OutOfMemoryError, raised on the CPU as a stand-in for CUDA's."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.ChainOfThought("question -> answer")
        self.original = self.predict.predict.signature.instructions

    def forward(self, question: str):
        if self.predict.predict.signature.instructions != self.original:
            import torch

            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"
            )
        return self.predict(question=question)


def always_zero(example, prediction, trace=None) -> float:
    """A metric that never scores: the search cannot get anywhere."""
    return 0.0
