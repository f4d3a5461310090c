"""Checkpoint folders are data unless this user's key signed them; even then a kernel
imports only from the trusted modules, checked before anything is imported."""

from __future__ import annotations

import shutil
import stat
import textwrap

import pytest

from dspex_jupyter import MIPROv2, PoolManager, PoolSpec
from dspex_jupyter.checkpoint import (
    CheckpointDir,
    ForbiddenReferenceError,
    read_json_checked,
    write_json_atomic,
)
from dspex_jupyter.cli import main
from dspex_jupyter.core.errors import ForbiddenReference, UntrustedCheckpoint
from dspex_jupyter.optimizers.mipro import OptimizedModule
from dspex_jupyter.trust import key_path, sign_checkpoint, verify_checkpoint
from tests.integration import mipro_helpers as mh

pytestmark = pytest.mark.integration
TASK = mh.task()
METRIC_REF = f"{TASK.metric.__module__}:{TASK.metric.__qualname__}"
RUNTIME = "dspex_jupyter.runtime.mipro"
UNTRUSTED = "was not signed with this user's dspex key, so dspex will not import the code"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """This user's DSPEX_HOME (and signing key) for the whole module."""
    return tmp_path_factory.mktemp("trust-home")


@pytest.fixture(autouse=True)
def _this_user(home, monkeypatch):
    monkeypatch.setenv("DSPEX_HOME", str(home))


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """Modules that leave a marker file when imported or called, on the kernel's path."""
    folder = tmp_path_factory.mktemp("probes")
    (folder / "dspex_probe_import.py").write_text(
        textwrap.dedent(f"""
        from pathlib import Path
        Path({str(folder / "imported")!r}).write_text("imported")

        def metric(example, prediction, trace=None):
            return 1.0
        """)
    )
    (folder / "dspex_probe_class.py").write_text(
        textwrap.dedent(f"""
        from os import system  # re-exported: a reference to it must still be refused
        from pathlib import Path

        class NotAModule:
            def __init__(self, *args, **kwargs):
                Path({str(folder / "called")!r}).write_text("called")

        def make():
            NotAModule()
            return "made"
        """)
    )
    return folder


@pytest.fixture(scope="module")
def manager(probes):
    with PoolManager([PoolSpec("trust", size=1)]) as m:
        m["trust"].call("sys:path.insert", 0, str(probes))
        yield m


@pytest.fixture(scope="module")
def stopped_run(manager, home, tmp_path_factory):
    """A run this user started (metric by reference), cancelled after two trials."""
    folder = tmp_path_factory.mktemp("runs") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSPEX_HOME", str(home))
        lm = TASK.lm()
        optimizer = MIPROv2(
            manager["trust"], metric=METRIC_REF, task_lm=lm, prompt_lm=lm, **mh.OPTIONS
        )
        run = optimizer.optimize(
            TASK.make_program(), TASK.trainset, TASK.valset, checkpoint_dir=folder, **mh.COMPILE
        )
        run.wait_for_event(lambda e: e["kind"] == "trial" and e["number"] == 2, timeout=120)
        run.cancel(timeout=60)
        run.close()
    return folder


def copy_of(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def forge(folder, **changes):
    """Rewrite run.json as anyone can: a valid checksum, no valid signature."""
    spec = read_json_checked(folder / "run.json")
    spec.update(changes)
    write_json_atomic(folder / "run.json", spec)


def test_own_folder_resumes_from_its_references_alone(manager, stopped_run, tmp_path):
    folder = copy_of(stopped_run, tmp_path)
    assert verify_checkpoint(folder).trusted
    key = key_path()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    resumed = MIPROv2.resume(folder, manager["trust"])  # program, metric, LMs: from run.json
    assert resumed.result(timeout=120).score is not None


def test_folder_signed_in_another_home_is_data_only(manager, stopped_run, tmp_path):
    folder = copy_of(stopped_run, tmp_path)
    sign_checkpoint(folder, home=tmp_path / "someone-else")  # another user's key
    verdict = verify_checkpoint(folder)
    assert not verdict.trusted and "not signed by this user's dspex key" in verdict.reason
    # Data still reads: the snapshots, their trials and scores.
    listing = CheckpointDir(folder).listing()
    assert listing and all(row["ok"] for row in listing)
    assert listing[-1]["trial"] >= 2 and listing[-1]["best_score"] is not None

    with pytest.raises(UntrustedCheckpoint) as info:
        MIPROv2.resume(folder, manager["trust"])
    message = str(info.value)
    assert UNTRUSTED in message and "nothing was imported" in message
    assert f"metric {METRIC_REF!r}" in message
    assert "program 'dspy.predict.chain_of_thought:ChainOfThought'" in message
    assert "task_lm" in message and "prompt_lm" in message
    hint = info.value.hint
    assert "program=..., metric=..., task_lm=..., prompt_lm=..." in hint
    assert "`dspex trust DIR`" in hint and "trust=True" in hint

    # With the objects passed, it is data: the run goes on.
    lm = TASK.lm()
    resumed = MIPROv2.resume(
        folder,
        manager["trust"],
        program=TASK.make_program(),
        metric=TASK.metric,
        task_lm=lm,
        prompt_lm=lm,
    )
    assert resumed.result(timeout=120).score is not None


def test_trusting_a_foreign_folder_on_purpose(manager, stopped_run, tmp_path):
    folder = copy_of(stopped_run, tmp_path)
    sign_checkpoint(folder, home=tmp_path / "someone-else")
    resumed = MIPROv2.resume(folder, manager["trust"], trust=True)
    assert verify_checkpoint(folder).trusted  # trust=True signed it with this user's key
    assert resumed.result(timeout=120).score is not None


FORGED = [
    # (id, run.json changes, trusted by the user?, trusted_modules, error, message)
    ("os-system-unsigned", {"metric": {"kind": "ref", "ref": "os:system"}}, False, (),
     UntrustedCheckpoint, "metric 'os:system', task_lm 'dspex_jupyter.testing.simulated."),
    ("os-system-trusted", {"metric": {"kind": "ref", "ref": "os:system"}}, True, (),
     ForbiddenReference, "metric 'os:system' is in module 'os', which is not a trusted module "
     "(dspy, dspex_jupyter.testing); nothing was imported"),
    ("builtins-exec-trusted", {"metric": {"kind": "ref", "ref": "builtins:exec"}}, True, (),
     ForbiddenReference, "metric 'builtins:exec' is in module 'builtins', which is not a "
     "trusted module"),
    ("dunder-trusted", {"metric": {"kind": "ref", "ref": "dspy:__builtins__"}}, True, (),
     ForbiddenReference, "metric 'dspy:__builtins__' names a special (dunder) attribute"),
    ("re-exported-os-system", {"metric": {"kind": "ref", "ref": "dspex_probe_class:system"}},
     True, ("dspex_probe_class",), ForbiddenReference,
     "metric 'dspex_probe_class:system' is in module 'posix', which is not a trusted module"),
    ("import-side-effects", {"metric": {"kind": "ref", "ref": "dspex_probe_import:metric"}},
     True, (), ForbiddenReference, "metric 'dspex_probe_import:metric' is in module "
     "'dspex_probe_import', which is not a trusted module"),
    ("non-module-class", {"program": {"kind": "dspy", "class": "dspex_probe_class:NotAModule",
     "signature": "question -> answer", "state": {}}}, True, ("dspex_probe_class",),
     ForbiddenReference, "program class 'dspex_probe_class:NotAModule' is not a dspy.Module "
     "subclass; it was not called"),
    ("non-module-ref", {"program": {"kind": "ref", "ref": "dspy:Example"}}, True, (),
     ForbiddenReference, "program reference 'dspy:Example' names a type, not a dspy.Module"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "trusted", "modules", "error", "message"),
    [pytest.param(*row[1:], id=row[0]) for row in FORGED],
)
def test_forged_run_json_runs_nothing(
    manager, stopped_run, probes, tmp_path, changes, trusted, modules, error, message
):
    folder = copy_of(stopped_run, tmp_path)
    forge(folder, **changes)
    assert not verify_checkpoint(folder).trusted
    if trusted:  # the user trusted it, as `dspex trust DIR` does
        assert main(["trust", str(folder)]) == 0
    with pytest.raises(error) as info:
        MIPROv2.resume(folder, manager["trust"], trusted_modules=modules)
    assert message in str(info.value)
    assert info.value.hint
    assert not (probes / "called").exists()
    assert not (probes / "imported").exists()
    assert manager["trust"].call("os:getpid") > 0  # the pool still works


def test_a_forged_snapshot_is_data(manager, stopped_run, probes, tmp_path):
    """Snapshots are checksummed, not signed: anyone can rewrite one. Whatever it says,
    nothing in it is imported."""
    folder = copy_of(stopped_run, tmp_path)
    snapshot = CheckpointDir(folder).latest()
    body = read_json_checked(snapshot)
    evil = {"kind": "ref", "ref": "dspex_probe_import:metric", "class": "dspex_probe_import.LM"}
    body.update(program=evil, metric=evil, task_lm=evil, result={"program_state": evil})
    write_json_atomic(snapshot, body)
    lm = TASK.lm()
    resumed = MIPROv2.resume(folder, manager["trust"], metric=TASK.metric, task_lm=lm)
    assert resumed.result(timeout=120).score is not None
    assert not (probes / "imported").exists()


def test_probe_markers_do_appear_when_the_code_runs(manager, probes):
    """The control for the test above: the probes do leave their markers when imported
    and called, so their absence there means nothing ran."""
    assert manager["trust"].call("dspex_probe_import:metric", None, None) == 1.0
    assert manager["trust"].call("dspex_probe_class:make") == "made"
    assert (probes / "imported").read_text() == "imported"
    assert (probes / "called").read_text() == "called"
    (probes / "imported").unlink()
    (probes / "called").unlink()


def test_run_json_changed_after_verification_is_refused(manager, stopped_run, tmp_path):
    folder = copy_of(stopped_run, tmp_path)
    verdict = {"run_sha256": "0" * 64, "data_sha256": "0" * 64, "trusted_modules": ["dspy"]}
    with pytest.raises(UntrustedCheckpoint, match="changed after its signature was checked"):
        manager["trust"].call(f"{RUNTIME}:resume_run", str(folder), {}, None, verdict)


def test_to_dspy_imports_only_dspy_classes():
    state = TASK.make_program().dump_state()

    def optimized(cls_ref):
        spec = {
            "optimizer": {},
            "compile": {},
            "program": {"kind": "dspy", "class": cls_ref, "signature": TASK.signature},
        }
        return OptimizedModule({"program_state": state}, spec)

    with pytest.raises(ForbiddenReferenceError, match="'os:system' is in module 'os'"):
        optimized("os:system").to_dspy()
    with pytest.raises(ForbiddenReferenceError, match=r"not a dspy\.Module subclass"):
        optimized("dspy:Example").to_dspy()
    program = optimized("dspy.predict.chain_of_thought:ChainOfThought").to_dspy()
    assert program.dump_state() == state


def test_dspex_trust_prints_what_it_names_then_signs(stopped_run, tmp_path, capsys):
    folder = copy_of(stopped_run, tmp_path)
    forge(folder, metric={"kind": "ref", "ref": "os:system"})
    assert main(["trust", "--show", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert "metric: os:system" in shown
    assert "program: dspy.predict.chain_of_thought:ChainOfThought" in shown
    assert "task_lm: dspex_jupyter.testing.simulated.SimulatedLM" in shown
    assert not verify_checkpoint(folder).trusted  # --show signs nothing
    assert main(["trust", str(folder)]) == 0
    assert "signed" in capsys.readouterr().out
    assert verify_checkpoint(folder).trusted

    assert main(["trust", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["trust", "--help"]) == 0
    assert "signing.key" in capsys.readouterr().out


def test_own_modules_are_trusted_through_the_setting(manager, stopped_run, tmp_path, monkeypatch):
    """DSPEX_TRUSTED_MODULES adds the user's own modules: a trusted folder naming one
    resumes from its references alone, with that module's metric."""
    folder = copy_of(stopped_run, tmp_path)
    forge(folder, metric={"kind": "ref", "ref": "dspex_probe_import:metric"})
    sign_checkpoint(folder)
    with pytest.raises(ForbiddenReference, match="'dspex_probe_import', which is not a trusted"):
        MIPROv2.resume(folder, manager["trust"])
    monkeypatch.setenv("DSPEX_TRUSTED_MODULES", "some.other, dspex_probe_import")
    resumed = MIPROv2.resume(folder, manager["trust"])
    resumed.result(timeout=120)
    scores = {e["score"] for e in resumed.events if e["kind"] == "trial"}
    assert scores == {100.0}  # the probe's metric scores every example 1.0
