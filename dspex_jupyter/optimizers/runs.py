"""Any DSPy optimizer in a dedicated session: the notebook-side handle of a run.

``compile(teleprompter, student, trainset=..., pool=...)`` returns at once; the run goes
on in a session's kernel (on a thread there, so the kernel still answers "checkpoint
now" and "cancel"; ``runtime/runs.py``), and its events stream back into ``run.events``
while the notebook keeps executing cells. ``MIPROv2`` (``optimizers/mipro.py``) is a thin
layer over the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointDir, example_to_json, scrub_secrets
from ..core import history, lifecycle
from ..core.errors import (
    DspexError,
    InvalidEvalPool,
    InvalidLM,
    InvalidSpec,
    InvalidTeleprompter,
    KernelDied,
    NothingToResume,
    PoolNotFound,
    RemoteError,
    classify,
)
from ..core.eval_dispatch import EvalDispatcher
from ..core.pool import Pool
from ..core.recovery import RecoveryPolicy
from ..core.session import Session
from ..runtime.sources import class_sources, defined_in_memory, program_parts
from ..trust import kernel_trust, modules_named, sign_checkpoint, sign_new_run
from . import checkpoint_mirror

RUNTIME = "dspex_jupyter.runtime.runs"
EVAL_RUNTIME = "dspex_jupyter.runtime.eval_remote"
# cancel(): how long the run gets to stop at a safe point before its kernel is killed
# (its thread there cannot be interrupted: it is not the kernel's main thread).
CANCEL_GRACE_S = 2.5
# Runs of this process by run id (a resumed run replaces its predecessor), for dashboards.
_live_runs: weakref.WeakValueDictionary[str, OptimizationRun] = weakref.WeakValueDictionary()


def live_runs() -> list[OptimizationRun]:
    """The runs of this process that something still references (notebook widgets use it)."""
    return list(_live_runs.values())


class RunCancelled(DspexError):
    """The run was cancelled; it can be resumed from its checkpoint."""


class RunFailed(DspexError):
    """The run stopped on an error; it can be resumed from its last checkpoint."""


# ---- what travels to the kernel ------------------------------------------------------
def _callable_spec(obj: Any, what: str) -> tuple[dict[str, Any], Any]:
    """An import path travels as a reference (and survives in checkpoints); anything
    else travels by value, in memory only."""
    if isinstance(obj, str):
        if not _IMPORT_PATH.match(obj):
            raise InvalidSpec(
                f"{what} reference {obj!r} must look like 'package.module:name'",
                hint=f"name the {what} by its import path, or pass the object itself",
            )
        return {"kind": "ref", "ref": obj}, None
    if obj is None:
        raise InvalidSpec(f"{what} is required", hint=f"pass {what}= (an object or 'pkg.mod:name')")
    return {"kind": "value"}, obj


def _program_spec(program: Any) -> tuple[dict[str, Any], Any]:
    if isinstance(program, str):
        return _callable_spec(program, "program")
    import dspy

    if not isinstance(program, dspy.Module):
        raise TypeError(
            f"program must be a dspy.Module or 'module:name', got {type(program).__name__}"
        )
    cls = type(program)
    if cls in (dspy.Predict, dspy.ChainOfThought):
        signature = _signature_text(program)
        if signature is not None:
            spec = {
                "kind": "dspy",
                "class": f"{cls.__module__}:{cls.__qualname__}",
                "signature": signature,
                "state": program.dump_state(),
            }
            return spec, None
    return {"kind": "value", "class": f"{cls.__module__}:{cls.__qualname__}"}, program


def _signature_text(program: Any) -> str | None:
    predictor = program.predictors()[0] if program.predictors() else None
    signature = getattr(predictor, "signature", None)
    if signature is None:
        return None
    inputs = ", ".join(signature.input_fields)
    outputs = [n for n in signature.output_fields if n != "reasoning"]
    return f"{inputs} -> {', '.join(outputs)}"


# An import path: dotted names, one colon, dotted names ("package.module:name").
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# A model name DSPy routes by its provider prefix ("openai/gpt-4o-mini", "ollama_chat/x:8b").
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]+/\S+$")


def _lm_spec(lm: Any) -> dict[str, Any] | None:
    """What a run records about an LM (in run.json) and how the kernel gets it:

    - ``model``: a model name, built as ``dspy.LM(name)`` in the kernel, where the pool's
      ``env_vars`` hold the keys and its packages choose the engine; rebuilt on resume;
    - ``ref``: an import path naming an LM or a zero-argument function returning one,
      imported in the kernel (on resume only from trusted modules);
    - ``state``: an LM object whose ``dump_state()`` works: shipped by value, and
      rebuildable from the checkpoint;
    - ``value``: any other ``dspy.BaseLM`` (a custom engine without ``dump_state()``, a
      class defined in the notebook): shipped by value, in memory only; the checkpoint
      records its settings for the record, and resume needs it passed again.
    """
    if lm is None:
        return None
    if isinstance(lm, str):
        return _lm_reference(lm)
    import dspy

    if not isinstance(lm, dspy.BaseLM):
        raise InvalidLM(f"an LM must be a dspy.BaseLM or a string, got {type(lm).__name__}")
    cls = type(lm)
    class_path = f"{cls.__module__}.{cls.__qualname__}"
    try:
        if defined_in_memory(cls):
            raise TypeError(f"its class {cls.__qualname__} is defined in the notebook")
        state = scrub_secrets(lm.dump_state())
        json.dumps(state)
    except Exception as exc:  # DSPy refuses (TypeError) or the state is not JSON
        why = str(exc).partition(":")[0]  # DSPy's first clause says what cannot be saved
        return {"kind": "value", "class": class_path, **_lm_record(lm), "unsaved": why}
    return {"kind": "state", "class": class_path, "state": state}


def _lm_reference(text: str) -> dict[str, Any]:
    """A string LM: an import path or a model name; anything else is refused here, before
    a session is taken (DSPy itself would fail later, with "LM must be an instance...")."""
    if _IMPORT_PATH.match(text):
        return {"kind": "ref", "ref": text}
    if _MODEL_NAME.match(text):
        return {"kind": "model", "model": text}
    raise InvalidLM(
        f"LM {text!r} is neither a model name 'provider/model' nor an import path "
        "'package.module:name'"
    )


def _lm_record(lm: Any) -> dict[str, Any]:
    """The settings of an LM that cannot be saved whole, as far as they are JSON."""
    import dspy

    engine = getattr(lm, "_engine_spec", None)
    record: dict[str, Any] = {"model": getattr(lm, "model", None)}
    if engine is not None and not isinstance(engine, str):
        record["engine"] = f"{type(engine).__module__}:{type(engine).__qualname__}"
    try:
        settings = scrub_secrets(dspy.BaseLM.dump_state(lm))
        json.dumps(settings)
    except Exception:  # settings that are not JSON: the model name is all we keep
        return record
    return {**record, "settings": settings}


def _shippable_lm(lm: Any) -> Any:
    """The LM as it travels to the kernel: its settings and engine, without the calls it
    made in the notebook. ``history`` keeps every call (~1.5 KB each) and would otherwise
    be pickled along and copied again in the kernel by every ``lm.copy()``. A string
    travels as its spec: the kernel builds that LM (``runtime.mipro.build_lm``), which on
    resume replaces the checkpoint's."""
    if isinstance(lm, str):
        return _lm_reference(lm)
    if lm is None or not getattr(lm, "history", None):
        return lm
    shipped = copy.copy(lm)
    shipped.history = []
    return shipped


def _shippable_lms(task_lm: Any, prompt_lm: Any) -> dict[str, Any]:
    task = _shippable_lm(task_lm)
    return {
        "task_lm": task,
        "prompt_lm": task if prompt_lm is task_lm else _shippable_lm(prompt_lm),
    }


def _program_sources(program: Any) -> dict[str, Any]:
    """The notebook cells the program's classes (its modules and signatures) come from,
    sent with the run so ``inspect.getsource`` works in the kernel as it does here: DSPy's
    program-aware proposer puts that source into its prompts (runtime/sources.py)."""
    import dspy

    if not isinstance(program, dspy.Module):
        return {}
    return class_sources(program_parts(program))


# ---- the result ----------------------------------------------------------------------
class OptimizedModule:
    """The best program a run found: its state (JSON), instructions, demos and metadata."""

    def __init__(self, result: dict[str, Any], spec: dict[str, Any], program: Any = None):
        self.state: dict[str, Any] = result["program_state"]
        self._spec = spec
        self._program = program
        # What compile returned, when it is more than its state (KNNFewShot's forward).
        self.compiled: Any = result.get("program")
        record = spec.get("teleprompter") or {}
        self.optimizer: str = result.get("optimizer") or record.get("name") or "MIPROv2"
        extra = {
            k: v
            for k, v in result.items()
            if k not in ("program", "program_state", "best_score", "usage", "optimizer")
        }
        self.metadata = {
            "optimizer": self.optimizer,
            "config": {
                "optimizer": spec.get("optimizer", {}),
                "compile": spec.get("compile", {}),
                "teleprompter": record.get("class", MIPROV2_CLASS),
            },
            "metrics": {"best_score": result.get("best_score"), "usage": result.get("usage")},
            "best_params": result.get("best_params"),
            "trials": result.get("trials", []),
            **{k: v for k, v in extra.items() if k not in ("best_params", "trials")},
        }

    @property
    def instructions(self) -> dict[str, str]:
        return {name: p["signature"]["instructions"] for name, p in self.state.items()}

    @property
    def demos(self) -> dict[str, list[dict[str, Any]]]:
        return {name: p.get("demos", []) for name, p in self.state.items()}

    @property
    def score(self) -> float | None:
        return self.metadata["metrics"]["best_score"]

    def save(self, path: str | Path) -> Path:
        """Write the program's state in the JSON of DSPy's ``module.save("x.json")`` (state
        plus DSPy's dependency metadata), so ``program.load(path)`` reads it back."""
        import json

        from dspy.utils.saving import get_dependency_versions

        path = Path(path)
        document = {**self.state, "metadata": {"dependency_versions": get_dependency_versions()}}
        path.write_text(json.dumps(document, indent=2))
        return path

    def to_dspy(self, program: Any = None) -> Any:
        """The optimized program as a DSPy module in this process."""
        import dspy

        if program is None and self.compiled is not None:
            try:
                return self.compiled.deepcopy()
            except Exception:  # a module whose parts do not deep-copy: the one received
                return self.compiled
        if program is None:
            program = self._program
        if program is None and self._spec["program"].get("kind") == "dspy":
            # The spec may come from a checkpoint: only DSPy's own classes (checked before
            # anything is imported), and only a dspy.Module subclass is called.
            from ..checkpoint import ForbiddenReferenceError, import_reference

            ref = self._spec["program"]["class"]
            cls = import_reference(ref, ("dspy",), "program class")
            if not (isinstance(cls, type) and issubclass(cls, dspy.Module)):
                raise ForbiddenReferenceError(
                    f"program class {ref!r} is not a dspy.Module subclass; it was not called",
                    hint="pass an instance of the program: optimized.to_dspy(MyProgram())",
                )
            program = cls(self._spec["program"]["signature"])
        if program is None:
            raise DspexError(
                "this program was defined in the notebook",
                hint="pass an instance of it: optimized.to_dspy(MyProgram())",
            )
        if not isinstance(program, dspy.Module):
            raise TypeError("to_dspy() needs a dspy.Module instance")
        fresh = program.deepcopy()
        fresh.load_state(self.state)
        return fresh

    def __repr__(self) -> str:
        return (
            f"<OptimizedModule {self.optimizer} best_score={self.score} "
            f"predictors={list(self.state)}>"
        )


# ---- the run -------------------------------------------------------------------------
class OptimizationRun:
    """An optimizer's run in a session's kernel: live status, events, checkpoint, cancel."""

    def __init__(
        self,
        session: Session,
        run_id: str,
        checkpoint_dir: Path,
        spec: dict[str, Any],
        program: Any = None,
        objects: dict[str, Any] | None = None,
        recovery: RecoveryPolicy | None = None,
    ) -> None:
        self.session = session
        session.owner = self  # restored with the run, not as a plain session
        self.pool = session.pool
        self.recovery = recovery or RecoveryPolicy()
        self.auto_resumes = 0
        self.cancelled_after_trials: int | None = None  # trials done when cancel arrived
        self._objects = objects or {}
        self.run_id = run_id
        self.checkpoint_dir = checkpoint_dir
        self.spec = spec
        self.events: list[dict[str, Any]] = []
        self.status = "starting"
        self.error: BaseException | None = None
        self.metrics: dict[str, Any] = {
            "trials": 0,
            "best_score": None,
            "usage": {},
            "progress": {},  # every "progress" event's fields merged (the newest win)
        }
        self.progress_events: list[dict[str, Any]] = []
        record = spec.get("teleprompter") or {}
        self.optimizer: str = record.get("name") or "MIPROv2"  # as the kernel names it too
        self.resume_kind: str | None = None  # "exact" | "step" | "restart" (kernel says)
        self._program = program
        self._callbacks: list[Callable[[dict[str, Any]], None]] = []
        self._done = threading.Event()
        self._changed = threading.Condition()
        self._result: OptimizedModule | None = None
        self._consumer: asyncio.Future[None] | None = None
        self._cancelling = False  # cancel() asked: a kernel death now means "cancelled"
        # The notebook objects it was started with (program, metric, LMs): resume needs them.
        self.resume_objects: dict[str, Any] = {}
        # Modules the user named in optimize(): a resume from this process may import them.
        self.trusted_modules: tuple[str, ...] = ()
        # eval_pool=: the run's evaluations spread over that pool (core/eval_dispatch.py).
        self.eval_pool: Pool | None = None
        self.eval_dispatch: EvalDispatcher | None = None
        _live_runs[run_id] = self

    @property
    def log_path(self) -> Path:
        """What DSPy printed during the run (logs, progress bars), kept across resumes."""
        return CheckpointDir(self.checkpoint_dir).log_file

    def __repr__(self) -> str:
        return (
            f"<OptimizationRun {self.run_id} {self.status} trials={self.metrics['trials']} "
            f"best={self.metrics['best_score']}>"
        )

    # ---- live events ----------------------------------------------------------------
    def on_event(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback(event)`` for every event (those already received first)."""
        with self._changed:
            past = list(self.events)
            self._callbacks.append(callback)
        for event in past:
            callback(event)

    def follow_events(self, start: int = 0) -> None:
        """Stream the run's events from the kernel into ``events`` (called by ``optimize``
        and ``resume``; the stream ends when the run does)."""
        runner = self.session.runner
        self._consumer = asyncio.wrap_future(runner.submit(self._consume(start)), loop=runner.loop)

    async def _consume(self, start: int) -> None:
        try:
            while True:
                try:
                    async for event in self.session.stream(f"{RUNTIME}:events", self.run_id, start):
                        self._apply(event)
                    break
                except KernelDied as exc:
                    if self._cancelling:  # cancel() killed the kernel of a run that hung
                        self._cancelled_by_kill()
                        break
                    if not await self._auto_resume(exc):
                        raise
                    start = 0
        except BaseException as exc:  # the kernel died for good, or the stream failed
            self.error = exc
            self.status = "failed"
        finally:
            await self._collect_and_release()
            with self._changed:
                self._changed.notify_all()
            self._done.set()

    async def _collect_and_release(self) -> None:
        """The run ended (completed, failed or cancelled): take its result, let the kernel
        forget it, and give the kernel back, so the pool's next run starts at once."""
        try:
            await self._collect_from_kernel()
        finally:  # then the eval kernels go back to their pool (after the run's: cancel()
            if self.eval_dispatch is not None:  # kills a run kernel not given back in time)
                await self.eval_dispatch.aclose()

    async def _collect_from_kernel(self) -> None:
        session = self.session
        if not session.active:
            return
        try:
            if self.status == "completed":  # one round trip: the result, and forget it
                result = await session.acall(f"{RUNTIME}:result", self.run_id, True)
                self._result = OptimizedModule(result, self.spec, self._program)
            else:
                await session.acall(f"{RUNTIME}:forget", self.run_id)
        except BaseException as exc:
            if self.status == "completed":
                self.error, self.status = exc, "failed"
        finally:
            if session.active:
                await session.arelease()

    def _cancelled_by_kill(self) -> None:
        """The run's kernel was killed by cancel(): the run ends at its last snapshot,
        every one of which is clean (none is written after a step that met an error)."""
        self._apply(
            {
                "seq": -1,
                "time": time.time(),
                "kind": "cancelled",
                "checkpoint": self._latest_snapshot(),
                "kernel_killed": True,
            }
        )

    def _latest_snapshot(self) -> str | None:
        path, _, _ = CheckpointDir(self.checkpoint_dir).newest_readable()
        return str(path) if path else None

    async def _auto_resume(self, exc: BaseException) -> bool:
        """The run's kernel died: on a fresh kernel, go on from the last checkpoint."""
        if self.auto_resumes >= self.recovery.auto_resume or self.status == "cancelled":
            return False
        self.auto_resumes += 1
        self._apply(
            {
                "seq": -1,
                "time": time.time(),
                "kind": "recovery",
                "action": "resume",
                "attempt": self.auto_resumes,
                "reason": str(exc).splitlines()[0],
            }
        )
        pool = self.pool
        if not await pool.await_ready(timeout=120):
            return False
        session = await pool.asession(None, timeout=120, call_timeout=None)
        try:
            folder = await checkpoint_mirror.aresume_folder(
                session, self.checkpoint_dir, self.run_id
            )
            await session.acall(
                f"{RUNTIME}:resume_run",
                folder,
                self._objects,
                None,
                _resume_trust(self),
            )
        except BaseException:
            await session.arelease()
            raise
        self.session = session
        session.owner = self
        self.status = "running"
        return True

    def _apply(self, event: dict[str, Any]) -> None:
        mirrored = checkpoint_mirror.on_event(self.checkpoint_dir, event)  # files, not events
        if mirrored is None:
            return
        event = mirrored
        kind = event["kind"]
        if kind == "eval_request":  # work for the eval pool, not a run event to keep
            self._dispatch_evaluation(event)
            return
        if kind == "trial":
            self.metrics["trials"] = max(self.metrics["trials"], event["number"])
            self.metrics["best_score"] = event["best_score"]
            self.metrics["usage"] = event.get("usage", {})
        elif kind == "status":
            self.status = event["status"]
            self.metrics["budget"] = event.get("budget") or None
            self.optimizer = event.get("optimizer") or self.optimizer
            self.resume_kind = event.get("resume") or self.resume_kind
        elif kind == "progress":
            fields = {k: v for k, v in event.items() if k not in ("seq", "time", "kind")}
            self.metrics["progress"] = {**self.metrics["progress"], **fields}
            if isinstance(event.get("best_score"), int | float):
                self.metrics["best_score"] = event["best_score"]
            self.progress_events.append(event)
        elif kind == "phase":
            self.metrics["phase"] = event["phase"]
            if self.status in ("starting", "running"):
                self.status = "running"
        elif kind == "complete":
            self.status = "completed"
            if event.get("best_score") is not None or self.optimizer == "MIPROv2":
                self.metrics["best_score"] = event["best_score"]
            self.metrics["usage"] = event["usage"]
        elif kind == "cancelled":
            self.status = "cancelled"
            if not event.get("checkpoint"):
                event = {**event, "checkpoint": self._latest_snapshot()}
        elif kind == "error":
            self.status = "failed"
            self.metrics["usage"] = event.get("usage", self.metrics["usage"])
            error = {
                "type": event["error_type"],
                "module": event["module"],
                "message": event["message"],
                "traceback": event.get("traceback"),
                "details": event.get("details") or {},
            }
            self.error = classify(error, self.session.where())
        elif kind == "waiting":
            self.metrics["waiting"] = event
        elif kind == "recovery" and event.get("action") == "lm_back":
            self.metrics.pop("waiting", None)
        elif kind == "warning":
            self.metrics.setdefault("warnings", []).append(event["message"])
        self._record(event)

    def _record(self, event: dict[str, Any]) -> None:
        with self._changed:
            self.events.append(event)
            callbacks = list(self._callbacks)
            self._changed.notify_all()
        for callback in callbacks:
            try:
                callback(event)
            except Exception:  # a broken callback must not stop the run's bookkeeping
                import logging

                logging.getLogger("dspex_jupyter").exception("run event callback failed")

    def attach_eval_pool(self, pool: Pool, kernels: int, data: dict[str, Any]) -> None:
        """Spread the run's evaluations over ``kernels`` kernels of ``pool``; called before
        the run's events are followed (its first request may come at once)."""
        verdict = kernel_trust(self.checkpoint_dir, self.trusted_modules)
        allowed = list(verdict["trusted_modules"]) if verdict else ["dspy"]
        shipped = ("teleprompter", "task_lm", "lms", "program", "metric", "sources")
        self.eval_pool = pool
        self.eval_dispatch = EvalDispatcher(
            pool,
            run_id=self.run_id,
            spec=self.spec,
            data=data,
            objects={k: v for k, v in self._objects.items() if k in shipped},
            allowed=allowed,
            kernels=kernels,
            on_shard=lambda info: self._record(
                {"seq": -1, "time": time.time(), "kind": "eval_shard", **info}
            ),
        )

    def _dispatch_evaluation(self, event: dict[str, Any]) -> None:
        session = self.session  # the answer goes to the kernel that asked, never a later one

        async def answer(number: int, payload: dict[str, Any]) -> Any:
            return await session.acall(f"{EVAL_RUNTIME}:answer", self.run_id, number, payload)

        if self.eval_dispatch is None:  # cannot happen: the kernel asks only when told to
            payload = {"failed": "this run has no eval pool in this process"}
            asyncio.get_running_loop().create_task(answer(int(event["request"]), payload))
            return
        self.eval_dispatch.submit(event, answer)

    def wait_for_event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float | None = None
    ) -> dict[str, Any]:
        """Block until an event matching ``predicate`` has arrived; return it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                if self._done.is_set():
                    raise DspexError(f"run {self.run_id} ended ({self.status}) before that event")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no such event from run {self.run_id} within {timeout} s")
                self._changed.wait(remaining)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def notice(self) -> str | None:
        """One line on what the run is waiting for or warns about (sidebar, dashboard):
        "waiting for the LM: connection refused, next try in 8 s"."""
        from ..notebook.run_progress import waiting_line

        if self.metrics.get("waiting") and not self.done:
            return waiting_line(self.metrics["waiting"])
        warnings = self.metrics.get("warnings") or []
        return warnings[-1] if warnings else None

    # ---- control --------------------------------------------------------------------
    def checkpoint(self, timeout: float | None = 120, *, then_stop: bool = False) -> Path:
        """Write a checkpoint at the next safe point (within one trial); its path.
        ``then_stop``: the run stops there (cancelled), resumable from that checkpoint."""
        request = self.session.call(f"{RUNTIME}:request_checkpoint", self.run_id, then_stop)[
            "request"
        ]
        event = self.wait_for_event(
            lambda e: e["kind"] == "checkpoint" and e.get("serves_request", 0) >= request, timeout
        )
        return Path(event["path"])

    def cancel(self, timeout: float | None = 120) -> Path | None:
        """Stop the run within a few seconds, whatever its LM is doing, and return the
        checkpoint it can resume from exactly. The run stops at its next safe point; if
        it does not within ``CANCEL_GRACE_S`` (a call hung on its LM, say), its kernel is
        killed (the pool replaces it) and the run ends at its last snapshot."""
        grace = CANCEL_GRACE_S if timeout is None else min(CANCEL_GRACE_S, timeout)
        deadline = time.monotonic() + grace
        if not self.done:
            self._cancelling = True
            try:
                answer = self.session.runner.run(
                    self.session.acall(f"{RUNTIME}:cancel", self.run_id), timeout=grace
                )
                self.cancelled_after_trials = answer["trials_done"]
            except Exception:  # no answer in time, or the kernel is gone: kill below
                self.cancelled_after_trials = self.metrics["trials"]
            stopped = self._done.wait(max(0.0, deadline - time.monotonic()))
            if not stopped and self.session.active:
                self.session.kill()
            self._done.wait(timeout)
        for event in reversed(self.events):
            if event["kind"] == "cancelled":
                return Path(event["checkpoint"]) if event.get("checkpoint") else None
        return None

    def checkpoints(self) -> list[dict[str, Any]]:
        """The run's checkpoints: time, phase, trial, best score (for resume)."""
        return CheckpointDir(self.checkpoint_dir).listing()

    def result(self, timeout: float | None = None) -> OptimizedModule:
        """Wait for the run to finish; the optimized program, or the run's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"run {self.run_id} still {self.status} after {timeout} s")
        if self._result is not None:
            return self._result
        if self.status == "cancelled":
            raise RunCancelled(
                f"run {self.run_id} was cancelled",
                hint=f"resume it: dspex.resume({str(self.checkpoint_dir)!r}, pool=...)",
            )
        if isinstance(self.error, RemoteError | DspexError):
            raise self.error
        raise RunFailed(
            f"run {self.run_id} failed: {self.error}", hint="resume it from its last checkpoint"
        )

    def close(self) -> None:
        """Release the run's session now. A run gives its kernel back by itself when it
        ends; this is for a run you abandon without waiting for it."""
        if self.session.active:
            self.session.release()

    def to_mlflow(self, tracking_uri: str | None = None, experiment: str | None = None) -> str:
        """Log this finished run to MLflow (the ``mlflow`` extra; optimizers/export.py);
        returns the MLflow run id."""
        from .export import to_mlflow

        return to_mlflow(self, tracking_uri, experiment)


def _resume_trust(run: OptimizationRun) -> dict[str, Any] | None:
    """What an automatic resume tells the kernel about the run's folder (trust.py)."""
    return kernel_trust(run.checkpoint_dir, run.trusted_modules)


def _budget(**limits: Any) -> dict[str, Any]:
    """The limits given, checked: positive numbers (a run without one has no budget)."""
    for name, value in limits.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise InvalidSpec(
                f"{name} must be a positive number, got {value!r}",
                hint="give the most the run may spend, e.g. max_calls=500, or leave it out",
            )
    return {name: value for name, value in limits.items() if value is not None}


def _check_resumable(folder: CheckpointDir, snapshot: str | None) -> None:
    """One clear error when there is nothing to go on from: a run that completed."""
    if snapshot:
        from ..checkpoint import CheckpointError, read_json_checked

        try:
            body = read_json_checked(folder.path / Path(snapshot).name)
        except CheckpointError:
            return  # a missing or damaged snapshot: the kernel refuses it with its reason
    else:
        _, body, _ = folder.newest_readable()
    if body.get("phase") == "done":
        raise NothingToResume(
            f"the run in {folder.path} completed; there is nothing to resume",
            hint="use its result (run.result()); to optimize again, start a new run with "
            "another checkpoint_dir",
        )


def _resolve_pool(pool: Pool | str, manager: Any) -> Pool:
    if isinstance(pool, Pool):
        return pool
    if manager is not None:
        return manager.pool(pool)
    from ..core.manager import live_managers

    found = [m.pools[pool] for m in live_managers() if pool in m.pools]
    if len(found) == 1:
        return found[0]
    raise PoolNotFound(
        f"no running pool named {pool!r}" if not found else f"several managers run a pool {pool!r}",
        hint="start it with PoolManager(...).start(), or pass manager= or the Pool itself",
    )


def _resolve_eval_pool(
    eval_pool: Pool | str | None, run_pool: Pool, manager: Any
) -> tuple[Pool | None, int]:
    """(the eval pool, how many of its kernels the run may hold): all of them, or all but
    the run's own when it is the run's pool."""
    if eval_pool is None:
        return None, 0
    pool = _resolve_pool(eval_pool, manager)
    kernels = pool.spec.size - (1 if pool is run_pool else 0)
    if kernels < 1:
        raise InvalidEvalPool(
            f"eval_pool {pool.name!r} is the run's own pool and has one kernel, which the "
            "run itself takes: no kernel would be left to evaluate on"
        )
    return pool, kernels


# ---- graceful shutdown and restore (see core/lifecycle.py) ----------------------------
# How long a graceful shutdown waits for a run's in-flight trial before it cancels it.
SHUTDOWN_CHECKPOINT_WAIT_S = 30.0


def _save_runs(manager: Any) -> list[dict[str, Any]]:
    """Checkpoint and stop every live run on this manager's pools; say where each is."""
    entries = []
    for run in live_runs():
        if (
            run.done
            or run.pool.name not in manager.pools
            or manager.pools[run.pool.name] is not run.pool
        ):
            continue
        # Keep the trial in flight when the LM answers; a hung LM must not hold the
        # shutdown for the checkpoint's whole timeout: cancel then stops it within seconds.
        with contextlib.suppress(TimeoutError, DspexError):
            run.checkpoint(timeout=SHUTDOWN_CHECKPOINT_WAIT_S, then_stop=True)
        path = run.cancel()
        if run.status == "completed":  # it finished before the request: nothing to resume
            run.close()
            continue
        entries.append(
            {
                "run_id": run.run_id,
                "pool": run.pool.name,
                "checkpoint_dir": str(run.checkpoint_dir),
                "snapshot": path.name if path else None,
            }
        )
        run.close()
    return entries


# ---- starting and resuming runs: any DSPy optimizer ----------------------------------
# Display names of the optimizers with adapters of their own (runtime/runs.py's table);
# any other teleprompter is shown by its class name.
OPTIMIZER_NAMES = {
    "dspy.teleprompt.mipro_optimizer_v2:MIPROv2": "MIPROv2",
    "dspy.teleprompt.gepa.gepa:GEPA": "GEPA",
    "dspy.teleprompt.random_search:BootstrapFewShotWithRandomSearch": (
        "BootstrapFewShotWithRandomSearch"
    ),
    "dspy.teleprompt.copro_optimizer:COPRO": "COPRO",
    "dspy.teleprompt.simba:SIMBA": "SIMBA",
}
MIPROV2_CLASS = "dspy.teleprompt.mipro_optimizer_v2:MIPROv2"
# Constructor arguments an optimizer keeps under another attribute name (argument ->
# attribute), so run.json records them and a resume by reference rebuilds it faithfully.
ATTRIBUTE_ALIASES = {
    "dspy.teleprompt.random_search:BootstrapFewShotWithRandomSearch": {
        "max_bootstrapped_demos": "max_num_samples",
        "num_candidate_programs": "num_candidate_sets",
    },
}


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def optimizer_name(teleprompter_class: type) -> str:
    """The name a run of this teleprompter class goes by (its base's, for a subclass of an
    optimizer dspex has an adapter for; as the kernel picks adapters)."""
    for cls in teleprompter_class.__mro__:
        name = OPTIMIZER_NAMES.get(_class_path(cls))
        if name is not None:
            return name
    return teleprompter_class.__name__


def _check_teleprompter(teleprompter: Any) -> None:
    import dspy

    if not isinstance(teleprompter, dspy.teleprompt.Teleprompter):
        if isinstance(teleprompter, type):
            got = f"the class {teleprompter.__name__} (call it to make the optimizer)"
        else:
            got = f"a {type(teleprompter).__name__}"
        raise InvalidTeleprompter(
            "dspex.compile() needs a DSPy optimizer (a dspy.teleprompt.Teleprompter "
            f"instance), got {got}"
        )


def _json_or_none(value: Any) -> Any:
    try:
        value = scrub_secrets(value)
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return value


def _constructor_record(teleprompter: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON constructor arguments, LM constructor arguments) read back from the
    instance: the parameters of its ``__init__`` that it keeps under the same name. They
    are shown in the dashboard and metadata, and rebuild it on a resume by reference."""
    import dspy

    try:
        params = inspect.signature(type(teleprompter).__init__).parameters
    except (TypeError, ValueError):
        params = {}
    args: dict[str, Any] = {}
    lms: dict[str, Any] = {}
    state = vars(teleprompter)
    aliases: dict[str, str] = {}
    for cls in reversed(type(teleprompter).__mro__):
        aliases.update(ATTRIBUTE_ALIASES.get(_class_path(cls), {}))
    for name, param in params.items():
        if name in ("self", "metric") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        attribute = aliases.get(name, name)
        if attribute not in state:
            continue
        value = state[attribute]
        if isinstance(value, dspy.BaseLM):
            lms[name] = value
            continue
        recorded = _json_or_none(value)
        if recorded is not None or value is None:
            args[name] = recorded
    return args, lms


def _shipped_teleprompter(teleprompter: Any) -> Any:
    """A shallow copy of the teleprompter whose LMs are copies without the calls they
    made here (``_shippable_lm``); it travels by value, in memory only, never to disk (its
    locks arrive as new ones: ``protocol.pickle_value``)."""
    import dspy

    shipped = copy.copy(teleprompter)
    copies: dict[int, Any] = {}
    for name, value in list(vars(teleprompter).items()):
        if isinstance(value, dspy.BaseLM):
            if id(value) not in copies:
                copies[id(value)] = _shippable_lm(value)
            setattr(shipped, name, copies[id(value)])
    return shipped


def _metric_record(metric: Any) -> dict[str, Any]:
    """What run.json says of the teleprompter's metric (it travels inside the object)."""
    if metric is None:
        return {"kind": "none"}
    if isinstance(metric, str):
        return _callable_spec(metric, "metric")[0]
    name = getattr(metric, "__qualname__", type(metric).__name__)
    return {"kind": "value", "name": f"{getattr(metric, '__module__', '')}:{name}"}


def _start_run(
    pool: Pool,
    *,
    spec: dict[str, Any],
    program: Any,
    trainset: Sequence[Any],
    valset: Sequence[Any] | None,
    objects: dict[str, Any],
    checkpoint_dir: str | Path | None,
    recovery: RecoveryPolicy,
    session_timeout: float,
    kernel_checkpoint_dir: str | Path | None = None,
    eval_pool: tuple[Pool | None, int] = (None, 0),
) -> OptimizationRun:
    """Start a run in a new session of ``pool``: run.json and data.json are written and
    signed, the kernel starts the run on a thread, and the live handle follows it."""
    run_id = uuid.uuid4().hex[:12]
    folder = Path(checkpoint_dir or Path.cwd() / "dspex-runs" / run_id).expanduser().resolve()
    program_spec, program_obj = _program_spec(program)
    spec = {
        "run_id": run_id,
        "checkpoint_dir": str(folder),
        **spec,
        "program": program_spec,
        "recovery": recovery.to_json(),
    }
    data = {
        "trainset": [example_to_json(e) for e in trainset],
        "valset": [example_to_json(e) for e in valset] if valset is not None else None,
    }
    objects = {
        **objects,
        "program": program_obj,
        "sources": _program_sources(program_obj),  # inspect needs them in the kernel
    }
    if eval_pool[0] is not None:
        objects["eval_pool"] = eval_pool[0].name  # the kernel asks the notebook to evaluate
    session = pool.session(timeout=session_timeout)
    try:
        spec = checkpoint_mirror.start(session, folder, spec, data, kernel_checkpoint_dir)
        session.call(f"{RUNTIME}:start_run", spec, data, objects)
        sign_new_run(folder, spec, data)  # this user wrote it: resumable by references
    except BaseException:
        session.release()
        raise
    run = OptimizationRun(
        session,
        run_id,
        folder,
        spec,
        program if program_obj is not None else None,
        objects=objects,
        recovery=recovery,
    )
    run.resume_objects = objects
    run.trusted_modules = modules_named(spec)  # the user typed these references
    if eval_pool[0] is not None:
        run.attach_eval_pool(eval_pool[0], eval_pool[1], data)
    run.follow_events()
    run_started(run)
    return run


def run_started(run: OptimizationRun) -> None:
    """Called once for every run this process starts or resumes (run history hooks here)."""
    history.follow_run(run)  # records itself in $DSPEX_HOME/runs.sqlite3; never raises


def compile(  # DSPy's own verb: tp.compile(student, trainset=...)
    teleprompter: Any,
    student: Any,
    *,
    trainset: Sequence[Any],
    valset: Sequence[Any] | None = None,
    pool: Pool | str,
    checkpoint_dir: str | Path | None = None,
    wait: bool = False,
    manager: Any = None,
    session_timeout: float = 1800.0,
    recovery: RecoveryPolicy | dict[str, Any] | None = None,
    max_calls: int | None = None,
    max_tokens: int | None = None,
    max_cost: float | None = None,
    kernel_checkpoint_dir: str | Path | None = None,
    eval_pool: Pool | str | None = None,
    **compile_kwargs: Any,
) -> Any:
    """``teleprompter.compile(student, trainset=..., valset=...)`` in a session of
    ``pool``, with live progress, cancel, usage, budgets and checkpoints.

    Any DSPy optimizer works; MIPROv2, GEPA, BootstrapFewShotWithRandomSearch, COPRO and
    SIMBA show their own progress and resume from their checkpoints, any other resumes by
    starting over. The teleprompter travels by value (in memory only); its LMs go without
    the calls they made here. Returns the live ``OptimizationRun`` at once, or with
    ``wait=True`` the optimized ``dspy.Module``, as ``teleprompter.compile`` does.

    ``eval_pool`` (a pool or its name): each ``dspy.Evaluate`` of the run is spread over
    that pool's kernels (all but the run's own when it is ``pool``), with the same result
    as on one kernel: see ``core/eval_dispatch.py``."""
    import dspy

    _check_teleprompter(teleprompter)
    if student is None:
        raise InvalidSpec("compile() needs the program to optimize", hint="pass student=")
    budget = _budget(max_calls=max_calls, max_tokens=max_tokens, max_cost=max_cost)
    pool_obj = _resolve_pool(pool, manager)
    evaluation = _resolve_eval_pool(eval_pool, pool_obj, manager)
    policy = RecoveryPolicy.coerce(recovery if recovery is not None else pool_obj.spec.recovery)
    cls = type(teleprompter)
    args, lms = _constructor_record(teleprompter)
    lm = dspy.settings.lm or getattr(teleprompter, "task_model", None)
    plain = {k: v for k, v in compile_kwargs.items() if _json_or_none(v) is not None}
    spec = {
        "teleprompter": {"class": _class_path(cls), "name": optimizer_name(cls)},
        "optimizer": args,
        "compile": plain,
        "metric": _metric_record(getattr(teleprompter, "metric", None)),
        "task_lm": _lm_spec(lm),
        "lms": {name: _lm_spec(value) for name, value in lms.items()},
        "budget": budget,
    }
    objects = {
        "teleprompter": _shipped_teleprompter(teleprompter),
        "task_lm": _shippable_lm(lm),
        "lms": {},  # the teleprompter brings its own
        "compile_kwargs": {k: v for k, v in compile_kwargs.items() if k not in plain},
    }
    run = _start_run(
        pool_obj,
        spec=spec,
        program=student,
        trainset=trainset,
        valset=valset,
        objects=objects,
        checkpoint_dir=checkpoint_dir,
        recovery=policy,
        session_timeout=session_timeout,
        kernel_checkpoint_dir=kernel_checkpoint_dir,
        eval_pool=evaluation,
    )
    if wait:
        result = run.result()
        if result.compiled is None and isinstance(student, dspy.Module):
            return result.to_dspy(student)  # its state in a copy of the student
        return result.to_dspy()
    return run


def resume(
    checkpoint_dir: str | Path,
    pool: Pool | str,
    *,
    teleprompter: Any = None,
    program: Any = None,
    metric: Any = None,
    lm: Any = None,
    lms: dict[str, Any] | None = None,
    manager: Any = None,
    snapshot: str | None = None,
    session_timeout: float = 1800.0,
    recovery: RecoveryPolicy | dict[str, Any] | None = None,
    trust: bool = False,
    trusted_modules: str | Sequence[str] = (),
    max_calls: int | None = None,
    max_tokens: int | None = None,
    max_cost: float | None = None,
    kernel_checkpoint_dir: str | Path | None = None,
    eval_pool: Pool | str | None = None,
    _legacy_lms: dict[str, Any] | None = None,
) -> OptimizationRun:
    """Go on from a run's newest checkpoint (or ``snapshot``), in a new session: exactly
    for MIPROv2, from the last step for optimizers that checkpoint steps, from the start
    for any other teleprompter (as the README's Optimizers table says).

    Pass the objects the run was started with that its folder cannot rebuild: the
    ``teleprompter`` (or its ``metric`` and ``lms`` by constructor name), the ``program``
    when it was defined in the notebook, the ``lm`` its program ran with. A folder this
    user's key did not sign is data: nothing it names is imported unless ``trust=True``
    (see MIPROv2.resume for the trusted-module rules). A budget given here replaces the
    run's (resume a ``BudgetExceeded`` run with a bigger one). ``eval_pool`` as in
    ``compile`` (a run of this process keeps the one it was started with)."""
    from ..checkpoint import read_json_checked

    if teleprompter is not None:
        _check_teleprompter(teleprompter)
    folder = CheckpointDir(checkpoint_dir)
    spec = read_json_checked(folder.run_file) if folder.run_file.is_file() else None
    if spec is None:
        folder.latest()  # raises the clear "not a dspex run" error
    _check_resumable(folder, snapshot)
    budget = _budget(max_calls=max_calls, max_tokens=max_tokens, max_cost=max_cost)
    if trust:
        sign_checkpoint(folder)
    modules = (trusted_modules,) if isinstance(trusted_modules, str) else tuple(trusted_modules)
    # A run handle of this process may resume with the references its user typed.
    modules += tuple(getattr(_live_runs.get(spec["run_id"]), "trusted_modules", ()))
    verdict = kernel_trust(folder, modules)
    pool_obj = _resolve_pool(pool, manager)
    objects: dict[str, Any] = {
        "program": program,
        "metric": metric,
        "sources": _program_sources(program),  # inspect needs them in the kernel
        "budget": budget or None,
    }
    # A run of this process resumes with what it was started with unless given anew (the
    # dashboard's Resume and MIPROv2.resume reach a dspex.compile run this way too).
    earlier = getattr(_live_runs.get(spec["run_id"]), "resume_objects", None) or {}
    if teleprompter is None and earlier.get("teleprompter") is not None:
        teleprompter = earlier["teleprompter"]
    if earlier.get("compile_kwargs"):
        objects["compile_kwargs"] = earlier["compile_kwargs"]
    earlier_run = _live_runs.get(spec["run_id"])
    if eval_pool is None and earlier_run is not None:
        eval_pool = earlier_run.eval_pool
    evaluation = _resolve_eval_pool(eval_pool, pool_obj, manager)
    if evaluation[0] is not None:
        objects["eval_pool"] = evaluation[0].name
    if _legacy_lms is not None and "lms" in spec:  # MIPROv2.resume of a compile() run
        lm = lm if lm is not None else _legacy_lms.get("task_lm") or earlier.get("task_lm")
        _legacy_lms = None
    if _legacy_lms is not None:  # MIPROv2.resume(task_lm=, prompt_lm=)
        objects.update(_legacy_lms)
    else:
        objects["task_lm"] = _shippable_lm(lm)
        objects["lms"] = {name: _shippable_lm(value) for name, value in (lms or {}).items()}
    if teleprompter is not None:
        objects["teleprompter"] = _shipped_teleprompter(teleprompter)
    session = pool_obj.session(timeout=session_timeout)
    try:
        where = checkpoint_mirror.resume_folder(
            session, folder.path, spec["run_id"], kernel_checkpoint_dir
        )
        session.call(f"{RUNTIME}:resume_run", where, objects, snapshot, verdict)
    except BaseException:
        session.release()
        raise
    policy = RecoveryPolicy.coerce(recovery if recovery is not None else spec.get("recovery"))
    run = OptimizationRun(
        session, spec["run_id"], folder.path, spec, program, objects=objects, recovery=policy
    )
    run.resume_objects = objects
    run.trusted_modules = modules
    if evaluation[0] is not None:
        run.attach_eval_pool(evaluation[0], evaluation[1], read_json_checked(folder.data_file))
    run.follow_events()
    run_started(run)
    return run


def _restore_run(manager: Any, entry: dict[str, Any], objects: dict[str, Any]) -> OptimizationRun:
    """Bring a run back after a graceful shutdown: resumed from where it was saved."""
    given = dict(objects.get(entry["run_id"], {}))
    if {"task_lm", "prompt_lm"} & set(given):  # MIPROv2.resume's names
        from .mipro import MIPROv2

        return MIPROv2.resume(entry["checkpoint_dir"], manager.pools[entry["pool"]], **given)
    return resume(entry["checkpoint_dir"], manager.pools[entry["pool"]], **given)


lifecycle.register("optimizer_run", _save_runs, _restore_run)
