"""dspex.compile: DSPy's own optimizer objects, run in a pool kernel through one path."""

from __future__ import annotations

import dspy
import pytest

import dspex_jupyter as dspex
from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.checkpoint import (
    FORMAT,
    CheckpointDir,
    read_document,
    read_json_checked,
    write_json_atomic,
)
from dspex_jupyter.core.errors import InvalidTeleprompter
from tests.integration import mipro_helpers as mh
from tests.integration import teleprompter_helpers as th

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def manager():
    with PoolManager([PoolSpec("compile", size=1)]) as m:
        yield m


@pytest.fixture(scope="module")
def reference():
    """Upstream MIPROv2.compile in this process: its trials and final program."""
    task = mh.task()
    lm = task.lm()
    with mh.captured_studies() as studies:
        best = dspy.teleprompt.MIPROv2(
            metric=task.metric, prompt_model=lm, task_model=lm, verbose=False, **mh.OPTIONS
        ).compile(task.make_program(), trainset=task.trainset, valset=task.valset, **mh.COMPILE)
    return [(t.params, t.value) for t in studies[0].trials], best.dump_state()


class MyMIPROv2(dspy.teleprompt.MIPROv2):
    """A user's subclass: it gets MIPROv2's adapter (exact resume, live trials)."""


def test_compile_mipro_is_dspex_mipro_and_resumes_exactly(manager, reference, tmp_path):
    task = mh.task()
    lm = task.lm()
    teleprompter = MyMIPROv2(
        metric=task.metric, prompt_model=lm, task_model=lm, verbose=False, **mh.OPTIONS
    )
    folder = tmp_path / "run"
    run = dspex.compile(
        teleprompter,
        task.make_program(),
        trainset=task.trainset,
        valset=task.valset,
        pool=manager["compile"],
        checkpoint_dir=folder,
        **mh.COMPILE,
    )
    run.wait_for_event(lambda e: e["kind"] == "trial" and e["number"] == 3, timeout=120)
    run.cancel()
    assert run.status == "cancelled" and run.optimizer == "MIPROv2"
    spec = read_json_checked(CheckpointDir(folder).run_file)
    assert spec["teleprompter"]["class"].endswith(":MyMIPROv2")
    assert spec["optimizer"]["num_candidates"] == 4 and spec["optimizer"]["seed"] == 0
    assert set(spec["lms"]) == {"task_model", "prompt_model"}
    # Files as dspex wrote them before it ran other optimizers ("dspex.mipro.checkpoint")
    # still resume.
    converted = 0
    for path in [*folder.glob("ckpt-*.json"), folder / "run.json", folder / "data.json"]:
        body, header = read_document(path)
        if header["format"] == FORMAT:
            write_json_atomic(path, body, "dspex.mipro.checkpoint")
            converted += 1
    assert converted >= 4  # run.json, data.json and the snapshots
    resumed = dspex.resume(folder, manager["compile"], teleprompter=teleprompter)
    result = resumed.result(timeout=120)
    expected_trials, expected_state = reference
    assert [(t["params"], t["value"]) for t in result.metadata["trials"]] == expected_trials
    assert result.state == expected_state
    assert result.metadata["optimizer"] == "MIPROv2"
    assert resumed.resume_kind == "exact"
    assert any(e["kind"] == "trial" for e in resumed.events)


def test_wait_returns_the_dspy_module_compile_returns(manager, tmp_path):
    task = th.task()
    expected = dspy.teleprompt.LabeledFewShot(k=3).compile(
        task.make_program(), trainset=task.trainset
    )
    program = dspex.compile(
        dspy.teleprompt.LabeledFewShot(k=3),
        task.make_program(),
        trainset=task.trainset,
        pool="compile",
        manager=manager,
        checkpoint_dir=tmp_path / "labeled",
        wait=True,
    )
    assert isinstance(program, dspy.Module)
    assert program.dump_state() == expected.dump_state()


@pytest.mark.parametrize(
    ("given", "named"),
    [
        (dspy.Predict("question -> answer"), "a Predict"),
        (dspy.teleprompt.LabeledFewShot, "the class LabeledFewShot (call it"),
        ("MIPROv2", "a str"),
    ],
)
def test_a_non_optimizer_is_a_typed_error_before_any_session(manager, given, named):
    task = th.task()
    before = manager["compile"].health()["sessions"]
    with pytest.raises(InvalidTeleprompter, match="needs a DSPy optimizer") as caught:
        dspex.compile(given, task.make_program(), trainset=task.trainset, pool=manager["compile"])
    assert named in str(caught.value)
    assert "dspex.compile(dspy.GEPA(" in caught.value.hint
    assert manager["compile"].health()["sessions"] == before
