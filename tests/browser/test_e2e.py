"""End to end in a real browser: the real magics, a real pool, an offline MIPROv2 run.

A notebook loads the extension, starts a pool, starts MIPROv2 on a SIMULATED LM (offline,
dspex_jupyter.testing), and the test watches the run's dashboard (trial count, score chart)
and the lab sidebar, presses Checkpoint in the sidebar and in the dashboard, then Cancel,
and checks the outcome everywhere: what the sidebar says (usage, scores, sessions by name),
its checkpoint and run.log links, and the text contrast of the sidebar and the dashboard in
the light and dark themes (WCAG AA, from computed colours). It saves
docs/screenshots/dashboard.png, sidebar.png and sidebar-dark.png.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from .contrast import DARK, LIGHT, contrast_failures, set_theme
from .lab import LabPage, optimize_cells

pytestmark = pytest.mark.browser

POOL = "mipro"
TRIALS = 40  # far more than the test waits for: it cancels the run

CELLS = [
    *optimize_cells(POOL, TRIALS, latency_s=0.5),
    f"%dspex stop {POOL}",
]

WAIT = 120_000  # ms: a run's bootstrap and first trials on 2 busy cores


DASHBOARD = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell:nth-child(4)"
CHART_MARKS = f"{DASHBOARD} svg [class^='trial']"
DASHBOARD_OUTPUT = f"{DASHBOARD} .jp-OutputArea"


def wait_chart_points(lab: LabPage, at_least: int) -> int:
    """Wait until the dashboard's score chart has `at_least` trial marks; return how many."""
    handle = lab.page.wait_for_function(
        "([sel, n]) => { const k = document.querySelectorAll(sel).length; return k >= n && k; }",
        arg=[CHART_MARKS, at_least],
        timeout=WAIT,
    )
    return int(handle.json_value())


def test_pool_run_dashboard_checkpoint_cancel_and_sidebar(lab: LabPage):
    name = lab.server.write_notebook("optimize.ipynb", CELLS)
    lab.open_lab()
    lab.open_notebook(name)
    sidebar = lab.open_sidebar()
    expect(sidebar.locator(".dspex-NotLoaded")).to_be_visible()

    lab.run_cell(0)
    expect(sidebar.locator(".dspex-Conn")).to_have_text("connected")
    expect(sidebar.locator(".dspex-Pools .dspex-Empty")).to_be_visible()

    assert f"pool '{POOL}': 2 kernel(s) ready" in lab.run_cell(1, timeout=WAIT)
    pool = sidebar.locator(f".dspex-Pool[data-pool='{POOL}']")
    expect(pool.locator(".dspex-Kernel")).to_have_count(2)
    expect(pool.locator(".dspex-Badge")).to_have_text("healthy")

    lab.run_cell(2, timeout=WAIT)
    out = lab.run_cell(3, timeout=WAIT)
    assert "started in pool 'mipro', stored as `run`" in out, out

    # The dashboard: trial count and chart grow while the run runs.
    dashboard = lab.cell_output(3)
    expect(dashboard).to_contain_text("MIPROv2 run")
    # "trial k/N · M full evaluations": N is num_trials; the full evaluations are told apart.
    full = r"(?: · \d+ full evaluations?)?$"
    trial_label = dashboard.get_by_text(re.compile(r"^trial \d+/\d+" + full))
    expect(trial_label).to_have_text(re.compile(r"^trial ([2-9]|\d\d)/\d\d" + full), timeout=WAIT)
    # The chart (inline SVG, one mark per trial) grows too.
    first = wait_chart_points(lab, 2)
    wait_chart_points(lab, first + 1)

    # The sidebar lists the pool, its session and the run, live.
    run = sidebar.locator(".dspex-Run")
    expect(run).to_have_count(1)
    expect(run).to_have_attribute("data-status", "running")
    expect(run.locator(".dspex-RunTrials")).to_have_text(re.compile(r"trials ([2-9]|\d\d)"))
    expect(pool.locator(".dspex-Session")).to_have_count(1)
    expect(lab.page.locator("#dspex-status")).to_have_text(re.compile(r"DSPex: 1 session · GPU"))
    # Read as people read them: the session by its run, usage in words, scores as DSPy's.
    run_id = run.get_attribute("data-run")
    expect(pool.locator(".dspex-SessionName")).to_have_text(f"run {run_id}")
    expect(run.locator(".dspex-RunUsage")).to_have_text(
        re.compile(
            r"^\d{1,3}(,\d{3})* tokens \(\d{1,3}(,\d{3})* prompt, \d{1,3}(,\d{3})* completion\)"
        )
    )
    expect(run.locator(".dspex-RunBest")).to_have_text(
        re.compile("^best (\u2013|\\d+(\\.\\d{1,2})?)$")
    )

    # Checkpoint from the sidebar goes through the kernel's bridge to the run.
    run.get_by_role("button", name="Checkpoint").click()
    expect(sidebar.locator(".dspex-Result")).to_have_text(
        re.compile(r"Checkpoint: done — checkpoint written: ckpt-"), timeout=WAIT
    )
    wait_chart_points(lab, 5)
    lab.screenshot(lab.page, "sidebar.png")

    # Checkpoint, then Cancel, in the dashboard; the status line says what happened.
    dashboard.get_by_role("button", name=re.compile("Checkpoint")).click()
    expect(dashboard).to_contain_text(re.compile(r"checkpoint written: ckpt-"), timeout=WAIT)
    dashboard.get_by_role("button", name="Cancel").click()
    dashboard.get_by_role("button", name="Confirm cancel?").click()  # Cancel asks first
    expect(dashboard).to_contain_text(
        re.compile(r"cancelled at trial \d+; resumable checkpoint: ckpt-\d+\.json"), timeout=WAIT
    )
    expect(dashboard.get_by_role("button", name="Resume")).to_be_enabled()
    expect(dashboard.get_by_role("button", name="Cancel")).to_be_disabled()
    lab.screenshot(dashboard, "dashboard.png")

    # The sidebar follows: the run is cancelled and its buttons are off, saying why.
    expect(run).to_have_attribute("data-status", "cancelled", timeout=WAIT)
    expect(run.get_by_role("button", name="Cancel")).to_be_disabled()
    expect(run.get_by_role("button", name="Cancel")).to_have_attribute(
        "title", "Cancel run: the run is cancelled"
    )
    # The run ended: its session is freed.
    expect(pool.locator(".dspex-Session")).to_have_count(0, timeout=WAIT)

    # The checkpoint folder and its run.log open in JupyterLab with one click.
    run.locator(".dspex-OpenLog").click()
    lab.page.wait_for_function(
        r"""() => {
          const w = window.jupyterapp.shell.currentWidget;
          return !!w && !!w.context && /dspex-runs\/[^/]+\/run\.log$/.test(w.context.path);
        }""",
        timeout=WAIT,
    )
    expect(lab.page.locator(".jp-FileEditor:visible")).to_contain_text("BOOTSTRAP FEWSHOT EXAMPLES")
    run.locator(".dspex-OpenFolder").click()
    expect(lab.page.locator(".jp-FileBrowser .jp-BreadCrumbs")).to_contain_text(run_id)
    expect(
        lab.page.locator(".jp-FileBrowser .jp-DirListing-item[title*='run.log']")
    ).to_be_visible()
    lab.open_notebook(name)

    assert f"pool '{POOL}' stopped" in lab.run_cell(4, timeout=WAIT)
    expect(pool).to_have_count(0)

    # Text contrast in both themes (the sidebar, and the dashboard left in the cell's output),
    # with a screenshot in the dark one.
    lab.open_sidebar()
    failures: dict[str, list[str]] = {}
    for theme in (LIGHT, DARK):
        set_theme(lab.page, theme)
        for part, root in (("sidebar", "#dspex-sidebar"), ("dashboard", DASHBOARD_OUTPUT)):
            checked, below = contrast_failures(lab.page, [root])
            assert checked > 10, f"{theme}, {part}: only {checked} text elements found"
            failures[f"{theme}, {part}"] = below
        if theme == DARK:
            lab.screenshot(lab.page, "sidebar-dark.png")
    set_theme(lab.page, LIGHT)
    report = "\n".join(f"{where}: {line}" for where, lines in failures.items() for line in lines)
    assert not report, "text below WCAG AA:\n" + report
