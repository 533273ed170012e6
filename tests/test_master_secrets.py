"""The master's secrets on disk and in its log (#16 item 9): the state directory 0700 and
its files 0600 (made so when this user owns them, refused when another does), and a
generated API key never written to the log."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from nodepass.master.service import open_state, to_terminal
from nodepass.master.state import StateError, check_state
from nodepass.master.store import Store, StoredInstance
from nodepass.url import MasterConfig
from tests.procs import clean_env, run_nodepass

SERVER = "server://secret@127.0.0.1:10101/127.0.0.1:8080"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Case(SynchronousTestCase):
    def setUp(self):
        self.folder = Path(self.mktemp()).resolve()
        self.umask = os.umask(0o022)  # the usual one, whatever the test runner's
        self.addCleanup(os.umask, self.umask)

    def open_state(self, **config):
        told: list[str] = []
        with capturedLogs() as events:
            store, key, _ = open_state(MasterConfig(state=str(self.folder), **config), {},
                                            terminal=told.append)
        self.addCleanup(store.close)
        return store, key, [formatEvent(e) for e in events], told


class OnDisk(Case):
    def test_the_database_and_the_files_sqlite_keeps_beside_it_are_0600(self):
        self.folder.mkdir(mode=0o700)
        store = Store.open(self.folder)
        self.addCleanup(store.close)
        store.save(StoredInstance("ins_00000001", SERVER, 1.0))
        names = sorted(p.name for p in self.folder.iterdir())
        self.assertEqual(names, ["nodepass.db", "nodepass.db-shm", "nodepass.db-wal"])
        self.assertEqual({name: mode(self.folder / name) for name in names},
                         dict.fromkeys(names, 0o600))

    def test_a_directory_and_files_open_to_others_are_made_private(self):
        self.folder.mkdir()
        self.folder.chmod(0o755)
        (self.folder / "api.key").write_text("old-key\n")
        (self.folder / "api.key").chmod(0o644)
        store = Store.open(self.folder)
        store.close()
        (self.folder / "nodepass.db").chmod(0o664)
        check_state(MasterConfig(state=str(self.folder)), {})  # ours: no refusal
        _, key, lines, _ = self.open_state()
        self.assertEqual(key.value, "old-key")
        self.assertEqual((mode(self.folder), mode(self.folder / "api.key"),
                          mode(self.folder / "nodepass.db")), (0o700, 0o600, 0o600))
        self.assertIn(f"{self.folder} could be read by other users (mode 0755): made it 0700",
                      lines)
        self.assertIn(f"{self.folder / 'nodepass.db'} could be read by other users (mode "
                      "0664): made it 0600", lines)

    def test_one_this_user_does_not_own_is_refused_before_the_start(self):
        if os.geteuid() != 0:
            raise SkipTest("giving a directory to another user needs root")
        self.folder.mkdir()
        self.folder.chmod(0o755)
        os.chown(self.folder, 65534, 65534)
        with self.assertRaisesRegex(StateError, r"state directory .* can be read by other "
                                                r"users \(mode 0755\) and belongs to uid "
                                                r"65534, not to this user \(uid 0\)"):
            check_state(MasterConfig(state=str(self.folder)), {})
        done = run_nodepass(f"master://127.0.0.1:0?state={self.folder}", env=clean_env())
        self.assertEqual(done.returncode, 2)
        (line,) = done.stderr.splitlines()
        self.assertRegex(line, rf"^nodepass: error: state directory '{self.folder}' can be "
                               rf"read by other users .* run chmod 700 '{self.folder}' as its "
                               r"owner, or choose another state directory")
        self.assertEqual(mode(self.folder), 0o755)  # not ours: left as it was
        self.assertEqual(list(self.folder.iterdir()), [])


class InTheLog(Case):
    def test_a_generated_key_is_in_its_file_and_on_the_terminal_never_in_the_log(self):
        _, key, lines, told = self.open_state()
        path = self.folder / "api.key"
        self.assertEqual((key.origin, path.read_text().strip(), mode(path)),
                         ("new", key.value, 0o600))
        self.assertEqual([line for line in lines if key.value in line], [])
        self.assertIn(f"API key generated and saved in {path} (readable by this user only; "
                      "the key itself is never logged)", lines)
        self.assertEqual(told, [f"nodepass: API key generated and saved in {path}: "
                                f"{key.value}\n"])
        _, again, lines, told = self.open_state()  # next start: read, not told again
        self.assertEqual((again.value, again.origin, told), (key.value, "file", []))

    def test_the_terminal_is_told_only_when_standard_error_is_one(self):
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        self.assertFalse(to_terminal("secret\n", write_end))  # a pipe, a file, a journal
        os.set_blocking(read_end, False)
        self.assertRaises(BlockingIOError, os.read, read_end, 100)
        controller, terminal = os.openpty()
        self.addCleanup(os.close, controller)
        self.addCleanup(os.close, terminal)
        self.assertTrue(to_terminal("secret\n", terminal))
        self.assertIn(b"secret", os.read(controller, 100))
