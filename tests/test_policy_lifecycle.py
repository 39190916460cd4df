"""The job lifecycle: every allowed and every forbidden move."""

from __future__ import annotations

import itertools

import pytest

from dispatch_prefect.policy import (
    InvalidTransitionError,
    JobState,
    can_transition,
    ensure_transition,
)

S = JobState
ALLOWED = {
    (S.PENDING, S.RUNNING),
    (S.PENDING, S.AWAITING_APPROVAL),
    (S.AWAITING_APPROVAL, S.APPROVED),
    (S.AWAITING_APPROVAL, S.REJECTED),
    (S.APPROVED, S.QUEUED),
    (S.QUEUED, S.RUNNING),
    (S.RUNNING, S.SUCCEEDED),
    (S.PENDING, S.FAILED),
    (S.AWAITING_APPROVAL, S.FAILED),
    (S.APPROVED, S.FAILED),
    (S.QUEUED, S.FAILED),
    (S.RUNNING, S.FAILED),
}
TERMINAL = {S.SUCCEEDED, S.FAILED, S.REJECTED}
EVERY_MOVE = list(itertools.product(JobState, repeat=2))
FORBIDDEN = [move for move in EVERY_MOVE if move not in ALLOWED]


def test_states_and_their_values() -> None:
    assert {state.value for state in JobState} == {
        "pending",
        "awaiting_approval",
        "approved",
        "rejected",
        "queued",
        "running",
        "succeeded",
        "failed",
    }


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED))
def test_allowed_move(current: JobState, target: JobState) -> None:
    assert can_transition(current, target)
    assert ensure_transition(current, target) is target


@pytest.mark.parametrize(("current", "target"), FORBIDDEN)
def test_forbidden_move(current: JobState, target: JobState) -> None:
    assert not can_transition(current, target)

    with pytest.raises(InvalidTransitionError) as caught:
        ensure_transition(current, target)
    assert current.value in str(caught.value)
    assert target.value in str(caught.value)


def test_matrix_covers_every_pair_of_states() -> None:
    assert len(ALLOWED) + len(FORBIDDEN) == len(JobState) ** 2 == 64


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_terminal_state_has_no_way_out(state: JobState) -> None:
    assert not any(can_transition(state, target) for target in JobState)


@pytest.mark.parametrize("state", sorted(set(JobState) - TERMINAL))
def test_any_non_terminal_state_may_fail(state: JobState) -> None:
    assert can_transition(state, JobState.FAILED)


def test_no_state_moves_to_itself() -> None:
    assert not any(can_transition(state, state) for state in JobState)


def test_invalid_transition_error_is_a_value_error() -> None:
    assert issubclass(InvalidTransitionError, ValueError)


def test_free_local_job_path() -> None:
    path = [S.PENDING, S.RUNNING, S.SUCCEEDED]

    for current, target in itertools.pairwise(path):
        ensure_transition(current, target)


def test_gated_job_path() -> None:
    path = [
        S.PENDING,
        S.AWAITING_APPROVAL,
        S.APPROVED,
        S.QUEUED,
        S.RUNNING,
        S.SUCCEEDED,
    ]

    for current, target in itertools.pairwise(path):
        ensure_transition(current, target)


def test_approved_job_cannot_skip_the_queue() -> None:
    assert not can_transition(S.APPROVED, S.RUNNING)


def test_awaiting_job_cannot_run_before_a_decision() -> None:
    assert not can_transition(S.AWAITING_APPROVAL, S.RUNNING)
    assert not can_transition(S.AWAITING_APPROVAL, S.QUEUED)


@pytest.mark.parametrize(("current", "target"), EVERY_MOVE)
def test_states_given_as_their_string_values_move_the_same(
    current: JobState, target: JobState
) -> None:
    """A state read back from storage as ``"running"`` follows the same rules."""
    allowed = (current, target) in ALLOWED

    assert can_transition(current.value, target.value) is allowed  # type: ignore[arg-type]
    if allowed:
        assert ensure_transition(current.value, target.value) is target  # type: ignore[arg-type]
    else:
        with pytest.raises(InvalidTransitionError):
            ensure_transition(current.value, target.value)  # type: ignore[arg-type]


def test_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="paused"):
        can_transition(S.RUNNING, "paused")  # type: ignore[arg-type]
