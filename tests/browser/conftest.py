"""Fixtures for the browser tests (tests/browser/README.md).

``browser`` (one chromium for this folder's tests), ``live_server`` (``fediblog demo``
plus a held comment, for this folder's tests), ``new_context`` (a factory of browser
contexts on the live server: size, colour scheme, JavaScript on or off) and ``page``
(a desktop page in light mode). Every test here is marked ``browser``; when one fails,
each of its open pages is saved as a screenshot and the report names the files.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.browser.kit import (
    CSP_LISTENER,
    DESKTOP,
    LiveServer,
    NewContext,
    launch_chromium,
    start_demo,
)

_CONTEXTS = pytest.StashKey[list[BrowserContext]]()
_SCREENSHOTS = pytest.StashKey[Path]()
HELD_COMMENT = "A held comment: nobody sees it before the author approves it."


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Screenshots of every page a failed test left open, named in its report."""
    report = yield
    if report.when == "call" and report.failed and item.stash.get(_CONTEXTS, None):
        folder = item.stash[_SCREENSHOTS]
        folder.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", item.name)[:120]
        saved: list[str] = []
        for context in item.stash[_CONTEXTS]:
            for page in context.pages:
                path = folder / f"{stem}-{len(saved) + 1}.png"
                try:
                    page.screenshot(path=path, full_page=True)
                except Exception as error:  # the failure itself may be a dead page
                    saved.append(f"{page.url}: no screenshot ({error})")
                else:
                    saved.append(f"{page.url}: {path}")
        report.sections.append(("browser screenshots", "\n".join(saved)))
    return report


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = launch_chromium(playwright)
        yield launched
        launched.close()


@pytest.fixture(scope="package")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """``fediblog demo`` in a temporary folder, with one comment held for approval
    (left through the real form) on "A short tour of Markdown"."""
    server = start_demo(tmp_path_factory.mktemp("live-server"))
    try:
        held = httpx.post(
            server.url + "/posts/a-short-tour-of-markdown/comment",
            data={"name": "Held Reader", "email": "held@reader.example", "comment": HELD_COMMENT},
            timeout=10,
        )
        assert held.status_code == 303, held.text
        yield server
    finally:
        server.stop()


@pytest.fixture
def new_context(
    request: pytest.FixtureRequest,
    browser: Browser,
    live_server: LiveServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[NewContext]:
    """``new_context(viewport=PHONE, color_scheme="dark", java_script_enabled=False, …)``:
    a fresh context (no cookies) whose relative URLs go to the live server."""
    opened: list[BrowserContext] = []
    request.node.stash[_CONTEXTS] = opened
    request.node.stash[_SCREENSHOTS] = tmp_path_factory.getbasetemp() / "browser-screenshots"

    def make(**options: Any) -> BrowserContext:
        options.setdefault("viewport", DESKTOP)
        options.setdefault("color_scheme", "light")
        context = browser.new_context(base_url=live_server.url, **options)
        context.set_default_timeout(10_000)
        context.add_init_script(CSP_LISTENER)
        opened.append(context)
        return context

    yield make
    for context in opened:
        context.close()


@pytest.fixture
def page(new_context: NewContext) -> Page:
    """A page at desktop width in light mode, JavaScript on (the default reader)."""
    return new_context().new_page()
