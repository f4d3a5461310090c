"""The SIMULATED offline LM and its tasks: determinism, prompt-dependent accuracy, MIPROv2."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import dspy
import pytest
from dspy.lm15 import Message, Request

from dspex_jupyter import testing
from dspex_jupyter.testing import (
    TASK_NAMES,
    SimulatedEngine,
    SimulatedLM,
    Task,
    accuracy,
    get_task,
    simulated_lm,
)
from dspex_jupyter.testing import simulated as simulated_module


def _with_instruction(task: Task, instruction: str | None, n_demos: int = 0) -> dspy.Module:
    program = task.make_program()
    for predictor in program.predictors():
        if instruction is not None:
            predictor.signature = predictor.signature.with_instructions(instruction)
        predictor.demos = task.trainset[:n_demos]
    return program


def _prediction_values(pred: dspy.Prediction) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(pred.toDict().items()))


# --------------------------------------------------------------------------- labelling


def test_it_is_a_real_dspy_lm_labelled_simulated() -> None:
    lm = simulated_lm("arithmetic")
    assert isinstance(lm, dspy.LM) and isinstance(lm, SimulatedLM)
    assert lm.model == "simulated/arithmetic"
    assert "simulated" in repr(lm).lower()
    assert isinstance(lm.engine, SimulatedEngine)
    assert lm.cache is False  # DSPy's cache key ignores the engine's seed and settings
    for obj in (testing, simulated_module, SimulatedLM, SimulatedEngine, simulated_lm):
        assert "simulated" in (obj.__doc__ or "").lower()
    assert simulated_lm(None).model == "simulated/generic"
    assert simulated_lm(None, answers={"Sky colour?": "blue"}).model == "simulated/lookup"
    with pytest.raises(ValueError, match="simulated/"):
        SimulatedLM("openai/gpt-4o-mini")
    with pytest.raises(ValueError, match="unknown simulated task"):
        simulated_lm("no-such-task")


# --------------------------------------------------------------------------- determinism


def test_same_prompt_same_answer_sequentially_and_across_threads() -> None:
    tasks = [get_task(name) for name in TASK_NAMES]
    lms = {task.name: task.lm() for task in tasks}
    instructions = [None, "Think step by step.", "Carefully verify.", "Guess.", "Be precise."]
    jobs = [
        (task, instruction, ex)
        for instruction in instructions
        for task in tasks
        for ex in task.valset[:14]
    ][:200]
    assert len(jobs) == 200

    def call(job: tuple[Task, str | None, dspy.Example]) -> tuple[tuple[str, Any], ...]:
        task, instruction, ex = job
        with dspy.context(lm=lms[task.name]):
            return _prediction_values(_with_instruction(task, instruction)(**ex.inputs()))

    sequential = [call(job) for job in jobs]
    assert [call(job) for job in jobs] == sequential
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(call, jobs))
    assert threaded == sequential
    # The answers are not all alike: they depend on the prompt.
    assert len({values for values in sequential}) > 50


def test_engine_is_a_pure_function_of_the_request() -> None:
    engine = SimulatedEngine(task="arithmetic", seed=3)
    requests = [
        Request(
            model="simulated/arithmetic",
            system=f"Your input fields are:\n1. `question` (str):\nYour output fields are:\n"
            f"1. `answer` (str):\nIn adhering to this structure, your objective is: {instr}",
            messages=(Message.user(f"[[ ## question ## ]]\nWhat is {a} + 7?"),),
        )
        for a in range(10, 60)
        for instr in ("Answer.", "Verify carefully, step by step.")
    ]
    first = [engine.complete(r).text for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        again = list(pool.map(lambda r: engine.complete(r).text, requests * 2))
    assert again == first * 2
    assert SimulatedEngine(task="arithmetic", seed=3).complete(requests[0]).text == first[0]
    assert all(text.rstrip().endswith("[[ ## completed ## ]]") for text in first)


# --------------------------------------------------------------------------- accuracy


# Fixed by the seed: (bare instruction, good instruction, good + 4 demos, bare + 4 demos,
# misleading instruction), as percentages on each task's default valset.
EXPECTED_SCORES = {
    "arithmetic": (37.5, 75.0, 97.5, 55.0, 2.5),
    "sentiment": (45.0, 92.5, 97.5, 52.5, 25.0),
    "capitals": (30.0, 90.0, 96.67, 50.0, 10.0),
}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_accuracy_depends_on_instruction_and_demos(name: str) -> None:
    task = get_task(name)
    bare = task.evaluate()
    good = task.evaluate(_with_instruction(task, task.good_instruction))
    good_demos = task.evaluate(_with_instruction(task, task.good_instruction, n_demos=4))
    bare_demos = task.evaluate(_with_instruction(task, None, n_demos=4))
    misleading = task.evaluate(_with_instruction(task, "Go with your first instinct and guess."))
    assert (bare, good, good_demos, bare_demos, misleading) == EXPECTED_SCORES[name]
    assert misleading < bare < bare_demos < good < good_demos


def test_accuracy_formula() -> None:
    assert accuracy(0.3, "Answer.") == pytest.approx(0.3)
    assert accuracy(0.3, "Think step by step and verify.") == pytest.approx(0.6)
    assert accuracy(0.3, "Carefully, step by step, verify, double-check.") == pytest.approx(0.75)
    assert accuracy(0.3, "Answer.", correct_demos=9) == pytest.approx(0.5)
    assert accuracy(0.3, "Answer.", wrong_demos=1) == pytest.approx(0.15)
    assert accuracy(0.3, "Just guess.") == pytest.approx(0.15)
    assert accuracy(0.9, "step by step carefully", correct_demos=4, reasoning=True) == 0.97
    assert accuracy(0.0, "guess quick first instinct", wrong_demos=3) == 0.03


def test_wrong_demos_lower_accuracy() -> None:
    task = get_task("capitals")
    wrong = [ex.copy(capital="Springfield") for ex in task.trainset[:2]]
    program = _with_instruction(task, None)
    program.demos = wrong
    right = _with_instruction(task, None, n_demos=2)
    assert task.evaluate(program) < task.evaluate() < task.evaluate(right)


# --------------------------------------------------------------------------- DSPy integration


@pytest.mark.parametrize("name", TASK_NAMES)
def test_evaluate_with_threads_matches_one_thread(name: str) -> None:
    task = get_task(name)
    program = _with_instruction(task, "Think step by step.", n_demos=2)
    lm = task.lm()
    scores = []
    for threads in (1, 4):
        evaluator = dspy.Evaluate(devset=task.valset, metric=task.metric, num_threads=threads)
        with dspy.context(lm=lm):
            scores.append(evaluator(program).score)
    assert scores[0] == scores[1]


def test_predict_chain_of_thought_json_adapter_and_typed_fields() -> None:
    lm = simulated_lm("arithmetic")
    with dspy.context(lm=lm):
        cot = dspy.ChainOfThought("question -> answer")(question="What is 12 * 3?")
        plain = dspy.Predict("question -> answer")(question="What is 12 * 3?")
    assert cot.reasoning and cot.answer.lstrip("-").isdigit() and plain.answer.isdigit()
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        as_json = dspy.ChainOfThought("question -> answer")(question="What is 12 * 3?")
    assert as_json.answer.lstrip("-").isdigit()
    assert json.loads(lm.history[-1]["outputs"][0])["answer"] == as_json.answer

    class Typed(dspy.Signature):
        """Some signature the simulator knows nothing about."""

        text: str = dspy.InputField()
        count: int = dspy.OutputField()
        flag: bool = dspy.OutputField()
        tags: list[str] = dspy.OutputField()
        label: Literal["x", "y"] = dspy.OutputField()
        summary: str = dspy.OutputField()

    with dspy.context(lm=lm):
        typed = dspy.Predict(Typed)(text="hello")
    assert (typed.count, typed.flag, typed.tags, typed.label) == (0, False, [], "x")
    assert "simulated" in typed.summary.lower()
    assert "simulated" in lm("hello")[0].lower()


def test_usage_and_cost_are_reported() -> None:
    lm = simulated_lm("sentiment")
    with dspy.context(lm=lm, track_usage=True):
        pred = dspy.Predict("review -> sentiment")(review="The food was great.")
    entry = lm.history[-1]
    assert entry["usage"]["prompt_tokens"] > 10 and entry["usage"]["completion_tokens"] > 0
    assert entry["cost"] == 0.0
    assert pred.get_lm_usage()["simulated/sentiment"]["total_tokens"] > 10


def test_rollout_id_changes_samples_only_at_nonzero_temperature() -> None:
    lm = simulated_lm("arithmetic", base_accuracy=0.5)
    program = dspy.Predict("question -> answer")
    questions = [f"What is {a} + {a + 3}?" for a in range(10, 40)]

    def answers(model: dspy.LM) -> list[str]:
        with dspy.context(lm=model):
            return [program(question=q).answer for q in questions]

    base = answers(lm)
    assert answers(lm.copy(rollout_id=1, temperature=1.0)) != base
    r1 = answers(lm.copy(rollout_id=1, temperature=1.0))
    assert r1 == answers(lm.copy(rollout_id=1, temperature=1.0))
    assert answers(lm.copy(rollout_id=2, temperature=1.0)) != r1
    with pytest.warns(UserWarning, match="rollout_id has no effect"):  # DSPy says so too
        greedy = [answers(lm.copy(rollout_id=r, temperature=0.0)) for r in (1, 2)]
    assert greedy[0] == greedy[1]
    assert lm.copy(rollout_id=7).simulated_engine.rollout_id == 7
    assert lm.copy(rollout_id=7).copy(rollout_id=None).simulated_engine.rollout_id is None


def test_proposer_signature_gets_varied_instructions_from_a_fixed_pool() -> None:
    class Propose(dspy.Signature):
        """Propose a better instruction."""

        basic_instruction: str = dspy.InputField()
        proposed_instruction: str = dspy.OutputField()

    lm = simulated_lm("capitals")
    proposals = set()
    for rollout in range(12):
        with dspy.context(lm=lm.copy(rollout_id=rollout, temperature=1.0)):
            proposals.add(dspy.Predict(Propose)(basic_instruction="Name it.").proposed_instruction)
    pool = set(simulated_module._GENERIC_PROPOSALS) | set(
        testing.tasks.knowledge_for("capitals").proposals
    )
    assert proposals <= pool and len(proposals) >= 4


def test_async_call_gives_the_sync_answer() -> None:
    lm = simulated_lm("arithmetic")
    program = dspy.ChainOfThought("question -> answer")

    async def run() -> dspy.Prediction:
        with dspy.context(lm=lm):
            return await program.acall(question="What is 40 - 13?")

    with dspy.context(lm=lm):
        sync = program(question="What is 40 - 13?")
    assert _prediction_values(asyncio.run(run())) == _prediction_values(sync)


def test_latency_knob_delays_each_call() -> None:
    lm = simulated_lm("arithmetic", latency_s=0.05)
    start = time.perf_counter()
    with dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="What is 1 + 2?")
    assert time.perf_counter() - start >= 0.05


def test_lm_state_round_trips() -> None:
    lm = simulated_lm("capitals", seed=5, latency_s=0.0).copy(rollout_id=3, temperature=0.7)
    state = lm.dump_state()
    json.dumps(state)
    with pytest.raises(ValueError, match="allow_unsafe_lm_state"):
        dspy.BaseLM.load_state(state)
    loaded = dspy.BaseLM.load_state(state, allow_custom_lm_class=True)
    assert isinstance(loaded, SimulatedLM)
    assert loaded.simulated_engine == lm.simulated_engine
    assert loaded.kwargs["temperature"] == 0.7


def test_lookup_table_task() -> None:
    table = {"What colour is the sky?": "blue", "What colour is grass?": "green"}
    lm = simulated_lm(None, answers=table, base_accuracy=0.97)
    with dspy.context(lm=lm):
        pred = dspy.Predict("question -> answer")(question="What colour is grass?")
    assert pred.answer in {"green", "blue"}


# --------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("name", TASK_NAMES)
def test_tasks_are_deterministic_consistent_and_sized(name: str) -> None:
    task = get_task(name)
    again = get_task(name)
    assert [ex.toDict() for ex in task.trainset + task.valset] == [
        ex.toDict() for ex in again.trainset + again.valset
    ]
    other = get_task(name, seed=1)
    assert [ex.toDict() for ex in other.valset] != [ex.toDict() for ex in task.valset]
    assert 40 <= len(task.trainset) <= 60 and 20 <= len(task.valset) <= 60
    small = get_task(name, n_train=5, n_val=3)
    assert (len(small.trainset), len(small.valset)) == (5, 3)
    key = task.knowledge.input_field
    assert not {ex[key] for ex in task.trainset} & {ex[key] for ex in task.valset}
    for ex in task.trainset + task.valset:
        assert set(ex.inputs().keys()) == {key}
        label = ex[task.knowledge.output_field]
        assert task.knowledge.solve(ex[key]) == label
        assert task.metric(ex, dspy.Prediction(**{task.knowledge.output_field: label}))
        wrong = task.knowledge.wrong(ex[key], label, 1)
        assert not task.metric(ex, dspy.Prediction(**{task.knowledge.output_field: wrong}))
    assert task.lm().model == f"simulated/{name}"


# --------------------------------------------------------------------------- MIPROv2


def _run_mipro(task: Task, num_threads: int = 1) -> tuple[dspy.Module, list[Any]]:
    lm = task.lm()
    optimizer = dspy.teleprompt.MIPROv2(
        metric=task.metric,
        prompt_model=lm,
        task_model=lm,
        auto=None,
        num_candidates=4,
        seed=0,
        verbose=False,
        num_threads=num_threads,
        init_temperature=1.0,
    )
    optimized = optimizer.compile(
        task.make_program(),
        trainset=task.trainset,
        valset=task.valset,
        num_trials=8,
        minibatch_size=10,
        max_bootstrapped_demos=2,
        max_labeled_demos=2,
        program_aware_proposer=False,
        data_aware_proposer=False,
        tip_aware_proposer=False,
        fewshot_aware_proposer=False,
    )
    trials = [
        (n, log.get("mb_score"), log.get("full_eval_score"), log.get("0_predictor_instruction"))
        for n, log in sorted(optimized.trial_logs.items())
    ]
    return optimized, trials


@pytest.mark.parametrize("name", TASK_NAMES)
def test_mipro_v2_offline_improves_the_program_deterministically(name: str) -> None:
    task = get_task(name)
    baseline = task.evaluate()
    optimized, trials = _run_mipro(task)
    assert task.evaluate(optimized) > baseline
    assert task.evaluate(optimized) == optimized.score
    again, trials_again = _run_mipro(task)
    assert trials_again == trials
    assert json.dumps(again.dump_state(), sort_keys=True) == json.dumps(
        optimized.dump_state(), sort_keys=True
    )


def test_mipro_v2_with_threads_matches_one_thread() -> None:
    task = get_task("sentiment")
    one, trials_one = _run_mipro(task, num_threads=1)
    four, trials_four = _run_mipro(task, num_threads=4)
    assert trials_four == trials_one
    assert json.dumps(four.dump_state(), sort_keys=True) == json.dumps(
        one.dump_state(), sort_keys=True
    )


def test_mipro_v2_with_all_proposer_features_on_does_not_crash() -> None:
    task = get_task("capitals", n_train=20, n_val=15)
    lm = task.lm()
    optimizer = dspy.teleprompt.MIPROv2(
        metric=task.metric, prompt_model=lm, task_model=lm, auto=None, num_candidates=3, seed=1
    )
    optimized = optimizer.compile(
        task.make_program(),
        trainset=task.trainset,
        valset=task.valset,
        num_trials=4,
        minibatch=False,
        max_bootstrapped_demos=1,
        max_labeled_demos=1,
    )
    assert task.evaluate(optimized, devset=task.valset) >= task.evaluate(devset=task.valset)


# --------------------------------------------------------------------------- GEPA and SIMBA


def _gepa_compile(task: Task) -> dspy.Module:
    lm = task.lm()
    optimizer = dspy.GEPA(
        metric=task.feedback_metric, reflection_lm=lm, max_metric_calls=80, seed=0, track_stats=True
    )
    with dspy.context(lm=lm):
        return optimizer.compile(task.make_program(), trainset=task.trainset, valset=task.valset)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_feedback_metric_scores_and_teaches_a_lesson_when_wrong(name: str) -> None:
    task = get_task(name, n_train=4, n_val=20)
    field = task.knowledge.output_field
    lessons_seen = set()
    for ex in task.valset:
        right = task.feedback_metric(ex, dspy.Prediction(**{field: ex[field]}), None, None, None)
        assert (right.score, right.feedback.startswith("Correct")) == (1.0, True)
        wrong_answer = task.knowledge.wrong(ex[task.knowledge.input_field], ex[field], 1)
        wrong = task.feedback_metric(ex, dspy.Prediction(**{field: wrong_answer}))
        assert wrong.score == 0.0 and str(ex[field]) in wrong.feedback
        lesson = next(lesson for lesson in task.knowledge.lessons if lesson in wrong.feedback)
        lessons_seen.add(lesson)
    assert len(lessons_seen) >= 2  # different examples teach different lessons


def test_reflection_turns_feedback_lessons_into_a_better_instruction() -> None:
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

    lm = simulated_lm("arithmetic")
    record = {"Inputs": {"question": "What is 2 + 3?"}, "Generated Outputs": {"answer": "6"}}
    feedback = {
        "wrong": "Incorrect: the expected answer is 5, not 6. Track each quantity in the problem.",
        "right": "Correct: 5 is the expected answer.",
    }

    def propose(current: str, *notes: str) -> str:
        dataset = {"p": [{**record, "Feedback": note} for note in notes]}
        with dspy.context(lm=lm):
            return InstructionProposer()({"p": current}, dataset, ["p"])["p"]

    better = propose("Answer. Go with your first instinct.", feedback["wrong"], feedback["right"])
    assert better == "Answer. Track each quantity in the problem."  # misleading sentence gone
    assert propose("Answer.", feedback["right"]) == "Answer."  # nothing to learn
    assert propose(better, feedback["wrong"]) == better  # lesson already learnt
    assert accuracy(0.3, better, hints=("each quantity",)) > accuracy(0.3, "Answer.")
    # gepa's own plain-text reflection template gets the same answer, in a ``` block.
    from gepa.strategies.instruction_proposal import InstructionProposalSignature

    prompt = InstructionProposalSignature.prompt_renderer(
        {
            "current_instruction_doc": "Answer.",
            "dataset_with_feedback": [{"Feedback": feedback["wrong"]}],
        }
    )
    assert lm(prompt)[0] == "```\nAnswer. Track each quantity in the problem.\n```"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_gepa_offline_improves_the_program_deterministically(name: str) -> None:
    task = get_task(name, n_train=12, n_val=10)
    optimized = _gepa_compile(task)
    results = optimized.detailed_results
    assert len(results.candidates) > 1
    assert max(results.val_aggregate_scores) > results.val_aggregate_scores[0]
    assert task.evaluate(optimized) > task.evaluate()
    lessons = [
        lesson
        for lesson in task.knowledge.lessons
        if lesson in optimized.predictors()[0].signature.instructions
    ]
    assert lessons  # the improvement came from the feedback
    again = _gepa_compile(task)
    assert again.detailed_results.to_dict() == results.to_dict()
    assert json.dumps(again.dump_state(), sort_keys=True) == json.dumps(
        optimized.dump_state(), sort_keys=True
    )


def test_simba_advice_improves_the_program() -> None:
    task = get_task("sentiment", n_train=24, n_val=20)
    simba = dspy.SIMBA(metric=task.metric, bsize=8, num_candidates=4, max_steps=3, max_demos=0)
    with dspy.context(lm=task.lm()):
        optimized = simba.compile(task.make_program(), trainset=task.trainset, seed=0)
    instructions = optimized.predictors()[0].signature.instructions
    assert "If the module receives inputs like" in instructions
    assert task.evaluate(optimized) > task.evaluate()
