"""The nodepass command as a user meets it, in a subprocess."""

import signal
import socket
import tempfile

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
        self.assertTrue(result.stderr.endswith(
            "nodepass: error: missing URL (server://, client:// or master://): give it as "
            "the argument, as '-' to read it from standard input, or in NODEPASS_URL\n"),
            result.stderr)


class UrlSources(SynchronousTestCase):
    """Where the URL may come from: an argument, standard input ('-'), NODEPASS_URL —
    the last two keep a tunnel key out of the process list."""

    def options(self, *args, stdin="", **environ):
        import io

        from nodepass.tap import Options

        options = Options(environ, io.StringIO(stdin))
        options.parseOptions(list(args))
        return options["config"]

    def test_dash_reads_one_line_from_standard_input(self):
        config = self.options("-", stdin="client://s3cret@127.0.0.1:10101/127.0.0.1:8080\n"
                                          "ignored\n")
        self.assertEqual((config.scheme, config.tunnel_key), ("client", "s3cret"))

    def test_no_argument_takes_nodepass_url(self):
        config = self.options(NODEPASS_URL=" server://k@127.0.0.1:0/127.0.0.1:0 ")
        self.assertEqual((config.scheme, config.tunnel_key), ("server", "k"))

    def test_an_argument_wins_over_nodepass_url(self):
        config = self.options("client://a@127.0.0.1:1/127.0.0.1:2",
                              NODEPASS_URL="server://k@127.0.0.1:0/127.0.0.1:0")
        self.assertEqual(config.tunnel_key, "a")

    def test_mistakes_are_usage_errors(self):
        from twisted.python.usage import UsageError

        for args, stdin, fragment in (((), "", "missing URL"),
                                      (("-",), "", "'-': no URL on standard input"),
                                      (("-",), "\n\n", "'-': no URL on standard input"),
                                      (("-",), "x" * 20000, "longer than 16384 characters"),
                                      (("-",), "ftp://h:1/h:2\n", "unknown 'ftp'")):
            with self.assertRaises(UsageError) as caught:
                self.options(*args, stdin=stdin)
            self.assertIn(fragment, str(caught.exception))

    def test_the_command_reads_standard_input_and_the_environment(self):
        result = run_nodepass("-", stdin="server://k@127.0.0.1:1/127.0.0.1:2?tls=9\n")
        self.assertEqual(result.returncode, 2)
        self.assertIn("bad value '9' for 'tls'", result.stderr)
        result = run_nodepass(env=clean_env(NODEPASS_URL="server://k@h:1/h:2?rate=fast"))
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("bad value 'fast' for 'rate'", result.stderr)


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
        with tempfile.TemporaryDirectory() as state:
            self.assertRefused([f"master://127.0.0.1:0?state={state}"],
                               "environment: NODEPASS_HOST_SIZE='0': expected a whole number "
                               "from 1 (a process per instance) to 1000",
                               env=clean_env(NODEPASS_HOST_SIZE="0"))


class Lifecycle(TestCase):
    """A running nodepass as users stop it, and a start that cannot succeed."""

    timeout = 60

    async def test_sigterm_and_sigint_stop_cleanly(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            daemon = spawn(self, "server://k@127.0.0.1:0/127.0.0.1:0")
            await daemon.wait_for("target listening")
            self.assertEqual(await daemon.stop(sig), 0)
            self.assertTrue(daemon.lines[-1].endswith("INFO   stopped"), daemon.lines[-1])

    async def test_a_key_given_on_stdin_or_in_the_environment_is_not_in_the_process_list(self):
        key = "not-for-ps-0123456789"
        for daemon in (spawn(self, "-", name="server", stdin=f"server://{key}@127.0.0.1:0/"
                                                             "127.0.0.1:0\n"),
                       spawn(self, None, name="server",
                             NODEPASS_URL=f"server://{key}@127.0.0.1:0/127.0.0.1:0")):
            await daemon.listening_port("target")
            with open(f"/proc/{daemon.pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            self.assertNotIn(key.encode(), b" ".join(argv))
            self.assertEqual(daemon.count(key), 0)  # nor in its log
            self.assertEqual(await daemon.stop(), 0)

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
