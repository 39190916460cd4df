"""The states a gated job moves through and the moves that are allowed.

A free local job goes PENDING -> RUNNING. A paid one waits for a person:
PENDING -> AWAITING_APPROVAL -> APPROVED | REJECTED, then APPROVED -> QUEUED ->
RUNNING -> SUCCEEDED. Any state that is not terminal may go to FAILED.
"""

from __future__ import annotations

import enum

__all__ = [
    "TERMINAL_STATES",
    "InvalidTransitionError",
    "JobState",
    "can_transition",
    "ensure_transition",
]


class JobState(enum.StrEnum):
    """Where a gated job is in its life."""

    PENDING = "pending"
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"
    REJECTED = "rejected"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.REJECTED})

_MOVES: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.AWAITING_APPROVAL}),
    JobState.AWAITING_APPROVAL: frozenset({JobState.APPROVED, JobState.REJECTED}),
    JobState.APPROVED: frozenset({JobState.QUEUED}),
    JobState.QUEUED: frozenset({JobState.RUNNING}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED}),
}


class InvalidTransitionError(ValueError):
    """A job was asked to move in a way its lifecycle forbids."""


def can_transition(current: JobState, target: JobState) -> bool:
    """Whether a job in ``current`` may move to ``target``.

    Raises:
        ValueError: either state is not a ``JobState`` (nor its value).
    """
    current, target = JobState(current), JobState(target)
    if current in TERMINAL_STATES:
        return False

    if target is JobState.FAILED:
        return True

    return target in _MOVES.get(current, frozenset())


def ensure_transition(current: JobState, target: JobState) -> JobState:
    """Return ``target`` if the move is allowed.

    Raises:
        InvalidTransitionError: the move is not allowed; names both states.
    """
    current, target = JobState(current), JobState(target)
    if not can_transition(current, target):
        raise InvalidTransitionError(
            f"a job cannot move from {current.value} to {target.value}"
        )

    return target
