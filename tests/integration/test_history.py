"""A real MIPROv2 run in a pool kernel records itself in the run history; its best program
loads back in one call, `dspex runs` shows it, and run.to_mlflow() round-trips it."""

from __future__ import annotations

import pytest

import dspex_jupyter as dspex
from dspex_jupyter import MIPROv2, PoolManager, PoolSpec, cli
from dspex_jupyter.core import history
from dspex_jupyter.core.history import RunHistory
from tests.integration import mipro_helpers as mh

pytestmark = pytest.mark.integration


def test_a_run_is_recorded_and_loads_back_in_one_call(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "tune.ipynb"))
    task = mh.task()
    lm = task.lm()
    with PoolManager([PoolSpec("history", size=1)]) as manager:
        optimizer = MIPROv2(manager["history"], metric=task.metric, task_lm=lm, prompt_lm=lm,
                            **mh.OPTIONS)  # fmt: skip
        run = optimizer.optimize(task.make_program(), task.trainset, task.valset,
                                 checkpoint_dir=tmp_path / "run", **mh.COMPILE)  # fmt: skip
        result = run.result(timeout=180)
    assert history.writer.flush(30)

    record = RunHistory().get(run.run_id)
    assert (record.optimizer, record.status, record.pool) == ("MIPROv2", "completed", "history")
    assert record.best_score == result.score and record.best_program == result.state
    assert record.notebook == str(tmp_path / "tune.ipynb")
    assert record.checkpoint_dir == str(tmp_path / "run")
    assert record.config["optimizer"]["num_candidates"] == mh.OPTIONS["num_candidates"]
    assert record.config["compile"] == mh.COMPILE
    assert record.usage == run.metrics["usage"] and record.usage["calls"] > 0
    trial_events = [e for e in run.events if e["kind"] == "trial"]
    assert [(t["number"], t["eval"], t["score"]) for t in RunHistory().trials(run.run_id)] == [
        (e["number"], e["eval"], e["score"]) for e in trial_events
    ]

    program = dspex.load_program(run.run_id)  # one call: rebuilt from DSPy's own class
    assert program.dump_state() == result.state == result.to_dspy().dump_state()

    assert cli.main(["runs", "--status", "completed"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[1].split()[:5] == [
        run.run_id, "MIPROv2", "completed", f"{result.score:.4g}", str(record.trials)
    ]  # fmt: skip
    assert "tune.ipynb" in listed[1]

    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root, ./mlruns, lands here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_run = run.to_mlflow(tracking_uri=uri, experiment="history-test")
    client = mlflow.MlflowClient(tracking_uri=uri)
    logged = client.get_run(mlflow_run)
    assert logged.info.status == "FINISHED" and logged.data.tags["dspex.run_id"] == run.run_id
    assert logged.data.metrics["best_score"] == result.score
    assert logged.data.params["num_trials"] == str(mh.COMPILE["num_trials"])
    full = [m.value for m in client.get_metric_history(mlflow_run, "eval_full")]
    assert full == [e["score"] for e in trial_events if e["eval"] == "full"]
    path = client.download_artifacts(mlflow_run, "best_model.json", str(tmp_path))
    loaded = task.make_program()
    loaded.load(path)
    assert loaded.dump_state() == result.state
