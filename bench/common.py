"""What every benchmark script needs: timing a callable, the result table, leak checks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil

# Processes that must not outlive a benchmark run.
LEAK_MARKERS = ("ipykernel", "ipengine", "ipcontroller", "ipyparallel")


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    """Seconds taken by each of ``n`` calls of ``fn``."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def print_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> None:
    """Rows as left-aligned columns under ``header``."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def leaked_processes(grace: float = 10.0) -> list[psutil.Process]:
    """Kernels, engines or controllers still running below this process after ``grace``."""
    deadline = time.monotonic() + grace
    while True:
        found = []
        for proc in psutil.Process().children(recursive=True):
            try:
                cmdline = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if any(marker in cmdline for marker in LEAK_MARKERS):
                found.append(proc)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)  # poll: processes exiting after shutdown send no event here
