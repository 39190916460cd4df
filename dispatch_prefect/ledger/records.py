"""The values the ledger takes and returns: keys, reservations, totals."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from dispatch_prefect.ledger.errors import LedgerInputError
from dispatch_prefect.policy import BudgetCap
from dispatch_prefect.policy.money import EXACT

__all__ = [
    "MonthTotal",
    "Reservation",
    "ReservationKey",
    "ReservationRequest",
    "ReservationStatus",
]

MAX_ID_CHARS = 255


class ReservationStatus(enum.StrEnum):
    """Where a reservation stands."""

    RESERVED = "reserved"
    SPENT = "spent"
    RELEASED = "released"


@dataclass(frozen=True, order=True)
class ReservationKey:
    """Names one attempt of one gated task in one root flow run.

    A retry is a new attempt and is admitted again; a replay of the same
    attempt finds the reservation it already made. The run window of the
    reservation is ``root_run_id``.

    Raises:
        LedgerInputError: an empty or over-long id, or a negative attempt.
    """

    root_run_id: str
    task_run_id: str
    attempt: int

    def __post_init__(self) -> None:
        for name in ("root_run_id", "task_run_id"):
            require_name(getattr(self, name), name=name)

        if (
            isinstance(self.attempt, bool)
            or not isinstance(self.attempt, int)
            or self.attempt < 0
        ):
            raise LedgerInputError(
                f"attempt must be an int of 0 or more, got {self.attempt!r}; "
                "pass the task run's run_count"
            )

    def __str__(self) -> str:
        return f"{self.root_run_id}/{self.task_run_id}#{self.attempt}"


@dataclass(frozen=True)
class Reservation:
    """One reservation as the ledger holds it.

    Attributes:
        key: the attempt it belongs to.
        budget: the named budget whose windows it counts against.
        month: the month window, ``YYYY-MM`` in the budget's time zone at
            ``created_at``; it stays there when settled in a later month.
        bound_usd: the upper bound reserved.
        actual_usd: what it cost once settled (None while reserved or
            released).
        status: reserved, spent or released.
        overrun: the actual cost came out above the bound.
        swept: settled by the sweep, not by the job's own end.
        unverified: swept with no truth to be found, so charged the full
            bound.
        created_at: when it was reserved (UTC).
        settled_at: when it was spent or released (UTC), else None.
        label: free text for people (the task's name, say).
        time_zone: the budget's time zone the month was taken in.
    """

    key: ReservationKey
    budget: str
    month: str
    bound_usd: Decimal
    actual_usd: Decimal | None
    status: ReservationStatus
    overrun: bool
    swept: bool
    unverified: bool
    created_at: datetime
    settled_at: datetime | None
    label: str
    time_zone: str

    @property
    def committed_usd(self) -> Decimal:
        """What this reservation counts against its windows right now."""
        if self.status is ReservationStatus.RESERVED:
            return self.bound_usd

        if self.status is ReservationStatus.SPENT and self.actual_usd is not None:
            return self.actual_usd

        return Decimal(0)


@dataclass(frozen=True)
class ReservationRequest:
    """The arguments of one reservation, for ``Ledger.reserve_many``."""

    key: ReservationKey
    budget: str
    bound_usd: Decimal
    cap: BudgetCap
    time_zone: str = "UTC"
    at: datetime | None = None
    label: str = ""


@dataclass(frozen=True)
class MonthTotal:
    """What one budget has reserved and spent in one month window."""

    budget: str
    month: str
    reserved_usd: Decimal
    spent_usd: Decimal

    @property
    def committed_usd(self) -> Decimal:
        """Reserved plus spent."""
        return EXACT.add(self.reserved_usd, self.spent_usd)


def require_name(value: object, *, name: str) -> str:
    """Return ``value`` if it is a usable id or budget name, else raise."""
    if not isinstance(value, str) or not value.strip():
        raise LedgerInputError(
            f"{name} must be a non-empty string, got {value!r}; "
            f"pass the {name.replace('_', ' ')}"
        )

    if value != value.strip() or len(value) > MAX_ID_CHARS:
        raise LedgerInputError(
            f"{name} {value[:40]!r} must have no surrounding spaces and at most "
            f"{MAX_ID_CHARS} characters; trim it"
        )

    return value
