"""Notebook 7, end to end in a real browser: Run All of a short offline MIPROv2 run.

The notebook loads the extension, starts a pool, starts MIPROv2 on the SIMULATED LM
(offline, deterministic: dspex_jupyter.testing) and blocks in `run.result()`. The kernel's
main thread is busy for the whole run, yet the sidebar (opened before Run All, when the
kernel knew nothing of dspex) connects and its trial count grows: the kernel opens the
`dspex.lab` comm itself and pushes states from a thread. The test then checks what the
sidebar says of the finished run (usage and score as DSPy writes them, the session freed,
controls that say why they are off), opens its run.log with one click, and saves
docs/screenshots/notebook7.png.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from .lab import LabPage

pytestmark = pytest.mark.browser

POOL = "nb7"
CELLS = [
    "%load_ext dspex_jupyter",
    f"%dspex start {POOL} --size 2",
    "from dspex_jupyter.testing import arithmetic\n"
    "task = arithmetic(n_train=12, n_val=8)\n"
    "program, metric = task.make_program(), task.metric\n"
    "trainset, valset = task.trainset, task.valset\n"
    "lm = task.lm(latency_s=0.1)\n"
    "COMPILE = dict(minibatch_size=4, max_bootstrapped_demos=1, max_labeled_demos=1,\n"
    "               program_aware_proposer=False, data_aware_proposer=False,\n"
    "               tip_aware_proposer=False, fewshot_aware_proposer=False)",
    f"%dspex optimize --pool {POOL} --program program --trainset trainset --valset valset "
    "--metric metric --lm lm --num-candidates 3 --num-trials 12 --seed 0 "
    "--compile-args COMPILE --name run",
    "optimized = run.result(timeout=600)\nprint('finished:', run.status)",
    f"%dspex stop {POOL}",
]
RUN_CELL, RESULT_CELL, STOP_CELL = 3, 4, 5
WAIT = 180_000  # ms: a pool's start and a run on 2 busy cores

# The sidebar's trial count once it is at least `n` while cell `index` is still running
# (its prompt shows `*`); false until then.
TRIALS_WHILE_RUNNING = """([index, n]) => {
  const cell = window.jupyterapp.shell.currentWidget.content.widgets[index];
  const running = cell.model.executionCount === null || cell.promptNode.textContent.includes('*');
  const trials = document.querySelector('#dspex-sidebar .dspex-RunTrials');
  const m = trials && /trials (\\d+)/.exec(trials.textContent);
  const k = m ? Number(m[1]) : -1;
  return running && cell.promptNode.textContent.includes('*') && k >= n && k;
}"""


# Once the sidebar shows an action's outcome: whether cell `index` was still running then.
ANSWERED_WHILE_RUNNING = """(index) => {
  if (!document.querySelector('#dspex-sidebar .dspex-Result')) return false;
  const cell = window.jupyterapp.shell.currentWidget.content.widgets[index];
  return cell.promptNode.textContent.includes('*') ? 'running' : 'finished';
}"""

# What a client that refuses the kernel's comm does to it: the kernel forgets it, and the
# page is not told.
FORGET_COMMS = """\
from dspex_jupyter.notebook.magics import extension_state
bridge = extension_state(get_ipython())["bridge"]
gone = list(bridge._comms)
for c in gone:
    bridge._forget(c)
    get_ipython().kernel.comm_manager.unregister_comm(c)
print(f"forgot {len(gone)} comm(s)")
"""
# Blocks the kernel until a sidebar opened a comm again (at most 60 s).
WAIT_FOR_A_SIDEBAR = """\
bridge.wait_until(lambda: bridge.connected > 0, timeout=60)
print(f"sidebars connected: {bridge.connected}")
"""

# Notes when the dashboard, and when the sidebar, first show the run running (ms, page clock).
WATCH_FIRST_RUNNING = """() => {
  window.__dspexFirst = {dashboard: null, sidebar: null};
  const timer = setInterval(() => {
    const first = window.__dspexFirst;
    const now = performance.now();
    const header = document.querySelector('.jp-OutputArea .dspex-run-header');
    if (first.dashboard === null && header && /status running/.test(header.textContent)) {
      first.dashboard = now;
    }
    if (first.sidebar === null &&
        document.querySelector("#dspex-sidebar .dspex-Run[data-status='running']")) {
      first.sidebar = now;
    }
    if (first.dashboard !== null && first.sidebar !== null) clearInterval(timer);
  }, 20);
}"""


def test_run_all_in_notebook7_with_a_live_sidebar(notebook7: LabPage):
    nb = notebook7
    name = nb.server.write_notebook("optimize7.ipynb", CELLS)
    nb.open_notebook(name)
    sidebar = nb.open_sidebar()
    expect(sidebar.locator(".dspex-NotLoaded")).to_be_visible()
    # Notebook 7 has no status bar: the status sits in the top bar and the sidebar header.
    expect(nb.page.locator("#dspex-status")).to_have_text("DSPex: not loaded")

    nb.page.evaluate(WATCH_FIRST_RUNNING)
    nb.run_all()
    # Connected while later cells still wait their turn: the kernel opened the comm.
    expect(sidebar.locator(".dspex-Conn")).to_have_text("connected", timeout=WAIT)

    # During run.result() (the kernel's main thread blocked) the trial count grows.
    handle = nb.page.wait_for_function(TRIALS_WHILE_RUNNING, arg=[RESULT_CELL, 1], timeout=WAIT)
    seen = int(handle.json_value())
    nb.page.wait_for_function(TRIALS_WHILE_RUNNING, arg=[RESULT_CELL, seen + 1], timeout=WAIT)

    run = sidebar.locator(".dspex-Run")
    expect(run).to_have_attribute("data-status", "running")
    # How far the sidebar trails the dashboard (a figure, not a timed assertion).
    first = nb.page.evaluate("() => window.__dspexFirst")
    assert first["dashboard"] is not None and first["sidebar"] is not None, first
    print(
        f"sidebar shows the run {first['sidebar'] - first['dashboard']:.0f} ms after the dashboard"
    )
    # The run's session is named for the run, not by its hex id.
    session = sidebar.locator(f".dspex-Pool[data-pool='{POOL}'] .dspex-Session")
    expect(session.locator(".dspex-SessionName")).to_have_text(re.compile(r"^run \S+$"))
    expect(sidebar.locator(".dspex-HeaderStatus")).to_have_text(re.compile(r"^DSPex: 1 session"))
    expect(nb.page.locator("#dspex-status")).to_have_text(re.compile(r"^DSPex: 1 session · GPU"))
    expect(nb.cell_output(RUN_CELL)).to_contain_text("MIPROv2 run")
    nb.page.screenshot(path=str(nb_screenshot("notebook7.png")))

    # An action is answered while run.result() holds the kernel's main thread too (its
    # messages go over a kernel subshell): releasing the run's session is refused at once.
    session.get_by_role("button", name="Release").click()
    nb.page.locator(".jp-Dialog").get_by_role("button", name="Release session").click()
    answered = nb.page.wait_for_function(ANSWERED_WHILE_RUNNING, arg=RESULT_CELL, timeout=WAIT)
    assert answered.json_value() == "running", "answered only once the cell finished"
    expect(sidebar.locator(".dspex-Result")).to_have_text(
        re.compile(r"^Release session: failed — session \w+ runs optimization \w+")
    )

    assert "finished: completed" in nb.wait_cell_done(RESULT_CELL, timeout=WAIT)
    expect(run).to_have_attribute("data-status", "completed")
    # The run ended: its session is freed.
    expect(session).to_have_count(0)
    # Usage and score as people read them.
    expect(run.locator(".dspex-RunUsage")).to_have_text(
        re.compile(
            r"^\d{1,3}(,\d{3})* tokens \(\d{1,3}(,\d{3})* prompt, \d{1,3}(,\d{3})* "
            r"completion\) · \d[\d,]* LM calls"
        )
    )
    expect(run.locator(".dspex-RunBest")).to_have_text(re.compile(r"^best \d+(\.\d{1,2})?$"))
    # A disabled control says why.
    cancel = run.get_by_role("button", name="Cancel")
    expect(cancel).to_be_disabled()
    expect(cancel).to_have_attribute("title", "Cancel run: the run is completed")

    # run.log opens with one click (Notebook 7 opens files in the editor, in a new tab).
    with nb.page.context.expect_page() as opened:
        run.locator(".dspex-OpenLog").click()
    editor = opened.value
    editor.wait_for_load_state()
    assert re.search(r"/edit/.*run\.log", editor.url), editor.url
    editor.close()

    assert f"pool '{POOL}' stopped" in nb.wait_cell_done(STOP_CELL, timeout=WAIT)
    expect(sidebar.locator(f".dspex-Pool[data-pool='{POOL}']")).to_have_count(0)

    # Another client of the kernel that does not know `dspex.lab` refuses the comm the kernel
    # opened, which closes it for all: the sidebar notices the silence and opens its own.
    assert "forgot 1 comm" in nb.run_cell(nb.append_cell(FORGET_COMMS))
    assert "sidebars connected: 1" in nb.run_cell(nb.append_cell(WAIT_FOR_A_SIDEBAR))
    expect(sidebar.locator(".dspex-Conn")).to_have_text("connected")


def nb_screenshot(name: str):
    from .lab import SCREENSHOTS

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / name
