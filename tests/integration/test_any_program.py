"""Any LM and any program that work in-process work the same in a session (issue #11).

Each fidelity test runs DSPy's own ``MIPROv2(...).compile(...)`` in this process and the
same run through dspex in a pool kernel, and compares the Optuna trials, the candidate
instructions and the final program's ``dump_state()``. Offline: the SIMULATED LM.
"""

from __future__ import annotations

import dataclasses
import linecache
import os
import sys
import types
import zlib
from typing import Any

import dspy
import pytest
from dspy.propose.utils import get_dspy_source_code

from dspex_jupyter import MIPROv2, PoolManager, PoolSpec
from dspex_jupyter.core.errors import InvalidCheckpoint, InvalidLM, RemoteError
from dspex_jupyter.optimizers.mipro import _lm_spec, _program_sources
from dspex_jupyter.runtime.mipro import build_lm
from dspex_jupyter.testing import arithmetic, simulated_lm
from dspex_jupyter.testing.mipro_settings import quick_settings
from tests.integration import any_program_helpers as helpers
from tests.integration import mipro_helpers as mh

pytestmark = pytest.mark.integration

HELPERS = "tests.integration.any_program_helpers"
SOURCE_ERROR = "Error getting source code"  # DSPy's proposer, when inspect finds no source

# A program class as a user writes it in a notebook cell.
PROGRAM_CELL = '''import dspy


class WordProblemSolver(dspy.Module):
    """Reasons about a word problem, then answers it."""

    def __init__(self):
        super().__init__()
        self.solve = dspy.ChainOfThought("question -> answer")

    def forward(self, question):
        return self.solve(question=question)
'''


# Two more cells: a signature and a sub-module in one, the program using them in the next.
PARTS_CELL = '''import dspy


class SolveProblem(dspy.Signature):
    """Solve the word problem; answer with a number."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Step(dspy.Module):
    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict(SolveProblem)

    def forward(self, question):
        return self.predict(question=question)
'''
PIPELINE_CELL = """class Pipeline(dspy.Module):
    def __init__(self):
        super().__init__()
        self.step = Step()

    def forward(self, question):
        check = lambda text: 1 / len(text)  # fails on an empty question: a traceback
        check(question)
        return self.step(question=question)
"""


@pytest.fixture(scope="module")
def manager():
    with PoolManager([PoolSpec("any", size=1)]) as m:
        yield m


@pytest.fixture
def notebook(monkeypatch):
    """Run a cell as a notebook does. A test process is not a notebook (no IPython runs,
    and its ``__main__`` is pytest's, with a file), so this does what IPython does for each
    cell: compile it under a made-up file name (ipykernel's ``/tmp/ipykernel_<pid>/<hash>.py``
    or IPython's ``<ipython-input-N-hash>``), keep its lines in ``linecache`` under that name
    with mtime None, and run it in a ``__main__`` module without ``__file__``. DSPy,
    ``inspect`` and cloudpickle then see what they see in a notebook: a class of
    ``__main__`` whose source only this process's ``linecache`` holds."""
    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)

    def run_cell(source: str, style: str = "ipykernel") -> dict[str, Any]:
        digest = zlib.crc32(source.encode())
        name = (
            f"/tmp/ipykernel_{os.getpid()}/{digest}.py"
            if style == "ipykernel"
            else f"<ipython-input-1-{digest:08x}>"
        )
        lines = [line + "\n" for line in source.splitlines()]  # as IPython's CachingCompiler
        monkeypatch.setitem(linecache.cache, name, (len(source), None, lines, name))
        exec(compile(source, name, "exec"), main.__dict__)
        return main.__dict__

    return run_cell


# ---- the two ways to run the same optimization ------------------------------------------
@dataclasses.dataclass
class Outcome:
    trials: list[tuple[dict[str, int], float]]
    candidates: dict[int, list[str]]
    state: dict[str, Any]


class RecordingMIPROv2(dspy.teleprompt.MIPROv2):
    """Upstream MIPROv2, unchanged but for keeping its instruction candidates."""

    def _propose_instructions(self, *args: Any, **kwargs: Any) -> dict[int, list[str]]:
        self.candidates = super()._propose_instructions(*args, **kwargs)
        return self.candidates


def in_process(program, task_lm, prompt_lm, compile_args=None) -> Outcome:
    """DSPy's own MIPROv2 in this process (its Optuna study captured for the trials)."""
    task = arithmetic()
    options, quick = quick_settings()
    with mh.captured_studies() as studies:
        optimizer = RecordingMIPROv2(
            metric=task.metric, prompt_model=prompt_lm, task_model=task_lm, verbose=False,
            **options,
        )  # fmt: skip
        best = optimizer.compile(program, trainset=task.trainset, valset=task.valset,
                                 **{**quick, **(compile_args or {})})  # fmt: skip
    trials = [(t.params, t.value) for t in studies[0].trials]
    return Outcome(trials, dict(optimizer.candidates), best.dump_state())


def through_dspex(pool, program, task_lm, prompt_lm, folder, compile_args=None):
    """The same run through dspex, in a session of ``pool``; (outcome, run)."""
    task = arithmetic()
    options, quick = quick_settings()
    optimizer = MIPROv2(pool, metric=task.metric, task_lm=task_lm, prompt_lm=prompt_lm, **options)
    run = optimizer.optimize(program, task.trainset, task.valset, checkpoint_dir=folder,
                             **{**quick, **(compile_args or {})})  # fmt: skip
    result = run.result(timeout=180)
    return Outcome(trials_of(result), candidates_of(run), result.state), run


def trials_of(result) -> list[tuple[dict[str, int], float]]:
    return [(t["params"], t["value"]) for t in result.metadata["trials"]]


def candidates_of(run) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for event in run.events:
        if event["kind"] == "candidate":
            found.setdefault(int(event["predictor"]), []).append(event["instruction"])
    return found


def assert_same(dspex: Outcome, upstream: Outcome) -> None:
    assert dspex.candidates == upstream.candidates
    assert dspex.trials == upstream.trials
    assert dspex.state == upstream.state
    assert len(dspex.trials) > 8 and upstream.candidates[0]  # a real search took place


# ---- (a) an LM whose custom engine cannot dump_state() ----------------------------------
def test_lm_with_custom_engine_without_dump_state_runs_by_value(manager, tmp_path):
    lm = helpers.custom_engine_lm()
    with pytest.raises(TypeError, match="cannot be saved"):
        lm.dump_state()  # what the run used to fail on
    upstream = in_process(arithmetic().make_program(), lm, lm)
    outcome, run = through_dspex(manager["any"], arithmetic().make_program(), lm, lm,
                                 tmp_path / "run")  # fmt: skip
    assert_same(outcome, upstream)
    # The checkpoint records what it can of the LM, for the record: no engine state.
    recorded = run.spec["task_lm"]
    assert recorded["kind"] == "value" and recorded["model"] == "custom/arithmetic"
    assert recorded["engine"] == f"{HELPERS}:EngineWithoutState"
    assert "cannot be saved" in recorded["unsaved"]


def test_resume_without_an_unsaveable_lm_names_what_to_pass(manager, tmp_path):
    lm = helpers.custom_engine_lm()
    task = arithmetic()
    folder = tmp_path / "run"
    outcome, run = through_dspex(manager["any"], task.make_program(), lm, lm, folder)
    earlier = [c["name"] for c in run.checkpoints() if c.get("phase") == "search"][2]
    common = {"program": task.make_program(), "metric": task.metric, "snapshot": earlier}
    with pytest.raises(InvalidCheckpoint, match=r"MIPROv2\.resume\(\.\.\., task_lm=") as caught:
        MIPROv2.resume(folder, manager["any"], **common).result(timeout=120)
    assert "custom/arithmetic" in str(caught.value)
    assert "EngineWithoutState cannot be saved" in str(caught.value)
    # Passed again, the LM goes on from that snapshot to the same end.
    resumed = MIPROv2.resume(folder, manager["any"], task_lm=lm, prompt_lm=lm, **common)
    result = resumed.result(timeout=120)
    assert trials_of(result) == outcome.trials and result.state == outcome.state


# ---- (b) LMs named by import path or by model name ------------------------------------
def test_lms_given_by_import_path_match_in_process(manager, tmp_path):
    # task_lm names an LM object, prompt_lm a zero-argument function that makes one.
    upstream = in_process(arithmetic().make_program(), helpers.ARITHMETIC_LM, simulated_lm())
    outcome, run = through_dspex(
        manager["any"], arithmetic().make_program(), f"{HELPERS}:ARITHMETIC_LM",
        "dspex_jupyter.testing:simulated_lm", tmp_path / "run",
    )  # fmt: skip
    assert_same(outcome, upstream)
    assert run.spec["prompt_lm"] == {"kind": "ref", "ref": "dspex_jupyter.testing:simulated_lm"}


def test_lm_import_paths_are_rebuilt_on_resume_without_passing_them(manager, tmp_path):
    task = arithmetic()
    factory = "dspex_jupyter.testing:simulated_lm"  # a module checkpoints may import from
    folder = tmp_path / "run"
    outcome, run = through_dspex(manager["any"], task.make_program(), factory, factory, folder)
    earlier = [c["name"] for c in run.checkpoints() if c.get("phase") == "search"][2]
    resumed = MIPROv2.resume(folder, manager["any"], metric=task.metric, snapshot=earlier)
    result = resumed.result(timeout=120)
    assert trials_of(result) == outcome.trials and result.state == outcome.state


def test_a_model_name_becomes_a_dspy_lm_in_the_kernel(manager):
    spec = _lm_spec("openai/gpt-4o-mini")
    assert spec == {"kind": "model", "model": "openai/gpt-4o-mini"}

    def built_in_kernel(spec):
        lm = build_lm(spec, None, trusted_only=True)  # as a resume rebuilds it
        return type(lm).__module__, type(lm).__name__, lm.model, "api_key" in lm.kwargs

    with manager["any"].session() as session:
        assert session.call(built_in_kernel, spec) == ("dspy.clients.lm", "LM",
                                                       "openai/gpt-4o-mini", False)  # fmt: skip


@pytest.mark.parametrize(
    ("lm", "pattern"),
    [
        ("gpt-4o-mini", r"neither a model name 'provider/model' nor an import path"),
        ("not a model", r"neither a model name"),
        ("mypkg.lms:", r"neither a model name"),
        ("openai/", r"neither a model name"),
        (42, r"an LM must be a dspy.BaseLM or a string, got int"),
    ],
)
def test_invalid_lms_are_refused_before_a_session_is_taken(manager, tmp_path, lm, pattern):
    task = arithmetic()
    with pytest.raises(InvalidLM, match=pattern) as caught:
        MIPROv2(manager["any"], metric=task.metric, task_lm=lm).optimize(
            task.make_program(), task.trainset, checkpoint_dir=tmp_path / "run"
        )
    assert caught.value.hint and "openai/gpt-4o-mini" in caught.value.hint
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("ref", "pattern"),
    [
        (
            f"{HELPERS}:NOT_AN_LM",
            r"InvalidLM: LM reference .*NOT_AN_LM' names an object of type str",
        ),
        (f"{HELPERS}:returns_no_lm", r"InvalidLM: LM reference .* returned an object of type int"),
    ],
)
def test_an_import_path_to_something_else_is_a_typed_error(manager, tmp_path, ref, pattern):
    task = arithmetic()
    options, quick = quick_settings()
    run = MIPROv2(manager["any"], metric=task.metric, task_lm=ref, **options).optimize(
        task.make_program(), task.trainset, task.valset, checkpoint_dir=tmp_path / "run", **quick
    )
    with pytest.raises(RemoteError, match=pattern) as caught:
        run.result(timeout=60)
    assert caught.value.remote_type == "InvalidLM"


# ---- (c) a program class defined in the notebook, program-aware proposer on -----------
def test_notebook_class_source_is_found_in_the_kernel(manager, notebook):
    program = notebook(PROGRAM_CELL, style="ipython")["WordProblemSolver"]()
    here = get_dspy_source_code(program)
    assert "class WordProblemSolver(dspy.Module):" in here

    def source_in_kernel(program, sources):
        from dspex_jupyter.runtime.sources import attach_sources

        if sources is not None:
            attach_sources(program, sources)
        try:
            return get_dspy_source_code(program)
        except OSError as exc:  # what DSPy's proposer reports as "Error getting source code"
            return f"OSError: {exc}"

    sources = _program_sources(program)
    assert list(sources["files"]) == [program.forward.__code__.co_filename]
    with manager["any"].session() as session:
        # cloudpickle ships the class with its methods' file renamed "<dynamic-code>"
        assert session.call(source_in_kernel, program, None).startswith("OSError")
        assert session.call(source_in_kernel, program, sources) == here


def test_classes_from_several_cells_and_their_tracebacks_in_the_kernel(manager, notebook):
    notebook(PARTS_CELL)
    program = notebook(PIPELINE_CELL)["Pipeline"]()
    here = get_dspy_source_code(program)
    assert "class Pipeline(dspy.Module):" in here and "class Step(dspy.Module):" in here
    sources = _program_sources(program)
    assert len(sources["files"]) == 2  # both cells travel, each class points at its own

    def in_kernel(program, sources):
        import traceback

        from dspex_jupyter.runtime.sources import attach_sources

        attach_sources(program, sources)
        try:
            program.forward("")
        except ZeroDivisionError as exc:
            lines = traceback.format_exception(exc)
        return get_dspy_source_code(program), "".join(lines)

    with manager["any"].session() as session:
        source, trace = session.call(in_kernel, program, sources)
    assert source == here
    # The lambda inside the method has its cell's name and line back, too.
    assert "check = lambda text: 1 / len(text)" in trace
    assert f'File "{program.forward.__code__.co_filename}", line 7' in trace


def test_notebook_program_gets_the_same_proposals_as_in_process(
    manager, notebook, tmp_path, capsys
):
    make = notebook(PROGRAM_CELL)["WordProblemSolver"]
    lm = arithmetic().lm()
    aware = {"program_aware_proposer": True}  # DSPy's default; quick_settings turns it off
    upstream = in_process(make(), lm, lm, aware)
    assert SOURCE_ERROR not in capsys.readouterr().out  # the proposer read the source here
    # The proposals depend on the program's source: without it they would differ.
    assert in_process(make(), lm, lm).candidates != upstream.candidates
    outcome, run = through_dspex(manager["any"], make(), lm, lm, tmp_path / "run", aware)
    assert_same(outcome, upstream)
    assert SOURCE_ERROR not in run.log_path.read_text()
