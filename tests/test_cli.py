"""The nodepass command as a user meets it, in a subprocess."""

import signal
import socket

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nodepass import __version__
from tests.integration import WAIT, spawn
from tests.procs import clean_env, run_nodepass


class Usage(SynchronousTestCase):
    def test_help_exits_zero_with_the_table(self):
        for flag in ("--help", "-h"):
            result = run_nodepass(flag)
            self.assertEqual(result.returncode, 0)
            for needle in ("server://", "client://", "master://", "log=debug|info|warn",
                           "tls=0|1|2", "mode=0|1|2", "rate=MBIT", "slot=N",
                           "read=DUR", "proxy=0|1|2", "dial=IP", "notcp=0|1",
                           "SEMAPHORE_LIMIT", "SHUTDOWN_TIMEOUT", "NP_ prefix"):
                self.assertIn(needle, result.stdout)
            self.assertEqual(result.stderr, "")

    def test_version(self):
        result = run_nodepass("--version")
        self.assertEqual((result.returncode, result.stdout), (0, f"nodepass {__version__}\n"))

    def test_no_argument_exits_two_with_usage(self):
        result = run_nodepass()
        self.assertEqual(result.returncode, 2)
        self.assertIn("Usage:", result.stderr)
        self.assertTrue(result.stderr.endswith("nodepass: error: missing URL\n"))


class BadInput(SynchronousTestCase):
    """Each class of mistake: exit 2, one line on stderr, nothing on stdout, no traceback."""

    def assertRefused(self, args, fragment, env=None):
        result = run_nodepass(*args, env=env)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertTrue(result.stderr.startswith("nodepass: error: "), result.stderr)
        self.assertIn(fragment, result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_url_mistakes(self):
        table = [
            ("ftp://h:1/h:2", "unknown 'ftp'"),
            ("server://h/h:2", "tunnel address: missing port"),
            ("server://h:70000/h:2", "out of range"),
            ("server://h:1", "target address: missing"),
            ("server://h:1/h:2?tsl=1", "unknown parameter 'tsl'"),
            ("server://h:1/h:2?tls=9", "bad value '9' for 'tls'"),
            ("server://h:1/h:2?tls=2", "tls=2 needs crt and key"),
            ("server://h:1/h:2?tls=2&crt=/no/such&key=/no/such", "crt file '/no/such'"),
            ("master://h:1/bad%prefix", "API prefix"),
        ]
        for url, fragment in table:
            self.assertRefused([url], fragment)

    def test_two_arguments(self):
        self.assertRefused(["server://h:1/h:2", "extra"], "expected one URL, got 2 arguments")

    def test_unknown_option(self):
        self.assertRefused(["--frobnicate"], "frobnicate")

    def test_bad_environment(self):
        self.assertRefused(["server://127.0.0.1:1/127.0.0.1:2"],
                           "environment: SEMAPHORE_LIMIT='lots' is not",
                           env=clean_env(SEMAPHORE_LIMIT="lots"))
        self.assertRefused(["server://127.0.0.1:1/127.0.0.1:2"],
                           "MIN_POOL_CAPACITY (9) is greater than MAX_POOL_CAPACITY (3)",
                           env=clean_env(MIN_POOL_CAPACITY="9", MAX_POOL_CAPACITY="3"))


class Lifecycle(TestCase):
    """A running nodepass as users stop it, and a start that cannot succeed."""

    timeout = 60

    async def test_sigterm_and_sigint_stop_cleanly(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            daemon = spawn(self, "server://k@127.0.0.1:0/127.0.0.1:0")
            await daemon.wait_for("target listening")
            self.assertEqual(await daemon.stop(sig), 0)
            self.assertTrue(daemon.lines[-1].endswith("INFO   stopped"), daemon.lines[-1])

    async def test_port_in_use_exits_one_with_the_reason(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            daemon = spawn(self, f"server://k@127.0.0.1:{port}/127.0.0.1:0")
            code = await daemon.ended.addTimeout(WAIT, reactor)
        self.assertEqual(code, 1)
        self.assertEqual(daemon.count(
            rf"FATAL  cannot listen for tunnel on 127.0.0.1:{port}: Address already in use"), 1)
        self.assertFalse(any("Traceback" in line for line in daemon.lines))
