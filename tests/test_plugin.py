"""The twistd plugin, as found by twistd after ``pip install .``."""

import subprocess
import tempfile
from importlib import metadata

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from nodepass import tap
from nodepass.helptext import USAGE
from nodepass.url import ClientConfig
from tests.procs import TIMEOUT, installed_script


class Installed(SynchronousTestCase):
    def run_twistd(self, *args):
        twistd = installed_script("twistd")
        try:
            metadata.version("nodepass")
        except metadata.PackageNotFoundError:
            twistd = None
        if twistd is None:
            self.skipTest("nodepass is not installed here: pip install '.[test]' first")
        # From an empty folder, so only the installed copy of the plugin can be found.
        env = {"PATH": "/usr/bin:/bin"}
        return subprocess.run([twistd, *args], capture_output=True, text=True,
                              cwd=tempfile.mkdtemp(), timeout=TIMEOUT, env=env)

    def test_twistd_lists_nodepass(self):
        result = self.run_twistd("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"\n\s+nodepass\s+A TCP/UDP tunnel daemon")

    def test_twistd_nodepass_help_shows_usage(self):
        result = self.run_twistd("-n", "nodepass", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Usage: twistd [options] nodepass URL", result.stdout)
        self.assertIn("SEMAPHORE_LIMIT", result.stdout)

    def test_twistd_refuses_a_bad_url_in_one_line(self):
        result = self.run_twistd("-n", "nodepass", "server://h:1/h:2?tsl=1")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("unknown parameter 'tsl'", result.stderr + result.stdout)
        self.assertNotIn("Traceback", result.stderr + result.stdout)


class OptionsParsing(SynchronousTestCase):
    def test_url_becomes_config_and_tunables(self):
        options = tap.Options(environ={"SEMAPHORE_LIMIT": "9"})
        options.parseArgs("client://k@127.0.0.1:1/127.0.0.1:2")
        self.assertIsInstance(options["config"], ClientConfig)
        self.assertEqual(options["tunables"].semaphore_limit, 9)

    def test_missing_url(self):
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options(environ={}).parseOptions([])
        self.assertIn("missing URL", str(caught.exception))

    def test_bad_environment_is_a_usage_error(self):
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options(environ={"REPORT_INTERVAL": "often"}).parseOptions(
                ["server://127.0.0.1:1/127.0.0.1:2"])
        self.assertEqual(str(caught.exception),
                         "environment: REPORT_INTERVAL='often' is not a duration like 500ms, "
                         "5s, 1h30m, > 0")

    def test_help_text_is_the_usage_table(self):
        self.assertEqual(tap.Options().getUsage(), USAGE)
