"""Any teleprompter without a view of its own: metric calls, evaluations, best score."""

from __future__ import annotations

from typing import Any

from ..html_render import format_score


def progress_items(run_state: dict[str, Any]) -> list[tuple[str, str]]:
    progress = run_state["progress"]
    items = [("optimizer", str(run_state["optimizer"]))]
    if "evaluations" in progress:
        items.append(("evaluations", f"{int(progress['evaluations']):,}"))
    items.append(("metric calls", f"{int(progress.get('metric_calls') or 0):,}"))
    best = run_state["best_score"]
    if best is None:
        best = progress.get("best_score")
    items.append(("best score", format_score(best) if isinstance(best, int | float) else "-"))
    items.append(("resume", "starts over"))
    return items
