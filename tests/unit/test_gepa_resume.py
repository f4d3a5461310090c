"""GEPA checkpointed per iteration as JSON and resumed exactly, in-process (no kernel).

A "kill" here is an exception raised right after iteration k's checkpoint; the resumed run
starts from that JSON (read back from text, as a snapshot file would be) in a fresh
optimizer and must end with the uninterrupted run's candidates, scores, every later
checkpoint and final program. The simulated LM and feedback metric are offline.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from typing import Any

import dspy
import pytest

from dspex_jupyter.checkpoint import CheckpointError
from dspex_jupyter.core.errors import SerializationError, UnsupportedOptimizerOption
from dspex_jupyter.runtime.gepa import GEPAHooks, ResumableGEPA, resumable
from dspex_jupyter.runtime.gepa_json import from_json, to_json
from dspex_jupyter.testing import Task, get_task

BUDGET = 120


class Killed(BaseException):
    """Stands for the kernel dying right after a checkpoint."""


class Recorder(GEPAHooks):
    def __init__(self, restored: dict[str, Any] | None = None, kill_at: int | None = None):
        self.restored = restored
        self.kill_at = kill_at
        self.checkpoints: list[dict[str, Any]] = []
        self.progress: list[dict[str, Any]] = []

    def iteration_done(self, checkpoint: dict[str, Any], progress: dict[str, Any]) -> None:
        text = json.dumps(checkpoint, sort_keys=True, allow_nan=False)  # as a snapshot holds it
        self.checkpoints.append(json.loads(text))
        self.progress.append(progress)
        if progress["iteration"] == self.kill_at:
            raise Killed


class TwoStep(dspy.Module):
    """Two predictors, so GEPA's round-robin component choice carries state."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("question -> answer")
        self.check = dspy.Predict("question, draft -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        draft = self.draft(question=question).answer
        return self.check(question=question, draft=draft)


def _settings(task: Task) -> dict[str, Any]:
    return {
        "metric": task.feedback_metric,
        "reflection_lm": task.lm(),
        "max_metric_calls": BUDGET,
        "seed": 0,
        "track_stats": True,
    }


def _compile(optimizer: dspy.GEPA, task: Task, student: dspy.Module) -> dspy.Module:
    with dspy.context(lm=task.lm()):
        return optimizer.compile(student, trainset=task.trainset, valset=task.valset)


def _outcome(program: dspy.Module) -> tuple[Any, str]:
    return program.detailed_results.to_dict(), json.dumps(program.dump_state(), sort_keys=True)


@pytest.fixture(scope="module")
def task() -> Task:
    return get_task("arithmetic", n_train=12, n_val=10)


class CountedMetric:
    """The task's feedback metric, counting its calls."""

    def __init__(self, task: Task) -> None:
        self.task, self.calls = task, 0

    def __call__(self, gold: Any, pred: Any, trace: Any = None, *rest: Any) -> Any:
        self.calls += 1
        return self.task.feedback_metric(gold, pred, trace, *rest)


@pytest.fixture(scope="module")
def reference(task: Task) -> tuple[Any, Recorder, int]:
    recorder, metric = Recorder(), CountedMetric(task)
    optimizer = ResumableGEPA(**{**_settings(task), "metric": metric})
    optimizer.hooks = recorder
    return _outcome(_compile(optimizer, task, task.make_program())), recorder, metric.calls


def test_uninterrupted_run_equals_upstream_compile(task: Task, reference: Any) -> None:
    outcome, recorder, _ = reference
    upstream = _outcome(_compile(dspy.GEPA(**_settings(task)), task, task.make_program()))
    assert outcome == upstream
    results = outcome[0]
    assert len(results["candidates"]) > 2 and max(results["val_aggregate_scores"]) > 0.5
    # One checkpoint after the seed's evaluation (iteration 0), then one per iteration.
    iterations = [p["iteration"] for p in recorder.progress]
    assert iterations == list(range(len(iterations))) and len(iterations) > 5
    last = recorder.progress[-1]
    assert last["metric_calls_used"] == results["total_metric_calls"] >= BUDGET
    assert last["max_metric_calls"] == BUDGET
    assert last["candidates"] == len(results["candidates"])
    assert last["best_score"] == max(results["val_aggregate_scores"])
    assert 1 <= last["pareto_front"] <= len(results["candidates"])


def test_progress_reports_proposals_with_their_parents(reference: Any) -> None:
    outcome, recorder, _ = reference
    proposals = [p["proposal"] for p in recorder.progress if "proposal" in p]
    accepted = [p for p in proposals if p["accepted"]]
    assert accepted and any(not p["accepted"] for p in proposals)
    parents = outcome[0]["parents"]
    for proposal in accepted:
        assert parents[proposal["candidate"]] == proposal["parents"]
        assert proposal["score"] == outcome[0]["val_aggregate_scores"][proposal["candidate"]]
        assert all(len(text) <= 160 for text in proposal["instructions"].values())


@pytest.mark.parametrize("kill_at", [0, 1, 4])
def test_resume_after_a_kill_is_exact(task: Task, reference: Any, kill_at: int) -> None:
    outcome, full, full_calls = reference
    killed, before = Recorder(kill_at=kill_at), CountedMetric(task)
    optimizer = ResumableGEPA(**{**_settings(task), "metric": before})
    optimizer.hooks = killed
    with pytest.raises(Killed):
        _compile(optimizer, task, task.make_program())
    assert killed.checkpoints == full.checkpoints[: kill_at + 1]

    resumed, after = Recorder(restored=killed.checkpoints[-1]), CountedMetric(task)
    fresh = dspy.GEPA(**{**_settings(task), "metric": after})
    result = _compile(resumable(fresh, resumed), task, task.make_program())
    assert _outcome(result) == outcome
    assert resumed.checkpoints == full.checkpoints[kill_at + 1 :]
    assert resumed.progress[-1] == full.progress[-1]
    # Nothing done before the kill is done again (not even the seed's evaluation).
    assert before.calls + after.calls == full_calls


def test_resume_is_exact_with_two_predictors(task: Task) -> None:
    full = Recorder()
    optimizer = ResumableGEPA(**_settings(task))
    optimizer.hooks = full
    expected = _outcome(_compile(optimizer, task, TwoStep()))
    assert expected == _outcome(_compile(dspy.GEPA(**_settings(task)), task, TwoStep()))
    kill_at = len(full.checkpoints) // 2
    killed = Recorder(kill_at=kill_at)
    optimizer = ResumableGEPA(**_settings(task))
    optimizer.hooks = killed
    with pytest.raises(Killed):
        _compile(optimizer, task, TwoStep())
    resumed = resumable(dspy.GEPA(**_settings(task)), Recorder(restored=killed.checkpoints[-1]))
    assert _outcome(_compile(resumed, task, TwoStep())) == expected


def test_resume_is_exact_with_best_outputs_and_the_evaluation_cache(task: Task) -> None:
    """gepa then keeps DSPy predictions in its state (and in its cache): JSON too."""
    settings = {
        **_settings(task),
        "track_best_outputs": True,
        "gepa_kwargs": {"cache_evaluation": True},
    }
    full = ResumableGEPA(**settings)
    full.hooks = Recorder()
    expected = _outcome(_compile(full, task, task.make_program()))
    assert expected == _outcome(_compile(dspy.GEPA(**settings), task, task.make_program()))
    killed = Recorder(kill_at=3)
    optimizer = ResumableGEPA(**settings)
    optimizer.hooks = killed
    with pytest.raises(Killed):
        _compile(optimizer, task, task.make_program())
    resumed = resumable(dspy.GEPA(**settings), Recorder(restored=killed.checkpoints[-1]))
    result = _compile(resumed, task, task.make_program())
    assert _outcome(result) == expected
    best = result.detailed_results.best_outputs_valset
    assert isinstance(best[0][0][1], dspy.Prediction)


def test_a_checkpoint_goes_on_only_with_its_own_program_and_data(
    task: Task, reference: Any
) -> None:
    _, full, _ = reference
    checkpoint = full.checkpoints[2]
    other = task.make_program()
    other.predictors()[0].signature = other.predictors()[0].signature.with_instructions("Hi.")
    resumed = resumable(dspy.GEPA(**_settings(task)), Recorder(restored=checkpoint))
    with pytest.raises(CheckpointError, match="made for a program") as info:
        _compile(resumed, task, other)
    assert info.value.hint
    smaller = get_task("arithmetic", n_train=12, n_val=4)
    resumed = resumable(dspy.GEPA(**_settings(task)), Recorder(restored=checkpoint))
    with pytest.raises(CheckpointError, match="10 scored, 4 given"):
        _compile(resumed, smaller, smaller.make_program())


def test_log_dir_is_refused_and_nothing_is_pickled(task: Task, tmp_path: Any) -> None:
    optimizer = ResumableGEPA(**_settings(task), log_dir=str(tmp_path / "gepa"))
    with pytest.raises(UnsupportedOptimizerOption, match="pickle") as info:
        _compile(optimizer, task, task.make_program())
    assert "checkpoint_dir" in info.value.hint
    assert not (tmp_path / "gepa").exists()


def test_json_form_keeps_types_and_orders() -> None:
    value = {
        3: {"a": (1, 2.5, None), "s": {9, 1, 17}, "c": Counter({"y": 1, "x": 1})},
        "front": [float("-inf"), 0.5],
        ("tuple", 1): [[(0, 1, 2)], [(0, 1, (2, 3))]],
        "pred": dspy.Prediction(answer="42"),
        "rng": random.Random(7).getstate(),  # (3, 625 words, None): packed as one string
        "words": list(range(2**32 - 100, 2**32)),
        "big": [2**40] * 100,  # not 32-bit words: kept as numbers
    }
    data = json.loads(json.dumps(to_json(value), allow_nan=False))
    back = from_json(data)
    assert back == value
    assert list(back) == list(value)
    assert list(back[3]["s"]) == list(value[3]["s"])
    assert list(back[3]["c"].most_common()) == list(value[3]["c"].most_common())
    assert isinstance(back["pred"], dspy.Prediction) and back["pred"].answer == "42"
    assert math.isinf(back["front"][0])
    assert isinstance(back["rng"][1], tuple) and isinstance(back["words"], list)
    assert "u32_tuple" in json.dumps(data) and back["big"] == [2**40] * 100
    rng = random.Random()
    rng.setstate(back["rng"])
    assert rng.random() == random.Random(7).random()
    with pytest.raises(SerializationError, match=r"state\[.*lock") as info:
        to_json({"lock": object()})
    assert info.value.hint


def test_dashboard_rows_show_gepa_progress(reference: Any) -> None:
    from dspex_jupyter.notebook.optimizer_views import gepa as view

    outcome, recorder, _ = reference
    events = [{"kind": "progress", "optimizer": "GEPA", **p} for p in recorder.progress]
    merged: dict[str, Any] = {}
    for event in events:
        merged.update(event)
    rows = dict(view.progress_items({"progress": merged, "progress_events": events}))
    last = recorder.progress[-1]
    assert rows["Iteration"] == str(last["iteration"])
    assert rows["Metric calls"].startswith(f"{last['metric_calls_used']} / {BUDGET} (")
    assert rows["Pareto front"].startswith(str(last["pareto_front"]))
    assert (
        rows["Best aggregate"] == f"{last['best_score']:.3f} (candidate {last['best_candidate']})"
    )
    latest = next(p["proposal"] for p in reversed(recorder.progress) if "proposal" in p)
    text = rows["Latest proposal"]
    if latest["accepted"]:
        assert text.startswith(f"candidate {latest['candidate']} ← parent {latest['parents'][0]}: ")
    else:
        assert text.startswith("not kept") and f"parent {latest['parents'][0]}" in text
    points = view.chart_points({"progress_events": events})
    kept = [p for p in recorder.progress if p.get("proposal", {}).get("accepted")]
    assert [pt["number"] for pt in points] == [0] + [p["iteration"] for p in kept]
    assert points[0]["score"] == outcome[0]["val_aggregate_scores"][0]
    assert view.progress_items({"progress": {}}) == []
