"""The lab extension in a real browser, against a stand-in `dspex.lab` comm target.

These tests need no pools and no magics: a notebook cell imports fake_lab_target, which
registers the comm target and plays a pool with one run (see that module).
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from .lab import TESTS_DIR, LabPage

pytestmark = pytest.mark.browser

NOT_LOADED = "Run %load_ext dspex_jupyter in this notebook"


def fake_cell(pool: str) -> str:
    return (
        f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r})\n"
        "from fake_lab_target import FakeLab\n"
        f"fake = FakeLab({pool!r}).install()\n"
        "print('fake dspex.lab ready')"
    )


def test_sidebar_lists_pools_runs_and_gpu(lab: LabPage):
    name = lab.server.write_notebook("alpha.ipynb", [fake_cell("alpha"), "print(fake.actions)"])
    lab.open_lab()
    lab.open_notebook(name)
    sidebar = lab.open_sidebar()
    expect(sidebar.locator(".dspex-NotLoaded")).to_have_text(re.compile(NOT_LOADED))
    assert "fake dspex.lab ready" in lab.run_cell(0)

    # The panel retries after the cell ran and now shows what the kernel sent.
    expect(sidebar.locator(".dspex-Conn")).to_have_text("connected")
    pool = sidebar.locator(".dspex-Pool[data-pool='alpha']")
    expect(pool.locator(".dspex-PoolMeta")).to_contain_text("env:alpha-env · 2/2 kernels")
    expect(pool.locator(".dspex-Kernel")).to_have_count(2)
    expect(pool.locator(".dspex-Kernel[data-kernel='alpha-k0']")).to_contain_text("180 MiB")
    expect(pool.locator(".dspex-Session[data-session='alpha-s1']")).to_be_visible()
    run = sidebar.locator(".dspex-Run[data-run='alpha-run']")
    expect(run).to_be_visible()
    expect(sidebar.locator(".dspex-Gpu")).to_contain_text("12.0 GiB / 80.0 GiB")

    # Live: the trial count grows while the run is running.
    expect(run.locator(".dspex-RunTrials")).to_have_text(re.compile(r"trials ([4-9]|\d\d)"))

    # Read as people read them: usage in words, the score as DSPy writes it, the session by
    # the run that holds it, and the optimizer's own progress items as they come.
    expect(run.locator(".dspex-RunUsage")).to_have_text(
        "57,366 tokens (52,623 prompt, 4,743 completion) · 120 LM calls (8 from the cache)"
    )
    expect(run.locator(".dspex-RunBest")).to_have_text("best 87.5")
    expect(run.locator(".dspex-RunOptimizer")).to_have_text("GEPA")
    items = run.locator(".dspex-RunItem")
    expect(items).to_have_count(2)
    expect(items.nth(0)).to_have_text(re.compile(r"^Pareto front\s*\d+ candidates$"))
    expect(items.nth(1)).to_have_text(re.compile(r"^rollouts\s*\d+ / 400$"))
    expect(pool.locator(".dspex-SessionName")).to_have_text("run alpha-run")
    expect(pool.locator(".dspex-Kernel[data-kernel='alpha-k0']")).to_contain_text(
        "in run alpha-run"
    )
    # A checkpoint outside the server's root is shown, not offered as a link.
    expect(run.locator(".dspex-OpenFolder")).to_have_count(0)

    status = lab.page.locator("#dspex-status")
    expect(status).to_have_text("DSPex: 1 session · GPU 12.0 GiB / 80.0 GiB")
    expect(sidebar.locator(".dspex-HeaderStatus")).to_have_text(
        "DSPex: 1 session · GPU 12.0 GiB / 80.0 GiB"
    )


def test_actions_reach_the_kernel_and_show_their_outcome(lab: LabPage):
    name = lab.server.write_notebook("actions.ipynb", [fake_cell("beta"), "print(fake.actions)"])
    lab.open_lab()
    lab.open_notebook(name)
    lab.run_cell(0)
    sidebar = lab.open_sidebar()
    pool = sidebar.locator(".dspex-Pool[data-pool='beta']")
    run = sidebar.locator(".dspex-Run[data-run='beta-run']")
    result = sidebar.locator(".dspex-Result")
    dialog = lab.page.locator(".jp-Dialog")

    # Checkpoint needs no confirmation; the buttons stay clickable while states stream in.
    expect(run.locator(".dspex-RunTrials")).to_have_text(re.compile(r"trials ([2-9]|\d\d)"))
    run.get_by_role("button", name="Checkpoint").click()
    expect(result).to_have_text(
        re.compile(r"Checkpoint: done — checkpoint written to /tmp/fake-checkpoints/beta-run/")
    )
    expect(run.locator(".dspex-RunCheckpoint")).to_contain_text("/tmp/fake-checkpoints/beta-run")

    # Restart asks first; "Back" sends nothing.
    kernel = pool.locator(".dspex-Kernel[data-kernel='beta-k1']")
    kernel.get_by_role("button", name="Restart").click()
    expect(dialog).to_contain_text("Restart kernel beta-k1 of pool beta?")
    dialog.get_by_role("button", name="Back").click()
    expect(dialog).to_have_count(0)
    kernel.get_by_role("button", name="Restart").click()
    dialog.get_by_role("button", name="Restart kernel").click()
    expect(result).to_have_text("Restart kernel: done — kernel beta-k1 restarted")
    expect(kernel.locator(".dspex-KernelState")).to_have_text("starting")
    # A disabled control says why.
    restart = kernel.get_by_role("button", name="Restart")
    expect(restart).to_be_disabled()
    expect(restart).to_have_attribute("title", "Restart kernel: the kernel is starting")

    # Release the session: the pool and the status bar follow.
    pool.locator(".dspex-Session[data-session='beta-s1']").get_by_role(
        "button", name="Release"
    ).click()
    dialog.get_by_role("button", name="Release session").click()
    expect(result).to_have_text("Release session: done — session beta-s1 released")
    expect(pool.locator(".dspex-Session")).to_have_count(0)
    expect(lab.page.locator("#dspex-status")).to_have_text(
        "DSPex: 0 sessions · GPU 12.0 GiB / 80.0 GiB"
    )

    # Cancel: the run stops, and its buttons are disabled.
    run.get_by_role("button", name="Cancel").click()
    dialog.get_by_role("button", name="Cancel run").click()
    expect(result).to_have_text(re.compile(r"Cancel run: done — run beta-run cancelled after \d+"))
    expect(run).to_have_attribute("data-status", "cancelled")
    expect(run.get_by_role("button", name="Checkpoint")).to_be_disabled()
    expect(run.get_by_role("button", name="Cancel")).to_be_disabled()
    expect(run.get_by_role("button", name="Cancel")).to_have_attribute(
        "title", "Cancel run: the run is cancelled"
    )

    # The kernel saw exactly the four actions, in order, with their targets.
    out = lab.run_cell(1)
    for expected in (
        "'action': 'checkpoint_run', 'target': {'run_id': 'beta-run'}",
        "'action': 'restart_kernel', 'target': {'pool': 'beta', 'kernel': 'beta-k1'}",
        "'action': 'release_session', 'target': {'pool': 'beta', 'session': 'beta-s1'}",
        "'action': 'cancel_run', 'target': {'run_id': 'beta-run'}",
    ):
        assert expected in out, out
    assert out.count("'type': 'action'") == 4, out


def test_follows_the_active_notebook_and_kernel_restarts(lab: LabPage):
    one = lab.server.write_notebook("one.ipynb", [fake_cell("one")])
    two = lab.server.write_notebook("two.ipynb", [fake_cell("two")])
    plain = lab.server.write_notebook("plain.ipynb", ["x = 1"])
    lab.open_lab()
    sidebar = lab.open_sidebar()
    pools = sidebar.locator(".dspex-Pool")
    lab.open_notebook(one)
    lab.run_cell(0)
    expect(pools).to_have_attribute("data-pool", "one")
    lab.open_notebook(two)
    expect(sidebar.locator(".dspex-NotLoaded")).to_be_visible()
    lab.run_cell(0)
    expect(pools).to_have_attribute("data-pool", "two")
    expect(sidebar.locator(".dspex-Notebook")).to_have_text("two.ipynb")

    # Back to the first notebook: its own kernel's pools again.
    lab.open_notebook(one)
    expect(sidebar.locator(".dspex-Notebook")).to_have_text("one.ipynb")
    expect(pools).to_have_attribute("data-pool", "one")

    # A notebook whose kernel has no dspex.lab target.
    lab.open_notebook(plain)
    expect(sidebar.locator(".dspex-NotLoaded")).to_have_text(re.compile(NOT_LOADED))
    expect(pools).to_have_count(0)
    expect(lab.page.locator("#dspex-status")).to_have_text("DSPex: not loaded")

    # A kernel restart forgets the target: the panel says so, and reconnects once it is back.
    lab.open_notebook(one)
    expect(pools).to_have_attribute("data-pool", "one")
    lab.restart_kernel()
    expect(sidebar.locator(".dspex-NotLoaded")).to_be_visible()
    expect(pools).to_have_count(0)
    lab.run_cell(0)
    expect(pools).to_have_attribute("data-pool", "one")
    expect(sidebar.locator(".dspex-Conn")).to_have_text("connected")
