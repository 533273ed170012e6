"""What may reach the master's API from a browser (#16 item 7), in memory through the
master's own site and gate: the Host it is called by (DNS rebinding), the Origin of the
page calling it, and the CORS headers it answers with, in both dialects."""

from __future__ import annotations

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from nodepass.url import Address, MasterConfig
from tests.fakemaster import KEY, MemoryMaster

SERVER = "server://k@127.0.0.1:10101/127.0.0.1:8080"
PANEL = "http://panel.test:5173"


class Case(SynchronousTestCase):
    config = MasterConfig(auth=0)
    key: str | None = None

    def setUp(self):
        self.master = MemoryMaster(self, key=self.key, config=self.config)

    def call(self, method, path, body=None, dialect="seed", host=None, origin=None,
             headers=None, key="default", **kwargs):
        base = self.master.seed if dialect == "seed" else self.master.np
        sent = dict(headers or {})
        if host is not None:
            sent["Host"] = [host]
        if origin is not None:
            sent["Origin"] = [origin]
        return self.successResultOf(ensureDeferred(self.master.call(
            method, base + path, body, key=self.key if key == "default" else key,
            headers=sent, **kwargs)))

    def refused(self, status, code, fragment, method, path, dialect="seed", **kwargs):
        got, data, response = self.call(method, path, dialect=dialect, **kwargs)
        self.assertEqual(got, status, data)
        if dialect == "seed":
            self.assertEqual((data["success"], data["error"]["code"]), (False, code))
            self.assertIn(fragment, data["error"]["message"])
        else:
            self.assertEqual(data["error"], data["message"])
            self.assertIn(fragment, data["error"])
        return data, response

    def allow_origin(self, response):
        return response.headers.getRawHeaders("Access-Control-Allow-Origin")


class HostWithoutKey(Case):
    """auth=0 on 127.0.0.1: the listen address and the loopback names, nothing else."""

    def test_loopback_names_pass(self):
        for host in ("127.0.0.1:9090", "localhost:9090", "LOCALHOST.", "[::1]:9090",
                     "localhost"):
            code, data, _ = self.call("GET", "/instances", host=host)
            self.assertEqual((code, data["data"]), (200, {"instances": []}), host)

    def test_a_rebinding_name_is_misdirected_in_each_dialect(self):
        self.refused(421, "MISDIRECTED_REQUEST", "Host 'evil.test:9090' is not a name this "
                     "master answers to (allowed: 127.0.0.1, [::1], localhost; add names with "
                     "hosts=", "GET", "/instances", host="evil.test:9090")
        self.refused(421, "", "Misdirected request: Host 'evil.test:9090'", "GET",
                     "/instances", dialect="np", host="evil.test:9090")
        # a create under the wrong name changes nothing, whatever its body
        self.refused(421, "MISDIRECTED_REQUEST", "evil.test", "POST", "/instances",
                     body={"url": SERVER}, host="evil.test")
        self.refused(421, "", "evil.test", "POST", "/instances", body={"url": SERVER},
                     dialect="np", host="evil.test")
        for host in ("10.0.0.5:9090", "127.0.0.1.evil.test", "127.0.0.1:x", "[::1"):
            self.refused(421, "MISDIRECTED_REQUEST", "not a name", "GET", "/instances",
                         host=host)
        self.assertEqual((self.master.registry.instances, self.master.children.spawned),
                         ({}, []))

    def test_the_documentation_is_checked_too(self):
        self.refused(421, "MISDIRECTED_REQUEST", "evil.test", "GET", "/openapi.json",
                     host="evil.test")
        self.refused(421, "", "evil.test", "OPTIONS", "/instances", dialect="np",
                     host="evil.test")


class HostsGiven(Case):
    config = MasterConfig(auth=0, hosts=("api.example.com", "10.0.0.5"))

    def test_the_listed_names_pass_and_others_do_not(self):
        for host in ("api.example.com", "API.example.com:8443", "10.0.0.5:9090",
                     "127.0.0.1:9090"):
            self.assertEqual(self.call("GET", "/instances", host=host)[0], 200, host)
        self.refused(421, "MISDIRECTED_REQUEST", "(allowed: 10.0.0.5, 127.0.0.1, [::1], "
                     "api.example.com, localhost;", "GET", "/instances", host="example.com")


class HostOnEveryInterface(Case):
    config = MasterConfig(api=Address("0.0.0.0", 9090), auth=0, insecure=1)

    def test_any_address_and_localhost_pass_but_no_other_name(self):
        for host in ("10.1.2.3:9090", "[2001:db8::1]:9090", "localhost:9090", "0.0.0.0"):
            self.assertEqual(self.call("GET", "/instances", host=host)[0], 200, host)
        self.refused(421, "MISDIRECTED_REQUEST", "(allowed: localhost, or any IP address;",
                     "GET", "/instances", host="nas.home.arpa:9090")


class HostWithKey(Case):
    """With the key, a browser without it gains nothing from a rebound name: the Host is
    checked only when hosts= asks for it (proxies and panels name the master freely)."""

    config = MasterConfig()
    key = KEY

    def test_any_host_passes(self):
        self.assertEqual(self.call("GET", "/instances", host="evil.test")[0], 200)

    def test_hosts_turns_the_check_on(self):
        master = MemoryMaster(self, config=MasterConfig(hosts=("api.example.com",)))
        code, data, _ = self.successResultOf(ensureDeferred(master.call(
            "GET", master.seed + "/instances", headers={"Host": ["evil.test"]})))
        self.assertEqual((code, data["error"]["code"]), (421, "MISDIRECTED_REQUEST"))
        code, _, _ = self.successResultOf(ensureDeferred(master.call(
            "GET", master.seed + "/instances", headers={"Host": ["api.example.com"]})))
        self.assertEqual(code, 200)


class OriginWithoutKey(Case):
    """auth=0 without origins=: no web page of another origin may call."""

    def test_another_origin_is_forbidden_before_anything_happens(self):
        for dialect, code, fragment in (
                ("seed", "ORIGIN_NOT_ALLOWED", "requests from the web page at "
                                               "'http://evil.test' are not allowed (allowed "
                                               "origins: none; add it with origins="),
                ("np", "", "Forbidden: requests from the web page at 'http://evil.test'")):
            _, response = self.refused(403, code, fragment, "GET", "/instances",
                                       dialect=dialect, origin="http://evil.test")
            self.assertIsNone(self.allow_origin(response))
        # a page's form post or no-cors fetch: no preflight, text/plain, read as JSON by
        # the NodePass dialect -- refused before its body is looked at
        self.refused(403, "", "Forbidden", "POST", "/instances", dialect="np",
                     origin="http://evil.test", raw=b'{"url": "%s"}' % SERVER.encode(),
                     headers={"Content-Type": ["text/plain"]})
        _, response = self.refused(403, "ORIGIN_NOT_ALLOWED", "evil.test", "OPTIONS",
                                   "/instances", origin="http://evil.test", headers={
                                       "Access-Control-Request-Method": ["POST"]})
        self.assertIsNone(self.allow_origin(response))
        self.refused(403, "ORIGIN_NOT_ALLOWED", "'null'", "GET", "/instances", origin="null")
        self.assertEqual((self.master.registry.instances, self.master.children.spawned),
                         ({}, []))

    def test_no_origin_and_the_masters_own_origin_pass_without_cors_headers(self):
        for port, origin in ((10101, None), (10102, "http://127.0.0.1:9090")):
            code, _, response = self.call("POST", "/instances", {
                "url": SERVER.replace("10101", str(port))}, origin=origin)
            self.assertEqual(code, 201, origin)
            self.assertIsNone(self.allow_origin(response))
            self.assertEqual(response.headers.getRawHeaders("Vary"), ["Origin"])
        # the master's own origin under another port or scheme is another origin
        self.refused(403, "ORIGIN_NOT_ALLOWED", "", "GET", "/instances",
                     origin="http://127.0.0.1:9091")
        self.refused(403, "ORIGIN_NOT_ALLOWED", "", "GET", "/instances",
                     origin="https://127.0.0.1:9090")


class OriginsGiven(Case):
    config = MasterConfig(auth=0, origins=(PANEL,))

    def test_a_listed_origin_gets_cors_headers_in_each_dialect(self):
        for dialect in ("seed", "np"):
            code, _, response = self.call("OPTIONS", "/instances", dialect=dialect,
                                          origin=PANEL, headers={
                                              "Access-Control-Request-Method": ["PATCH"],
                                              "Access-Control-Request-Headers": ["content-type"]})
            self.assertEqual(code, 204)
            headers = response.headers
            self.assertEqual(self.allow_origin(response), [PANEL])
            self.assertEqual(headers.getRawHeaders("Vary"), ["Origin"])
            self.assertIn("PATCH", headers.getRawHeaders("Access-Control-Allow-Methods")[0])
            self.assertIn("Content-Type", headers.getRawHeaders(
                "Access-Control-Allow-Headers")[0])
            code, _, response = self.call("GET", "/instances", dialect=dialect, origin=PANEL)
            self.assertEqual((code, self.allow_origin(response)), (200, [PANEL]))
        self.refused(403, "ORIGIN_NOT_ALLOWED", f"(allowed origins: {PANEL};", "GET",
                     "/instances", origin="http://panel.test:5174")

    def test_an_error_carries_them_too_so_the_panel_can_read_it(self):
        _, response = self.refused(404, "INSTANCE_NOT_FOUND", "", "GET", "/instances/ins_x",
                                   origin=PANEL)
        self.assertEqual(self.allow_origin(response), [PANEL])


class OriginWithKey(Case):
    """With the key, CORS stays open to every page (panels send the key), unless
    origins= narrows it."""

    config = MasterConfig()
    key = KEY

    def test_every_origin_gets_the_star(self):
        for dialect in ("seed", "np"):
            code, _, response = self.call("GET", "/instances", dialect=dialect,
                                          origin="http://anywhere.test")
            self.assertEqual((code, self.allow_origin(response)), (200, ["*"]))
        code, _, response = self.call("GET", "/instances", dialect="np", key=None,
                                      origin="http://anywhere.test")
        self.assertEqual((code, self.allow_origin(response)), (401, ["*"]))

    def test_origins_narrows_it(self):
        master = MemoryMaster(self, config=MasterConfig(origins=(PANEL,)))
        code, data, response = self.successResultOf(ensureDeferred(master.call(
            "GET", master.seed + "/instances", headers={"Origin": ["http://evil.test"]})))
        self.assertEqual((code, data["error"]["code"]), (403, "ORIGIN_NOT_ALLOWED"))
        code, data, response = self.successResultOf(ensureDeferred(master.call(
            "GET", master.seed + "/instances", headers={"Origin": [PANEL]})))
        self.assertEqual((code, self.allow_origin(response)), (200, [PANEL]))
