"""Headless Chromium for the tests of pages the master serves or is called from."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.integration import listen

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # no name resolves but loopback: a page that needed a CDN would not render
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--virtual-time-budget=10000",
]


def chromium(case: TestCase) -> str:
    """The Chromium binary, or the test is skipped with how to get it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        case.skipTest("chromium is not installed: apt-get install chromium")
    return found


class Page(Resource):
    """A page on an origin of its own: GET serves ``page``, its script POSTs what it
    found to ``/report``, which fires ``reported`` with the JSON."""

    isLeaf = True

    def __init__(self, page: bytes = b"") -> None:
        super().__init__()
        self.page = page
        self.reported: Deferred[Any] = Deferred()

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return self.page

    def render_POST(self, request: Any) -> bytes:
        if not self.reported.called:
            self.reported.callback(json.loads(request.content.read()))
        return b""


class _Browser(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.output = b""

    def errReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-4000:]

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


async def page_server(case: TestCase, page: bytes = b"") -> tuple[Page, int]:
    """A :class:`Page` served on 127.0.0.1 on a port of its own: another origin."""
    served = Page(page)
    site = Site(served)
    site.noisy = False
    return served, await listen(case, site)


async def open_page(case: TestCase, port: int, page: Page, timeout: float = 45) -> Any:
    """Open the page at ``port`` in headless Chromium; return what its script reported."""
    binary = chromium(case)
    profile = tempfile.mkdtemp()
    case.addCleanup(shutil.rmtree, profile, True)
    browser = _Browser()
    flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--virtual-time-budget")]
    process = reactor.spawnProcess(browser, binary, [
        binary, *flags, f"--user-data-dir={profile}", f"http://127.0.0.1:{port}/"], env=None)

    async def close_browser() -> None:
        if not browser.ended.called:
            process.signalProcess(signal.SIGKILL)
            await browser.ended

    case.addCleanup(close_browser)
    try:
        return await page.reported.addTimeout(timeout, reactor)
    except Exception:
        raise AssertionError(f"the page reported nothing; chromium said:\n"
                             f"{browser.output.decode(errors='replace')}") from None
