"""The dashboard rows and chart points of BootstrapFewShotWithRandomSearch, COPRO and
SIMBA runs, from the progress events their runtimes send (shapes as in
``runtime/step_state.RunHooks``: the phase plus the optimizer's figures)."""

from __future__ import annotations

from typing import Any

from dspex_jupyter.notebook.optimizer_views import bootstrap_rs, copro, simba


def state(*events: dict[str, Any], phase: str | None = None, status: str = "running"):
    progress: dict[str, Any] = {}
    for event in events:
        progress.update(event)
    return {
        "optimizer": "x",
        "status": status,
        "phase": phase,
        "progress": progress,
        "progress_events": [{"kind": "progress", **e} for e in events],
    }


def test_views_of_a_run_that_has_not_started_show_nothing():
    for view in (bootstrap_rs, copro, simba):
        assert view.progress_items(state()) == []
        assert view.chart_points(state()) == []


def test_views_before_the_first_step_say_what_is_happening():
    calls = {"metric_calls": 12}  # the machinery's own progress event
    assert bootstrap_rs.progress_items(state(calls)) == [
        ("Candidate seed", "building the first candidate")
    ]
    assert copro.progress_items(state(calls)) == [("Depth", "proposing the first candidates")]
    assert simba.progress_items(state(calls)) == [("Step", "sampling the first mini-batch")]


def test_bootstrap_rs_shows_the_seed_of_n_its_score_and_the_best():
    first = {"phase": "seed", "step": 1, "total": 6, "seed": -3, "score": 37.5}
    second = {"phase": "seed", "step": 2, "total": 6, "seed": -2, "score": 75.0}
    events = (
        {**first, "best_score": 37.5, "best_seed": -3},
        {**second, "best_score": 75.0, "best_seed": -2},
    )
    rows = dict(bootstrap_rs.progress_items(state(*events)))
    assert rows["Candidate seed"] == "2 of 6"
    assert rows["Last scored"] == "seed -2 (labeled demos only): 75"
    assert rows["Best so far"] == "75, seed -2 (labeled demos only)"
    assert rows["Scores by seed"] == "-3: 37.5, -2: 75"
    points = bootstrap_rs.chart_points(state({**first, "best_score": 37.5}))
    assert points == [{"number": 1, "score": 37.5, "eval": "full", "best_score": 37.5}]


def test_copro_shows_the_depth_breadth_and_best_instruction():
    proposed = {"phase": "propose", "step": 0, "total": 3, "breadth": 3, "candidates": 3}
    depth = {
        "phase": "depth",
        "step": 1,
        "total": 3,
        "breadth": 3,
        "candidates": 6,
        "evaluated": 3,
        "best_score": 50.0,
        "best_instruction": "Think step by step. " * 10,
    }
    assert dict(copro.progress_items(state(proposed)))["Depth"] == (
        "0 of 3 (first candidates proposed)"
    )
    rows = dict(copro.progress_items(state(proposed, depth)))
    assert rows["Depth"] == "1 of 3"
    assert rows["Breadth"] == "3 candidates per predictor and depth"
    assert rows["Candidates"] == "3 scored, 6 proposed"
    assert rows["Best so far"] == "50"
    assert rows["Best instruction"].endswith("…") and len(rows["Best instruction"]) == 90
    assert copro.chart_points(state(proposed, depth)) == [
        {"number": 1, "score": 50.0, "eval": "full", "best_score": 50.0}
    ]


def test_simba_shows_the_step_mini_batch_and_best_then_validation():
    step = {
        "phase": "step",
        "step": 3,
        "total": 3,
        "batch_size": 4,
        "programs": 13,
        "baseline_score": 0.5,
        "step_best": 1.0,
        "best_score": 0.75,
    }
    rows = dict(simba.progress_items(state(step, phase="validate")))
    assert rows["Step"] == "3 of 3"
    assert rows["Mini-batch"] == "4 examples"
    assert rows["Programs"] == "13 in the pool"
    assert rows["Last step"] == "best candidate 1 (samples averaged 0.5)"
    assert rows["Best so far"] == "0.75 (mini-batch average)"
    assert rows["Validation"] == "scoring the winners on the whole trainset"
    assert "Validation" not in dict(simba.progress_items(state(step, status="completed")))
    assert simba.chart_points(state(step)) == [
        {"number": 3, "score": 1.0, "eval": "minibatch", "best_score": 0.75}
    ]
