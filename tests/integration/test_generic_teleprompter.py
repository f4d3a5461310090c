"""Any other Teleprompter through the generic path: events, usage, cancel, budgets, the
same result as an in-process compile, and resume that starts over."""

from __future__ import annotations

import dspy
import pytest

import dspex_jupyter as dspex
from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core.errors import BudgetExceeded
from dspex_jupyter.notebook.run_dashboard import RunDashboard
from dspex_jupyter.notebook.snapshot import run_summary
from tests.integration import teleprompter_helpers as th

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def manager():
    with PoolManager([PoolSpec("generic", size=1)]) as m:
        yield m


def run_in_pool(manager, teleprompter, task, folder, **options):
    with dspy.context(lm=task.lm()):  # the program's LM, as for teleprompter.compile
        return dspex.compile(
            teleprompter,
            task.make_program(),
            trainset=task.trainset,
            valset=task.valset,
            pool=manager["generic"],
            checkpoint_dir=folder,
            **options,
        )


def test_a_users_teleprompter_runs_with_events_usage_and_its_result(manager, tmp_path):
    task = th.task()
    with dspy.context(lm=task.lm()):
        expected = th.FirstDemos(task.metric, k=2).compile(
            task.make_program(), trainset=task.trainset, valset=task.valset
        )
    run = run_in_pool(manager, th.FirstDemos(task.metric, k=2), task, tmp_path / "mine")
    result = run.result(timeout=120)
    assert result.state == expected.dump_state()
    assert result.score == expected.score and result.metadata["optimizer"] == "FirstDemos"
    assert run.optimizer == "FirstDemos" and run.resume_kind == "restart"
    kinds = [e["kind"] for e in run.events]
    assert kinds[0] == "status" and kinds[-1] == "complete"
    progress = run.metrics["progress"]
    assert progress["metric_calls"] == len(task.valset) and progress["evaluations"] == 1
    assert run.metrics["usage"]["calls"] == len(task.valset)  # one LM call per example
    assert [c["phase"] for c in run.checkpoints()] == ["done"]
    assert not run.session.active
    # The sidebar's entry and the dashboard say which optimizer, with its view's rows.
    summary = run_summary(run)
    assert summary["optimizer"] == "FirstDemos"
    assert ["metric calls", f"{len(task.valset)}"] in summary["progress_items"]
    assert ["evaluations", "1"] in summary["progress_items"]
    dashboard = RunDashboard(run)
    try:
        assert dashboard.wait_drawn(10)
        assert "FirstDemos run" in dashboard.header.value
        assert "metric calls" in dashboard.items.value
    finally:
        dashboard.close()


def test_bootstrap_fewshot_matches_in_process_and_keeps_to_its_budget(manager, tmp_path):
    task = th.task()
    options = {"max_bootstrapped_demos": 2, "max_labeled_demos": 2}
    with dspy.context(lm=task.lm()):
        expected = dspy.teleprompt.BootstrapFewShot(metric=task.metric, **options).compile(
            task.make_program(), trainset=task.trainset
        )
    teleprompter = dspy.teleprompt.BootstrapFewShot(metric=task.metric, **options)
    run = run_in_pool(manager, teleprompter, task, tmp_path / "bootstrap")
    assert run.result(timeout=120).state == expected.dump_state()
    assert run.metrics["progress"]["metric_calls"] > 0
    calls = run.metrics["usage"]["calls"]
    assert calls > 2
    # The same run with a budget of two LM calls stops, typed, at the first metric call
    # past it (no silent partial result).
    capped = run_in_pool(manager, teleprompter, task, tmp_path / "capped", max_calls=2)
    with pytest.raises(BudgetExceeded, match="max_calls=2"):
        capped.result(timeout=120)
    assert 2 <= capped.metrics["usage"]["calls"] < calls
    assert any(e["kind"] == "budget" for e in capped.events)
    # Resumed by reference (its own, signed folder: the class, constructor arguments,
    # program and LM are rebuilt from run.json; the notebook metric is passed) with a
    # bigger budget: it starts over and ends as the in-process compile does.
    resumed = dspex.resume(
        tmp_path / "capped", manager["generic"], metric=task.metric, max_calls=10**6
    )
    assert resumed.result(timeout=120).state == expected.dump_state()


def test_knn_fewshot_returns_what_compile_returns(manager, tmp_path):
    task = th.task()
    embedder = dspy.Embedder(th.letter_counts)
    with dspy.context(lm=task.lm()):
        expected = dspy.teleprompt.KNNFewShot(k=2, trainset=task.trainset, vectorizer=embedder)
        expected = expected.compile(task.make_program())
        want = [expected(**x.inputs()).toDict() for x in task.valset[:3]]
    teleprompter = dspy.teleprompt.KNNFewShot(k=2, trainset=task.trainset, vectorizer=embedder)
    run = run_in_pool(manager, teleprompter, task, tmp_path / "knn")
    program = run.result(timeout=120).to_dspy()
    with dspy.context(lm=task.lm()):  # its patched forward picks neighbours, as in-process
        assert [program(**x.inputs()).toDict() for x in task.valset[:3]] == want


def test_cancel_stops_it_and_resume_starts_over(manager, tmp_path):
    task = th.task()
    folder = tmp_path / "long"
    run = run_in_pool(manager, th.MetricRounds(task.metric, rounds=10**6), task, folder)
    run.wait_for_event(
        lambda e: e["kind"] == "progress" and e.get("metric_calls", 0) > 0, timeout=120
    )
    # "Checkpoint now" is answered at the next metric call (a restart point).
    assert run.checkpoint(timeout=60).name in [c["name"] for c in run.checkpoints()]
    run.cancel()
    assert run.status == "cancelled"
    assert not any(e.get("kernel_killed") for e in run.events)  # stopped at a metric call
    stopped_at = run.metrics["progress"]["metric_calls"]
    short = th.MetricRounds(task.metric, rounds=2)
    resumed = dspex.resume(folder, manager["generic"], teleprompter=short, lm=task.lm())
    resumed.result(timeout=120)
    assert resumed.events[0]["kind"] == "resumed"
    # Started over: exactly the new run's calls, none carried from before the cancel.
    assert resumed.metrics["progress"]["metric_calls"] == 2 * len(task.trainset) != stopped_at


def test_dspex_optimize_runs_a_teleprompter_variable(manager, tmp_path):
    from IPython.core.interactiveshell import InteractiveShell

    task = th.task()
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "dspex_jupyter")
    shell.user_ns.update(
        tp=dspy.teleprompt.LabeledFewShot(k=2),
        prog=task.make_program(),
        ts=task.trainset,
        lm=task.lm(),
    )
    try:
        shell.run_line_magic(
            "dspex",
            f"optimize --pool generic --program prog --trainset ts --teleprompter tp --lm lm "
            f"--checkpoint-dir {tmp_path / 'magic'} --name magic_run --no-display",
        )
        run = shell.user_ns["magic_run"]
        expected = dspy.teleprompt.LabeledFewShot(k=2).compile(
            task.make_program(), trainset=task.trainset
        )
        assert run.result(timeout=120).state == expected.dump_state()
        assert run.optimizer == "LabeledFewShot"
    finally:
        for name in ("tp", "prog", "ts", "lm", "magic_run"):
            shell.user_ns.pop(name, None)


def test_bootstrap_finetune_with_a_local_finetunable_lm(manager, tmp_path):
    """BootstrapFinetune through the generic path. No trainer runs here: the LM's provider
    is a stand-in whose "fine-tuned" model is the same simulated one (mocked: training)."""
    task = th.task()
    lm = th.finetunable_lm()
    trainset = task.trainset[:10]
    with dspy.context(lm=lm):
        expected = dspy.teleprompt.BootstrapFinetune(metric=task.metric).compile(
            th.Finetunable(lm), trainset=trainset
        )
    with dspy.context(lm=lm):
        run = dspex.compile(
            dspy.teleprompt.BootstrapFinetune(metric=task.metric),
            th.Finetunable(lm),
            trainset=trainset,
            pool=manager["generic"],
            checkpoint_dir=tmp_path / "finetune",
        )
    result = run.result(timeout=120)
    assert result.state == expected.dump_state()
    assert run.optimizer == "BootstrapFinetune" and run.metrics["usage"]["calls"] > 0
    program = result.to_dspy()
    assert program.predict.lm is not None and program.predict.lm.model == lm.model


def test_better_together_prompts_then_weights(manager, tmp_path):
    """BetterTogether (a prompt optimizer, then BootstrapFinetune) through the generic path:
    the same candidates, scores and program as in-process. The fine-tuning itself is mocked
    (the stand-in provider above): no trainer runs here."""
    task = th.task()
    lm = th.finetunable_lm()

    def better_together():
        return dspy.teleprompt.BetterTogether(
            metric=task.metric,
            p=dspy.teleprompt.BootstrapFewShot(metric=task.metric, max_bootstrapped_demos=2),
            w=dspy.teleprompt.BootstrapFinetune(metric=task.metric),
        )

    options = {
        "trainset": task.trainset[:10],
        "valset": task.valset[:6],
        "strategy": "p -> w",
        "seed": 0,  # its shuffles: None would differ run to run
    }
    with dspy.context(lm=lm):
        expected = better_together().compile(th.Finetunable(lm), **options)
        run = dspex.compile(
            better_together(),
            th.Finetunable(lm),
            pool=manager["generic"],
            checkpoint_dir=tmp_path / "better-together",
            **options,
        )
    result = run.result(timeout=180)
    assert run.optimizer == "BetterTogether" and run.metrics["usage"]["calls"] > 0
    assert result.state == expected.dump_state()
    program = result.to_dspy()
    ranked = [(c["strategy"], c["score"]) for c in program.candidate_programs]
    assert ranked == [(c["strategy"], c["score"]) for c in expected.candidate_programs]
    assert [s for s, _ in ranked] == ["p", "p -> w", ""]  # both steps ran, then the baseline
