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


def test_every_optimizer_records_its_trials_and_exports_them(tmp_path, monkeypatch):
    """GEPA, COPRO, SIMBA and an optimizer without an adapter, as one sweep of different
    optimizers on a pool of two: each run's steps are trial rows in the history (as
    MIPROv2's trials are), and to_mlflow logs them as per-trial metrics."""
    import dspy
    from dspy.teleprompt import COPRO, SIMBA

    from tests.integration import optimizer_fidelity_helpers as fh
    from tests.integration import teleprompter_helpers as th

    task = fh.task()
    lm = task.lm()
    configs = [
        {"optimizer": dspy.GEPA, "metric": task.feedback_metric, "reflection_lm": lm,
         "max_metric_calls": 40, "seed": 0, "label": "GEPA"},
        {"optimizer": COPRO, "breadth": 2, "depth": 2, "prompt_model": lm, "label": "COPRO",
         "compile": {"eval_kwargs": fh.COPRO_EVAL_KWARGS}},
        {"optimizer": SIMBA, "bsize": 4, "num_candidates": 2, "max_steps": 2, "max_demos": 1,
         "prompt_model": lm, "num_threads": 1, "label": "SIMBA"},
        th.FirstDemos(task.metric),
    ]  # fmt: skip
    with PoolManager([PoolSpec("kinds", size=2)]) as manager:
        sweep = dspex.sweep(configs, task.make_program(), trainset=task.trainset,
                            valset=task.valset, metric=task.metric, pool=manager["kinds"],
                            lm=lm, name="kinds", checkpoint_dir=tmp_path)  # fmt: skip
        sweep.wait(timeout=300)
    assert sweep.counts() == {"completed": 4}, sweep.status()
    assert history.writer.flush(30)
    store = RunHistory()
    expected = {"GEPA": "full", "COPRO": "full", "SIMBA": "minibatch", "FirstDemos": "full"}
    exported = {}
    for run in sweep.runs:
        record = store.get(run.run_id)
        trials = store.trials(run.run_id)
        assert record.optimizer == run.optimizer and run.optimizer in expected
        assert trials, f"{run.optimizer} recorded no trial"
        assert {t["eval"] for t in trials} == {expected[run.optimizer]}
        assert record.trials == max(t["number"] for t in trials)
        assert trials[-1]["best_score"] is not None
        exported[run.optimizer] = (run, trials)
    assert sweep.entries[3].label == "FirstDemos"

    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    for name in ("GEPA", "SIMBA"):
        run, trials = exported[name]
        logged = run.to_mlflow(tracking_uri=uri, experiment="kinds")
        best = [m.value for m in client.get_metric_history(logged, "best_score")]
        assert best[: len(trials)] == [t["best_score"] for t in trials]
        key = f"eval_{expected[name]}"
        scores = [m.value for m in client.get_metric_history(logged, key)]
        assert scores == [t["score"] for t in trials if t["score"] is not None]
        children = client.search_runs(
            [client.get_experiment_by_name("kinds").experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{logged}'",
        )
        assert len(children) == len(trials)
