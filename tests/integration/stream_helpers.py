"""Generators that tests stream out of pool kernels (imported there by path)."""

from __future__ import annotations

import threading
import time

PROGRESS = {"produced": 0, "closed": False, "finished": False}


def count(n: int):
    for i in range(n):
        PROGRESS["produced"] = i + 1
        yield i


def forever():
    PROGRESS.update(produced=0, closed=False, finished=False)
    i = 0
    try:
        while True:
            PROGRESS["produced"] = i + 1
            yield i
            i += 1
    finally:
        PROGRESS["closed"] = True


def fail_after(k: int):
    for i in range(k):
        yield {"i": i}
    raise ValueError(f"generator failed after {k} items")


def paced(n: int, interval: float):
    """Items at a fixed rate, each carrying the time it was made (for latency)."""
    pause = threading.Event()
    for i in range(n):
        yield {"i": i, "t": time.time()}
        pause.wait(interval)


def progress() -> dict:
    return dict(PROGRESS)
