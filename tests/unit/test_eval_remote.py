"""The two halves of a remote evaluation in one process: what an eval kernel answers
(``runtime/eval_shard.py``) turned back into a result by the run's side
(``runtime/eval_remote.py``) is what ``dspy.Evaluate`` gives for the same program, data and
metric: scores, failed examples, the too-many-errors stop, and an infrastructure error
that is the run's, never a score. Real DSPy and the SIMULATED LM; no kernels."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

from dspex_jupyter.checkpoint import CheckpointDir, example_to_json
from dspex_jupyter.runtime import eval_shard
from dspex_jupyter.runtime.eval_remote import RemoteEvaluator, RemoteExampleFailure
from dspex_jupyter.runtime.runs import (
    RunContext,
    RunRecorder,
    adapter_for,
    error_event,
    is_infrastructure_error,
)
from dspex_jupyter.testing import arithmetic

RUN_ID = "unit-eval"


class Flaky(dspy.Module):
    """ChainOfThought, except that a question with "7" fails as the program's own error
    and one with "9" as a missing dependency (an infrastructure error)."""

    def __init__(self) -> None:
        super().__init__()
        self.solve = dspy.ChainOfThought("question -> answer")

    def forward(self, question: str) -> Any:
        if "7" in question:
            raise ValueError("the program cannot handle sevens")
        if "9" in question:
            raise ModuleNotFoundError("No module named 'ninety'", name="ninety")
        return self.solve(question=question)


@pytest.fixture
def setting(tmp_path):
    task = arithmetic(n_train=4, n_val=24)
    lm = task.lm()
    teleprompter = dspy.teleprompt.LabeledFewShot(k=2)
    teleprompter.metric = task.metric
    program = Flaky()
    eval_shard.setup(
        RUN_ID,
        {"program": {"kind": "value"}},
        {
            "trainset": [example_to_json(e) for e in task.trainset],
            "valset": [example_to_json(e) for e in task.valset],
        },
        {"teleprompter": teleprompter, "task_lm": lm, "program": program},
        ["dspy"],
    )
    folder = CheckpointDir(tmp_path / "run")
    folder.create()
    rec = RunRecorder(RUN_ID, folder, None)
    run = RunContext(rec, adapter_for(type(teleprompter)), None, None)
    evaluator = RemoteEvaluator(rec, run, program, task.metric, task.trainset, task.valset)
    yield task, lm, program, rec, evaluator
    rec.finish("completed")
    eval_shard.teardown(RUN_ID)


def remote(evaluator, evaluate, program, devset, threads=1):
    refs = [evaluator._example_ref(e) for e in devset]
    payload = eval_shard.evaluate_shard(RUN_ID, program.dump_state(), refs, threads)
    with dspy.context(usage_tracker=evaluator.rec.usage):
        return evaluator._result(evaluate, devset, payload)


def test_the_answer_is_what_dspy_evaluate_gives(setting):
    task, lm, program, rec, evaluator = setting
    devset = [e for e in task.valset if "9" not in e.question]
    assert any("7" in e.question for e in devset)  # some examples fail
    evaluate = dspy.Evaluate(devset=devset, metric=task.metric, num_threads=1, max_errors=100)
    with dspy.context(lm=lm):
        expected = evaluate(program)
    got = remote(evaluator, evaluate, program, devset, threads=2)
    assert got.score == expected.score
    assert [(e, dict(p), s) for e, p, s in got.results] == [
        (e, dict(p), s) for e, p, s in expected.results
    ]
    assert rec.take_infrastructure_error() is None  # the program's own errors are scores
    assert rec.usage.totals()["calls"] > 0  # the eval kernel's LM calls, counted here


def test_too_many_errors_stop_as_dspy_stops(setting):
    task, lm, program, _, evaluator = setting
    devset = [e for e in task.valset if "7" in e.question][:3]
    evaluate = dspy.Evaluate(devset=devset, metric=task.metric, num_threads=1, max_errors=2)
    with dspy.context(lm=lm), pytest.raises(Exception, match="cancelled due to errors") as local:
        evaluate(program)
    with pytest.raises(Exception, match="cancelled due to errors") as there:
        remote(evaluator, evaluate, program, devset)
    assert str(there.value) == str(local.value)


def test_an_infrastructure_error_is_the_runs_never_a_score(setting):
    task, _, program, rec, evaluator = setting
    devset = [e for e in task.valset if "9" in e.question][:1]
    evaluate = dspy.Evaluate(devset=devset, metric=task.metric, num_threads=1, max_errors=100)
    remote(evaluator, evaluate, program, devset)
    error = rec.take_infrastructure_error()
    assert isinstance(error, RemoteExampleFailure) and is_infrastructure_error(error)
    event = error_event(error, rec)  # reported as what it was in the eval kernel
    assert (event["error_type"], event["module"]) == ("ModuleNotFoundError", "builtins")
    assert event["infrastructure"] is True
