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
from . import optimizer_views
from .checkpoint_controls import CheckpointControls
from .html_render import (
    BRAND,
    ERROR,
    SUCCESS,
    TEXT,
    WARNING,
    Raw,
    first_line,
    format_duration,
    format_score,
    html_table,
)
from .run_progress import (
    FINISHED,
    PHASES,
    RunProgress,
    TrialPoint,
    budget_lines,
    trials_from_snapshot,
    waiting_line,
)
from .score_chart import score_chart_svg
from .timers import CoalescedRedraw

REDRAW_INTERVAL_S = 0.1
# State colours mark text as borders; the text itself keeps the theme's text colour, which
# reads at WCAG AA contrast in light and dark themes (orange and green text do not).
NOTICE_STYLE = f"color:{TEXT};border-left:3px solid {WARNING};padding-left:6px"
INSTRUCTION_PREVIEW = 160

_dashboards: weakref.WeakKeyDictionary[Any, RunDashboard] = weakref.WeakKeyDictionary()


def dashboard_for(run: Any) -> RunDashboard:
    """The run's dashboard (one per run, so every view of it is the same live widget)."""
    dashboard = _dashboards.get(run)
    if dashboard is None or dashboard.closed:
        dashboard = RunDashboard(run)
        _dashboards[run] = dashboard
    return dashboard


def predictor_names(run: Any) -> list[str]:
    """The program's predictor names (``program.named_predictors()``), in the order of the
    indices the run's events carry; [] when the run handle does not know them."""
    program = (getattr(run, "resume_objects", None) or {}).get("program")
    if program is not None and hasattr(program, "named_predictors"):
        with contextlib.suppress(Exception):  # a user's module: names are a nicety
            return [name for name, _ in program.named_predictors()]
    # A Predict/ChainOfThought is shipped as its state: DSPy's dump_state() keys are the
    # predictor names (a lone Predict's state is the predictor itself).
    state = ((getattr(run, "spec", None) or {}).get("program") or {}).get("state")
    if not isinstance(state, dict):
        return []
    if "demos" in state:
        return ["self"]
    return [k for k, v in state.items() if isinstance(v, dict) and "demos" in v]


def predictor_label(names: list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else f"predictor {index}"


def search_plan(run: Any) -> tuple[int | None, bool]:
    """(num_trials, minibatch) the run was started with, when its handle has its spec."""
    options = (getattr(run, "spec", None) or {}).get("compile") or {}
    trials = options.get("num_trials")
    return (int(trials) if isinstance(trials, int) else None), bool(options.get("minibatch", True))


def _optimizer(run: Any) -> str:
    return str(getattr(run, "optimizer", None) or "MIPROv2")


def _latest_phase_event(run: Any) -> dict[str, Any]:
    for event in reversed(list(getattr(run, "events", []) or [])):
        if event.get("kind") == "phase":
            return event
    return {}


def _latest_phase(run: Any) -> str | None:
    return _latest_phase_event(run).get("phase")


def _view_points(run: Any) -> list[TrialPoint]:
    """Another optimizer's score chart, from its view's ``chart_points``."""
    points = optimizer_views.chart_points(run) or []
    return [
        TrialPoint(
            number=int(p["number"]),
            eval=str(p.get("eval", "full")),
            score=float(p["score"]),
            best_score=p.get("best_score"),
        )
        for p in points
    ]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


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
        # Another optimizer's phases: one bar for its current phase (MIPROv2's three above
        # are hidden for it), and the rows its view makes of its progress events.
        self.other_bar = widgets.IntProgress(value=0, min=0, max=1, description="progress")
        self.other_label = widgets.Label(value="")
        self.items = widgets.HTML()
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
        # The cancelled line below is the one place a cancel is reported.
        self.controls = CheckpointControls(
            run,
            on_change=self._redraw.request,
            announce_cancel=False,
            trial_of=self._trial_after,
        )
        self.controls.on_resumed(self.follow)
        self.bars = [widgets.HBox([self.phase_bars[n], self.phase_labels[n]]) for n in PHASES]
        self.other = widgets.HBox([self.other_bar, self.other_label])
        super().__init__(
            [
                self.header,
                *self.bars,
                self.other,
                self.items,
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
        self.controls.relist()  # its labels count trials as the events replayed say
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
        self.controls.relist()

    def _draw(self) -> None:
        run = self.run
        self._load_prior_trials()
        if run.done and run.status == "failed" and self.progress.error is None:
            self.progress.note_failure(first_line(str(run.error or "the run failed")))
        state = self.progress.copy()
        status = run.status if run.done else state.status
        self.header.value = self._header_html(run, state, status)
        mipro = _optimizer(run) == "MIPROv2"
        for bar in self.bars:
            bar.layout.display = None if mipro else "none"
        self.other.layout.display = "none" if mipro else None
        if mipro:
            for name in PHASES:
                self._draw_phase(name, state)
        else:
            self._draw_other_phase(run, state)
        self.items.value = self._items_html(run)
        eta = state.eta_seconds()
        self.eta.value = f"<b>ETA</b> {format_duration(eta)}" if eta is not None else "<b>ETA</b> -"
        self.chart.value = score_chart_svg(state.trials if mipro else _view_points(run))
        self.candidates.value = self._candidates_html(state, predictor_names(run)) if mipro else ""
        self.usage.value = self._usage_html(state.usage, state.budget)
        self.notice.value = self._notice_html(state)
        self.error.value = self._error_html(state, run)
        self.controls.refresh()

    def _header_html(self, run: Any, state: RunProgress, status: str) -> str:
        pool = getattr(getattr(run, "session", None), "pool_name", "")
        best = state.best_score
        colour = {"completed": SUCCESS, "failed": ERROR, "cancelled": WARNING}.get(status, BRAND)
        phase = "done" if status == "completed" else state.phase or "-"
        if _optimizer(run) != "MIPROv2":
            best = getattr(run, "metrics", {}).get("best_score", best)
            phase = "done" if status == "completed" else _latest_phase(run) or "-"
        parts = [
            f"<b>{escape(_optimizer(run))} run {escape(str(run.run_id))}</b>",
            f"pool {escape(pool)}" if pool else "",
            f'status <b style="color:{TEXT};border-bottom:2px solid {colour}">{escape(status)}</b>',
            f"phase {escape(phase)}",
            f"trials {self._trials_done(run, state)}" if _optimizer(run) == "MIPROv2" else "",
            f"best {format_score(best)}" if isinstance(best, int | float) else "best -",
        ]
        return (
            f'<div class="dspex-run-header" style="color:{TEXT}">'
            + " · ".join(p for p in parts if p)
            + "</div>"
        )

    def _draw_other_phase(self, run: Any, state: RunProgress) -> None:
        """Another optimizer's newest phase event: "iteration 3/10" (or its name)."""
        phase = _latest_phase_event(run)
        total = phase.get("total")
        step = int(phase.get("step") or 0)
        done = run.done and run.status == "completed"
        self.other_bar.max = max(int(total or 1), 1)
        self.other_bar.value = self.other_bar.max if done else min(step, self.other_bar.max)
        self.other_bar.bar_style = "success" if done else ""
        name = phase.get("phase")
        if not name:
            self.other_label.value = "not started"
        elif total:
            self.other_label.value = f"{name} {step}/{total}"
        else:
            self.other_label.value = str(name)

    @staticmethod
    def _items_html(run: Any) -> str:
        """The optimizer's own figures (its view's progress items), as a two-column table."""
        items = optimizer_views.progress_items(run)
        if not items:
            return ""
        rows = "".join(
            f"<tr><td><b>{escape(label)}</b></td><td>{escape(text)}</td></tr>"
            for label, text in items
        )
        return f'<table class="dspex-progress-items" style="color:{TEXT}">{rows}</table>'

    def _trial_after(self, evaluations: int) -> int:
        """The trial count after a snapshot's first ``evaluations`` evaluations."""
        state = self.progress.copy()
        state.trials = [t for t in state.trials if t.number <= evaluations]
        if evaluations and (not state.trials or state.trials[-1].number < evaluations):
            return evaluations  # trials this dashboard never saw: the raw count
        return self._trials_done(self.run, state)

    @staticmethod
    def _trials_done(run: Any, state: RunProgress) -> int:
        """Trials as ``num_trials`` counts them: minibatch trials (or, without minibatches,
        the evaluations after the baseline's)."""
        minibatches, full = state.evaluation_counts()
        _, minibatch = search_plan(run)
        return minibatches if minibatch else max(0, full - 1)

    def _draw_phase(self, name: str, state: RunProgress) -> None:
        progress, bar, label = state.phases[name], self.phase_bars[name], self.phase_labels[name]
        total = progress.total or 0
        bar.max = max(total, 1)
        bar.value = min(progress.step, bar.max) if total else (1 if progress.done else 0)
        bar.bar_style = "success" if progress.done or state.status == "completed" else ""
        if name == "search":
            self._draw_search(progress, bar, label, state)
        elif name == "propose":
            if progress.done or state.candidates:
                label.value = f"{len(state.candidates)} candidate instructions"
            else:
                label.value = "proposing…" if state.phase == "propose" else "not started"
        else:
            label.value = f"{progress.step}/{total} demo sets" if total else "not started"

    def _draw_search(self, progress: Any, bar: Any, label: Any, state: RunProgress) -> None:
        """ "trial 8/8 · 3 full evaluations": the count ``num_trials`` sets, and what the
        full evaluations (the baseline's and every few trials) add to it."""
        num_trials, _ = search_plan(self.run)
        if num_trials is None:  # a handle without its spec: the runtime's evaluation steps
            total = progress.total or 0
            bar.max = max(total, 1)
            label.value = f"evaluation {progress.step}/{total}" if total else "not started"
            return
        done = self._trials_done(self.run, state)
        _, full = state.evaluation_counts()
        bar.max = max(num_trials, 1)
        bar.value = min(done, bar.max)
        if not state.trials and state.phase != "search":
            label.value = "not started"
        else:
            label.value = f"trial {done}/{num_trials} · {_plural(full, 'full evaluation')}"

    @staticmethod
    def _candidates_html(state: RunProgress, names: list[str]) -> str:
        rows = []
        best = state.best_params()
        for row in state.candidate_rows():
            text = row["instruction"]
            short = text if len(text) <= INSTRUCTION_PREVIEW else text[:INSTRUCTION_PREVIEW] + "…"
            chosen = best.get(f"{row['predictor']}_predictor_instruction") == row["index"]
            mark = (
                f'<b style="color:{TEXT};border-bottom:2px solid {SUCCESS}">★ best</b> '
                if chosen
                else ""
            )
            cell = Raw(f'{mark}<span title="{escape(text)}">{escape(short)}</span>')
            rows.append(
                [
                    predictor_label(names, row["predictor"]),
                    row["index"],
                    cell,
                    row["trials"],
                    format_score(row["mean_score"]) if row["trials"] else None,
                    format_score(row["best_full_score"])
                    if row["best_full_score"] is not None
                    else None,
                ]
            )
        if not rows:
            return "<i>candidate instructions appear once they are proposed</i>"
        headers = ["predictor", "#", "instruction", "trials", "mean score", "best full score"]
        table = html_table(headers, rows, css_class="dspex-candidates")
        return table + RunDashboard._best_program_html(best, names)

    @staticmethod
    def _best_program_html(best: dict[str, int], names: list[str]) -> str:
        """ "best program: predict: instruction #2, demo set #3" (the winning choices)."""
        chosen = []
        for key in sorted(k for k in best if k.endswith("_predictor_instruction")):
            index = int(key.split("_", 1)[0])
            demos = best.get(f"{index}_predictor_demos")
            sets = f", demo set #{demos}" if demos is not None else ""
            chosen.append(f"{predictor_label(names, index)}: instruction #{best[key]}{sets}")
        if not chosen:
            return ""
        return (
            f'<div class="dspex-best-program" style="color:{TEXT}"><b>best program</b> '
            f"{escape('; '.join(chosen))}</div>"
        )

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
            f'<div class="dspex-usage" style="color:{TEXT}"><b>LM calls</b> {calls:,} sent, '
            f"{cached:,} from the cache · {total:,} tokens ({prompt:,} prompt, "
            f"{completion:,} completion) · <b>cost</b> ${cost:.4f}{limits}</div>"
        )

    @staticmethod
    def _notice_html(state: RunProgress) -> str:
        lines = []
        if state.waiting is not None and state.status not in FINISHED:
            text = escape(waiting_line(state.waiting))
            lines.append(f'<div class="dspex-waiting" style="{NOTICE_STYLE}">{text}</div>')
        for warning in map(escape, state.warnings):
            lines.append(f'<div class="dspex-warning" style="{NOTICE_STYLE}">{warning}</div>')
        return "".join(lines)

    def _error_html(self, state: RunProgress, run: Any) -> str:
        error = state.error
        if state.status == "cancelled" or (run.done and run.status == "cancelled"):
            where = Path(state.cancelled_checkpoint).name if state.cancelled_checkpoint else ""
            if _optimizer(run) == "MIPROv2":
                at = f"trial {self._trials_done(run, state)}"
            else:
                at = escape(_latest_phase(run) or "the start")
            return (
                f'<div class="dspex-cancelled" style="color:{TEXT}">cancelled at {at}; '
                f"resumable checkpoint: {escape(where or 'its newest checkpoint')}</div>"
            )
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
            f'<div class="dspex-error" style="color:{ERROR}"><b>error</b> {escape(title)}'
            f"{suffix}</div>{details}"
        )


__all__ = ["FINISHED", "RunDashboard", "dashboard_for", "display_run"]
