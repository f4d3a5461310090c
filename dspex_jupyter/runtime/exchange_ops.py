"""The kernel's side of data exchange: which folder and thresholds it uses.

Until the client configures it, a kernel keeps every value in the message (no folder):
that is also what a kernel on another machine ends up with, since it cannot see the
client's folder.
"""

from __future__ import annotations

import os
from typing import Any

from .. import exchange
from .registry import op

_config: list[exchange.ExchangeConfig] = [exchange.MESSAGE_ONLY]


def kernel_config() -> exchange.ExchangeConfig:
    """The exchange configuration values in this kernel are encoded and decoded with."""
    return _config[0]


@op("configure_exchange")
def configure_exchange(
    ctx: Any,
    folder: str | None,
    inline_max: int = exchange.INLINE_MAX,
    file_max: int = exchange.FILE_MAX,
    shared_memory: bool = True,
    arrow: bool = True,
) -> dict[str, Any]:
    """Use ``folder`` for exchange files when this kernel can see it, private; else fall
    back to message buffers (a kernel that does not share this machine's memory)."""
    problem = None
    if shared_memory and folder is not None:
        problem = exchange.private_folder_problem(folder)
    shared = bool(shared_memory and folder is not None and problem is None)
    config = exchange.ExchangeConfig(
        inline_max=inline_max,
        file_max=file_max,
        folder=folder if shared else None,
        shared_memory=shared,
        arrow=bool(arrow) and exchange.have_module("pyarrow"),
    )
    _config[0] = config
    return {
        "pid": os.getpid(),
        "shared_memory": config.shared_memory,
        "arrow": config.arrow,
        "numpy": exchange.have_module("numpy"),
        "problem": problem,
    }
