"""Run inside a pool kernel: make the DSPy version check read another version.

Only the version *reading* is replaced (installing another DSPy release here is not
possible offline); the check, the run start and the error's way to the client are real.
"""

from __future__ import annotations

from typing import Any

from dspex_jupyter.runtime import dspy_support

_REAL_READER = dspy_support.installed_dspy_version


def pretend_dspy_version(version: str | None) -> None:
    """From now on this kernel reports DSPy ``version``; None restores the real reading."""
    reader: Any = _REAL_READER if version is None else (lambda: version)
    dspy_support.installed_dspy_version = reader
