"""MIPROv2 in a dedicated session: a thin layer over ``dspex.compile``'s run path.

``dspex.MIPROv2(pool, metric, task_lm, ...).optimize(program, trainset, valset)`` is the
interface dspex had before it ran any optimizer; it records the same run.json as ever
(so older checkpoints resume) and starts the run through ``optimizers/runs.py``. The
run machinery's names stay importable from here for older callers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core import lifecycle
from ..core.pool import Pool
from ..core.recovery import RecoveryPolicy
from .runs import (  # noqa: F401 (re-exported for older callers)
    CANCEL_GRACE_S,
    MIPROV2_CLASS,
    RUNTIME,
    SHUTDOWN_CHECKPOINT_WAIT_S,
    OptimizationRun,
    OptimizedModule,
    RunCancelled,
    RunFailed,
    _budget,
    _callable_spec,
    _check_resumable,
    _live_runs,
    _lm_spec,
    _program_sources,
    _program_spec,
    _resolve_pool,
    _restore_run,
    _resume_trust,
    _save_runs,
    _shippable_lm,
    _shippable_lms,
    _start_run,
    live_runs,
    resume,
)


class MIPROv2:
    """DSPy's MIPROv2, run in a dedicated session of a pool.

    Arguments are MIPROv2's own (``auto``, ``num_candidates``, ``seed``, ...); ``metric``
    and ``program`` may be import paths ("pkg.mod:name", which checkpoints can rebuild) or
    objects from the notebook (shipped by value; pass them again to ``resume``).
    ``task_lm``/``prompt_lm`` are ``dspy.LM`` objects: their settings travel, API keys do
    not (give the pool ``env_vars`` for those). ``max_calls``, ``max_tokens`` and
    ``max_cost`` budget the run (LM calls sent, tokens, cost as DSPy prices it): before a
    trial that would pass one, the run stops, resumably, with ``BudgetExceeded``.
    """

    def __init__(
        self,
        pool: Pool | str,
        metric: Any,
        task_lm: Any = None,
        prompt_lm: Any = None,
        *,
        auto: str | None = "light",
        num_candidates: int | None = None,
        seed: int = 9,
        manager: Any = None,
        session_timeout: float = 1800.0,
        recovery: RecoveryPolicy | dict[str, Any] | None = None,
        max_calls: int | None = None,
        max_tokens: int | None = None,
        max_cost: float | None = None,
        **mipro_kwargs: Any,
    ) -> None:
        self.budget = _budget(max_calls=max_calls, max_tokens=max_tokens, max_cost=max_cost)
        self.pool = _resolve_pool(pool, manager)
        self.recovery = RecoveryPolicy.coerce(
            recovery if recovery is not None else self.pool.spec.recovery
        )
        self.metric = metric
        self.task_lm = task_lm
        self.prompt_lm = prompt_lm
        self.session_timeout = session_timeout
        self.options = {
            "auto": auto,
            "num_candidates": num_candidates,
            "seed": seed,
            **mipro_kwargs,
        }
        self.options.setdefault("verbose", False)

    def optimize(
        self,
        program: Any,
        trainset: Sequence[Any],
        valset: Sequence[Any] | None = None,
        *,
        checkpoint_dir: str | Path | None = None,
        kernel_checkpoint_dir: str | Path | None = None,
        **compile_kwargs: Any,
    ) -> OptimizationRun:
        """Start a run; returns at once with its live handle. ``kernel_checkpoint_dir``:
        where a kernel on another machine writes (its files come back to checkpoint_dir)."""
        if self.task_lm is None:
            raise ValueError("task_lm is required (a dspy.LM)")
        metric_spec, metric_obj = _callable_spec(self.metric, "metric")
        spec = {
            "teleprompter": {"class": MIPROV2_CLASS, "name": "MIPROv2"},
            "optimizer": copy.deepcopy(self.options),
            "compile": dict(compile_kwargs),
            "metric": metric_spec,
            "task_lm": _lm_spec(self.task_lm),
            "prompt_lm": _lm_spec(self.prompt_lm),
            "budget": self.budget,
        }
        # MIPROv2's LMs travel under the names its run.json records (task_lm, prompt_lm):
        # the kernel builds dspy's MIPROv2 from them, as dspex.compile's path does.
        objects = {"metric": metric_obj, **_shippable_lms(self.task_lm, self.prompt_lm)}
        return _start_run(
            self.pool,
            spec=spec,
            program=program,
            trainset=trainset,
            valset=valset,
            objects=objects,
            checkpoint_dir=checkpoint_dir,
            recovery=self.recovery,
            session_timeout=self.session_timeout,
            kernel_checkpoint_dir=kernel_checkpoint_dir,
        )

    @classmethod
    def resume(
        cls,
        checkpoint_dir: str | Path,
        pool: Pool | str,
        *,
        manager: Any = None,
        program: Any = None,
        metric: Any = None,
        task_lm: Any = None,
        prompt_lm: Any = None,
        snapshot: str | None = None,
        session_timeout: float = 1800.0,
        recovery: RecoveryPolicy | dict[str, Any] | None = None,
        trust: bool = False,
        trusted_modules: str | Sequence[str] = (),
        max_calls: int | None = None,
        max_tokens: int | None = None,
        max_cost: float | None = None,
        kernel_checkpoint_dir: str | Path | None = None,
    ) -> OptimizationRun:
        """Go on from a run's newest checkpoint (or ``snapshot``), in a new session.

        A folder this user's key did not sign is data: pass program, metric and LMs, or
        ``trust=True`` (signs it, as ``dspex trust DIR`` does). Even then references are
        imported only from DSPy, dspex_jupyter.testing, ``trusted_modules`` and
        ``$DSPEX_TRUSTED_MODULES``. It goes on from the newest snapshot, which is always
        clean (none is written after a step that met an infrastructure error). A budget
        given here replaces the run's (resume a ``BudgetExceeded`` run with a bigger one)."""
        return resume(
            checkpoint_dir,
            pool,
            manager=manager,
            program=program,
            metric=metric,
            snapshot=snapshot,
            session_timeout=session_timeout,
            recovery=recovery,
            trust=trust,
            trusted_modules=trusted_modules,
            max_calls=max_calls,
            max_tokens=max_tokens,
            max_cost=max_cost,
            kernel_checkpoint_dir=kernel_checkpoint_dir,
            _legacy_lms=_shippable_lms(task_lm, prompt_lm),
        )


# Manifests written before dspex ran other optimizers name their runs "mipro_run": they
# restore through the same path (new manifests say "optimizer_run", saved by runs.py).
lifecycle.register("mipro_run", lambda manager: [], _restore_run)
