"""The dashboard's files as the master serves them (in memory, through its own site),
and the recent log lines the dashboard reads."""

from __future__ import annotations

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from nodepass.master.dashboard import ASSETS
from nodepass.url import MasterConfig
from tests.fakemaster import KEY, MemoryMaster


class Files(SynchronousTestCase):
    def get(self, master, url, key=None, method="GET"):
        return self.successResultOf(ensureDeferred(master.call(method, url, key=key)))

    def test_the_page_is_public_under_both_spellings_with_a_strict_policy(self):
        master = MemoryMaster(self)
        for path in ("/api/", "/api/ui/"):
            code, page, response = self.get(master, master.origin + path)
            self.assertEqual((code, response.headers.getRawHeaders("Content-Type")),
                             (200, ["text/html; charset=utf-8"]), path)
            self.assertIn('<base href="/api/ui/">', page)
            self.assertIn('<meta name="nodepass-api" content="/api/v1">', page)
            self.assertIn('<meta name="nodepass-auth" content="1">', page)
            self.assertIn('<script type="module" src="app.js"></script>', page)
            self.assertNotIn("<script>", page)  # no inline script
            policy = response.headers.getRawHeaders("Content-Security-Policy")[0]
            for rule in ("default-src 'none'", "script-src 'self'", "connect-src 'self'",
                         "frame-ancestors 'none'"):
                self.assertIn(rule, policy)
            self.assertEqual(response.headers.getRawHeaders("X-Content-Type-Options"),
                             ["nosniff"])

    def test_each_file_with_its_type_and_nothing_else(self):
        master = MemoryMaster(self)
        for name, content_type in ASSETS.items():
            code, body, response = self.get(master, f"{master.origin}/api/ui/{name}")
            self.assertEqual((code, response.headers.getRawHeaders("Content-Type")),
                             (200, [content_type]), name)
            self.assertTrue(body)
        code, data, _ = self.get(master, f"{master.origin}/api/ui/secret.txt")
        self.assertEqual((code, data["error"]["code"]), (401, "UNAUTHORIZED"))  # not public
        code, data, _ = self.get(master, f"{master.origin}/api/ui/secret.txt", key=KEY)
        self.assertEqual((code, data["error"]["code"]), (404, "NOT_FOUND"))
        code, data, response = self.get(master, f"{master.origin}/api/", method="POST")
        self.assertEqual((code, data["error"]["code"]), (405, "METHOD_NOT_ALLOWED"))
        self.assertEqual(response.headers.getRawHeaders("Allow"), ["GET, HEAD"])

    def test_a_keyless_master_tells_its_page_and_another_prefix_moves_it(self):
        master = MemoryMaster(self, key=None, config=MasterConfig(auth=0, prefix="/admin"))
        code, page, _ = self.get(master, f"{master.origin}/admin/")
        self.assertEqual(code, 200)
        self.assertIn('<meta name="nodepass-auth" content="0">', page)
        self.assertIn('<meta name="nodepass-api" content="/admin/v1">', page)
        self.assertIn('<base href="/admin/ui/">', page)


class RecentLogs(SynchronousTestCase):
    def setUp(self):
        self.master = MemoryMaster(self)

    def call(self, method, path, body=None):
        return self.successResultOf(ensureDeferred(self.master.call(
            method, self.master.seed + path, body)))

    def test_the_last_lines_of_an_instance(self):
        code, created, _ = self.call("POST", "/instances", {
            "url": "server://k@127.0.0.1:0/127.0.0.1:0"})
        instance_id = created["data"]["id"]
        for n in range(250):
            self.master.children.say(instance_id, f"line {n}", "WARN" if n % 2 else "INFO")
        code, envelope, _ = self.call("GET", f"/instances/{instance_id}/logs")
        lines = envelope["data"]["logs"]
        self.assertEqual(len(lines), 200)  # the last 200 are kept
        self.assertEqual([line["message"] for line in lines[-2:]], ["line 248", "line 249"])
        self.assertEqual((lines[-1]["level"], lines[-2]["level"]), ("warn", "info"))
        self.assertRegex(lines[-1]["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        code, envelope, _ = self.call("GET", f"/instances/{instance_id}/logs?limit=3")
        self.assertEqual([line["message"] for line in envelope["data"]["logs"]],
                         ["line 247", "line 248", "line 249"])
        code, envelope, _ = self.call("GET", f"/instances/{instance_id}/logs?limit=201")
        self.assertEqual((code, envelope["error"]["code"]), (400, "INVALID_REQUEST"))
        self.call("DELETE", f"/instances/{instance_id}")
        code, envelope, _ = self.call("GET", f"/instances/{instance_id}/logs")
        self.assertEqual(code, 404)
