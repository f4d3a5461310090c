"""MIPROv2 settings for quick offline runs with the simulated LM (tests, tutorials, bench).

A seeded run with these finishes in about a second and still improves the program: four
candidates, eight trials on minibatches of ten, two demos each, and the proposer's
LM-heavy summaries off.
"""

from __future__ import annotations

from typing import Any

QUICK_OPTIONS: dict[str, Any] = {"auto": None, "num_candidates": 4, "seed": 0}
QUICK_COMPILE: dict[str, Any] = {
    "num_trials": 8,
    "minibatch_size": 10,
    "max_bootstrapped_demos": 2,
    "max_labeled_demos": 2,
    "program_aware_proposer": False,
    "data_aware_proposer": False,
    "tip_aware_proposer": False,
    "fewshot_aware_proposer": False,
}


def quick_settings() -> tuple[dict[str, Any], dict[str, Any]]:
    """Fresh copies of (MIPROv2 options, compile arguments)."""
    return dict(QUICK_OPTIONS), dict(QUICK_COMPILE)
