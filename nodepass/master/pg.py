"""The fleet's database: PostgreSQL through psycopg 3, off the reactor thread.

Every statement runs in one worker thread of its own (a ThreadPool of one), in the
order it was asked for, on a connection that thread opens and reopens; the reactor
gets a Deferred.  A statement that fails because the server is gone fails with
DatabaseDownError and leaves the connection to be opened again by the next one; the
caller (the outbox, the fleet) decides when to try again.

The schema lives in the PostgreSQL schema ``nodepass`` and is versioned like the
SQLite one (store.py): migrated forward under an advisory lock (two masters starting
at once migrate once), refused -- never touched -- when it is newer than this
nodepass.  Versions 1-3 are SQLite's, table for table; 4 adds the fleet.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from nodepass.master.store import StoreError

T = TypeVar("T")
SCHEMA = "nodepass"
SCHEMA_VERSION = 4
CONNECT_TIMEOUT = 5  # seconds; libpq's connect_timeout
STATEMENT_TIMEOUT_MS = 15_000
TCP_USER_TIMEOUT_MS = 10_000
_LOCK = 0x6E6F6465  # pg_advisory_xact_lock key for migrations ("node")

MIGRATIONS: list[list[str]] = [
    [  # 0 -> 1
        "CREATE TABLE instances (id TEXT PRIMARY KEY, url TEXT NOT NULL,"
        " created_at DOUBLE PRECISION NOT NULL, desired TEXT NOT NULL)",
    ],
    [  # 1 -> 2
        "ALTER TABLE instances ADD COLUMN alias TEXT",
        "ALTER TABLE instances ADD COLUMN tags TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE instances ADD COLUMN restart INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN tcp_in BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN tcp_out BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN udp_in BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN udp_out BIGINT NOT NULL DEFAULT 0",
        "CREATE TABLE issued_ids (id TEXT PRIMARY KEY)",
        "INSERT INTO issued_ids SELECT id FROM instances ON CONFLICT DO NOTHING",
    ],
    [  # 2 -> 3
        "ALTER TABLE instances ADD COLUMN peer TEXT NOT NULL DEFAULT '{}'",
        "CREATE TABLE master (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
    [  # 3 -> 4: the fleet -- nodes, who runs what, what it looks like, commands, traffic
        "ALTER TABLE instances ADD COLUMN node TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE instances ADD COLUMN live JSONB",
        "CREATE INDEX instances_node ON instances (node)",
        "CREATE TABLE nodes (id TEXT PRIMARY KEY, alias TEXT NOT NULL DEFAULT '',"
        " version TEXT NOT NULL DEFAULT '', heartbeat DOUBLE PRECISION NOT NULL,"
        " started_at TIMESTAMPTZ NOT NULL DEFAULT now(),"
        " heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        "CREATE TABLE commands (id TEXT PRIMARY KEY, seq BIGSERIAL, node TEXT NOT NULL,"
        " op TEXT NOT NULL, args JSONB NOT NULL, requested_by TEXT NOT NULL,"
        " requested_at TIMESTAMPTZ NOT NULL DEFAULT now(),"
        " state TEXT NOT NULL DEFAULT 'queued', claim TEXT, result JSONB,"
        " done_at TIMESTAMPTZ)",
        "CREATE INDEX commands_queued ON commands (node, seq) WHERE state = 'queued'",
        "CREATE TABLE traffic (instance_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,"
        " sample JSONB NOT NULL, PRIMARY KEY (instance_id, at))",
        "CREATE INDEX traffic_at ON traffic (at)",
        "CREATE SEQUENCE runs",
    ],
]
assert len(MIGRATIONS) == SCHEMA_VERSION


class DatabaseDownError(Exception):
    """PostgreSQL cannot be reached, or the connection broke; one line for the log."""


def psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError("state=postgresql:// needs psycopg 3: pip install "
                         "'nodepass[postgresql]' (or pip install 'psycopg[binary]')") from None
    return psycopg


def check_dsn(dsn: str) -> str:
    """The DSN as given, if it names a PostgreSQL database and carries no password (it
    would show in the process list and in the master's URL); StoreError otherwise --
    whose message never repeats the URL, which may hold a password however malformed."""
    if not re.match(r"postgres(ql)?://", dsn):
        raise StoreError("the fleet database must be a postgresql:// URL")
    head, _, query = dsn.split("://", 1)[1].partition("?")
    user = head.split("@", 1)[0] if "@" in head else ""
    keys = {unquote(part.partition("=")[0]).strip().lower() for part in query.split("&")}
    if ":" in user or "password" in keys:
        raise StoreError("the fleet database URL carries a password: give it in PGPASSWORD "
                         "or ~/.pgpass instead (a URL shows in the process list and logs)")
    try:
        urlsplit(dsn).port  # noqa: B018 -- raises on a bad port
    except ValueError:
        raise StoreError("the fleet database URL is malformed: postgresql://USER@HOST:PORT/"
                         "DATABASE?PARAMETERS (percent-encode what is not a letter or digit)"
                         ) from None
    return dsn


def describe_dsn(dsn: str) -> str:
    """Where the database is, for the log: user@host:port/dbname, never a password."""
    parts = urlsplit(dsn)
    query = dict(p.partition("=")[::2] for p in parts.query.split("&") if p)
    host = parts.hostname or query.get("host") or "localhost"
    port = parts.port or query.get("port") or 5432
    user = f"{parts.username}@" if parts.username else ""
    return f"postgresql://{user}{host}:{port}{parts.path or '/'}"


def connect(dsn: str, application: str) -> Any:
    """A new connection (autocommit off, search_path at our schema), or DatabaseDownError."""
    driver = psycopg()
    try:
        # tcp_user_timeout: a server that stops acknowledging (its host gone) fails the
        # statement in hand within seconds, where keepalives alone would wait for ever
        conn = driver.connect(dsn, connect_timeout=CONNECT_TIMEOUT,
                              application_name=application[:63], keepalives=1,
                              keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                              tcp_user_timeout=TCP_USER_TIMEOUT_MS)
    except driver.OperationalError as e:
        raise DatabaseDownError(one_line(e)) from None
    with conn.cursor() as cur:
        cur.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        cur.execute(f"SET search_path = {SCHEMA}")
    conn.commit()
    return conn


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def schema_version(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.schema_version",))
        if cur.fetchone()[0] is None:
            return 0
        cur.execute("SELECT version FROM schema_version")
        row = cur.fetchone()
        return 0 if row is None else int(row[0])


def migrate(conn: Any, where: str) -> int:
    """Bring the schema to SCHEMA_VERSION (-> the version found), or StoreError for a
    newer one, which is left as it is."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        found = schema_version(conn)
        if found > SCHEMA_VERSION:
            raise StoreError(f"fleet database {where} has schema version {found}, newer than "
                             f"this nodepass understands ({SCHEMA_VERSION}); refusing to touch "
                             "it: run a newer nodepass")
        if found == 0:
            cur.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            cur.execute("INSERT INTO schema_version VALUES (0)")
        for target in range(found, SCHEMA_VERSION):
            for statement in MIGRATIONS[target]:
                cur.execute(statement)
            cur.execute("UPDATE schema_version SET version = %s", (target + 1,))
    return found


class Database:
    """Statements for the reactor, run in order in one thread of their own."""

    def __init__(self, reactor: Any, dsn: str, application: str) -> None:
        self.reactor = reactor
        self.dsn = dsn
        self.application = application
        self.where = describe_dsn(dsn)
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="nodepass-db")
        self._conn: Any = None  # the worker thread's alone
        self._stopping = False

    def start(self) -> None:
        self.pool.start()
        # however the master stops, its worker thread must not keep the process alive
        self._trigger = self.reactor.addSystemEventTrigger("after", "shutdown", self.stop)

    def stop(self) -> None:
        if not self.pool.started:
            return
        self._stopping = True  # what is still queued returns at once (_in_thread)
        self.pool.stop()  # waits for the statement in hand, bounded by its timeouts
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run(self, work: Callable[..., T], *args: Any) -> Deferred[T]:
        """``work(connection, *args)`` in one transaction, in the worker thread."""
        return deferToThreadPool(self.reactor, self.pool, self._in_thread, work, args)

    def call(self, work: Callable[..., T], *args: Any) -> Deferred[T]:
        """``work(*args)`` in the worker thread, on no connection of ours (it connects)."""
        return deferToThreadPool(self.reactor, self.pool, self._unless_stopping, work, args)

    def _unless_stopping(self, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._stopping:
            raise DatabaseDownError("the master is stopping")
        return work(*args)

    def _in_thread(self, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._stopping:
            raise DatabaseDownError("the master is stopping")
        driver = psycopg()
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = connect(self.dsn, self.application)
        conn = self._conn
        try:
            with conn.transaction():
                return work(conn, *args)
        except driver.OperationalError as e:
            conn.close()
            self._conn = None
            raise DatabaseDownError(one_line(e)) from None


def rows(conn: Any, sql: str, params: tuple[Any, ...] | Mapping[str, Any] = ()
         ) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []

