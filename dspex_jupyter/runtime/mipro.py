"""DSPy's MIPROv2 inside a pool kernel: checkpointed after every step, resumed exactly.

This module is MIPROv2's adapter to the run machinery (``runtime/runs.py``: events,
usage, checkpoints, cancel, budgets, the outage policy). The search loop of
``MIPROv2._optimize_prompt_parameters`` is re-written here step for step (same RNG draws,
same Optuna calls in the same order) so that it can checkpoint after every trial and pick
up from any checkpoint; upstream's loop lives in a closure that cannot be resumed. The
fidelity test compares this loop with upstream's ``compile`` trial by trial.

What a checkpoint needs for an exact resume (see shared notes): the demo and instruction
candidates, the optimizer's ``random.Random`` state after each step, the Optuna trials and
the TPE sampler's RNG states, and the loop's bookkeeping, rebuilt from the trials. Those
keys sit at the top of a snapshot (written so before other optimizers had adapters).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import dspy
from dspy.teleprompt import MIPROv2
from dspy.teleprompt.mipro_optimizer_v2 import _import_optuna
from dspy.teleprompt.utils import eval_candidate_program, get_program_with_highest_avg_score

# The run machinery moved to runs.py; its names stay importable from here (and its ops
# callable as "dspex_jupyter.runtime.mipro:start_run" and so on) for older callers.
from .runs import (  # noqa: F401
    INFRASTRUCTURE_ERRORS,
    KEEP_FINISHED_RUNS,
    RUNS,
    WAITABLE_LM_FAILURES,
    BudgetExceeded,
    CheckpointError,
    ForbiddenReferenceError,
    OptimizationDiverged,
    OptimizerAdapter,
    RunCallback,
    RunCancelled,
    RunContext,
    RunRecorder,
    SharedUsageTracker,
    TrialAbandoned,
    _ExampleCancelled,
    _WatchedProgram,
    adopt,
    build_lm,
    build_metric,
    build_program,
    cancel,
    clear_gpu_cache,
    count_cache_hits,
    demos_from_json,
    demos_to_json,
    error_event,
    events,
    example_from_json,
    forget,
    instructions_from_json,
    is_infrastructure_error,
    is_out_of_memory,
    lm_failure_kind,
    numpy_rng_from_json,
    numpy_rng_to_json,
    request_checkpoint,
    result,
    resume_run,
    rng_state_from_json,
    rng_state_to_json,
    runs_here,
    start_run,
    status,
    watched_metric,
)


# ---- the optimizer -------------------------------------------------------------------
class ResumableMIPROv2(MIPROv2):
    """MIPROv2 whose three steps checkpoint and resume; same results as upstream."""

    # Set by ``MIPROv2Adapter.make_optimizer`` (the instance adopts the user's state).
    run: RunContext
    recorder: RunRecorder
    recovery: dict[str, Any]
    diverged_after: int
    budget: dict[str, Any]

    def _check_budget(self, search: dict[str, Any], examples: int) -> None:
        """Before a trial: stop, resumably, if it would pass the budget (its need is the
        usage per evaluated example so far, times the examples it will evaluate)."""
        self.run.check_budget(
            examples,
            evaluated=int(search.get("total_eval_calls") or 0),
            usage_at_start=search.get("usage_at_search_start"),
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
        demos = self.run.run_step(
            "bootstrap",
            lambda: super(ResumableMIPROv2, self)._bootstrap_fewshot_examples(
                program, trainset, seed, teacher, **kwargs
            ),
            rng=self.rng,
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
            candidates = self.run.run_step(
                "propose",
                lambda: super(ResumableMIPROv2, self)._propose_instructions(
                    program, trainset, demo_candidates, *args, **kwargs
                ),
                rng=self.rng,
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
                self.run.lm_is_back()
                return score
            self.rng.setstate(before)
            if not (self.recovery.get("oom_retry", True) and is_out_of_memory(error)):
                self.run.wait_for_lm(error, "search")  # returns when it is time to retry
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


class MIPROv2Adapter(OptimizerAdapter):
    """MIPROv2 (and a user's subclass of it): live trials, exact resume."""

    name = "MIPROv2"
    resume = "exact"
    state_key = "miprov2"  # unused: MIPROv2's keys sit at the top of a snapshot
    budget_per_call = False  # it checks before every trial: a resume stays exact
    ships_program = False  # its state is the whole program
    lm_defaults = {"prompt_model": "task_model"}

    def make_optimizer(self, teleprompter: Any, run: RunContext) -> ResumableMIPROv2:
        cls = type(teleprompter)
        if cls is MIPROv2:
            cls = ResumableMIPROv2
        elif not issubclass(cls, ResumableMIPROv2):  # a user's subclass keeps its overrides
            cls = type(f"Resumable{cls.__name__}", (ResumableMIPROv2, cls), {})
        optimizer = adopt(
            cls,
            teleprompter,
            run=run,
            recorder=run.rec,
            recovery=run.recovery,
            diverged_after=int(run.recovery.get("diverged_after", 6)),
            budget=run.budget,
        )
        optimizer.metric = run.watched_metric(teleprompter.metric, stops=False)
        return optimizer

    def summary(self, optimizer: Any, program: Any, run: RunContext) -> dict[str, Any]:
        search = run.rec.progress.get("search", {})
        return {
            "best_score": search.get("best_score"),
            "best_params": search.get("best_params"),
            "trials": search.get("trials", []),
        }


ADAPTER = MIPROv2Adapter()
