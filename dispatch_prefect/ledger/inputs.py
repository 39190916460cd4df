"""Checks on what callers pass in, made before anything is written.

Each failure names the value and says how to fix it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dispatch_prefect.ledger.errors import LedgerInputError

__all__ = ["MAX_AMOUNT_USD", "MAX_DECIMAL_PLACES", "moment", "month_of", "usd", "zone"]

# Far beyond any real bound, and small enough that every amount the ledger
# holds prints in full without an exponent.
MAX_AMOUNT_USD = Decimal(10) ** 15
MAX_DECIMAL_PLACES = 30


def usd(value: object, *, name: str) -> Decimal:
    """Return ``value`` as an amount the ledger stores exactly, else raise.

    Money is a ``Decimal``: a float is refused (it is not exact), and so is
    an int (say ``Decimal(5)``, so that amounts never change type).
    """
    if not isinstance(value, Decimal):
        raise LedgerInputError(
            f"{name} must be a Decimal amount of USD, got "
            f"{type(value).__name__} {value!r}; pass Decimal('{value}')"
        )

    if not value.is_finite():
        raise LedgerInputError(
            f"{name} must be a finite amount of USD, got {value}; "
            "pass the amount as a plain Decimal such as Decimal('0.25')"
        )

    if value < 0:
        raise LedgerInputError(
            f"{name} must not be negative, got {value}; amounts are costs, zero or more"
        )

    if value >= MAX_AMOUNT_USD:
        raise LedgerInputError(
            f"{name} {value} is beyond what the ledger holds "
            f"(below {MAX_AMOUNT_USD:f}); check the units of the amount"
        )

    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_DECIMAL_PLACES:
        raise LedgerInputError(
            f"{name} {value} has more than {MAX_DECIMAL_PLACES} decimal places; "
            f"round it up with .quantize(Decimal('1e-{MAX_DECIMAL_PLACES}'), "
            "ROUND_CEILING)"
        )

    # -0 would be stored as "-0"; it is the same amount as 0.
    return value if value else Decimal(0)


def zone(time_zone: object) -> ZoneInfo:
    """Return the IANA time zone named ``time_zone``, else raise."""
    if not isinstance(time_zone, str) or not time_zone:
        raise LedgerInputError(
            f"time_zone must be an IANA zone name such as 'UTC' or "
            f"'Europe/Berlin', got {time_zone!r}"
        )

    try:
        return ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise LedgerInputError(
            f"unknown time zone {time_zone!r}; use an IANA zone name such as "
            "'UTC' or 'America/New_York'"
        ) from exc


def moment(at: object, *, name: str = "at") -> datetime:
    """Return ``at`` in UTC (now when None); a naive datetime is refused."""
    if at is None:
        return datetime.now(UTC)

    if not isinstance(at, datetime):
        raise LedgerInputError(
            f"{name} must be a datetime, got {type(at).__name__} {at!r}"
        )

    if at.tzinfo is None or at.utcoffset() is None:
        raise LedgerInputError(
            f"{name} {at.isoformat()} has no time zone; pass an aware datetime "
            "such as datetime.now(timezone.utc)"
        )

    return at.astimezone(UTC)


def month_of(at_utc: datetime, time_zone: ZoneInfo) -> str:
    """The calendar month of ``at_utc`` in ``time_zone``, as ``YYYY-MM``."""
    local = at_utc.astimezone(time_zone)

    return f"{local.year:04d}-{local.month:02d}"
