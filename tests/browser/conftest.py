"""Fixtures for the real-browser tests: a JupyterLab server and a headless Chromium page."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
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
def notebook7_server(tmp_path_factory) -> Iterator[LabServer]:
    """Notebook 7 (`python -m notebook`), set up as `lab_server` is."""
    _need_browser()
    base = tmp_path_factory.mktemp("nb7")
    server = LabServer(base, env={"DSPEX_HOME": str(base / "dspex-home")}, app="notebook")
    server.start()
    try:
        yield server
    finally:
        killed = server.stop()
        assert not killed, "processes outlived Notebook 7's shutdown:\n" + "\n".join(killed)


@pytest.fixture
def notebook7(browser, notebook7_server, request, tmp_path) -> Iterator[LabPage]:
    """A page on the Notebook 7 server (as `lab` is on JupyterLab's)."""
    page = _new_lab_page(browser, notebook7_server)
    try:
        yield page
    finally:
        _finish_lab_pages([page], notebook7_server, request, tmp_path)


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


def _new_lab_page(browser, lab_server) -> LabPage:
    """A page in a browser context of its own (its own cookies and storage: a new tab)."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda err: console.append(f"pageerror: {err}"))
    lab_page = LabPage(page, lab_server)
    lab_page.console = console
    return lab_page


def _finish_lab_pages(
    pages: list[LabPage], lab_server, request, tmp_path, suffix: str = ""
) -> None:
    """Leave a failed test's screenshots, consoles and server log; close the contexts."""
    failed = getattr(request.node, "rep_call", None)
    if pages and failed is not None and failed.failed:
        out = ARTIFACTS or tmp_path
        out.mkdir(parents=True, exist_ok=True)
        for i, lab_page in enumerate(pages):
            name = f"{request.node.name}{suffix}{i + 1 if suffix else ''}"
            with contextlib.suppress(Exception):
                lab_page.page.screenshot(path=str(out / f"{name}.png"), full_page=True)
            (out / f"{name}.console.txt").write_text("\n".join(lab_page.console))
        (out / f"{request.node.name}.lab.log").write_text(lab_server.log())
        print(f"browser artifacts for {request.node.name}: {out}")
    for lab_page in pages:
        with contextlib.suppress(Exception):
            lab_page.page.context.close()


@pytest.fixture
def lab(browser, lab_server, request, tmp_path) -> Iterator[LabPage]:
    lab_page = _new_lab_page(browser, lab_server)
    try:
        yield lab_page
    finally:
        _finish_lab_pages([lab_page], lab_server, request, tmp_path)


@pytest.fixture
def new_lab(browser, lab_server, request, tmp_path) -> Iterator[Callable[[], LabPage]]:
    """Opens more pages on the same server, each in a new browser context (a tab closed and
    opened again); a failed test leaves the artifacts of each, as `lab` does."""
    pages: list[LabPage] = []

    def open_page() -> LabPage:
        pages.append(_new_lab_page(browser, lab_server))
        return pages[-1]

    try:
        yield open_page
    finally:
        _finish_lab_pages(pages, lab_server, request, tmp_path, suffix=".new_lab")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
