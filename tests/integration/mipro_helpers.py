"""Programs and settings for MIPROv2 tests, importable inside pool kernels."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from dspex_jupyter.testing import arithmetic
from dspex_jupyter.testing.faults import OomOnNewInstructions  # noqa: F401 (used by tests)
from dspex_jupyter.testing.mipro_settings import quick_settings

OPTIONS, COMPILE = quick_settings()


def task():
    return arithmetic()


def always_zero(example, prediction, trace=None) -> float:
    """A metric that never scores: the search cannot get anywhere."""
    return 0.0


@contextlib.contextmanager
def captured_studies() -> Iterator[list[Any]]:
    """The Optuna studies upstream MIPROv2 creates inside ``compile()`` (its trials are read
    from them): ``optuna.create_study`` is wrapped for the duration. Optuna is imported here,
    not at module level, because kernels import this module too."""
    import optuna

    studies: list[Any] = []
    create_study = optuna.create_study

    def capture(*args: Any, **kwargs: Any) -> Any:
        studies.append(create_study(*args, **kwargs))
        return studies[-1]

    optuna.create_study = capture
    try:
        yield studies
    finally:
        optuna.create_study = create_study
