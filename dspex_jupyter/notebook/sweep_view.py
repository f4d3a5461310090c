"""A sweep's comparison widget: every run's best-so-far curve on one chart, a table of
status, usage, cost and best score per config, and a diff of the best programs
(instructions and demos), as optuna-dashboard's history plot and W&B's run overlay show
a study. Live: it redraws (coalesced) on each run event while the sweep goes on.

The chart is an SVG string like the run dashboard's (notebook/score_chart.py: same axis
rules and theme colours), so it renders in any frontend without a plotting library.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

import ipywidgets as widgets

from ..core.history import RunRecord, demos_of, program_diff
from .html_render import BORDER, MUTED_TEXT, TEXT, Raw, format_score, html_table
from .runs_table import shorten
from .score_chart import _fmt, _style, _tick_text, _ticks, nice_step, score_axis
from .timers import CoalescedRedraw

REDRAW_INTERVAL_S = 0.5
# One colour per run (matplotlib's tab10, readable on light and dark backgrounds).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
TABLE_HEADERS = ("", "config", "run", "status", "trials", "best", "calls", "tokens", "cost",
                 "best program")  # fmt: skip


def best_so_far(trials: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """(trial number, best score so far) per trial that has a score: the run's curve."""
    points: list[tuple[int, float]] = []
    best: float | None = None
    for trial in sorted(trials, key=lambda t: (t.get("number") or 0, t.get("time") or 0)):
        values = [v for v in (trial.get("score"), trial.get("best_score")) if _is_number(v)]
        if not values:
            continue
        best = max([*values, best] if best is not None else values)
        points.append((int(trial.get("number") or 0), best))
    return points


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def curves_svg(curves: Sequence[tuple[str, list[tuple[int, float]]]], *, width: int = 560,
               height: int = 240) -> str:  # fmt: skip
    """One best-so-far step line per run (``(label, points)``), each in its colour."""
    left, right, top, bottom = 58, 12, 10, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="dspex-sweep-chart" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
        f'font-size="11">'
    )
    scores = [score for _, points in curves for _, score in points]
    if not scores:
        return (
            f'{head}<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
            f"{_style('fill', MUTED_TEXT)}>no trials yet</text></svg>"
        )
    low, high, step = score_axis(scores)
    last = max([n for _, points in curves for n, _ in points] + [1])

    def x(number: float) -> float:
        return left + number / last * plot_w

    def y(score: float) -> float:
        return top + (high - score) / (high - low) * plot_h

    parts = [head]
    base_y = top + plot_h
    for value in _ticks(low, high, step):
        parts.append(
            f'<line class="grid" x1="{left}" y1="{_fmt(y(value))}" x2="{left + plot_w}" '
            f'y2="{_fmt(y(value))}" {_style("stroke", BORDER)}/>'
            f'<text class="y-tick" x="{left - 5}" y="{_fmt(y(value) + 4)}" text-anchor="end" '
            f"{_style('fill', TEXT)}>{_tick_text(value, step)}</text>"
        )
    for number in range(0, last + 1, max(1, round(nice_step(last)))):
        parts.append(
            f'<text class="x-tick" x="{_fmt(x(number))}" y="{base_y + 14}" '
            f'text-anchor="middle" {_style("fill", TEXT)}>{number}</text>'
        )
    parts.append(
        f'<text class="axis-title" x="{left + plot_w / 2}" y="{base_y + 28}" '
        f'text-anchor="middle" {_style("fill", TEXT)}>trial</text>'
    )
    for index, (label, points) in enumerate(curves):
        if not points:
            continue
        colour = PALETTE[index % len(PALETTE)]
        steps: list[str] = []
        previous: float | None = None
        for number, score in points:
            if previous is not None and score != previous:
                steps.append(f"{_fmt(x(number))},{_fmt(y(previous))}")
            steps.append(f"{_fmt(x(number))},{_fmt(y(score))}")
            previous = score
        if len(steps) == 1:  # one point: a dot, so it shows
            parts.append(
                f'<circle class="run-best" cx="{steps[0].split(",")[0]}" '
                f'cy="{steps[0].split(",")[1]}" r="3" fill="{colour}"/>'
            )
        parts.append(
            f'<polyline class="best-so-far run-{index}" fill="none" stroke-width="2" '
            f'stroke="{colour}" points="{" ".join(steps)}"><title>{escape(label)}</title>'
            "</polyline>"
        )
    parts.append("</svg>")
    return "".join(parts)


def swatch(index: int) -> Raw:
    colour = PALETTE[index % len(PALETTE)]
    return Raw(f'<span style="display:inline-block;width:10px;height:10px;background:{colour}">'
               "</span>")  # fmt: skip


def table_rows(sweep: Any) -> list[list[Any]]:
    rows = []
    for entry in sweep.entries:
        record = entry.run_record()
        usage = entry.usage or (record.usage if record else {}) or {}
        trials = max((int(t.get("number") or 0) for t in entry.trials()), default=0)
        best = record.best_score if record is not None else None
        program = best_program_text(record)
        status = entry.status + (" (budget)" if entry.stopped_by_budget else "")
        if entry.error:
            status += f": {shorten(entry.error)}"
        rows.append(
            [
                swatch(entry.index),
                entry.label,
                entry.run_id or "-",
                status,
                trials or "-",
                format_score(best) if best is not None else "-",
                usage.get("calls", "-"),
                usage.get("total_tokens", "-"),
                f"${usage['cost']:.4f}" if _is_number(usage.get("cost")) else "-",
                program,
            ]
        )
    return rows


def best_program_text(record: RunRecord | None) -> str:
    """ "Classify the review. · 2 demos": the best program's instructions (shortened) and
    demos, "-" before the run has one."""
    if record is None or not record.best_program:
        return "-"
    instruction = shorten(" / ".join(record.instructions.values()))
    demos = sum(len(d) for d in demos_of(record).values())
    return f"{instruction} · {demos} demo{'s' if demos != 1 else ''}"


def diff_text(sweep: Any) -> str:
    """Each finished run's best program against the sweep's best: instructions and demos."""
    records = [(e, e.run_record()) for e in sweep.entries]
    done = [(e, r) for e, r in records if r is not None and r.best_program]
    best = sweep.best_entry()
    if best is None or len(done) < 2:
        return ""
    base = next((r for e, r in done if e is best), None)
    if base is None:
        return ""
    parts = []
    for entry, record in done:
        if entry is best:
            continue
        lines = program_diff(base, record)
        head = f"# {best.label}  ->  {entry.label}"
        parts.append("\n".join([head, *(lines or ["(same program)"])]))
    return "\n\n".join(parts)


class SweepView(widgets.VBox):
    """The live comparison of a sweep's runs (``sweep.widget()``, ``%dspex attach``)."""

    def __init__(self, sweep: Any, *, min_interval: float = REDRAW_INTERVAL_S) -> None:
        self.sweep = sweep
        self.header = widgets.HTML()
        self.chart = widgets.HTML()
        self.table = widgets.HTML()
        self.diff = widgets.HTML()
        super().__init__([self.header, self.chart, self.table, self.diff])
        self._redraw = CoalescedRedraw(
            self._draw, min_interval=min_interval, name=f"dspex-sweep-view-{sweep.sweep_id}"
        )
        sweep.on_change(self._redraw.request)
        self._redraw.draw_now()

    @property
    def redraw_count(self) -> int:
        return self._redraw.redraw_count

    def wait_drawn(self, timeout: float | None = None) -> bool:
        """Wait until the newest state is on screen (tests)."""
        return self._redraw.wait_idle(timeout)

    def close(self) -> None:
        self._redraw.close()
        super().close()

    def _draw(self) -> None:
        sweep = self.sweep
        status = sweep.status()
        counts = ", ".join(f"{n} {s}" for s, n in status["runs"].items())
        usage = status["usage"]
        budget = status["budget"]
        spent = ", ".join(
            f"{name} {usage.get(_usage_key(name), 0):g}/{limit:g}" for name, limit in budget.items()
        )
        reason = f" · {status['reason']}" if status["reason"] else ""
        best = status["best"]
        best_text = f" · best {format_score(best['score'])} ({best['label']})" if best else ""
        self.header.value = (
            f'<div class="dspex-sweep-header" style="color:{TEXT}"><b>sweep '
            f"{escape(sweep.name)}</b> · {escape(status['state'])} · {escape(counts)}"
            f"{escape(reason)}{escape(best_text)}"
            + (f"<br>budget: {escape(spent)}" if spent else "")
            + "</div>"
        )
        curves = [(e.label, best_so_far(e.trials())) for e in sweep.entries]
        self.chart.value = curves_svg(curves)
        self.table.value = html_table(TABLE_HEADERS, table_rows(sweep), css_class="dspex-sweep")
        text = diff_text(sweep)
        self.diff.value = (
            f'<details class="dspex-sweep-diff" open><summary>best programs compared'
            f'</summary><pre style="font-size:11px">{escape(text)}</pre></details>'
            if text
            else ""
        )


def _usage_key(name: str) -> str:
    return {"max_calls": "calls", "max_tokens": "total_tokens", "max_cost": "cost"}.get(
        name, "metric_calls"
    )


def records_of(sweep: Any) -> list[RunRecord | None]:
    """Each config's run as a record (tests and the comparison read the same)."""
    return [entry.run_record() for entry in sweep.entries]
