"""Generators the stream benchmark runs inside pool kernels (imported by path)."""

from __future__ import annotations

import threading
import time


def events(n: int):
    """``n`` small events, as fast as the stream takes them."""
    for i in range(n):
        yield {"i": i, "phase": "trial", "score": 0.5}


def paced(n: int, per_second: float):
    """``n`` events at a fixed rate, each stamped with the time it was made."""
    interval = 1.0 / per_second
    pause = threading.Event()
    start = time.time()
    for i in range(n):
        yield {"i": i, "t": time.time()}
        pause.wait(max(0.0, start + (i + 1) * interval - time.time()))
