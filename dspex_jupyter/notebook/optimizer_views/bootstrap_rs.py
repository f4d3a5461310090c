"""How a BootstrapFewShotWithRandomSearch run looks in the run dashboard and the sidebar.

Reads the "progress" events ``runtime/bootstrap_rs.py`` sends after every candidate seed:
which seed of how many, its score on the validation set, and the best so far.
"""

from __future__ import annotations

from typing import Any

# What upstream builds for each of its special seeds; seeds >= 0 shuffle the trainset.
SEED_KINDS = {-3: "zero-shot", -2: "labeled demos only", -1: "bootstrapped, unshuffled"}


def seed_text(seed: int) -> str:
    return f"seed {seed} ({SEED_KINDS.get(seed, 'bootstrapped, shuffled')})"


def _seed_events(run_state: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in run_state.get("progress_events") or [] if e.get("seed") is not None]


def progress_items(run_state: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows for the dashboard and the sidebar."""
    progress = run_state.get("progress") or {}
    if progress.get("seed") is None:
        return [("Candidate seed", "building the first candidate")] if progress else []
    rows = [
        ("Candidate seed", f"{progress['step']} of {progress['total']}"),
        ("Last scored", f"{seed_text(progress['seed'])}: {_score(progress.get('score'))}"),
        (
            "Best so far",
            f"{_score(progress.get('best_score'))}, {seed_text(progress['best_seed'])}",
        ),
    ]
    events = _seed_events(run_state)
    if len(events) > 1:
        scores = ", ".join(f"{e['seed']}: {_score(e.get('score'))}" for e in events)
        rows.append(("Scores by seed", scores))
    return rows


def chart_points(run_state: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per candidate seed: its score on the whole validation set."""
    return [
        {
            "number": e["step"],
            "score": e["score"],
            "eval": "full",
            "best_score": e.get("best_score"),
        }
        for e in _seed_events(run_state)
        if isinstance(e.get("score"), int | float)
    ]


def _score(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "n/a"
