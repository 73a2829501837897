"""The reader's pages in a real chromium: axe-core finds no serious or critical problem at
phone and desktop widths, in light and dark mode, with the pages' CSP in force; and a
reader without JavaScript leaves a reply through the form and, once approved, sees it.

The server is ``fediblog demo`` (see conftest.py): its newest post carries a threaded
conversation (responses 1 to 5; 3 is Carol's, under Bob's, under Alice's).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from playwright.sync_api import Page, Response

from tests.browser.kit import (
    PHONE,
    VARIANTS,
    AccessibilityError,
    KnownViolations,
    LiveServer,
    NewContext,
    check_accessibility,
    csp_violations,
)

THREAD = "/posts/why-comments-should-federate"
PAGES = {
    "index": ("/", 200),
    "post with threaded responses": (THREAD, 200),
    "post with code, table and quote": ("/posts/a-short-tour-of-markdown", 200),
    "post with a local comment": ("/posts/hello-fediverse", 200),
    "response permalink": (THREAD + "/comments/3", 200),
    "reply page": (THREAD + "/reply/3", 200),
    "about": ("/about", 200),
    "tags": ("/tags", 200),
    "tag": ("/tags/fediverse", 200),
    "comment held message": ("/posts/hello-fediverse/thanks", 200),
    "archive": ("/archive", 200),
    "not found": ("/posts/no-such-post", 404),
}
# Pages reached by a click, where the address depends on the demo's dates.
FOLLOW = {"archive month": ("/archive", "main a[href^='/archive/']")}
# Each page is loaded once, then seen at both widths in both colour schemes: resizing
# and emulating prefers-color-scheme re-lay the page out without reloading it.

# Violations reported to the engineer fixing the reader pages' accessibility
# (templates, style.css): page -> rule ids. Each such case is xfail(strict=True): it
# fails again the day the violation is gone, and is then removed from here.
KNOWN: dict[str, frozenset[str]] = {
    # e.g. "index": frozenset({"link-in-text-block"}),
}


def _cases() -> list[Any]:
    cases = []
    for name in [*PAGES, *FOLLOW]:
        known = KNOWN.get(name, frozenset())
        reason = f"reported, being fixed: {', '.join(sorted(known))}"
        marks = [pytest.mark.xfail(strict=True, raises=KnownViolations, reason=reason)]
        cases.append(pytest.param(name, known, marks=marks if known else [], id=name))
    return cases


@pytest.mark.parametrize(("name", "known"), _cases())
def test_public_page_has_no_serious_accessibility_violation(
    page: Page, name: str, known: frozenset[str]
) -> None:
    response: Response | None
    if name in FOLLOW:
        start, link = FOLLOW[name]
        page.goto(start)
        with page.expect_navigation() as navigation:
            page.locator(link).first.click()
        response, status = navigation.value, 200
    else:
        path, status = PAGES[name]
        response = page.goto(path)
    assert response is not None
    assert response.status == status
    assert csp_violations(page) == [], "the page breaks its own Content-Security-Policy"
    found: list[str] = []
    only_known = True
    for viewport, scheme in VARIANTS:
        page.set_viewport_size(viewport)
        page.emulate_media(color_scheme=scheme)
        assert page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches") == (
            scheme == "dark"
        )
        try:
            check_accessibility(page, known=known)
        except KnownViolations as violations:
            found.append(str(violations))
        except AccessibilityError as violations:
            found.append(str(violations))
            only_known = False
    if found:
        raise (KnownViolations if only_known else AccessibilityError)("\n\n".join(found))


def test_reader_replies_through_the_form_without_javascript(
    new_context: NewContext, live_server: LiveServer
) -> None:
    page = new_context(viewport=PHONE, java_script_enabled=False).new_page()
    page.goto(THREAD)
    carol = page.locator("#comment-3")
    assert "replying from Misskey" in carol.locator(".e-content").first.inner_text()
    carol.get_by_role("link", name="Reply").first.click()
    assert page.url.endswith(THREAD + "/reply/3#reply")

    text = "Threads across servers <b>and</b> a form for the rest of us: lovely."
    form = page.locator("form.local-comment")
    form.get_by_role("textbox", name="Name").fill("Rosa Reader")
    form.get_by_role("textbox", name="Email").fill("rosa@reader.example")
    form.get_by_role("textbox", name="Comment").fill(text)
    form.get_by_role("button", name="Post comment").click()

    assert page.url.endswith("/posts/why-comments-should-federate/thanks")
    assert page.get_by_role("heading", level=1).inner_text() == "Thank you"
    assert "waiting for approval" in page.locator("main").inner_text()
    page.goto(THREAD)
    assert text not in page.locator("main").inner_text()  # held: nobody sees it yet

    held = [
        line
        for line in live_server.cli("comments", "list", "--pending").splitlines()
        if "Rosa Reader" in line
    ]
    assert len(held) == 1, held
    live_server.cli("comments", "approve", held[0].split()[0])

    # The server notices another process's commit within a second (Store.version_max_age).
    reply = carol.locator("ol.children .e-content", has_text="Threads across servers")
    deadline = time.monotonic() + 10
    while not reply.count() and time.monotonic() < deadline:
        time.sleep(0.2)
        page.reload()
    assert reply.inner_text() == text  # under Carol's response, as plain text
    assert page.locator("#responses-title").inner_text().startswith("6 Responses")


def test_check_accessibility_fails_naming_rule_target_and_help(page: Page) -> None:
    page.goto("/about")
    page.evaluate(
        "document.querySelector('main').insertAdjacentHTML('beforeend', "
        "'<p><button id=\"mute\"></button></p>')"
    )
    with pytest.raises(AccessibilityError) as failure:
        check_accessibility(page)
    report = str(failure.value)
    assert "button-name (critical)" in report
    assert "#mute" in report
    assert "https://dequeuniversity.com/rules/axe/" in report
    with pytest.raises(KnownViolations):
        check_accessibility(page, known={"button-name"})


def test_the_blogs_csp_is_in_force_and_its_refusals_are_seen(page: Page) -> None:
    page.goto("/about")
    assert csp_violations(page) == []
    # img-src 'self': the browser refuses before any request leaves it.
    page.evaluate(
        "document.body.insertAdjacentHTML('beforeend', "
        '\'<img alt="" src="https://elsewhere.example/tracker.png">\')'
    )
    page.wait_for_function("window.__cspViolations.length > 0")
    assert csp_violations(page) == ["img-src blocked https://elsewhere.example/tracker.png"]
