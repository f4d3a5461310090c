"""What a run's dashboard shows, folded from the run's events: no widgets, no I/O.

Event kinds and fields are those of ``dspex_jupyter.runtime.runs`` ("status", "phase",
"progress", "checkpoint", "complete", "cancelled", "error", "resumed", "waiting",
"recovery", "warning", "budget") and of MIPROv2's adapter ("candidate", "trial"); other
optimizers' "progress" events are read by their views (``notebook/optimizer_views``).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any

PHASES = ("bootstrap", "propose", "search")
FINISHED = ("completed", "cancelled", "failed")
# (budget name, usage key, how to show an amount)
BUDGETS = (
    ("max_calls", "calls", lambda v: f"{int(v):,}"),
    ("max_tokens", "total_tokens", lambda v: f"{int(v):,}"),
    ("max_cost", "cost", lambda v: f"${float(v):.4f}"),
)


def waiting_line(event: dict[str, Any]) -> str:
    """The line "waiting for the LM: connection refused, next try in 8 s" of an event."""
    reason = " ".join(str(event.get("reason") or event.get("lm_failure") or "").split())
    if len(reason) > 90:
        reason = reason[:89] + "…"
    delay = float(event.get("next_try_in") or 0)
    return f"waiting for the LM: {reason or 'no answer'}, next try in {delay:.0f} s"


def budget_lines(usage: dict[str, Any], budget: dict[str, Any] | None) -> list[str]:
    """Usage against each budget the run has: "calls 120 / 500" and the like."""
    lines = []
    for name, key, show in BUDGETS:
        if budget and budget.get(name) is not None:
            used = usage.get(key) or 0
            lines.append(f"{key.replace('total_', '')} {show(used)} / {show(budget[name])}")
    return lines


@dataclass(frozen=True)
class TrialPoint:
    """One evaluated configuration: a minibatch or a full evaluation."""

    number: int
    eval: str  # "minibatch" or "full"
    score: float
    best_score: float | None
    params: dict[str, int] = field(default_factory=dict)
    time: float | None = None


@dataclass
class PhaseProgress:
    step: int = 0
    total: int | None = None
    done: bool = False


def trials_from_snapshot(body: dict[str, Any]) -> list[TrialPoint]:
    """The trials a checkpoint snapshot holds, numbered as the run's trial events are."""
    points: list[TrialPoint] = []
    best: float | None = None
    for number, trial in enumerate((body.get("search") or {}).get("trials", []), start=1):
        score = float(trial["value"])
        kind = trial.get("kind", "full")
        if kind == "full" and (best is None or score > best):
            best = score
        points.append(TrialPoint(number, kind, score, best, dict(trial.get("params") or {})))
    return points


class RunProgress:
    """A run's state for display; ``apply(event)`` may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.status = "starting"
        self.phase: str | None = None
        self.phases = {name: PhaseProgress() for name in PHASES}
        self.trials: list[TrialPoint] = []
        self.candidates: dict[tuple[int, int], str] = {}
        self.usage: dict[str, Any] = {}
        self.best_score: float | None = None
        self.error: dict[str, Any] | None = None
        self.last_checkpoint: dict[str, Any] | None = None
        self.cancelled_checkpoint: str | None = None
        self.budget: dict[str, Any] | None = None
        self.waiting: dict[str, Any] | None = None  # the LM is down: the last waiting event
        self.warnings: list[str] = []
        self.events_seen = 0
        # Trial times since the run (re)started in its current kernel, for the ETA.
        self._timed: list[tuple[int, float]] = []

    # ---- folding events ---------------------------------------------------------
    def apply(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events_seen += 1
            handler = getattr(self, f"_on_{event.get('kind')}", None)
            if handler is not None:
                handler(event)

    def add_prior_trials(self, points: list[TrialPoint]) -> None:
        """Trials from before a resume (read from the snapshot it resumed from)."""
        with self._lock:
            known = {t.number for t in self.trials}
            merged = [p for p in points if p.number not in known] + self.trials
            self.trials = sorted(merged, key=lambda t: t.number)
            if self.trials and self.best_score is None:
                self.best_score = self.trials[-1].best_score

    def _on_status(self, event: dict[str, Any]) -> None:
        if self.status not in FINISHED:
            self.status = event.get("status", self.status)
        if event.get("budget"):
            self.budget = dict(event["budget"])

    def _on_waiting(self, event: dict[str, Any]) -> None:
        self.waiting = dict(event)

    def _on_recovery(self, event: dict[str, Any]) -> None:
        if event.get("action") == "lm_back":
            self.waiting = None

    def _on_warning(self, event: dict[str, Any]) -> None:
        message = str(event.get("message") or "")
        if message and message not in self.warnings:
            self.warnings.append(message)

    def _on_budget(self, event: dict[str, Any]) -> None:
        if self.budget is None:
            self.budget = {event.get("limit"): event.get("budget")}

    def _on_phase(self, event: dict[str, Any]) -> None:
        name = event.get("phase")
        if name not in self.phases:
            return
        self.phase = name
        for earlier in PHASES[: PHASES.index(name)]:
            progress = self.phases[earlier]
            progress.done = True
            if progress.total is not None:
                progress.step = progress.total
        progress = self.phases[name]
        progress.step = int(event.get("step") or 0)
        if event.get("total") is not None:
            progress.total = int(event["total"])
        if self.status == "starting":
            self.status = "running"

    def _on_candidate(self, event: dict[str, Any]) -> None:
        self.candidates[(int(event["predictor"]), int(event["index"]))] = str(event["instruction"])
        propose = self.phases["propose"]
        if propose.total is not None:
            propose.step = min(propose.total, max(propose.step, int(event["index"]) + 1))

    def _on_trial(self, event: dict[str, Any]) -> None:
        self.waiting = None  # a trial finished: the LM answers
        point = TrialPoint(
            number=int(event["number"]),
            eval=str(event.get("eval", "minibatch")),
            score=float(event["score"]),
            best_score=event.get("best_score"),
            params=dict(event.get("params") or {}),
            time=event.get("time"),
        )
        if self.trials and self.trials[-1].number >= point.number:  # seen again (resume)
            self.trials = [t for t in self.trials if t.number != point.number] + [point]
            self.trials.sort(key=lambda t: t.number)
        else:
            self.trials.append(point)
        self.best_score = point.best_score
        if event.get("usage"):
            self.usage = dict(event["usage"])
        search = self.phases["search"]
        search.step = max(search.step, point.number)
        if point.time is not None:
            self._timed.append((point.number, float(point.time)))

    def _on_checkpoint(self, event: dict[str, Any]) -> None:
        self.last_checkpoint = {k: event.get(k) for k in ("path", "phase", "reason", "trial")}

    def _on_complete(self, event: dict[str, Any]) -> None:
        self.status = "completed"
        self.waiting = None
        self.best_score = event.get("best_score", self.best_score)
        if event.get("usage"):
            self.usage = dict(event["usage"])
        for progress in self.phases.values():
            progress.done = True
            if progress.total is not None:
                progress.step = progress.total

    def _on_cancelled(self, event: dict[str, Any]) -> None:
        self.status = "cancelled"
        self.waiting = None
        self.cancelled_checkpoint = event.get("checkpoint")
        if event.get("usage"):
            self.usage = dict(event["usage"])

    def _on_error(self, event: dict[str, Any]) -> None:
        self.status = "failed"
        self.waiting = None
        if event.get("usage"):
            self.usage = dict(event["usage"])
        self.error = {
            "type": event.get("error_type", "Error"),
            "message": event.get("message", ""),
            "traceback": "".join(event.get("traceback") or []),
            "infrastructure": bool(event.get("infrastructure")),
            "resumable": bool(event.get("resumable")),
        }

    def _on_resumed(self, event: dict[str, Any]) -> None:
        self.status = "running"
        self.error = None
        self.cancelled_checkpoint = None
        # Trials after the snapshot are evaluated again; their old points go.
        kept = int(event.get("trial") or 0)
        self.trials = [t for t in self.trials if t.number <= kept]
        self._timed = []

    def note_failure(self, message: str) -> None:
        """The run ended without an error event (its kernel died, its stream broke)."""
        with self._lock:
            if self.status not in FINISHED or self.error is None:
                self.status = "failed"
                self.error = {
                    "type": "",
                    "message": message,
                    "traceback": "",
                    "infrastructure": True,
                    "resumable": True,
                }

    # ---- derived values ---------------------------------------------------------
    def copy(self) -> RunProgress:
        """A consistent copy to render from while events keep arriving."""
        with self._lock:
            state = dict(vars(self))
            state.update(
                _lock=threading.Lock(),
                _timed=list(self._timed),
                phases={k: copy.copy(v) for k, v in self.phases.items()},
                trials=list(self.trials),
                candidates=dict(self.candidates),
                usage=dict(self.usage),
                warnings=list(self.warnings),
            )
        clone = RunProgress.__new__(RunProgress)
        vars(clone).update(state)
        return clone

    def eta_seconds(self) -> float | None:
        """Seconds left in the search, from the pace of the trials seen so far."""
        search = self.phases["search"]
        if self.status in FINISHED or search.total is None or len(self._timed) < 2:
            return None
        (first_n, first_t), (last_n, last_t) = self._timed[0], self._timed[-1]
        if last_n <= first_n:
            return None
        per_trial = (last_t - first_t) / (last_n - first_n)
        return max(0.0, per_trial * (search.total - last_n))

    def evaluation_counts(self) -> tuple[int, int]:
        """(minibatch trials, full evaluations) seen: MIPROv2's ``num_trials`` counts the
        minibatch trials; the full evaluations (the baseline's among them) come on top."""
        full = sum(1 for t in self.trials if t.eval == "full")
        return len(self.trials) - full, full

    def best_params(self) -> dict[str, int]:
        """The parameters of the best full evaluation (the program the run returns)."""
        best: TrialPoint | None = None
        for trial in self.trials:
            if trial.eval == "full" and (best is None or trial.score > best.score):
                best = trial
        return dict(best.params) if best is not None else {}

    def candidate_rows(self) -> list[dict[str, Any]]:
        """Each proposed instruction with the trials that used it and their scores."""
        rows = []
        for (predictor, index), text in sorted(self.candidates.items()):
            key = f"{predictor}_predictor_instruction"
            scores = [t.score for t in self.trials if t.params.get(key) == index]
            full = [t.score for t in self.trials if t.params.get(key) == index and t.eval == "full"]
            rows.append(
                {
                    "predictor": predictor,
                    "index": index,
                    "instruction": text,
                    "trials": len(scores),
                    "mean_score": sum(scores) / len(scores) if scores else None,
                    "best_full_score": max(full) if full else None,
                }
            )
        return rows
