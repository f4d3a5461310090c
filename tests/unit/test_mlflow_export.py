"""Export to MLflow (optimizers/export.py) against a real local MLflow SQLite store, read back
with MlflowClient: params, per-trial metrics with DSPy autolog's keys and steps, usage,
nested trial runs and the best program as an artifact DSPy loads."""

from __future__ import annotations

import json
import sys

import pytest

from dspex_jupyter.core.errors import OptionalDependencyMissing, RunNotFinished
from dspex_jupyter.core.history import RunHistory
from dspex_jupyter.optimizers.export import to_mlflow

from .test_history import PREDICT_STATE, trial

EXPERIMENT = "dspex-tests"


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One SQLite tracking store for the module (creating one runs MLflow's migrations, a
    few seconds), with its experiment's artifacts in the test's temp folder."""
    mlflow = pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.create_experiment(EXPERIMENT, artifact_location=(folder / "artifacts").as_uri())
    return uri, client


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPEX_HOME", str(tmp_path / "home"))
    store = RunHistory()
    config = {
        "optimizer": {"auto": None, "num_candidates": 4, "seed": 0},
        "compile": {"num_trials": 8, "minibatch_size": 10, "program_aware_proposer": False},
        "program": {"kind": "dspy", "class": "dspy.predict.predict:Predict",
                    "signature": "question -> answer"},
        "metric": {"kind": "ref", "ref": "dspex_jupyter.testing.tasks:arith_metric"},
        "task_lm": {"kind": "state", "state": {"model": "openai/x", "temperature": 0.0,
                                               "api_base": "http://127.0.0.1:9"}},
    }  # fmt: skip
    trials = [trial(1, 40.0, 40.0), trial(2, 50.0, 40.0, "minibatch"),
              trial(3, 30.0, 40.0, "minibatch"), trial(4, 55.0, 55.0)]  # fmt: skip
    store.record("aaa111", optimizer="MIPROv2", status="completed", config=config,
                 best_score=55.0, trials=4, best_program=PREDICT_STATE,
                 usage={"calls": 70, "total_tokens": 900, "cost": 0.007},
                 notebook="/w/tune.ipynb", pool="mipro", trial_rows=trials)  # fmt: skip
    return store


def test_a_run_exports_as_dspy_autolog_logs_a_compile(recorded, mlflow_store, tmp_path):
    import dspy

    uri, client = mlflow_store
    run_id = to_mlflow("aaa", tracking_uri=uri, experiment=EXPERIMENT)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "MIPROv2 aaa111"
    assert run.data.tags["dspex.run_id"] == "aaa111"
    assert run.data.tags["mlflow.source.name"] == "/w/tune.ipynb"
    params = run.data.params
    assert {k: params[k] for k in ("optimizer", "num_candidates", "seed", "num_trials")} == {
        "optimizer": "MIPROv2", "num_candidates": "4", "seed": "0", "num_trials": "8"
    }  # fmt: skip
    assert "auto" not in params  # None is not a value (autolog logs plain values only)
    assert params["program"] == "dspy.predict.predict:Predict"
    assert json.loads(params["lm_params"]) == {"model": "openai/x", "temperature": 0.0}

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]

    assert history("eval_full") == [(0, 40.0), (1, 55.0)]  # autolog's keys and steps
    assert history("eval_minibatch") == [(0, 50.0), (1, 30.0)]
    assert history("best_score") == [(0, 40.0), (1, 40.0), (2, 40.0), (3, 55.0), (4, 55.0)]
    metrics = run.data.metrics
    assert metrics["usage.calls"] == 70 and metrics["usage.cost"] == pytest.approx(0.007)
    assert metrics["trials"] == 4

    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", order_by=["start_time"]
    )
    assert [c.info.run_name for c in children] == [
        "eval_full_0", "eval_minibatch_0", "eval_minibatch_1", "eval_full_1"
    ]  # fmt: skip
    assert children[1].data.metrics == {"eval": 50.0}
    assert children[1].data.params == {"trial": "2", "0_predictor_instruction": "2"}

    names = sorted(a.path for a in client.list_artifacts(run_id))
    assert names == ["best_model.json", "dspex_run.json", "trials.json"]
    path = client.download_artifacts(run_id, "best_model.json", str(tmp_path))
    program = dspy.Predict("question -> answer")
    program.load(path)  # DSPy's own loader reads the artifact
    assert program.dump_state() == PREDICT_STATE


def test_unfinished_runs_and_missing_mlflow_are_clear_errors(recorded, monkeypatch):
    recorded.record("bbb222", optimizer="MIPROv2", status="running")
    with pytest.raises(RunNotFinished, match="bbb222 is still running") as running:
        to_mlflow("bbb222", tracking_uri="sqlite:///unused.db")
    assert "run.result()" in running.value.hint
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(OptionalDependencyMissing, match="needs MLflow") as missing:
        to_mlflow("aaa111")
    assert "pip install 'dspex-jupyter[mlflow]'" in missing.value.hint


def test_dspex_runs_export_reads_the_history_of_home(recorded, mlflow_store, tmp_path, monkeypatch,
                                                     capsys):  # fmt: skip
    from dspex_jupyter import cli

    uri, client = mlflow_store
    home = str(recorded.path.parent)
    monkeypatch.setenv("DSPEX_HOME", str(tmp_path / "elsewhere"))  # --home names the history
    argv = ["runs", "export", "aaa1", "--home", home, "--tracking-uri", uri,
            "--experiment", EXPERIMENT]  # fmt: skip
    assert cli.main(argv) == 0
    mlflow_run = capsys.readouterr().out.strip().rpartition(" ")[2]
    logged = client.get_run(mlflow_run)
    assert logged.data.tags["dspex.run_id"] == "aaa111"
    assert len(client.get_metric_history(mlflow_run, "eval_full")) == 2  # the trials came too


def test_a_live_step_optimizer_run_exports_each_step_as_a_trial(mlflow_store, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    """A SIMBA run handle's step "progress" events (no "trial" events) become per-trial
    metrics and nested runs, a step redone after a resume counted once."""
    from .test_history import RecordedRun

    monkeypatch.setenv("DSPEX_HOME", str(tmp_path / "home"))
    uri, client = mlflow_store
    run = RecordedRun("simba02", tmp_path / "ckpt")
    run.optimizer = "SIMBA"
    steps = (
        (1, 0.25, 0.25, 10.0),
        (2, 0.5, 0.5, 11.0),
        (2, 0.75, 0.75, 12.0),
        (3, 0.5, 0.75, 13.0),
    )  # fmt: skip  (step 2 redone after a resume)
    for step, step_best, best, time_ in steps:
        run.emit("progress", optimizer="SIMBA", phase="step", step=step, total=3,
                 step_best=step_best, best_score=best, time=time_)  # fmt: skip
    run.emit("complete", best_score=0.75, usage={"calls": 12})
    run.finish("completed")
    run_id = to_mlflow(run, tracking_uri=uri, experiment=EXPERIMENT)

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]

    assert history("eval_minibatch") == [(0, 0.25), (1, 0.75), (2, 0.5)]
    assert [v for _, v in history("best_score")][:3] == [0.25, 0.75, 0.75]
    assert client.get_run(run_id).data.metrics["trials"] == 3
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")  # fmt: skip
    assert sorted(c.info.run_name for c in children) == [
        "eval_minibatch_0", "eval_minibatch_1", "eval_minibatch_2"]  # fmt: skip
