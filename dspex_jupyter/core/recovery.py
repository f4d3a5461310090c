"""Recovery policies: what dspex does by itself when a known failure happens.

Configurable per pool (``PoolSpec(recovery=...)``) and per run (``MIPROv2(recovery=...)``);
each recovery is reported as an event, so the dashboard shows it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidSpec

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, what: str) -> float:
    """Seconds from a number or a text like "90s", "10m", "1h" (what people write)."""
    if isinstance(value, bool):
        raise InvalidSpec(f"{what} must be seconds or a duration like '10m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    else:
        raise InvalidSpec(f"{what} must be seconds or a duration like '10m', got {value!r}")
    if seconds < 0 or seconds != seconds:
        raise InvalidSpec(f"{what} must not be negative, got {value!r}")
    return seconds


@dataclass(frozen=True)
class RecoveryPolicy:
    """``oom_retry``: on a GPU out-of-memory error, clear that kernel's GPU cache and retry
    with half the batch (MIPROv2's minibatch, or a call's ``batch_size`` argument), down to
    ``min_batch_size``. ``auto_resume``: when a run's kernel dies, restart and resume from
    the last checkpoint, at most this many times. ``diverged_after``: warn (an event) when
    a run's last N trials all scored zero (0 turns the check off); the run goes on, as
    DSPy's would, unless ``stop_on_divergence``. ``lm_outage_wait``: when the LM is down
    (refused, timing out, rate limited), wait for it with backoff up to this long (seconds
    or "10m"), then retry the abandoned trial or step exactly; 0 stops the run at once,
    resumably. A wrong key or an unknown model never waits."""

    oom_retry: bool = True
    min_batch_size: int = 2
    auto_resume: int = 2
    diverged_after: int = 6
    stop_on_divergence: bool = False
    lm_outage_wait: float | str = 600.0

    def __post_init__(self) -> None:
        for name in ("oom_retry", "stop_on_divergence"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidSpec(f"recovery {name} must be true or false")
        for name in ("min_batch_size", "auto_resume", "diverged_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidSpec(f"recovery {name} must be a non-negative integer, got {value!r}")
        if self.min_batch_size < 1:
            raise InvalidSpec("recovery min_batch_size must be at least 1")
        wait = parse_duration(self.lm_outage_wait, "recovery lm_outage_wait")
        object.__setattr__(self, "lm_outage_wait", wait)  # frozen: normalised once, here

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
