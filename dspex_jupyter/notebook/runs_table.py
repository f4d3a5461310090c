"""``%dspex runs``: one row per optimization run, as HTML in a notebook and text elsewhere.

Built from the runs' public attributes only (status, metrics, events, spec), so it reads
the same for a live run, a finished one and a resumed one. ``%dspex runs --all`` adds the
run history's rows (other notebooks, earlier days: ``core/history.py``) to the same table,
with the notebook and start time of each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from .html_render import format_duration, html_table

HEADERS = ("variable", "run", "optimizer", "status", "best", "best instruction", "cost", "time")
HISTORY_HEADERS = (*HEADERS, "notebook", "started")
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
    name = getattr(run, "optimizer", None)
    return optimizer_label(name if isinstance(name, str) and name else "MIPROv2", options)


def optimizer_label(name: str, options: Any) -> str:
    auto = options.get("auto") if isinstance(options, dict) else None
    return f"{name} {auto}" if auto else name


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


def trial_events(run: Any) -> bool:
    return any(e.get("kind") == "trial" for e in list(run.events))


def result_instruction(run: Any) -> str:
    """A completed run without MIPROv2's trial events (GEPA, COPRO...): its best program's
    instruction(s), from its result."""
    if not (getattr(run, "done", False) and run.status == "completed"):
        return "-"
    from ..core.history import RunRecord

    try:  # RunRecord reads a lone Predict's flat state as well as a module's
        state = run.result(timeout=0).state
        instructions = RunRecord(run.run_id, best_program=state).instructions
    except Exception:  # no result to read: nothing to show
        return "-"
    return shorten(" | ".join(instructions.values())) if instructions else "-"


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
        best_instruction(list(run.events), best) if trial_events(run) else result_instruction(run),
        f"${cost:.4f}" if cost is not None else "-",
        format_duration(duration(list(run.events), run.done, now)),
    ]


def record_row(record: Any) -> list[str]:
    """A run of the history (``core.history.RunRecord``) that this kernel does not hold."""
    instruction = " | ".join(text for text in record.instructions.values() if text)
    return [
        "-",
        record.run_id,
        optimizer_label(record.optimizer, (record.config or {}).get("optimizer")),
        record.shown_status,
        f"{record.best_score:.4g}" if record.best_score is not None else "-",
        shorten(instruction) if instruction else "-",
        f"${record.cost:.4f}" if record.cost is not None else "-",
        format_duration(max(0.0, record.updated - record.created) if record.created else None),
        notebook_name(record.notebook),
        started_text(record.created),
    ]


def notebook_name(path: str | None) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1] if path else "-"


def started_text(epoch: float | None) -> str:
    from ..core.history import format_time

    return format_time(epoch)


def history_table(
    records: list[Any], live: list[Any], namespace: Mapping[str, Any], now: float | None = None
) -> RunsTable:
    """``%dspex runs --all``: the history's runs; those this kernel holds read live, with
    the variable holding them."""
    from ..core.history import current_notebook

    held = {run.run_id: run for run in live}
    notebook = notebook_name(current_notebook())
    rows = []
    for record in records:
        run = held.get(record.run_id)
        if run is None:
            rows.append(record_row(record))
        else:
            rows.append([*run_row(run, namespace, now), notebook, started_text(record.created)])
    return RunsTable(rows, HISTORY_HEADERS)


class RunsTable:
    """What ``%dspex runs`` displays: ``_repr_html_`` in a notebook, text in a terminal."""

    def __init__(self, rows: list[list[str]], headers: tuple[str, ...] = HEADERS) -> None:
        self.rows = rows
        self.headers = headers

    def _repr_html_(self) -> str:
        return html_table(self.headers, self.rows, css_class="dspex-runs")

    def __repr__(self) -> str:
        table = [list(self.headers), *self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.headers))]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in table
        )


def runs_table(
    runs: list[Any], namespace: Mapping[str, Any], now: float | None = None
) -> RunsTable:
    return RunsTable([run_row(run, namespace, now) for run in runs])


def comparison_text(records: list[Any]) -> str:
    """Runs of the history side by side (``dspex runs compare``, ``%dspex runs --compare``):
    scores, usage, the settings that differ, then the instructions' diff against the first."""
    from ..core.history import config_differences, format_time, program_diff

    def score(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, int | float) else "-"

    rows = [
        ["", *(r.run_id for r in records)],
        ["optimizer", *(r.optimizer for r in records)],
        ["status", *(r.shown_status for r in records)],
        ["best score", *(score(r.best_score) for r in records)],
        ["trials", *(str(r.trials) for r in records)],
        ["cost", *(f"${r.cost:.4f}" if r.cost is not None else "-" for r in records)],
        ["tokens", *(str((r.usage or {}).get("total_tokens", "-")) for r in records)],
        ["notebook", *(notebook_name(r.notebook) for r in records)],
        ["started", *(format_time(r.created) for r in records)],
    ]
    for key, values in config_differences(records).items():
        rows.append([key, *(json.dumps(value) for value in values)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    for other in records[1:]:
        diff = program_diff(records[0], other)
        lines += [
            "",
            f"best programs (instructions, demos), {records[0].run_id} -> {other.run_id}:",
        ]
        lines += diff or ["  (the same)"]
    return "\n".join(lines)


SWEEP_HEADERS = ("sweep", "id", "status", "runs", "budget", "pool", "notebook", "started")


def sweeps_table(records: list[Any]) -> RunsTable:
    """``%dspex sweeps``: the recorded sweeps (``%dspex attach NAME`` shows one)."""
    rows = []
    for record in records:
        statuses = [str(r.get("status")) for r in record.runs]
        runs = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
        budget = ", ".join(f"{k}={v:g}" for k, v in (record.budget or {}).items())
        rows.append([record.name, record.sweep_id, record.status, runs or "-", budget or "-",
                     record.pool or "-", notebook_name(record.notebook),
                     started_text(record.created)])  # fmt: skip
    return RunsTable(rows, SWEEP_HEADERS)
