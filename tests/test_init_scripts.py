"""contrib/: the SysV script against a real twistd, and the systemd units verified."""

import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.integration import eventually
from tests.procs import REPO, clean_env, installed_script

SCRIPT = REPO / "contrib" / "init.d" / "nodepass"
UNITS = REPO / "contrib" / "systemd"


def accepting(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class SysVScript(TestCase):
    timeout = 60

    def setUp(self):
        twistd = installed_script("twistd")
        if twistd is None:
            self.skipTest("twistd is not installed: pip install '.[test]'")
        self.folder = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.pidfile = self.folder / "nodepass.pid"
        self.defaults = self.folder / "nodepass.defaults"
        self.defaults.write_text(
            f"TWISTD={twistd}\n"
            f"PIDFILE={self.pidfile}\n"
            f"LOGFILE={self.folder / 'nodepass.log'}\n"
            "NODEPASS_URL=server://k@127.0.0.1:0/127.0.0.1:0\n"
            "SHUTDOWN_TIMEOUT=1s\n"
        )
        self.addCleanup(self._kill_leftover)

    def _kill_leftover(self):
        if self.pidfile.exists():
            try:
                os.kill(int(self.pidfile.read_text()), 9)
            except (ProcessLookupError, ValueError):
                pass

    def tunnel_port(self):
        """The port the daemon's tunnel listener got, once its log says so (else None)."""
        log = self.folder / "nodepass.log"
        found = re.search(r"tunnel listening on 127\.0\.0\.1:(\d+)",
                          log.read_text() if log.exists() else "")
        return int(found.group(1)) if found else None

    async def script(self, action):
        env = clean_env(NODEPASS_DEFAULTS=str(self.defaults))
        out, err, code = await getProcessOutputAndValue(
            "/bin/sh", [str(SCRIPT), action], env=env, path=str(self.folder))
        return code, (out + err).decode()

    async def test_start_status_stop(self):
        code, text = await self.script("start")
        self.assertEqual(code, 0, text)
        self.assertIn("nodepass started (pid", text)
        pid = int(self.pidfile.read_text())
        port = await eventually(self.tunnel_port, timeout=15)
        self.assertTrue(accepting(port))

        code, text = await self.script("status")
        self.assertEqual((code, text.strip()), (0, f"nodepass is running (pid {pid})"))

        code, text = await self.script("start")
        self.assertEqual((code, text.strip()), (0, f"nodepass is already running (pid {pid})"))

        code, text = await self.script("stop")
        self.assertEqual(code, 0, text)
        self.assertFalse(self.pidfile.exists())
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)
        self.assertFalse(accepting(port))
        self.assertIn("stopped", (self.folder / "nodepass.log").read_text())

        code, text = await self.script("status")
        self.assertEqual((code, text.strip()), (3, "nodepass is not running"))

    async def test_missing_url_is_refused(self):
        self.defaults.write_text(self.defaults.read_text().replace("NODEPASS_URL=", "#"))
        code, text = await self.script("start")
        self.assertEqual(code, 6)
        self.assertIn("set NODEPASS_URL", text)

    async def test_unknown_action(self):
        code, text = await self.script("frobnicate")
        self.assertEqual(code, 2)
        self.assertIn("Usage:", text)


class SystemdUnits(TestCase):
    timeout = 60

    async def verify(self, unit_name, text):
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            self.skipTest("systemd-analyze is not installed: apt-get install systemd")
        folder = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, folder, True)
        nodepass = installed_script("nodepass") or sys.executable
        (folder / unit_name).write_text(text.replace("/usr/local/bin/nodepass", nodepass))
        out, err, code = await getProcessOutputAndValue(
            analyze, ["verify", str(folder / unit_name)], env=dict(os.environ), path=str(folder))
        return code, (out + err).decode()

    async def test_units_verify(self):
        for name, as_name in (("nodepass@.service", "nodepass@test.service"),
                              ("nodepass-master.service", "nodepass-master.service")):
            code, text = await self.verify(as_name, (UNITS / name).read_text())
            self.assertEqual(code, 0, f"{name}: {text}")
            self.assertNotIn("Unknown", text, name)

    async def test_a_broken_unit_is_caught(self):
        broken = (UNITS / "nodepass@.service").read_text().replace(
            "ExecStart=/usr/local/bin/nodepass", "ExecStart=/nonexistent/nodepass")
        code, text = await self.verify("nodepass@test.service", broken)
        self.assertNotEqual(code, 0)
        self.assertIn("/nonexistent/nodepass", text)
