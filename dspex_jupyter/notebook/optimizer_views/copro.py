"""How a COPRO run looks in the run dashboard and the sidebar.

Reads the "progress" events ``runtime/copro.py`` sends after the first proposals and after
every depth: depth i of D, the breadth, how many candidates were proposed and scored, and
the best instruction so far.
"""

from __future__ import annotations

from typing import Any

INSTRUCTION_CHARS = 90  # the best instruction, as a row shows it


def _depth_events(run_state: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in run_state.get("progress_events") or [] if e.get("phase") == "depth"]


def progress_items(run_state: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows for the dashboard and the sidebar."""
    progress = run_state.get("progress") or {}
    if progress.get("breadth") is None:
        return [("Depth", "proposing the first candidates")] if progress else []
    step, total = progress.get("step", 0), progress.get("total")
    depth = f"{step} of {total}" if step else f"0 of {total} (first candidates proposed)"
    rows = [
        ("Depth", depth),
        ("Breadth", f"{progress['breadth']} candidates per predictor and depth"),
        (
            "Candidates",
            f"{progress.get('evaluated', 0)} scored, {progress.get('candidates', 0)} proposed",
        ),
    ]
    if progress.get("best_score") is not None:
        rows.append(("Best so far", _score(progress["best_score"])))
        rows.append(("Best instruction", _shorten(progress.get("best_instruction") or "")))
    return rows


def chart_points(run_state: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per depth: the best score found so far (COPRO scores every candidate on
    the whole trainset)."""
    return [
        {
            "number": e["step"],
            "score": e["best_score"],
            "eval": "full",
            "best_score": e["best_score"],
        }
        for e in _depth_events(run_state)
        if isinstance(e.get("best_score"), int | float)
    ]


def _score(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "n/a"


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= INSTRUCTION_CHARS else text[: INSTRUCTION_CHARS - 1] + "…"
