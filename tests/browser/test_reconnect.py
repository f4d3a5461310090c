"""Closing the browser tab during a run and opening the notebook again: the dashboard is live.

Issue #5, item 6, in real JupyterLab and headless Chromium, no mocks. A notebook loads the
extension, starts a pool and starts MIPROv2 through the real magics; the run uses the
project's SIMULATED LM (offline, deterministic, seeded: dspex_jupyter.testing), slowed by a
per-call latency so that it lasts. While it runs, another cell runs at once (the notebook is
not blocked). The notebook is saved and its browser context closed, while the Jupyter server,
the notebook's kernel and the run go on. A new browser context opens the notebook again: it
joins the same kernel, the dashboard in the saved output renders from the kernel's live widget
models and its trial count keeps growing, and `%dspex attach run` shows the dashboard in
another cell, growing too. Cancel and `%dspex stop` leave nothing running (the `lab_server`
fixture fails the module if a process outlives the server). It saves
docs/screenshots/dashboard-reopened.png.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import nbformat
import pytest
from playwright.sync_api import expect

from .lab import LabPage, optimize_cells

pytestmark = pytest.mark.browser

POOL = "mipro"
TRIALS = 200  # far more than the test waits for: it cancels the run
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

CELLS = [
    *optimize_cells(POOL, TRIALS, latency_s=0.3),
    "1 + 1",
    "%dspex attach run",
    f"%dspex stop {POOL}",
]
RUN_CELL, OTHER_CELL, ATTACH_CELL, STOP_CELL = 3, 4, 5, 6

WAIT = 120_000  # ms: a run's bootstrap and first trials on 2 busy cores
PROMPT = 20_000  # ms: an ordinary cell while the run goes on

# The trial count in the header of the dashboard shown in cell `index` of the current
# notebook ("... · trials N · ..."), once it is more than `above`; false until then.
TRIALS_ABOVE = """([index, above]) => {
  const panel = window.jupyterapp.shell.currentWidget;
  const cell = panel && panel.content && panel.content.widgets[index];
  const header = cell && cell.outputArea.node.querySelector('.dspex-run-header');
  const match = header && /\\btrials (\\d+)\\b/.exec(header.textContent);
  const n = match ? Number(match[1]) : -1;
  return n > above && n;
}"""


def wait_trials_above(lab: LabPage, index: int, above: int) -> int:
    """Wait until the dashboard in cell `index` shows more than `above` trials; return it."""
    handle = lab.page.wait_for_function(TRIALS_ABOVE, arg=[index, above], timeout=WAIT)
    return int(handle.json_value())


def trials_shown(lab: LabPage, index: int) -> int:
    return wait_trials_above(lab, index, -1)


def save_notebook(lab: LabPage) -> None:
    lab.page.evaluate(
        "async () => { await window.jupyterapp.commands.execute('docmanager:save'); }"
    )
    lab.page.wait_for_function(
        "() => !window.jupyterapp.shell.currentWidget.context.model.dirty", timeout=WAIT
    )


def test_dashboard_is_live_after_the_tab_is_closed_and_reopened(
    lab: LabPage, new_lab: Callable[[], LabPage]
):
    name = lab.server.write_notebook("reconnect.ipynb", CELLS)
    lab.open_lab()
    lab.open_notebook(name)
    lab.run_cell(0)
    assert f"pool '{POOL}': 2 kernel(s) ready" in lab.run_cell(1, timeout=WAIT)
    lab.run_cell(2, timeout=WAIT)
    out = lab.run_cell(RUN_CELL, timeout=WAIT)
    assert f"started in pool '{POOL}', stored as `run`" in out, out

    # The dashboard is live: its trial count grows.
    dashboard = lab.cell_output(RUN_CELL)
    expect(dashboard).to_contain_text("MIPROv2 run")
    first = wait_trials_above(lab, RUN_CELL, 0)
    grown = wait_trials_above(lab, RUN_CELL, first)

    # Not blocked: an ordinary cell runs at once while the run goes on, and the run goes on.
    other = lab.run_cell(OTHER_CELL, timeout=PROMPT)
    assert other.strip().splitlines()[-1] == "2", other  # after its "[5]:" prompt
    expect(dashboard.locator(".dspex-run-header")).to_contain_text("status running")
    wait_trials_above(lab, RUN_CELL, grown)

    # Save (the dashboard's widget view is in the file), then close the whole browser context;
    # the server, the notebook's kernel and the run go on.
    save_notebook(lab)
    saved = nbformat.read(lab.server.root / name, as_version=4)
    views = [o for o in saved.cells[RUN_CELL].outputs if WIDGET_VIEW in o.get("data", {})]
    assert len(views) == 1, saved.cells[RUN_CELL].outputs
    before_close = trials_shown(lab, RUN_CELL)
    kernel_id = lab.page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.id"
    )
    lab.page.context.close()

    # A new browser context opens the notebook again and joins the same, still running, kernel.
    again = new_lab()
    again.open_lab()
    again.open_notebook(name)
    rejoined = again.page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.id"
    )
    assert rejoined == kernel_id

    # The saved dashboard renders from the kernel's live widget models, and keeps growing.
    reopened = again.cell_output(RUN_CELL)
    expect(reopened.locator(".dspex-run-header")).to_contain_text("status running", timeout=WAIT)
    after_reopen = wait_trials_above(again, RUN_CELL, before_close)
    wait_trials_above(again, RUN_CELL, after_reopen)
    expect(reopened.get_by_role("button", name="Cancel")).to_be_enabled()

    # `%dspex attach run` shows the run's dashboard in another cell, live as well.
    again.run_cell(ATTACH_CELL, timeout=WAIT)
    attached = again.cell_output(ATTACH_CELL)
    expect(attached).to_contain_text("MIPROv2 run")
    shown = trials_shown(again, ATTACH_CELL)
    attached_grown = wait_trials_above(again, ATTACH_CELL, shown)
    print(
        f"trials shown: {first} -> {grown} before closing, {before_close} at closing; "
        f"{after_reopen} after reopening; attached {shown} -> {attached_grown}"
    )
    again.screenshot(reopened, "dashboard-reopened.png")

    # Cancel from the reopened dashboard; both views say so. Then stop the pool.
    reopened.get_by_role("button", name="Cancel").click()
    reopened.get_by_role("button", name="Confirm cancel?").click()  # Cancel asks first
    cancelled = re.compile(r"cancelled at trial \d+; resumable checkpoint: ckpt-\d+\.json")
    expect(reopened).to_contain_text(cancelled, timeout=WAIT)
    expect(attached).to_contain_text(cancelled)
    expect(attached.get_by_role("button", name="Cancel")).to_be_disabled()
    assert f"pool '{POOL}' stopped" in again.run_cell(STOP_CELL, timeout=WAIT)
