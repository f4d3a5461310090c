"""``%dspex runs``: one row per optimization run, as HTML in a notebook and text elsewhere.

Built from the runs' public attributes only (status, metrics, events, spec), so it reads
the same for a live run, a finished one and a resumed one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .html_render import format_duration, html_table

HEADERS = ("variable", "run", "optimizer", "status", "best", "best instruction", "cost", "time")
INSTRUCTION_WIDTH = 48


def shorten(text: str, width: int = INSTRUCTION_WIDTH) -> str:
    """One line of at most ``width`` characters, ending in "…" when cut."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


def holder_name(run: Any, namespace: Mapping[str, Any]) -> str:
    """The notebook variable holding ``run`` (or the run that resumed it), "-" if none."""
    same_id = ""
    for key, value in namespace.items():
        if key.startswith("_"):  # IPython's output cache (_, __, _7...)
            continue
        if value is run:
            return key
        if (
            not same_id
            and getattr(value, "run_id", None) == run.run_id
            and hasattr(value, "events")
        ):
            same_id = key
    return same_id or "-"


def optimizer_name(run: Any) -> str:
    """ "MIPROv2 light" (its auto preset), or "MIPROv2" with explicit candidates/trials."""
    options = (getattr(run, "spec", None) or {}).get("optimizer") or {}
    auto = options.get("auto")
    return f"MIPROv2 {auto}" if auto else "MIPROv2"


def best_instruction(events: list[dict[str, Any]], best_score: float | None) -> str:
    """The instruction(s) of the best fully evaluated trial, from the run's events."""
    if best_score is None:
        return "-"
    candidates = {
        (int(e["predictor"]), int(e["index"])): str(e["instruction"])
        for e in events
        if e.get("kind") == "candidate"
    }
    best = [
        e
        for e in events
        if e.get("kind") == "trial" and e.get("eval") == "full" and e.get("score") == best_score
    ]
    if not best:
        return "-"
    params = best[-1].get("params") or {}
    texts = []
    for key, index in sorted(params.items()):
        predictor, _, what = key.partition("_predictor_")
        if what == "instruction" and predictor.isdigit():
            texts.append(candidates.get((int(predictor), int(index)), f"candidate {index}"))
    return shorten(" | ".join(texts)) if texts else "-"


def duration(events: list[dict[str, Any]], done: bool, now: float | None = None) -> float | None:
    """Seconds from the run's first event to its last (to now while it runs)."""
    times = [e["time"] for e in events if isinstance(e.get("time"), int | float)]
    if not times:
        return None
    end = max(times) if done else (time.time() if now is None else now)
    return max(0.0, end - min(times))


def run_row(run: Any, namespace: Mapping[str, Any], now: float | None = None) -> list[str]:
    metrics = run.metrics
    best = metrics.get("best_score")
    cost = (metrics.get("usage") or {}).get("cost")
    return [
        holder_name(run, namespace),
        run.run_id,
        optimizer_name(run),
        run.status,
        f"{best:.4g}" if best is not None else "-",
        best_instruction(list(run.events), best),
        f"${cost:.4f}" if cost is not None else "-",
        format_duration(duration(list(run.events), run.done, now)),
    ]


class RunsTable:
    """What ``%dspex runs`` displays: ``_repr_html_`` in a notebook, text in a terminal."""

    def __init__(self, rows: list[list[str]]) -> None:
        self.rows = rows

    def _repr_html_(self) -> str:
        return html_table(HEADERS, self.rows, css_class="dspex-runs")

    def __repr__(self) -> str:
        table = [list(HEADERS), *self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in table
        )


def runs_table(
    runs: list[Any], namespace: Mapping[str, Any], now: float | None = None
) -> RunsTable:
    return RunsTable([run_row(run, namespace, now) for run in runs])
