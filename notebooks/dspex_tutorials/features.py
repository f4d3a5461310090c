"""Feature extraction for the complete pipeline (07): standard library only, so it runs in
the light pool, whose environment has nothing but the dspex runtime."""

from __future__ import annotations

import os
import re
from typing import Any

_OPERATIONS = (
    (re.compile(r"\+|buys \d+ more"), "add"),
    (re.compile(r" - |gave away"), "subtract"),
    (re.compile(r"\*|A box holds"), "multiply"),
)


def extract(question: str) -> dict[str, Any]:
    """What kind of arithmetic problem ``question`` is, and how big its numbers are."""
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    operation = next((name for pattern, name in _OPERATIONS if pattern.search(question)), "other")
    return {
        "operation": operation,
        "style": "plain" if question.startswith("What is") else "word problem",
        "largest_number": max(numbers, default=0),
        "words": len(question.split()),
        "pid": os.getpid(),
    }
