"""A real PostgreSQL server for tests: one per test, in a private temporary directory.

It is Debian's ``postgresql`` package run by hand: ``initdb`` into a fresh directory under
/tmp, ``pg_ctl start`` with the server listening only on a Unix socket in that directory
(no TCP port at all), password (SCRAM) authentication for the user ``nodepass``, and a
database ``nodepass``. As root, where initdb and postgres refuse to run, the server runs as
the ``postgres`` user that the package creates. Every step is bounded in time.

    pg = started_postgres(self)           # skips the test when PostgreSQL is missing
    pg.dsn                                # postgresql://nodepass@/nodepass?host=...&port=5432
    pg.password                           # not in the DSN: give it as PGPASSWORD (pg.env())
    with pg.connect() as conn: ...        # psycopg, autocommit, for the test's assertions
    pg.kill(); pg.start_again()           # a crash, then crash recovery
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twisted.trial.unittest import SkipTest

USER = "nodepass"
DATABASE = "nodepass"
PORT = 5432  # only names the socket file: nothing listens on TCP
TIMEOUT = 30  # for any one subprocess
PG_CTL_WAIT = 20  # pg_ctl's own -t, below TIMEOUT so that pg_ctl is the one to give up
MISSING = ("PostgreSQL is not installed: apt-get install postgresql "
           "(and pip install 'psycopg[binary]')")

SETTINGS = {
    "listen_addresses": "''",
    "port": str(PORT),
    "max_connections": "100",
    "shared_buffers": "16MB",
    "fsync": "off",
    "full_page_writes": "off",
    # not synchronous_commit=off: with it a commit returns before its WAL leaves the
    # server's memory, and kill() (SIGKILL) loses it; with fsync=off, "on" costs a write()
}


def bin_dir() -> Path | None:
    """The directory of initdb, pg_ctl and postgres: Debian's newest version, else PATH's."""
    versions = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        version = initdb.parent.parent.name
        if re.fullmatch(r"\d+(\.\d+)?", version):
            versions.append((tuple(int(part) for part in version.split(".")), initdb.parent))
    if versions:
        return max(versions)[1]
    initdb = shutil.which("initdb")
    if initdb is not None:
        found = Path(initdb).resolve().parent
        if (found / "pg_ctl").exists() and (found / "postgres").exists():
            return found
    return None


def need_postgres() -> Path:
    """The directory of PostgreSQL's server programs, or SkipTest saying what is missing."""
    found = bin_dir()
    if found is None:
        raise SkipTest(MISSING)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise SkipTest(MISSING) from None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise SkipTest("PostgreSQL refuses to run as root, and there is no 'postgres' "
                           "user to run it as: apt-get install postgresql creates one") from None
    return found


class PostgresError(Exception):
    """The server did not start or stop; the message ends with the tail of its log."""


_live: set[Postgres] = set()


@atexit.register
def _leftovers() -> None:
    # a test run cut short (^C) skips its cleanups: leave no server behind it
    for pg in list(_live):
        try:
            pg.cleanup()
        except Exception:
            pass


class Postgres:
    """One PostgreSQL server in its own temporary directory, reached by its Unix socket.

    ``settings`` add to or override SETTINGS (postgresql.conf lines), e.g.
    ``{"idle_session_timeout": "'2s'"}`` (string values are written as given).
    """

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bin = need_postgres()
        self.settings = {**SETTINGS, **(settings or {})}
        self.password = secrets.token_urlsafe(24)
        self.dir: Path | None = None
        self.running = False
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            self._as: dict[str, Any] = {"user": entry.pw_uid, "group": entry.pw_gid,
                                        "extra_groups": []}
            self._owner: tuple[int, int] | None = (entry.pw_uid, entry.pw_gid)
        else:
            self._as, self._owner = {}, None

    # where things are

    @property
    def socket_dir(self) -> str:
        return str(self._dir())

    @property
    def data_dir(self) -> Path:
        return self._dir() / "data"

    @property
    def log_file(self) -> Path:
        return self._dir() / "postgres.log"

    @property
    def dsn(self) -> str:
        """A libpq URL without the password (which env() or connect() supply)."""
        return (f"postgresql://{USER}@/{DATABASE}"
                f"?host={quote(self.socket_dir, safe='/')}&port={PORT}")

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) plus PGPASSWORD, for a child."""
        env = dict(os.environ if base is None else base)
        env["PGPASSWORD"] = self.password
        return env

    def connect(self, **kwargs: Any):
        """A psycopg connection in autocommit mode, for a test's own queries."""
        import psycopg

        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(self.dsn, password=self.password, **kwargs)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, if the file is there."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    # life

    def start(self) -> Postgres:
        """initdb into a new temporary directory, start the server, create the database."""
        if self.dir is not None:
            raise PostgresError("already started once: use start_again() or restart()")
        self.dir = Path(tempfile.mkdtemp(prefix="nodepass-pg-", dir="/tmp"))
        _live.add(self)
        try:
            self._initdb()
            self.start_again()
            with self.connect(dbname="postgres") as conn:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
        except BaseException:
            self.cleanup()
            raise
        return self

    def start_again(self) -> None:
        """Start the server on the same data directory and socket (after stop() or kill())."""
        self._ctl("start", "-l", str(self.log_file), "-w", "-t", str(PG_CTL_WAIT))
        self.running = True

    def stop(self) -> None:
        """A fast shutdown: clients are disconnected, and the server is gone on return."""
        self._ctl("stop", "-m", "fast", "-w", "-t", str(PG_CTL_WAIT))
        self.running = False

    def restart(self) -> None:
        self.stop()
        self.start_again()

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would; its children then die of its death.

        Returns once none of them is left (a zombie waiting to be reaped counts as gone:
        then the lock files naming it are removed, or the next start would refuse to run).
        """
        pid = self.pid()
        if pid is None:
            raise PostgresError("no postmaster.pid: the server is not running")
        children = _children(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.running = False
        if not _wait_gone([(pid, None), *children], 5):
            for child in children:  # 5 s after: finish off the stragglers
                if _alive(*child):
                    try:
                        os.kill(child[0], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if not _wait_gone([(pid, None), *children], 5):
                raise PostgresError(f"the killed postmaster {pid} or a child is still alive")
        if _exists(pid):  # a zombie nobody has reaped yet: postgres would take it as alive
            for lock in (self.data_dir / "postmaster.pid",
                         self._dir() / f".s.PGSQL.{PORT}.lock"):
                try:
                    lock.unlink()
                except FileNotFoundError:
                    pass

    def cleanup(self) -> None:
        """Stop the server if it runs (kill it if it won't stop), remove the directory."""
        if self.dir is None:
            return
        try:
            pid = self.pid()
            if self.running or (pid is not None and _alive(pid)):
                try:
                    self.stop()
                except Exception:
                    if self.pid() is not None:
                        self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            self.running = False
            _live.discard(self)

    # the work

    def _dir(self) -> Path:
        if self.dir is None:
            raise PostgresError("not started")
        return self.dir

    def _initdb(self) -> None:
        top = self._dir()
        pwfile = top / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._owner is not None:
            for path in (top, pwfile):
                os.chown(path, *self._owner)
        top.chmod(0o700)
        self._run(self.bin / "initdb", "-D", str(self.data_dir), "-U", USER,
                  "--auth=scram-sha-256", f"--pwfile={pwfile}", "--no-sync",
                  "--no-locale", "-E", "UTF8", what="initdb")
        pwfile.unlink()
        settings = {**self.settings, "unix_socket_directories": f"'{top}'"}
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# tests/postgres.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def _ctl(self, *args: str) -> None:
        self._run(self.bin / "pg_ctl", "-D", str(self.data_dir), *args,
                  what=f"pg_ctl {args[0]}")

    def _run(self, *argv: str | Path, what: str) -> None:
        # stdin from /dev/null and the output to pipes: pg_ctl's server keeps neither
        # (its output goes to the -l log), so the pipes close when pg_ctl exits
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
               "HOME": str(self._dir()), "TZ": "UTC"}
        try:
            done = subprocess.run([str(arg) for arg in argv], stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=TIMEOUT,
                                  env=env, cwd=self._dir(), **self._as)
        except subprocess.TimeoutExpired as e:
            raise PostgresError(f"{what} took over {TIMEOUT}s{self._tail()}") from e
        if done.returncode != 0:
            raise PostgresError(f"{what} failed ({done.returncode}): "
                                f"{(done.stdout + done.stderr).strip()}{self._tail()}")

    def _tail(self, lines: int = 30) -> str:
        text = self.log().splitlines()[-lines:]
        return ("\n--- tail of " + str(self.log_file) + " ---\n" + "\n".join(text)
                if text else "")


def started_postgres(case, settings: dict[str, str] | None = None) -> Postgres:
    """A started Postgres for a trial test case, cleaned up after it (SkipTest without one)."""
    pg = Postgres(settings)
    pg.start()
    case.addCleanup(pg.cleanup)
    return pg


def _exists(pid: int) -> bool:
    """There is a process ``pid``, a zombie included."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of ``pid`` from /proc, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _alive(pid: int, started: int | None = None) -> bool:
    """``pid`` exists and is no zombie (and, given ``started``, is the same process)."""
    if not _exists(pid):
        return False
    stat = _stat(pid)
    if stat is None:
        return started is None  # no /proc: that it exists is all we can know
    return stat[0] not in ("Z", "X") and started in (None, stat[2])


def _wait_gone(processes: list[tuple[int, int | None]], timeout: float) -> bool:
    """Wait (at most ``timeout`` seconds) for each process to end -- on its pidfd, which
    becomes readable when it exits (a zombie counts as gone) -> whether all did."""
    deadline = time.monotonic() + timeout
    for pid, started in processes:
        if not _alive(pid, started):
            continue
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            left = max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0] and _alive(pid, started):
                return False
        finally:
            os.close(fd)
    return True


def _children(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of the processes whose parent is ``pid`` (none without /proc)."""
    try:
        entries = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []
    found = []
    for entry in entries:
        stat = _stat(entry)
        if stat is not None and stat[1] == pid:
            found.append((entry, stat[2]))
    return found
