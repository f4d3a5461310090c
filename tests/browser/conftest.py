"""Fixtures for the real-browser tests: a JupyterLab server and a headless Chromium page."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .lab import CHROMIUM_FLAGS, LabPage, LabServer, find_chromium

# Where a failed test leaves its page screenshot, console and server log (default: its tmp_path).
ARTIFACTS = (
    Path(os.environ["DSPEX_BROWSER_ARTIFACTS"])
    if os.environ.get("DSPEX_BROWSER_ARTIFACTS")
    else None
)


def _need_browser() -> str:
    chromium = find_chromium()
    if chromium is None:
        message = (
            "chromium is not installed: run scripts/browser_setup.sh (Debian's chromium package)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.fail("the playwright package is missing: run scripts/setup.sh")
    return chromium


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory) -> Iterator[LabServer]:
    _need_browser()
    base = tmp_path_factory.mktemp("lab")
    server = LabServer(base, env={"DSPEX_HOME": str(base / "dspex-home")}).start()
    try:
        yield server
    finally:
        killed = server.stop()
        assert not killed, "processes outlived JupyterLab's shutdown:\n" + "\n".join(killed)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium = _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def lab(browser, lab_server, request, tmp_path) -> Iterator[LabPage]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda err: console.append(f"pageerror: {err}"))
    lab_page = LabPage(page, lab_server)
    lab_page.console = console
    try:
        yield lab_page
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            out = ARTIFACTS or tmp_path
            out.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(Exception):
                page.screenshot(path=str(out / f"{request.node.name}.png"), full_page=True)
            (out / f"{request.node.name}.console.txt").write_text("\n".join(console))
            (out / f"{request.node.name}.lab.log").write_text(lab_server.log())
            print(f"browser artifacts for {request.node.name}: {out}")
        context.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
