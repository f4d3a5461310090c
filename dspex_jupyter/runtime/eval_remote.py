"""Evaluations of a run spread over another pool (``dspex.compile(..., eval_pool=...)``).

Every optimizer that scores candidates through ``dspy.Evaluate`` (MIPROv2's minibatch and
full evaluations, BootstrapFewShotWithRandomSearch's candidate seeds, COPRO's candidates)
gets this through one seam: while a run with an eval pool runs, ``Evaluate.__call__``
(for that run's DSPy context only, so threads the optimizer starts keep it) asks the
notebook to evaluate instead. It emits an ``eval_request`` event on the run's stream (the
candidate's ``dump_state()``, the examples by their index in the run's data) and waits
for ``eval_answer``: per example the score, the prediction's fields, or the error; and
the LM usage the eval kernels spent, added here to the run's tracker, once. The result is
the ``EvaluationResult`` DSPy would have built, so the search goes on unchanged.

Only an evaluation of the run's own program class with the run's own metric goes out: an
optimizer's private metric (GEPA's feedback adapter, which needs traces) or a wrapped
program stays in this kernel. An example whose LM failed is the run's outage (noted, so
the adapter waits and redoes the evaluation), never a score.

Imported only by a run that has an eval pool (it imports DSPy).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import threading
from collections.abc import Iterator
from typing import Any

import dspy
from dspy.evaluate.evaluate import Evaluate, EvaluationResult
from dspy.utils.callback import with_callbacks

from ..checkpoint import example_to_json

logger = logging.getLogger("dspex_jupyter.eval")

# The dspy.context key that carries the run's evaluator (propagated to DSPy's threads).
CONTEXT_KEY = "dspex_remote_evaluator"
# How often a waiting evaluation looks at the run's cancel flag.
CANCEL_CHECK_S = 0.25
# Parallelizer's own message when it stops on too many errors (DSPy 3.4.1).
TOO_MANY_ERRORS = "Execution cancelled due to errors or interruption."

_ANSWERS: dict[tuple[str, int], dict[str, Any]] = {}
_ANSWERED = threading.Condition()
_patch_lock = threading.Lock()


class EvalPoolUnavailable(Exception):
    """The notebook could not evaluate on the eval pool (every kernel died or failed).
    An infrastructure error: the run stops resumably (DSPy's ``eval_candidate_program``
    would score an exception 0.0, so it is noted on the run before it is raised)."""

    infrastructure = True
    lm_failure_kind = None


class RemoteExampleFailure(Exception):
    """An infrastructure error an eval kernel met on one example (the LM down, out of
    memory): carries its kind so the run's outage policy treats it as its own."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message") or error.get("type") or "remote failure")
        self.remote = error
        self.lm_failure_kind: str | None = error.get("lm_failure")
        self.infrastructure = True
        self.details: dict[str, Any] = dict(error.get("details") or {})


def answer(run_id: str, request: int, payload: dict[str, Any]) -> dict[str, Any]:
    """The ``eval_answer`` op: the notebook's answer to one ``eval_request``."""
    from .runs import RUNS

    rec = RUNS.get(run_id)
    if rec is None or rec.finished:  # cancelled while it waited: nobody will read it
        return {"delivered": False}
    with _ANSWERED:
        _ANSWERS[(run_id, int(request))] = payload
        _ANSWERED.notify_all()
    return {"delivered": True}


def _install_patch() -> None:
    """Wrap ``Evaluate.__call__`` once per kernel; DSPy's callbacks still see the call
    (``with_callbacks``), so the generic adapter's evaluation count is unchanged."""
    with _patch_lock:
        current = Evaluate.__call__
        if getattr(current, "_dspex_remote", False):
            return
        inner = getattr(current, "__wrapped__", current)

        def call(  # DSPy 3.4.1's parameters: callbacks read them by name
            self: Evaluate,
            program: Any,
            metric: Any = None,
            devset: Any = None,
            num_threads: int | None = None,
            display_progress: bool | None = None,
            display_table: bool | int | None = None,
            callback_metadata: dict[str, Any] | None = None,
            save_as_csv: str | None = None,
            save_as_json: str | None = None,
        ) -> EvaluationResult:
            kw = {
                "num_threads": num_threads,
                "display_progress": display_progress,
                "display_table": display_table,
                "callback_metadata": callback_metadata,
                "save_as_csv": save_as_csv,
                "save_as_json": save_as_json,
            }
            evaluator = dspy.settings.get(CONTEXT_KEY)
            if evaluator is not None:
                remote = evaluator.evaluate(self, program, metric, devset, kw)
                if remote is not None:
                    return remote
            return inner(self, program, metric=metric, devset=devset, **kw)

        patched = with_callbacks(call)
        patched._dspex_remote = True  # type: ignore[attr-defined]
        Evaluate.__call__ = patched  # type: ignore[method-assign]


class RemoteEvaluator:
    """One run's side of remote evaluation: what may go out, the request, the answer."""

    def __init__(
        self,
        rec: Any,
        run: Any,
        student: Any,
        metric: Any,
        trainset: list[Any],
        valset: list[Any] | None,
    ) -> None:
        self.rec = rec
        self.run = run
        self.program_class = type(student)
        self.metric = metric
        # Examples go out as their index in the run's data (kept alive here, so an id
        # cannot be reused), any other example as JSON.
        self._data = (trainset, valset or [])
        self._refs: dict[int, list[Any]] = {}
        for name, examples in zip(("trainset", "valset"), self._data, strict=True):
            for i, example in enumerate(examples):
                self._refs.setdefault(id(example), [name, i])
        self._numbers = itertools.count(1)
        self.requests = 0

    # ---- what goes out ---------------------------------------------------------------
    def _candidate(self, program: Any) -> Any:
        from .runs import _WatchedProgram

        return program.program if isinstance(program, _WatchedProgram) else program

    def accepts(self, program: Any, metric: Any) -> bool:
        candidate = self._candidate(program)
        if type(candidate) is not self.program_class or self.metric is None:
            return False
        if inspect.unwrap(metric) is not self.metric:  # an optimizer's own metric
            return False
        # A predictor with an LM of its own would need that LM shipped: evaluate here.
        return all(getattr(p, "lm", None) is None for p in candidate.predictors())

    def _example_ref(self, example: Any) -> Any:
        ref = self._refs.get(id(example))
        return ref if ref is not None else ["json", example_to_json(example)]

    # ---- one evaluation ---------------------------------------------------------------
    def evaluate(
        self, evaluate: Evaluate, program: Any, metric: Any, devset: Any, kw: dict[str, Any]
    ) -> EvaluationResult | None:
        metric = metric if metric is not None else evaluate.metric
        devset = devset if devset is not None else evaluate.devset
        local_only = ("display_table", "save_as_csv", "save_as_json")
        if (
            not devset
            or any(kw.get(k) or getattr(evaluate, k, None) for k in local_only)
            or not self.accepts(program, metric)
        ):
            return None  # DSPy's own path, in this kernel
        if self.rec.cancel_requested.is_set():
            from .runs import _StopRun

            raise _StopRun("cancelled")
        number = next(self._numbers)
        self.requests += 1
        num_threads = kw.get("num_threads") or evaluate.num_threads or dspy.settings.num_threads
        self.rec.emit(
            "eval_request",
            request=number,
            program_state=self._candidate(program).dump_state(),
            examples=[self._example_ref(e) for e in devset],
            num_threads=int(num_threads or 1),
        )
        payload = self._wait(number)
        return self._result(evaluate, devset, payload)

    def _wait(self, number: int) -> dict[str, Any]:
        key = (self.rec.run_id, number)
        with _ANSWERED:
            while key not in _ANSWERS:
                if self.rec.cancel_requested.is_set():
                    from .runs import _StopRun

                    raise _StopRun("cancelled")
                _ANSWERED.wait(CANCEL_CHECK_S)
            return _ANSWERS.pop(key)

    def _result(self, evaluate: Evaluate, devset: list[Any], payload: dict[str, Any]):
        if payload.get("failed"):
            error = EvalPoolUnavailable(payload["failed"])
            self.rec.note_infrastructure_error(error)
            raise error
        self._add_usage(payload)
        for _ in range(int(payload.get("metric_calls") or 0)):
            self.run.count_metric_call()
        max_errors = evaluate.max_errors
        max_errors = dspy.settings.max_errors if max_errors is None else max_errors
        results, errors = [], 0
        for example, entry in zip(devset, payload["results"], strict=True):
            error = entry.get("error")
            if error is None:
                prediction = dspy.Prediction(**entry["prediction"])
                results.append((example, prediction, _score_from_json(entry["score"])))
                continue
            errors += 1
            if error.get("infrastructure"):
                self.rec.note_infrastructure_error(RemoteExampleFailure(error))
            logger.error(f"Error for {example}: {error.get('type')}: {error.get('message')}")
            results.append((example, dspy.Prediction(), evaluate.failure_score))
        if errors >= max_errors:
            logger.warning(TOO_MANY_ERRORS)
            raise Exception(TOO_MANY_ERRORS)  # what DSPy's ParallelExecutor raises
        total = sum(score for *_, score in results)
        logger.info(
            f"Average Metric: {total} / {len(devset)} ({round(100 * total / len(devset), 1)}%)"
        )
        return EvaluationResult(score=round(100 * total / len(devset), 2), results=results)

    def _add_usage(self, payload: dict[str, Any]) -> None:
        """The eval kernels' LM usage, into this run's tracker: counted once, here."""
        tracker = dspy.settings.usage_tracker
        if tracker is None:
            return
        for lm, entry in payload.get("usage") or []:
            tracker.add_usage(lm, entry)
        add_hit = getattr(tracker, "add_cache_hit", None)
        for _ in range(int(payload.get("cached_calls") or 0) if add_hit else 0):
            add_hit()


def _score_from_json(score: Any) -> Any:
    if isinstance(score, dict) and "prediction" in score:  # a feedback metric's Prediction
        return dspy.Prediction(**score["prediction"])
    return score


@contextlib.contextmanager
def remote_evaluation(evaluator: RemoteEvaluator) -> Iterator[None]:
    """Within: the run's ``dspy.Evaluate`` calls go to the eval pool."""
    _install_patch()
    with dspy.context(**{CONTEXT_KEY: evaluator}):
        yield
