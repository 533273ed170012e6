"""The master's state in PostgreSQL: the Store of store.py for a fleet of masters.

What the registry writes goes to an outbox and from there to the database in one
transaction per batch, off the reactor thread.  Writes to the same thing coalesce (an
instance's row, its counters, what it looks like: the latest wins), every write is
idempotent (upserts, deletes, updates by key), and a batch that fails stays in the
outbox and is tried again with backoff -- so while PostgreSQL is away the master keeps
its instances running, says it is degraded, and when PostgreSQL is back nothing
written meanwhile is lost or written twice.  The outbox is bounded: one entry per
instance and kind, plus log lines and traffic samples, of which only the newest
LOG_BACKLOG and TRAFFIC_BACKLOG wait.

Notifications (``pg_notify``) go in the same transaction as the rows they announce, so
a master that hears one finds the row committed.

At start (before the reactor runs) the schema is checked and migrated and this
node's instances are read, synchronously, like the SQLite store.  The node's id is
kept in the state directory (``node.id``), not in the shared database: it is what
tells this master's rows from the others'.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError

from nodepass import __version__, logs
from nodepass.master import pg
from nodepass.master.outbox import Entry, Outbox
from nodepass.master.state import NODE_FILE, StateError, kept_value
from nodepass.master.store import _COUNTERS, StoredInstance, StoreError, row_values

CHANNEL = "nodepass"
NOTICE_LIMIT = 7850  # bytes of a notification's text; PostgreSQL's limit is 8000
MARK_LENGTH = 32
LOG_BACKLOG = 2000
TRAFFIC_BACKLOG = 100_000  # ~30 MB: 8 minutes of 1,000 instances sampled every 5 s
# The heartbeat first; a command's outcome before a delete in the same batch (the asking
# master hears what its command did before it hears the instance is gone); samples and
# log lines, which may pile up while the database is away, last.
ORDER = ("node", "row", "counters", "live", "result", "delete", "traffic", "log")


def mark(secret: bytes, text: str) -> str:
    """An HMAC-SHA256 of ``text`` under the fleet's secret, as 32 hex digits."""
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()[:MARK_LENGTH]


def signed(secret: bytes, text: str) -> str:
    """A notification as masters send it: its mark, then the text.  Any role that can
    connect may NOTIFY; only a master, which can read the secret, can sign."""
    return mark(secret, text) + text


def verified(secret: bytes, payload: str) -> str | None:
    """The text of a notification a master signed, or None."""
    text = payload[MARK_LENGTH:]
    return text if hmac.compare_digest(payload[:MARK_LENGTH], mark(secret, text)) else None


def node_id(folder: Path) -> str:
    """This master's node id (NodePass's ``mid``): 16 hex digits made once and kept in the
    state directory, readable by this user alone."""
    try:
        return kept_value(folder / NODE_FILE, "node id file", lambda: secrets.token_hex(8))[0]
    except StateError as e:
        raise StoreError(str(e)) from None


class PgStore:
    """store.Store's interface, on PostgreSQL (see the module's docstring)."""

    kind = "postgresql"
    log = logs.logger("nodepass.master")

    def __init__(self, dsn: str, folder: Path) -> None:
        self.dsn = pg.check_dsn(dsn)
        self.where = pg.describe_dsn(dsn)
        self.node = node_id(folder)
        self.found_version = 0
        self._loaded: list[StoredInstance] = []
        self._issued: set[str] = set()
        self._alias: str | None = None
        self.interval = 5.0  # the heartbeat's, as the fleet sets it
        self.run = 0  # this run's number, from the database: larger than any earlier run's
        self.secret = b""  # the fleet's own, for what notifications may say of a URL
        self._read_at_start()
        self.outbox = Outbox(ORDER, {"log": LOG_BACKLOG, "traffic": TRAFFIC_BACKLOG},
                             lambda failure: bool(failure.check(pg.DatabaseDownError)))
        self.outbox.on_status.append(self._status_changed)
        self.db: pg.Database | None = None  # once a reactor is there (start)

    def _read_at_start(self) -> None:
        try:
            conn = pg.connect(self.dsn, f"nodepass master {self.node}")
        except pg.DatabaseDownError as e:
            raise StoreError(f"fleet database {self.where} cannot be reached ({e})") from None
        try:
            self.found_version = pg.migrate(conn, self.where)
            with conn.transaction():
                self._issued = {r[0] for r in pg.rows(conn, "SELECT id FROM issued_ids")}
                self._loaded = [_stored(r) for r in pg.rows(
                    conn, f"SELECT {_COLUMNS} FROM instances WHERE node IN (%s, '') "
                          "ORDER BY created_at, id", (self.node,))]
                alias = pg.rows(conn, "SELECT alias FROM nodes WHERE id = %s", (self.node,))
                self._alias = alias[0][0] if alias else None
                self.run = int(pg.rows(conn, "SELECT nextval('runs')")[0][0])
                pg.rows(conn, "INSERT INTO master VALUES ('fleet_secret', %s) ON CONFLICT "
                              "DO NOTHING", (secrets.token_hex(32),))
                self.secret = bytes.fromhex(pg.rows(
                    conn, "SELECT value FROM master WHERE name = 'fleet_secret'")[0][0])
        except pg.psycopg().Error as e:
            raise StoreError(f"fleet database {self.where}: {pg.one_line(e)}") from None
        finally:
            conn.close()

    # -- store.Store's reads (what was there at start) -------------------------

    def load(self) -> list[StoredInstance]:
        return list(self._loaded)

    def issued(self) -> set[str]:
        return set(self._issued)

    def setting(self, name: str) -> str | None:
        if name == "mid":
            return self.node
        if name == "alias":
            return self._alias
        return None

    # -- store.Store's writes, through the outbox ------------------------------

    def save(self, item: StoredInstance) -> None:
        self.outbox.put(("row", item.id), ("row", item))

    def save_counters(self, counters: dict[str, dict[str, int]]) -> None:
        for instance_id, values in counters.items():
            self.outbox.put(("counters", instance_id), ("counters", instance_id, dict(values)))

    def delete(self, instance_id: str) -> None:
        for kind in ("row", "counters", "live"):
            self.outbox.drop((kind, instance_id))
        notice = self.sign(json.dumps({"k": "delete", "n": self.node, "i": instance_id}))
        self.outbox.put(("delete", instance_id), ("delete", instance_id, notice))

    def sign(self, text: str) -> str:
        return signed(self.secret, text)

    def set_setting(self, name: str, value: str) -> None:
        """``mid`` is the node id (kept in the state directory); ``alias`` the node's."""
        if name == "alias":
            self._alias = value
            self.heartbeat(self.interval)

    def heartbeat(self, interval: float) -> None:
        """This node is alive, and says so again every ``interval`` seconds."""
        self.interval = interval
        self.outbox.put(("node",), ("node", self._alias or "", interval))

    def durable(self) -> Deferred[bool]:
        return self.outbox.durable()

    @property
    def degraded(self) -> str | None:
        return self.outbox.degraded

    # -- running -----------------------------------------------------------------

    def start(self, reactor: Any) -> None:
        self.db = pg.Database(reactor, self.dsn, f"nodepass master {self.node}")
        self.db.start()
        self.outbox.start(reactor, self._write)

    def _write(self, entries: list[Entry], careful: bool) -> Deferred[list[tuple[Entry, str]]]:
        assert self.db is not None
        return self.db.run(write_batch, self.node, entries, careful)

    def _status_changed(self, why: str | None) -> None:
        if why is None:
            self.log.info("fleet database {where} reachable again: the writes that waited "
                          "are in", where=self.where)
        else:
            self.log.error("fleet database {where} unreachable ({why}): instances keep "
                           "running, writes wait and are retried", where=self.where, why=why)

    async def close_async(self, grace: float) -> None:
        """Send what waits (for at most ``grace`` seconds), then stop the worker."""
        if self.db is None:
            return
        if len(self.outbox) and not self.degraded:
            try:
                await self.durable().addTimeout(grace, self.db.reactor)
            except (CancelledError, TimeoutError):
                pass
        self.outbox.stop()
        if len(self.outbox):
            self.log.warn("{n} writes could not reach the fleet database before the master "
                          "stopped", n=len(self.outbox))
        db, self.db = self.db, None
        db.stop()  # waits for the statement in hand, bounded by its timeouts

    def close(self) -> None:
        """Nothing to do synchronously (close_async sends what waits)."""


_COLUMNS = ("id, url, created_at, desired, alias, tags, restart, restarts, tcp_in, "
            "tcp_out, udp_in, udp_out, peer")


def _stored(row: tuple[Any, ...]) -> StoredInstance:
    return StoredInstance(
        id=row[0], url=row[1], created_at=row[2], desired=row[3], alias=row[4],
        tags=json.loads(row[5] or "{}"), restart=bool(row[6]), restarts=row[7],
        counters=dict(zip(_COUNTERS, row[8:12], strict=True)), peer=json.loads(row[12] or "{}"))


def write_batch(conn: Any, node: str, ops: Iterable[Entry], careful: bool = False
                ) -> list[tuple[Entry, str]]:
    """One batch of the outbox, in the worker thread, in one transaction: the kinds that
    come by the thousand (how instances look, samples, log lines) a statement per kind,
    pipelined.  ``careful``: each entry in a savepoint of its own, and those PostgreSQL
    refuses for what they are (not for a lost connection) are left out -> [(entry,
    why)]."""
    if not careful:
        for kind, group in itertools.groupby(ops, key=lambda op: op[0]):
            many = MANY.get(kind)
            if many is None:
                for op in group:
                    write_one(conn, node, op)
                continue
            entries = list(group)
            with conn.cursor() as cur:
                for sql, params in many:
                    cur.executemany(sql, [params(op, node) for op in entries])
        return []
    refused = []
    psycopg = pg.psycopg()
    for op in ops:
        try:
            with conn.transaction():
                write_one(conn, node, op)
        except psycopg.OperationalError:
            raise
        except Exception as e:  # this entry's own fault (or ours): it alone is left out
            refused.append((op, pg.one_line(e)))
    return refused


_NOTIFY = "SELECT pg_notify('" + CHANNEL + "', %s)"
# the kinds written many at a time: (statement, its parameters from an entry) in turn
MANY: dict[str, list[tuple[str, Callable[[Entry, str], tuple[Any, ...]]]]] = {
    "live": [("UPDATE instances SET live = %s WHERE id = %s AND node = %s",
              lambda op, node: (op[3], op[1], node)),
             (_NOTIFY, lambda op, node: (op[4],))],
    "traffic": [("INSERT INTO traffic VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                 lambda op, node: op[1:])],
    "log": [(_NOTIFY, lambda op, node: (op[1],))],
}


def write_one(conn: Any, node: str, op: Entry) -> None:
    with conn.cursor() as cur:
        kind = op[0]
        if kind in MANY:
            for sql, params in MANY[kind]:
                cur.execute(sql, params(op, node))
        elif kind == "node":
            cur.execute(
                "INSERT INTO nodes (id, alias, version, heartbeat, heartbeat_at) "
                "VALUES (%s, %s, %s, %s, now()) ON CONFLICT (id) DO UPDATE SET "
                "alias = excluded.alias, version = excluded.version, heartbeat = "
                "excluded.heartbeat, heartbeat_at = now()",
                (node, op[1], __version__, op[2]))
        elif kind == "row":
            item: StoredInstance = op[1]
            cur.execute("INSERT INTO issued_ids VALUES (%s) ON CONFLICT DO NOTHING",
                        (item.id,))
            cur.execute(
                f"INSERT INTO instances ({_COLUMNS}, node) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET url = excluded.url, desired = "
                "excluded.desired, alias = excluded.alias, tags = excluded.tags, restart = "
                "excluded.restart, restarts = excluded.restarts, tcp_in = excluded.tcp_in, "
                "tcp_out = excluded.tcp_out, udp_in = excluded.udp_in, udp_out = "
                "excluded.udp_out, peer = excluded.peer, node = excluded.node "
                # another node's row is never taken over (an id both made at once)
                "WHERE instances.node IN (excluded.node, '')",
                (*row_values(item), node))
        elif kind == "counters":
            values = op[2]
            cur.execute("UPDATE instances SET tcp_in = %s, tcp_out = %s, udp_in = %s, "
                        "udp_out = %s WHERE id = %s",
                        (*(int(values.get(k, 0)) for k in _COUNTERS), op[1]))
        elif kind == "delete":
            _, instance_id, notice = op
            cur.execute("DELETE FROM instances WHERE id = %s AND node IN (%s, '')",
                        (instance_id, node))
            cur.execute("DELETE FROM traffic WHERE instance_id = %s", (instance_id,))
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, notice))
        elif kind == "result":
            _, command_id, state, result, notice = op
            cur.execute("UPDATE commands SET state = %s, result = %s, done_at = now() "
                        "WHERE id = %s", (state, result, command_id))
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, notice))
        else:
            raise ValueError(f"unknown outbox entry {kind!r}")
