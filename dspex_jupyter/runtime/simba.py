"""DSPy's SIMBA as steps over a JSON state; resumed from the last completed step.

Upstream's ``compile`` keeps its state in local variables and closures (the program pool
and their mini-batch scores, the shuffled data order, the winning programs, and two RNGs:
a ``random.Random`` and a numpy ``Generator``). Here each mini-batch step is a function of
that state written as JSON (programs as ``dump_state``, RNG states as numbers) and returns
the next one, doing upstream's draws, LM calls and evaluations in upstream's order with
its own helpers (``prepare_models_for_resampling``, ``wrap_program``, the strategies).
The final step, validation on the whole trainset, builds the result. The fidelity test
compares candidates, scores, trial logs and the final program with upstream's ``compile``.

A resume goes on from the last completed step (a step cut short is redone from its start,
a function of the state before it, RNG states included) and ends with the candidates,
scores, trial logs and program of an uninterrupted run: exact, at step granularity.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import dspy
import numpy as np
from dspy.teleprompt import SIMBA
from dspy.teleprompt.simba_utils import prepare_models_for_resampling, wrap_program

from ..checkpoint import CheckpointError
from .runs import OptimizerAdapter, RunContext, adopt
from .step_state import (
    RunHooks,
    StepHooks,
    numpy_generator_from_json,
    numpy_generator_to_json,
    program_from_state,
    program_state,
    random_from_json,
    random_state_to_json,
    score_to_json,
)

logger = logging.getLogger("dspy.teleprompt.simba")  # upstream's lines, in the run's log


class ResumableSIMBA(SIMBA):
    """SIMBA with a step (and a snapshot) after every mini-batch step."""

    def __init__(self, *, hooks: StepHooks | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hooks = hooks or StepHooks()

    def compile(self, student: Any, *, trainset: list, seed: int = 0) -> Any:
        assert len(trainset) >= self.bsize, f"Trainset too small: {len(trainset)} < {self.bsize}"
        baseline = student.deepcopy()
        settings = {
            "seed": seed,
            "bsize": self.bsize,
            "num_candidates": self.num_candidates,
            "max_steps": self.max_steps,
            "trainset": len(trainset),
        }
        state = self.hooks.restored or self.initial_state(baseline, len(trainset), settings)
        if state["settings"] != settings:
            raise CheckpointError(
                f"the snapshot is of a SIMBA run with {state['settings']}, not {settings}",
                hint="resume with the optimizer the run was started with: "
                "dspex.resume(dir, pool, teleprompter=tp)",
            )
        run_parallel = dspy.Parallel(access_examples=False, num_threads=self.num_threads)
        while state["step"] < self.max_steps:
            self.hooks.step_started(
                "step",
                examples=self.bsize * (2 * self.num_candidates + 1),  # sampling, then scoring
                step=state["step"] + 1,
                total=self.max_steps,
                batch_size=self.bsize,
            )
            state = self.hooks.run_step(
                "step",
                lambda state=state: self.mini_batch_step(baseline, state, trainset, run_parallel),
            )
            self.hooks.step_done("step", state, **self.progress(state))
        self.hooks.step_started(
            "validate",
            examples=len(trainset) * (self.num_candidates + 1),
            step=self.max_steps,
            total=self.max_steps,
        )
        return self.hooks.run_step(
            "validate", lambda: self.validate(baseline, state, trainset, run_parallel)
        )

    def initial_state(self, baseline: Any, size: int, settings: dict[str, Any]) -> dict[str, Any]:
        rng = random.Random(settings["seed"])
        rng_np = np.random.default_rng(settings["seed"])
        data_indices = list(range(size))
        rng.shuffle(data_indices)
        return {
            "settings": settings,
            "step": 0,
            "rng": random_state_to_json(rng),
            "rng_np": numpy_generator_to_json(rng_np),
            "data_indices": data_indices,
            "instance_idx": 0,
            # The pool: program i has simba_idx i; the baseline's scores stay empty.
            "programs": [program_state(baseline)],
            "scores": [[]],
            # [simba_idx the program carries, its state]: the baseline, then each step's best.
            "winning": [[0, program_state(baseline)]],
            "trial_logs": [],
            "last": None,
        }

    # ---- one mini-batch step, as upstream's loop body --------------------------------
    def mini_batch_step(
        self, baseline: Any, state: dict[str, Any], trainset: list, run_parallel: Any
    ) -> dict[str, Any]:
        """Sample trajectories on the next mini-batch, build new candidates from the most
        variable examples, score them on the same batch and add them to the pool."""
        batch_idx = state["step"]
        pool = _Pool(baseline, state)
        rng = random_from_json(state["rng"])
        rng_np = numpy_generator_from_json(state["rng_np"])
        data_indices = list(state["data_indices"])
        instance_idx = state["instance_idx"]
        logger.info(f"Starting batch {batch_idx + 1} of {self.max_steps}.")

        if instance_idx + self.bsize > len(trainset):
            rng.shuffle(data_indices)
            instance_idx = 0
        batch = [trainset[i] for i in data_indices[instance_idx : instance_idx + self.bsize]]
        instance_idx += self.bsize

        models = prepare_models_for_resampling(
            pool.program(0), self.num_candidates, self.teacher_settings
        )
        top_programs = pool.top_k_plus_baseline(self.num_candidates)
        exec_pairs = []
        predictor2name: dict[int, str] = {}
        for model in models:
            for example in batch:
                chosen = pool.softmax_sample(rng, top_programs, self.temperature_for_sampling)
                candidate_system = pool.program(chosen).deepcopy()
                candidate_system.set_lm(model)
                for name, predictor in candidate_system.named_predictors():
                    predictor2name[id(predictor)] = name
                exec_pairs.append((wrap_program(candidate_system, self.metric), example))
        logger.info(
            f"Sampling program trajectories on {self.bsize} examples x "
            f"{self.num_candidates} samples."
        )
        outputs = run_parallel(exec_pairs)
        assert len(outputs) == len(exec_pairs) == self.bsize * self.num_candidates

        buckets, p10, p90, baseline_score = self._buckets(outputs, len(batch))
        logger.info(f"Batch {batch_idx + 1}: Baseline mini-batch score: {baseline_score}\n")

        system_candidates = []
        for bucket_idx, (bucket, (max_to_min_gap, max_score, max_to_avg_gap)) in enumerate(buckets):
            logger.info(
                f"Batch {batch_idx + 1}: Processing bucket #{bucket_idx + 1}, with max score "
                f"{max_score}, max-to-min gap {max_to_min_gap}, and max-to-avg gap "
                f"{max_to_avg_gap}."
            )
            source = pool.softmax_sample(
                rng, pool.top_k_plus_baseline(self.num_candidates), self.temperature_for_candidates
            )
            system_candidate = pool.program(source).deepcopy()
            dropped = self._drop_demos(system_candidate, rng, rng_np)
            name2predictor = dict(system_candidate.named_predictors())
            strategy = rng.choice(self.strategies)
            logger.info(
                f"Batch {batch_idx + 1}: Invoking strategy: {strategy.__name__}"
                + (f", having dropped {dropped} demos per predictor" if dropped else "")
            )
            try:
                strategy(
                    bucket,
                    system_candidate,
                    predictor2name=predictor2name,
                    name2predictor=name2predictor,
                    batch_10p_score=p10,
                    batch_90p_score=p90,
                    prompt_model=self.prompt_model,
                )
            except Exception as e:  # upstream skips a candidate whose strategy failed
                logger.error(f"Strategy failed with error: {e}")
                continue
            system_candidates.append((source, system_candidate))
            if len(system_candidates) >= self.num_candidates + 1:
                break

        logger.info(
            f"Batch {batch_idx + 1}: Evaluating {len(system_candidates)} programs on "
            f"{self.bsize} examples."
        )
        exec_pairs = [
            (wrap_program(system, self.metric), ex)
            for _, system in system_candidates
            for ex in batch
        ]
        outputs = run_parallel(exec_pairs)
        assert len(outputs) == len(exec_pairs) == len(system_candidates) * self.bsize
        candidate_scores = []
        new_scores = []
        for index in range(len(system_candidates)):
            scores = [
                score_to_json(o["score"])
                for o in outputs[index * self.bsize : (index + 1) * self.bsize]
            ]
            new_scores.append(scores)
            candidate_scores.append(sum(scores) / len(scores))
        logger.info(
            f"Scores after {batch_idx + 1} batches: {candidate_scores}, "
            f"Best: {max(candidate_scores) if candidate_scores else 'N/A'}\n"
        )
        winning = list(state["winning"])
        if candidate_scores:
            source, best = system_candidates[candidate_scores.index(max(candidate_scores))]
            winning.append([source, program_state(best)])
        return {
            "settings": state["settings"],
            "step": batch_idx + 1,
            "rng": random_state_to_json(rng),
            "rng_np": numpy_generator_to_json(rng_np),
            "data_indices": data_indices,
            "instance_idx": instance_idx,
            "programs": [*state["programs"], *(program_state(s) for _, s in system_candidates)],
            "scores": [*state["scores"], *new_scores],
            "winning": winning,
            "trial_logs": [*state["trial_logs"], {}],
            "last": {
                "baseline_score": score_to_json(baseline_score),
                "candidate_scores": candidate_scores,
            },
        }

    def _buckets(self, outputs: list, batch_size: int) -> tuple[list, Any, Any, Any]:
        """Per example, its samples best first; examples ordered by (max-to-min gap, max
        score, max-to-avg gap), most promising first; with the batch's percentiles."""
        scores = [float(o["score"]) for o in outputs]
        p10, p90 = np.percentile(scores, 10), np.percentile(scores, 90)
        buckets = []
        for idx in range(batch_size):
            bucket = [outputs[i] for i in range(idx, len(outputs), self.bsize)]
            bucket.sort(key=lambda x: x["score"], reverse=True)
            max_score = float(bucket[0]["score"])
            min_score = float(bucket[-1]["score"])
            avg_score = sum(x["score"] for x in bucket) / len(bucket)
            buckets.append((bucket, (max_score - min_score, max_score, max_score - avg_score)))
        buckets.sort(key=lambda x: x[1], reverse=True)
        baseline_score = sum(o["score"] for o in outputs) / len(outputs)
        return buckets, p10, p90, baseline_score

    def _drop_demos(self, system: Any, rng: random.Random, rng_np: Any) -> int:
        """Drop a Poisson-drawn number of demo positions from every predictor."""
        max_demos = self.max_demos if self.max_demos > 0 else 3
        counts = [len(predictor.demos) for _, predictor in system.named_predictors()]
        num_demos = max(counts) if counts else 0
        drop = max(rng_np.poisson(num_demos / max_demos), int(num_demos >= max_demos))
        drop = min(drop, num_demos)
        positions = [rng.randrange(num_demos) for _ in range(drop)]
        for _, predictor in system.named_predictors():
            predictor.demos = [d for i, d in enumerate(predictor.demos) if i not in positions]
        return drop

    # ---- the last step: the winners on the whole trainset ----------------------------
    def validate(
        self, baseline: Any, state: dict[str, Any], trainset: list, run_parallel: Any
    ) -> Any:
        """Score up to ``num_candidates + 1`` winners, spread over the steps, on the whole
        trainset; the best one, with the scored candidates and trial logs attached."""
        winning = []
        for simba_idx, saved in state["winning"]:
            program = program_from_state(baseline, saved)
            program.simba_idx = simba_idx
            winning.append(program)
        last, count = len(winning) - 1, self.num_candidates + 1
        picks = [0] * count if last < 1 else [round(i * last / (count - 1)) for i in range(count)]
        candidates = [winning[i].deepcopy() for i in dict.fromkeys(picks)]
        logger.info(f"VALIDATION: Evaluating {len(candidates)} programs on the full trainset.")
        exec_pairs = [(wrap_program(s, self.metric), ex) for s in candidates for ex in trainset]
        outputs = run_parallel(exec_pairs)
        trial_logs = {i: dict(log) for i, log in enumerate(state["trial_logs"])}
        scores = []
        size = len(trainset)
        for index in range(len(candidates)):
            values = [o["score"] for o in outputs[index * size : (index + 1) * size]]
            average = sum(values) / len(values) if values else 0.0
            scores.append(average)
            if index != 0:
                trial_logs[index - 1]["train_score"] = average
        data = [{"score": s, "program": p} for s, p in zip(scores, candidates, strict=True)]
        data.sort(key=lambda x: x["score"], reverse=True)
        best_idx = scores.index(max(scores)) if scores else 0
        best_program = candidates[best_idx].deepcopy()
        logger.info(
            f"Final trainset scores: {scores}, Best: {max(scores) if scores else 'N/A'} "
            f"(at index {best_idx if scores else 'N/A'})\n\n\n"
        )
        best_program.candidate_programs = data
        best_program.trial_logs = trial_logs
        return best_program

    def progress(self, state: dict[str, Any]) -> dict[str, Any]:
        """What the dashboard shows after a step: step i of N, the mini-batch size, this
        step's scores and the best average mini-batch score in the pool so far."""
        averages = [sum(s) / len(s) for s in state["scores"] if s]
        last = state.get("last") or {}
        scores = last.get("candidate_scores") or []
        return {
            "step": state["step"],
            "total": self.max_steps,
            "batch_size": self.bsize,
            "programs": len(state["programs"]),
            "baseline_score": last.get("baseline_score"),
            "step_best": max(scores) if scores else None,
            "best_score": max(averages) if averages else None,
        }


class _Pool:
    """The step's program pool, with upstream's choice rules. Programs are rebuilt from the
    state only when drawn: a step draws from the top few, and the pool grows every step."""

    def __init__(self, baseline: Any, state: dict[str, Any]) -> None:
        self.baseline = baseline
        self.states = state["programs"]
        self.scores = state["scores"]
        self._built: dict[int, Any] = {}

    def program(self, index: int) -> Any:
        if index not in self._built:
            program = program_from_state(self.baseline, self.states[index])
            program.simba_idx = index
            self._built[index] = program
        return self._built[index]

    def average(self, index: int) -> float:
        scores = self.scores[index]
        return sum(scores) / len(scores) if scores else 0.0

    def top_k_plus_baseline(self, k: int) -> list[int]:
        ranked = sorted(range(len(self.states)), key=self.average, reverse=True)
        top = ranked[:k]
        if 0 not in top and top:
            top[-1] = 0
        return list(dict.fromkeys(top))

    def softmax_sample(self, rng: random.Random, indices: list[int], temperature: float) -> int:
        if not indices:
            raise ValueError("No programs available for softmax sampling.")
        exps = [np.exp(self.average(i) / temperature) for i in indices]
        total = sum(exps)
        if total <= 0:
            return rng.choice(indices)
        return rng.choices(indices, weights=[e / total for e in exps], k=1)[0]


# ---- under the run machinery ---------------------------------------------------------
class SIMBAAdapter(OptimizerAdapter):
    """Runs ``ResumableSIMBA`` with the user's settings: a snapshot after each mini-batch
    step, progress per step (i of N, mini-batch size, the best so far); a resume goes on
    from the last completed step and ends as an uninterrupted run."""

    name = "SIMBA"
    resume = "exact"
    state_key = "simba"

    def make_optimizer(self, teleprompter: Any, run: RunContext) -> Any:
        optimizer = adopt(ResumableSIMBA, teleprompter, hooks=RunHooks(run))
        optimizer.metric = run.watched_metric(optimizer.metric, stops=self.budget_per_call)
        return optimizer

    def summary(self, optimizer: Any, program: Any, run: RunContext) -> dict[str, Any]:
        candidates = [
            {"score": c["score"], "program_state": program_state(c["program"])}
            for c in program.candidate_programs
        ]
        return {
            "best_score": candidates[0]["score"] if candidates else None,
            "candidates": candidates,
            "trial_logs": {str(k): v for k, v in program.trial_logs.items()},
        }


ADAPTER = SIMBAAdapter()
