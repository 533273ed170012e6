"""A master without a key (auth=0) and the web pages its operator opens (#16 item 7):
headless Chromium, a real master, pages on other origins.  A page on an origin listed
in origins= drives the API; any other page can neither read it nor change anything,
even with the requests a browser sends without asking first (no-cors, text/plain)."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.integration import listen
from tests.test_master_api import Api, start_master
from tests.test_master_docs import CHROMIUM_FLAGS
from tests.test_np_browser import _Browser, _Panel

SERVER = "server://k@127.0.0.1:0/127.0.0.1:0"

PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>page</title></head>
<body><script>
const np = %(np)s, seed = %(seed)s, url = %(url)s;
async function attempt(name, request) {
  try {
    const res = await request();
    return name + ":" + (res.type === "opaque" ? "opaque" : res.status);
  } catch (e) {
    return name + ":failed";
  }
}
async function run() {
  const json = {"Content-Type": "application/json"};
  return [
    await attempt("np-list", () => fetch(np + "/instances", {cache: "no-store"})),
    await attempt("np-create", () => fetch(np + "/instances", {method: "POST", headers: json,
      body: JSON.stringify({url: url, alias: "from-a-page"})})),
    await attempt("seed-list", () => fetch(seed + "/instances", {cache: "no-store"})),
    await attempt("seed-create", () => fetch(seed + "/instances", {method: "POST",
      headers: json, body: JSON.stringify({url: url})})),
    // sent without a preflight; the NodePass dialect reads any body as JSON
    await attempt("np-simple", () => fetch(np + "/instances", {method: "POST",
      mode: "no-cors", headers: {"Content-Type": "text/plain"},
      body: JSON.stringify({url: url, alias: "no-cors"})})),
  ];
}
run().then(r => report(r), e => report(["error:" + e]));
function report(result) {
  fetch("/report", {method: "POST", body: JSON.stringify(result)});
}
</script></body></html>
"""


class KeylessMaster(TestCase):
    timeout = 120

    async def page(self) -> tuple[_Panel, int]:
        """A page server on a port of its own (another origin); its page is filled in
        once the master's address is known."""
        panel = _Panel(b"")
        site = Site(panel)
        site.noisy = False
        port = await listen(self, site)  # another port: another origin
        return panel, port

    def fill(self, panel: _Panel, master) -> None:
        panel.page = (PAGE % {"np": json.dumps(f"http://127.0.0.1:{master.port}/api/np/v1"),
                              "seed": json.dumps(master.base),
                              "url": json.dumps(SERVER)}).encode()

    async def browse(self, port: int, panel: _Panel) -> list[str]:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            self.skipTest("chromium is not installed: apt-get install chromium")
        profile = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, profile, True)
        browser = _Browser()
        flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--virtual-time-budget")]
        process = reactor.spawnProcess(browser, chromium, [
            chromium, *flags, f"--user-data-dir={profile}", f"http://127.0.0.1:{port}/"],
            env=None)

        async def close_browser():
            if not browser.ended.called:
                process.signalProcess(signal.SIGKILL)
                await browser.ended

        self.addCleanup(close_browser)
        try:
            return await panel.reported.addTimeout(45, reactor)
        except Exception:
            raise AssertionError(f"the page reported nothing; chromium said:\n"
                                 f"{browser.output.decode(errors='replace')}") from None

    async def test_a_listed_origin_drives_it_and_any_other_page_is_refused(self):
        listed, listed_port = await self.page()
        other, other_port = await self.page()
        master = await start_master(
            self, query=f"?log=debug&auth=0&origins=http://127.0.0.1:{listed_port}", key=None)
        for panel in (listed, other):
            self.fill(panel, master)
        api = Api(master.base, key=None)  # not a browser: no Origin

        refused = await self.browse(other_port, other)
        self.assertEqual(refused, ["np-list:failed", "np-create:failed", "seed-list:failed",
                                   "seed-create:failed", "np-simple:opaque"])
        self.assertEqual((await api.ok("GET", "/instances"))["instances"], [])
        # each was refused by the master, not merely hidden by the browser
        await master.wait_for(r"GET /api/np/v1/instances 403")
        await master.wait_for(r"OPTIONS /api/np/v1/instances 403")
        await master.wait_for(r"POST /api/np/v1/instances 403")
        await master.wait_for(r"OPTIONS /api/v1/instances 403")

        allowed = await self.browse(listed_port, listed)
        self.assertEqual(allowed[:4], ["np-list:200", "np-create:201", "seed-list:200",
                                       "seed-create:201"])
        instances = (await api.ok("GET", "/instances"))["instances"]
        self.assertEqual(len(instances), 3)  # the two creates, and the no-cors one
        self.assertEqual(sorted(i["alias"] or "" for i in instances),
                         ["", "from-a-page", "no-cors"])
