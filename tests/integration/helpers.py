"""Functions that tests run inside pool kernels, importable there by path."""

from __future__ import annotations

import os
import sys
import threading

from dspex_jupyter.runtime import session_state


def getpid(_: object = None) -> int:
    return os.getpid()


def env(name: str) -> str | None:
    return os.environ.get(name)


def prefix() -> str:
    return sys.prefix


def square(x: int) -> int:
    return x * x


def fail(message: str) -> None:
    raise ValueError(message)


def remember(value: object) -> list[object]:
    items = session_state().setdefault("items", [])
    items.append(value)
    return items


def block_forever() -> None:
    threading.Event().wait()


def echo(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict[str, object]]:
    return args, kwargs


HELD: list[bytearray] = []


def hog(megabytes: int) -> int:
    """Allocate and keep ``megabytes`` of memory (pages touched, so they count in RSS)."""
    block = bytearray(megabytes * 1_000_000)
    for i in range(0, len(block), 4096):
        block[i] = 1
    HELD.append(block)
    return len(block)


def hog_and_wait(megabytes: int) -> None:
    """Allocate, then keep working (block) as a memory-hungry step would."""
    hog(megabytes)
    threading.Event().wait()


def embed_batch(items: list[str], batch_size: int) -> dict[str, int]:
    """Runs out of (GPU) memory above 8 items a batch: torch's own error, on the CPU."""
    if batch_size > 8:
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (batch of {batch_size}, injected)")
    return {"embedded": len(items), "batch_size": batch_size}
