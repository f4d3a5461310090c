"""Recovery policies: what dspex does by itself when a known failure happens.

Configurable per pool (``PoolSpec(recovery=...)``) and per run (``MIPROv2(recovery=...)``);
each recovery is reported as an event, so the dashboard shows it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidSpec


@dataclass(frozen=True)
class RecoveryPolicy:
    """``oom_retry``: on a GPU out-of-memory error, clear that kernel's GPU cache and retry
    with half the batch (MIPROv2's minibatch, or a call's ``batch_size`` argument), down to
    ``min_batch_size``. ``auto_resume``: when a run's kernel dies, restart and resume from
    the last checkpoint, at most this many times. ``diverged_after``: stop a run whose last
    N trials all scored zero, and say so (0 turns the check off)."""

    oom_retry: bool = True
    min_batch_size: int = 2
    auto_resume: int = 2
    diverged_after: int = 6

    def __post_init__(self) -> None:
        if not isinstance(self.oom_retry, bool):
            raise InvalidSpec("recovery oom_retry must be true or false")
        for name in ("min_batch_size", "auto_resume", "diverged_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidSpec(f"recovery {name} must be a non-negative integer, got {value!r}")
        if self.min_batch_size < 1:
            raise InvalidSpec("recovery min_batch_size must be at least 1")

    @classmethod
    def coerce(cls, value: Any) -> RecoveryPolicy:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise InvalidSpec(f"unknown recovery setting(s): {', '.join(unknown)}")
            return cls(**value)
        raise InvalidSpec(
            f"recovery must be a RecoveryPolicy or a table, got {type(value).__name__}"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
