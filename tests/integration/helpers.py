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
