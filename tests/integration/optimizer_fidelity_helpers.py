"""Tiny offline runs of BootstrapFewShotWithRandomSearch, COPRO and SIMBA (SIMULATED LM),
and what two runs must share to count as the same: candidates, scores, final state."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import dspy
from dspy.teleprompt import COPRO, SIMBA, BootstrapFewShotWithRandomSearch

from dspex_jupyter.checkpoint import canonical
from dspex_jupyter.runtime.step_state import StepHooks
from dspex_jupyter.testing import sentiment


def task() -> Any:
    """Small enough for a run well under a second; big enough for SIMBA's mini-batches."""
    return sentiment(n_train=12, n_val=8)


def bootstrap_rs(metric: Any, cls: type = BootstrapFewShotWithRandomSearch, **extra: Any) -> Any:
    settings = {
        "max_bootstrapped_demos": 2,
        "max_labeled_demos": 2,
        "num_candidate_programs": 3,
        "num_threads": 1,
    }
    return cls(metric=metric, **{**settings, **extra})


def copro(metric: Any, prompt_model: Any, cls: type = COPRO, **extra: Any) -> Any:
    return cls(
        metric=metric, breadth=3, depth=3, prompt_model=prompt_model, track_stats=True, **extra
    )


COPRO_EVAL_KWARGS = {"num_threads": 1, "display_progress": False}


def simba(metric: Any, prompt_model: Any, cls: type = SIMBA, **extra: Any) -> Any:
    return cls(
        metric=metric,
        bsize=4,
        num_candidates=3,
        max_steps=3,
        max_demos=2,
        prompt_model=prompt_model,
        num_threads=2,
        **extra,
    )


SIMBA_SEED = 3


# ---- what must match ---------------------------------------------------------------------
def bootstrap_rs_outcome(program: Any) -> dict[str, Any]:
    return {
        "candidates": [
            [c["seed"], c["score"], c["subscores"], c["program"].dump_state()]
            for c in program.candidate_programs
        ],
        "final": program.dump_state(),
    }


def copro_outcome(program: Any) -> dict[str, Any]:
    return {
        "candidates": [
            [c["score"], c["instruction"], c["prefix"], c["depth"], c["program"].dump_state()]
            for c in program.candidate_programs
        ],
        "total_calls": program.total_calls,
        "stats": [
            list(getattr(program, "results_best", {}).values()),
            list(getattr(program, "results_latest", {}).values()),
        ],
        "final": program.dump_state(),
    }


def simba_outcome(program: Any) -> dict[str, Any]:
    return {
        "candidates": [[c["score"], c["program"].dump_state()] for c in program.candidate_programs],
        "trial_logs": {str(k): v for k, v in program.trial_logs.items()},
        "final": program.dump_state(),
    }


# ---- in-process runs cut short and resumed ------------------------------------------------
class StepCrash(Exception):
    """Stands in for a kernel killed right after a step's snapshot."""


class SnapshotHooks(StepHooks):
    """Keeps each step's state as a snapshot would (canonical JSON, read back) and raises
    after the ``crash_after``-th step (0: never)."""

    def __init__(self, crash_after: int = 0, restored: dict[str, Any] | None = None) -> None:
        super().__init__(restored)
        self.crash_after = crash_after
        self.steps: list[tuple[str, dict[str, Any]]] = []
        self.started: list[tuple[str, dict[str, Any]]] = []
        self.last: dict[str, Any] | None = None

    def step_started(self, phase: str, **progress: Any) -> None:
        self.started.append((phase, progress))

    def step_done(self, phase: str, state: dict[str, Any], **progress: Any) -> None:
        self.last = json.loads(canonical(state))
        self.steps.append((phase, progress))
        if len(self.steps) == self.crash_after:
            raise StepCrash(f"after step {self.crash_after}")


def crash_and_resume(run: Callable[[StepHooks], Any], crash_after: int) -> tuple[Any, Any]:
    """Run until the crash, then resume from the last snapshot: (resumed result, hooks of
    the cut-short run)."""
    first = SnapshotHooks(crash_after)
    try:
        run(first)
    except StepCrash:
        pass
    else:
        raise AssertionError(f"the run ended before step {crash_after}")
    assert first.last is not None
    return run(SnapshotHooks(restored=first.last)), first


def with_lm(lm: Any, func: Callable[[], Any]) -> Any:
    with dspy.context(lm=lm):
        return func()
