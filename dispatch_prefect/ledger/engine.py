"""Connections to the ledger database: URLs, durability, locks, failures.

SQLite runs in WAL mode with ``synchronous=FULL``: every commit is on disk
(the WAL is synced) before ``reserve`` or ``reconcile`` returns, so a power
cut cannot lose a reservation that was reported as made. Writes begin with
``BEGIN IMMEDIATE``, which takes the database write lock before the read
that decides admission; two processes can therefore never both read the
same totals and both write. Readers are not blocked by the writer. Ledger
writers queue for their turn on a lock file beside the database
(``WriterQueue``), which hands the write lock over without SQLite's sleeps;
single reservations and settlements go further and are committed in groups
by whichever writer holds the turn (``group_commit``).

PostgreSQL runs at READ COMMITTED; the write paths lock the rows of the
windows they change (see ``store``), and ``lock_timeout`` bounds every wait.

A database that cannot be reached, or that stays locked longer than the
timeout, raises ``LedgerUnavailable``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from dispatch_prefect.ledger.errors import (
    LedgerError,
    LedgerInputError,
    LedgerUnavailable,
)

__all__ = [
    "LEDGER_URL_ENV",
    "SQLITE_PAGE_BYTES",
    "WRITE_OPTION",
    "WriterQueue",
    "default_url",
    "describe_driver_failure",
    "describe_failure",
    "is_retryable",
    "is_retryable_driver_error",
    "make_engine",
    "normalize_url",
]

logger = logging.getLogger("dispatch_prefect.ledger")

LEDGER_URL_ENV = "DISPATCH_PREFECT_LEDGER_URL"

# Execution option that makes a SQLite transaction take the write lock at
# BEGIN (``BEGIN IMMEDIATE``) instead of at its first write.
WRITE_OPTION = "dispatch_ledger_write"

SQLITE_PAGE_BYTES = 1024

# Serialization failure and deadlock: the transaction did nothing; run it
# again. A unique violation is a key another writer added meanwhile: the
# next run finds it. A prepared statement that is gone (something sent
# DEALLOCATE ALL or DISCARD ALL on the connection): ``pg`` forgets what it
# had prepared there, and the next run prepares again.
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "23505", "26000"})


def default_url() -> str:
    """``$DISPATCH_PREFECT_LEDGER_URL``, else a SQLite file under PREFECT_HOME."""
    configured = os.environ.get(LEDGER_URL_ENV)
    if configured:
        return configured

    from prefect.settings import get_current_settings

    path = Path(get_current_settings().home) / "dispatch_prefect" / "ledger.db"

    return f"sqlite:///{path}"


def normalize_url(url: str) -> URL:
    """Parse ``url`` and pick the driver the ledger uses for its database.

    ``postgresql://`` (and ``postgres://``) become ``postgresql+psycopg://``;
    ``sqlite:///path`` stays as it is.

    Raises:
        LedgerInputError: not a SQLite file or PostgreSQL URL.
    """
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise LedgerInputError(
            "the ledger URL cannot be parsed; write it as "
            "'sqlite:////absolute/path/ledger.db' or "
            "'postgresql://user@host:5432/database'"
        ) from exc

    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")

    if backend == "sqlite" and driver in ("", "pysqlite"):
        if parsed.database in (None, "", ":memory:"):
            raise LedgerInputError(
                "an in-memory SQLite ledger forgets every reservation when it "
                "closes; give a file: 'sqlite:////absolute/path/ledger.db'"
            )
        return parsed.set(drivername="sqlite+pysqlite")

    raise LedgerInputError(
        f"the ledger runs on SQLite or PostgreSQL (psycopg 3), not "
        f"{parsed.drivername!r}; use 'sqlite:///...' or 'postgresql://...'"
    )


def make_engine(
    url: URL, *, lock_timeout_s: float, pg_schema: str | None = None
) -> Engine:
    """An engine for ``url`` with the ledger's durability and lock settings."""
    if url.get_backend_name() == "sqlite":
        if pg_schema is not None:
            raise LedgerInputError(
                f"schema {pg_schema!r} applies to PostgreSQL only; for SQLite "
                "give another file instead"
            )
        return _sqlite_engine(url, lock_timeout_s=lock_timeout_s)

    return _postgres_engine(url, lock_timeout_s=lock_timeout_s, pg_schema=pg_schema)


def _sqlite_engine(url: URL, *, lock_timeout_s: float) -> Engine:
    database = url.database or ""
    if not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)

    engine = sa.create_engine(
        url,
        connect_args={"timeout": lock_timeout_s, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: object) -> None:
        # The driver must not open transactions on its own: the "begin"
        # hook below chooses BEGIN or BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # Only a new, empty database takes it (before WAL is on): a
            # writer holds the lock through the fsync of every page it
            # touched, and a reservation touches about six. Measured here,
            # six 1 KiB pages commit 10% slower than one; 4 KiB ones 35%.
            cursor.execute(f"PRAGMA page_size={SQLITE_PAGE_BYTES}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        writes = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")

    return engine


def _postgres_engine(
    url: URL, *, lock_timeout_s: float, pg_schema: str | None
) -> Engine:
    options = f"-c lock_timeout={max(1, round(lock_timeout_s * 1000))}"
    if pg_schema is not None:
        if not pg_schema.replace("_", "").isalnum():
            raise LedgerInputError(
                f"schema {pg_schema!r} must be letters, digits and underscores"
            )
        options += f" -c search_path={pg_schema}"

    connect_args = {
        "connect_timeout": max(1, round(lock_timeout_s)),
        "application_name": "dispatch_prefect.ledger",
        "options": options,
        # psycopg prepares a query on its own after five runs, and on every
        # ROLLBACK it then sends DEALLOCATE ALL, which would also drop the
        # statements the hot path prepared by name (``pg``). The hot path
        # prepares what it needs; listings do not need it.
        "prepare_threshold": None,
    }

    return sa.create_engine(url, connect_args=connect_args)


class WriterQueue:
    """Hands SQLite's write lock from one ledger writer to the next at once.

    SQLite's busy handler polls: a waiting writer sleeps up to 100 ms between
    tries, so under contention the write lock sits free while every waiter
    sleeps, and eight processes reach a fraction of the commits the disk
    allows. Ledger writers therefore queue on an advisory ``flock`` of a
    file beside the database first; the kernel wakes the next one the moment
    the lock is let go. Correctness does not rest on it: ``BEGIN IMMEDIATE``
    still takes SQLite's own lock, so other writers (and a deleted lock
    file) are safe. Without ``fcntl`` (Windows) writers rely on SQLite alone.

    A blocking ``flock`` cannot time out, so a writer that has to wait hands
    the wait to one long-lived helper thread of this queue and waits for it
    with its timeout. The helper is started on the first wait, not per wait:
    starting a thread for every wait cost a third of the throughput with
    eight processes on two cores.
    """

    def __init__(self, database: Path) -> None:
        self._path = f"{database}.lock"
        self._guard = threading.Lock()
        self._requests: queue.SimpleQueue[_FlockWait | None] = queue.SimpleQueue()
        self._helper: threading.Thread | None = None

    @contextlib.contextmanager
    def turn(self, *, timeout_s: float) -> Iterator[None]:
        """Wait for this writer's turn, at most ``timeout_s`` seconds.

        Raises:
            LedgerUnavailable: another writer held its turn past the timeout.
        """
        if fcntl is None:
            yield
            return

        descriptor = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._wait(descriptor, timeout_s)
        except BaseException:
            os.close(descriptor)
            raise
        try:
            yield
        finally:
            os.close(descriptor)  # lets the next writer in

    def close(self) -> None:
        """Let the helper thread end once it has no wait left to serve."""
        with self._guard:
            if self._helper is not None and self._helper.is_alive():
                self._requests.put(None)
            self._helper = None

    def _wait(self, descriptor: int, timeout_s: float) -> None:
        """Block until the helper holds the lock for ``descriptor``.

        On a timeout the helper keeps the descriptor and closes it once it
        gets the lock, so the caller never closes a descriptor still in use.
        """
        wait = _FlockWait(descriptor)
        with self._guard:
            if self._helper is None or not self._helper.is_alive():
                # None yet, or this is a forked child that has no threads.
                self._requests = queue.SimpleQueue()
                self._helper = threading.Thread(
                    target=_serve_flock_waits,
                    args=(self._requests,),
                    name="ledger-writer-turn",
                    daemon=True,
                )
                self._helper.start()
            self._requests.put(wait)
        if wait.granted.acquire(timeout=timeout_s):
            return

        with wait.guard:
            if wait.granted.acquire(blocking=False):
                return
            wait.gave_up = True
        raise LedgerUnavailable(
            f"another ledger writer held {self._path} for more than {timeout_s} "
            "s; check for a stuck process using the ledger, then retry; nothing "
            "was changed"
        )


class _FlockWait:
    """One writer waiting for its turn; ``granted`` is released when it has it."""

    def __init__(self, descriptor: int) -> None:
        self.descriptor = descriptor
        self.granted = threading.Lock()
        self.granted.acquire()
        self.guard = threading.Lock()
        self.gave_up = False


def _serve_flock_waits(requests: queue.SimpleQueue[_FlockWait | None]) -> None:
    """The helper thread: take each waiting writer's lock in turn."""
    assert fcntl is not None
    while (wait := requests.get()) is not None:
        try:
            fcntl.flock(wait.descriptor, fcntl.LOCK_EX)
        except OSError:  # pragma: no cover - the descriptor is ours and open
            logger.exception("waiting for the ledger writer lock failed")
        with wait.guard:
            if wait.gave_up:
                os.close(wait.descriptor)
            else:
                wait.granted.release()


def is_retryable(exc: sa.exc.DBAPIError) -> bool:
    """True when the transaction failed as a whole and may simply run again."""
    if exc.connection_invalidated:
        return True

    sqlstate = getattr(exc.orig, "sqlstate", None)

    return sqlstate in _RETRYABLE_SQLSTATES


def is_retryable_driver_error(exc: BaseException) -> bool:
    """True for a driver error after which the whole transaction may run again."""
    return getattr(exc, "sqlstate", None) in _RETRYABLE_SQLSTATES


def describe_failure(exc: sa.exc.SQLAlchemyError, *, where: str) -> LedgerError:
    """The ledger error for a failure seen through SQLAlchemy."""
    unavailable = isinstance(
        exc,
        sa.exc.OperationalError
        | sa.exc.InterfaceError
        | sa.exc.TimeoutError
        | sa.exc.DisconnectionError,
    ) or bool(getattr(exc, "connection_invalidated", False))

    return describe_driver_failure(
        getattr(exc, "orig", None) or exc, where=where, unavailable=unavailable
    )


def describe_driver_failure(
    exc: BaseException, *, where: str, unavailable: bool
) -> LedgerError:
    """The ledger error for a database failure; the gate refuses on it."""
    detail = str(exc).strip().splitlines()
    reason = detail[0] if detail else exc.__class__.__name__

    if unavailable:
        return LedgerUnavailable(
            f"the ledger at {where} cannot be used right now ({reason}); "
            "check that the database is reachable and not held by a long "
            "transaction, then retry; nothing was changed"
        )

    return LedgerError(f"the ledger at {where} failed: {reason}")
