"""What every benchmark script needs: timing a callable, the result table, leak checks."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
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


def timed_after_warmup(fn: Callable[[], Any], n: int) -> list[float]:
    """Seconds of ``n`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    return timed(fn, n)


def say(message: str) -> None:
    """A progress line of a benchmark."""
    print(f"  .. {message}", flush=True)


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


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def exit_code_after_leak_check() -> int:
    """A benchmark's exit status: 1 (and the pids) if it left kernels running."""
    leaked = leaked_processes()
    if leaked:
        print(f"LEAKED: {[p.pid for p in leaked]}")
        return 1
    return 0


def mipro_in_process(task: Any, lm: Any, log: Path, options: dict, compile_args: dict) -> float:
    """The baseline of the MIPROv2 benchmarks: upstream's compile in this process, printing
    to a log file as a session's run does (to a terminal it would depend on the terminal;
    into a notebook cell it is slower still). Seconds taken."""
    import dspy

    with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        start = time.perf_counter()
        optimizer = dspy.teleprompt.MIPROv2(
            metric=task.metric, prompt_model=lm, task_model=lm, verbose=False, **options
        )
        optimizer.compile(
            task.make_program(), trainset=task.trainset, valset=task.valset, **compile_args
        )
        return time.perf_counter() - start
