"""The approval audit fact: who decided, when, and why."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

from dispatch_prefect.policy import Approval, ApprovalOutcome

WHEN = "2026-12-03T16:30:00+00:00"


def test_outcome_values() -> None:
    assert [o.value for o in ApprovalOutcome] == ["approved", "rejected"]


def test_approval_defaults_to_approved() -> None:
    approval = Approval("ada", "within the lab's GPU budget", WHEN)

    assert approval.outcome is ApprovalOutcome.APPROVED
    assert approval.approved


def test_rejection_is_not_approved() -> None:
    approval = Approval("ada", "too big", WHEN, ApprovalOutcome.REJECTED)

    assert not approval.approved


def test_outcome_given_as_its_string_value_becomes_the_enum() -> None:
    approval = Approval("ada", "too big", WHEN, "rejected")  # type: ignore[arg-type]

    assert approval.outcome is ApprovalOutcome.REJECTED
    assert not approval.approved


def test_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="maybe"):
        Approval("ada", "unsure", WHEN, "maybe")  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["author", "reason", "decided_at"])
@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_field_raises_value_error_naming_it(field: str, empty: str) -> None:
    values = {"author": "ada", "reason": "fits", "decided_at": WHEN, field: empty}

    with pytest.raises(ValueError, match=field):
        Approval(**values)


def test_decide_stamps_the_current_utc_time_in_iso_8601() -> None:
    before = datetime.now(UTC)
    approval = Approval.decide("ada", "fits the budget")
    after = datetime.now(UTC)

    decided = datetime.fromisoformat(approval.decided_at)
    assert decided.utcoffset() == timedelta(0)
    assert before <= decided <= after
    assert approval.approved


def test_decide_uses_the_given_moment() -> None:
    moment = datetime(2026, 12, 3, 17, 0, tzinfo=timezone(timedelta(hours=1)))

    approval = Approval.decide(
        "bob", "over budget", ApprovalOutcome.REJECTED, now=moment
    )

    assert approval.decided_at == "2026-12-03T17:00:00+01:00"
    assert datetime.fromisoformat(approval.decided_at) == moment
    assert approval.outcome is ApprovalOutcome.REJECTED


def test_approval_is_frozen() -> None:
    approval = Approval("ada", "fits", WHEN)

    with pytest.raises(dataclasses.FrozenInstanceError):
        approval.author = "mallory"  # type: ignore[misc]
