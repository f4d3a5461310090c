"""How a SIMBA run looks in the run dashboard and the sidebar.

Reads the "progress" events ``runtime/simba.py`` sends after every mini-batch step: step i
of N, the mini-batch size, the size of the program pool, the step's scores and the best
average mini-batch score so far; then the final validation of the winners.
"""

from __future__ import annotations

from typing import Any


def _step_events(run_state: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in run_state.get("progress_events") or [] if e.get("phase") == "step"]


def progress_items(run_state: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows for the dashboard and the sidebar."""
    progress = run_state.get("progress") or {}
    if progress.get("batch_size") is None:
        return [("Step", "sampling the first mini-batch")] if progress else []
    rows = [
        ("Step", f"{progress['step']} of {progress['total']}"),
        ("Mini-batch", f"{progress['batch_size']} examples"),
        ("Programs", f"{progress.get('programs', 1)} in the pool"),
    ]
    if progress.get("step_best") is not None:
        rows.append(
            (
                "Last step",
                f"best candidate {_score(progress['step_best'])} "
                f"(samples averaged {_score(progress.get('baseline_score'))})",
            )
        )
    if progress.get("best_score") is not None:
        rows.append(("Best so far", f"{_score(progress['best_score'])} (mini-batch average)"))
    if run_state.get("phase") == "validate" and run_state.get("status") == "running":
        rows.append(("Validation", "scoring the winners on the whole trainset"))
    return rows


def chart_points(run_state: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per step: its best new candidate's mini-batch score."""
    return [
        {
            "number": e["step"],
            "score": e["step_best"],
            "eval": "minibatch",
            "best_score": e.get("best_score"),
        }
        for e in _step_events(run_state)
        if isinstance(e.get("step_best"), int | float)
    ]


def _score(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "n/a"
