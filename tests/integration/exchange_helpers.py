"""Functions that exchange tests run inside pool kernels (light at import: no numpy)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def identity(value: Any) -> Any:
    return value


def identity_all(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def loaded(names: list[str]) -> list[str]:
    """Which of ``names`` this kernel has imported."""
    return [n for n in names if n in sys.modules]


def exchange_folder() -> str | None:
    from dspex_jupyter.runtime.exchange_ops import kernel_config

    return kernel_config().folder


def describe_array(arr: Any) -> dict[str, Any]:
    """How an array arrived: zero-copy arrays do not own their memory."""
    return {"owndata": bool(arr.flags.owndata), "writeable": bool(arr.flags.writeable)}


def make_table(rows: int) -> Any:
    import pyarrow as pa

    return pa.table({"i": list(range(rows)), "text": [f"row {i}" for i in range(rows)]})


def write_then_die(nbytes: int) -> None:
    """Write a reply's exchange file, then die before the reply is sent (SIGKILL)."""
    from dspex_jupyter import exchange
    from dspex_jupyter.runtime.exchange_ops import kernel_config

    files: list[str] = []
    exchange.encode(b"x" * nbytes, [], kernel_config(), files)
    assert files and os.path.exists(files[0])
    os.kill(os.getpid(), signal.SIGKILL)
