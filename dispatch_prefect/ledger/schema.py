"""The ledger's tables, how money and time are stored, and schema versions.

Money in PostgreSQL is ``NUMERIC`` with no declared scale: exact at any
number of decimal places.

Money in SQLite is TEXT holding the plain decimal digits of the ``Decimal``
(``"0.000375"``), for three reasons:

- SQLite has no exact decimal type. A column with NUMERIC or REAL affinity
  turns ``"0.1"`` into a binary float, so the column is declared VARCHAR
  (TEXT affinity) and SQLite keeps the characters it was given.
- Integer sub-cent units would fix a scale today: token prices already
  produce amounts with nine or more decimal places (``$0.0375`` per million
  tokens is ``$0.0000000375`` a token), so a fixed scale either rounds money
  or refuses real amounts, and a 64-bit integer at a fine scale runs out of
  range (at 1e-12 USD it holds less than $10 million).
- SQLite never does arithmetic on money here: the window totals are kept
  in their own rows and updated in Python with exact ``Decimal`` arithmetic
  under the write lock, so there is no ``SUM()`` that would read text as a
  float. The cost is that money cannot be summed or sorted numerically in
  SQL on SQLite; reports read the totals rows instead.

Times are stored in UTC (``timestamptz`` in PostgreSQL; in SQLite, text such
as ``2026-12-03 16:28:21.000000``, which sorts in time order) and come back
as aware UTC datetimes.

The schema is created on first use and carries a version number in
``dispatch_ledger_schema``. Opening a database made by an older version runs
the migrations in ``MIGRATIONS`` in order; one made by a newer version is
refused rather than misread.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

from dispatch_prefect.ledger.errors import LedgerError

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Money",
    "UtcDateTime",
    "ensure_schema",
    "metadata",
    "money_param",
    "money_value",
    "reservations",
    "schema_version",
    "time_param",
    "time_value",
    "totals",
]

SCHEMA_VERSION = 1

# Serializes schema creation between processes opening a fresh PostgreSQL
# database at once (SQLite has its database write lock for that).
_SCHEMA_LOCK_KEY = 0x44505F4C4544  # "DP_LED"
_SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def money_param(value: Decimal | None, dialect_name: str) -> Decimal | str | None:
    """An amount as the database stores it: Decimal for NUMERIC, else text."""
    if value is None or dialect_name == "postgresql":
        return value

    return format(value, "f")


def money_value(value: object) -> Decimal | None:
    """An amount as the database returned it, back as a Decimal."""
    if value is None or isinstance(value, Decimal):
        return value

    return Decimal(str(value))


@functools.lru_cache(maxsize=1024)
def time_param(value: datetime | None, dialect_name: str) -> datetime | str | None:
    """A time as the database stores it: timestamptz, or UTC ISO text."""
    if value is None:
        return None

    utc = value.astimezone(UTC)
    if dialect_name == "postgresql":
        return utc

    # The format SQLAlchemy's SQLite DATETIME writes and reads; it sorts
    # as text in time order.
    return utc.strftime(_SQLITE_TIME_FORMAT)


def time_value(value: object) -> datetime | None:
    """A time as the database returned it, back as an aware UTC datetime."""
    if value is None:
        return None

    moment = (
        value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    )
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)

    return moment.astimezone(UTC)


class Money(sa.types.TypeDecorator[Decimal]):
    """Exact USD: NUMERIC in PostgreSQL, decimal text in SQLite."""

    impl = sa.String
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.Numeric(asdecimal=True))

        return dialect.type_descriptor(sa.String())

    def process_bind_param(
        self, value: Decimal | None, dialect: Dialect
    ) -> Decimal | str | None:
        return money_param(value, dialect.name)

    def process_result_value(self, value: object, dialect: Dialect) -> Decimal | None:
        return money_value(value)


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """An aware UTC datetime in, an aware UTC datetime out."""

    impl = sa.String
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.DateTime(timezone=True))

        return dialect.type_descriptor(sa.String())

    def process_bind_param(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | str | None:
        return time_param(value, dialect.name)

    def process_result_value(self, value: object, dialect: Dialect) -> datetime | None:
        return time_value(value)


metadata = sa.MetaData()

schema_version = sa.Table(
    "dispatch_ledger_schema",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("migrated_at", UtcDateTime, nullable=False),
)

reservations = sa.Table(
    "dispatch_ledger_reservations",
    metadata,
    sa.Column("root_run_id", sa.String, primary_key=True),
    sa.Column("task_run_id", sa.String, primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("budget", sa.String, nullable=False),
    sa.Column("month", sa.String(7), nullable=False),
    sa.Column("time_zone", sa.String, nullable=False),
    sa.Column("bound_usd", Money, nullable=False),
    sa.Column("actual_usd", Money, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("overrun", sa.Boolean, nullable=False),
    sa.Column("swept", sa.Boolean, nullable=False),
    sa.Column("unverified", sa.Boolean, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("settled_at", UtcDateTime, nullable=True),
    sa.Column("label", sa.String, nullable=False),
    # Only the open reservations, for the sweep; settled ones leave it.
    sa.Index(
        "dispatch_ledger_reservations_open",
        "created_at",
        sqlite_where=sa.text("status = 'reserved'"),
        postgresql_where=sa.text("status = 'reserved'"),
    ),
    sa.Index("dispatch_ledger_reservations_budget", "budget", "created_at"),
    sa.Index("dispatch_ledger_reservations_month", "budget", "month", "created_at"),
    # Clustered on the key in SQLite: one B-tree to write, not two.
    sqlite_with_rowid=False,
)

# One row per budget and window: what admission reads, so it costs the same
# with ten reservations in history or ten million.
totals = sa.Table(
    "dispatch_ledger_totals",
    metadata,
    sa.Column("budget", sa.String, primary_key=True),
    sa.Column("window_kind", sa.String(8), primary_key=True),
    sa.Column("window_id", sa.String, primary_key=True),
    sa.Column("reserved_usd", Money, nullable=False),
    sa.Column("spent_usd", Money, nullable=False),
    sqlite_with_rowid=False,
)

# Version N's migration takes a database at version N - 1 to N, inside the
# transaction that records N. Version 1 is created whole.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


def ensure_schema(connection: Connection, *, pg_schema: str | None = None) -> int:
    """Create or migrate the tables in the open write transaction.

    Returns:
        The schema version the database had before (0 when it was empty).

    Raises:
        LedgerError: the database was made by a newer dispatch-prefect.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY}
        )
        if pg_schema is not None:
            quoted = connection.dialect.identifier_preparer.quote(pg_schema)
            connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quoted}")

    found = _found_version(connection)
    if found > SCHEMA_VERSION:
        raise LedgerError(
            f"the ledger database has schema version {found}, newer than the "
            f"{SCHEMA_VERSION} this dispatch-prefect understands; upgrade "
            "dispatch-prefect before using this database"
        )

    if found == 0:
        metadata.create_all(connection)
    else:
        for version in range(found + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version](connection)

    if found != SCHEMA_VERSION:
        _record_version(connection, exists=found > 0)

    return found


def read_version(connection: Connection) -> int:
    """The schema version of the database, 0 when it has no ledger yet."""
    return _found_version(connection)


def _found_version(connection: Connection) -> int:
    if not sa.inspect(connection).has_table(schema_version.name):
        return 0

    version = connection.execute(
        sa.select(schema_version.c.version).where(schema_version.c.id == 1)
    ).scalar_one_or_none()

    return int(version or 0)


def _record_version(connection: Connection, *, exists: bool) -> None:
    values = {"version": SCHEMA_VERSION, "migrated_at": datetime.now(UTC)}
    if exists:
        connection.execute(
            schema_version.update().where(schema_version.c.id == 1).values(values)
        )
    else:
        connection.execute(schema_version.insert().values(id=1, **values))
