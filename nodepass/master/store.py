"""The master's durable state: an embedded SQLite database in the state directory.

WAL mode; each change is committed before the API confirms it.  The schema is
versioned (``PRAGMA user_version``) and migrated forward at start; a database
from a newer nodepass, or one that is not a SQLite database, is refused — never
replaced.  ``persist=0`` keeps everything in memory, as the seed's master did.

sqlite3 calls block, briefly, on the reactor thread: each is one small write,
and a thread pool would buy nothing but ordering problems.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed

SCHEMA_VERSION = 3
DB_FILE = "nodepass.db"

# Each entry brings a database from version i to i + 1.
MIGRATIONS: list[list[str]] = [
    [  # 0 -> 1: the first released schema
        "CREATE TABLE instances (id TEXT PRIMARY KEY, url TEXT NOT NULL,"
        " created_at REAL NOT NULL, desired TEXT NOT NULL)",
    ],
    [  # 1 -> 2: metadata, restart policy, cumulative counters, ids never reused
        "ALTER TABLE instances ADD COLUMN alias TEXT",
        "ALTER TABLE instances ADD COLUMN tags TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE instances ADD COLUMN restart INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN tcp_in INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN tcp_out INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN udp_in INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN udp_out INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE issued_ids (id TEXT PRIMARY KEY)",
        "INSERT OR IGNORE INTO issued_ids SELECT id FROM instances",
    ],
    [  # 2 -> 3: NodePass's meta.peer per instance; the master's own id and alias
        "ALTER TABLE instances ADD COLUMN peer TEXT NOT NULL DEFAULT '{}'",
        "CREATE TABLE master (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
]
assert len(MIGRATIONS) == SCHEMA_VERSION


class StoreError(Exception):
    """The state database cannot be used; one line for the user."""


@dataclass
class StoredInstance:
    id: str
    url: str
    created_at: float
    desired: str = "running"
    alias: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    restart: bool = False
    restarts: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    peer: dict[str, str] = field(default_factory=dict)


_COUNTERS = ("tcp_in", "tcp_out", "udp_in", "udp_out")


class Store:
    kind = "sqlite"

    def __init__(self, path: Path | None) -> None:
        self.path = path
        where = str(path) if path is not None else ":memory:"
        # Everything is checked before anything is written (WAL mode changes the file).
        try:
            if path is not None:
                _create_private(path)
            self.db = sqlite3.connect(where, isolation_level=None)
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if self.db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"state database {where!r} is unreadable or corrupt ({e}); "
                             "refusing to replace it: move it away to start afresh") from None
        if version > SCHEMA_VERSION:
            self.db.close()
            raise StoreError(f"state database {where!r} has schema version {version}, newer "
                             f"than this nodepass understands ({SCHEMA_VERSION}); refusing to "
                             "touch it: run a newer nodepass")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._migrate(version)

    @classmethod
    def open(cls, folder: Path | None) -> Store:
        return cls(folder / DB_FILE if folder is not None else None)

    def _migrate(self, version: int) -> None:
        for target in range(version, SCHEMA_VERSION):
            with self._transaction():
                for statement in MIGRATIONS[target]:
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={target + 1}")

    def _transaction(self) -> Any:
        return _Transaction(self.db)

    # -- reads ---------------------------------------------------------------

    def load(self) -> list[StoredInstance]:
        rows = self.db.execute(
            "SELECT id, url, created_at, desired, alias, tags, restart, restarts, "
            "tcp_in, tcp_out, udp_in, udp_out, peer FROM instances ORDER BY created_at, id")
        loaded = []
        for row in rows:
            loaded.append(StoredInstance(
                id=row[0], url=row[1], created_at=row[2], desired=row[3], alias=row[4],
                tags=json.loads(row[5] or "{}"), restart=bool(row[6]), restarts=row[7],
                counters=dict(zip(_COUNTERS, row[8:12], strict=True)),
                peer=json.loads(row[12] or "{}")))
        return loaded

    def setting(self, name: str) -> str | None:
        """One of the master's own values (``mid``, ``alias``), or None when never set."""
        row = self.db.execute("SELECT value FROM master WHERE name=?", (name,)).fetchone()
        return None if row is None else row[0]

    def issued(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT id FROM issued_ids")}

    # -- writes (each one committed before it returns) -----------------------

    def save(self, item: StoredInstance) -> None:
        with self._transaction():
            self.db.execute("INSERT OR IGNORE INTO issued_ids VALUES (?)", (item.id,))
            self.db.execute(
                "INSERT INTO instances (id, url, created_at, desired, alias, tags, restart, "
                "restarts, tcp_in, tcp_out, udp_in, udp_out, peer) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET url=excluded.url, desired=excluded.desired, "
                "alias=excluded.alias, tags=excluded.tags, restart=excluded.restart, "
                "restarts=excluded.restarts, tcp_in=excluded.tcp_in, tcp_out=excluded.tcp_out, "
                "udp_in=excluded.udp_in, udp_out=excluded.udp_out, peer=excluded.peer",
                row_values(item))

    def set_setting(self, name: str, value: str) -> None:
        with self._transaction():
            self.db.execute("INSERT INTO master VALUES (?, ?) "
                            "ON CONFLICT(name) DO UPDATE SET value=excluded.value", (name, value))

    def save_counters(self, counters: dict[str, dict[str, int]]) -> None:
        if not counters:
            return
        with self._transaction():
            self.db.executemany(
                "UPDATE instances SET tcp_in=?, tcp_out=?, udp_in=?, udp_out=? WHERE id=?",
                [(*(int(c.get(k, 0)) for k in _COUNTERS), instance_id)
                 for instance_id, c in counters.items()])

    def delete(self, instance_id: str) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM instances WHERE id=?", (instance_id,))

    def durable(self) -> Deferred[bool]:
        """Every write above is committed before it returns (pgstore.py's may wait)."""
        return succeed(True)

    def close(self) -> None:
        self.db.close()


def row_values(item: StoredInstance) -> tuple[Any, ...]:
    """An instance's row, column by column (store's and pgstore's ``instances``)."""
    return (item.id, item.url, item.created_at, item.desired, item.alias,
            json.dumps(item.tags, sort_keys=True), int(item.restart), item.restarts,
            *(int(item.counters.get(c, 0)) for c in _COUNTERS),
            json.dumps(item.peer, sort_keys=True))


def _create_private(path: Path) -> None:
    """Make the database file 0600 before SQLite would make it 0644: it holds instance
    URLs with their tunnel keys, and SQLite gives its -wal, -shm and -journal files the
    database file's mode."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as e:
        raise StoreError(f"state database {str(path)!r} cannot be opened ({e.strerror})") \
            from None


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
