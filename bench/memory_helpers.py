"""Kernel-side helper of bench_memory_watch: allocate step by step, logging each step."""

from __future__ import annotations

import os
import threading
import time

HELD: list[bytearray] = []


def hog_logged(megabytes: int, log_path: str, step_mb: int = 2) -> None:
    """Allocate ``megabytes`` (pages touched) in steps; after each, append "time bytes" to
    ``log_path``, so the notebook side knows when the limit was passed. Then block."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    allocated = 0
    while allocated < megabytes * 1_000_000:
        block = bytearray(step_mb * 1_000_000)
        for i in range(0, len(block), 4096):
            block[i] = 1
        HELD.append(block)
        allocated += len(block)
        os.write(fd, f"{time.time()} {allocated}\n".encode())
    threading.Event().wait()
