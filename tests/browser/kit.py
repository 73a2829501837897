"""What the browser tests share: the live server, the browser's launch, axe-core.

* ``LiveServer``: the real ``fediblog`` command in a subprocess on 127.0.0.1, its
  working folder (database, keys) in a temporary directory, and ``cli()`` to run other
  ``fediblog`` commands against the same database while it serves.
* ``launch_chromium``: Debian's chromium through Playwright (no browser download).
* ``check_accessibility(page)``: axe-core on the page as it stands; fails on any
  serious or critical violation, naming each rule, its targets and its help URL.
* ``csp_violations(page)``: what the page's Content-Security-Policy refused, as seen
  by the browser (recorded by ``CSP_LISTENER``, which the context installs).

axe-core is injected with ``page.evaluate``: DevTools evaluates it outside the page's
CSP (``script-src 'none'``), so the pages are checked exactly as readers get them,
CSP in force; ``bypass_csp`` would have switched the policy off for the whole page.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import httpx
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, ViewportSize

from tests.processes import free_port, run_fediblog, stop

HERE = Path(__file__).resolve().parent
AXE_JS = HERE / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM = Path(os.environ.get("FEDIBLOG_CHROMIUM", "/usr/bin/chromium"))
# No sandbox: CI runs as root in a container. The rest keeps chromium from calling home.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
PHONE: ViewportSize = {"width": 390, "height": 844}
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
# Each page is checked at both widths, in both colour schemes.
VARIANTS: tuple[tuple[ViewportSize, Literal["light", "dark"]], ...] = (
    (PHONE, "light"),
    (PHONE, "dark"),
    (DESKTOP, "light"),
    (DESKTOP, "dark"),
)
# The ``new_context`` fixture: keyword arguments of Browser.new_context, base_url preset.
NewContext = Callable[..., BrowserContext]
FAILING_IMPACTS = ("serious", "critical")

# Runs before any of the page's own code, through DevTools (so CSP does not block it).
CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  const what = event.blockedURI || "inline";
  window.__cspViolations.push(event.violatedDirective + " blocked " + what);
});
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any FEDIBLOG_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDIBLOG_")}
    env.update(extra)
    return env


@dataclass
class LiveServer:
    """A ``fediblog`` process serving on 127.0.0.1; ``stop()`` ends it with SIGINT."""

    url: str
    workdir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path
    _stopped: bool = field(default=False, repr=False)

    @classmethod
    def start(
        cls, workdir: Path, argv: Sequence[str], port: int, env: Mapping[str, str]
    ) -> LiveServer:
        """Run ``fediblog *argv`` in ``workdir`` and return once it answers on ``port``."""
        log = workdir / "server.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "fediblog", *argv],
                cwd=workdir,
                env=dict(env),
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        server = cls(f"http://127.0.0.1:{port}", workdir, dict(env), process, log)
        deadline = time.monotonic() + 30
        while True:  # wait until it listens (bounded): start-up, not a test of timing
            try:
                httpx.get(server.url + "/", timeout=2)
                return server
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise AssertionError(f"fediblog did not start:\n{server.output()}") from None
                time.sleep(0.1)

    def cli(self, *args: str) -> str:
        """Run ``fediblog *args`` against this server's database; its output, or fail."""
        return run_fediblog(self.workdir, self.env, *args)

    def output(self) -> str:
        return self.log.read_text("utf-8", errors="replace")

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        stop(self.process)


def start_demo(workdir: Path) -> LiveServer:
    """``fediblog demo`` (three posts, a threaded conversation) on a free port.

    ``cli()`` reaches the demo's database: the same settings the demo chose for itself.
    """
    port = free_port()
    env = clean_env(
        FEDIBLOG_ALLOW_HTTP="1",
        FEDIBLOG_BASE_URL=f"http://127.0.0.1:{port}",
        FEDIBLOG_DATABASE=str(workdir / "data" / "demo.db"),
    )
    return LiveServer.start(workdir, ["demo", "--port", str(port)], port, env)


def launch_chromium(playwright: Playwright) -> Browser:
    if not CHROMIUM.is_file():
        raise AssertionError(
            f"no chromium at {CHROMIUM}: `apt-get install -y chromium` (or set"
            " FEDIBLOG_CHROMIUM), or leave the browser tests out with `pytest -m 'not browser'`"
        )
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))


@cache
def axe_source() -> str:
    """axe.min.js, installed from tests/browser/package-lock.json on first use.

    Under a lock: the suite's processes (pytest-xdist) may all want it at once, and
    `npm ci` first deletes node_modules, which another process may be reading."""
    with (HERE / ".npm-install.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not AXE_JS.is_file():
            npm = shutil.which("npm")
            assert npm, "axe-core needs npm: `apt-get install -y npm`, then rerun"
            subprocess.run(
                [npm, "ci", "--prefix", str(HERE), "--no-audit", "--no-fund"],
                check=True,
                capture_output=True,
                timeout=300,
            )
        return AXE_JS.read_text("utf-8")


class AccessibilityError(AssertionError):
    """axe-core found a serious or critical violation nobody has reported yet."""


class KnownViolations(AssertionError):
    """Only violations already reported (and expected, with ``xfail(strict=True)``)."""


def run_axe(page: Page) -> list[dict[str, Any]]:
    """axe-core's violations on the page: its default rules, plus WCAG 2.2's target-size
    (off by default, and what a phone reader's thumb meets first)."""
    if not page.evaluate("typeof window.axe === 'object'"):
        page.evaluate(axe_source())
    violations: list[dict[str, Any]] = page.evaluate(
        """async () => {
          const results = await axe.run(document, {
            resultTypes: ["violations"],
            rules: {"target-size": {enabled: true}},
          });
          return results.violations.map((v) => ({
            id: v.id, impact: v.impact, help: v.help, helpUrl: v.helpUrl,
            nodes: v.nodes.map((n) => ({target: n.target.join(" "), summary: n.failureSummary})),
          }));
        }"""
    )
    return violations


def describe(violations: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for violation in violations:
        lines.append(
            f"{violation['id']} ({violation['impact']}): {violation['help']}"
            f"\n  {violation['helpUrl']}"
        )
        for node in violation["nodes"][:5]:
            lines.append(f"    {node['target']}")
        if len(violation["nodes"]) > 5:
            lines.append(f"    … and {len(violation['nodes']) - 5} more")
    return "\n".join(lines)


def check_accessibility(page: Page, *, known: Collection[str] = ()) -> list[dict[str, Any]]:
    """Run axe-core on ``page``; fail on a serious or critical violation.

    Rule ids in ``known`` are violations already reported: if they are the only ones,
    ``KnownViolations`` is raised (mark the test ``xfail(strict=True,
    raises=KnownViolations)``, so it flips to a failure once they are fixed). Returns the
    milder violations (moderate, minor), which do not fail.
    """
    violations = run_axe(page)
    failing = [v for v in violations if v["impact"] in FAILING_IMPACTS]
    size = page.viewport_size or {"width": 0, "height": 0}
    dark = page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches")
    where = f"{page.url} at {size['width']}x{size['height']}, {'dark' if dark else 'light'}"
    if any(v["id"] not in known for v in failing):
        raise AccessibilityError(f"axe-core on {where}:\n{describe(failing)}")
    if failing:
        raise KnownViolations(f"known axe-core violations on {where}:\n{describe(failing)}")
    return [v for v in violations if v["impact"] not in FAILING_IMPACTS]


def csp_violations(page: Page) -> list[str]:
    """What the page's CSP refused since it loaded (needs ``CSP_LISTENER``)."""
    found: list[str] = page.evaluate("window.__cspViolations")
    return found
