"""DSPy's COPRO as steps: the first proposals, then one step per depth; resumed per step.

Upstream's ``compile`` is one function whose state (candidates per predictor, the
evaluated candidates with their programs, the module being improved) lives in local
variables keyed by ``id(predictor)``, so it cannot be resumed. Here the same search is
written as steps over a JSON state (predictors by position, programs as ``dump_state``):
the first proposals, then per depth the evaluation of each predictor's candidates and the
proposals for the next depth. Upstream's order of LM calls, evaluations and tie-breaks is
kept (the fidelity test compares candidates, scores and the final program with upstream's
``compile``), and its own helpers (signatures, ``_drop_duplicates``) are reused.

A resume goes on from the last completed step (a step cut short is redone from its start,
a function of the state before it) and ends with the candidates, scores and program of an
uninterrupted run: the resume is exact, at step granularity.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import dspy
from dspy.evaluate.evaluate import Evaluate
from dspy.teleprompt import COPRO
from dspy.teleprompt.copro_optimizer import (
    BasicGenerateInstruction,
    GenerateInstructionGivenAttempts,
)

from ..checkpoint import CheckpointError
from .runs import OptimizerAdapter, RunContext, adopt
from .step_state import RunHooks, StepHooks, program_from_state, program_state, score_to_json

STAT_KEYS = ("depth", "max", "average", "min", "std")


class ResumableCOPRO(COPRO):
    """COPRO with a step (and a snapshot) after the first proposals and after each depth."""

    def __init__(self, *, hooks: StepHooks | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hooks = hooks or StepHooks()

    def compile(self, student: Any, *, trainset: list, eval_kwargs: dict | None = None) -> Any:
        eval_kwargs = eval_kwargs or {}
        module = student.deepcopy()
        evaluate = Evaluate(devset=trainset, metric=self.metric, **eval_kwargs)
        settings = {
            "breadth": self.breadth,
            "depth": self.depth,
            "predictors": len(module.predictors()),
        }
        state = self.hooks.restored
        if state is None:
            self.hooks.step_started("propose", step=0, total=self.depth, breadth=self.breadth)
            state = self.hooks.run_step("propose", lambda: self.first_proposals(module, settings))
            self.hooks.step_done("propose", state, **self.progress(state))
        elif state["settings"] != settings:
            raise CheckpointError(
                f"the snapshot is of a COPRO run with {state['settings']}, not {settings}",
                hint="resume with the optimizer and program the run was started with: "
                "dspex.resume(dir, pool, teleprompter=tp, program=...)",
            )
        while state["depth_done"] < self.depth:
            depth = state["depth_done"]
            several = len(state["predictors"]) > 1  # then every candidate is scored again
            candidates = sum(len(e["all" if several else "latest"]) for e in state["predictors"])
            self.hooks.step_started(
                "depth",
                examples=candidates * len(trainset),
                step=depth + 1,
                total=self.depth,
                breadth=self.breadth,
            )
            state = self.hooks.run_step(
                "depth",
                lambda state=state: self.depth_step(module, state, evaluate, trainset, eval_kwargs),
            )
            self.hooks.step_done("depth", state, **self.progress(state))
        return self.result(module, state)

    # ---- steps ----------------------------------------------------------------------
    def first_proposals(self, module: Any, settings: dict[str, Any]) -> dict[str, Any]:
        """``breadth - 1`` proposals per predictor from its instruction, plus the
        instruction itself (upstream's seeding, zero-shot)."""
        predictors = []
        for predictor in module.predictors():
            signature = self._get_signature(predictor)
            *_, last_key = signature.fields.keys()
            basic = (signature.instructions, signature.fields[last_key].json_schema_extra["prefix"])
            pairs = self._propose(
                BasicGenerateInstruction, self.breadth - 1, basic_instruction=basic[0]
            )
            pairs.append(list(basic))
            predictors.append(
                {
                    "all": pairs,
                    "latest": list(pairs),
                    "evaluated": [],
                    "results_best": {k: [] for k in STAT_KEYS},
                    "results_latest": {k: [] for k in STAT_KEYS},
                }
            )
        return {
            "settings": settings,
            "depth_done": 0,
            "total_calls": 0,
            "module": program_state(module),
            "predictors": predictors,
        }

    def depth_step(
        self,
        module: Any,
        state: dict[str, Any],
        evaluate: Any,
        trainset: list,
        eval_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """Evaluate every predictor's candidates (each then set to its best, so the next
        predictor is scored with it), then propose the next depth's candidates from the
        attempts so far. Returns the state after the step; ``state`` is left as it was."""
        depth = state["depth_done"]
        clone = program_from_state(module, state["module"])
        entries = copy.deepcopy(state["predictors"])
        total_calls = state["total_calls"]
        several = len(module.predictors()) > 1
        latest_scores: list[Any] = []  # upstream's statistics pool them over predictors
        for p_old, p_new, entry in zip(
            module.predictors(), clone.predictors(), entries, strict=True
        ):
            # One predictor: the newest candidates; several: all of them again, because
            # the other predictors' best prompts have changed since.
            pairs = entry["all"] if several else entry["latest"]
            for index, (raw_instruction, raw_prefix) in enumerate(pairs):
                instruction = raw_instruction.strip('"').strip()
                prefix = raw_prefix.strip('"').strip()
                self._set_prompt(p_new, p_new, instruction, prefix)
                score = score_to_json(evaluate(clone, devset=trainset, **eval_kwargs).score)
                total_calls += 1
                self._record(entry["evaluated"], instruction, prefix, score, clone, depth)
                if len(pairs) - self.breadth <= index:
                    latest_scores.append(score)
            if self.track_stats:
                _append_stats(entry["results_latest"], depth, latest_scores)
            best = max(entry["evaluated"], key=lambda candidate: candidate["score"])
            self._set_prompt(p_old, p_new, best["instruction"], best["prefix"])
        if depth < self.depth - 1:
            for entry in entries:
                ranked = sorted(entry["evaluated"], key=lambda x: x["score"], reverse=True)
                if self.track_stats:
                    _append_stats(entry["results_best"], depth, [x["score"] for x in ranked][:10])
                new = self._propose(
                    GenerateInstructionGivenAttempts,
                    self.breadth,
                    attempted_instructions=_attempts(ranked, self.breadth),
                )
                entry["latest"] = new
                entry["all"] = entry["all"] + new
        return {
            "settings": state["settings"],
            "depth_done": depth + 1,
            "total_calls": total_calls,
            "module": program_state(clone),
            "predictors": entries,
        }

    def result(self, module: Any, state: dict[str, Any]) -> Any:
        """Upstream's return value: the best program, with the candidates (best first,
        duplicates dropped) and ``total_calls`` attached (and the statistics when
        ``track_stats``)."""
        last_depth = state["depth_done"] - 1
        candidates = []
        for entry in state["predictors"]:
            for record in entry["evaluated"]:
                candidates.append(
                    {**record, "program": program_from_state(module, record["program"])}
                )
            if self.track_stats:
                ranked = sorted(entry["evaluated"], key=lambda x: x["score"], reverse=True)
                _append_stats(entry["results_best"], last_depth, [x["score"] for x in ranked][:10])
        candidates.sort(key=lambda x: x["score"], reverse=True)
        candidates = self._drop_duplicates(candidates)
        best_program = candidates[0]["program"]
        best_program.candidate_programs = candidates
        best_program.total_calls = state["total_calls"]
        if self.track_stats:
            ids = [id(p) for p in module.predictors()]
            best_program.results_best = {
                i: e["results_best"] for i, e in zip(ids, state["predictors"], strict=True)
            }
            best_program.results_latest = {
                i: e["results_latest"] for i, e in zip(ids, state["predictors"], strict=True)
            }
        return best_program

    def progress(self, state: dict[str, Any]) -> dict[str, Any]:
        """What the dashboard shows after a step: depth ``step`` of ``total``, breadth,
        the best so far."""
        evaluated = [r for e in state["predictors"] for r in e["evaluated"]]
        best = max(evaluated, key=lambda r: r["score"]) if evaluated else None
        return {
            "step": state["depth_done"],
            "total": self.depth,
            "breadth": self.breadth,
            "candidates": sum(len(e["all"]) for e in state["predictors"]),
            "evaluated": len(evaluated),
            "best_score": best["score"] if best else None,
            "best_instruction": best["instruction"] if best else None,
        }

    # ---- as upstream ----------------------------------------------------------------
    def _propose(self, signature: Any, n: int, **inputs: Any) -> list[list[str]]:
        """``n`` (instruction, prefix) proposals from the prompt model (else the LM)."""
        predict = dspy.Predict(signature, n=n, temperature=self.init_temperature)
        if self.prompt_model:
            with dspy.context(lm=self.prompt_model):
                completions = predict(**inputs).completions
        else:
            completions = predict(**inputs).completions
        return [
            [instruction, prefix]
            for instruction, prefix in zip(
                completions.proposed_instruction,
                completions.proposed_prefix_for_output_field,
                strict=True,
            )
        ]

    def _set_prompt(self, owner: Any, predictor: Any, instruction: str, prefix: str) -> None:
        """Set ``predictor``'s instruction and last field's prefix (the field named by
        ``owner``'s signature, as upstream names it)."""
        *_, last_key = self._get_signature(owner).fields.keys()
        signature = (
            self._get_signature(predictor)
            .with_instructions(instruction)
            .with_updated_fields(last_key, prefix=prefix)
        )
        self._set_signature(predictor, signature)

    @staticmethod
    def _record(
        evaluated: list[dict[str, Any]],
        instruction: str,
        prefix: str,
        score: Any,
        clone: Any,
        depth: int,
    ) -> None:
        """Keep the best score per (instruction, prefix); a better score replaces the
        record where it stands (upstream's dict keeps its first-insertion order)."""

        def record() -> dict[str, Any]:
            return {
                "score": score,
                "program": program_state(clone),
                "instruction": instruction,
                "prefix": prefix,
                "depth": depth,
            }

        for i, old in enumerate(evaluated):
            if (old["instruction"], old["prefix"]) == (instruction, prefix):
                if old["score"] < score:
                    evaluated[i] = record()
                return
        evaluated.append(record())


def _attempts(ranked: list[dict[str, Any]], breadth: int) -> list[str]:
    """The attempts shown to the prompt model: the best ``breadth`` so far, worst first."""
    shortest = min(len(ranked), breadth)
    lines = []
    for i in range(shortest - 1, -1, -1):
        number = shortest - i
        lines.append(f"Instruction #{number}: {ranked[i]['instruction']}")
        lines.append(f"Prefix #{number}: {ranked[i]['prefix']}")
        lines.append(f"Resulting Score #{number}: {ranked[i]['score']}")
    return lines


def _append_stats(stats: dict[str, list], depth: int, scores: list[Any]) -> None:
    stats["depth"].append(depth)
    stats["max"].append(max(scores))
    stats["average"].append(sum(scores) / len(scores))
    stats["min"].append(min(scores))
    stats["std"].append(statistics.pstdev(scores))


# ---- under the run machinery ---------------------------------------------------------
class COPROAdapter(OptimizerAdapter):
    """Runs ``ResumableCOPRO`` with the user's settings: a snapshot after the first
    proposals and after each depth, progress per depth (i of D, breadth, the best so far);
    a resume goes on from the last completed depth and ends as an uninterrupted run."""

    name = "COPRO"
    resume = "exact"
    state_key = "copro"

    def make_optimizer(self, teleprompter: Any, run: RunContext) -> Any:
        optimizer = adopt(ResumableCOPRO, teleprompter, hooks=RunHooks(run))
        optimizer.metric = run.watched_metric(optimizer.metric, stops=self.budget_per_call)
        return optimizer

    def summary(self, optimizer: Any, program: Any, run: RunContext) -> dict[str, Any]:
        candidates = [
            {
                "score": c["score"],
                "instruction": c["instruction"],
                "prefix": c["prefix"],
                "depth": c["depth"],
                "program_state": program_state(c["program"]),
            }
            for c in program.candidate_programs
        ]
        return {
            "best_score": candidates[0]["score"],
            "candidates": candidates,
            "total_calls": program.total_calls,
        }


ADAPTER = COPROAdapter()
