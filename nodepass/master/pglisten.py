"""PostgreSQL's notifications, read by the reactor.

One connection of its own LISTENs on the fleet's channel; once it is set up (in the
database's worker thread, which connects), the reactor watches its socket like any
other and hands each notification over as it arrives -- no thread waits on it.  When
the connection breaks, it is opened again with backoff, and ``on_up`` is told each
time it is (re)established: notifications sent meanwhile are lost, so what they would
have said must be read again from the tables.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass import logs
from nodepass.backoff import backoff
from nodepass.master import pg

RETRY_FIRST = 0.5


@implementer(IReadDescriptor)
class Listener:
    log = logs.logger("nodepass.master")

    def __init__(self, reactor: Any, db: pg.Database, channel: str,
                 on_notice: Callable[[str], None], on_up: Callable[[], None],
                 on_down: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.db = db
        self.channel = channel
        self.on_notice = on_notice
        self.on_up = on_up
        self.on_down = on_down
        self.conn: Any = None
        # The reactor watches a duplicate of the connection's socket: libpq closes its
        # own the moment the connection breaks, before the reactor could stop watching it
        # (and the number may already belong to another connection by then).
        self._fd = -1
        self._attempts = 0
        self._delay = backoff(RETRY_FIRST)
        self._retry: Any = None
        self._stopped = True

    def start(self) -> None:
        self._stopped = False
        self._connect()

    def stop(self) -> None:
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._drop()

    def _connect(self) -> None:
        self._retry = None
        d = self.db.call(self._open)
        d.addCallbacks(self._opened, self._not_opened)

    def _open(self) -> Any:
        """In the worker thread: a connection of its own, listening."""
        conn = pg.connect(self.db.dsn, self.db.application + " (listen)")
        conn.autocommit = True
        try:
            conn.execute(f"LISTEN {self.channel}")
        except pg.psycopg().Error as e:
            conn.close()
            raise pg.DatabaseDownError(pg.one_line(e)) from None
        return conn

    def _opened(self, conn: Any) -> None:
        if self._stopped:
            conn.close()
            return
        try:
            fd = os.dup(conn.pgconn.socket)
        except (OSError, pg.psycopg().Error) as e:
            conn.close()
            self._not_opened(Failure(pg.DatabaseDownError(pg.one_line(e))))
            return
        self.conn, self._fd = conn, fd
        self._attempts = 0
        self.reactor.addReader(self)
        self.on_up()

    def _not_opened(self, failure: Failure) -> None:
        if self._stopped:
            return
        self._attempts += 1
        if self._attempts == 1:
            self.on_down(pg.one_line(failure.value))
        self._retry = self.reactor.callLater(self._delay(self._attempts), self._connect)

    # -- IReadDescriptor -------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "pg-listen"

    def doRead(self) -> Failure | None:
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
        except pg.psycopg().Error as e:
            return Failure(pg.DatabaseDownError(pg.one_line(e)))
        while (notice := pgconn.notifies()) is not None:
            try:
                self.on_notice(notice.extra.decode("utf-8", "replace"))
            except Exception:
                self.log.failure("a fleet notification could not be handled")
        if pgconn.status != 0:  # CONNECTION_OK
            return Failure(pg.DatabaseDownError("the notification connection broke"))
        return None

    def connectionLost(self, reason: Failure) -> None:
        why = pg.one_line(reason.value)
        self._drop()
        if self._stopped:
            return
        self.on_down(why)
        self._attempts = 1
        self._retry = self.reactor.callLater(self._delay(self._attempts), self._connect)

    def _drop(self) -> None:
        if self.conn is None:
            return
        self.reactor.removeReader(self)
        os.close(self._fd)
        self._fd = -1
        conn, self.conn = self.conn, None
        conn.close()
