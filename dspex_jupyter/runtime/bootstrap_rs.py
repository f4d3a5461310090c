"""DSPy's BootstrapFewShotWithRandomSearch, one candidate seed at a time, resumed exactly.

Upstream's ``compile`` loops over the candidate seeds (-3 zero-shot, -2 labels only, -1
unshuffled bootstrap, then shuffled ones) and builds each candidate from its seed alone:
no state flows from one seed to the next except the scores. So each step here is
upstream's own ``compile`` restricted to one seed (``restrict=[seed]``), and the state
between steps is the finished candidates (seed, score, subscores, program state) and which
one is best. A resumed run skips the finished seeds and ends with the same candidate
programs, scores and final program as an uninterrupted one; the fidelity test compares
both with upstream's ``compile``.
"""

from __future__ import annotations

from typing import Any

from dspy.teleprompt import BootstrapFewShotWithRandomSearch

from ..checkpoint import CheckpointError
from .runs import OptimizerAdapter, RunContext, adopt
from .step_state import RunHooks, StepHooks, program_from_state, program_state, score_to_json

PHASE = "seed"


class ResumableRandomSearch(BootstrapFewShotWithRandomSearch):
    """BootstrapFewShotWithRandomSearch with a step (and a snapshot) per candidate seed."""

    def __init__(self, *, hooks: StepHooks | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hooks = hooks or StepHooks()

    def compile(
        self,
        student: Any,
        *,
        teacher: Any = None,
        trainset: list,
        valset: list | None = None,
        restrict: Any = None,
        labeled_sample: bool = True,
    ) -> Any:
        seeds = self.seeds(restrict)
        state = self.hooks.restored or {"seeds": seeds, "candidates": [], "best": None}
        if state["seeds"] != seeds:
            raise CheckpointError(
                f"the snapshot is of a run over seeds {state['seeds']}, not {seeds}",
                hint="resume with the optimizer the run was started with: "
                "dspex.resume(dir, pool, teleprompter=tp)",
            )
        examples = len(valset or trainset)  # each candidate is scored on the valset
        while not self.finished(state):
            index = len(state["candidates"])
            seed = seeds[index]
            self.hooks.step_started(
                PHASE, examples=examples, step=index + 1, total=len(seeds), seed=seed
            )
            candidate = self.hooks.run_step(
                PHASE,
                lambda seed=seed: self.candidate(
                    seed, student, teacher, trainset, valset, labeled_sample
                ),
            )
            state = self.with_candidate(state, candidate)
            best = state["candidates"][state["best"]]
            self.hooks.step_done(
                PHASE,
                state,
                step=index + 1,
                total=len(seeds),
                seed=seed,
                score=candidate["score"],
                best_score=best["score"],
                best_seed=best["seed"],
            )
        return self.result(state, student)

    def seeds(self, restrict: Any) -> list[int]:
        """The candidate seeds upstream's loop visits, in its order."""
        allowed = None if restrict is None else set(restrict)
        seeds = [s for s in range(-3, self.num_candidate_sets) if allowed is None or s in allowed]
        if not seeds:  # upstream's own check, before any work
            raise ValueError(
                f"`restrict` {allowed!r} does not match any candidate seed in "
                f"range(-3, {self.num_candidate_sets}); no candidate programs would be evaluated."
            )
        return seeds

    def finished(self, state: dict[str, Any]) -> bool:
        return bool(state.get("stopped")) or len(state["candidates"]) == len(state["seeds"])

    def candidate(
        self,
        seed: int,
        student: Any,
        teacher: Any,
        trainset: list,
        valset: list | None,
        labeled_sample: bool,
    ) -> dict[str, Any]:
        """One seed's candidate, built and scored by upstream's loop restricted to it."""
        compiled = super().compile(
            student,
            teacher=teacher,
            trainset=trainset,
            valset=valset,
            restrict=[seed],
            labeled_sample=labeled_sample,
        )
        (data,) = compiled.candidate_programs
        return {
            "seed": seed,
            "score": score_to_json(data["score"]),
            "subscores": [score_to_json(s) for s in data["subscores"]],
            "program": program_state(data["program"]),
        }

    def with_candidate(self, state: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
        """The state after one more seed: the best is the first to pass all before it,
        and a score at ``stop_at_score`` ends the search, as upstream decides."""
        scores = [c["score"] for c in state["candidates"]]
        best = state["best"]
        if not scores or candidate["score"] > max(scores):
            best = len(scores)
        stop = self.stop_at_score is not None and candidate["score"] >= self.stop_at_score
        return {
            "seeds": state["seeds"],
            "candidates": [*state["candidates"], candidate],
            "best": best,
            "stopped": stop,
        }

    def result(self, state: dict[str, Any], student: Any) -> Any:
        """Upstream's return value: the best program, with every candidate attached in
        decreasing score order (ties in seed order)."""
        template = student.reset_copy()
        score_data = []
        for entry in state["candidates"]:
            program = program_from_state(template, entry["program"])
            program._compiled = entry["seed"] != -3  # as LabeledFewShot/BootstrapFewShot set it
            score_data.append(
                {
                    "score": entry["score"],
                    "subscores": list(entry["subscores"]),
                    "seed": entry["seed"],
                    "program": program,
                }
            )
        best_program = score_data[state["best"]]["program"]
        best_program.candidate_programs = sorted(score_data, key=lambda x: x["score"], reverse=True)
        return best_program


# ---- under the run machinery ---------------------------------------------------------
class RandomSearchAdapter(OptimizerAdapter):
    """Runs ``ResumableRandomSearch`` with the user's settings: a snapshot per seed,
    progress per seed (index of N, its score, the best so far), an exact resume."""

    name = "BootstrapFewShotWithRandomSearch"
    resume = "exact"
    state_key = "bootstrap_rs"

    def make_optimizer(self, teleprompter: Any, run: RunContext) -> Any:
        optimizer = adopt(ResumableRandomSearch, teleprompter, hooks=RunHooks(run))
        optimizer.metric = run.watched_metric(optimizer.metric, stops=self.budget_per_call)
        return optimizer

    def summary(self, optimizer: Any, program: Any, run: RunContext) -> dict[str, Any]:
        candidates = [
            {"seed": c["seed"], "score": c["score"], "program_state": program_state(c["program"])}
            for c in program.candidate_programs
        ]
        return {"best_score": candidates[0]["score"], "candidates": candidates}


ADAPTER = RandomSearchAdapter()
