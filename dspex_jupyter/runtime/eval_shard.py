"""An eval-pool kernel's part of a run's evaluation (see ``runtime/eval_remote.py``).

``setup`` builds the run's program, metric and LM here once per run, from the run's own
spec and objects with the run's trust rules (``runtime/runs.py``: ``build_teleprompter``,
``build_program``); ``evaluate_shard`` loads a candidate's ``dump_state()`` into a copy
of that program and scores a slice of the examples, as ``dspy.Evaluate``'s worker does
(``program(**example.inputs())`` then ``metric(example, prediction)``), answering per
example with the score, the prediction's fields or the error, and the LM usage it spent
(the run kernel adds it to the run's tracker: counted once).

Imported only when an eval pool kernel gets its first shard (it imports DSPy).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import json
import time
from typing import Any

import dspy

from .lm_failures import lm_failure_details
from .runs import (
    SharedUsageTracker,
    build_program,
    build_teleprompter,
    count_cache_hits,
    example_from_json,
    is_infrastructure_error,
    lm_failure_kind,
    metric_of,
)
from .sources import attach_sources

# What this kernel holds per run: its program, metric, LM and examples; the newest few
# only (a run whose kernel was given back mid-shard never said it was done).
KEEP_SETUPS = 4
_SETUPS: dict[str, dict[str, Any]] = {}


def setup(
    run_id: str,
    spec: dict[str, Any],
    data: dict[str, Any],
    objects: dict[str, Any],
    allowed: list[str],
) -> dict[str, Any]:
    """Build the run's program, metric and LM here (references only from ``allowed``
    modules, as a resume does; objects that came by value need no import)."""
    allowed_modules = tuple(allowed)
    teleprompter, lm = build_teleprompter(
        spec, dict(objects), trusted_only=True, allowed=allowed_modules
    )
    program = build_program(spec["program"], objects.get("program"), allowed=allowed_modules)
    program = attach_sources(program, objects.get("sources"))
    count_cache_hits()
    _SETUPS.pop(run_id, None)
    while len(_SETUPS) >= KEEP_SETUPS:
        del _SETUPS[next(iter(_SETUPS))]  # the oldest
    _SETUPS[run_id] = {
        "program": program,
        "metric": metric_of(teleprompter),
        "lm": lm,
        "trainset": [example_from_json(e) for e in data.get("trainset") or []],
        "valset": [example_from_json(e) for e in data.get("valset") or []],
    }
    return {"ready": True, "metric": _SETUPS[run_id]["metric"] is not None}


class _RecordingTracker(SharedUsageTracker):
    """Keeps every usage entry as it came, in order: the run kernel adds each to the run's
    tracker, so its call count and totals are what an evaluation there would have made."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[list[Any]] = []

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        super().add_usage(lm, usage_entry)
        with self._lock:
            self.entries.append([lm, dict(usage_entry)])


def teardown(run_id: str) -> dict[str, Any]:
    return {"dropped": _SETUPS.pop(run_id, None) is not None}


def _example(setup: dict[str, Any], ref: list[Any]) -> Any:
    kind, value = ref
    if kind == "json":
        return example_from_json(value)
    return setup[kind][int(value)]


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _score_to_json(score: Any) -> Any:
    if isinstance(score, dspy.Prediction):  # a feedback metric: score and feedback
        return {"prediction": {k: _jsonable(v) for k, v in score.items()}}
    if isinstance(score, bool | int | float) or score is None:
        return score
    return float(score)


def _error(exc: BaseException) -> dict[str, Any]:
    infrastructure = is_infrastructure_error(exc)
    return {
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "message": str(exc),
        "infrastructure": infrastructure,
        "lm_failure": lm_failure_kind(exc) if infrastructure else None,
        "details": lm_failure_details(exc) if infrastructure else {},
    }


def _one(program: Any, metric: Any, example: Any) -> tuple[dict[str, Any], int]:
    """(the example's entry, metric calls made)."""
    try:
        prediction = program(**example.inputs())
    except Exception as exc:
        return {"error": _error(exc)}, 0
    try:
        score = metric(example, prediction)
    except Exception as exc:
        return {"error": _error(exc)}, 1
    fields = {k: _jsonable(v) for k, v in prediction.items()}
    return {"score": _score_to_json(score), "prediction": fields}, 1


def evaluate_shard(
    run_id: str, program_state: dict[str, Any], refs: list[list[Any]], num_threads: int = 1
) -> dict[str, Any]:
    """Score ``refs`` (examples by their index in the run's data, or as JSON) with the
    candidate ``program_state``; ``num_threads`` LM calls at once (DSPy's contexts are
    context variables: each thread runs in a copy of this one)."""
    setup = _SETUPS.get(run_id)
    if setup is None:
        raise LookupError(f"run {run_id!r} was not set up in this kernel")
    started = time.perf_counter()
    program = setup["program"].deepcopy()
    program.load_state(program_state)
    examples = [_example(setup, ref) for ref in refs]
    tracker = _RecordingTracker()
    with dspy.context(lm=setup["lm"], usage_tracker=tracker, trace=[], disable_history=True):
        if num_threads <= 1 or len(examples) <= 1:
            outcomes = [_one(program, setup["metric"], e) for e in examples]
        else:
            with concurrent.futures.ThreadPoolExecutor(num_threads) as executor:
                futures = [
                    executor.submit(
                        contextvars.copy_context().run, _one, program, setup["metric"], e
                    )
                    for e in examples
                ]
                outcomes = [f.result() for f in futures]
    return {
        "results": [entry for entry, _ in outcomes],
        "metric_calls": sum(calls for _, calls in outcomes),
        "usage": tracker.entries,
        "cached_calls": tracker.totals()["cached_calls"],
        "seconds": time.perf_counter() - started,  # the kernel's own time (bench figures)
    }
