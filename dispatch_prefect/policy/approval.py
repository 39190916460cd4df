"""The audit fact of a gated job's approval: who decided, when, and why."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["Approval", "ApprovalOutcome"]


class ApprovalOutcome(enum.StrEnum):
    """What the person (or the policy) decided."""

    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Approval:
    """One decision on one job; ``decided_at`` is an ISO-8601 timestamp."""

    author: str
    reason: str
    decided_at: str
    outcome: ApprovalOutcome = ApprovalOutcome.APPROVED

    def __post_init__(self) -> None:
        for name in ("author", "reason", "decided_at"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"Approval.{name} must be a non-empty string, got {value!r}"
                )

        object.__setattr__(self, "outcome", ApprovalOutcome(self.outcome))

    @classmethod
    def decide(
        cls,
        author: str,
        reason: str,
        outcome: ApprovalOutcome = ApprovalOutcome.APPROVED,
        *,
        now: datetime | None = None,
    ) -> Approval:
        """Record a decision made now (UTC) unless ``now`` says otherwise."""
        moment = now if now is not None else datetime.now(UTC)

        return cls(author, reason, moment.isoformat(), outcome)

    @property
    def approved(self) -> bool:
        """True when the job may go ahead."""
        return self.outcome is ApprovalOutcome.APPROVED
