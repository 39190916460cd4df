"""What can go wrong at the ledger, as types a caller can act on.

Every error is a ``LedgerError``. The gate turns ``LedgerUnavailable`` into a
refusal: a ledger it cannot reach never lets paid work through.
"""

from __future__ import annotations

from dispatch_prefect.policy import AdmissionDecision

__all__ = [
    "BudgetExceeded",
    "LedgerError",
    "LedgerInputError",
    "LedgerUnavailable",
    "ReservationSettled",
    "UnknownReservation",
]


class LedgerError(RuntimeError):
    """Base of every error the ledger raises."""


class LedgerInputError(LedgerError, ValueError):
    """A bad argument, refused before anything is written.

    It is a ``ValueError`` too, so callers that validate input generically
    catch it without knowing the ledger.
    """


class LedgerUnavailable(LedgerError):
    """The database cannot be reached, or stayed locked past the timeout.

    Nothing was decided: treat it as a refusal (fail closed) and try later.
    """


class BudgetExceeded(LedgerError):
    """A reservation was refused because a window has no room for its bound.

    Attributes:
        decision: the refusal of the policy rule, with the refused window.
    """

    def __init__(self, message: str, decision: AdmissionDecision) -> None:
        super().__init__(message)
        self.decision = decision

    def __reduce__(self) -> tuple[type[BudgetExceeded], tuple[str, AdmissionDecision]]:
        # Keeps the decision when the error crosses a process boundary.
        return (type(self), (str(self), self.decision))


class UnknownReservation(LedgerError, LookupError):
    """No reservation has the given key."""

    def __str__(self) -> str:
        # LookupError would quote the message like a dictionary key.
        return str(self.args[0]) if self.args else ""


class ReservationSettled(LedgerError):
    """The reservation was already settled in a way this call cannot change.

    A released reservation cannot be charged, and a spent one cannot be
    released.
    """
