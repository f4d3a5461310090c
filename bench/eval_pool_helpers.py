"""A CPU-bound metric for ``bench_eval_pool.py``, importable inside pool kernels."""

from __future__ import annotations

from typing import Any

from dspex_jupyter.testing import arithmetic

# Iterations of pure-Python work per metric call: about 20 ms on the 2-core VM.
WORK = 330_000
_task = arithmetic()


def busy(n: int = WORK) -> int:
    """Deterministic pure-Python work that holds the GIL throughout (a parser, a scorer)."""
    h = 0
    for i in range(n):
        h = (h * 31 + i) % 1_000_003
    return h


def cpu_metric(example: Any, prediction: Any, trace: Any = None) -> Any:
    """The arithmetic task's metric, after ~20 ms of work whose result it does not change."""
    busy()
    return _task.metric(example, prediction, trace)
