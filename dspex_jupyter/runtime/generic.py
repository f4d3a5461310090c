"""Any other ``Teleprompter`` under the run machinery: the generic adapter.

A teleprompter without an adapter of its own (a user's subclass of ``Teleprompter``,
KNNFewShot, LabeledFewShot, BootstrapFewShot, BetterTogether, ...) runs as it is, with
what the machinery gives every run: events (started, metric calls and evaluations as
progress, complete), LM usage, cancel (at its next metric call, or by the notebook
killing the kernel when nothing is called), budgets (stopped at the first metric call
past one) and its result. There is nothing to go on from inside its ``compile``, so a
resume starts it over (usage keeps counting from where the run stopped).
"""

from __future__ import annotations

import threading
from typing import Any

from dspy.utils.callback import BaseCallback

from .runs import OptimizerAdapter, RunContext


class _EvaluationCounter(BaseCallback):
    """Counts ``dspy.Evaluate`` calls and keeps the best score one returned, so a run of
    an optimizer dspex knows nothing about still shows how far it got."""

    def __init__(self, run: RunContext) -> None:
        self.run = run
        self.evaluations = 0
        self.best_score: float | None = None
        self._lock = threading.Lock()

    def on_evaluate_end(self, call_id: str, outputs: Any, exception: BaseException | None = None):
        if exception is not None:
            return
        score = getattr(outputs, "score", outputs)
        with self._lock:
            self.evaluations += 1
            if isinstance(score, int | float) and (
                self.best_score is None or score > self.best_score
            ):
                self.best_score = float(score)
            figures = {"evaluations": self.evaluations, "best_score": self.best_score}
        self.run.progress(metric_calls=self.run.metric_calls, **figures)


class GenericAdapter(OptimizerAdapter):
    """Runs the user's teleprompter unchanged; resume means restart."""

    name = "Teleprompter"
    resume = "restart"

    def make_optimizer(self, teleprompter: Any, run: RunContext) -> Any:
        run.name = type(teleprompter).__name__  # events and the dashboard say which
        return super().make_optimizer(teleprompter, run)

    def compile(self, optimizer: Any, student: Any, run: RunContext, **kwargs: Any) -> Any:
        import dspy

        counter = _EvaluationCounter(run)
        run.counter = counter  # type: ignore[attr-defined]
        run.phase("compile", 0, None)
        with dspy.context(callbacks=[*dspy.settings.callbacks, counter]):
            program = super().compile(optimizer, student, run, **kwargs)
        run.progress(
            metric_calls=run.metric_calls,
            evaluations=counter.evaluations,
            best_score=counter.best_score,
        )
        return program

    def summary(self, optimizer: Any, program: Any, run: RunContext) -> dict[str, Any]:
        score = getattr(program, "score", None)
        if not isinstance(score, int | float):
            score = getattr(getattr(run, "counter", None), "best_score", None)
        return {"best_score": score, "evaluations": getattr(run.counter, "evaluations", 0)}


ADAPTER = GenericAdapter()
