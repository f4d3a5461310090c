"""DSPy's GEPA inside a pool kernel: live progress, a JSON checkpoint per iteration, exact resume.

Imported only when a GEPA run starts (it imports DSPy and gepa). Upstream's ``compile`` runs
unchanged, so a run gives what ``dspy.GEPA(...).compile`` gives in-process. Where it needs
more than gepa's public options (callbacks for progress), it goes through one seam:

gepa 0.1.4 builds its ``GEPAEngine`` inside ``gepa.optimize`` together with the objects that
hold the run's state outside ``GEPAState`` (the shared ``random.Random``, the batch sampler,
the merge proposer), and its only resume path pickles ``GEPAState`` alone into ``run_dir``,
so a resumed run draws different minibatches than an uninterrupted one. ``gepa.api``'s
``GEPAEngine`` is therefore replaced, once per process, by ``ControlledEngine``, a subclass
that behaves exactly as ``GEPAEngine`` unless a dspex run is active in the calling context
(a ``ContextVar``). For such a run it overrides two small engine hooks:

- ``_should_stop`` runs at the head of every loop turn, when the iteration before is
  complete: the run's state (``GEPAState``, RNG, sampler, merge schedule, the DSPy adapter's
  RNG) goes to a JSON checkpoint there, progress is reported, and a cancel is honoured;
- ``_sync_state_to_adapter`` runs right after the engine built its state: on resume the
  checkpointed state is put back there (and the seed candidate's evaluation, whose result
  the checkpoint already holds, is not run again).

No ``log_dir``: gepa's own pickle never touches the disk.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from typing import Any

import gepa.api
from dspy.teleprompt.gepa.gepa import GEPA
from gepa.core.engine import GEPAEngine

from ..checkpoint import CheckpointError
from ..core.errors import UnsupportedOptimizerOption
from .gepa_json import (
    MERGE_FIELDS,
    VERSION,
    from_json,
    plain_attributes,
    restore_attributes,
    rng_from_json,
    rng_to_json,
    state_from_json,
    state_to_json,
    to_json,
)
from .runs import OptimizerAdapter, RunContext, adopt, is_infrastructure_error

NAME = "GEPA"
PROPOSAL_CHARS = 160  # how much of a proposed instruction progress events carry


class GEPAHooks:
    """What a run sees of GEPA. The base class sees nothing: ``ResumableGEPA`` then behaves
    as upstream's ``compile`` does in-process.

    ``restored`` is a checkpoint ``iteration_done`` was given earlier (resume from it);
    ``iteration_done`` gets the JSON checkpoint and the progress after every iteration (and
    after the seed candidate's evaluation, iteration 0); it may raise to stop the run (a
    cancel), and the run can then be resumed from the last checkpoint.
    """

    restored: dict[str, Any] | None = None

    def iteration_done(self, checkpoint: dict[str, Any], progress: dict[str, Any]) -> None:
        """An iteration ended (called at the head of the next loop turn)."""


class ResumableGEPA(GEPA):
    """``dspy.GEPA`` whose run reports progress, checkpoints every iteration as JSON and
    resumes exactly from such a checkpoint (``hooks``, see ``GEPAHooks``)."""

    hooks: GEPAHooks | None = None
    last_run: RunController | None = None  # the latest compile's controller (its summary)

    def compile(
        self,
        student: Any,
        *,
        trainset: list,
        teacher: Any = None,
        valset: list | None = None,
    ) -> Any:
        if self.log_dir is not None:
            raise UnsupportedOptimizerOption(
                "GEPA(log_dir=...) saves gepa's run state with pickle",
                hint="drop log_dir: a dspex run checkpoints GEPA as JSON in its checkpoint_dir "
                "and resumes exactly from there",
            )
        install_engine_seam()
        controller = RunController(self, self.hooks or GEPAHooks())
        self.last_run = controller
        user_kwargs = self.gepa_kwargs
        callbacks = [*(user_kwargs.get("callbacks") or []), controller.observer]
        self.gepa_kwargs = {**user_kwargs, "callbacks": callbacks}
        token = _ACTIVE.set(controller)
        try:
            return super().compile(student, trainset=trainset, teacher=teacher, valset=valset)
        finally:
            _ACTIVE.reset(token)
            self.gepa_kwargs = user_kwargs


# --------------------------------------------------------------------------- the seam

_ACTIVE: contextvars.ContextVar[RunController | None] = contextvars.ContextVar(
    "dspex_gepa_run", default=None
)
_INSTALL_LOCK = threading.Lock()


class ControlledEngine(GEPAEngine):
    """``GEPAEngine`` that a dspex run in the calling context can checkpoint and restore;
    exactly ``GEPAEngine`` otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dspex_run = _ACTIVE.get()
        if self._dspex_run is not None:
            self._dspex_run.attach(self)

    def _sync_state_to_adapter(self, state: Any) -> None:
        if self._dspex_run is not None:
            self._dspex_run.restore(state)
        super()._sync_state_to_adapter(state)

    def _should_stop(self, state: Any) -> bool:
        if self._dspex_run is not None:
            self._dspex_run.loop_head(state)
        return super()._should_stop(state)


def install_engine_seam() -> None:
    """Make ``gepa.optimize`` build ``ControlledEngine`` (idempotent; see module docstring)."""
    with _INSTALL_LOCK:
        current = gepa.api.GEPAEngine
        if current is ControlledEngine:
            return
        if current is not GEPAEngine:
            raise UnsupportedOptimizerOption(
                f"gepa.api.GEPAEngine was replaced by {current!r} in this kernel",
                hint="a dspex GEPA run needs gepa's own engine class; restart the pool's kernels",
            )
        gepa.api.GEPAEngine = ControlledEngine


# --------------------------------------------------------------------------- one run


class RunController:
    """One ``compile``: checkpoints at each loop head, restores on resume, reports progress."""

    def __init__(self, optimizer: ResumableGEPA, hooks: GEPAHooks) -> None:
        self.optimizer = optimizer
        self.hooks = hooks
        self.restored = hooks.restored
        self.engine: ControlledEngine | None = None
        self.observer = ProgressObserver()
        self._pending_merge: Any = None
        self._last_checkpointed: int | None = None
        self.state: Any = None  # the engine's GEPAState, once it exists

    # -- engine hooks -----------------------------------------------------------------

    def attach(self, engine: ControlledEngine) -> None:
        self.engine = engine
        if self.restored is not None and engine.frontier_type == "instance":
            # The checkpoint holds the seed's scores: evaluate nothing for the throwaway
            # state the engine builds before ``restore`` replaces it.
            evaluate = engine.evaluator

            def seed_placeholder(batch: list, program: dict[str, str]) -> Any:
                engine.evaluator = evaluate
                return [None] * len(batch), [0.0] * len(batch), None

            engine.evaluator = seed_placeholder

    def restore(self, state: Any) -> None:
        if self.restored is None or self.engine is None:
            return
        data = self.restored
        if data.get("version") != VERSION:
            raise UnsupportedOptimizerOption(
                f"GEPA checkpoint version {data.get('version')!r}; this dspex reads {VERSION}",
                hint="resume it with the dspex version that wrote it, or start the run again",
            )
        attrs = state_from_json(data["state"])
        self._check_matches(attrs)
        state.__dict__.update(attrs)
        parts = data["parts"]
        proposer = self.engine.reflective_proposer
        states, roles = parts["rngs"]["states"], parts["rngs"]["roles"]
        for role, rng in _rngs(self.engine).items():
            if role in roles:
                rng_from_json(rng, states[roles[role]])
        restore_attributes(proposer.batch_sampler, parts["batch_sampler"])
        restore_attributes(proposer.candidate_selector, parts["candidate_selector"])
        adapter = parts.get("adapter")
        state.adapter_state = from_json(adapter) if adapter is not None else {}
        # The engine resets the merge schedule after this hook: put it back at the loop head.
        self._pending_merge = parts.get("merge")
        self._last_checkpointed = state.i

    def _check_matches(self, attrs: dict[str, Any]) -> None:
        """A checkpoint goes on only with the program and validation set it was made for."""
        engine = self.engine
        assert engine is not None and engine.valset is not None
        seed = attrs["program_candidates"][0]
        if seed != engine.seed_candidate:
            raise CheckpointError(
                f"this GEPA checkpoint was made for a program with the instructions {seed!r}, "
                f"not {engine.seed_candidate!r}",
                hint="resume with the program the run started with (program=...)",
            )
        ids = set(engine.valset.all_ids())
        if not set(attrs["pareto_front_valset"]) <= ids:
            raise CheckpointError(
                f"this GEPA checkpoint scores validation examples this run does not have "
                f"({len(attrs['pareto_front_valset'])} scored, {len(ids)} given)",
                hint="resume with the validation set the run started with",
            )

    def loop_head(self, state: Any) -> None:
        engine = self.engine
        assert engine is not None
        self.state = state
        if self._pending_merge is not None and engine.merge_proposer is not None:
            restore_attributes(engine.merge_proposer, self._pending_merge)
        self._pending_merge = None
        if state.i == self._last_checkpointed:
            return  # the restored iteration: already checkpointed
        self._last_checkpointed = state.i
        self.hooks.iteration_done(self.checkpoint(state), self.progress(state))

    # -- what goes out ----------------------------------------------------------------

    def checkpoint(self, state: Any) -> dict[str, Any]:
        engine = self.engine
        assert engine is not None
        proposer = engine.reflective_proposer
        getter = getattr(engine.adapter, "get_adapter_state", None)
        merge = engine.merge_proposer
        return {
            "version": VERSION,
            "iteration": state.i + 1,
            "state": state_to_json(state),
            "parts": {
                "rngs": _rng_states(engine),
                "batch_sampler": plain_attributes(proposer.batch_sampler),
                "candidate_selector": plain_attributes(proposer.candidate_selector),
                "adapter": to_json(dict(getter()), "adapter") if getter else None,
                "merge": (
                    to_json({k: getattr(merge, k) for k in MERGE_FIELDS}, "merge")
                    if merge is not None
                    else None
                ),
            },
        }

    def progress(self, state: Any) -> dict[str, Any]:
        """Progress after an iteration, from the state itself (the same on a resumed run)."""
        scores = state.program_full_scores_val_set
        best = max(range(len(scores)), key=scores.__getitem__)
        front: set[int] = set()
        for programs in state.get_pareto_front_mapping().values():
            front.update(programs)
        fields: dict[str, Any] = {
            "iteration": state.i + 1,
            # GEPA's own count (its budget unit); the machinery's "metric_calls" counts
            # every call of the metric, feedback calls included.
            "metric_calls_used": state.total_num_evals,
            "max_metric_calls": self.optimizer.max_metric_calls,
            "candidates": len(state.program_candidates),
            "pareto_front": len(front),
            "best_score": scores[best],
            "best_candidate": best,
        }
        proposal = self.observer.take_proposal(state)
        if proposal is not None:
            fields["proposal"] = proposal
        return fields

    def summary(self) -> dict[str, Any]:
        """The run's candidates, lineage and scores (JSON), from its final state."""
        state = self.state
        if state is None:
            return {}
        scores = state.program_full_scores_val_set
        return {
            "best_score": max(scores),
            "best_candidate": max(range(len(scores)), key=scores.__getitem__),
            "candidates": [dict(c) for c in state.program_candidates],
            "parents": [list(p) for p in state.parent_program_for_candidate],
            "val_aggregate_scores": list(scores),
            "iterations": state.i + 1,
            "metric_calls_used": state.total_num_evals,
        }


def _rng_states(engine: Any) -> dict[str, Any]:
    """Each distinct RNG's state once, and which role uses which."""
    states: list[Any] = []
    roles: dict[str, int] = {}
    seen: dict[int, int] = {}
    for role, rng in _rngs(engine).items():
        if id(rng) not in seen:
            seen[id(rng)] = len(states)
            states.append(rng_to_json(rng))
        roles[role] = seen[id(rng)]
    return {"states": states, "roles": roles}


def _rngs(engine: Any) -> dict[str, Any]:
    """The run's ``random.Random``s by role (gepa shares one between these by default)."""
    proposer = engine.reflective_proposer
    found = {
        "candidate_selector": getattr(proposer.candidate_selector, "rng", None),
        "batch_sampler": getattr(proposer.batch_sampler, "rng", None),
        "merge": getattr(engine.merge_proposer, "rng", None),
    }  # DSPy's adapter keeps its own RNG in its adapter state
    return {role: rng for role, rng in found.items() if rng is not None}


class ProgressObserver:
    """gepa callbacks that remember the iteration's proposal (its parent and instruction);
    the rest of the progress is read from the state at the loop head."""

    def __init__(self) -> None:
        self._proposal: dict[str, Any] | None = None

    def on_iteration_start(self, event: dict[str, Any]) -> None:
        self._proposal = None

    def on_candidate_selected(self, event: dict[str, Any]) -> None:
        self._proposal = {"parents": [event["candidate_idx"]], "instructions": {}}

    def on_proposal_end(self, event: dict[str, Any]) -> None:
        if self._proposal is not None:
            self._proposal["instructions"] = {
                name: _shorten(text) for name, text in event["new_instructions"].items()
            }

    def on_merge_attempted(self, event: dict[str, Any]) -> None:
        self._proposal = {
            "parents": list(event["parent_ids"]),
            "instructions": {k: _shorten(v) for k, v in event["merged_candidate"].items()},
            "merge": True,
        }

    def on_candidate_rejected(self, event: dict[str, Any]) -> None:
        if self._proposal is not None:
            self._proposal.update(
                accepted=False,
                subsample_before=event["old_score"],
                subsample_after=event["new_score"],
            )

    def on_merge_rejected(self, event: dict[str, Any]) -> None:
        if self._proposal is not None:
            self._proposal["accepted"] = False

    def on_candidate_accepted(self, event: dict[str, Any]) -> None:
        if self._proposal is not None:
            self._proposal.update(
                accepted=True,
                candidate=event["new_candidate_idx"],
                parents=list(event["parent_ids"]),
                subsample_after=event["new_score"],
            )

    def take_proposal(self, state: Any) -> dict[str, Any] | None:
        proposal, self._proposal = self._proposal, None
        if proposal is None or not proposal.get("instructions"):
            return None
        proposal.setdefault("accepted", False)
        candidate = proposal.get("candidate")
        if candidate is not None:
            proposal["score"] = state.program_full_scores_val_set[candidate]
        return proposal


def _shorten(text: str) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= PROPOSAL_CHARS else flat[: PROPOSAL_CHARS - 1] + "…"


def resumable(teleprompter: GEPA, hooks: GEPAHooks | None = None) -> ResumableGEPA:
    """A ``ResumableGEPA`` with every setting of ``teleprompter`` (a ``dspy.GEPA``)."""
    optimizer = ResumableGEPA.__new__(ResumableGEPA)
    optimizer.__dict__.update(vars(teleprompter))
    optimizer.gepa_kwargs = dict(teleprompter.gepa_kwargs)
    optimizer.hooks = hooks
    return optimizer


# --------------------------------------------------------------------------- the run adapter


class TaintedIteration(Exception):
    """An iteration saw an infrastructure error (an LM outage that DSPy scored as failed
    examples): its results are not real, so the run goes back to the checkpoint before it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class RunHooks(GEPAHooks):
    """GEPA under the run machinery: each iteration checkpointed, reported, cancellable."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.restored = run.restored.get("checkpoint")
        self.clean = self.restored  # the newest checkpoint after a clean iteration

    def iteration_done(self, checkpoint: dict[str, Any], progress: dict[str, Any]) -> None:
        run = self.run
        error = run.rec.take_infrastructure_error()
        if error is not None:
            raise TaintedIteration(error)
        run.lm_is_back()
        self.clean = checkpoint
        run.progress(**progress)
        run.phase("search", progress["metric_calls_used"], progress["max_metric_calls"])
        run.checkpoint(
            "search",
            "step",
            trials_done=progress["iteration"],
            best_score=progress["best_score"],
            checkpoint=checkpoint,
        )
        run.at_safe_point("search")


_RECORDER_KEY = "dspex_gepa_recorder"  # a dspy.settings key: DSPy carries it into its threads


class DroppedErrorWatch(logging.Handler):
    """Notes an infrastructure error that DSPy turns into a failed example. DSPy logs such
    an example from inside its ``except`` block (its parallel executor; GEPA's trace
    capture), so the exception is at hand here, at no cost to examples that succeed, where
    a DSPy callback would cost every module and LM call (a quarter of a GEPA run's time).
    The run is found through ``dspy.settings``, which DSPy propagates to its threads."""

    LOGGERS = ("dspy.utils.parallelizer", "dspy.teleprompt.bootstrap_trace")

    def emit(self, record: logging.LogRecord) -> None:
        import dspy

        recorder = dspy.settings.get(_RECORDER_KEY, None)
        if recorder is None:
            return
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        if exc is not None and is_infrastructure_error(exc):
            recorder.note_infrastructure_error(exc)

    @classmethod
    def install(cls) -> None:
        with _INSTALL_LOCK:
            for name in cls.LOGGERS:
                target = logging.getLogger(name)
                if not any(isinstance(h, cls) for h in target.handlers):
                    target.addHandler(cls(logging.WARNING))


class GEPARunAdapter(OptimizerAdapter):
    """``dspy.GEPA`` in a pool kernel: progress per iteration, exact resume from JSON."""

    name = NAME
    resume = "exact"
    state_key = "gepa"

    def make_optimizer(self, teleprompter: Any, run: RunContext) -> Any:
        optimizer = adopt(ResumableGEPA, teleprompter, hooks=RunHooks(run))
        optimizer.gepa_kwargs = dict(teleprompter.gepa_kwargs)
        optimizer.metric_fn = run.watched_metric(teleprompter.metric_fn)
        return optimizer

    def compile(
        self,
        optimizer: Any,
        student: Any,
        run: RunContext,
        *,
        trainset: list,
        valset: Any,
        **kw: Any,
    ) -> Any:
        import dspy

        hooks: RunHooks = optimizer.hooks
        DroppedErrorWatch.install()
        while True:
            try:
                with dspy.context(**{_RECORDER_KEY: run.rec}):
                    return optimizer.compile(student, trainset=trainset, valset=valset, **kw)
            except Exception as exc:
                error = exc.error if isinstance(exc, TaintedIteration) else exc
                if not (isinstance(exc, TaintedIteration) or is_infrastructure_error(exc)):
                    raise
                run.rec.take_infrastructure_error()
                # Undo the attempt: go on from the last clean iteration once the LM is back.
                run.wait_for_lm(error, "search")
                hooks.restored = hooks.clean

    def summary(self, optimizer: Any, program: Any, run: RunContext) -> dict[str, Any]:
        controller = optimizer.last_run
        return controller.summary() if controller is not None else {"best_score": None}


ADAPTER = GEPARunAdapter()
