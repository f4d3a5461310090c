"""Functions the tutorials run inside pool kernels (standard library at import).

Pools call them by reference, ``pool.call("dspex_tutorials.kernel_side:whereami")``: the
kernel imports this module from its working folder, the notebook's.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any


def whereami() -> dict[str, Any]:
    """Which Python this kernel runs, and whether it can import ``tabulate``."""
    prefix = Path(sys.prefix)
    return {
        "pid": os.getpid(),
        "prefix": str(prefix),
        "env": f"{prefix.parent.name}/{prefix.name}",
        "tabulate": importlib.util.find_spec("tabulate") is not None,
        "pool": os.environ.get("DSPEX_POOL"),
        "greeting": os.environ.get("GREETING"),
    }


def interpreter(packages: list[str]) -> dict[str, Any]:
    """This kernel's Python (its executable and version) and the installed version of each
    of ``packages`` (None when it is not installed), read from the packages' metadata so
    nothing heavy is imported."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "executable": sys.executable,
        "version": ".".join(map(str, sys.version_info[:2])),
        "packages": versions,
    }


def pid(_: Any = None) -> int:
    return os.getpid()


def table(rows: list[dict[str, Any]]) -> str:
    """``rows`` as a text table, drawn by ``tabulate`` (installed in tut-tables only)."""
    from tabulate import tabulate

    return tabulate(rows, headers="keys", tablefmt="github")


def remember(item: str) -> list[str]:
    """Add ``item`` to this session's list, kept in the kernel between calls."""
    from dspex_jupyter.runtime import session_state

    items = session_state().setdefault("items", [])
    items.append(item)
    return list(items)


def session_user() -> str:
    """The ``user`` the session was opened with (``pool.session(state={...})``)."""
    from dspex_jupyter.runtime import session_state

    return str(session_state().get("user"))


# ---- data exchange (02) ---------------------------------------------------------------
def describe(value: Any) -> dict[str, Any]:
    """What arrived in the kernel: its type and size."""
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    info: dict[str, Any] = {"type": kind}
    if hasattr(value, "num_rows"):  # a pyarrow Table
        info.update(rows=value.num_rows, columns=value.column_names)
    elif hasattr(value, "shape") and hasattr(value, "flags"):  # a numpy array
        info.update(shape=list(value.shape), dtype=str(value.dtype))
    elif isinstance(value, list):
        info.update(items=len(value), first=type(value[0]).__qualname__ if value else None)
    return info


def add_length_column(table: Any) -> Any:
    """A pyarrow Table with one more column, computed in the kernel (Arrow compute)."""
    import pyarrow.compute as pc

    return table.append_column("length", pc.utf8_length(table["text"]))


def normalise_rows(matrix: Any) -> Any:
    """Each row of ``matrix`` scaled to unit length (a new array, sent back)."""
    import numpy as np

    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(matrix.dtype)


def label_examples(examples: list[Any]) -> list[Any]:
    """The examples with a ``kind`` field added in the kernel (dspy.Example in, and out)."""
    out = []
    for example in examples:
        kind = "word problem" if not example.question.startswith("What is") else "plain"
        out.append(example.copy(kind=kind))
    return out


# ---- streams (02) ----------------------------------------------------------------------
STREAM_LOG: dict[str, Any] = {"closed": False, "produced": 0}


def training_progress(epochs: int, steps: int):
    """A generator: one event per step, like a training loop reporting progress."""
    loss = 1.0
    for epoch in range(1, epochs + 1):
        for step in range(1, steps + 1):
            loss *= 0.9
            yield {"epoch": epoch, "step": step, "loss": round(loss, 4)}
    yield {"done": True, "final_loss": round(loss, 4)}


def numbers():
    """An endless generator; the consumer decides when to stop."""
    STREAM_LOG.update(closed=False, produced=0)
    i = 0
    try:
        while True:
            STREAM_LOG["produced"] = i + 1
            yield i
            i += 1
    finally:
        STREAM_LOG["closed"] = True


def stream_log() -> dict[str, Any]:
    return dict(STREAM_LOG)


# ---- memory (05) -----------------------------------------------------------------------
HELD: list[bytearray] = []


def hog(megabytes: int, hold_s: float = 30.0) -> int:
    """Allocate ``megabytes`` (pages touched, so they count in RSS), then keep working for
    up to ``hold_s`` seconds, as a memory-hungry step would."""
    import threading

    block = bytearray(megabytes * 1_000_000)
    for i in range(0, len(block), 4096):
        block[i] = 1
    HELD.append(block)
    threading.Event().wait(hold_s)
    return len(block)
