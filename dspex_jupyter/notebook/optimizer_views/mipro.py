"""MIPROv2's runs: trials as ``num_trials`` counts them, full evaluations, best score."""

from __future__ import annotations

from typing import Any

from ..html_render import format_score


def progress_items(run_state: dict[str, Any]) -> list[tuple[str, str]]:
    trials = run_state["trials"]
    full = sum(1 for t in trials if t.get("eval") == "full")
    minibatch = run_state["spec"]["compile"].get("minibatch", True)
    done = len(trials) - full if minibatch else max(0, full - 1)
    planned = run_state["spec"]["compile"].get("num_trials")
    best = run_state["best_score"]
    return [
        ("trials", f"{done}/{planned}" if isinstance(planned, int) else str(done)),
        ("full evaluations", str(full)),
        ("best score", format_score(best) if isinstance(best, int | float) else "-"),
    ]


def chart_points(run_state: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "number": int(t["number"]),
            "score": float(t["score"]),
            "eval": str(t.get("eval", "minibatch")),
            "best_score": t.get("best_score"),
        }
        for t in run_state["trials"]
    ]
