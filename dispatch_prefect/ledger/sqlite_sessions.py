"""SQLite's hot path: one driver connection per thread, kept open.

A reservation is a handful of statements that SQLite runs in about 60 us;
checking a connection out of SQLAlchemy's pool and back in (with the reset
on return) cost more than that again, on every call. ``check``,
``reserve``, ``reconcile`` and ``release`` on SQLite therefore run on one
connection per thread, opened through the engine (so it gets the ledger's
pragmas from the engine's connect hook) and then detached from the pool.

A thread that ends leaves its connection behind (Prefect's thread pools
start new threads for every flow run), so whenever a thread opens one, the
connections of threads that have ended are closed: a long-lived process
keeps about one connection per live thread, not one per thread it ever
ran.

A forked child opens its own connections: a SQLite connection must not be
used across ``fork``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dispatch_prefect.ledger.engine import (
    WriterQueue,
    describe_driver_failure,
    describe_failure,
)

__all__ = ["SqliteSessions"]

T = TypeVar("T")


class SqliteSessions:
    """Per-thread SQLite connections for the ledger's hot statements."""

    def __init__(
        self,
        engine: Engine,
        *,
        writers: WriterQueue | None,
        lock_timeout_s: float,
        where: str,
    ) -> None:
        self._engine = engine
        self._writers = writers
        self._lock_timeout_s = lock_timeout_s
        self._where = where
        self._local = threading.local()
        self._guard = threading.Lock()
        # Each connection opened, with the thread and process that opened it.
        self._opened: list[_Opened] = []

    def run(self, work: Callable[[sqlite3.Cursor], T], *, write: bool) -> T:
        """Run ``work(cursor)`` in one transaction on this thread's connection.

        A write begins with ``BEGIN IMMEDIATE`` (after the writer's turn in
        the queue), so the write lock is held before the first read.

        Raises:
            LedgerUnavailable: the database stayed locked past the timeout
                or cannot be opened.
            LedgerError: any other database failure; nothing was changed.
        """
        try:
            connection = self._connection()
        except sa.exc.SQLAlchemyError as exc:
            raise describe_failure(exc, where=self._where) from exc

        turn: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if write and self._writers is not None:
            turn = self._writers.turn(timeout_s=self._lock_timeout_s)

        try:
            with turn:
                cursor = connection.cursor()
                try:
                    cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    result = work(cursor)
                    cursor.execute("COMMIT")
                except BaseException:
                    if connection.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            connection.rollback()
                    raise
                finally:
                    cursor.close()
        except sqlite3.Error as exc:
            unavailable = isinstance(exc, sqlite3.OperationalError)
            raise describe_driver_failure(
                exc, where=self._where, unavailable=unavailable
            ) from exc

        return result

    def close(self) -> None:
        """Close every connection opened so far; threads open new ones if used."""
        with self._guard:
            opened, self._opened = self._opened, []
            self._local = threading.local()
        for entry in opened:
            with contextlib.suppress(Exception):
                entry.pooled.close()

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) == os.getpid():
            return cast(sqlite3.Connection, local.connection)

        pooled = self._engine.raw_connection()
        connection = cast(sqlite3.Connection, pooled.dbapi_connection)
        pooled.detach()
        opened = _Opened(pooled, threading.current_thread(), os.getpid())
        with self._guard:
            ended = [entry for entry in self._opened if entry.ended()]
            self._opened = [e for e in self._opened if e not in ended] + [opened]
        for entry in ended:
            with contextlib.suppress(Exception):
                entry.pooled.close()
        local.connection = connection
        local.pid = opened.pid

        return connection


@dataclass(frozen=True)
class _Opened:
    """A kept connection and the thread (of which process) it belongs to."""

    pooled: Any
    thread: threading.Thread
    pid: int

    def ended(self) -> bool:
        """Its thread in this process has ended: nothing can use it again."""
        return self.pid == os.getpid() and not self.thread.is_alive()
