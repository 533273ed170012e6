"""A browser panel on another origin drives the NodePass dialect, as NodePanel does:
fetch with the key (CORS preflight included), PATCH, and the event stream read through
fetch with Cache-Control.  Headless Chromium, real master, every wait bounded."""

from __future__ import annotations

import json

from twisted.trial.unittest import TestCase

from tests.chromium import chromium, open_page, page_server
from tests.test_master_api import KEY, start_master
from tests.test_np_api import NpApi, np_base, server_url

PANEL = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>panel</title></head>
<body><p id="out">working</p><script>
const base = %(base)s, key = %(key)s;
async function readEvents(wanted) {
  const ctl = new AbortController();
  const res = await fetch(base + "/events", {signal: ctl.signal, cache: "no-store",
    headers: {"X-API-Key": key, "Accept": "text/event-stream", "Cache-Control": "no-cache"}});
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let text = "", events = [];
  while (events.length < wanted) {
    const {value, done} = await reader.read();
    if (done) break;
    text += decoder.decode(value, {stream: true});
    const blocks = text.split("\\n\\n");
    text = blocks.pop();
    for (const block of blocks) {
      const lines = block.split("\\n");
      const name = lines.find(l => l.startsWith("event: "));
      const data = lines.find(l => l.startsWith("data: "));
      if (name === "event: instance" && data) events.push(JSON.parse(data.slice(6)));
    }
  }
  ctl.abort();
  return {type: res.headers.get("Content-Type"), events: events.map(e => e.type + ":" +
          e.instance.id)};
}
async function run() {
  const headers = {"X-API-Key": key, "Content-Type": "application/json"};
  const list = await (await fetch(base + "/instances", {headers, cache: "no-store"})).json();
  const server = list.find(r => r.type === "server");
  const patched = await fetch(base + "/instances/" + server.id, {method: "PATCH", headers,
    body: JSON.stringify({alias: "from-the-browser", meta: {tags: {by: "panel"}}})});
  const after = await patched.json();
  const stream = await readEvents(list.length);
  const anonymous = await fetch(base + "/instances");
  return {ids: list.map(r => r.id), patch: patched.status, alias: after.alias,
          tags: after.meta.tags, stream, anonymous: anonymous.status};
}
run().then(r => report(r), e => report({error: String(e)}));
function report(result) {
  document.getElementById("out").textContent = JSON.stringify(result);
  fetch("/report", {method: "POST", body: JSON.stringify(result)});
}
</script></body></html>
"""


class BrowserPanel(TestCase):
    timeout = 90

    async def test_a_page_on_another_origin_lists_patches_and_follows_events(self):
        chromium(self)
        master = await start_master(self, query="?log=debug")
        np = NpApi(np_base(master))
        created = await np.ok("POST", "/instances", {"url": server_url()}, 201)
        panel, origin = await page_server(  # another port: another origin
            self, (PANEL % {"base": json.dumps(np.base), "key": json.dumps(KEY)}).encode())
        result = await open_page(self, origin, panel)
        self.assertNotIn("error", result, result)
        self.assertEqual(result["ids"], ["********", created["id"]])
        self.assertEqual((result["patch"], result["alias"], result["tags"]),
                         (200, "from-the-browser", {"by": "panel"}))
        self.assertEqual(result["stream"]["type"], "text/event-stream")
        self.assertEqual(result["stream"]["events"],
                         ["initial:********", f"initial:{created['id']}"])
        self.assertEqual(result["anonymous"], 401)  # a page without the key gets nothing
        stored = await np.ok("GET", f"/instances/{created['id']}")
        self.assertEqual(stored["alias"], "from-the-browser")
        # the browser asked before it PATCHed (and before each request with the key)
        await master.wait_for(rf"OPTIONS /api/np/v1/instances/{created['id']} 204")
        await master.wait_for(r"OPTIONS /api/np/v1/events 204")
