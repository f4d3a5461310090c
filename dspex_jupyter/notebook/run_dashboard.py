"""The live dashboard of an optimization run.

It shows the phase and a progress bar per phase, an ETA, every trial's score with the best
so far (an SVG chart), the candidate instructions with their scores, LM calls (sent and
cached), tokens and cost against the run's budget, "waiting for the LM" while it is down,
warnings, the status and the error, plus checkpoint/cancel/resume buttons. Events update a
``RunProgress`` as they arrive (on the manager's thread); the widgets are redrawn from it
at most ten times a second by one background thread, so a flood of events never floods
the browser. A dashboard is kernel-side state: display it again (``%dspex attach``) after
the browser reconnected and it is still live.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from html import escape
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..checkpoint import read_json_checked
from .checkpoint_controls import CheckpointControls
from .html_render import Raw, first_line, format_duration, html_table
from .run_progress import (
    FINISHED,
    PHASES,
    RunProgress,
    budget_lines,
    trials_from_snapshot,
    waiting_line,
)
from .score_chart import score_chart_svg
from .timers import CoalescedRedraw

REDRAW_INTERVAL_S = 0.1
INSTRUCTION_PREVIEW = 160

_dashboards: weakref.WeakKeyDictionary[Any, RunDashboard] = weakref.WeakKeyDictionary()


def dashboard_for(run: Any) -> RunDashboard:
    """The run's dashboard (one per run, so every view of it is the same live widget)."""
    dashboard = _dashboards.get(run)
    if dashboard is None or dashboard.closed:
        dashboard = RunDashboard(run)
        _dashboards[run] = dashboard
    return dashboard


def display_run(run: Any) -> None:
    """How IPython shows an ``OptimizationRun``: its live dashboard."""
    from IPython.display import display

    display(dashboard_for(run))


class RunDashboard(widgets.VBox):
    """Live progress of one ``OptimizationRun`` (anything with ``on_event``, ``status``,
    ``done``, ``error``, ``run_id`` and the checkpoint methods)."""

    def __init__(self, run: Any, *, min_interval: float = REDRAW_INTERVAL_S) -> None:
        self.run = run
        self.closed = False
        self.progress = RunProgress()
        self._prior_snapshot: str | None = None
        self.header = widgets.HTML()
        self.phase_bars = {
            name: widgets.IntProgress(value=0, min=0, max=1, description=name) for name in PHASES
        }
        self.phase_labels = {name: widgets.Label(value="") for name in PHASES}
        self.eta = widgets.HTML()
        self.chart = widgets.HTML()
        self.candidates = widgets.HTML()
        self.usage = widgets.HTML()
        self.notice = widgets.HTML()  # waiting for the LM, warnings
        self.error = widgets.HTML()
        self._redraw = CoalescedRedraw(
            self._draw,
            min_interval=min_interval,
            name=f"dspex-dashboard-{getattr(run, 'run_id', '')}",
        )
        self.controls = CheckpointControls(run, on_change=self._redraw.request)
        self.controls.on_resumed(self.follow)
        bars = [widgets.HBox([self.phase_bars[n], self.phase_labels[n]]) for n in PHASES]
        super().__init__(
            [
                self.header,
                *bars,
                self.eta,
                self.chart,
                self.candidates,
                self.usage,
                self.notice,
                self.error,
                self.controls,
            ]
        )
        self._subscribe(run)
        self._redraw.draw_now()

    # ---- following a run --------------------------------------------------------
    @property
    def redraw_count(self) -> int:
        return self._redraw.redraw_count

    def wait_drawn(self, timeout: float | None = None) -> bool:
        """Wait until the newest state is on screen (tests)."""
        return self._redraw.wait_idle(timeout)

    def _subscribe(self, run: Any) -> None:
        def on_event(event: dict[str, Any]) -> None:
            if run is self.run and not self.closed:
                self.handle_event(event)

        run.on_event(on_event)
        self._watch_end(run)

    def _watch_end(self, run: Any) -> None:
        """Redraw when the run ends, events or not (a dead kernel sends none)."""

        def wait() -> None:
            with contextlib.suppress(BaseException):  # its error is shown by the redraw
                run.result()
            self._redraw.request()

        if not run.done:
            threading.Thread(target=wait, name="dspex-dashboard-end", daemon=True).start()

    def handle_event(self, event: dict[str, Any]) -> None:
        """Fold one event in and schedule a redraw (cheap: called for every event)."""
        if event.get("kind") == "resumed" and not self.progress.trials and event.get("snapshot"):
            self._prior_snapshot = str(event["snapshot"])
        self.progress.apply(event)
        self._redraw.request()

    def follow(self, run: Any) -> None:
        """Show another run from now on (the one a resume started), keeping the chart."""
        self.run = run
        _dashboards.setdefault(run, self)  # attaching to the new run shows this dashboard
        self.controls.follow(run)
        self._subscribe(run)
        self._redraw.request()

    def close(self) -> None:
        self.closed = True
        self._redraw.close()
        super().close()

    # ---- drawing ----------------------------------------------------------------
    def _load_prior_trials(self) -> None:
        name, self._prior_snapshot = self._prior_snapshot, None
        if name is None:
            return
        try:
            body = read_json_checked(Path(self.run.checkpoint_dir) / name)
        except Exception:  # the chart starts at the resume point instead
            return
        self.progress.add_prior_trials(trials_from_snapshot(body))

    def _draw(self) -> None:
        run = self.run
        self._load_prior_trials()
        if run.done and run.status == "failed" and self.progress.error is None:
            self.progress.note_failure(first_line(str(run.error or "the run failed")))
        state = self.progress.copy()
        status = run.status if run.done else state.status
        self.header.value = self._header_html(run, state, status)
        for name in PHASES:
            self._draw_phase(name, state)
        eta = state.eta_seconds()
        self.eta.value = f"<b>ETA</b> {format_duration(eta)}" if eta is not None else "<b>ETA</b> -"
        self.chart.value = score_chart_svg(state.trials)
        self.candidates.value = self._candidates_html(state)
        self.usage.value = self._usage_html(state.usage, state.budget)
        self.notice.value = self._notice_html(state)
        self.error.value = self._error_html(state, run)
        self.controls.refresh()

    def _header_html(self, run: Any, state: RunProgress, status: str) -> str:
        pool = getattr(getattr(run, "session", None), "pool_name", "")
        best = state.best_score
        colour = {"completed": "#2e7d32", "failed": "#c0392b", "cancelled": "#8a6d3b"}.get(
            status, "#1f5fa8"
        )
        parts = [
            f"<b>MIPROv2 run {escape(str(run.run_id))}</b>",
            f"pool {escape(pool)}" if pool else "",
            f'status <b style="color:{colour}">{escape(status)}</b>',
            f"phase {escape(state.phase or '-')}",
            f"trials {len(state.trials)}",
            f"best {best:.4g}" if isinstance(best, int | float) else "best -",
        ]
        return '<div class="dspex-run-header">' + " · ".join(p for p in parts if p) + "</div>"

    def _draw_phase(self, name: str, state: RunProgress) -> None:
        progress, bar, label = state.phases[name], self.phase_bars[name], self.phase_labels[name]
        total = progress.total or 0
        bar.max = max(total, 1)
        bar.value = min(progress.step, bar.max) if total else (1 if progress.done else 0)
        bar.bar_style = "success" if progress.done or state.status == "completed" else ""
        if name == "search":
            label.value = f"trial {progress.step}/{total}" if total else "not started"
        elif name == "propose":
            if progress.done or state.candidates:
                label.value = f"{len(state.candidates)} candidate instructions"
            else:
                label.value = "proposing…" if state.phase == "propose" else "not started"
        else:
            label.value = f"{progress.step}/{total} demo sets" if total else "not started"

    @staticmethod
    def _candidates_html(state: RunProgress) -> str:
        rows = []
        for row in state.candidate_rows():
            text = row["instruction"]
            short = text if len(text) <= INSTRUCTION_PREVIEW else text[:INSTRUCTION_PREVIEW] + "…"
            cell = Raw(f'<span title="{escape(text)}">{escape(short)}</span>')
            rows.append(
                [
                    row["predictor"],
                    row["index"],
                    cell,
                    row["trials"],
                    row["mean_score"],
                    row["best_full_score"],
                ]
            )
        if not rows:
            return "<i>candidate instructions appear once they are proposed</i>"
        headers = ["predictor", "#", "instruction", "trials", "mean score", "best full score"]
        return html_table(headers, rows, css_class="dspex-candidates")

    @staticmethod
    def _usage_html(usage: dict[str, Any], budget: dict[str, Any] | None = None) -> str:
        calls = int(usage.get("calls") or 0)
        cached = int(usage.get("cached_calls") or 0)
        total = int(usage.get("total_tokens") or 0)
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        cost = float(usage.get("cost") or 0.0)
        against = budget_lines(usage, budget)
        limits = f" · <b>budget</b> {escape(', '.join(against))}" if against else ""
        return (
            f'<div class="dspex-usage"><b>LM calls</b> {calls:,} sent, {cached:,} from the cache'
            f" · <b>tokens</b> {total:,} (prompt {prompt:,}, completion {completion:,}) · "
            f"<b>cost</b> ${cost:.4f}{limits}</div>"
        )

    @staticmethod
    def _notice_html(state: RunProgress) -> str:
        lines = []
        if state.waiting is not None and state.status not in FINISHED:
            text = escape(waiting_line(state.waiting))
            lines.append(f'<div class="dspex-waiting" style="color:#b26a00">{text}</div>')
        for warning in map(escape, state.warnings):
            lines.append(f'<div class="dspex-warning" style="color:#8a6d3b">{warning}</div>')
        return "".join(lines)

    @staticmethod
    def _error_html(state: RunProgress, run: Any) -> str:
        error = state.error
        if state.status == "cancelled" or (run.done and run.status == "cancelled"):
            where = Path(state.cancelled_checkpoint).name if state.cancelled_checkpoint else ""
            return f"<i>cancelled; resumable from {escape(where or 'its checkpoints')}</i>"
        if error is None:
            return ""
        kind = ", ".join(k for k in ("infrastructure", "resumable") if error.get(k))
        title = f"{error['type']}: {error['message']}" if error["type"] else error["message"]
        trace = error.get("traceback") or "".join(getattr(run.error, "remote_traceback", []) or [])
        details = (
            (f"<details><summary>remote traceback</summary><pre>{escape(trace)}</pre></details>")
            if trace
            else ""
        )
        suffix = f" ({escape(kind)})" if kind else ""
        return (
            f'<div class="dspex-error" style="color:#c0392b"><b>error</b> {escape(title)}'
            f"{suffix}</div>{details}"
        )


__all__ = ["FINISHED", "RunDashboard", "dashboard_for", "display_run"]
