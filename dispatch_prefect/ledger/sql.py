"""The statements of the hot paths, as SQL text run on the driver connection.

Admission is a race against the commit of the next writer, so the time a
transaction holds the lock should be the database's own. SQLAlchemy's
statement execution costs several times what SQLite takes to run these
statements (measured on a 2-core machine: about 300 us a statement against
20 us), so ``check``, ``reserve``, ``reconcile`` and ``release`` run this
fixed SQL on the DBAPI connection taken from SQLAlchemy's pool. The tables
are still defined, created and versioned by SQLAlchemy (``schema``), and
listings use SQLAlchemy Core.

The text works on both SQLite (3.35 or newer, for ``RETURNING``) and
PostgreSQL; only the placeholder style differs. Statements whose comment
begins "PostgreSQL:" run there only; ``pg`` prepares them once per
connection and runs them by name, with the types of ``PG_PARAM_TYPES``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dispatch_prefect.ledger.schema import reservations, totals

__all__ = ["PG_PARAM_TYPES", "RESERVATION_COLUMNS", "HotSql"]

RESERVATION_COLUMNS = tuple(column.name for column in reservations.columns)

# The PostgreSQL type of every parameter name, for ``PREPARE`` (``pg``).
PG_PARAM_TYPES = {
    **dict.fromkeys(
        ("root_run_id", "task_run_id", "budget", "month", "time_zone", "status"),
        "text",
    ),
    **dict.fromkeys(("label", "run", "kind", "window_id", "k_root", "k_task"), "text"),
    **dict.fromkeys(("attempt", "k_attempt"), "integer"),
    **dict.fromkeys(("bound_usd", "actual_usd", "reserved", "spent"), "numeric"),
    **dict.fromkeys(
        ("month_reserved", "month_spent", "run_reserved", "run_spent"), "numeric"
    ),
    **dict.fromkeys(("overrun", "swept", "unverified"), "boolean"),
    **dict.fromkeys(("created_at", "settled_at"), "timestamptz"),
}

_RES = reservations.name
_TOT = totals.name
_BY_KEY = "root_run_id = :k_root AND task_run_id = :k_task AND attempt = :k_attempt"
_TOTALS_COLUMNS = "budget, window_kind, window_id, reserved_usd, spent_usd"
_TOTALS_KEY = "budget, window_kind, window_id"
# The totals row ``t`` of the window ``w`` (kind, id): a primary key lookup
# once ``t.budget`` is given too.
_BY_WINDOW = "t.window_kind = w.kind AND t.window_id = w.id"
_LOCKED_TOTALS = "t.window_kind, t.window_id, t.reserved_usd, t.spent_usd"
# Rows are locked in the order ORDER BY gives them.
_IN_LOCK_ORDER = "ORDER BY t.window_kind FOR UPDATE OF t"


@dataclass(frozen=True)
class HotSql:
    """The hot statements, in the placeholder style of one driver."""

    select_one: str
    select_with_windows: str
    claim: str
    settle_moving: str
    select_run_keys: str
    insert_new: str
    insert_if_new: str
    settle: str
    read_pair: str
    lock_pair: str
    create_pair: str
    write_pair: str
    read_one: str
    lock_one: str
    write_one: str

    @classmethod
    def for_dialect(cls, dialect_name: str) -> HotSql:
        """The statements for ``sqlite`` or ``postgresql``."""
        postgres = dialect_name == "postgresql"
        columns = ", ".join(RESERVATION_COLUMNS)
        select_one = f"SELECT {columns} FROM {_RES} WHERE {_BY_KEY}"
        placeholders = ", ".join(f":{name}" for name in RESERVATION_COLUMNS)
        pair_where = (
            "(budget = :budget AND window_kind = 'month' AND window_id = :month)"
            " OR (budget = :budget AND window_kind = 'run' AND window_id = :run)"
        )
        # Month before run: every writer locks totals rows in this order.
        pair_values = (
            "(:budget, 'month', :month, :month_reserved, :month_spent), "
            "(:budget, 'run', :run, :run_reserved, :run_spent)"
        )
        overwrite = (
            f"ON CONFLICT ({_TOTALS_KEY}) DO UPDATE SET "
            "reserved_usd = excluded.reserved_usd, spent_usd = excluded.spent_usd"
        )
        keep = (
            f"ON CONFLICT ({_TOTALS_KEY}) DO UPDATE SET "
            f"reserved_usd = {_TOT}.reserved_usd "
            "RETURNING window_kind, window_id, reserved_usd, spent_usd"
        )
        read_pair = (
            "SELECT window_kind, window_id, reserved_usd, spent_usd "
            f"FROM {_TOT} WHERE {pair_where}"
        )
        # PostgreSQL: the two rows, each found by its full primary key.
        pair_rows = (
            "FROM (VALUES ('month', :month), ('run', :run)) AS w (kind, id) "
            f"JOIN {_TOT} t ON {_BY_WINDOW} AND t.budget = :budget"
        )
        if postgres:
            read_pair = f"SELECT {_LOCKED_TOTALS} {pair_rows}"
        joined = ", ".join(f"r.{name}" for name in RESERVATION_COLUMNS)
        insert_new = f"INSERT INTO {_RES} ({columns}) VALUES ({placeholders})"
        sql = cls(
            select_one=select_one,
            # The reservation and its two windows' totals in one statement,
            # for SQLite, which holds the database write lock already.
            select_with_windows=(
                f"SELECT {joined}, m.reserved_usd, m.spent_usd, "
                f"n.reserved_usd, n.spent_usd FROM {_RES} r "
                f"LEFT JOIN {_TOT} m ON m.budget = r.budget "
                "AND m.window_kind = 'month' AND m.window_id = r.month "
                f"LEFT JOIN {_TOT} n ON n.budget = r.budget "
                "AND n.window_kind = 'run' AND n.window_id = r.root_run_id "
                "WHERE r.root_run_id = :k_root AND r.task_run_id = :k_task "
                "AND r.attempt = :k_attempt"
            ),
            select_run_keys=(
                f"SELECT task_run_id, attempt FROM {_RES} WHERE root_run_id = :k_root"
            ),
            # Fails on a key another writer added meanwhile (PostgreSQL;
            # SQLite holds the database lock): the transaction runs again.
            insert_new=insert_new,
            # No change (rowcount 0) when the key is already there.
            insert_if_new=(
                f"INSERT INTO {_RES} ({columns}) VALUES ({placeholders}) "
                "ON CONFLICT (root_run_id, task_run_id, attempt) DO NOTHING"
            ),
            # PostgreSQL: a new reservation, inserted before its windows are
            # locked; no row comes back when the key is already there.
            claim=(
                f"{insert_new} ON CONFLICT (root_run_id, task_run_id, attempt) "
                "DO NOTHING RETURNING attempt"
            ),
            settle=(
                f"UPDATE {_RES} SET status = :status, actual_usd = :actual_usd, "
                "overrun = :overrun, swept = :swept, unverified = :unverified, "
                f"settled_at = :settled_at WHERE {_BY_KEY} AND status = 'reserved'"
            ),
            # PostgreSQL: settles a reservation that is still reserved and
            # moves its bound out of its windows' reserved totals and its
            # actual cost into their spent totals, month before run, in one
            # statement, so the windows stay locked for no round trip at all.
            # NUMERIC sums are exact. No row comes back, and nothing changes,
            # when the reservation is settled already or missing.
            settle_moving=(
                f"WITH settled AS (UPDATE {_RES} SET status = :status, "
                "actual_usd = :actual_usd, "
                "overrun = COALESCE(:actual_usd > bound_usd, false), "
                "swept = :swept, unverified = :unverified, "
                f"settled_at = :settled_at WHERE {_BY_KEY} AND status = 'reserved' "
                f"RETURNING {columns}), "
                f"moved AS (INSERT INTO {_TOT} ({_TOTALS_COLUMNS}) "
                "SELECT s.budget, w.kind, w.id, -s.bound_usd, "
                "COALESCE(s.actual_usd, 0) FROM settled s CROSS JOIN LATERAL "
                "(VALUES ('month', s.month), ('run', s.root_run_id)) AS w (kind, id) "
                f"ORDER BY w.kind ON CONFLICT ({_TOTALS_KEY}) DO UPDATE SET "
                f"reserved_usd = {_TOT}.reserved_usd + excluded.reserved_usd, "
                f"spent_usd = {_TOT}.spent_usd + excluded.spent_usd) "
                f"SELECT {columns} FROM settled"
            ),
            read_pair=read_pair,
            # PostgreSQL: row locks on the two rows, each found by its full
            # primary key, taken in ORDER BY order: month before run.
            lock_pair=f"SELECT {_LOCKED_TOTALS} {pair_rows} {_IN_LOCK_ORDER}",
            create_pair=(
                f"INSERT INTO {_TOT} ({_TOTALS_COLUMNS}) VALUES "
                "(:budget, 'month', :month, 0, 0), (:budget, 'run', :run, 0, 0) "
                f"ON CONFLICT ({_TOTALS_KEY}) DO NOTHING"
            ),
            write_pair=f"INSERT INTO {_TOT} ({_TOTALS_COLUMNS}) VALUES {pair_values} "
            + overwrite,
            read_one=(
                "SELECT window_kind, window_id, reserved_usd, spent_usd "
                f"FROM {_TOT} WHERE budget = :budget AND window_kind = :kind "
                "AND window_id = :window_id"
            ),
            lock_one=(
                f"INSERT INTO {_TOT} ({_TOTALS_COLUMNS}) VALUES "
                "(:budget, :kind, :window_id, 0, 0) " + keep
            ),
            write_one=(
                f"INSERT INTO {_TOT} ({_TOTALS_COLUMNS}) VALUES "
                "(:budget, :kind, :window_id, :reserved, :spent) " + overwrite
            ),
        )
        if not postgres:
            return sql

        return cls(**{name: _pyformat(text) for name, text in vars(sql).items()})


def _pyformat(text: str) -> str:
    """``:name`` placeholders as psycopg's ``%(name)s``."""
    return re.sub(r"(?<!:):([a-z_]+)", r"%(\1)s", text)
