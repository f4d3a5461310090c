"""The run machinery inside a pool kernel, shared by every optimizer.

A run is a teleprompter's ``compile`` on a thread of this kernel (so the kernel still
answers "checkpoint now" and "cancel"), with what every optimizer needs around it: events
(kept, numbered, streamed to the notebook), LM usage that stays right under threads,
checkpoints (JSON, written off the run's thread), cancel, budgets, the outage policy
(an LM that is down is waited for, never scored 0.0) and recovery. What differs between
optimizers is a small adapter (``OptimizerAdapter``): ``runtime/mipro.py`` for MIPROv2
(exact resume), one module per optimizer beside it, and ``runtime/generic.py`` for any
other ``Teleprompter`` (resume means restart). The adapter is picked by the
teleprompter's class, walking its MRO, so a user's subclass gets its base's adapter.

Imported only when a run starts (it imports DSPy).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
import logging
import queue
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import dspy
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
from .checkpoint_mirror import mirror_log, mirror_snapshot
from .dspy_support import check_dspy_version
from .ops import resolve_callable
from .run_output import RunLog, routed_to
from .sources import attach_sources

logger = logging.getLogger("dspex_jupyter.runs")
T = TypeVar("T")

__all__ = [
    "ADAPTER_MODULES",
    "BudgetExceeded",
    "OptimizationDiverged",
    "OptimizerAdapter",
    "RunCancelled",
    "RunContext",
    "RunRecorder",
    "TrialAbandoned",
    "adapter_for",
    "adopt",
    "example_to_json",
    "register_adapter",
]

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

    if getattr(exc, "infrastructure", None) is True:  # met in an eval pool's kernel
        return getattr(exc, "lm_failure_kind", None)
    return lm_failure(exc)


def is_infrastructure_error(exc: BaseException) -> bool:
    for cls in type(exc).__mro__:
        if (cls.__module__, cls.__name__) in INFRASTRUCTURE_ERRORS:
            return True
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return True
    if getattr(exc, "infrastructure", None) is True:  # met in an eval pool's kernel
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


def watched_metric(
    metric: Any,
    recorder: RunRecorder,
    *,
    context: RunContext | None = None,
    counts: RunContext | None = None,
) -> Any:
    """The metric as DSPy calls it, noting an infrastructure error (an LM-as-judge metric
    whose LM is down, say) before DSPy turns it into a failed, zero-scored example. With
    ``counts`` its calls are counted; with ``context`` a cancel or a spent budget stops
    the run at the next call."""
    if metric is None:
        return None

    @functools.wraps(metric)
    def call(*args: Any, **kwargs: Any) -> Any:
        if context is not None:
            context.stop_if_asked()
        try:
            return metric(*args, **kwargs)
        except BaseException as exc:
            if is_infrastructure_error(exc):
                recorder.note_infrastructure_error(exc)
            raise
        finally:
            if counts is not None:
                counts.count_metric_call()

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
        # Stop once the snapshot answering this request is written (graceful shutdown:
        # the trial in flight is kept, and the run cannot finish in between).
        self.stop_after_request: int | None = None
        self.usage = SharedUsageTracker()
        self._usage_base = dict(self.restored.get("usage", {}))
        self.infrastructure_error: BaseException | None = None
        # Why a run stops from inside DSPy's code (a budget spent): raised when it ends.
        self.stop_error: BaseException | None = None
        self.context: RunContext | None = None  # set once the run's adapter is known
        self.result_program: Any = None  # the compiled program, for the notebook
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
                mirror_snapshot(self, path, document)  # to the notebook, if it asked
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
        self.stop_if_checkpointed()
        if self.cancel_requested.is_set():
            raise RunCancelled(clean=True)

    def stop_if_checkpointed(self) -> None:
        """A "checkpoint, then stop" request was answered: cancel now."""
        stop_after = self.stop_after_request
        if stop_after is not None and self.checkpoint_served >= stop_after:
            self.cancel_requested.set()

    def finish(self, status: str) -> None:
        self._writes.join()  # every snapshot on disk before the run says it ended
        self._writes.put(None)
        self._writer.join()
        self.log.close()
        mirror_log(self)  # the log's tail, if the notebook asked for the run's files
        with self.cond:
            self.status = status
            self.finished = True
            self.cond.notify_all()


# ---- what an optimizer's adapter gets: the run, with its policies --------------------
class _StopRun(KeyboardInterrupt):
    """Raised inside DSPy's code (a metric call) to stop a run that was cancelled or hit
    its budget: DSPy catches ``Exception`` per example and carries on, but lets a
    ``KeyboardInterrupt`` through (its parallel executor stops its workers on one)."""


class RunContext:
    """One run as its optimizer's adapter sees it: the recorder, the recovery policy and
    budget, the adapter's own restored snapshot state, and the helpers that keep the
    machinery's promises (no silent zeros, waiting for the LM, budgets, cancel)."""

    # A progress event about metric calls at most this often (a cheap run calls the
    # metric thousands of times a second).
    PROGRESS_INTERVAL_S = 0.25

    def __init__(
        self,
        rec: RunRecorder,
        adapter: OptimizerAdapter,
        recovery: dict[str, Any] | None,
        budget: dict[str, Any] | None,
    ) -> None:
        self.rec = rec
        self.adapter = adapter
        self.name = adapter.name
        self.state_key = adapter.key
        self.recovery = dict(recovery or {})
        self.budget = {k: v for k, v in dict(budget or {}).items() if v is not None}
        self.restored: dict[str, Any] = (
            {} if adapter.resume == "restart" else dict(rec.restored.get(self.state_key) or {})
        )
        self.metric_calls = 0
        self._calls_lock = threading.Lock()
        self._last_report = 0.0
        self._outage: dict[str, Any] | None = None  # while waiting for the LM to come back

    # ---- events and snapshots --------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self.rec.cancel_requested.is_set()

    def usage(self) -> dict[str, Any]:
        return self.rec.usage_totals()

    def progress(self, **fields: Any) -> dict[str, Any]:
        """A "progress" event: the optimizer's own figures (iterations, candidates, ...)."""
        return self.rec.emit("progress", optimizer=self.name, **fields)

    def phase(self, phase: str, step: int, total: int | None = None, **extra: Any) -> None:
        self.rec.emit("phase", phase=phase, step=step, total=total, **extra)

    def checkpoint(
        self,
        phase: str,
        reason: str = "step",
        *,
        trials_done: int | None = None,
        best_score: float | None = None,
        wait: bool = False,
        **state: Any,
    ) -> Path:
        """Snapshot the adapter's ``state`` (under its own key) and the figures the
        checkpoint listing shows. JSON only: never pickle, never secrets."""
        top: dict[str, Any] = {self.state_key: state}
        if trials_done is not None:
            top["trials_done"] = trials_done
        if best_score is not None:
            top["best_score"] = best_score
        return self.rec.checkpoint(phase, reason, wait=wait, **top)

    def at_safe_point(self, phase: str) -> None:
        self.rec.at_safe_point(phase)

    # ---- what DSPy calls -------------------------------------------------------------
    def watched_metric(self, metric: Any, *, stops: bool = True) -> Any:
        """The metric as DSPy calls it: counted (throttled "progress" events), an
        infrastructure error noted before DSPy turns it into a zero-scored example, and
        (``stops``) a cancel or a spent budget stops the run at the next call."""
        return watched_metric(metric, self.rec, context=self if stops else None, counts=self)

    def watched_program(self, program: Any) -> Any:
        return _WatchedProgram(program, self.rec)

    def count_metric_call(self) -> None:
        with self._calls_lock:
            self.metric_calls += 1
            now = time.monotonic()
            due = now - self._last_report >= self.PROGRESS_INTERVAL_S
            if due:
                self._last_report = now
        if due:
            self.progress(metric_calls=self.metric_calls)

    def stop_if_asked(self) -> None:
        """Inside DSPy's code: stop now on cancel, or when the budget is spent; answer a
        "checkpoint now" with a snapshot of the last state checkpointed (a clean point:
        what the adapter saved after its last whole step, or a restart point)."""
        if self.rec.cancel_requested.is_set():
            raise _StopRun("cancelled")
        if self.rec.checkpoint_requested.is_set():
            self.rec.checkpoint(self.rec.progress.get("phase") or "started", "requested")
            self.rec.stop_if_checkpointed()
            if self.rec.cancel_requested.is_set():
                raise _StopRun("cancelled")
        if self.budget and self.rec.stop_error is None:
            exceeded = self._budget_spent()
            if exceeded is not None:
                self.rec.stop_error = exceeded
        if self.rec.stop_error is not None:
            raise _StopRun(str(self.rec.stop_error))

    def _budget_spent(self) -> BudgetExceeded | None:
        used = self.usage()
        for limit_name, key in BUDGET_KEYS:
            limit = self.budget.get(limit_name)
            if limit is not None and float(used.get(key) or 0) >= float(limit):
                self.rec.emit("budget", limit=limit_name, budget=limit, used=used.get(key))
                return BudgetExceeded(f"{limit_name}={limit:g}: {used.get(key):g} used")
        return None

    # ---- infrastructure errors: never a result; wait for the LM, or stop resumably ----
    def run_step(self, phase: str, step: Callable[[], T], *, rng: Any = None) -> T:
        """Run one unit of work; an infrastructure error anywhere in it undoes it
        (``rng`` back to its state before, nothing checkpointed) and it is redone in
        full once the LM is back, so an outage never yields fewer results."""
        rec = self.rec
        before = rng.getstate() if rng is not None else None
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
                self.lm_is_back()
                return outcome
            if rng is not None:
                rng.setstate(before)
            self.wait_for_lm(error, phase)

    def wait_for_lm(self, error: BaseException, phase: str) -> None:
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
        self.rec.emit(
            "waiting",
            phase=phase,
            lm_failure=kind,
            reason=reason,
            next_try_in=round(delay, 3),
            waited=round(waited, 3),
            limit=limit,
            attempt=self._outage["tries"],
        )
        if self.rec.cancel_requested.wait(delay):  # cancel during a wait: at once
            raise RunCancelled(clean=False)

    def lm_is_back(self) -> None:
        if self._outage is not None:
            waited = time.monotonic() - self._outage["since"]
            self.rec.emit(
                "recovery", action="lm_back", waited=round(waited, 3), tries=self._outage["tries"]
            )
            self._outage = None

    # ---- budgets ------------------------------------------------------------------
    def check_budget(
        self, examples: int, *, evaluated: int, usage_at_start: dict[str, Any] | None = None
    ) -> None:
        """Before a unit of work: stop, resumably, if it would pass the budget (its need
        is the usage per evaluated example since ``usage_at_start``, times ``examples``)."""
        if not self.budget:
            return
        used = self.usage()
        start = usage_at_start or {}
        evaluated = max(int(evaluated or 0), 1)
        for limit_name, key in BUDGET_KEYS:
            limit = self.budget.get(limit_name)
            if limit is None:
                continue
            spent = float(used.get(key) or 0)
            need = (spent - float(start.get(key) or 0)) / evaluated * examples
            if spent + need > float(limit):
                self.rec.emit(
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


BUDGET_KEYS = (("max_calls", "calls"), ("max_tokens", "total_tokens"), ("max_cost", "cost"))


# ---- adapters: what differs between optimizers ---------------------------------------
class OptimizerAdapter:
    """How one optimizer runs under this machinery. The defaults run any ``Teleprompter``
    as it is (``runtime/generic.py``); an optimizer's own module overrides what it needs
    for live progress and a better resume than a restart."""

    name = "Teleprompter"  # display name: dashboard title, phases, metadata
    resume = "restart"  # "exact" | "step" | "restart": what a resume gives
    state_key = ""  # its key in a snapshot (default: the name in lower case)
    # Stop at the first metric call past the budget (an adapter that checks its budget
    # before each unit of work, as MIPROv2's does, turns it off to stay exact).
    budget_per_call = True
    # Send the compiled program itself (in memory) with the result, not only its state.
    ships_program = True
    # Constructor LM arguments that default to another one (MIPROv2's prompt_model).
    lm_defaults: dict[str, str] = {}

    @property
    def key(self) -> str:
        return self.state_key or self.name.lower()

    def make_optimizer(self, teleprompter: Any, run: RunContext) -> Any:
        """The object whose compile runs: by default the user's teleprompter, its metric
        watched (counted, cancel-aware, infrastructure errors noted)."""
        if callable(getattr(teleprompter, "metric", None)):
            teleprompter.metric = run.watched_metric(
                teleprompter.metric, stops=self.budget_per_call
            )
        return teleprompter

    def compile(
        self,
        optimizer: Any,
        student: Any,
        run: RunContext,
        *,
        trainset: list[Any],
        valset: list[Any] | None,
        **compile_kwargs: Any,
    ) -> Any:
        """``optimizer.compile(student, trainset=..., valset=...)``, passing only what
        its ``compile`` accepts (KNNFewShot takes its trainset in the constructor)."""
        kwargs = dict(compile_kwargs)
        accepted = _parameters(optimizer.compile)
        if "trainset" in accepted or _takes_kwargs(optimizer.compile):
            kwargs["trainset"] = trainset
        if valset is not None and ("valset" in accepted or _takes_kwargs(optimizer.compile)):
            kwargs["valset"] = valset
        return optimizer.compile(student, **kwargs)

    def summary(self, optimizer: Any, program: Any, run: RunContext) -> dict[str, Any]:
        """What the result and the "complete" event carry; at least ``best_score``."""
        score = getattr(program, "score", None)
        if not isinstance(score, int | float):
            score = run.rec.progress.get("best_score")
        return {"best_score": score if isinstance(score, int | float) else None}


def _parameters(func: Any) -> set[str]:
    try:
        return set(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return set()


def _takes_kwargs(func: Any) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def adopt(cls: type, teleprompter: Any, **attrs: Any) -> Any:
    """An instance of ``cls`` (a resumable subclass of the teleprompter's class) with the
    user's instance state: every constructor argument the user gave is honoured without
    calling the constructor again. ``attrs`` are set on top."""
    obj = cls.__new__(cls)
    obj.__dict__.update(copy.copy(vars(teleprompter)))
    obj.__dict__.update(attrs)
    return obj


# Teleprompter class ("module:qualname") -> the module whose ``ADAPTER`` runs it.
ADAPTER_MODULES: dict[str, str] = {
    "dspy.teleprompt.mipro_optimizer_v2:MIPROv2": "dspex_jupyter.runtime.mipro",
    "dspy.teleprompt.gepa.gepa:GEPA": "dspex_jupyter.runtime.gepa",
    "dspy.teleprompt.random_search:BootstrapFewShotWithRandomSearch": (
        "dspex_jupyter.runtime.bootstrap_rs"
    ),
    "dspy.teleprompt.copro_optimizer:COPRO": "dspex_jupyter.runtime.copro",
    "dspy.teleprompt.simba:SIMBA": "dspex_jupyter.runtime.simba",
}
GENERIC_ADAPTER_MODULE = "dspex_jupyter.runtime.generic"


def register_adapter(class_path: str, module: str) -> None:
    """Run teleprompters of ``class_path`` ("module:qualname", and its subclasses) with
    the ``ADAPTER`` of ``module``."""
    ADAPTER_MODULES[class_path] = module


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def adapter_for(teleprompter_class: type) -> OptimizerAdapter:
    """The adapter of the nearest class in the MRO that has one; else the generic one."""
    for cls in teleprompter_class.__mro__:
        module = ADAPTER_MODULES.get(class_path(cls))
        if module is None:
            continue
        try:
            adapter = getattr(importlib.import_module(module), "ADAPTER", None)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise  # the adapter's own import failed: a real error
            adapter = None
        if adapter is not None:
            return adapter
    return importlib.import_module(GENERIC_ADAPTER_MODULE).ADAPTER


# ---- rebuilding what the notebook sent ----------------------------------------------
def build_lm(
    spec: dict[str, Any] | None,
    given: Any = None,
    *,
    trusted_only: bool,
    allowed: Any = None,
) -> Any:
    """The run's LM: ``given`` (an LM object, or the spec of one the caller named by a
    string), else rebuilt from its spec (see ``optimizers.runs._lm_spec`` for the kinds).
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
    if spec.get("kind") == "none":
        return None
    raise CheckpointError(
        "this run's metric was defined in the notebook and is not stored in checkpoints",
        hint="pass metric= to resume() (or the teleprompter itself: teleprompter=)",
    )


# Runs written before other optimizers than MIPROv2 name no teleprompter: it is that one.
MIPROV2_CLASS = "dspy.teleprompt.mipro_optimizer_v2:MIPROv2"


def teleprompter_record(spec: dict[str, Any]) -> dict[str, Any]:
    """The run.json's teleprompter: its class ("module:qualname") and display name."""
    return spec.get("teleprompter") or {"class": MIPROV2_CLASS, "name": "MIPROv2"}


def lm_specs(spec: dict[str, Any]) -> dict[str, Any]:
    """The teleprompter's LM arguments as run.json records them (by constructor name)."""
    if "lms" in spec:
        return dict(spec["lms"] or {})
    return {"task_model": spec.get("task_lm"), "prompt_model": spec.get("prompt_lm")}


def build_teleprompter(
    spec: dict[str, Any],
    objects: dict[str, Any],
    *,
    trusted_only: bool,
    allowed: Any = None,
) -> tuple[Any, Any]:
    """The run's teleprompter and the LM its program runs with (``dspy.context(lm=)``).

    The teleprompter is the user's own object when it came by value (``dspex.compile``;
    its LMs were replaced by shippable copies in the notebook), else built from run.json:
    its class (a trusted folder's only from allowed modules) called with the recorded
    constructor arguments, the metric and the LMs."""
    if trusted_only and allowed is None:
        allowed = trusted_module_roots()
    built: dict[str, Any] = {}  # the same LM record gives the same LM object

    def lm_for(record: Any, given: Any) -> Any:
        if given is not None:
            return build_lm(None, given, trusted_only=False)
        if record is None:
            return None
        key = repr(record)
        if key not in built:
            built[key] = build_lm(record, None, trusted_only=trusted_only, allowed=allowed)
        return built[key]

    lm = lm_for(spec.get("task_lm"), objects.get("task_lm"))
    given_lms = objects.get("lms")
    if given_lms is None:  # MIPROv2.resume(task_lm=, prompt_lm=)
        given_lms = {"task_model": objects.get("task_lm"), "prompt_model": objects.get("prompt_lm")}
    teleprompter = objects.get("teleprompter")
    if teleprompter is not None:
        for name, given in given_lms.items():
            if given is not None:
                setattr(teleprompter, name, lm_for(None, given))
        return teleprompter, lm
    record = teleprompter_record(spec)
    cls = _resolve(record["class"], allowed if trusted_only else None, "teleprompter class")
    if not (isinstance(cls, type) and issubclass(cls, dspy.teleprompt.Teleprompter)):
        raise ForbiddenReferenceError(
            f"teleprompter class {record['class']!r} is not a dspy Teleprompter; it was not called",
            hint="pass teleprompter= to dspex.resume() (the optimizer object you ran)",
        )
    kwargs = dict(spec.get("optimizer") or {})
    kwargs["metric"] = build_metric(spec["metric"], objects.get("metric"), allowed=allowed)
    for name, entry in lm_specs(spec).items():
        value = lm_for(entry, given_lms.get(name))
        if value is not None:
            kwargs[name] = value
    for name, default in adapter_for(cls).lm_defaults.items():
        if kwargs.get(name) is None and kwargs.get(default) is not None:
            kwargs[name] = kwargs[default]
    return cls(**kwargs), lm


def metric_of(teleprompter: Any) -> Any:
    """The teleprompter's metric (GEPA keeps it as ``metric_fn``)."""
    metric = getattr(teleprompter, "metric", None)
    return metric if metric is not None else getattr(teleprompter, "metric_fn", None)


# ---- runs in this kernel -------------------------------------------------------------
RUNS: dict[str, RunRecorder] = {}


def error_event(error: BaseException, rec: RunRecorder) -> dict[str, Any]:
    """What the client needs to raise the right error: its type, and for an LM failure
    its kind (``details["lm_failure"]``, with the model and key variable to name in the
    hint). Every failure stops at a clean snapshot."""
    from .lm_failures import lm_failure_details

    remote = getattr(error, "remote", None)  # met in an eval pool's kernel: as it was there
    details = remote["details"] if remote else lm_failure_details(error)
    return {
        "error_type": remote["type"] if remote else type(error).__name__,
        "module": remote["module"] if remote else type(error).__module__,
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
        check_dspy_version()  # adapters follow one DSPy release: refuse others clearly
        teleprompter, lm = build_teleprompter(spec, objects, trusted_only=trusted_only)
        run_metric = metric_of(teleprompter)  # before an adapter wraps it
        adapter = adapter_for(type(teleprompter))
        program = build_program(spec["program"], objects.get("program"))
        program = attach_sources(program, objects.get("sources"))  # inspect reads its cells
        trainset = [example_from_json(e) for e in data["trainset"]]
        valset = [example_from_json(e) for e in data["valset"]] if data.get("valset") else None
        budget = objects.get("budget") or spec.get("budget")
        run = RunContext(rec, adapter, spec.get("recovery"), budget)
        rec.context = run
        optimizer = adapter.make_optimizer(teleprompter, run)
        evaluation: Any = contextlib.nullcontext()
        if objects.get("eval_pool"):  # dspex.compile(..., eval_pool=): see eval_remote.py
            from .eval_remote import RemoteEvaluator, remote_evaluation

            evaluator = RemoteEvaluator(rec, run, program, run_metric, trainset, valset)
            evaluation = remote_evaluation(evaluator)
        rec.emit(
            "status",
            status="running",
            restored_phase=rec.restored.get("phase"),
            budget=budget,
            optimizer=run.name,
            resume=adapter.resume,
        )
        count_cache_hits()
        # A long-lived kernel stays flat: DSPy would append every prediction to one
        # process-wide settings.trace and every LM call to GLOBAL_HISTORY (each up to
        # 10,000 entries, ~0.6 MiB a short run). Optimizers do not read them; the run's
        # LMs are copies in this kernel whose history nobody sees, and usage is counted
        # by the run's own tracker.
        with (
            routed_to(rec.log),
            dspy.context(lm=lm, usage_tracker=rec.usage, trace=[], disable_history=True),
        ):
            # Compile options that are not JSON (a teacher program) came by value.
            options = {**spec["compile"], **(objects.get("compile_kwargs") or {})}
            with evaluation:
                best = adapter.compile(
                    optimizer, program, run, trainset=trainset, valset=valset, **options
                )
        summary = dict(adapter.summary(optimizer, best, run))
        rec.result = {
            **summary,
            "program_state": best.dump_state(),
            "optimizer": run.name,
            "best_score": summary.get("best_score"),
            "usage": rec.usage_totals(),
        }
        rec.checkpoint("done", "completed", wait=True, result=rec.result)
        rec.result_program = _shippable_program(best) if adapter.ships_program else None
        trials = rec.result.get("trials")
        rec.emit(
            "complete",
            optimizer=run.name,
            best_score=rec.result["best_score"],
            usage=rec.result["usage"],
            trials=len(trials) if isinstance(trials, list) else None,
            metric_calls=run.metric_calls,
        )
        rec.finish("completed")
    except RunCancelled as exc:
        _cancelled(rec, clean=exc.clean)
    except BaseException as exc:
        if rec.stop_error is not None:  # a budget stopped it from inside DSPy's code
            error: BaseException = rec.stop_error
        elif isinstance(exc, _StopRun) or rec.cancel_requested.is_set():
            _cancelled(rec, clean=False)
            return
        else:
            error = exc.error if isinstance(exc, TrialAbandoned) else exc
        rec.emit("error", **error_event(error, rec))
        rec.finish("failed")


def _cancelled(rec: RunRecorder, *, clean: bool) -> None:
    if clean:  # between steps: this moment is a clean snapshot of its own
        path: Path | None = rec.checkpoint(
            rec.progress.get("phase", "started"), "cancelled", wait=True
        )
    else:  # inside a step: the last snapshot (after the last whole step) is the one
        rec.flush()
        path = rec.last_snapshot
    rec.emit("cancelled", checkpoint=str(path) if path else None, usage=rec.usage_totals())
    rec.finish("cancelled")


def _shippable_program(program: Any) -> Any:
    """The compiled program itself, for the notebook (in memory only), when it pickles:
    an optimizer may return more than its state says (KNNFewShot patches ``forward``)."""
    try:
        import cloudpickle

        cloudpickle.dumps(program)
    except Exception:
        return None
    return program


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
        name=f"dspex-run-{rec.run_id}",
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
    # The kernel's own folder when the notebook's is not reachable from here (it gets the
    # files back: runtime/checkpoint_mirror.py).
    folder = CheckpointDir(spec.get("kernel_checkpoint_dir") or spec["checkpoint_dir"])
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
    given_tp = objects.get("teleprompter") is not None
    # What the kernel would import, in the order the error names it.
    stored: dict[str, Any] = {"program": program if program.get("kind") != "value" else None}
    given: dict[str, Any] = {"program": objects.get("program")}
    if not given_tp:
        stored["metric"] = metric if metric.get("kind") == "ref" else None
        given["metric"] = objects.get("metric")
    stored["task_lm"], given["task_lm"] = spec.get("task_lm"), objects.get("task_lm")
    if not given_tp:
        if "lms" in spec:
            for name, entry in spec["lms"].items():
                stored[name], given[name] = entry, (objects.get("lms") or {}).get(name)
        else:  # MIPROv2's run.json: its two LMs by the names MIPROv2.resume() takes
            stored["prompt_lm"] = spec.get("prompt_lm")
            given["prompt_lm"] = objects.get("prompt_lm")
        record = teleprompter_record(spec)
        if not module_allowed(record["class"].partition(":")[0], ("dspy",)):
            stored["teleprompter"], given["teleprompter"] = {"ref": record["class"]}, None
    needed = [k for k, v in stored.items() if v is not None and given.get(k) is None]
    if trust is None and needed:
        names = ", ".join(f"{k} {_reference_text(stored[k])}" for k in needed)
        raise UntrustedCheckpointError(
            f"{folder.path} was not signed with this user's dspex key, so dspex will not "
            f"import the code it names ({names}); nothing was imported",
            hint=UNTRUSTED_HINT,
        )
    # Built here, with the folder's trusted modules (everything needed was given when
    # the folder is untrusted; a dspy teleprompter class is DSPy's own).
    allowed = tuple(trust["trusted_modules"]) if trust is not None else ("dspy",)
    objects["program"] = build_program(spec["program"], objects.get("program"), allowed=allowed)
    teleprompter, lm = build_teleprompter(spec, objects, trusted_only=True, allowed=allowed)
    objects["teleprompter"], objects["task_lm"] = teleprompter, lm
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


def request_checkpoint(run_id: str, then_stop: bool = False) -> dict[str, Any]:
    """Ask for a snapshot at the run's next safe point; ``then_stop``: and stop there
    (cancelled, resumable from that snapshot)."""
    rec = _run(run_id)
    if rec.finished:
        raise RuntimeError(f"run {run_id} has finished ({rec.status}); nothing to checkpoint")
    with rec.cond:
        rec.checkpoint_requests += 1
        rec.checkpoint_requested.set()
        if then_stop:
            rec.stop_after_request = rec.checkpoint_requests
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
        "run_threads": [n for n in names if n.startswith(("dspex-run-", "dspex-ckpt-"))],
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
    answer = rec.result
    if rec.result_program is not None:
        answer = {**answer, "program": rec.result_program}  # in memory, never on disk
    if forget_run:
        forget(run_id)
    return answer
