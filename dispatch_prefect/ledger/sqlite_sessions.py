"""SQLite's hot path: one driver connection per thread, kept open.

A reservation is a handful of statements that SQLite runs in about 60 us;
checking a connection out of SQLAlchemy's pool and back in (with the reset
on return) cost more than that again, on every call. ``check``,
``reserve``, ``reconcile`` and ``release`` on SQLite therefore run on one
connection per thread, opened through the engine (so it gets the ledger's
pragmas from the engine's connect hook) and then detached from the pool.

Prefect's thread pools start new threads for every flow run, so a
thread's connection is closed when the thread ends (``_ClosedWithThread``)
and its record is dropped when the next thread opens one: a long-lived
process keeps one connection per live thread, not one per thread it ever
ran.

A forked child opens its own connections: a SQLite connection must not be
used across ``fork``.

``run_step`` runs the hot writes (reserve and settle) through the
database's ``WriteGroup``: one writer commits the steps of the others
waiting, in one transaction and one fsync (see ``group_commit``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dispatch_prefect.ledger.engine import (
    WriterQueue,
    describe_driver_failure,
    describe_failure,
)
from dispatch_prefect.ledger.errors import LedgerError, LedgerUnavailable
from dispatch_prefect.ledger.group_commit import (
    LEAD_FOR_S,
    Leadership,
    Request,
    WriteGroup,
)

__all__ = ["SqliteSessions", "Step"]

T = TypeVar("T")

logger = logging.getLogger("dispatch_prefect.ledger")

# ``step(cursor, body) -> answer``, JSON in and out; see ``group_commit``.
Step = Callable[[sqlite3.Cursor, Any], Any]


class SqliteSessions:
    """Per-thread SQLite connections for the ledger's hot statements."""

    def __init__(
        self,
        engine: Engine,
        *,
        writers: WriterQueue | None,
        lock_timeout_s: float,
        where: str,
        steps: Mapping[str, Step] | None = None,
        database: Path | None = None,
    ) -> None:
        self._engine = engine
        self._steps = dict(steps or {})
        # Groups of writers by the identity of the database file; none
        # where groups cannot form.
        self._database = database if WriteGroup.possible() else None
        self._groups: dict[tuple[int, int], WriteGroup] = {}
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
                begin = "BEGIN IMMEDIATE" if write else "BEGIN"
                result = _transaction(connection, begin, work)
        except sqlite3.Error as exc:
            unavailable = isinstance(exc, sqlite3.OperationalError)
            raise describe_driver_failure(
                exc, where=self._where, unavailable=unavailable
            ) from exc

        return result

    def run_step(self, step: str, body: Any) -> Any:
        """Run the registered ``step`` in a write transaction; its answer.

        With a group, the step is committed by whichever writer leads, this
        one or another; without, it runs alone like ``run``.

        Raises:
            LedgerUnavailable: the lock was not had before the timeout.
            LedgerError: any other database failure; nothing was changed.
        """
        group = self._group()
        if group is None:
            work = self._steps[step]
            return self.run(lambda cursor: work(cursor, body), write=True)

        request = Request(step, body, time.monotonic() + self._lock_timeout_s)
        for failures in itertools.count():
            if not group.connected():
                leadership = group.lead()
                if leadership is not None:
                    with leadership:
                        return self._lead(leadership, request)
            try:
                answer = group.ask(request)
            except TimeoutError:
                raise LedgerUnavailable(
                    f"the ledger at {self._where} did not answer in time; the "
                    "step may or may not have been committed: calling it again "
                    "with the same key is safe"
                ) from None
            if answer is not None:
                return self._unpack(answer)
            if time.monotonic() >= request.deadline:
                raise self._timed_out()
            if failures:
                # No leader yet, or one between binding and listening.
                time.sleep(min(0.0001 * failures, 0.002))

        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close every connection opened so far; threads open new ones if used."""
        with self._guard:
            opened, self._opened = self._opened, []
            self._local = threading.local()
        for entry in opened:
            with contextlib.suppress(Exception):
                entry.pooled.close()

    def _group(self) -> WriteGroup | None:
        """The group this thread's connection may lead or join, if any.

        Only while the database path still names the file the connection
        opened: a leader must commit each step into the file its writer
        meant.
        """
        if self._database is None:
            return None
        try:
            self._connection()
        except sa.exc.SQLAlchemyError as exc:
            raise describe_failure(exc, where=self._where) from exc
        opened = self._local.identity
        if opened is None or opened != _identity(self._database):
            return None
        group = self._groups.get(opened)
        if group is None:
            group = self._groups.setdefault(opened, WriteGroup(opened))

        return group

    def _lead(self, leadership: Leadership, own: Request) -> Any:
        """Commit rounds of steps, this writer's own first; its answer."""
        connection = self._connection()
        started = time.monotonic()
        answer: Any = None
        turn: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if self._writers is not None:
            turn = self._writers.turn(timeout_s=max(own.deadline - started, 0.001))
        with turn:
            batch = [own]
            while batch:
                for request, outcome in zip(
                    batch, self._commit_round(connection, batch), strict=True
                ):
                    if request.peer is None:
                        answer = outcome
                    else:
                        leadership.answer(request, outcome)
                if time.monotonic() - started >= LEAD_FOR_S:
                    break
                batch = leadership.collect()

        return self._unpack(answer)

    def _commit_round(
        self, connection: sqlite3.Connection, batch: list[Request]
    ) -> list[dict[str, Any]]:
        """Run each step of ``batch`` in its savepoint; one commit for all."""
        try:
            return _transaction(
                connection,
                "BEGIN IMMEDIATE",
                lambda cursor: [self._run_in_savepoint(cursor, r) for r in batch],
            )
        except sqlite3.Error as exc:
            return [_failure(exc)] * len(batch)

    def _run_in_savepoint(
        self, cursor: sqlite3.Cursor, request: Request
    ) -> dict[str, Any]:
        if request.peer is not None and time.monotonic() >= request.deadline:
            return {"expired": True}
        work = self._steps.get(request.step)
        if work is None:
            return {"error": f"no step named {request.step!r}", "unavailable": False}

        cursor.execute("SAVEPOINT step")
        try:
            answer = {"ok": work(cursor, request.body)}
        except Exception as exc:
            cursor.execute("ROLLBACK TO step")
            if not isinstance(exc, sqlite3.Error):
                logger.exception("the ledger step %r failed", request.step)
            answer = _failure(exc)
        cursor.execute("RELEASE step")

        return answer

    def _unpack(self, answer: dict[str, Any]) -> Any:
        if "ok" in answer:
            return answer["ok"]
        if "expired" in answer:
            raise self._timed_out()
        message = str(answer.get("error", "no answer"))
        if answer.get("unavailable"):
            raise LedgerUnavailable(
                f"the ledger at {self._where} cannot be used right now "
                f"({message}); check that the database is reachable and not "
                "held by a long transaction, then retry; nothing was changed"
            )
        raise LedgerError(f"the ledger at {self._where} failed: {message}")

    def _timed_out(self) -> LedgerUnavailable:
        return LedgerUnavailable(
            f"the ledger at {self._where} stayed locked for more than "
            f"{self._lock_timeout_s} s; check for a stuck process using the "
            "ledger, then retry; nothing was changed"
        )

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) == os.getpid():
            return cast(sqlite3.Connection, local.connection)

        pooled = self._engine.raw_connection()
        connection = cast(sqlite3.Connection, pooled.dbapi_connection)
        pooled.detach()
        opened = _Opened(pooled, threading.current_thread(), os.getpid())
        with self._guard:
            # Threads that ended closed their connections as they ended.
            alive = [entry for entry in self._opened if not entry.ended()]
            self._opened = [*alive, opened]
        local.connection = connection
        local.closer = _ClosedWithThread(pooled)
        local.pid = opened.pid
        local.identity = None if self._database is None else _identity(self._database)

        return connection


def _transaction(
    connection: sqlite3.Connection, begin: str, work: Callable[[sqlite3.Cursor], T]
) -> T:
    """``work(cursor)`` between ``begin`` and ``COMMIT``; rolled back if it fails."""
    cursor = connection.cursor()
    try:
        cursor.execute(begin)
        result = work(cursor)
        cursor.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                connection.rollback()
        raise
    finally:
        cursor.close()

    return result


def _identity(database: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file at ``database``; None when missing."""
    try:
        found = os.stat(database)
    except OSError:
        return None

    return found.st_dev, found.st_ino


def _failure(exc: BaseException) -> dict[str, Any]:
    """The answer for a step or a round that failed: nothing was changed."""
    detail = str(exc).strip().splitlines()
    reason = detail[0] if detail else exc.__class__.__name__

    return {
        "error": reason,
        "unavailable": isinstance(exc, sqlite3.OperationalError | LedgerUnavailable),
    }


class _ClosedWithThread:
    """Closes a thread's connection when the thread ends.

    Kept in the thread's local storage, which Python empties when the
    thread ends, so the connection closes then rather than waiting for the
    next thread to open one. Only in the process that opened it: a forked
    child must not touch its parent's connections.
    """

    def __init__(self, pooled: Any) -> None:
        self._pooled = pooled
        self._pid = os.getpid()

    def __del__(self) -> None:
        if os.getpid() == self._pid:
            with contextlib.suppress(Exception):
                self._pooled.close()


@dataclass(frozen=True)
class _Opened:
    """A kept connection and the thread (of which process) it belongs to."""

    pooled: Any
    thread: threading.Thread
    pid: int

    def ended(self) -> bool:
        """Its thread in this process has ended: nothing can use it again."""
        return self.pid == os.getpid() and not self.thread.is_alive()
