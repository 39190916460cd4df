"""The run-it-once-recoverably contract between a job store and its workers.

A store hands out a job by an atomic claim (a ``Lease``); a worker's result is
accepted only while its lease is current, so a late result from a worker
presumed dead is rejected; a lease nobody renews goes stale and the job is
recovered, until it has been tried ``max_attempts`` times. Whether jobs are
pushed or pulled is only a matter of the ``Transport``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

__all__ = [
    "DispatchError",
    "JobStore",
    "Lease",
    "RetriableError",
    "Transport",
    "WorkerExecutor",
    "is_lease_stale",
    "should_give_up",
]


class DispatchError(RuntimeError):
    """A job could not be dispatched and should not be retried as is."""


class RetriableError(Exception):
    """A passing failure: the same job may be tried again."""


@dataclass(frozen=True)
class Lease:
    """A worker's claim on a job since ``leased_at``, and its attempt count."""

    job_id: str
    leased_at: datetime | float
    attempts: int = 0


def is_lease_stale(
    leased_at: datetime | float,
    now: datetime | float,
    ttl_seconds: float,
) -> bool:
    """True once ``now - leased_at >= ttl_seconds``.

    Times are both datetimes or both epoch seconds.
    """
    if isinstance(leased_at, datetime) and isinstance(now, datetime):
        age_s = (now - leased_at).total_seconds()
    elif isinstance(leased_at, datetime) or isinstance(now, datetime):
        raise TypeError("leased_at and now must both be datetimes or both numbers")
    else:
        age_s = now - leased_at

    return age_s >= ttl_seconds


def should_give_up(attempts: int, max_attempts: int) -> bool:
    """True when a job has been tried as often as allowed."""
    return attempts >= max_attempts


class JobStore(Protocol):
    """Where jobs wait and whose claims are atomic."""

    def claim(self, job_id: str, now: datetime) -> Lease | None:
        """Lease the job if nobody holds it; None when it is taken."""
        ...

    def complete(self, lease: Lease, result: Any) -> bool:
        """Store a result; False (and nothing stored) if the lease is stale."""
        ...

    def fail(self, lease: Lease, error: str) -> None:
        """Mark the job failed cleanly, keeping the error."""
        ...

    def recover_stale(self, now: datetime, ttl_seconds: float) -> list[str]:
        """Free jobs whose leases went stale; return their ids."""
        ...


class Transport(Protocol):
    """How a claimed job reaches a worker: pushed or pulled."""

    def send(self, job_id: str, payload: Any) -> None:
        """Deliver a job to a worker."""
        ...


class WorkerExecutor(Protocol):
    """What runs a job on a worker."""

    def execute(self, job_id: str, payload: Any) -> Any:
        """Run the job and return its result; raise RetriableError to retry."""
        ...
