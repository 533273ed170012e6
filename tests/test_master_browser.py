"""A master without a key (auth=0) and the web pages its operator opens (#16 item 7):
headless Chromium, a real master, pages on other origins.  A page on an origin listed
in origins= drives the API; any other page can neither read it nor change anything,
even with the requests a browser sends without asking first (no-cors, text/plain)."""

from __future__ import annotations

import json

from twisted.trial.unittest import TestCase

from tests.chromium import Page, open_page, page_server
from tests.test_master_api import Api, start_master

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

    def fill(self, panel: Page, master) -> None:
        panel.page = (PAGE % {"np": json.dumps(f"http://127.0.0.1:{master.port}/api/np/v1"),
                              "seed": json.dumps(master.base),
                              "url": json.dumps(SERVER)}).encode()

    async def test_a_listed_origin_drives_it_and_any_other_page_is_refused(self):
        listed, listed_port = await page_server(self)
        other, other_port = await page_server(self)
        master = await start_master(
            self, query=f"?log=debug&auth=0&origins=http://127.0.0.1:{listed_port}", key=None)
        for panel in (listed, other):
            self.fill(panel, master)
        api = Api(master.base, key=None)  # not a browser: no Origin

        refused = await open_page(self, other_port, other)
        self.assertEqual(refused, ["np-list:failed", "np-create:failed", "seed-list:failed",
                                   "seed-create:failed", "np-simple:opaque"])
        self.assertEqual((await api.ok("GET", "/instances"))["instances"], [])
        # each was refused by the master, not merely hidden by the browser
        await master.wait_for(r"GET /api/np/v1/instances 403")
        await master.wait_for(r"OPTIONS /api/np/v1/instances 403")
        await master.wait_for(r"POST /api/np/v1/instances 403")
        await master.wait_for(r"OPTIONS /api/v1/instances 403")

        allowed = await open_page(self, listed_port, listed)
        self.assertEqual(allowed[:4], ["np-list:200", "np-create:201", "seed-list:200",
                                       "seed-create:201"])
        instances = (await api.ok("GET", "/instances"))["instances"]
        self.assertEqual(len(instances), 3)  # the two creates, and the no-cors one
        self.assertEqual(sorted(i["alias"] or "" for i in instances),
                         ["", "from-a-page", "no-cors"])
