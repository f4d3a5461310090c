"""DSPy's MIPROv2 inside a pool kernel: checkpointed after every step, resumed exactly.

Imported only when a run starts (it imports DSPy and Optuna). The search loop of
``MIPROv2._optimize_prompt_parameters`` is re-written here step for step (same RNG draws,
same Optuna calls in the same order) so that it can checkpoint after every trial and pick
up from any checkpoint; upstream's loop lives in a closure that cannot be resumed. The
fidelity test compares this loop with upstream's ``compile`` trial by trial.

What a checkpoint needs for an exact resume (see shared notes): the demo and instruction
candidates, the optimizer's ``random.Random`` state after each step, the Optuna trials and
the TPE sampler's RNG states, and the loop's bookkeeping, rebuilt from the trials.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import queue
import re
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dspy
from dspy.teleprompt import MIPROv2
from dspy.teleprompt.mipro_optimizer_v2 import _import_optuna
from dspy.teleprompt.utils import eval_candidate_program, get_program_with_highest_avg_score
from dspy.utils.callback import BaseCallback
from dspy.utils.usage_tracker import UsageTracker

from ..checkpoint import (
    UNTRUSTED_HINT,
    CheckpointDir,
    CheckpointError,
    ForbiddenReferenceError,
    UntrustedCheckpointError,
    body_sha256,
    example_to_json,
    import_reference,
    make_durable,
    module_allowed,
    read_json_checked,
    scrub_secrets,
    trusted_module_roots,
    write_json_atomic,
)
from ..core.errors import InvalidLM
from .dspy_support import check_dspy_version
from .ops import resolve_callable
from .run_output import RunLog, routed_to
from .sources import attach_sources

logger = logging.getLogger("dspex_jupyter.mipro")

# Errors that are not the program's fault: a trial that meets one is abandoned, never
# scored 0.0 (upstream would count it as a failed example and carry on).
INFRASTRUCTURE_ERRORS = (
    ("torch", "OutOfMemoryError"),
    ("torch.cuda", "OutOfMemoryError"),
    ("builtins", "MemoryError"),
    ("builtins", "ModuleNotFoundError"),
)
_BOOTSTRAP_LINE = re.compile(r"Bootstrapping set (\d+)/(\d+)")


# LM failures worth waiting for: the LM may come back. A wrong key or model never does.
WAITABLE_LM_FAILURES = ("unavailable", "timeout", "rate_limited")
# How many finished runs a kernel keeps (their events and result) for a late client.
KEEP_FINISHED_RUNS = 3


class OptimizationDiverged(Exception):
    """Every recent trial scored zero: stop and suggest another configuration."""


class BudgetExceeded(Exception):
    """The next trial would pass the run's budget (calls, tokens or cost): stop, resumably."""


class RunCancelled(Exception):
    """Raised when the client asked to cancel: at a safe point between steps (``clean``,
    a snapshot of that moment is exact) or inside a step (the last snapshot is the one)."""

    def __init__(self, clean: bool = True) -> None:
        super().__init__("cancelled")
        self.clean = clean


class _ExampleCancelled(Exception):
    """Ends one example early once a cancel came in (the evaluation then stops)."""


class TrialAbandoned(Exception):
    """An infrastructure error hit an evaluation or a step: stop, resumably, never a score."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


def is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def clear_gpu_cache() -> dict[str, Any]:
    """What the ``clear_gpu_cache`` op does, for the run's own thread."""
    from .ops import clear_gpu_cache as op

    return op(None)


def lm_failure_kind(exc: BaseException) -> str | None:
    """The LM provider's failure ("auth", "unavailable", "timeout", ...; see
    ``lm_failures``), or None when the exception is the program's own."""
    from .lm_failures import lm_failure

    return lm_failure(exc)


def is_infrastructure_error(exc: BaseException) -> bool:
    for cls in type(exc).__mro__:
        if (cls.__module__, cls.__name__) in INFRASTRUCTURE_ERRORS:
            return True
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return True
    return lm_failure_kind(exc) is not None


# ---- JSON forms of DSPy objects ------------------------------------------------------
def example_from_json(data: dict[str, Any]) -> Any:
    example = dspy.Example(**data["data"])
    return example.with_inputs(*data["inputs"]) if data.get("inputs") else example


def rng_state_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def rng_state_from_json(data: list[Any]) -> tuple[Any, ...]:
    return (data[0], tuple(data[1]), data[2])


def numpy_rng_to_json(rng: Any) -> list[Any]:
    name, keys, pos, has_gauss, gauss = rng.get_state()
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)]


def numpy_rng_from_json(rng: Any, data: list[Any]) -> None:
    import numpy as np

    rng.set_state((data[0], np.array(data[1], dtype=np.uint32), data[2], data[3], data[4]))


def demos_to_json(demo_candidates: Any) -> Any:
    if demo_candidates is None:
        return None
    return {
        str(i): [[example_to_json(d) for d in demo_set] for demo_set in sets]
        for i, sets in demo_candidates.items()
    }


def demos_from_json(data: Any) -> Any:
    if data is None:
        return None
    return {
        int(i): [[example_from_json(d) for d in demo_set] for demo_set in sets]
        for i, sets in data.items()
    }


def instructions_from_json(data: dict[str, list[str]]) -> dict[int, list[str]]:
    return {int(i): list(v) for i, v in data.items()}


# ---- usage that stays right under threads --------------------------------------------
class SharedUsageTracker(UsageTracker):
    """DSPy's ParallelExecutor deep-copies the usage tracker into every worker thread and
    drops the copies (why ``track_usage`` undercounts with ``num_threads > 1``); this one
    is shared on purpose, locked, and keeps running totals (read after every trial).
    ``calls`` counts the requests sent to the LMs; ``cached_calls`` those DSPy's cache
    answered (DSPy reports usage only for the former: see ``count_cache_hits``)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._totals = {
            "calls": 0,
            "cached_calls": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cost": 0.0,
        }

    def add_cache_hit(self) -> None:
        with self._lock:
            self._totals["cached_calls"] += 1

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedUsageTracker:
        return self

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        with self._lock:
            super().add_usage(lm, usage_entry)
            self._totals["calls"] += 1
            for key in ("prompt_tokens", "completion_tokens"):
                self._totals[key] += int(usage_entry.get(key) or 0)
            self._totals["cost"] += float(usage_entry.get("cost") or 0.0)

    def totals(self) -> dict[str, Any]:
        with self._lock:
            totals = dict(self._totals)
        totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
        return totals


def count_cache_hits() -> None:
    """Count DSPy cache hits into the run's usage tracker. DSPy 3.4.1 marks a hit only on
    its internal ``CallResult.cache_hit`` and then skips the usage tracker
    (``dspy/clients/execution.py: _cached, finalize``); a callback would see it but costs
    ~0.1 ms on every module call, so ``dspy.cache.get`` is wrapped once per cache object:
    a hit is a non-None answer, credited to the tracker of the calling context."""
    cache = dspy.cache
    if getattr(cache.get, "_dspex_counting", False):
        return
    original = cache.get

    def get(*args: Any, **kwargs: Any) -> Any:
        answer = original(*args, **kwargs)
        if answer is not None:
            tracker = dspy.settings.usage_tracker
            if isinstance(tracker, SharedUsageTracker):
                tracker.add_cache_hit()
        return answer

    get._dspex_counting = True  # type: ignore[attr-defined]
    cache.get = get  # type: ignore[method-assign]


class RunCallback(BaseCallback):
    """Notices infrastructure errors that DSPy would swallow (bootstrapping and proposing
    count a failed example and carry on). Installed only for those two phases: DSPy's
    callback machinery costs ~0.1 ms on every module, adapter and LM call, and the search
    watches its evaluations more cheaply (``_WatchedProgram``)."""

    def __init__(self, recorder: RunRecorder) -> None:
        self.recorder = recorder

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None):
        if exception is not None and is_infrastructure_error(exception):
            self.recorder.note_infrastructure_error(exception)

    def on_module_end(self, call_id: str, outputs: Any, exception: BaseException | None = None):
        if exception is not None and is_infrastructure_error(exception):
            self.recorder.note_infrastructure_error(exception)


class _WatchedProgram:
    """What the search hands to ``Evaluate``: calls the candidate, and notes an
    infrastructure error before DSPy's executor turns it into a failed example."""

    def __init__(self, program: Any, recorder: RunRecorder) -> None:
        self.program = program
        self.recorder = recorder

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.recorder.cancel_requested.is_set():
            raise _ExampleCancelled()  # the evaluation runs out fast; it is never scored
        try:
            return self.program(*args, **kwargs)
        except BaseException as exc:
            if is_infrastructure_error(exc):
                self.recorder.note_infrastructure_error(exc)
            raise


def watched_metric(metric: Any, recorder: RunRecorder) -> Any:
    """The metric as DSPy calls it, noting an infrastructure error (an LM-as-judge metric
    whose LM is down, say) before DSPy turns it into a failed, zero-scored example."""
    if metric is None:
        return None

    @functools.wraps(metric)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return metric(*args, **kwargs)
        except BaseException as exc:
            if is_infrastructure_error(exc):
                recorder.note_infrastructure_error(exc)
            raise

    return call


# ---- the run's events and checkpoints ------------------------------------------------
class RunRecorder:
    """Events (kept, numbered, streamed) and checkpoints of one run."""

    def __init__(self, run_id: str, folder: CheckpointDir, restored: dict[str, Any] | None):
        self.run_id = run_id
        self.folder = folder
        self.restored = restored or {}
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.finished = False
        self.status = "starting"
        self.cancel_requested = threading.Event()
        self.checkpoint_requested = threading.Event()
        self.checkpoint_requests = 0  # how many "checkpoint now" requests came in
        self.checkpoint_served = 0  # the newest request a written snapshot answers
        self.usage = SharedUsageTracker()
        self._usage_base = dict(self.restored.get("usage", {}))
        self.infrastructure_error: BaseException | None = None
        self.progress: dict[str, Any] = dict(self.restored)
        self.result: dict[str, Any] | None = None
        self.log = RunLog(folder.log_file, self._progress_lines)
        # Snapshots to write (path, bytes, event), or files to fsync (path, None, {}).
        self._writes: queue.Queue[tuple[Path, bytes | None, dict[str, Any]] | None] = queue.Queue()
        self.last_snapshot: Path | None = None  # the newest snapshot written (all clean)
        self._writer = threading.Thread(
            target=self._write_snapshots, name=f"dspex-ckpt-{run_id}", daemon=True
        )
        self._writer.start()

    def emit(self, kind: str, **data: Any) -> dict[str, Any]:
        with self.cond:
            event = {
                "seq": len(self.events),
                "time": time.time(),
                "kind": kind,
                **scrub_secrets(data),
            }
            self.events.append(event)
            self.cond.notify_all()
        return event

    def _progress_lines(self, text: str) -> None:
        """DSPy prints "Bootstrapping set i/N" (to the run's log): an event each."""
        for match in _BOOTSTRAP_LINE.finditer(text):
            self.emit(
                "phase", phase="bootstrap", step=int(match.group(1)), total=int(match.group(2))
            )

    @contextlib.contextmanager
    def watching_errors(self) -> Iterator[None]:
        with dspy.context(callbacks=[*dspy.settings.callbacks, RunCallback(self)]):
            yield

    def usage_totals(self) -> dict[str, Any]:
        totals = self.usage.totals()
        for key in (
            "calls",
            "cached_calls",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cost",
        ):
            totals[key] = totals[key] + self._usage_base.get(key, 0)
        return totals

    def note_infrastructure_error(self, exc: BaseException) -> None:
        if self.infrastructure_error is None:
            self.infrastructure_error = exc

    def take_infrastructure_error(self) -> BaseException | None:
        """The error noted since the last take (and forget it: the attempt is undone)."""
        error, self.infrastructure_error = self.infrastructure_error, None
        return error

    def checkpoint(self, phase: str, reason: str, *, wait: bool = False, **state: Any) -> Path:
        """Snapshot the progress: encoded here (fast), written by the writer thread so the
        search does not wait for the disk. A kill before the write completes only means
        resuming from the snapshot before, which is exact too. ``wait`` for the last one."""
        with self.cond:
            serves = self.checkpoint_requests
            self.checkpoint_requested.clear()
        if serves > self.checkpoint_served and reason in ("step", "trial"):
            reason = "requested"  # this snapshot answers the pending request
        self.checkpoint_served = max(self.checkpoint_served, serves)
        self.log.sync()
        self.progress.update(state)
        self.progress["phase"] = phase
        self.progress["usage"] = self.usage_totals()
        started = time.perf_counter()
        path, document = self.folder.prepare_snapshot({**self.progress, "reason": reason})
        info = {
            "phase": phase,
            "reason": reason,
            "trial": self.progress.get("trials_done", 0),
            "best_score": self.progress.get("best_score"),
            "serves_request": serves,
            "encode_seconds": time.perf_counter() - started,
        }
        self._writes.put((path, document, info))
        if wait:
            self._writes.join()
        return path

    def flush(self) -> None:
        """Wait until every snapshot handed to the writer thread is on disk."""
        self._writes.join()

    def make_durable(self, *paths: Path) -> None:
        """fsync these on the writer thread, before any snapshot that follows."""
        for path in paths:
            self._writes.put((path, None, {}))

    def _write_snapshots(self) -> None:
        while True:
            item = self._writes.get()
            if item is None:  # the run finished: this thread ends with it
                self._writes.task_done()
                return
            path, document, info = item
            try:
                if document is None:
                    make_durable(path)
                    continue
                started = time.perf_counter()
                self.folder.commit_snapshot(path, document)
                self.last_snapshot = path
                self.emit(
                    "checkpoint",
                    path=str(path),
                    bytes=len(document),
                    write_seconds=time.perf_counter() - started,
                    **info,
                )
            except OSError as exc:
                self.emit(
                    "error",
                    error_type=type(exc).__name__,
                    module=type(exc).__module__,
                    message=f"writing checkpoint {path.name} failed: {exc}",
                    infrastructure=True,
                    resumable=True,
                )
            finally:
                self._writes.task_done()

    def at_safe_point(self, phase: str) -> None:
        """Between steps: honour a checkpoint request, then a cancel request."""
        if self.checkpoint_requested.is_set():
            self.checkpoint(phase, "requested")
        if self.cancel_requested.is_set():
            raise RunCancelled(clean=True)

    def finish(self, status: str) -> None:
        self._writes.join()  # every snapshot on disk before the run says it ended
        self._writes.put(None)
        self._writer.join()
        self.log.close()
        with self.cond:
            self.status = status
            self.finished = True
            self.cond.notify_all()


# ---- the optimizer -------------------------------------------------------------------
class ResumableMIPROv2(MIPROv2):
    """MIPROv2 whose three steps checkpoint and resume; same results as upstream."""

    def __init__(
        self,
        *,
        recorder: RunRecorder,
        recovery: dict[str, Any] | None = None,
        budget: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["metric"] = watched_metric(kwargs.get("metric"), recorder)
        super().__init__(**kwargs)
        self.recorder = recorder
        self.recovery = dict(recovery or {})
        self.diverged_after = int(self.recovery.get("diverged_after", 6))
        self.budget = {k: v for k, v in dict(budget or {}).items() if v is not None}
        self._outage: dict[str, Any] | None = None  # while waiting for the LM to come back

    # ---- infrastructure errors: never a result; wait for the LM, or stop resumably ----
    def _run_step(self, phase: str, step: Callable[[], Any]) -> Any:
        """Run bootstrapping or proposing; an infrastructure error anywhere in it undoes
        the step (RNG state restored, nothing checkpointed) and it is redone in full once
        the LM is back, so an outage never yields fewer demo sets or candidates."""
        rec = self.recorder
        before = self.rng.getstate()
        while True:
            rec.take_infrastructure_error()
            try:
                with rec.watching_errors():
                    outcome = step()
            except Exception as exc:
                if not (is_infrastructure_error(exc) or rec.infrastructure_error is not None):
                    raise
                rec.note_infrastructure_error(exc)
            error = rec.take_infrastructure_error()
            if error is None:
                self._lm_is_back()
                return outcome
            self.rng.setstate(before)
            self._wait_for_lm(error, phase)

    def _wait_for_lm(self, error: BaseException, phase: str) -> None:
        """The attempt was undone. If the LM is down (not a bad key or model) and the
        policy allows, wait with backoff, then return for a retry; else abandon."""
        kind = lm_failure_kind(error)
        limit = float(self.recovery.get("lm_outage_wait", 600.0))
        if kind not in WAITABLE_LM_FAILURES or limit <= 0:
            raise TrialAbandoned(error)
        now = time.monotonic()
        if self._outage is None:
            self._outage = {"since": now, "tries": 0}
        waited = now - self._outage["since"]
        if waited >= limit:
            raise TrialAbandoned(error)
        delay = min(2.0 ** self._outage["tries"], 60.0, limit - waited)
        self._outage["tries"] += 1
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else kind
        self.recorder.emit(
            "waiting",
            phase=phase,
            lm_failure=kind,
            reason=reason,
            next_try_in=round(delay, 3),
            waited=round(waited, 3),
            limit=limit,
            attempt=self._outage["tries"],
        )
        if self.recorder.cancel_requested.wait(delay):  # cancel during a wait: at once
            raise RunCancelled(clean=False)

    def _lm_is_back(self) -> None:
        if self._outage is not None:
            waited = time.monotonic() - self._outage["since"]
            self.recorder.emit(
                "recovery", action="lm_back", waited=round(waited, 3), tries=self._outage["tries"]
            )
            self._outage = None

    # ---- budgets ------------------------------------------------------------------
    def _check_budget(self, search: dict[str, Any], examples: int) -> None:
        """Before a trial: stop, resumably, if it would pass the budget (its need is the
        usage per evaluated example so far, times the examples it will evaluate)."""
        if not self.budget:
            return
        rec = self.recorder
        used = rec.usage_totals()
        start = search.get("usage_at_search_start") or {}
        evaluated = max(int(search.get("total_eval_calls") or 0), 1)
        for limit_name, key in (
            ("max_calls", "calls"),
            ("max_tokens", "total_tokens"),
            ("max_cost", "cost"),
        ):
            limit = self.budget.get(limit_name)
            if limit is None:
                continue
            spent = float(used.get(key) or 0)
            per_example = (spent - float(start.get(key) or 0)) / evaluated
            need = per_example * examples
            if spent + need > float(limit):
                rec.emit(
                    "budget",
                    limit=limit_name,
                    budget=limit,
                    used=spent,
                    next_trial_needs=round(need, 6),
                )
                raise BudgetExceeded(
                    f"{limit_name}={limit:g}: {spent:g} used, and the next trial needs about "
                    f"{need:g} more"
                )

    def _bootstrap_fewshot_examples(
        self, program: Any, trainset: list, seed: int, teacher: Any, **kwargs: Any
    ) -> Any:
        rec = self.recorder
        if "rng_after_bootstrap" in rec.restored:
            self.rng.setstate(rng_state_from_json(rec.restored["rng_after_bootstrap"]))
            rec.emit(
                "phase",
                phase="bootstrap",
                step=kwargs["num_fewshot_candidates"],
                total=kwargs["num_fewshot_candidates"],
                restored=True,
            )
            return demos_from_json(rec.restored["demo_candidates"])
        rec.status = "bootstrapping"
        rec.emit("phase", phase="bootstrap", step=0, total=kwargs["num_fewshot_candidates"])
        self._check_budget({}, 0)
        demos = self._run_step(
            "bootstrap",
            lambda: super(ResumableMIPROv2, self)._bootstrap_fewshot_examples(
                program, trainset, seed, teacher, **kwargs
            ),
        )
        rec.checkpoint(
            "bootstrapped",
            "step",
            demo_candidates=demos_to_json(demos),
            rng_after_bootstrap=rng_state_to_json(self.rng.getstate()),
        )
        rec.at_safe_point("bootstrapped")
        return demos

    def _propose_instructions(
        self, program: Any, trainset: list, demo_candidates: Any, *args: Any, **kwargs: Any
    ) -> dict[int, list[str]]:
        rec = self.recorder
        if "rng_after_propose" in rec.restored:
            self.rng.setstate(rng_state_from_json(rec.restored["rng_after_propose"]))
            candidates = instructions_from_json(rec.restored["instruction_candidates"])
        else:
            rec.status = "proposing"
            rec.emit("phase", phase="propose", step=0, total=kwargs.get("num_instruct_candidates"))
            self._check_budget({}, 0)
            candidates = self._run_step(
                "propose",
                lambda: super(ResumableMIPROv2, self)._propose_instructions(
                    program, trainset, demo_candidates, *args, **kwargs
                ),
            )
            rec.checkpoint(
                "proposed",
                "step",
                instruction_candidates={str(k): v for k, v in candidates.items()},
                rng_after_propose=rng_state_to_json(self.rng.getstate()),
            )
        for predictor, texts in candidates.items():
            for index, text in enumerate(texts):
                rec.emit("candidate", predictor=predictor, index=index, instruction=text)
        rec.at_safe_point("proposed")
        return candidates

    # The search, step for step as upstream, with a checkpoint after every trial.
    def _optimize_prompt_parameters(
        self,
        program: Any,
        instruction_candidates: dict[int, list[str]],
        demo_candidates: Any,
        evaluate: Any,
        valset: list,
        num_trials: int,
        minibatch: bool,
        minibatch_size: int,
        minibatch_full_eval_steps: int,
        seed: int,
    ) -> Any:
        optuna = _import_optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        rec = self.recorder
        rec.status = "searching"
        extra_full_eval = 1 if num_trials % minibatch_full_eval_steps != 0 else 0
        adjusted_num_trials = int(
            (num_trials + num_trials // minibatch_full_eval_steps + 1 + extra_full_eval)
            if minibatch
            else num_trials
        )
        distributions = self._get_param_distributions(
            program, instruction_candidates, demo_candidates
        )
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
        study = optuna.create_study(direction="maximize", sampler=sampler)

        def build(params: dict[str, int]) -> Any:
            candidate = program.deepcopy()
            for i, predictor in enumerate(candidate.predictors()):
                text = instruction_candidates[i][params[f"{i}_predictor_instruction"]]
                signature = dspy.teleprompt.utils.get_signature(predictor).with_instructions(text)
                dspy.teleprompt.utils.set_signature(predictor, signature)
                if demo_candidates:
                    predictor.demos = demo_candidates[i][params[f"{i}_predictor_demos"]]
            return candidate

        search = rec.restored.get("search")
        if search is None:
            default_params = {
                f"{i}_predictor_instruction": 0 for i in range(len(program.predictors()))
            }
            if demo_candidates:
                default_params.update(
                    {f"{i}_predictor_demos": 0 for i in range(len(program.predictors()))}
                )
            rec.emit("phase", phase="search", step=1, total=adjusted_num_trials)
            usage_at_start = rec.usage_totals()
            default_score = self._evaluate(program, evaluate, valset, len(valset), None)
            search = {
                "usage_at_search_start": usage_at_start,
                "trials": [{"params": default_params, "value": default_score, "kind": "full"}],
                "objective_runs": 0,
                # [key, [[score, params], ...]] pairs: a list, because the order of first
                # appearance breaks ties when picking the next full evaluation (and
                # checkpoints are canonical JSON, whose objects have sorted keys).
                "param_scores": [],
                "fully_evaluated": {},
                "best_score": default_score,
                "best_params": default_params,
                "total_eval_calls": len(valset),
                "minibatch_size": minibatch_size,
                "recent_scores": [default_score],
            }
            self._trial_event(1, "full", default_params, default_score, search, default=True)
            self._checkpoint_search(search, sampler)
        else:
            search.setdefault("minibatch_size", minibatch_size)
            search.setdefault("recent_scores", [])
            numpy_rng_from_json(sampler._rng.rng, search["sampler_rng"])
            numpy_rng_from_json(sampler._random_sampler._rng.rng, search["random_sampler_rng"])
            self.rng.setstate(rng_state_from_json(search["rng"]))
        for trial in search["trials"]:
            study.add_trial(
                optuna.trial.create_trial(
                    params=trial["params"], distributions=distributions, value=trial["value"]
                )
            )
        param_score_dict: dict[str, list[tuple[float, Any, dict[str, int]]]] = defaultdict(list)
        for key, entries in search["param_scores"]:
            for score, params in entries:
                param_score_dict[key].append((score, build(params), params))
        fully_evaled = {
            k: {"program": None, "score": s} for k, s in search["fully_evaluated"].items()
        }

        while search["objective_runs"] < num_trials:
            rec.at_safe_point("search")
            if self.budget:
                upcoming = len(study.get_trials(deepcopy=False)) + 1
                examples = search["minibatch_size"] if minibatch else len(valset)
                if minibatch and (
                    upcoming % (minibatch_full_eval_steps + 1) == 0
                    or upcoming == adjusted_num_trials - 1
                ):
                    examples += len(valset)  # a full evaluation follows this trial
                self._check_budget(search, examples)
            trial = study.ask()
            trial_num = trial.number + 1
            rec.emit("phase", phase="search", step=trial_num, total=adjusted_num_trials)
            raw: dict[str, int] = {}
            for i in range(len(program.predictors())):
                raw[f"{i}_predictor_instruction"] = trial.suggest_categorical(
                    f"{i}_predictor_instruction", range(len(instruction_candidates[i]))
                )
                if demo_candidates:
                    raw[f"{i}_predictor_demos"] = trial.suggest_categorical(
                        f"{i}_predictor_demos", range(len(demo_candidates[i]))
                    )
            candidate = build(raw)
            batch_size = search["minibatch_size"] if minibatch else len(valset)
            score = self._evaluate(
                candidate, evaluate, valset, batch_size, search if minibatch else None
            )
            batch_size = search["minibatch_size"] if minibatch else len(valset)
            search["total_eval_calls"] += batch_size
            kind = "minibatch" if minibatch else "full"
            if not minibatch and score > search["best_score"]:
                search["best_score"], search["best_params"] = score, raw
            chosen = []
            for i in range(len(program.predictors())):
                chosen.append(f"Predictor {i}: Instruction {raw[f'{i}_predictor_instruction']}")
                if demo_candidates:
                    chosen.append(f"Predictor {i}: Few-Shot Set {raw[f'{i}_predictor_demos']}")
            key = ",".join(map(str, chosen))
            param_score_dict[key].append((score, candidate, raw))
            for pair in search["param_scores"]:
                if pair[0] == key:
                    pair[1].append([score, raw])
                    break
            else:
                search["param_scores"].append([key, [[score, raw]]])
            pending = {"params": raw, "value": score, "kind": kind}
            self._trial_event(trial_num, kind, raw, score, search)
            if minibatch and (
                trial_num % (minibatch_full_eval_steps + 1) == 0
                or trial_num == adjusted_num_trials - 1
            ):
                rec.emit("phase", phase="search", step=trial_num + 1, total=adjusted_num_trials)
                _, mean, combo, params = get_program_with_highest_avg_score(
                    param_score_dict, fully_evaled
                )
                full_score = self._evaluate(build(params), evaluate, valset, len(valset), None)
                study.add_trial(
                    optuna.trial.create_trial(
                        params=params, distributions=distributions, value=full_score
                    )
                )
                fully_evaled[combo] = {"program": None, "score": full_score}
                search["fully_evaluated"][combo] = full_score
                search["total_eval_calls"] += len(valset)
                if full_score > search["best_score"]:
                    search["best_score"], search["best_params"] = full_score, params
                study.tell(trial, score)
                search["trials"] += [
                    pending,
                    {"params": params, "value": full_score, "kind": "full"},
                ]
                self._trial_event(trial_num + 1, "full", params, full_score, search, mean=mean)
            else:
                study.tell(trial, score)
                search["trials"].append(pending)
            search["objective_runs"] += 1
            search["recent_scores"] = [*search["recent_scores"], score][-self.diverged_after :]
            self._checkpoint_search(search, sampler)
            self._check_divergence(search)

        best_program = build(search["best_params"])
        if self.track_stats:
            best_program.score = search["best_score"]
            best_program.trial_logs = {}
        return best_program

    def _evaluate(
        self,
        candidate: Any,
        evaluate: Any,
        valset: list,
        batch_size: int,
        minibatch_state: dict[str, Any] | None,
    ) -> float:
        """Upstream's ``eval_candidate_program``, except that an infrastructure error is
        never a score: the attempt is undone (``self.rng`` back to its state before it, the
        minibatch it drew included) and retried once the LM is back, or the trial is
        abandoned; for an out-of-memory error the GPU cache is cleared and the evaluation
        retried (a minibatch with half the size). A cancel ends it early, unscored."""
        rec = self.recorder
        if rec.infrastructure_error is not None:  # met earlier and not handled
            raise TrialAbandoned(rec.infrastructure_error)
        retried_full = False
        before = self.rng.getstate()
        while True:
            watched = _WatchedProgram(candidate, rec)
            score = eval_candidate_program(batch_size, valset, watched, evaluate, self.rng).score
            if rec.cancel_requested.is_set():
                self.rng.setstate(before)
                raise RunCancelled(clean=False)
            error = rec.take_infrastructure_error()
            if error is None:
                self._lm_is_back()
                return score
            self.rng.setstate(before)
            if not (self.recovery.get("oom_retry", True) and is_out_of_memory(error)):
                self._wait_for_lm(error, "search")  # returns when it is time to retry
                continue
            floor = int(self.recovery.get("min_batch_size", 2))
            if minibatch_state is not None and batch_size // 2 >= floor:
                new_size = batch_size // 2
                minibatch_state["minibatch_size"] = new_size
            elif minibatch_state is None and not retried_full:
                new_size, retried_full = batch_size, True
            else:
                raise TrialAbandoned(error)
            freed = clear_gpu_cache()
            rec.emit(
                "recovery",
                action="halve_batch" if new_size < batch_size else "retry",
                reason=f"{type(error).__name__}: {error}",
                from_size=batch_size,
                to_size=new_size,
                gpu_cache=freed,
            )
            batch_size = new_size

    def _check_divergence(self, search: dict[str, Any]) -> None:
        """Warn (an event) when the last ``diverged_after`` trials all scored nothing;
        stop only if the policy says so: DSPy itself would go on, and by default a dspex
        run ends with DSPy's result."""
        recent = search["recent_scores"]
        if not (
            self.diverged_after
            and len(recent) >= self.diverged_after
            and all(not isinstance(s, int | float) or s != s or s <= 0 for s in recent)
        ):
            return
        message = (
            f"the last {len(recent)} trials all scored 0 (or gave no valid score); "
            "the search is going nowhere"
        )
        if self.recovery.get("stop_on_divergence", False):
            raise OptimizationDiverged(message)
        if not search.get("divergence_warned"):
            search["divergence_warned"] = True
            self.recorder.emit(
                "warning",
                warning="diverged",
                message=message,
                hint="check the metric on a few examples, raise num_candidates, or use "
                "another task LM; RecoveryPolicy(stop_on_divergence=True) stops such runs",
            )

    def _trial_event(
        self,
        number: int,
        kind: str,
        params: dict[str, int],
        score: float,
        search: dict[str, Any],
        **extra: Any,
    ) -> None:
        self.recorder.emit(
            "trial",
            number=number,
            eval=kind,
            params=params,
            score=score,
            best_score=search["best_score"],
            usage=self.recorder.usage_totals(),
            **extra,
        )

    def _checkpoint_search(self, search: dict[str, Any], sampler: Any) -> None:
        search["rng"] = rng_state_to_json(self.rng.getstate())
        search["sampler_rng"] = numpy_rng_to_json(sampler._rng.rng)
        search["random_sampler_rng"] = numpy_rng_to_json(sampler._random_sampler._rng.rng)
        trials = len(search["trials"])
        self.recorder.checkpoint(
            "search", "trial", search=search, trials_done=trials, best_score=search["best_score"]
        )


# ---- rebuilding what the notebook sent ----------------------------------------------
def build_lm(
    spec: dict[str, Any] | None,
    given: Any = None,
    *,
    trusted_only: bool,
    allowed: Any = None,
) -> Any:
    """The run's LM: ``given`` (an LM object, or the spec of one the caller named by a
    string), else rebuilt from its spec (see ``optimizers.mipro._lm_spec`` for the kinds).
    ``trusted_only`` when the spec comes from a checkpoint: then classes and references are
    imported only from ``allowed`` modules (by default ``checkpoint.trusted_module_roots``)."""
    if isinstance(given, dict):  # named by the caller now: build that, not the checkpoint's
        return build_lm(given, None, trusted_only=False)
    if given is not None:
        return given
    if spec is None:
        return None
    if trusted_only and allowed is None:
        allowed = trusted_module_roots()
    kind = spec.get("kind", "state")  # checkpoints written before kinds hold a state
    if kind == "model":
        try:
            return dspy.LM(spec["model"])
        except ValueError as exc:
            raise InvalidLM(f"model name {spec['model']!r}: {exc}") from None
    if kind == "ref":
        return _lm_from_reference(spec["ref"], allowed)
    if kind == "value":
        why = spec.get("unsaved") or "it cannot be saved"
        raise CheckpointError(
            f"the checkpoint does not hold this run's LM {spec.get('model')!r} "
            f"({spec.get('class')}; {why}): pass it again, "
            "MIPROv2.resume(..., task_lm=..., prompt_lm=...) with the run's LMs",
            hint="pass task_lm= (and prompt_lm=, when the run had its own) to "
            "MIPROv2.resume(): the same LM objects as before",
        )
    state = dict(spec["state"])
    engine = state.get("engine")
    custom = spec.get("class", "dspy.clients.lm.LM")
    modules = [custom.rpartition(".")[0]]
    if isinstance(engine, dict):
        modules.append(str(engine.get("class", "")).partition(":")[0])
    if allowed is not None and not all(module_allowed(m, allowed) for m in modules if m):
        raise CheckpointError(
            f"the checkpoint's LM uses {', '.join(modules)}, which dspex will not import "
            "from a checkpoint",
            hint="pass task_lm= (and prompt_lm=) to MIPROv2.resume(), or trust the module: "
            "MIPROv2.resume(..., trusted_modules=[...])",
        )
    module_name, _, class_name = custom.rpartition(".")
    cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    return cls.load_state(state, allow_custom_lm_class=True)


def _lm_from_reference(ref: str, allowed: Any) -> Any:
    """What an LM import path names: an LM, or a function (or class) that makes one when
    called without arguments. From a checkpoint (``allowed``) only from allowed modules."""
    if allowed is not None:
        obj = import_reference(ref, allowed, "LM")
    else:  # typed by the caller: any module (not resolve_callable: an LM object is fine)
        module_name, _, qualname = ref.partition(":")
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    if isinstance(obj, dspy.BaseLM):
        return obj
    if callable(obj):
        obj = obj()
        if isinstance(obj, dspy.BaseLM):
            return obj
        raise InvalidLM(
            f"LM reference {ref!r} returned an object of type {type(obj).__name__}, "
            "not a dspy.BaseLM"
        )
    raise InvalidLM(
        f"LM reference {ref!r} names an object of type {type(obj).__name__}, not a dspy.BaseLM"
    )


def _resolve(ref: str, allowed: Any, what: str) -> Any:
    """A reference the caller typed (``allowed`` None) is imported as given; one read from
    a checkpoint only from the allowed modules, checked before the import."""
    if allowed is None:
        return resolve_callable(ref)
    return import_reference(ref, allowed, what)


def build_program(spec: dict[str, Any], given: Any = None, *, allowed: Any = None) -> Any:
    """The run's program: ``given``, or rebuilt from its spec. ``allowed`` (module names)
    when the spec comes from a checkpoint: see ``checkpoint.import_reference``."""
    if given is not None:
        return given
    kind = spec.get("kind")
    if kind == "ref":
        # Only a DSPy module, or a DSPy module class to instantiate: a reference read from
        # a checkpoint never gets to call anything else.
        obj = _resolve(spec["ref"], allowed, "program")
        if isinstance(obj, dspy.Module):
            return obj
        if isinstance(obj, type) and issubclass(obj, dspy.Module):
            return obj()
        raise ForbiddenReferenceError(
            f"program reference {spec['ref']!r} names a {type(obj).__name__}, not a dspy.Module",
            hint="refer to a dspy.Module instance or class ('package.module:name')",
        )
    if kind == "dspy":
        cls = _resolve(spec["class"], allowed, "program class")
        if not (isinstance(cls, type) and issubclass(cls, dspy.Module)):
            raise ForbiddenReferenceError(
                f"program class {spec['class']!r} is not a dspy.Module subclass; it was not called",
                hint="pass program= to MIPROv2.resume()",
            )
        program = cls(spec["signature"])
        program.load_state(spec["state"])
        return program
    raise CheckpointError(
        "this run's program was defined in the notebook and is not stored in checkpoints "
        "(that would need pickle)",
        hint="pass program= to MIPROv2.resume() (the same class and instance as before)",
    )


def build_metric(spec: dict[str, Any], given: Any = None, *, allowed: Any = None) -> Any:
    """The run's metric: ``given``, or the function its reference names (from an allowed
    module, and a function or callable object, never a class to instantiate)."""
    if given is not None:
        return given
    if spec.get("kind") == "ref":
        metric = _resolve(spec["ref"], allowed, "metric")
        if allowed is not None and (isinstance(metric, type) or not callable(metric)):
            raise ForbiddenReferenceError(
                f"metric reference {spec['ref']!r} names a {type(metric).__name__}, not a function",
                hint="pass metric= to MIPROv2.resume()",
            )
        return metric
    raise CheckpointError(
        "this run's metric was defined in the notebook and is not stored in checkpoints",
        hint="pass metric= to MIPROv2.resume()",
    )


# ---- runs in this kernel -------------------------------------------------------------
RUNS: dict[str, RunRecorder] = {}


def error_event(error: BaseException, rec: RunRecorder) -> dict[str, Any]:
    """What the client needs to raise the right error: its type, and for an LM failure
    its kind (``details["lm_failure"]``, with the model and key variable to name in the
    hint). Every failure stops at a clean snapshot."""
    from .lm_failures import lm_failure_details

    details = lm_failure_details(error)
    return {
        "error_type": type(error).__name__,
        "module": type(error).__module__,
        "message": str(error),
        "infrastructure": is_infrastructure_error(error),
        "resumable": True,
        "details": details,
        "last_snapshot": str(rec.last_snapshot) if rec.last_snapshot else None,
        "usage": rec.usage_totals(),
        "traceback": traceback.format_exception(type(error), error, error.__traceback__),
    }


def _prune_finished_runs() -> None:
    """A long-lived kernel keeps only the newest few finished runs (events and result),
    for a client that reconnects late; clients ``forget`` theirs once collected."""
    finished = [run_id for run_id, rec in RUNS.items() if rec.finished]
    for run_id in finished[:-KEEP_FINISHED_RUNS] if len(finished) > KEEP_FINISHED_RUNS else []:
        del RUNS[run_id]


def _run_thread(
    rec: RunRecorder,
    spec: dict[str, Any],
    data: dict[str, Any],
    objects: dict[str, Any],
    trusted_only: bool,
) -> None:
    try:
        check_dspy_version()  # this loop follows one DSPy release: refuse others clearly
        task_lm = build_lm(spec["task_lm"], objects.get("task_lm"), trusted_only=trusted_only)
        prompt_lm = (
            build_lm(spec.get("prompt_lm"), objects.get("prompt_lm"), trusted_only=trusted_only)
            or task_lm
        )
        program = build_program(spec["program"], objects.get("program"))
        program = attach_sources(program, objects.get("sources"))  # inspect reads its cells
        metric = build_metric(spec["metric"], objects.get("metric"))
        trainset = [example_from_json(e) for e in data["trainset"]]
        valset = [example_from_json(e) for e in data["valset"]] if data.get("valset") else None
        budget = objects.get("budget") or spec.get("budget")
        optimizer = ResumableMIPROv2(
            recorder=rec,
            recovery=spec.get("recovery"),
            budget=budget,
            metric=metric,
            prompt_model=prompt_lm,
            task_model=task_lm,
            **spec["optimizer"],
        )
        rec.emit(
            "status", status="running", restored_phase=rec.restored.get("phase"), budget=budget
        )
        count_cache_hits()
        # A long-lived kernel stays flat: DSPy would append every prediction to one
        # process-wide settings.trace and every LM call to GLOBAL_HISTORY (each up to
        # 10,000 entries, ~0.6 MiB a short run). Neither is read by MIPROv2; the run's
        # LMs are copies in this kernel whose history nobody sees, and usage is counted
        # by the run's own tracker.
        with (
            routed_to(rec.log),
            dspy.context(lm=task_lm, usage_tracker=rec.usage, trace=[], disable_history=True),
        ):
            best = optimizer.compile(program, trainset=trainset, valset=valset, **spec["compile"])
        state = best.dump_state()
        search = rec.progress.get("search", {})
        rec.result = {
            "program_state": state,
            "best_score": search.get("best_score"),
            "best_params": search.get("best_params"),
            "trials": search.get("trials", []),
            "usage": rec.usage_totals(),
        }
        rec.checkpoint("done", "completed", wait=True, result=rec.result)
        rec.emit(
            "complete",
            best_score=rec.result["best_score"],
            usage=rec.result["usage"],
            trials=len(rec.result["trials"]),
        )
        rec.finish("completed")
    except RunCancelled as exc:
        if exc.clean:  # between steps: this moment is a clean snapshot of its own
            path: Path | None = rec.checkpoint(
                rec.progress.get("phase", "started"), "cancelled", wait=True
            )
        else:  # inside a step: the last snapshot (after the last whole step) is the one
            rec.flush()
            path = rec.last_snapshot
        rec.emit("cancelled", checkpoint=str(path) if path else None, usage=rec.usage_totals())
        rec.finish("cancelled")
    except BaseException as exc:
        error = exc.error if isinstance(exc, TrialAbandoned) else exc
        rec.emit("error", **error_event(error, rec))
        rec.finish("failed")


def _launch(
    rec: RunRecorder,
    spec: dict[str, Any],
    data: dict[str, Any],
    objects: dict[str, Any],
    trusted_only: bool,
) -> dict[str, Any]:
    existing = RUNS.get(rec.run_id)
    if existing is not None and not existing.finished:
        raise RuntimeError(f"run {rec.run_id} is already running in this kernel")
    RUNS.pop(rec.run_id, None)  # a resumed run goes to the end (newest)
    RUNS[rec.run_id] = rec
    _prune_finished_runs()
    thread = threading.Thread(
        target=_run_thread,
        args=(rec, spec, data, objects, trusted_only),
        name=f"dspex-mipro-{rec.run_id}",
        daemon=True,
    )
    thread.start()
    return {
        "run_id": rec.run_id,
        "checkpoint_dir": str(rec.folder.path),
        "restored_phase": rec.restored.get("phase"),
    }


def start_run(
    spec: dict[str, Any], data: dict[str, Any], objects: dict[str, Any]
) -> dict[str, Any]:
    """Start a new run on a thread of this kernel; returns at once."""
    folder = CheckpointDir(spec["checkpoint_dir"])
    folder.create()
    if folder.run_file.exists():
        raise CheckpointError(
            f"{folder.path} already holds a run",
            hint="resume it with MIPROv2.resume(dir), or choose an empty checkpoint_dir",
        )
    # Written now, made durable by the run's writer thread before its first snapshot:
    # the two fsyncs would otherwise add ~15 ms to every optimize() call.
    write_json_atomic(folder.run_file, scrub_secrets(spec), sync=False)
    write_json_atomic(folder.data_file, data, sync=False)
    rec = RunRecorder(spec["run_id"], folder, None)
    rec.make_durable(folder.run_file, folder.data_file)
    return _launch(rec, spec, data, objects, trusted_only=False)


def _objects_for_resume(
    folder: CheckpointDir,
    spec: dict[str, Any],
    data: dict[str, Any],
    objects: dict[str, Any],
    trust: dict[str, Any] | None,
) -> dict[str, Any]:
    """The program and metric to resume with, built here before the run starts: from the
    caller's objects, or, only for a trusted folder, from the allowed references."""
    if trust is not None:
        checks = (("run.json", spec, "run_sha256"), ("data.json", data, "data_sha256"))
        for name, body, key in checks:
            if body_sha256(body) != trust.get(key):
                raise UntrustedCheckpointError(
                    f"{folder.path / name} changed after its signature was checked",
                    hint="something is writing to the folder: resume again when it is done",
                )
    program, metric = spec.get("program") or {}, spec.get("metric") or {}
    stored = {
        "program": program if program.get("kind") != "value" else None,
        "metric": metric if metric.get("kind") == "ref" else None,
        "task_lm": spec.get("task_lm"),
        "prompt_lm": spec.get("prompt_lm"),
    }
    needed = [k for k, v in stored.items() if v is not None and objects.get(k) is None]
    if trust is None and needed:
        names = ", ".join(f"{k} {_reference_text(stored[k])}" for k in needed)
        raise UntrustedCheckpointError(
            f"{folder.path} was not signed with this user's dspex key, so dspex will not "
            f"import the code it names ({names}); nothing was imported",
            hint=UNTRUSTED_HINT,
        )
    allowed = tuple(trust["trusted_modules"]) if trust is not None else ()
    objects["program"] = build_program(spec["program"], objects.get("program"), allowed=allowed)
    objects["metric"] = build_metric(spec["metric"], objects.get("metric"), allowed=allowed)
    for name in ("task_lm", "prompt_lm"):  # with the same trusted modules (A2's build_lm)
        if trust is not None and objects.get(name) is None and spec.get(name) is not None:
            objects[name] = build_lm(spec[name], None, trusted_only=True, allowed=allowed)
    return objects


def _reference_text(entry: dict[str, Any]) -> str:
    ref = entry.get("ref") or entry.get("class") or entry.get("kind")
    return repr(ref)


def resume_run(
    checkpoint_dir: str,
    objects: dict[str, Any],
    snapshot: str | None = None,
    trust: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Resume from the newest (or the named) snapshot of a run's folder.

    ``trust`` is the notebook's verdict on the folder's signatures (the key never comes
    here): None for a folder this user did not sign, whose references are then never
    imported; else the sha256 of the run.json and data.json bodies it checked and the
    modules references may name."""
    folder = CheckpointDir(checkpoint_dir)
    spec = read_json_checked(folder.run_file)
    data = read_json_checked(folder.data_file)
    objects = _objects_for_resume(folder, spec, data, dict(objects), trust)
    skipped: list[str] = []
    if snapshot:
        path: Path | None = folder.path / snapshot
        if Path(snapshot).name != snapshot or not path.is_file():  # type: ignore[union-attr]
            raise CheckpointError(f"no snapshot named {snapshot!r} in {folder.path}")
        progress = read_json_checked(path)  # a named snapshot that is damaged is refused
    else:
        # The newest snapshot that reads back; none (killed before the first, during
        # bootstrapping): start over, same run.
        path, progress, skipped = folder.newest_readable()
    if progress.get("phase") == "done":
        raise CheckpointError(f"run {spec['run_id']} already completed", hint="use its result")
    rec = RunRecorder(spec["run_id"], folder, progress)
    rec.emit(
        "resumed",
        snapshot=path.name if path else None,
        phase=progress.get("phase"),
        trial=progress.get("trials_done", 0),
        skipped=skipped,
    )
    return _launch(rec, spec, data, objects, trusted_only=True)


def _run(run_id: str) -> RunRecorder:
    rec = RUNS.get(run_id)
    if rec is None:
        raise LookupError(f"no run {run_id!r} in this kernel")
    return rec


def events(run_id: str, start: int = 0):
    """Every event of the run from ``start``, as they happen, until it finishes."""
    rec = _run(run_id)
    index = start
    while True:
        with rec.cond:
            rec.cond.wait_for(lambda i=index: len(rec.events) > i or rec.finished, timeout=1.0)
            batch = rec.events[index:]
            done = rec.finished
        yield from batch
        index += len(batch)
        if done and index >= len(rec.events):
            return


def request_checkpoint(run_id: str) -> dict[str, Any]:
    rec = _run(run_id)
    if rec.finished:
        raise RuntimeError(f"run {run_id} has finished ({rec.status}); nothing to checkpoint")
    with rec.cond:
        rec.checkpoint_requests += 1
        rec.checkpoint_requested.set()
        return {"request": rec.checkpoint_requests}


def cancel(run_id: str) -> dict[str, Any]:
    rec = _run(run_id)
    rec.cancel_requested.set()
    return {"requested": not rec.finished, "trials_done": rec.progress.get("trials_done", 0)}


def forget(run_id: str) -> dict[str, Any]:
    """The client collected the run's events and result: drop its record here."""
    rec = RUNS.get(run_id)
    if rec is not None and rec.finished:
        del RUNS[run_id]
        return {"forgotten": True}
    return {"forgotten": False}


def runs_here() -> dict[str, Any]:
    """What runs leave in this kernel: their records and live threads (leak checks)."""
    names = [t.name for t in threading.enumerate()]
    return {
        "runs": sorted(RUNS),
        "unfinished": sorted(r for r, rec in RUNS.items() if not rec.finished),
        "events": sum(len(rec.events) for rec in RUNS.values()),
        "run_threads": [n for n in names if n.startswith(("dspex-mipro-", "dspex-ckpt-"))],
        "threads": len(names),
    }


def status(run_id: str) -> dict[str, Any]:
    rec = _run(run_id)
    return {
        "status": rec.status,
        "finished": rec.finished,
        "events": len(rec.events),
        "usage": rec.usage_totals(),
    }


def result(run_id: str, forget_run: bool = False) -> dict[str, Any]:
    """The run's result; ``forget_run``: the client has it all, drop the run's record."""
    rec = _run(run_id)
    if rec.result is None:
        raise RuntimeError(f"run {run_id} has no result ({rec.status})")
    if forget_run:
        forget(run_id)
    return rec.result
