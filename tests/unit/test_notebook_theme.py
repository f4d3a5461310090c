"""Every widget takes its colours from JupyterLab's theme, and the score chart's axis.

A colour written as a literal (#333, rgb(51, 51, 51), "white") looks right in one theme
only: in the dark theme dark text vanishes and white tracks glare. So the generated HTML
and SVG may name a colour only inside ``var(--jp-..., fallback)``.
"""

from __future__ import annotations

import re

import pytest

from dspex_jupyter.notebook.checkpoint_controls import CheckpointControls
from dspex_jupyter.notebook.gpu_widget import GpuMemoryWidget
from dspex_jupyter.notebook.html_render import format_score, html_table, usage_bar
from dspex_jupyter.notebook.pool_dashboard import PoolDashboard, pools_html
from dspex_jupyter.notebook.run_dashboard import RunDashboard
from dspex_jupyter.notebook.run_progress import TrialPoint
from dspex_jupyter.notebook.score_chart import score_axis, score_chart_svg, trial_positions
from dspex_jupyter.notebook.snapshot import snapshot
from tests.unit.test_notebook_fakes import FakeManager, FakeNvml, FakeRun, feed_typical_run

WAIT = 10.0
THEMED = re.compile(r"var\(--jp-[\w-]+(?:,\s*[^()]*)?\)")
# A colour property in a style ("color: x") or an SVG attribute (fill="x"): its value.
COLOUR_PROPERTY = re.compile(
    r"\b(?:color|fill|stroke|background(?:-color)?|border(?:-(?:top|bottom|left|right))?)"
    r"(?:\s*:\s*([^;\"]*)|=\"([^\"]*)\")"
)


def literal_colours(html: str) -> list[str]:
    """The colours ``html`` names other than through a theme variable."""
    rest = THEMED.sub("", html)
    literal = re.compile(r"#[0-9a-fA-F]{3,8}\b|rgba?\([^)]*\)|hsla?\([^)]*\)")
    found = literal.findall(rest)
    rest = literal.sub("", rest)  # what is left in a colour property is a colour name
    for value in map("".join, COLOUR_PROPERTY.findall(rest)):
        words = [w for w in value.split() if not re.fullmatch(r"[\d.]+(px|em|%)?|solid|none", w)]
        found += [w for w in words if w not in ("transparent", "inherit", "currentColor")]
    return found


def test_the_check_catches_literal_colours():
    assert literal_colours('<span style="color:#333">x</span>') == ["#333"]
    assert literal_colours('<text fill="rgb(51, 51, 51)">x</text>') == ["rgb(51, 51, 51)"]
    assert literal_colours('<div style="background:white;border:1px solid #ddd">') == [
        "#ddd",
        "white",
    ]
    themed = '<span style="color:var(--jp-ui-font-color1, #212121)">x</span>'
    assert literal_colours(themed) == []


def run_dashboard_html(status: str) -> list[str]:
    run = FakeRun(f"theme-{status}")
    board = RunDashboard(run)
    try:
        feed_typical_run(run, trials=7)
        run.emit("waiting", reason="connection refused", next_try_in=8)
        run.emit("warning", message="the metric returned None for 2 examples")
        if status == "failed":
            run.emit("error", error_type="RuntimeError", message="boom", traceback=["t\n"])
        elif status == "cancelled":
            run.emit("cancelled", checkpoint="/tmp/fake-run/ckpt-000002.json")
        elif status == "completed":
            run.emit("complete", best_score=55.0, trials=7)
        if status != "running":
            run.finish(status)
        assert board.wait_drawn(WAIT)
        parts = [board.header, board.eta, board.chart, board.candidates, board.usage]
        parts += [board.notice, board.error, board.controls.outcome]
        assert all(p.value for p in parts[:6]), [p.value for p in parts]
        return [p.value for p in parts]
    finally:
        board.close()


@pytest.mark.parametrize("status", ["running", "completed", "failed", "cancelled"])
def test_run_dashboard_uses_theme_colours_only(status):
    for html in run_dashboard_html(status):
        assert literal_colours(html) == [], html


def test_checkpoint_controls_status_line_uses_theme_colours():
    run = FakeRun()
    controls = CheckpointControls(run)
    for message in ("checkpoint written: ckpt-000001.json", "error: no checkpoint within 120 s"):
        controls._say(message)
        assert "var(--jp-" in controls.outcome.value
        assert literal_colours(controls.outcome.value) == []


def test_pool_dashboard_action_outcomes_use_theme_colours():
    board = PoolDashboard([FakeManager()])
    try:
        for action in (lambda: "kernel fakepool/0 killed", lambda: 1 / 0):
            board._idle.clear()
            board._perform(action)
            html = board.outcome.value
            assert "var(--jp-" in html and literal_colours(html) == [], html
        assert "error: ZeroDivisionError" in html and "error-color" in html
    finally:
        board.close()


def test_env_progress_bar_uses_theme_colours():
    from dspex_jupyter.core.envs import EnvStep
    from dspex_jupyter.notebook.env_progress import step_html

    for kind in ("packages", "done", "failed"):
        html = step_html(EnvStep("tut-opt", "create", kind, 3, 5, "installing packages"))
        assert "var(--jp-" in html and literal_colours(html) == [], html
    assert literal_colours(step_html(None)) == []


def test_tables_bars_and_memory_widgets_use_theme_colours():
    state = snapshot([FakeManager()], [], nvml=FakeNvml({4242: 2**30}))
    for html in (
        html_table(["a"], [[1.5]]),
        usage_bar(10, 100),
        usage_bar(95, 100),  # nearly full: the warning fill
        pools_html(state),
    ):
        assert "var(--jp-" in html and literal_colours(html) == [], html
    for nvml in (FakeNvml({4242: 2**30}), FakeNvml({}, fail_init=True)):
        widget = GpuMemoryWidget([FakeManager()], nvml=nvml)
        try:
            assert "var(--jp-layout-color2" in widget.body.value  # the memory bar's track
            assert literal_colours(widget.body.value) == []
        finally:
            widget.close()


# ---- the score axis -------------------------------------------------------------------
def y_ticks(svg: str) -> list[str]:
    return re.findall(r'class="y-tick"[^>]*>([^<]*)<', svg)


def test_percent_scores_get_a_0_to_100_axis_with_title_and_gridlines():
    trials = [TrialPoint(1, "full", 37.5, 37.5), TrialPoint(2, "minibatch", 52.0, 37.5)]
    svg = score_chart_svg(trials)
    assert y_ticks(svg) == ["0", "20", "40", "60", "80", "100"]
    assert svg.count('class="grid"') == 6
    assert re.search(r'class="axis-title"[^>]*transform="rotate\(-90[^>]*>score<', svg)
    assert "baseline (full evaluation): 37.5</title>" in svg
    assert "trial 1 (minibatch): 52</title>" in svg


def test_the_trial_axis_counts_trials_as_the_header_does():
    """MIPROv2's num_trials counts minibatch trials; full evaluations sit at the trial they
    follow, so the last minibatch of "trial 3/3" is at 3, as is the full evaluation after it."""
    kinds = ["full", "minibatch", "minibatch", "full", "minibatch", "full"]
    trials = [TrialPoint(n, kind, 50.0, 50.0) for n, kind in enumerate(kinds, start=1)]
    assert trial_positions(trials) == [0, 1, 2, 2, 3, 3]
    svg = score_chart_svg(trials, num_trials=6)
    ticks = re.findall(r'class="x-tick"[^>]*>(\d+)<', svg)
    assert ticks == ["0", "2", "4", "6"]  # round steps over the whole search from the start
    assert re.search(r'class="axis-title"[^>]*>trial<', svg)
    assert "full evaluation after trial 3: 50" in svg
    # Without minibatches every evaluation is full: the baseline, then trials 1, 2.
    full = [TrialPoint(n, "full", 50.0, 50.0) for n in (1, 2, 3)]
    assert trial_positions(full) == [0, 1, 2]
    assert trial_positions(full[:1] + trials[1:2], minibatch=False) == [0, 1]


def test_a_single_point_is_not_blown_up_to_the_whole_axis():
    svg = score_chart_svg([TrialPoint(1, "full", 37.5, 37.5)])
    assert y_ticks(svg) == ["0", "20", "40", "60", "80", "100"]
    assert "36.5" not in svg and "38.5" not in svg
    # Outside 0-100, one point gets a band of round ticks around it.
    assert score_axis([250.0]) == (249.0, 251.0, 0.5)


def test_other_scores_get_round_ticks():
    assert score_axis([0.42, 0.61]) == (0.0, 1.0, 0.2)
    assert score_axis([120.0, 180.0]) == (120.0, 180.0, 20.0)
    assert score_axis([-3.2, 140.0]) == (-50.0, 150.0, 50.0)
    svg = score_chart_svg([TrialPoint(1, "full", 120.0, 120.0), TrialPoint(2, "full", 180, 180)])
    assert y_ticks(svg) == ["120", "140", "160", "180"]


def test_scores_read_as_dspy_prints_them():
    assert [format_score(v) for v in (87.5, 87.500, 100.0, 47.916666, 0.875, 0.0)] == [
        "87.5",
        "87.5",
        "100",
        "47.92",
        "0.875",
        "0",
    ]
