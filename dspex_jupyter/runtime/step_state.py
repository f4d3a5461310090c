"""JSON forms of what a step-wise optimizer carries between steps, and its step hooks.

BootstrapFewShotWithRandomSearch, COPRO and SIMBA are run here as a loop of steps, each a
function of a JSON state (programs as ``dump_state`` dicts, RNG states as numbers). The
same code path serves an uninterrupted run and a resumed one: a run always goes on from
the state of its last step, whether that state is still in memory or was read back from
a snapshot, so a resume cannot drift from an uninterrupted run. Nothing here pickles.

Imported only when such a run starts (it needs DSPy to rebuild programs).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class StepHooks:
    """What a run sees of a step-wise optimizer: the state to start from, each step (run
    through ``run_step``, which may retry it after an outage), and each finished step (its
    state to checkpoint, its progress to show). The base class runs steps as they are: the
    optimizer then behaves as upstream's ``compile`` does in-process.

    Progress always has ``step`` (units of work done, or the one starting), ``total`` and,
    once a step is done, ``best_score``; each optimizer adds its own figures."""

    def __init__(self, restored: dict[str, Any] | None = None) -> None:
        self.restored = restored

    def run_step(self, phase: str, step: Callable[[], T]) -> T:
        return step()

    def step_started(self, phase: str, *, examples: int = 0, **progress: Any) -> None:
        """A step begins; it will evaluate about ``examples`` examples."""

    def step_done(self, phase: str, state: dict[str, Any], **progress: Any) -> None:
        """A step ended: ``state`` (JSON) is where a resume goes on from."""


class RunHooks(StepHooks):
    """Steps under the run machinery (``runtime/runs.py``'s ``RunContext``): each step is
    an outage-safe unit (redone in full after an infrastructure error: a step is a function
    of the state before it, so nothing needs undoing), checked against the budget before
    it starts, snapshotted and reported when done, with a safe point (checkpoint request,
    cancel) on either side."""

    def __init__(self, run: Any) -> None:
        super().__init__((run.restored or {}).get("state"))
        self.run = run
        self.usage_at_start = run.usage()
        self.evaluated = 0  # examples evaluated by this session's steps (budget estimate)
        self._examples = 0

    def run_step(self, phase: str, step: Callable[[], T]) -> T:
        self.run.at_safe_point(phase)
        return self.run.run_step(phase, step)

    def step_started(self, phase: str, *, examples: int = 0, **progress: Any) -> None:
        if examples and self.evaluated:  # no estimate before the first step
            self.run.check_budget(
                examples, evaluated=self.evaluated, usage_at_start=self.usage_at_start
            )
        self._examples = examples
        self.run.phase(phase, progress.get("step", 0), progress.get("total"))

    def step_done(self, phase: str, state: dict[str, Any], **progress: Any) -> None:
        self.evaluated += self._examples
        best = progress.get("best_score")
        self.run.checkpoint(
            phase,
            "step",
            trials_done=progress.get("step"),
            best_score=float(best) if isinstance(best, int | float) else None,
            state=state,  # under one key: never clashes with the snapshot's own fields
        )
        self.run.progress(phase=phase, **progress)
        self.run.at_safe_point(phase)


def program_state(program: Any) -> dict[str, Any]:
    """A program's ``dump_state`` without LM settings: programs are rebuilt from the
    student (``program_from_state``), which keeps its own LMs, so a snapshot holds demos
    and signatures only (and nothing an LM's settings could leak)."""
    state = program.dump_state()
    for value in state.values():
        if isinstance(value, dict) and "lm" in value:
            value["lm"] = None
    return state


def program_from_state(template: Any, state: dict[str, Any]) -> Any:
    """A copy of ``template`` with the demos and signatures of ``state``; each predictor
    keeps the template's LM (DSPy's ``load_state`` would rebuild one from its settings)."""
    program = template.deepcopy()
    lms = {name: predictor.lm for name, predictor in program.named_predictors()}
    program.load_state(state)
    for name, predictor in program.named_predictors():
        predictor.lm = lms.get(name)
    return program


def score_to_json(value: Any) -> Any:
    """A metric's value as JSON: bools, ints and floats stay as they are (DSPy sums them as
    they are), anything number-like (a numpy scalar) becomes a float."""
    if value is None or isinstance(value, bool | int | float):
        return value
    return float(value)


def random_state_to_json(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def random_from_json(data: list[Any]) -> random.Random:
    rng = random.Random()
    rng.setstate((data[0], tuple(data[1]), data[2]))
    return rng


def numpy_generator_to_json(generator: Any) -> dict[str, Any]:
    """A ``numpy.random.Generator``'s bit-generator state; its 128-bit integers as strings
    (exact in any JSON reader)."""
    return _ints_to_strings(generator.bit_generator.state)


def numpy_generator_from_json(data: dict[str, Any]) -> Any:
    import numpy as np

    state = _strings_to_ints(data)
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def _ints_to_strings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _ints_to_strings(v) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool):
        return {"int": str(value)}
    return value


def _strings_to_ints(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"int"}:
            return int(value["int"])
        return {k: _strings_to_ints(v) for k, v in value.items()}
    return value
