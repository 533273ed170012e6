"""The dashboard in a real headless Chromium (Selenium and Debian's chromium-driver),
against a real master on 127.0.0.1 with real instances.

Selenium's API blocks, so each browser scenario runs in a thread of its own while the
reactor runs the master's process and the API client; the scenario reaches the
reactor with ``blockingCallFromThread``.  Every wait is bounded (WebDriverWait).  The
browser resolves no name but loopback, so a page that needed another host fails.

Screenshots of each main view go to the test's temporary directory; with
NODEPASS_SCREENSHOTS=docs/dashboard they are also copied there (that is how the ones
in docs/ are made: ``NODEPASS_SCREENSHOTS=docs/dashboard python -m twisted.trial
tests.test_dashboard``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import TestCase

from tests.integration import Echo, listen
from tests.procs import REPO
from tests.test_master_api import KEY, Api, start_master

WAIT = 20  # seconds any one thing may take to show
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--window-size=1400,1100",
    # no name resolves but loopback: a page that needed another host would fail
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
HOSTILE_ALIAS = '<img src=x onerror="document.title=\'owned\'">'


def browser(case: TestCase) -> Any:
    """A headless Chromium driven by Selenium, quit at the end of the test; the test is
    skipped, saying how to get them, when Selenium or the driver is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        case.skipTest("selenium is not installed: pip install '.[test]'")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        case.skipTest("chromium and its driver are not installed: "
                      "apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    case.addCleanup(driver.quit)
    return driver


def screenshot(case: TestCase, driver: Any, name: str) -> None:
    """Keep a picture of the page: in the test's directory, and where
    NODEPASS_SCREENSHOTS says (the documentation's)."""
    folder = Path(case.mktemp())
    folder.mkdir(parents=True, exist_ok=True)
    picture = folder / f"{name}.png"
    driver.save_screenshot(str(picture))
    wanted = os.environ.get("NODEPASS_SCREENSHOTS")
    if wanted:
        target = REPO / wanted  # trial runs in its own directory: relative to the checkout
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(picture, target / f"{name}.png")


class Page:
    """The dashboard as a user meets it: what is shown, what can be clicked."""

    def __init__(self, driver: Any, origin: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.origin, self.by = driver, origin, By
        self.wait = WebDriverWait(driver, WAIT)

    def find(self, element_id: str) -> Any:
        return self.driver.find_element(self.by.ID, element_id)

    def until(self, what, message: str) -> Any:
        return self.wait.until(lambda d: what(), message=message)

    def text(self, element_id: str) -> str:
        return self.find(element_id).text

    def row(self, instance_id: str) -> Any:
        rows = self.driver.find_elements(self.by.CSS_SELECTOR, f'tr[data-id="{instance_id}"]')
        return rows[0] if rows and rows[0].is_displayed() else None

    def shown_ids(self) -> list[str]:
        return [tr.get_attribute("data-id") for tr in
                self.driver.find_elements(self.by.CSS_SELECTOR, "#instances-body tr")
                if tr.is_displayed()]

    def status_of(self, instance_id: str) -> str:
        row = self.row(instance_id)
        return row.find_element(self.by.CSS_SELECTOR, ".status").text if row else ""

    def login(self, key: str) -> None:
        field = self.find("key-input")
        field.clear()
        field.send_keys(key)
        self.driver.find_element(self.by.CSS_SELECTOR, "#login-form button").click()

    def console(self) -> list[dict]:
        return self.driver.get_log("browser")


def call(coroutine_function, *args) -> Any:
    """Run a coroutine on the reactor from a scenario's thread; return its result."""
    return blockingCallFromThread(reactor, lambda: ensureDeferred(coroutine_function(*args)))


class Dashboard(TestCase):
    timeout = 120

    async def test_a_session_from_the_key_to_a_deleted_tunnel(self):
        master = await start_master(self)
        api = Api(master.base)
        driver = await deferToThread(browser, self)
        origin = f"http://127.0.0.1:{master.port}"
        await deferToThread(self.session, Page(driver, origin), api, master)

    def session(self, page: Page, api: Api, master) -> None:
        by, driver = page.by, page.driver
        driver.get(f"{page.origin}/api/")
        page.until(lambda: page.find("login").is_displayed(), "the key is asked for")
        screenshot(self, driver, "login")

        # a wrong key: a clear answer, still the prompt
        page.login("not-the-key")
        page.until(lambda: "not this master's API key" in page.text("login-error"),
                   "a wrong key is said to be wrong")
        self.assertTrue(page.find("login").is_displayed())
        page.login(KEY)
        page.until(lambda: page.find("overview").is_displayed(), "the overview opens")
        self.assertNotIn(KEY, driver.current_url)  # the key is never in a URL
        self.assertEqual(driver.execute_script(
            "return sessionStorage.getItem('nodepass-api-key')"), KEY)
        page.until(lambda: page.find("live").text == "live", "the event stream is live")

        # created by another client: appears without a reload
        edge = call(api.ok, "POST", "/instances", {
            "url": "server://k@127.0.0.1:0/127.0.0.1:0", "alias": "edge",
            "tags": {"site": "paris"}}, 201)
        hostile = call(api.ok, "POST", "/instances", {
            "url": "server://k@127.0.0.1:0/127.0.0.1:0", "alias": HOSTILE_ALIAS,
            "tags": {"site": "lyon"}}, 201)
        page.until(lambda: page.row(edge["id"]) and page.row(hostile["id"]),
                   "instances made through the API appear")
        page.until(lambda: page.status_of(edge["id"]) == "running", "its status shows")

        # an alias made of markup is shown as those characters, and runs nothing
        cell = page.row(hostile["id"]).find_element(by.CSS_SELECTOR, "button.link")
        self.assertEqual(cell.text, HOSTILE_ALIAS)
        self.assertEqual(driver.find_elements(by.CSS_SELECTOR, "#instances img"), [])
        self.assertEqual(driver.title, "nodepass")

        # filters: by tag, by status, by text
        from selenium.webdriver.support.ui import Select

        Select(page.find("filter-tag")).select_by_value("site=paris")
        page.until(lambda: page.shown_ids() == [edge["id"]], "the tag filter keeps edge only")
        Select(page.find("filter-tag")).select_by_value("")
        page.find("filter-text").send_keys("EDGE")
        page.until(lambda: page.shown_ids() == [edge["id"]], "the search finds edge")
        page.find("filter-text").clear()  # (clear() fires no input event: one is sent)
        driver.execute_script("document.getElementById('filter-text')"
                              ".dispatchEvent(new Event('input'))")
        page.until(lambda: len(page.shown_ids()) == 2, "no filter: both")
        screenshot(self, driver, "overview")

        # the create form: a bad value gets the API's own message, a good one a tunnel
        page.find("new-button").click()
        form = page.find("create-form")
        form.find_element(by.NAME, "tunnel").send_keys("127.0.0.1:0")
        form.find_element(by.NAME, "targets").send_keys("127.0.0.1:0")
        form.find_element(by.NAME, "key").send_keys("s3cret")
        form.find_element(by.NAME, "rate").send_keys("fast")
        form.find_element(by.NAME, "alias").send_keys("made-in-the-form")
        self.assertEqual(page.text("create-preview"),
                         "server://****@127.0.0.1:0/127.0.0.1:0?rate=fast")
        screenshot(self, driver, "create")
        page.find("create-submit").click()
        page.until(lambda: "bad value 'fast' for 'rate'" in page.text("create-error"),
                   "the API's message for a bad value shows in the form")
        rate = form.find_element(by.NAME, "rate")
        rate.clear()
        rate.send_keys("10")
        Select(form.find_element(by.NAME, "type")).select_by_visible_text("HTTP/2")
        form.find_element(by.NAME, "path").send_keys("/t")
        page.until(lambda: page.text("create-preview").endswith("?type=3&path=%2Ft&rate=10"),
                   "the transport and its path go in the URL")
        page.find("create-submit").click()
        page.until(lambda: page.find("detail").is_displayed()
                   and page.text("detail-title") == "made-in-the-form",
                   "the new tunnel's page opens")
        made = driver.current_url.rsplit("/", 1)[1]
        self.assertEqual(call(api.ok, "GET", f"/instances/{made}")["url"],
                         "server://s3cret@127.0.0.1:0/127.0.0.1:0?log=info&tls=0&rate=10&type=3"
                         "&path=/t")
        page.until(lambda: "tunnel listening on 127.0.0.1:" in page.text("logs"),
                   "its log lines show")

        # stop and start: the status follows
        def status() -> str:
            return page.find("detail-fields").find_element(
                by.CSS_SELECTOR, '[data-field="status"]').text

        page.find("detail-actions").find_element(by.CSS_SELECTOR, '[data-action="stop"]').click()
        page.until(lambda: status() == "stopped", "stop shows stopped")
        self.assertEqual(call(api.ok, "GET", f"/instances/{made}")["status"], "stopped")
        page.find("detail-actions").find_element(
            by.CSS_SELECTOR, '[data-action="start"]').click()
        page.until(lambda: status() == "running", "start shows running")
        screenshot(self, driver, "detail")

        # delete, confirmed in a dialog
        page.find("detail-actions").find_element(
            by.CSS_SELECTOR, '[data-action="delete"]').click()
        page.until(lambda: page.find("confirm").is_displayed(), "delete asks first")
        page.find("confirm-yes").click()
        page.until(lambda: page.find("overview").is_displayed() and page.row(made) is None,
                   "a deleted tunnel leaves the list")
        self.assertEqual(call(api.call, "GET", f"/instances/{made}")[0], 404)

        # the keyboard alone opens a tunnel's page
        from selenium.webdriver.common.keys import Keys

        page.row(edge["id"]).find_element(by.CSS_SELECTOR, "button.link").send_keys(Keys.ENTER)
        page.until(lambda: page.find("detail").is_displayed(), "Enter on a row opens it")
        page.find("back-button").send_keys(Keys.ENTER)
        page.until(lambda: page.find("overview").is_displayed(), "and back")

        # a narrow screen: the secondary columns step aside, nothing spills over
        driver.set_window_size(420, 900)
        page.until(lambda: not page.driver.find_elements(
            by.CSS_SELECTOR, "#instances-head th.optional")[0].is_displayed(),
            "optional columns hide on a narrow screen")
        self.assertLessEqual(driver.execute_script(
            "return document.documentElement.scrollWidth"), driver.execute_script(
            "return document.documentElement.clientWidth") + 1)
        screenshot(self, driver, "narrow")

        # only the master was ever asked for anything, and nothing went wrong in the page
        requested = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        self.assertTrue(requested)
        self.assertEqual([r for r in requested if not r.startswith(page.origin + "/")], [])
        errors = [e for e in page.console() if e["level"] == "SEVERE"]
        expected = [e for e in errors if "/api/v1/info - " in e["message"] and "401" in
                    e["message"]]  # the wrong key, on purpose
        invalid = [e for e in errors if "/api/v1/instances - " in e["message"] and "400" in
                   e["message"]]  # the bad rate, on purpose
        self.assertEqual(len(expected), 1, errors)
        self.assertEqual(len(invalid), 1, errors)
        self.assertEqual([e for e in errors if e not in expected + invalid], [])

    async def test_the_rate_graph_moves_while_traffic_flows(self):
        backend = await listen(self, Factory.forProtocol(Echo))
        master = await start_master(self)
        api = Api(master.base)
        server = await api.ok("POST", "/instances", {
            "url": "server://k@127.0.0.1:0/127.0.0.1:0", "alias": "traffic"}, 201)
        tunnel = await master.listening_port("tunnel", instance=server["id"])
        exposed = await master.listening_port("target", instance=server["id"])
        await api.ok("POST", "/instances", {
            "url": f"client://k@127.0.0.1:{tunnel}/127.0.0.1:{backend}?mode=2"}, 201)
        await master.wait_for(rf"\[{server['id']}\] client .* tunnel session open")
        driver = await deferToThread(browser, self)
        page = Page(driver, f"http://127.0.0.1:{master.port}")
        await deferToThread(self.watch_the_graph, page, server["id"], exposed)

    def watch_the_graph(self, page: Page, instance_id: str, exposed: int) -> None:
        driver, by = page.driver, page.by
        driver.get(f"{page.origin}/api/")
        page.login(KEY)
        page.until(lambda: page.row(instance_id), "the tunnel is listed")
        page.row(instance_id).find_element(by.CSS_SELECTOR, "button.link").click()
        chart = page.find("detail-chart")
        page.until(lambda: chart.get_attribute("data-points") is not None, "the chart is drawn")
        self.assertEqual(chart.get_attribute("data-last-in"), "0")  # nothing moved yet

        # about 1 MB/s through the tunnel for a few seconds, each byte echoed
        with socket.create_connection(("127.0.0.1", exposed), timeout=10) as user:
            chunk = b"x" * 64 * 1024
            end = time.monotonic() + 8
            while time.monotonic() < end:
                user.sendall(chunk)
                got = 0
                while got < len(chunk):
                    got += len(user.recv(len(chunk) - got))
                if int(chart.get_attribute("data-last-in") or 0) > 0 and \
                        int(chart.get_attribute("data-points")) >= 3:
                    break
        drawn_in = int(chart.get_attribute("data-last-in"))
        self.assertGreater(drawn_in, 100_000, "the drawn in-rate follows the traffic")
        self.assertGreater(int(chart.get_attribute("data-last-out")), 100_000)
        lines = chart.find_elements(by.CSS_SELECTOR, "path.line-in")
        self.assertEqual(len(lines), 1)
        self.assertGreaterEqual(lines[0].get_attribute("d").count("L"), 2)  # a line, not a dot
        screenshot(self, driver, "traffic")
        page.find("back-button").click()
        spark = page.row(instance_id).find_element(by.CSS_SELECTOR, "svg.sparkline")
        page.until(lambda: int(spark.get_attribute("data-last") or 0) > 0,
                   "the row's sparkline moved too")
        total = page.find("total-chart")
        page.until(lambda: int(total.get_attribute("data-peak") or 0) > 100_000,
                   "and the master-wide total")


class ManyInstances(TestCase):
    """200 instances, each updated five times a second: the page keeps up, drawing at
    most once per animation frame.  The events come from a stand-in master (the real
    one would need 200 processes): the dashboard's own files, a /v1 that lists 200
    instances and streams their updates."""

    timeout = 90

    async def test_two_hundred_instances_with_live_updates_stay_smooth(self):
        port, sent = await _busy_master(self, count=200, rounds=25, period=0.2)
        driver = await deferToThread(browser, self)
        await deferToThread(self.measure, Page(driver, f"http://127.0.0.1:{port}"), sent)

    def measure(self, page: Page, sent) -> None:
        driver = page.driver
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
            window.__frames = 0; window.__long = [];
            const tick = () => { window.__frames += 1; requestAnimationFrame(tick); };
            requestAnimationFrame(tick);
            new PerformanceObserver(list => list.getEntries().forEach(
                e => window.__long.push(e.duration))).observe({entryTypes: ["longtask"]});
        """})
        driver.get(f"{page.origin}/api/")
        page.until(lambda: len(page.shown_ids()) == 200, "200 rows")
        driver.execute_script("window.__long = []")  # from here on: the live updates only
        page.until(lambda: sent["done"], "every update sent")
        page.until(lambda: "1m 25s" in page.row("ins_00000199").text,
                   "the last update of the last row is drawn (uptime 60 + 25 s)")
        long_tasks = driver.execute_script("return window.__long")
        # 5,000 updates in 5 s, drawn in frames: no task long enough to be felt
        self.assertLessEqual(max(long_tasks or [0]), 250, long_tasks)
        self.assertLessEqual(sum(long_tasks or [0]), 1500, long_tasks)
        screenshot(self, driver, "two-hundred")


async def _busy_master(case: TestCase, count: int, rounds: int, period: float):
    """A stand-in for the master's API, with the real dashboard files: ``count``
    instances whose traffic grows by 1 KiB per ``period`` each, for ``rounds``."""
    from klein import Klein
    from twisted.internet.defer import Deferred
    from twisted.internet.task import LoopingCall
    from twisted.web.server import Site

    from nodepass.master.dashboard import Dashboard

    def instance(n: int, step: int) -> dict:
        return {"id": f"ins_{n:08d}", "type": "server", "alias": f"tunnel {n}", "status":
                "running", "url": "server://k@0.0.0.0:1/0.0.0.0:2", "tags": {"n": str(n % 7)},
                "mode": "reverse", "tunnel": "connected", "ping": 0.4, "pool_size": 16,
                "connections": n % 5, "udp_sessions": 0, "refused": 0, "uptime": 60 + step,
                "restarts": 0, "restart": False, "pid": 1000 + n, "error": None,
                "created_at": "2026-11-29T00:00:00Z", "tcp_in": step * 1024 * int(period * 10),
                "tcp_out": step * 1024 * int(period * 10), "udp_in": 0, "udp_out": 0}

    app = Klein()
    streams: list = []
    sent = {"done": False, "step": 0}
    Dashboard("/api", auth=False).route(app, None)

    def envelope(request, data):
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"success": True, "data": data, "error": None}).encode()

    @app.route("/api/v1/info")
    def info(request):
        return envelope(request, {"version": "test", "uptime": 1, "started_at": "", "platform":
                                  "", "state_dir": None, "bases": {"seed": "/api/v1",
                                                                   "nodepass": "/api/np/v1"}})

    @app.route("/api/v1/instances")
    def instances(request):
        return envelope(request, {"instances": [instance(n, 0) for n in range(count)]})

    @app.route("/api/v1/instances/<string:instance_id>/traffic")
    def traffic(request, instance_id):
        return envelope(request, {"id": instance_id, "interval": period, "window": 3600,
                                  "samples": []})

    @app.route("/api/v1/events")
    def events(request):
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.write(b": open\n\n")
        streams.append(request)
        request.notifyFinish().addBoth(lambda _: streams.remove(request))
        return Deferred()  # the stream stays open until the test ends

    def publish():
        sent["step"] += 1
        for stream in streams:
            for n in range(count):
                data = json.dumps(instance(n, sent["step"]))
                stream.write(f"event: update\ndata: {data}\n\n".encode())
        if sent["step"] >= rounds:
            sent["done"] = True
            loop.stop()

    loop = LoopingCall(publish)
    site = Site(app.resource())
    site.noisy = False
    port = await listen(case, site)

    def start_when_someone_listens():
        if streams:
            loop.start(period, now=False)
        else:
            reactor.callLater(0.1, start_when_someone_listens)

    start_when_someone_listens()
    case.addCleanup(lambda: loop.running and loop.stop())
    case.addCleanup(lambda: [s.loseConnection() for s in list(streams)])
    return port, sent
