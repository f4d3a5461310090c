"""Programs that fail on purpose, for tests and tutorials (clearly not for real use)."""

from __future__ import annotations

import dspy


class OomOnNewInstructions(dspy.Module):
    """Runs out of GPU memory as soon as MIPROv2 tries a proposed instruction.

    Without a GPU the error is torch's own ``OutOfMemoryError``, raised on the CPU as a
    stand-in for CUDA's (``scripts/gpu_check.py`` does it for real on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.ChainOfThought("question -> answer")
        self.original = self.predict.predict.signature.instructions

    def forward(self, question: str):
        if self.predict.predict.signature.instructions != self.original:
            import torch

            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (simulated: no GPU here)"
            )
        return self.predict(question=question)
