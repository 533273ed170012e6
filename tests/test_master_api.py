"""The master API against a real master on 127.0.0.1, with treq and curl."""

import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
from pathlib import Path

import treq
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests import certs
from tests.integration import eventually, http_backend, need, sleep, spawn

KEY = "test-key-0123456789"


async def start_master(case, query="", prefix="", key=KEY, **env):
    state = Path(tempfile.mkdtemp())
    case.addCleanup(shutil.rmtree, state, True)
    if key is not None:
        env["NODEPASS_API_KEY"] = key
    master = spawn(case, f"master://127.0.0.1:0{prefix}{query}", name="master",
                   NODEPASS_STATE_DIR=str(state), REPORT_INTERVAL="500ms", **env)
    await api_port(master, prefix)
    master.state = state
    return master


async def api_port(master, prefix=""):
    """Read the port the OS gave the master's API from its announcement; set its base URL."""
    line = await master.wait_for(r"master API at https?://127\.0\.0\.1:\d+/")
    master.port = int(re.search(r"127\.0\.0\.1:(\d+)/", line).group(1))
    master.base = f"http://127.0.0.1:{master.port}{prefix or '/api'}/v1"
    return master.port


class Api:
    """A tiny treq client that returns (status, envelope)."""

    def __init__(self, base, key=KEY):
        self.base = base
        self.headers = {"X-API-Key": [key]} if key else {}
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def call(self, method, path, body=None, headers=None, raw=None):
        all_headers = dict(self.headers)
        if body is not None or raw is not None:
            all_headers["Content-Type"] = ["application/json"]
        all_headers.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        response = await treq.request(method, self.base + path, data=data, pool=self.pool,
                                      headers=all_headers, timeout=30)
        text = await treq.content(response)
        return response.code, json.loads(text) if text else None, response

    async def ok(self, method, path, body=None, status=200):
        code, envelope, _ = await self.call(method, path, body)
        assert code == status, (code, envelope)
        assert envelope["success"] is True and envelope["error"] is None, envelope
        return envelope["data"]


class SeedFlows(TestCase):
    """Each flow of ../shared/seed/api.md, as a panel runs it."""

    timeout = 90

    async def setUp(self):
        self.master = await start_master(self)
        self.api = Api(self.master.base)

    def server_url(self):
        return "server://k@127.0.0.1:0/127.0.0.1:0?tls=1"

    async def test_port_taken_shows_error_with_the_reason(self):
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"server://k@127.0.0.1:{taken.getsockname()[1]}/127.0.0.1:0?tls=1"
        second = await self.api.ok("POST", "/instances", {"url": url}, status=201)
        self.assertEqual(second["status"], "error")
        self.assertIn("Address already in use", second["error"])

    async def test_instance_killed_from_outside_shows_error(self):
        data = await self.api.ok("POST", "/instances", {"url": self.server_url()}, status=201)
        os.kill(data["pid"], signal.SIGKILL)
        path = f"/instances/{data['id']}"

        async def status():
            return (await self.api.ok("GET", path))["status"]

        for _ in range(100):
            if await status() == "error":
                break
            await sleep(0.1)
        got = await self.api.ok("GET", path)
        self.assertEqual(got["status"], "error")
        self.assertIn("killed by SIGKILL", got["error"])


class _Closed(Protocol):
    def __init__(self):
        from twisted.internet.defer import Deferred

        self.closed = Deferred()

    def connectionLost(self, reason):
        self.closed.callback(None)


def _children(pid):
    """The processes whose parent is ``pid`` (the fork server, under a master)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(status.parent.name))
    return found


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for init is gone too
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class MasterSettings(TestCase):
    timeout = 90

    async def test_generated_key_is_kept_private_and_never_logged(self):
        master = await start_master(self, key=None)
        key_file = master.state / "api.key"
        key = key_file.read_text().strip()  # where the operator reads it
        self.assertEqual(stat.S_IMODE(key_file.stat().st_mode), 0o600)
        self.assertEqual(master.count(f"API key generated and saved in {key_file} "), 1)
        self.assertEqual(master.count(key), 0)  # not in the log, nor on stderr (a pipe)
        api = Api(master.base, key)
        await api.ok("POST", "/instances", {"url": "server://secret@127.0.0.1:0/127.0.0.1:0"},
                     status=201)
        self.assertEqual(stat.S_IMODE(master.state.stat().st_mode), 0o700)
        for path in master.state.iterdir():  # the key, the database and SQLite's files
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600, path.name)
        await master.stop()
        again = spawn(self, f"master://127.0.0.1:{master.port}", name="master-2",
                      NODEPASS_STATE_DIR=str(master.state))
        await again.wait_for("master API at")
        self.assertEqual(again.count(key), 0)
        self.assertEqual(len((await Api(master.base, key).ok("GET", "/instances"))["instances"]),
                         1)

    async def test_an_instance_key_is_in_no_process_list_and_no_log_line(self):
        key = "tunnel-key-not-for-ps-42"
        master = await start_master(self)
        created = await Api(master.base).ok("POST", "/instances", {
            "url": f"server://{key}@127.0.0.1:0/127.0.0.1:0"}, status=201)
        await master.listening_port("target", instance=created["id"])  # it runs
        with open(f"/proc/{created['pid']}/cmdline", "rb") as f:
            self.assertNotIn(key.encode(), f.read())
        self.assertEqual(master.count(key), 0, "\n".join(master.lines))
        self.assertEqual(master.count(rf"instance {created['id']} created: server://\*\*\*\*@"),
                         1)

    async def test_master_sigterm_leaves_no_child(self):
        master = await start_master(self)
        api = Api(master.base)
        pids = []
        for _ in range(2):
            data = await api.ok("POST", "/instances", {
                "url": "server://k@127.0.0.1:0/127.0.0.1:0"}, status=201)
            pids.append(data["pid"])
        (forkserver,) = _children(master.pid)
        self.assertEqual(sorted(_children(forkserver)), sorted(set(pids)))  # (their hosts)
        self.assertEqual(await master.stop(), 0)
        await eventually(lambda: not any(_alive(pid) for pid in (*pids, forkserver)))

    async def test_master_sigkill_children_exit_by_themselves(self):
        master = await start_master(self)
        data = await Api(master.base).ok("POST", "/instances", {
            "url": "server://k@127.0.0.1:0/127.0.0.1:0"}, status=201)
        (forkserver,) = _children(master.pid)
        await master.stop(signal.SIGKILL)
        await eventually(lambda: not _alive(data["pid"]) and not _alive(forkserver),
                         timeout=15)

    async def _three_in_two_hosts(self, master):
        """Three servers: the first two share a host (of two), the third has its own."""
        api = Api(master.base)
        made = [await api.ok("POST", "/instances", {
            "url": "server://k@127.0.0.1:0/127.0.0.1:0"}, status=201) for _ in range(3)]
        self.assertEqual(made[0]["pid"], made[1]["pid"])
        self.assertNotEqual(made[1]["pid"], made[2]["pid"])
        return api, made

    async def _back_in_another_host(self, api, instance):
        async def running_again():
            got = await api.ok("GET", f"/instances/{instance['id']}")
            return got["status"] == "running" and got["pid"] not in (None, instance["pid"])

        await eventually(running_again, timeout=20)

    async def _serves(self, api, master, instance):
        got = await api.ok("GET", f"/instances/{instance['id']}")
        self.assertEqual((got["status"], got["pid"]), ("running", instance["pid"]))
        exposed = await master.listening_port("target", instance=instance["id"])
        for _ in range(3):  # a user is turned away at once (no client yet): it serves
            user = await TCP4ClientEndpoint(reactor, "127.0.0.1", exposed).connect(
                Factory.forProtocol(_Closed))
            await user.closed

    async def test_with_fork_0_each_instance_is_a_fresh_interpreter_of_its_own(self):
        master = await start_master(self, NODEPASS_FORK="0")
        api = Api(master.base)
        made = [await api.ok("POST", "/instances", {
            "url": "server://k@127.0.0.1:0/127.0.0.1:0"}, status=201) for _ in range(2)]
        self.assertEqual(sorted(_children(master.pid)), sorted(m["pid"] for m in made))
        for m in made:
            self.assertTrue(_cmdline(m["pid"]).endswith(" -m nodepass - "), _cmdline(m["pid"]))
            await master.listening_port("target", instance=m["id"])

    async def test_master_sigkill_ends_a_blocked_host_too(self):
        master = await start_master(self, SHUTDOWN_TIMEOUT="0s", NODEPASS_HOST_WATCHDOG="2s")
        data = await Api(master.base).ok("POST", "/instances", {
            "url": "server://k@127.0.0.1:0/127.0.0.1:0"}, status=201)
        (forkserver,) = _children(master.pid)
        os.kill(data["pid"], signal.SIGSTOP)  # (it would never see its socket close)
        self.addCleanup(lambda: _alive(data["pid"]) and os.kill(data["pid"], signal.SIGKILL))
        await master.stop(signal.SIGKILL)
        await eventually(lambda: not _alive(data["pid"]) and not _alive(forkserver),
                         timeout=15)

    async def test_sighup_to_a_host_or_the_fork_server_or_sigterm_to_it_ends_nothing(self):
        master = await start_master(self)
        api = Api(master.base)
        data = await api.ok("POST", "/instances", {
            "url": "server://k@127.0.0.1:0/127.0.0.1:0"}, status=201)
        (forkserver,) = _children(master.pid)
        for pid in (data["pid"], forkserver):
            os.kill(pid, signal.SIGHUP)
        os.kill(forkserver, signal.SIGTERM)  # (as a group-wide SIGTERM would: the master
        # decides, and closing its socket ends the fork server)
        fresh = await api.ok("POST", "/instances", {  # (the fork server still forks)
            "url": "server://k@127.0.0.1:0/127.0.0.1:0", "alias": "after"}, status=201)
        self.assertEqual(fresh["status"], "running")
        self.assertTrue(_alive(data["pid"]))
        got = await api.ok("GET", f"/instances/{data['id']}")
        self.assertEqual((got["status"], got["pid"]), ("running", data["pid"]))
        self.assertEqual(_children(master.pid), [forkserver])

    async def test_a_crashed_host_takes_only_its_instances_and_they_come_back(self):
        master = await start_master(self, NODEPASS_HOST_SIZE="2", NODEPASS_HOST_SPREAD="1")
        api, (a, b, c) = await self._three_in_two_hosts(master)
        os.kill(a["pid"], signal.SIGSEGV)
        for lost in (a, b):  # (restart: false, yet they come back: not their doing)
            await master.wait_for(rf"instance {lost['id']} .*killed by SIGSEGV")
            await self._back_in_another_host(api, lost)
        await self._serves(api, master, c)
        self.assertEqual(master.count(rf"instance {c['id']} .*killed"), 0)

    async def test_a_blocked_host_is_killed_by_the_watchdog_and_stops_at_once(self):
        master = await start_master(self, SHUTDOWN_TIMEOUT="0s", NODEPASS_HOST_SIZE="2",
                                    NODEPASS_HOST_SPREAD="1", NODEPASS_HOST_WATCHDOG="2s")
        api, (blocked, mate, other) = await self._three_in_two_hosts(master)
        os.kill(blocked["pid"], signal.SIGSTOP)  # its reactor runs no more
        self.addCleanup(lambda: _alive(blocked["pid"]) and os.kill(blocked["pid"],
                                                                  signal.SIGKILL))
        await self._serves(api, master, other)  # the other host serves, the master answers
        # stopping an instance of the blocked host ends it: its host does not act on
        # the stop, and the watchdog kills it
        stopped = await api.ok("PUT", f"/instances/{blocked['id']}", {"action": "stop"})
        self.assertEqual(stopped["status"], "stopped")
        self.assertFalse(_alive(blocked["pid"]))
        await master.wait_for(rf"host {blocked['pid']} silent for .* killed")
        await self._back_in_another_host(api, mate)  # its host-mate comes back
        self.assertEqual((await api.ok("GET", f"/instances/{blocked['id']}"))["status"],
                         "stopped")
        await self._serves(api, master, other)

    async def test_the_fork_server_killed_ends_its_instances_which_come_back(self):
        master = await start_master(self)
        api = Api(master.base)
        kept = await api.ok("POST", "/instances", {
            "url": "server://k@127.0.0.1:0/127.0.0.1:0", "restart": True}, status=201)
        (forkserver,) = _children(master.pid)
        os.kill(forkserver, signal.SIGKILL)
        await master.wait_for(rf"instance {kept['id']} .*killed by SIGKILL")
        await eventually(lambda: not _alive(kept["pid"]))
        # a new fork server serves the restart and new instances; the master never stopped

        async def running_again():
            got = await api.ok("GET", f"/instances/{kept['id']}")
            return got["status"] == "running" and got["pid"] not in (None, kept["pid"])

        for _ in range(100):
            if await running_again():
                break
            await sleep(0.1)
        self.assertTrue(await running_again())
        fresh = await api.ok("POST", "/instances", {
            "url": "server://k@127.0.0.1:0/127.0.0.1:0"}, status=201)
        self.assertEqual(fresh["status"], "running")
        (again,) = _children(master.pid)
        self.assertNotEqual(again, forkserver)


async def api_tunnel(master, api, backend, **server_fields):
    """A server and a client instance made through the API, joined: (server, client, port)."""
    server = await api.ok("POST", "/instances", {
        "url": "server://k@127.0.0.1:0/127.0.0.1:0", **server_fields}, status=201)
    tunnel = await master.listening_port("tunnel", instance=server["id"])
    exposed = await master.listening_port("target", instance=server["id"])
    client = await api.ok("POST", "/instances", {
        "url": f"client://k@127.0.0.1:{tunnel}/127.0.0.1:{backend}"}, status=201)
    return server, client, exposed


class EndToEnd(TestCase):
    timeout = 90

    async def test_http_through_api_created_instances(self):
        curl = need("curl", "curl")
        backend = await http_backend(self, b"hello", b"x" * 100_000)
        master = await start_master(self)
        api = Api(master.base)
        server, client, exposed = await api_tunnel(master, api, backend)
        await master.wait_for(rf"\[{server['id']}\] client .* connected: tunnel session open")
        out, _, code = await getProcessOutputAndValue(
            curl, ["-sS", "--max-time", "10", f"http://127.0.0.1:{exposed}/hello"])
        self.assertEqual((code, len(out)), (0, 100_000))
        # the server reads the request from the user and writes the page to it; the
        # client reads the page from the local service and writes the request to it
        for instance, request_field, page_field in ((server, "tcp_in", "tcp_out"),
                                                    (client, "tcp_out", "tcp_in")):
            path = f"/instances/{instance['id']}"

            async def counted(path=path, page_field=page_field):
                return (await api.ok("GET", path))[page_field] >= 100_000

            for _ in range(50):
                if await counted():
                    break
                await sleep(0.1)
            data = await api.ok("GET", path)
            self.assertGreater(data[request_field], 0, data)
            self.assertGreaterEqual(data[page_field], 100_000, data)
            self.assertEqual(data["tunnel"], "connected")
        # a connection held open shows in `connections`
        held = await TCP4ClientEndpoint(reactor, "127.0.0.1", exposed).connect(
            Factory.forProtocol(Protocol))
        path = f"/instances/{server['id']}"

        async def connections(n):
            for _ in range(50):
                if (await api.ok("GET", path))["connections"] == n:
                    break
                await sleep(0.1)
            self.assertEqual((await api.ok("GET", path))["connections"], n)

        await connections(1)
        held.transport.loseConnection()
        await connections(0)  # ... and it goes when the connection does


    async def test_forward_mode_and_controls_through_the_api(self):
        curl = need("curl", "curl")
        backend = await http_backend(self, b"hello", b"x" * 1000)
        master = await start_master(self)
        api = Api(master.base)
        code, envelope, _ = await api.call("POST", "/instances", {
            "url": "server://k@127.0.0.1:1/127.0.0.1:2?rate=fast"})
        self.assertEqual((code, envelope["error"]["code"]), (400, "INVALID_URL"))
        self.assertIn("bad value 'fast' for 'rate'", envelope["error"]["message"])
        server = await api.ok("POST", "/instances", {
            "url": f"server://k@127.0.0.1:0/127.0.0.1:{backend}"
                   "?slot=3&read=1m&mode=2&rate=100"}, status=201)
        self.assertEqual(server["url"], f"server://k@127.0.0.1:0/127.0.0.1:{backend}"
                                        "?log=info&tls=0&mode=2&read=60s&rate=100&slot=3")
        tunnel = await master.listening_port("tunnel", instance=server["id"])
        client = await api.ok("POST", "/instances", {
            "url": f"client://k@127.0.0.1:{tunnel}/127.0.0.1:0"}, status=201)
        exposed = await master.listening_port("target", instance=client["id"])
        out, _, code = await getProcessOutputAndValue(
            curl, ["-sS", "--max-time", "10", f"http://127.0.0.1:{exposed}/hello"])
        self.assertEqual((code, len(out)), (0, 1000))
        for instance in (server, client):
            for _ in range(50):  # the mode shows from the first report on
                data = await api.ok("GET", f"/instances/{instance['id']}")
                if data["mode"] is not None:
                    break
                await sleep(0.1)
            self.assertEqual((data["mode"], data["refused"], data["tunnel"],
                              data["transport"]), ("forward", 0, "connected", "tcp"))


class Https(TestCase):
    timeout = 60

    async def curl(self, *args):
        curl = need("curl", "curl")
        out, err, code = await getProcessOutputAndValue(curl, ["-sS", "--max-time", "10",
                                                               *args])
        return code, out.decode(), err.decode()

    async def test_tls1_generated_certificate(self):
        master = await start_master(self, query="?tls=1")
        await master.wait_for("tls=1: API certificate fingerprint")
        url = f"https://127.0.0.1:{master.port}/api/v1/instances"
        code, out, _ = await self.curl("--insecure", "-H", f"X-API-Key: {KEY}", url)
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["data"], {"instances": []})
        code, _, _ = await self.curl("-H", f"X-API-Key: {KEY}", url)
        self.assertNotEqual(code, 0, "curl must refuse an unverifiable certificate")
        created = await self.curl("--insecure", "-H", f"X-API-Key: {KEY}", "-H",
                                  "Content-Type: application/json", "-d", json.dumps({
                                      "url": "server://k@127.0.0.1:0/127.0.0.1:0"}), url)
        self.assertIn("&tls=1", json.loads(created[1])["data"]["url"])

    async def test_tls2_given_certificate(self):
        folder = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, folder, True)
        ca = certs.make_ca()
        crt, key = certs.issue(ca).write(folder, "api")
        ca_file = certs.write_ca(ca, folder)
        master = await start_master(self, query=f"?tls=2&crt={crt}&key={key}")
        url = f"https://127.0.0.1:{master.port}/api/v1/instances"
        code, out, err = await self.curl("--cacert", ca_file, "-H", f"X-API-Key: {KEY}", url)
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["success"], True)
        created = await self.curl("--cacert", ca_file, "-H", f"X-API-Key: {KEY}", "-H",
                                  "Content-Type: application/json", "-d", json.dumps({
                                      "url": "server://k@127.0.0.1:0/127.0.0.1:0"}), url)
        self.assertIn(f"&tls=2&crt={crt}&key={key}", json.loads(created[1])["data"]["url"])
