"""How a GEPA run looks in the run dashboard and the JupyterLab sidebar.

Reads the run's merged "progress" fields (``runtime/gepa.py`` sends them after every
iteration): the iteration, GEPA's metric calls against its budget, the candidates, the
Pareto front's size, the best aggregate score on the validation set, and the latest
reflection proposal with its parent.
"""

from __future__ import annotations

from typing import Any

INSTRUCTION_CHARS = 90  # a proposal's instruction, as a row shows it


def progress_items(run_state: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows for the dashboard and the sidebar."""
    progress = run_state.get("progress") or {}
    if "iteration" not in progress:
        return [("Iteration", "evaluating the seed program")] if progress else []
    rows = [("Iteration", str(progress["iteration"]))]
    used, budget = progress.get("metric_calls_used"), progress.get("max_metric_calls")
    if used is not None:
        rows.append(("Metric calls", _of_budget(used, budget)))
    if progress.get("candidates") is not None:
        rows.append(("Candidates", str(progress["candidates"])))
    if progress.get("pareto_front") is not None:
        front = progress["pareto_front"]
        rows.append(("Pareto front", f"{front} candidate{'s' if front != 1 else ''}"))
    if progress.get("best_score") is not None:
        best = f"{progress['best_score']:.3f}"
        if progress.get("best_candidate") is not None:
            best += f" (candidate {progress['best_candidate']})"
        rows.append(("Best aggregate", best))
    proposal = _latest_proposal(run_state)
    if proposal is not None:
        rows.append(("Latest proposal", proposal_text(proposal)))
    return rows


def chart_points(run_state: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per candidate GEPA kept (its full validation score), by iteration."""
    points: list[dict[str, Any]] = []
    for event in run_state.get("progress_events") or []:
        if "iteration" not in event:
            continue
        proposal = event.get("proposal") or {}
        if event["iteration"] == 0 and event.get("best_score") is not None:
            score = event["best_score"]  # the seed program
        elif proposal.get("accepted") and proposal.get("score") is not None:
            score = proposal["score"]
        else:
            continue
        points.append(
            {
                "number": event["iteration"],
                "score": score,
                "eval": "full",
                "best_score": event.get("best_score"),
            }
        )
    return points


def proposal_text(proposal: dict[str, Any]) -> str:
    """ "candidate 4 ← parent 1: <instruction>" (or why it was not kept)."""
    parents = ", ".join(str(p) for p in proposal.get("parents") or [])
    source = f"parent{'s' if len(proposal.get('parents') or []) > 1 else ''} {parents}"
    text = "; ".join(_shorten(v) for v in (proposal.get("instructions") or {}).values())
    kind = "merge of " if proposal.get("merge") else ""
    if proposal.get("accepted") and proposal.get("candidate") is not None:
        return f"candidate {proposal['candidate']} ← {kind}{source}: {text}"
    before, after = proposal.get("subsample_before"), proposal.get("subsample_after")
    scores = (
        f" (minibatch {before:g} → {after:g})" if before is not None and after is not None else ""
    )
    return f"not kept{scores}, from {kind}{source}: {text}"


def _latest_proposal(run_state: dict[str, Any]) -> dict[str, Any] | None:
    for event in reversed(run_state.get("progress_events") or []):
        if event.get("proposal"):
            return event["proposal"]
    return None


def _of_budget(used: int, budget: int | None) -> str:
    if not budget:
        return str(used)
    return f"{used} / {budget} ({min(used / budget, 1.0):.0%})"


def _shorten(text: str) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= INSTRUCTION_CHARS else flat[: INSTRUCTION_CHARS - 1] + "…"
