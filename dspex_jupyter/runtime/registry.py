"""The op registry: the named operations a pool kernel answers.

An op is a plain function ``op(ctx, **args) -> JSON-able result``. Ops that need heavy
libraries import them inside the function, so registering them costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OpFunction = Callable[..., Any]

OPS: dict[str, OpFunction] = {}


def op(name: str) -> Callable[[OpFunction], OpFunction]:
    """Register ``func`` as the handler of op ``name`` (later registrations replace earlier)."""

    def register(func: OpFunction) -> OpFunction:
        OPS[name] = func
        return func

    return register


def get_op(name: str) -> OpFunction | None:
    return OPS.get(name)
