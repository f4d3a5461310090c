"""Kernel-side functions of bench_exchange.py (importable in pool kernels as bench.*)."""

from __future__ import annotations

import json
from typing import Any


def identity(value: Any) -> Any:
    """Send the value straight back: what is measured is the exchange, both ways."""
    return value


def json_identity(wrapped: list[str]) -> list[str]:
    """The plain-JSON baseline: parse the rows and dump them again. The text travels
    wrapped in a list, so it stays JSON inside the message both ways."""
    rows = json.loads(wrapped[0])
    return [json.dumps(rows)]
