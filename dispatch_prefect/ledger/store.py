"""The ledger: reserve, reconcile, release and sweep against two windows.

Every write is one transaction that reads the window totals under a lock,
decides with the policy rule ``admits`` and writes the reservation and the
new totals before it commits:

- SQLite: ``BEGIN IMMEDIATE`` takes the database write lock before the
  read, so no other process can read the same totals until the commit.
  A single reserve or settle is a step (``_reserve_step``, ``_settle_step``)
  that the writer holding the lock may run for others in the same
  transaction, each in its own savepoint and deciding on the totals the
  steps before it left; every writer is answered only after the commit
  (``group_commit``).
- PostgreSQL (READ COMMITTED): ``SELECT ... FOR UPDATE`` row-locks the
  totals rows of the windows, always in the same order (month before run;
  batches sorted by budget, window kind, window id), so two writers wait
  for each other and the second reads what the first committed. A single
  reserve writes its reservation row first (a reservation row before its
  windows), so the windows stay locked for the totals write and the commit
  only, in two round trips (see ``pg``). A settle decides nothing: one
  statement settles the row and moves the amounts in the totals by exact
  NUMERIC arithmetic, sent with its commit in one round trip. Missing rows
  are created first. A deadlock (possible only when two writers open the
  same new window at once, or a batch and a single reserve add the same
  key at once) or serialization failure runs the whole transaction again.

The totals rows are what admission reads, so a check or a reservation costs
the same whatever the size of history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from dispatch_prefect.ledger import inputs, pg
from dispatch_prefect.ledger.engine import (
    WRITE_OPTION,
    WriterQueue,
    default_url,
    describe_driver_failure,
    describe_failure,
    is_retryable,
    is_retryable_driver_error,
    make_engine,
    normalize_url,
)
from dispatch_prefect.ledger.errors import (
    BudgetExceeded,
    LedgerError,
    LedgerInputError,
    ReservationSettled,
    UnknownReservation,
)
from dispatch_prefect.ledger.records import (
    MonthTotal,
    Reservation,
    ReservationKey,
    ReservationRequest,
    ReservationStatus,
    require_name,
)
from dispatch_prefect.ledger.schema import (
    SCHEMA_VERSION,
    ensure_schema,
    money_param,
    money_value,
    read_version,
    reservations,
    time_param,
    time_value,
    totals,
)
from dispatch_prefect.ledger.sql import RESERVATION_COLUMNS, HotSql
from dispatch_prefect.ledger.sqlite_sessions import SqliteSessions
from dispatch_prefect.policy import (
    AdmissionDecision,
    BudgetCap,
    BudgetState,
    BudgetWindow,
    admits,
)
from dispatch_prefect.policy.money import EXACT

__all__ = ["Ledger"]

logger = logging.getLogger("dispatch_prefect.ledger")

T = TypeVar("T")

# (budget, window kind, window id); sorting these gives the lock order.
Window = tuple[str, str, str]

MAX_LISTED = 100_000
_MAX_ATTEMPTS = 5
_ZERO = Decimal(0)
_MONTH = BudgetWindow.MONTH.value
_RUN = BudgetWindow.RUN.value
# Where columns sit in a reservation row read in table order.
_WIDTH = len(RESERVATION_COLUMNS)
_STATUS_AT = RESERVATION_COLUMNS.index("status")
_BOUND_AT = RESERVATION_COLUMNS.index("bound_usd")
_BUDGET_AT = RESERVATION_COLUMNS.index("budget")
_MONTH_AT = RESERVATION_COLUMNS.index("month")


@dataclass(frozen=True)
class _Plan:
    """A validated reservation request, ready to decide and write."""

    key: ReservationKey
    budget: str
    bound_usd: Decimal
    cap: BudgetCap
    time_zone: str
    at: datetime
    month: str
    label: str

    @property
    def run_window(self) -> Window:
        return (self.budget, BudgetWindow.RUN.value, self.key.root_run_id)

    @property
    def month_window(self) -> Window:
        return (self.budget, BudgetWindow.MONTH.value, self.month)

    def reservation(self) -> Reservation:
        return Reservation(
            key=self.key,
            budget=self.budget,
            month=self.month,
            bound_usd=self.bound_usd,
            actual_usd=None,
            status=ReservationStatus.RESERVED,
            overrun=False,
            swept=False,
            unverified=False,
            created_at=self.at,
            settled_at=None,
            label=self.label,
            time_zone=self.time_zone,
        )


@dataclass(frozen=True)
class _Outcome:
    """How a reservation is to be settled."""

    status: ReservationStatus
    actual_usd: Decimal | None
    at: datetime
    swept: bool = False
    unverified: bool = False


class Ledger:
    """Durable, exact, race-free reservations against a budget's two windows.

    Open one with ``Ledger.open``; it is safe to share between threads, and
    any number of processes may open the same database.

    ```python
    from decimal import Decimal
    from dispatch_prefect.ledger import Ledger, ReservationKey
    from dispatch_prefect.policy import BudgetCap

    cap = BudgetCap(run_usd=Decimal("5"), month_usd=Decimal("100"))
    with Ledger.open() as ledger:
        key = ReservationKey("root-run", "task-run", attempt=1)
        ledger.reserve(key, budget="default", bound_usd=Decimal("1.20"), cap=cap)
        ledger.reconcile(key, Decimal("0.87"))
    ```
    """

    def __init__(
        self, engine: Engine, *, where: str, lock_timeout_s: float = 10.0
    ) -> None:
        """Use ``Ledger.open``; this wraps an engine already prepared."""
        self._engine = engine
        self._lock_timeout_s = lock_timeout_s
        self._writer = engine.execution_options(**{WRITE_OPTION: True})
        self._where = where
        self._dialect = engine.dialect.name
        self._postgres = self._dialect == "postgresql"
        self._sql = HotSql.for_dialect(self._dialect)
        self._driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        database = engine.url.database
        self._writers = (
            None if self._postgres or not database else WriterQueue(Path(database))
        )
        self._sessions = (
            None
            if self._postgres
            else SqliteSessions(
                engine,
                writers=self._writers,
                lock_timeout_s=lock_timeout_s,
                where=where,
                steps=_STEPS,
                database=Path(database) if database else None,
            )
        )

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        lock_timeout_s: float = 10.0,
        schema: str | None = None,
    ) -> Ledger:
        """Connect to the ledger database, creating or migrating its tables.

        Args:
            url: ``sqlite:////path/ledger.db`` or ``postgresql://...``.
                None means ``$DISPATCH_PREFECT_LEDGER_URL`` when set, else
                ``$PREFECT_HOME/dispatch_prefect/ledger.db``.
            lock_timeout_s: the longest a call waits for a lock or a
                connection before it raises ``LedgerUnavailable``.
            schema: PostgreSQL only: keep the tables in this schema
                (created when missing) instead of ``public``.

        Raises:
            LedgerInputError: a URL that is neither SQLite nor PostgreSQL.
            LedgerUnavailable: the database cannot be reached.
            LedgerError: the database was made by a newer dispatch-prefect.
        """
        if (
            isinstance(lock_timeout_s, bool)
            or not isinstance(lock_timeout_s, int | float)
            or not math.isfinite(lock_timeout_s)
            or lock_timeout_s <= 0
        ):
            raise LedgerInputError(
                f"lock_timeout_s must be a positive number of seconds, got "
                f"{lock_timeout_s!r}; 10 is a good start"
            )

        parsed = normalize_url(default_url() if url is None else url)
        engine = make_engine(parsed, lock_timeout_s=lock_timeout_s, pg_schema=schema)
        ledger = cls(
            engine,
            where=parsed.render_as_string(hide_password=True),
            lock_timeout_s=lock_timeout_s,
        )
        try:
            found = ledger._transact(read_version, write=False)
            if found != SCHEMA_VERSION:
                ledger._transact(
                    lambda connection: ensure_schema(connection, pg_schema=schema),
                    write=True,
                )
        except BaseException:
            engine.dispose()
            raise

        return ledger

    @property
    def url(self) -> str:
        """The database URL, with any password hidden."""
        return self._where

    def close(self) -> None:
        """Close the ledger's connections and its writer queue's helper."""
        if self._sessions is not None:
            self._sessions.close()
        if self._writers is not None:
            self._writers.close()
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self._where!r})"

    def check(
        self,
        budget: str,
        run_id: str,
        bound_usd: Decimal,
        cap: BudgetCap,
        *,
        time_zone: str = "UTC",
        at: datetime | None = None,
    ) -> AdmissionDecision:
        """Would ``bound_usd`` be admitted in this run now? Writes nothing.

        A later ``reserve`` decides again: money committed in between can
        still refuse it.

        Raises:
            LedgerInputError: a bad argument, named.
            LedgerUnavailable: the database cannot be read.
        """
        bound = inputs.usd(bound_usd, name="bound_usd")
        _require_cap(cap)
        run_state, month_state = self.window_states(
            budget, run_id, time_zone=time_zone, at=at
        )

        return admits(bound, run_state, month_state, cap)

    def reserve(
        self,
        key: ReservationKey,
        *,
        budget: str,
        bound_usd: Decimal,
        cap: BudgetCap,
        time_zone: str = "UTC",
        at: datetime | None = None,
        label: str = "",
    ) -> Reservation:
        """Decide again under the lock and record the reservation, atomically.

        The same key again returns the reservation already made (whatever
        the other arguments), so a replayed attempt never reserves twice.

        Raises:
            BudgetExceeded: a window has no room for the bound; nothing was
                written. ``.decision`` names the window.
            LedgerInputError: a bad argument, named.
            LedgerUnavailable: the database cannot be reached or stayed
                locked past the timeout.
        """
        request = ReservationRequest(
            key=key,
            budget=budget,
            bound_usd=bound_usd,
            cap=cap,
            time_zone=time_zone,
            at=at,
            label=label,
        )

        return self.reserve_many([request])[0]

    def reserve_many(self, requests: Sequence[ReservationRequest]) -> list[Reservation]:
        """Reserve a batch in one transaction: all of it or none of it.

        Requests are decided in order, each counting the ones before it. A
        key already in the ledger (or earlier in the batch) returns that
        reservation.

        Raises:
            BudgetExceeded: the first request that does not fit; nothing of
                the batch was written.
            LedgerInputError: a bad request, named, before anything is
                written.
            LedgerUnavailable: the database cannot be reached.
        """
        now = datetime.now(UTC)
        plans = [_plan(request, now=now) for request in requests]
        if not plans:
            return []

        if len(plans) == 1:
            # Built before the lock is taken: the lock is held for SQL only.
            plan = plans[0]
            made = plan.reservation()
            row = self._params(made)
            if self._sessions is not None:
                body = {
                    "row": row,
                    "run_cap": str(plan.cap.run_usd),
                    "month_cap": str(plan.cap.month_usd),
                }
                answer = self._sessions.run_step("reserve", body)
                return [_reserved(plan, made, answer)]
            return [
                self._run(lambda cursor: self._reserve_one(cursor, plan, made, row))
            ]

        return self._run(lambda cursor: self._reserve_batch(cursor, plans))

    def reconcile(
        self,
        key: ReservationKey,
        actual_usd: Decimal,
        *,
        at: datetime | None = None,
    ) -> Reservation:
        """Turn a reservation into spending at its actual cost.

        Calling it again returns the settled reservation unchanged. An actual
        cost above the bound is recorded as it is and marked ``overrun``.

        Raises:
            UnknownReservation: no reservation has this key.
            ReservationSettled: the reservation was released.
            LedgerInputError: a bad amount or time, named.
            LedgerUnavailable: the database cannot be reached.
        """
        _require_key(key)
        outcome = _Outcome(
            status=ReservationStatus.SPENT,
            actual_usd=inputs.usd(actual_usd, name="actual_usd"),
            at=inputs.moment(at),
        )
        settled, _changed = self._settle(key, outcome)

        return settled

    def release(self, key: ReservationKey) -> Reservation:
        """Give back the reservation of a job that never started.

        Calling it again returns the released reservation unchanged.

        Raises:
            UnknownReservation: no reservation has this key.
            ReservationSettled: the reservation is already spent.
            LedgerUnavailable: the database cannot be reached.
        """
        _require_key(key)
        outcome = _Outcome(
            status=ReservationStatus.RELEASED,
            actual_usd=None,
            at=datetime.now(UTC),
        )
        released, _changed = self._settle(key, outcome)

        return released

    def sweep(
        self,
        *,
        older_than_s: float,
        resolve: Callable[[Reservation], Decimal | None],
        now: datetime | None = None,
        limit: int = 1000,
    ) -> list[Reservation]:
        """Settle reservations older than ``older_than_s`` that nobody settled.

        ``resolve`` is asked for each one's actual cost (the gate asks
        Prefect for the run's real times). When it returns None the truth
        cannot be found: the reservation is charged its full bound and marked
        ``swept`` and ``unverified``, never freed. ``resolve`` runs outside
        any transaction; a reservation settled meanwhile by its own job is
        left as that job settled it.

        An exception from ``resolve`` stops the sweep; the reservations not
        yet settled stay reserved, still counted at their full bound, for
        the next sweep.

        Returns:
            The reservations this sweep settled, oldest first.
        """
        if (
            isinstance(older_than_s, bool)
            or not isinstance(older_than_s, int | float)
            or not math.isfinite(older_than_s)
            or older_than_s < 0
        ):
            raise LedgerInputError(
                f"older_than_s must be a number of seconds, 0 or more, got "
                f"{older_than_s!r}; use the longest a job may run, and some"
            )

        cutoff = inputs.moment(now, name="now") - timedelta(seconds=older_than_s)
        query = (
            sa.select(reservations)
            .where(
                # Literal, so SQLite can use the partial index of open ones.
                reservations.c.status == sa.literal_column("'reserved'"),
                reservations.c.created_at <= cutoff,
            )
            .order_by(reservations.c.created_at)
            .limit(_require_limit(limit))
        )
        stale = self._read_reservations(query)

        settled: list[Reservation] = []
        for reservation in stale:
            settled_one = self._sweep_one(reservation, resolve(reservation))
            if settled_one is not None:
                settled.append(settled_one)

        return settled

    def window_states(
        self,
        budget: str,
        run_id: str,
        *,
        time_zone: str = "UTC",
        at: datetime | None = None,
    ) -> tuple[BudgetState, BudgetState]:
        """What the run window and the month window of ``at`` hold now.

        Returns:
            ``(run_state, month_state)``.
        """
        name = require_name(budget, name="budget")
        root_run_id = require_name(run_id, name="run_id")
        month = inputs.month_of(inputs.moment(at), inputs.zone(time_zone))
        run_window = (name, BudgetWindow.RUN.value, root_run_id)
        month_window = (name, BudgetWindow.MONTH.value, month)

        states = self._run(
            lambda cursor: self._read_windows(cursor, [month_window, run_window]),
            write=False,
        )

        return _state(states, run_window), _state(states, month_window)

    def reservations(
        self,
        budget: str | None = None,
        *,
        run_id: str | None = None,
        month: str | None = None,
        status: ReservationStatus | None = None,
        limit: int = 100,
    ) -> list[Reservation]:
        """Reservations, newest first, filtered by any of the arguments."""
        res = reservations.c
        query = sa.select(reservations)
        if budget is not None:
            query = query.where(res.budget == require_name(budget, name="budget"))
        if run_id is not None:
            query = query.where(res.root_run_id == require_name(run_id, name="run_id"))
        if month is not None:
            query = query.where(res.month == _require_month(month))
        if status is not None:
            query = query.where(res.status == ReservationStatus(status).value)
        query = query.order_by(
            res.created_at.desc(), res.root_run_id, res.task_run_id, res.attempt
        ).limit(_require_limit(limit))

        return self._read_reservations(query)

    def reservation(self, key: ReservationKey) -> Reservation:
        """The reservation with this key.

        Raises:
            UnknownReservation: no reservation has this key.
        """
        _require_key(key)
        found = self._run(lambda cursor: self._select(cursor, key), write=False)
        if found is None:
            raise _unknown(key)

        return found

    def month_totals(self, budget: str | None = None) -> list[MonthTotal]:
        """Reserved and spent per budget and month, oldest month first."""
        tot = totals.c
        query = sa.select(tot.budget, tot.window_id, tot.reserved_usd, tot.spent_usd)
        query = query.where(tot.window_kind == BudgetWindow.MONTH.value)
        if budget is not None:
            query = query.where(tot.budget == require_name(budget, name="budget"))
        query = query.order_by(tot.budget, tot.window_id)

        rows = self._transact(lambda conn: conn.execute(query).all(), write=False)

        return [
            MonthTotal(
                budget=row.budget,
                month=row.window_id,
                reserved_usd=money_value(row.reserved_usd) or _ZERO,
                spent_usd=money_value(row.spent_usd) or _ZERO,
            )
            for row in rows
        ]

    def _transact(self, work: Callable[[Connection], T], *, write: bool = True) -> T:
        """Run SQLAlchemy ``work`` in one transaction (schema and listings)."""
        engine = self._writer if write else self._engine
        for attempt in itertools.count(1):
            try:
                with engine.begin() as connection:
                    return work(connection)
            except sa.exc.DBAPIError as exc:
                if attempt >= _MAX_ATTEMPTS or not is_retryable(exc):
                    raise describe_failure(exc, where=self._where) from exc
            except sa.exc.SQLAlchemyError as exc:
                raise describe_failure(exc, where=self._where) from exc

        raise AssertionError("unreachable")  # pragma: no cover

    def _run(self, work: Callable[[Any], T], *, write: bool = True) -> T:
        """Run ``work(cursor)`` in one transaction on a driver connection.

        SQLite runs it on the thread's kept connection (``SqliteSessions``).
        On PostgreSQL a deadlock, serialization failure or dropped
        connection runs ``work`` again from the start.
        """
        if self._sessions is not None:
            return self._sessions.run(work, write=write)

        for attempt in itertools.count(1):
            try:
                pooled = self._engine.raw_connection()
            except sa.exc.SQLAlchemyError as exc:
                raise describe_failure(exc, where=self._where) from exc

            cursor = None
            try:
                cursor = pooled.cursor()
                result = work(cursor)
                pooled.commit()
                return result
            except self._driver_error as exc:
                disconnected = self._engine.dialect.is_disconnect(
                    exc,  # type: ignore[arg-type]  # the driver's own Error
                    pooled.driver_connection,
                    cursor,
                )
                _quietly_roll_back(pooled)
                if disconnected:
                    pooled.invalidate(exc)
                if attempt >= _MAX_ATTEMPTS or not (
                    disconnected or is_retryable_driver_error(exc)
                ):
                    raise describe_driver_failure(
                        exc, where=self._where, unavailable=self._unavailable(exc)
                    ) from exc
            except BaseException:
                _quietly_roll_back(pooled)
                raise
            finally:
                pg.end(pooled)
                pooled.close()

        raise AssertionError("unreachable")  # pragma: no cover

    def _unavailable(self, exc: BaseException) -> bool:
        dbapi = self._engine.dialect.loaded_dbapi

        return isinstance(exc, dbapi.OperationalError | dbapi.InterfaceError)

    def _reserve_one(
        self,
        cursor: Any,
        plan: _Plan,
        reservation: Reservation,
        row: dict[str, object],
    ) -> Reservation:
        windows = [plan.month_window, plan.run_window]
        states, found = self._claim_and_lock(cursor, windows, plan.key, row)
        if found is not None:
            # A replay of a key already reserved is not a new reservation.
            return found

        decision = _decide(plan, states)
        if not decision.admitted:
            raise _refusal(plan, decision)

        _add(states, windows, reserved_usd=plan.bound_usd)
        self._finish(
            cursor, [(self._sql.write_pair, self._pair_write(states, windows))]
        )

        return reservation

    def _settle_sqlite(
        self, sessions: SqliteSessions, key: ReservationKey, outcome: _Outcome
    ) -> tuple[Reservation, bool]:
        """``_settle`` on SQLite, as the step ``settle`` (``_settle_step``)."""
        actual = outcome.actual_usd
        answer = sessions.run_step("settle", self._settle_params(key, outcome))
        if answer[0] == "unknown":
            raise _unknown(key)
        current = _reservation(answer[1])
        if answer[0] == "unchanged":
            _check_settled_again(current, outcome)
            return current, False

        settled = dataclasses.replace(
            current,
            status=outcome.status,
            actual_usd=actual,
            overrun=bool(answer[2]),
            swept=outcome.swept,
            unverified=outcome.unverified,
            settled_at=outcome.at,
        )
        _log_settled(settled)

        return settled, True

    def _claim_and_lock(
        self,
        cursor: Any,
        windows: Sequence[Window],
        key: ReservationKey,
        row: dict[str, object],
    ) -> tuple[dict[Window, tuple[Decimal, Decimal]], Reservation | None]:
        """PostgreSQL: insert the reservation, then lock its two windows.

        One round trip. The row goes in before the window locks are asked
        for (the order of every writer: a reservation row before its
        windows), so its insert and index entries are not part of the time
        the windows stay locked; a refusal rolls it back. When the key is
        already there the insert changes nothing (after waiting for a writer
        of the same key to finish) and the reservation found is returned. A
        window with no row yet costs a second round trip.
        """
        pair = _pair_params(windows)
        if pair is None:  # pragma: no cover - callers pass a pair
            raise AssertionError(f"not one month and one run: {windows}")

        claimed, rows = pg.run(
            cursor.connection,
            [(self._sql.claim, row), (self._sql.lock_pair, pair)],
        )
        if len(rows) < 2:
            # A new run or month: its row is created, then both are locked.
            statements = [(self._sql.create_pair, pair), (self._sql.lock_pair, pair)]
            _created, rows = pg.run(cursor.connection, statements)
        if not claimed:
            return {}, _reservation_or_fail(self._select(cursor, key))

        return _states(windows[0][0], rows), None

    def _finish(
        self, cursor: Any, statements: Sequence[tuple[str, dict[str, Any]]]
    ) -> None:
        """PostgreSQL: the last writes and the COMMIT, sent as one query.

        So the row locks are held for one round trip and the fsync only.
        """
        pg.run(cursor.connection, statements, commit=True)

    def _reserve_batch(self, cursor: Any, plans: Sequence[_Plan]) -> list[Reservation]:
        windows = sorted({w for p in plans for w in (p.month_window, p.run_window)})
        states = self._lock_windows(cursor, windows)
        known = self._select_many(cursor, [plan.key for plan in plans])

        made: list[Reservation] = []
        touched: set[Window] = set()
        results: list[Reservation] = []
        for plan in plans:
            found = known.get(plan.key)
            if found is None:
                decision = _decide(plan, states)
                if not decision.admitted:
                    raise _refusal(plan, decision)
                found = known[plan.key] = plan.reservation()
                pair = [plan.month_window, plan.run_window]
                _add(states, pair, reserved_usd=plan.bound_usd)
                touched.update(pair)
                made.append(found)
            results.append(found)

        if made:
            cursor.executemany(self._sql.insert_new, [self._params(r) for r in made])
            self._write_windows(cursor, states, sorted(touched))

        return results

    def _settle(
        self, key: ReservationKey, outcome: _Outcome
    ) -> tuple[Reservation, bool]:
        """Settle one reservation; False when it was settled already."""
        if self._sessions is not None:
            return self._settle_sqlite(self._sessions, key, outcome)

        settled, changed = self._run(
            lambda cursor: self._settle_postgres(cursor, key, outcome)
        )
        if changed:
            _log_settled(settled)

        return settled, changed

    def _settle_postgres(
        self, cursor: Any, key: ReservationKey, outcome: _Outcome
    ) -> tuple[Reservation, bool]:
        """``_settle`` on PostgreSQL: one statement and its commit, one round trip.

        The statement settles the reservation if it is still reserved and
        moves the amounts in its windows' totals by SQL arithmetic, so no
        round trip to the client happens while the windows are locked. A
        reservation already settled, or none, costs one more round trip to
        read it; nothing is written then.
        """
        change = self._settle_params(key, outcome)
        (updated,) = pg.run(
            cursor.connection, [(self._sql.settle_moving, change)], commit=True
        )
        if updated:
            return _reservation(updated[0]), True

        current = self._select(cursor, key)
        if current is None:
            raise _unknown(key)
        _check_settled_again(current, outcome)

        return current, False

    def _sweep_one(
        self, reservation: Reservation, actual: Decimal | None
    ) -> Reservation | None:
        if actual is None:
            amount, unverified = reservation.bound_usd, True
        else:
            name = f"the cost resolve() returned for {reservation.key}"
            amount, unverified = inputs.usd(actual, name=name), False
        outcome = _Outcome(
            status=ReservationStatus.SPENT,
            actual_usd=amount,
            at=datetime.now(UTC),
            swept=True,
            unverified=unverified,
        )
        settled, changed = self._settle(reservation.key, outcome)

        return settled if changed else None

    def _read_windows(
        self, cursor: Any, windows: Sequence[Window]
    ) -> dict[Window, tuple[Decimal, Decimal]]:
        """The totals of ``windows``; windows with no row yet are absent."""
        pair = _pair_params(windows)
        if pair is not None:
            cursor.execute(self._sql.read_pair, pair)
            return _states(windows[0][0], cursor.fetchall())

        found: dict[Window, tuple[Decimal, Decimal]] = {}
        for budget, kind, window_id in windows:
            params = {"budget": budget, "kind": kind, "window_id": window_id}
            cursor.execute(self._sql.read_one, params)
            found.update(_states(budget, cursor.fetchall()))

        return found

    def _lock_windows(
        self, cursor: Any, windows: Sequence[Window]
    ) -> dict[Window, tuple[Decimal, Decimal]]:
        """Read the totals of ``windows`` so no other writer can change them.

        On SQLite the transaction already holds the database write lock. On
        PostgreSQL the rows are row-locked in sorted order (month before
        run), created first when missing.
        """
        if not self._postgres:
            return self._read_windows(cursor, windows)

        pair = _pair_params(windows)
        if pair is not None:
            # Usually both rows exist and one statement locks them. A new
            # run or month creates its row first and locks again, in one
            # round trip; if that meets another writer doing the same,
            # PostgreSQL reports a deadlock and the transaction runs again.
            statements = [(self._sql.lock_pair, pair)]
            (rows,) = pg.run(cursor.connection, statements)
            if len(rows) < 2:
                statements.insert(0, (self._sql.create_pair, pair))
                _created, rows = pg.run(cursor.connection, statements)
            return _states(windows[0][0], rows)

        found: dict[Window, tuple[Decimal, Decimal]] = {}
        for budget, kind, window_id in sorted(windows):
            params = {"budget": budget, "kind": kind, "window_id": window_id}
            cursor.execute(self._sql.lock_one, params)
            found.update(_states(budget, cursor.fetchall()))

        return found

    def _pair_write(
        self,
        states: dict[Window, tuple[Decimal, Decimal]],
        windows: Sequence[Window],
    ) -> dict[str, Any]:
        """Parameters of ``write_pair`` for one month and one run window."""
        pair = _pair_params(windows)
        if pair is None:  # pragma: no cover - callers pass a pair
            raise AssertionError(f"not one month and one run: {windows}")

        for kind in (BudgetWindow.MONTH.value, BudgetWindow.RUN.value):
            reserved, spent = states[(pair["budget"], kind, pair[kind])]
            pair[f"{kind}_reserved"] = money_param(reserved, self._dialect)
            pair[f"{kind}_spent"] = money_param(spent, self._dialect)

        return pair

    def _write_windows(
        self,
        cursor: Any,
        states: dict[Window, tuple[Decimal, Decimal]],
        windows: Sequence[Window],
    ) -> None:
        rows = []
        for window in windows:
            budget, kind, window_id = window
            reserved, spent = states[window]
            rows.append(
                {
                    "budget": budget,
                    "kind": kind,
                    "window_id": window_id,
                    "reserved": money_param(reserved, self._dialect),
                    "spent": money_param(spent, self._dialect),
                }
            )
        cursor.executemany(self._sql.write_one, rows)

    def _select(self, cursor: Any, key: ReservationKey) -> Reservation | None:
        cursor.execute(self._sql.select_one, _key_params(key))
        row = cursor.fetchone()

        return None if row is None else _reservation(row)

    def _select_many(
        self, cursor: Any, keys: Sequence[ReservationKey]
    ) -> dict[ReservationKey, Reservation]:
        """The reservations already made under any of ``keys``."""
        wanted = set(keys)
        found: dict[ReservationKey, Reservation] = {}
        for root_run_id in sorted({key.root_run_id for key in keys}):
            cursor.execute(self._sql.select_run_keys, {"k_root": root_run_id})
            for task_run_id, attempt in cursor.fetchall():
                key = ReservationKey(root_run_id, task_run_id, attempt)
                if key in wanted:
                    found[key] = _reservation_or_fail(self._select(cursor, key))

        return found

    def _settle_params(
        self, key: ReservationKey, outcome: _Outcome
    ) -> dict[str, object]:
        """Parameters of the settle statements, as the database stores them."""
        return {
            **_key_params(key),
            "status": outcome.status.value,
            "actual_usd": money_param(outcome.actual_usd, self._dialect),
            "swept": outcome.swept,
            "unverified": outcome.unverified,
            "settled_at": time_param(outcome.at, self._dialect),
        }

    def _params(self, reservation: Reservation) -> dict[str, object]:
        return {
            "root_run_id": reservation.key.root_run_id,
            "task_run_id": reservation.key.task_run_id,
            "attempt": reservation.key.attempt,
            "budget": reservation.budget,
            "month": reservation.month,
            "time_zone": reservation.time_zone,
            "bound_usd": money_param(reservation.bound_usd, self._dialect),
            "actual_usd": money_param(reservation.actual_usd, self._dialect),
            "status": reservation.status.value,
            "overrun": reservation.overrun,
            "swept": reservation.swept,
            "unverified": reservation.unverified,
            "created_at": time_param(reservation.created_at, self._dialect),
            "settled_at": time_param(reservation.settled_at, self._dialect),
            "label": reservation.label,
        }

    def _read_reservations(self, query: sa.Select[Any]) -> list[Reservation]:
        rows = self._transact(lambda conn: conn.execute(query).all(), write=False)

        return [_reservation(row) for row in rows]


def _reserve_step(cursor: Any, body: dict[str, Any]) -> list[Any]:
    """SQLite, under the write lock: decide and record one reservation.

    ``body``: ``row``, the reservation's columns as stored, and the caps as
    ``run_cap`` and ``month_cap``. Three statements when admitted: the
    insert of an admitted reservation changes no row when the key is
    already there (a replay, returned as it was), and a refusal first looks
    for a reservation to return.

    Returns:
        ``["made"]``; ``["found", row]`` for a key already reserved; or
        ``["refused", window, reason]``, with nothing written.
    """
    row = body["row"]
    pair = {"budget": row["budget"], "month": row["month"], "run": row["root_run_id"]}
    cursor.execute(_SQLITE.read_pair, pair)
    found = {kind: (reserved, spent) for kind, _id, reserved, spent in cursor}
    month = _totals_of(found.get(_MONTH))
    run = _totals_of(found.get(_RUN))
    bound = Decimal(row["bound_usd"])
    cap = BudgetCap(
        run_usd=Decimal(body["run_cap"]), month_usd=Decimal(body["month_cap"])
    )
    decision = admits(
        bound,
        BudgetState(reserved_usd=run[0], spent_usd=run[1]),
        BudgetState(reserved_usd=month[0], spent_usd=month[1]),
        cap,
    )
    key = {
        "k_root": row["root_run_id"],
        "k_task": row["task_run_id"],
        "k_attempt": row["attempt"],
    }
    if not decision.admitted:
        cursor.execute(_SQLITE.select_one, key)
        replayed = cursor.fetchone()
        if replayed is not None:
            return ["found", list(replayed)]
        window = decision.refused_window
        return ["refused", None if window is None else window.value, decision.reason]

    cursor.execute(_SQLITE.insert_if_new, row)
    if cursor.rowcount == 0:
        cursor.execute(_SQLITE.select_one, key)
        return ["found", list(cursor.fetchone())]

    pair["month_reserved"] = format(EXACT.add(month[0], bound), "f")
    pair["month_spent"] = format(month[1], "f")
    pair["run_reserved"] = format(EXACT.add(run[0], bound), "f")
    pair["run_spent"] = format(run[1], "f")
    cursor.execute(_SQLITE.write_pair, pair)

    return ["made"]


def _settle_step(cursor: Any, change: dict[str, Any]) -> list[Any]:
    """SQLite, under the write lock: settle one reservation if still reserved.

    One read (the reservation and its two windows' totals) and two writes.

    Returns:
        ``["settled", row, overrun]`` with the row as it was before;
        ``["unchanged", row]`` when it was settled already; ``["unknown"]``.
    """
    cursor.execute(_SQLITE.select_with_windows, change)
    row = cursor.fetchone()
    if row is None:
        return ["unknown"]
    if row[_STATUS_AT] != ReservationStatus.RESERVED.value:
        return ["unchanged", list(row[:_WIDTH])]

    bound = Decimal(row[_BOUND_AT])
    actual = None if change["actual_usd"] is None else Decimal(change["actual_usd"])
    month = _totals_of(row[_WIDTH : _WIDTH + 2])
    run = _totals_of(row[_WIDTH + 2 :])
    spent = actual or _ZERO
    overrun = actual is not None and actual > bound
    cursor.execute(_SQLITE.settle, {**change, "overrun": overrun})
    pair = {
        "budget": row[_BUDGET_AT],
        "month": row[_MONTH_AT],
        "run": change["k_root"],
        "month_reserved": format(EXACT.subtract(month[0], bound), "f"),
        "month_spent": format(EXACT.add(month[1], spent), "f"),
        "run_reserved": format(EXACT.subtract(run[0], bound), "f"),
        "run_spent": format(EXACT.add(run[1], spent), "f"),
    }
    cursor.execute(_SQLITE.write_pair, pair)

    return ["settled", list(row[:_WIDTH]), overrun]


_SQLITE = HotSql.for_dialect("sqlite")
_STEPS = {"reserve": _reserve_step, "settle": _settle_step}


def _reserved(plan: _Plan, made: Reservation, answer: list[Any]) -> Reservation:
    """The reservation ``_reserve_step`` answered for, or its refusal raised."""
    if answer[0] == "made":
        return made
    if answer[0] == "found":
        return _reservation(answer[1])

    _refused, window, reason = answer
    decision = AdmissionDecision(
        admitted=False,
        refused_window=None if window is None else BudgetWindow(window),
        reason=reason,
    )
    raise _refusal(plan, decision)


def _plan(request: ReservationRequest, *, now: datetime) -> _Plan:
    if not isinstance(request, ReservationRequest):
        raise LedgerInputError(
            f"reserve_many takes ReservationRequest values, got "
            f"{type(request).__name__}"
        )

    _require_key(request.key)
    _require_cap(request.cap)
    if not isinstance(request.label, str):
        raise LedgerInputError(
            f"label must be a string, got {type(request.label).__name__}"
        )
    time_zone = inputs.zone(request.time_zone)
    at = now if request.at is None else inputs.moment(request.at)

    return _Plan(
        key=request.key,
        budget=require_name(request.budget, name="budget"),
        bound_usd=inputs.usd(request.bound_usd, name="bound_usd"),
        cap=request.cap,
        time_zone=request.time_zone,
        at=at,
        month=inputs.month_of(at, time_zone),
        label=request.label,
    )


def _require_key(key: object) -> None:
    if not isinstance(key, ReservationKey):
        raise LedgerInputError(
            f"key must be a ReservationKey(root_run_id, task_run_id, attempt), "
            f"got {type(key).__name__} {key!r}"
        )


def _require_cap(cap: object) -> None:
    if not isinstance(cap, BudgetCap):
        raise LedgerInputError(
            f"cap must be a BudgetCap, got {type(cap).__name__} {cap!r}; load "
            "it from the budget block"
        )


def _require_limit(limit: object) -> int:
    if (
        isinstance(limit, bool)
        or not isinstance(limit, int)
        or not 1 <= limit <= MAX_LISTED
    ):
        raise LedgerInputError(
            f"limit must be an int from 1 to {MAX_LISTED}, got {limit!r}"
        )

    return limit


def _require_month(month: object) -> str:
    text = str(month)
    try:
        datetime.strptime(text, "%Y-%m")
    except ValueError as exc:
        raise LedgerInputError(
            f"month must be written YYYY-MM, such as '2026-12', got {month!r}"
        ) from exc
    if len(text) != 7:
        raise LedgerInputError(
            f"month must be written YYYY-MM, such as '2026-03', got {month!r}"
        )

    return text


def _check_settled_again(current: Reservation, outcome: _Outcome) -> None:
    """Allow a repeat of the same settlement; refuse a contradicting one."""
    if outcome.swept or current.status is outcome.status:
        if (
            current.status is ReservationStatus.SPENT
            and not outcome.swept
            and outcome.actual_usd != current.actual_usd
        ):
            logger.warning(
                "reservation %s was already reconciled at $%s; the later "
                "actual cost $%s is ignored",
                current.key,
                current.actual_usd,
                outcome.actual_usd,
            )
        return

    if current.status is ReservationStatus.RELEASED:
        raise ReservationSettled(
            f"reservation {current.key} was released at "
            f"{current.settled_at}; a released reservation cannot be charged. "
            "If the job did run after all, reserve its cost under a new "
            "attempt and reconcile that"
        )

    raise ReservationSettled(
        f"reservation {current.key} is already spent (${current.actual_usd}); "
        "a spent reservation cannot be released"
    )


def _refusal(plan: _Plan, decision: AdmissionDecision) -> BudgetExceeded:
    message = (
        f"budget {plan.budget!r} cannot reserve ${plan.bound_usd} for "
        f"{plan.key}: {decision.reason}"
    )
    if decision.refused_window is BudgetWindow.MONTH:
        year, month = (int(part) for part in plan.month.split("-"))
        ends = f"{year + month // 12:04d}-{month % 12 + 1:02d}-01"
        message += (
            f" (the month window {plan.month} ends at {ends} 00:00 {plan.time_zone})"
        )
    logger.warning("refused: %s", message)

    return BudgetExceeded(message, decision)


def _unknown(key: ReservationKey) -> UnknownReservation:
    return UnknownReservation(
        f"no reservation has key {key} (root run {key.root_run_id!r}, task "
        f"run {key.task_run_id!r}, attempt {key.attempt}); reserve it first, "
        "or check the three parts of the key"
    )


def _log_settled(reservation: Reservation) -> None:
    if reservation.unverified:
        logger.warning(
            "swept %s: its end was never seen and its cost cannot be found; "
            "charged the full bound $%s",
            reservation.key,
            reservation.bound_usd,
        )
    elif reservation.overrun:
        logger.warning(
            "%s cost $%s, above its bound $%s (overrun)",
            reservation.key,
            reservation.actual_usd,
            reservation.bound_usd,
        )
    else:
        logger.debug("%s %s", reservation.status.value, reservation.key)


def _decide(
    plan: _Plan, states: dict[Window, tuple[Decimal, Decimal]]
) -> AdmissionDecision:
    return admits(
        plan.bound_usd,
        _state(states, plan.run_window),
        _state(states, plan.month_window),
        plan.cap,
    )


def _add(
    states: dict[Window, tuple[Decimal, Decimal]],
    windows: Iterable[Window],
    *,
    reserved_usd: Decimal = _ZERO,
    spent_usd: Decimal = _ZERO,
) -> None:
    for window in windows:
        reserved, spent = states.get(window, (_ZERO, _ZERO))
        states[window] = (
            EXACT.add(reserved, reserved_usd),
            EXACT.add(spent, spent_usd),
        )


def _pair_params(windows: Sequence[Window]) -> dict[str, Any] | None:
    """Parameters of the pair statements when ``windows`` is one run + month."""
    if len(windows) != 2:
        return None

    by_kind = {kind: (budget, window_id) for budget, kind, window_id in windows}
    month = by_kind.get(BudgetWindow.MONTH.value)
    run = by_kind.get(BudgetWindow.RUN.value)
    if month is None or run is None or month[0] != run[0]:
        return None

    return {"budget": month[0], "month": month[1], "run": run[1]}


def _totals_of(found: Sequence[Any] | None) -> tuple[Decimal, Decimal]:
    """``(reserved, spent)`` of a totals row as stored, zeros when it is missing."""
    if found is None or found[0] is None:
        return _ZERO, _ZERO

    return Decimal(found[0]), Decimal(found[1])


def _states(
    budget: str, rows: Iterable[Sequence[Any]]
) -> dict[Window, tuple[Decimal, Decimal]]:
    """Totals rows ``(kind, window id, reserved, spent)`` by window."""
    found: dict[Window, tuple[Decimal, Decimal]] = {}
    for kind, window_id, reserved, spent in rows:
        found[(budget, kind, window_id)] = (
            money_value(reserved) or _ZERO,
            money_value(spent) or _ZERO,
        )

    return found


def _state(
    states: dict[Window, tuple[Decimal, Decimal]], window: Window
) -> BudgetState:
    reserved, spent = states.get(window, (_ZERO, _ZERO))

    return BudgetState(reserved_usd=reserved, spent_usd=spent)


def _key_params(key: ReservationKey) -> dict[str, object]:
    return {
        "k_root": key.root_run_id,
        "k_task": key.task_run_id,
        "k_attempt": key.attempt,
    }


def _reservation(row: Sequence[Any]) -> Reservation:
    """A reservation from its columns in table order, as any driver gave them."""
    values = dict(zip(RESERVATION_COLUMNS, row, strict=True))
    bound = money_value(values["bound_usd"])
    created_at = time_value(values["created_at"])
    if bound is None or created_at is None:  # pragma: no cover - NOT NULL
        raise LedgerError(f"reservation row {values} misses its bound or time")

    return Reservation(
        key=ReservationKey(
            values["root_run_id"], values["task_run_id"], int(values["attempt"])
        ),
        budget=values["budget"],
        month=values["month"],
        bound_usd=bound,
        actual_usd=money_value(values["actual_usd"]),
        status=ReservationStatus(values["status"]),
        overrun=bool(values["overrun"]),
        swept=bool(values["swept"]),
        unverified=bool(values["unverified"]),
        created_at=created_at,
        settled_at=time_value(values["settled_at"]),
        label=values["label"],
        time_zone=values["time_zone"],
    )


def _reservation_or_fail(reservation: Reservation | None) -> Reservation:
    if reservation is None:  # pragma: no cover - read in the same transaction
        raise LedgerError("a reservation listed a moment ago is gone")

    return reservation


def _quietly_roll_back(pooled: Any) -> None:
    """Roll back after a failure; a dead connection cannot, and need not."""
    with contextlib.suppress(Exception):
        pooled.rollback()
