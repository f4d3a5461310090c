"""Sweeps: K optimizer configurations run as K runs on one pool, compared side by side.

``sweep(configs, program, trainset=..., pool="opt")`` starts at most pool-size runs at
once (each in a session of its own, each an ordinary checkpointed, resumable
``OptimizationRun``) and the next as one ends, as optuna's study runs trials on n_jobs
workers. A budget covers the WHOLE sweep: each run starts with what is left as its own
budget (so its kernel stops it in time), and the sweep adds up every run's usage as it
goes; once it is spent, runs in flight are checkpointed and stopped (resumable) and no
new one starts.

The sweep is recorded in the run history (core/history.py, table ``sweeps``), so another
notebook process can ``attach_sweep(name, pool)`` (``%dspex attach SWEEP``): finished runs
come from the history, unfinished ones are resumed from their checkpoints and followed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import history
from ..core.errors import InvalidSpec, InvalidTeleprompter, SweepInUse
from ..core.history import RunHistory, RunRecord, SweepRecord, run_fields, trials_of
from . import runs as runs_module
from .runs import (
    OptimizationRun,
    _budget,
    _class_path,
    _constructor_record,
    _json_or_none,
    _resolve_pool,
)

log = logging.getLogger("dspex_jupyter")

RUN_BUDGET_KEYS = ("max_calls", "max_tokens", "max_cost")  # a run's own (runs._budget)
BUDGET_KEYS = (*RUN_BUDGET_KEYS, "max_metric_calls")
USAGE_KEY = {"max_calls": "calls", "max_tokens": "total_tokens", "max_cost": "cost"}
USAGE_POLL_S = 0.5  # with a budget: how often usage is asked of the kernels in flight
STOP_CHECKPOINT_WAIT_S = 30.0  # a spent budget: the in-flight trial gets this long to end
_live_sweeps: weakref.WeakValueDictionary[str, Sweep] = weakref.WeakValueDictionary()


def live_sweeps() -> list[Sweep]:
    """The sweeps of this process that something still references (by id and by name)."""
    return list({id(s): s for s in list(_live_sweeps.values())}.values())


def grid(**axes: Any) -> list[dict[str, Any]]:
    """Every combination of the values given, as sweep configs (a value that is not a
    list or tuple is the same in all): ``grid(seed=[0, 1], auto=["light", "medium"])``."""
    names = list(axes)
    values = [v if isinstance(v, list | tuple) else [v] for v in axes.values()]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


# ---- configurations -------------------------------------------------------------------
@dataclass
class SweepEntry:
    """One configuration of the sweep and the run made of it."""

    index: int
    label: str
    config: dict[str, Any]  # JSON: optimizer, class, args, compile
    teleprompter: Any = None  # None when attached and not rebuildable
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    run: OptimizationRun | None = None
    record: RunRecord | None = None  # a run finished before this process attached
    run_id: str | None = None
    checkpoint_dir: str | None = None
    status: str = "pending"  # pending | starting | running | completed | failed | cancelled
    usage: dict[str, Any] = field(default_factory=dict)
    metric_calls: int = 0
    metric_calls_before: int = 0  # of the sessions before this one (a resume restarts it)
    resume: bool = False  # attached: go on from its checkpoint folder
    stopped_by_budget: bool = False
    stop_asked: bool = False
    error: str | None = None  # why it could not start

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "label": self.label,
            "run_id": self.run_id,
            "checkpoint_dir": self.checkpoint_dir,
            "status": self.status,
            "stopped_by_budget": self.stopped_by_budget,
            "error": self.error,
        }

    def run_record(self) -> RunRecord | None:
        """What the comparison shows of the run: a live handle's state, or the history's."""
        if self.run is None:
            return self.record
        fields = run_fields(self.run)
        fields.pop("error", None)
        record = RunRecord(run_id=self.run.run_id, **fields)
        if self.run.done and self.run.status == "completed":
            with contextlib.suppress(Exception):
                record.best_program = self.run.result(timeout=0).state
        return record

    def trials(self) -> list[dict[str, Any]]:
        if self.run is not None:
            return [t for e in list(self.run.events) for t in trials_of(e)]
        if self.record is not None and self.run_id:
            with contextlib.suppress(Exception):  # a config that failed to start has none
                return history.default_history().trials(self.record.run_id)
        return []


def _config_entries(configs: Sequence[Any], optimizer: Any, metric: Any) -> list[SweepEntry]:
    import dspy

    if isinstance(configs, dict | str) or not isinstance(configs, Sequence) or not configs:
        raise InvalidSpec(
            "sweep() needs a non-empty list of configurations",
            hint="pass a list of dicts of optimizer options (dspex.grid(...) makes one) or of "
            "DSPy optimizers",
        )
    entries = []
    for index, item in enumerate(configs):
        compile_kwargs: dict[str, Any] = {}
        if isinstance(item, dspy.teleprompt.Teleprompter):
            teleprompter, label, options = item, None, {}
        elif isinstance(item, dict):
            options = dict(item)
            label = options.pop("label", None)
            compile_kwargs = dict(options.pop("compile", None) or {})
            cls = options.pop("optimizer", optimizer)
            if not (isinstance(cls, type) and issubclass(cls, dspy.teleprompt.Teleprompter)):
                raise InvalidTeleprompter(
                    f"config {index}: {cls!r} is not a DSPy optimizer class",
                    hint="pass optimizer=dspy.MIPROv2 (or another class) to sweep(), or "
                    "'optimizer': dspy.GEPA in the config",
                )
            if "metric" not in options:
                if metric is None:
                    raise InvalidSpec(
                        f"config {index} has no metric", hint="pass metric= to sweep()"
                    )
                options["metric"] = metric
            try:
                teleprompter = cls(**options)
            except TypeError as exc:
                raise InvalidSpec(
                    f"config {index}: {cls.__name__}({', '.join(options)}) failed: {exc}",
                    hint=f"give only options {cls.__name__} takes",
                ) from None
        else:
            raise InvalidTeleprompter(
                f"config {index} is a {type(item).__name__}, not a dict or a DSPy optimizer",
                hint="each config is a dict of optimizer options or an optimizer object",
            )
        args, lms = _constructor_record(teleprompter)
        shown = {k: v for k, v in options.items() if k != "metric"}
        record = {
            "optimizer": runs_module.optimizer_name(type(teleprompter)),
            "class": _class_path(type(teleprompter)),
            "args": args,
            "lm_args": sorted(lms),
            "options": _json_or_none(shown) or {},
            "compile": _json_or_none(compile_kwargs) or {},
        }
        entries.append(
            SweepEntry(
                index=index,
                label=str(label) if label else _label(record, shown),
                config=record,
                teleprompter=teleprompter,
                compile_kwargs=compile_kwargs,
            )
        )
    seen: dict[str, int] = {}
    for entry in entries:  # two configs of one look (two optimizer objects): "#index"
        seen[entry.label] = seen.get(entry.label, 0) + 1
    for entry in entries:
        if seen[entry.label] > 1:
            entry.label = f"{entry.label} #{entry.index}"
    return entries


def _label(record: dict[str, Any], shown: dict[str, Any]) -> str:
    """ "MIPROv2 auto=light seed=1": the optimizer and the options the config set."""
    parts = [f"{k}={v}" for k, v in shown.items() if isinstance(v, str | int | float | bool)]
    return " ".join([record["optimizer"], *parts])


def _check_budget(budget: dict[str, Any] | None) -> dict[str, Any]:
    budget = dict(budget or {})
    unknown = set(budget) - set(BUDGET_KEYS)
    if unknown:
        raise InvalidSpec(
            f"unknown budget limit {', '.join(sorted(unknown))}",
            hint=f"a sweep's budget takes {', '.join(BUDGET_KEYS)}",
        )
    return _budget(**budget)


# ---- the sweep -------------------------------------------------------------------------
class Sweep:
    """K runs of one sweep: live status, usage against the whole budget, the best run."""

    def __init__(
        self,
        *,
        sweep_id: str,
        name: str,
        entries: list[SweepEntry],
        pool: Any,
        budget: dict[str, Any],
        folder: Path,
        program: Any,
        trainset: Sequence[Any] | None,
        valset: Sequence[Any] | None,
        lm: Any,
        metric: Any = None,
        max_parallel: int | None = None,
        session_timeout: float = 1800.0,
        created: float | None = None,
    ) -> None:
        self.sweep_id = sweep_id
        self.name = name
        self.entries = entries
        self.pool = pool
        self.budget = budget
        self.folder = folder
        self.parallel = max(1, min(max_parallel or pool.spec.size, pool.spec.size))
        self._program = program
        self._trainset = trainset
        self._valset = valset
        self._lm = lm
        self._metric = metric
        self._session_timeout = session_timeout
        self.created = created or time.time()
        self.state = "running"  # running | completed | budget_spent | cancelled | failed
        self.reason: str | None = None  # why it stopped early (the budget's line)
        self._cond = threading.Condition()
        self._cancel = False
        self._stopping = False
        self._listeners: list[Callable[[], None]] = []
        self._done = threading.Event()
        self._polled = 0.0
        # One row write at a time, each taking the state as it is then, so a run's end and
        # the sweep's end, recorded from two threads, leave the newest state in the row.
        self._record_lock = threading.Lock()
        _live_sweeps[sweep_id] = self
        _live_sweeps[name] = self
        self._thread = threading.Thread(
            target=self._schedule, name=f"dspex-sweep-{sweep_id}", daemon=True
        )

    def __repr__(self) -> str:
        counts = self.counts()
        shown = " ".join(f"{k}={v}" for k, v in counts.items() if v)
        return f"<Sweep {self.name!r} {self.state} {shown}>"

    # ---- public ------------------------------------------------------------------
    @property
    def runs(self) -> list[OptimizationRun | RunRecord | None]:
        """Per config: its live run handle, its history record (a run that finished before
        this process attached), or None (not started)."""
        return [e.run if e.run is not None else e.record for e in self.entries]

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def counts(self) -> dict[str, int]:
        statuses = [e.status for e in self.entries]
        return {s: statuses.count(s) for s in dict.fromkeys(statuses)}

    def usage(self) -> dict[str, Any]:
        """The whole sweep's usage so far: every run's added up (metric calls included)."""
        total: dict[str, Any] = {}
        with self._cond:
            for entry in self.entries:
                for key, value in entry.usage.items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        total[key] = total.get(key, 0) + value
                total["metric_calls"] = total.get("metric_calls", 0) + entry.metric_calls
        return total

    def status(self) -> dict[str, Any]:
        """Where the sweep stands: its state (and why it stopped), runs by status, usage
        against the budget, and the best run so far."""
        best = self.best_entry()
        return {
            "sweep_id": self.sweep_id,
            "name": self.name,
            "state": self.state,
            "reason": self.reason,
            "runs": self.counts(),
            "usage": self.usage(),
            "budget": dict(self.budget),
            "best": None
            if best is None
            else {"label": best.label, "run_id": best.run_id, "score": _score(best)},
        }

    def best_entry(self) -> SweepEntry | None:
        scored = [e for e in self.entries if _score(e) is not None]
        return max(scored, key=lambda e: (_score(e), -e.index)) if scored else None

    def best(self) -> OptimizationRun | RunRecord:
        """The run with the best score so far (a live handle or a history record); its
        program: ``best().result().to_dspy()``, or ``dspex.load_program(best().run_id)``."""
        entry = self.best_entry()
        if entry is None:
            from ..core.errors import NoBestProgram

            raise NoBestProgram(
                f"sweep {self.name!r} has no scored run yet",
                hint="wait for a run's first trial: sweep.wait() or sweep.widget()",
            )
        found = entry.run if entry.run is not None else entry.record
        assert found is not None
        return found

    def best_program(self, program: Any = None) -> Any:
        """The best finished run's program as a ``dspy.Module`` (``load_program``)."""
        return history.load_program(self.best().run_id, program)

    def wait(self, timeout: float | None = None) -> Sweep:
        """Block until every run has ended or the sweep stopped; the sweep itself."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"sweep {self.name!r} still {self.state} after {timeout} s")
        return self

    def cancel(self, timeout: float | None = 120) -> None:
        """Checkpoint and stop the runs in flight (each resumable); start no more."""
        with self._cond:
            self._cancel = True
            self._cond.notify_all()
        self._done.wait(timeout)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever a run's event arrives or the sweep's state changes
        (from other threads; the widget redraws on it)."""
        self._listeners.append(callback)

    def widget(self) -> Any:
        """The live comparison widget (notebook/sweep_view.py)."""
        from ..notebook.sweep_view import SweepView

        return SweepView(self)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget())

    # ---- scheduling ----------------------------------------------------------------
    def start(self, *, stopped_as: str | None = None) -> Sweep:
        """Start scheduling (``sweep()`` and ``attach_sweep()`` call it). An attached sweep
        that stopped as "budget_spent" or "cancelled" stays stopped: its unfinished runs
        are shown as they are (resume them with ``dspex.resume`` and a bigger budget)."""
        spent = self._spent()
        if spent is not None or stopped_as in ("budget_spent", "cancelled"):
            self.reason = spent or ("budget spent" if stopped_as == "budget_spent" else None)
            self._cancel = self.reason is None
            self._stopping = True
            for entry in self.entries:
                entry.resume, entry.teleprompter = False, None
                if not entry.done and entry.run_id is not None:
                    entry.status = (entry.record.status if entry.record else None) or "cancelled"
        self._record()
        self._thread.start()
        return self

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("sweep change callback failed")

    def _schedule(self) -> None:
        try:
            while True:
                self._follow_usage()
                with self._cond:
                    action, chosen = self._next_action()
                    if action == "done":
                        break
                    if action == "wait":  # woken by any run's event or end
                        self._cond.wait(USAGE_POLL_S if self.budget else 5.0)
                        continue
                if action == "stop":
                    self._stop_in_flight(chosen, by_budget=self.reason is not None)
                else:
                    self._launch(chosen[0])
        except BaseException as exc:  # the sweep stops; its runs stay resumable
            log.exception("the sweep %s stopped on an error", self.name)
            self.reason = f"error: {exc}"
            self.state = "failed"
        finally:
            self._finish()

    def _next_action(self) -> tuple[str, list[SweepEntry]]:
        """What the scheduler does next (under the lock): "stop" runs in flight (a spent
        budget, a cancel), "launch" a config, "wait" for a run's event, or "done"."""
        spent = self._spent()
        if spent is not None and self.reason is None:
            self.reason = spent
        if spent is not None or self._cancel:
            self._stopping = True
        flying = [e for e in self.entries if e.status in ("starting", "running")]
        if self._stopping:
            to_stop = [e for e in flying if e.run is not None and not e.stop_asked]
            for entry in to_stop:
                entry.stop_asked = True
            if to_stop:
                return "stop", to_stop
            return ("wait", []) if flying else ("done", [])
        startable = [
            e
            for e in self.entries
            if e.status == "pending" and (e.resume or e.teleprompter is not None)
        ]
        if startable and len(flying) < self.parallel:
            startable[0].status = "starting"
            return "launch", startable[:1]
        return ("wait", []) if flying else ("done", [])

    def _launch(self, entry: SweepEntry) -> None:
        caps = self._run_caps(entry)
        self._record()
        try:
            run = self._start_run(entry, caps)
        except Exception as exc:  # this config cannot start: the others go on
            entry.status, entry.error = "failed", str(exc).splitlines()[0]
            log.warning("sweep %s: config %r did not start: %s", self.name, entry.label, exc)
            self._record()
            self._changed()
            return
        entry.run, entry.run_id = run, run.run_id
        entry.checkpoint_dir = str(run.checkpoint_dir)
        entry.metric_calls_before = entry.metric_calls
        entry.status = "running"
        run.on_event(lambda event, entry=entry: self._on_event(entry, event))
        threading.Thread(
            target=self._wait_end, args=(entry, run), name="dspex-sweep-run-end", daemon=True
        ).start()
        self._record()
        self._changed()

    def _start_run(self, entry: SweepEntry, caps: dict[str, Any]) -> OptimizationRun:
        import dspy

        if entry.resume:
            assert entry.checkpoint_dir is not None
            return runs_module.resume(
                entry.checkpoint_dir,
                self.pool,
                program=self._program,
                metric=self._metric,
                lm=self._lm,
                session_timeout=self._session_timeout,
                **caps,
            )
        folder = self.folder / f"{entry.index:02d}"
        with dspy.context(lm=self._lm) if self._lm is not None else contextlib.nullcontext():
            return runs_module.compile(
                entry.teleprompter,
                self._program,
                trainset=self._trainset,
                valset=self._valset,
                pool=self.pool,
                checkpoint_dir=folder,
                session_timeout=self._session_timeout,
                **caps,
                **entry.compile_kwargs,
            )

    def _run_caps(self, entry: SweepEntry) -> dict[str, Any]:
        """A run's own budget: what is left of the sweep's, on top of what it used."""
        total = self.usage()
        caps = {}
        for name in RUN_BUDGET_KEYS:
            limit = self.budget.get(name)
            if limit is not None:
                key = USAGE_KEY[name]
                left = max(float(limit) - float(total.get(key) or 0), 0.0)
                mine = float(entry.usage.get(key) or 0)
                value = mine + left
                caps[name] = int(value) if name != "max_cost" else value
                if caps[name] <= 0:  # nothing left: _spent stops the sweep first
                    caps[name] = 1 if name != "max_cost" else 1e-12
        return caps

    def _on_event(self, entry: SweepEntry, event: dict[str, Any]) -> None:
        with self._cond:
            usage = event.get("usage")
            if isinstance(usage, dict) and usage:
                entry.usage = dict(usage)
            calls = event.get("metric_calls")
            if isinstance(calls, int) and not isinstance(calls, bool):
                entry.metric_calls = max(entry.metric_calls, entry.metric_calls_before + calls)
            if event.get("kind") == "status" and entry.status == "starting":
                entry.status = "running"
        self._changed()

    def _wait_end(self, entry: SweepEntry, run: OptimizationRun) -> None:
        with contextlib.suppress(BaseException):
            run.result(timeout=None)
        with self._cond:
            entry.status = run.status if run.status in ("completed", "failed") else "cancelled"
            usage = run.metrics.get("usage")
            if isinstance(usage, dict) and usage:
                entry.usage = {**entry.usage, **usage}
            error = run.error
            if type(error).__name__ == "BudgetExceeded":
                entry.stopped_by_budget = True
                self.reason = self.reason or f"budget spent: {str(error).splitlines()[0]}"
        self._record()
        self._changed()

    def _follow_usage(self) -> None:
        """With a budget: each run in flight's usage, as its kernel counts it now (most
        optimizers send it only with trials and at the end)."""
        if not self.budget or time.monotonic() - self._polled < USAGE_POLL_S:
            return
        self._polled = time.monotonic()
        for entry in list(self.entries):
            run = entry.run
            if run is None or run.done or entry.status != "running":
                continue
            with contextlib.suppress(Exception):  # it ended meanwhile: its events say
                answer = run.session.call(f"{runs_module.RUNTIME}:status", run.run_id)
                usage = answer.get("usage")
                if isinstance(usage, dict) and usage:
                    with self._cond:
                        entry.usage = dict(usage)

    def _spent(self) -> str | None:
        if not self.budget:
            return None
        total = self.usage()
        for name, limit in self.budget.items():
            key = USAGE_KEY.get(name, "metric_calls")
            used = float(total.get(key) or 0)
            if used >= float(limit):
                return f"budget spent: {name}={limit:g}, {used:g} used"
        if any(e.stopped_by_budget for e in self.entries):
            return self.reason or "budget spent"
        return None

    def _stop_in_flight(self, flying: list[SweepEntry], *, by_budget: bool) -> None:
        """Checkpoint and stop each run in flight (in parallel): resumable."""

        def stop(entry: SweepEntry) -> None:
            run = entry.run
            if run is None:
                return
            with contextlib.suppress(Exception):
                run.checkpoint(timeout=STOP_CHECKPOINT_WAIT_S, then_stop=True)
            with contextlib.suppress(Exception):
                run.cancel()
            entry.stopped_by_budget = by_budget and run.status != "completed"

        threads = [threading.Thread(target=stop, args=(e,), daemon=True) for e in flying]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _finish(self) -> None:
        # the runs' own end watchers have set their statuses; wait for them
        for entry in self.entries:
            if entry.run is not None:
                with contextlib.suppress(BaseException):
                    entry.run.result(timeout=60)
        deadline = time.monotonic() + 10
        with self._cond:
            self._cond.wait_for(
                lambda: all(e.run is None or e.done for e in self.entries),
                max(0.0, deadline - time.monotonic()),
            )
        if self.state != "failed":
            statuses = {e.status for e in self.entries}
            if self._cancel and self.reason is None:
                self.state = "cancelled"
            elif self.reason is not None:
                self.state = "budget_spent"
            elif statuses == {"completed"}:
                self.state = "completed"
            else:
                self.state = "failed" if "failed" in statuses else "stopped"
        self._record()
        self._done.set()
        self._changed()

    def _record(self) -> None:
        """The sweep's row in the run history (never raises: the runs matter more)."""
        try:
            with self._record_lock:
                self._write_row()
        except Exception as exc:
            history.writer.warn(exc)

    def _write_row(self) -> None:
        with self._cond:
            runs = [e.to_json() for e in self.entries]
        RunHistory().record_sweep(
            self.sweep_id,
            name=self.name,
            status=self.state,
            configs=[{"label": e.label, **e.config} for e in self.entries],
            runs=runs,
            budget=self.budget,
            folder=str(self.folder),
            pool=self.pool.name,
            notebook=history.current_notebook(),
            host=socket.gethostname(),
            pid=os.getpid(),
        )


def _score(entry: SweepEntry) -> float | None:
    if entry.run is not None:
        return history.best_score_of(entry.run)
    return entry.record.best_score if entry.record is not None else None


# ---- starting and attaching ------------------------------------------------------------
def sweep(
    configs: Sequence[Any],
    program: Any,
    *,
    trainset: Sequence[Any],
    valset: Sequence[Any] | None = None,
    metric: Any = None,
    pool: Any = "opt",
    optimizer: Any = None,
    budget: dict[str, Any] | None = None,
    name: str | None = None,
    lm: Any = None,
    max_parallel: int | None = None,
    checkpoint_dir: str | Path | None = None,
    manager: Any = None,
    session_timeout: float = 1800.0,
) -> Sweep:
    """Run each of ``configs`` as a run of ``dspex.compile`` on ``pool``, at most its size
    (or ``max_parallel``) at once; returns the live ``Sweep`` at once.

    A config is a DSPy optimizer object, or a dict of ``optimizer``'s constructor options
    (``metric`` is added; ``"optimizer": dspy.GEPA`` picks another class for that config,
    ``"compile": {...}`` adds compile arguments, ``"label"`` names it); ``grid(...)`` makes
    dicts. ``budget``: the most the whole sweep may spend (``max_calls``, ``max_tokens``,
    ``max_cost``, ``max_metric_calls``). ``lm``: the task LM (default: ``dspy.settings.lm``).
    """
    import dspy

    if optimizer is None:
        optimizer = dspy.MIPROv2
    entries = _config_entries(configs, optimizer, metric)
    limits = _check_budget(budget)
    pool_obj = _resolve_pool(pool, manager)
    sweep_id = uuid.uuid4().hex[:12]
    name = name or f"sweep-{sweep_id[:6]}"
    folder = Path(checkpoint_dir or Path.cwd() / "dspex-runs" / f"sweep-{sweep_id}")
    folder = folder.expanduser().resolve()
    handle = Sweep(
        sweep_id=sweep_id,
        name=name,
        entries=entries,
        pool=pool_obj,
        budget=limits,
        folder=folder,
        program=program,
        trainset=trainset,
        valset=valset,
        lm=lm if lm is not None else dspy.settings.lm,
        metric=metric,
        max_parallel=max_parallel,
        session_timeout=session_timeout,
    )
    return handle.start()


def attach_sweep(
    key: str,
    pool: Any = None,
    *,
    program: Any = None,
    metric: Any = None,
    lm: Any = None,
    trainset: Sequence[Any] | None = None,
    valset: Sequence[Any] | None = None,
    manager: Any = None,
    session_timeout: float = 1800.0,
) -> Sweep:
    """The sweep ``key`` (its id, a unique id prefix, or its name) in this process: a live
    one of this process as it is; else rebuilt from the run history, finished runs as
    their records, unfinished ones resumed from their checkpoints on ``pool`` (default:
    the pool it ran on) and followed, configs not started yet started (their optimizer
    rebuilt from its recorded options when it is one of DSPy's own classes). Pass the
    objects a resume needs that the checkpoints cannot rebuild: ``metric`` (a function
    defined in a notebook), ``program`` (a notebook-defined module), ``lm``; and the
    ``trainset`` (and ``valset``) for configs that had not started."""
    live = _live_sweeps.get(key)
    if live is not None:
        return live
    record = RunHistory().get_sweep(key)
    live = _live_sweeps.get(record.sweep_id)
    if live is not None:
        return live
    _check_not_followed(record)
    pool_obj = _resolve_pool(pool or record.pool, manager)
    store = history.default_history()
    entries = []
    for config, entry_json in zip(record.configs, record.runs, strict=False):
        entry = SweepEntry(
            index=entry_json["index"],
            label=entry_json["label"],
            config={k: v for k, v in config.items() if k != "label"},
            run_id=entry_json.get("run_id"),
            checkpoint_dir=entry_json.get("checkpoint_dir"),
            stopped_by_budget=bool(entry_json.get("stopped_by_budget")),
            error=entry_json.get("error"),
        )
        entry.compile_kwargs = dict(entry.config.get("compile") or {})
        if entry.run_id:
            with contextlib.suppress(Exception):
                entry.record = store.get(entry.run_id)
        if entry.record is not None:
            entry.usage = dict(entry.record.usage or {})
        if entry.record is not None and entry.record.status == "completed":
            entry.status = "completed"
        elif entry.checkpoint_dir and (Path(entry.checkpoint_dir) / "run.json").is_file():
            finished = _finished_in_folder(store, entry)
            if finished is None:
                entry.resume = True
            else:
                entry.record, entry.status = finished, "completed"
        elif trainset is not None:
            entry.teleprompter = _rebuilt_teleprompter(entry.config, metric, lm)
        entries.append(entry)
    if program is None and any(e.teleprompter is not None for e in entries):
        program = _program_of_a_started_run(entries)
    handle = Sweep(
        sweep_id=record.sweep_id,
        name=record.name,
        entries=entries,
        pool=pool_obj,
        budget=dict(record.budget or {}),
        folder=Path(record.folder or Path.cwd() / "dspex-runs" / f"sweep-{record.sweep_id}"),
        program=program,
        trainset=trainset,
        valset=valset,
        lm=lm,
        metric=metric,
        session_timeout=session_timeout,
        created=record.created,
    )
    return handle.start(stopped_as=record.status)


def _finished_in_folder(store: RunHistory, entry: SweepEntry) -> RunRecord | None:
    """A run whose kernel completed it after its notebook died (before the notebook took
    the result): its folder's last snapshot holds the result; the history gets it."""
    from ..checkpoint import CheckpointDir

    assert entry.checkpoint_dir is not None
    _, body, _ = CheckpointDir(entry.checkpoint_dir).newest_readable()
    result = body.get("result")
    if body.get("phase") != "done" or not isinstance(result, dict) or not entry.run_id:
        return None
    store.record(
        entry.run_id,
        status="completed",
        best_score=result.get("best_score"),
        best_program=result.get("program_state"),
        usage=result.get("usage") or {},
        checkpoint_dir=entry.checkpoint_dir,
    )
    return store.get(entry.run_id)


def _program_of_a_started_run(entries: list[SweepEntry]) -> Any:
    """The program the sweep started from, for configs not started yet: as a started run's
    run.json holds it (DSPy's own classes, with their initial state; signed by this user's
    key), else None (attach_sweep's ``program=`` gives it)."""
    from ..checkpoint import CheckpointDir, import_reference, read_json_checked
    from ..trust import verify_checkpoint

    for entry in entries:
        if not entry.checkpoint_dir:
            continue
        folder = CheckpointDir(entry.checkpoint_dir)
        with contextlib.suppress(Exception):
            if not verify_checkpoint(folder).trusted:
                continue
            spec = read_json_checked(folder.run_file).get("program") or {}
            if spec.get("kind") != "dspy":
                continue
            cls = import_reference(spec["class"], ("dspy",), "program class")
            program = cls(spec["signature"])
            if isinstance(spec.get("state"), dict):
                program.load_state(spec["state"])
            return program
    return None


def _check_not_followed(record: SweepRecord) -> None:
    """A sweep still scheduled by a live process elsewhere is attached there, not twice."""
    if record.status != "running" or record.pid in (None, os.getpid()):
        return
    if record.host != socket.gethostname():
        return
    import psutil

    if psutil.pid_exists(record.pid):
        raise SweepInUse(
            f"sweep {record.name!r} is still being run by process {record.pid}",
            hint="attach to it in that notebook, or stop that process first",
        )


def _rebuilt_teleprompter(config: dict[str, Any], metric: Any, lm: Any) -> Any:
    """A config's optimizer from its record: DSPy's own classes only, with the metric (and
    the LM for its LM arguments) given to attach. None when it cannot be rebuilt."""
    from ..checkpoint import import_reference

    if metric is None or not str(config.get("class", "")).startswith("dspy."):
        return None
    try:
        cls = import_reference(config["class"], ("dspy",), "optimizer class")
        lms = {name: lm for name in config.get("lm_args") or []}
        return cls(metric=metric, **(config.get("args") or {}), **lms)
    except Exception:
        return None
