"""Run it once, recoverably: lease staleness and the give-up rule."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch_prefect.policy import (
    DispatchError,
    JobStore,
    Lease,
    RetriableError,
    Transport,
    WorkerExecutor,
    is_lease_stale,
    should_give_up,
)

LEASED_AT = datetime(2026, 12, 3, 16, 0, tzinfo=UTC)
TTL_S = 300.0


def test_dispatch_error_is_a_runtime_error() -> None:
    assert issubclass(DispatchError, RuntimeError)


def test_retriable_error_is_an_exception_but_not_a_dispatch_error() -> None:
    """A passing failure must not be caught as a final one."""
    assert issubclass(RetriableError, Exception)
    assert not issubclass(RetriableError, DispatchError)


def test_lease_starts_at_zero_attempts() -> None:
    lease = Lease("job-1", LEASED_AT)

    assert (lease.job_id, lease.leased_at, lease.attempts) == ("job-1", LEASED_AT, 0)


def test_lease_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Lease("job-1", LEASED_AT).attempts = 5  # type: ignore[misc]


# --- is_lease_stale ----------------------------------------------------------


def test_lease_is_fresh_just_before_its_ttl() -> None:
    now = LEASED_AT + timedelta(seconds=TTL_S) - timedelta(microseconds=1)

    assert not is_lease_stale(LEASED_AT, now, TTL_S)


def test_lease_is_stale_when_its_age_equals_the_ttl() -> None:
    now = LEASED_AT + timedelta(seconds=TTL_S)

    assert is_lease_stale(LEASED_AT, now, TTL_S)


def test_lease_is_stale_after_its_ttl() -> None:
    assert is_lease_stale(LEASED_AT, LEASED_AT + timedelta(hours=1), TTL_S)


def test_lease_is_fresh_when_just_taken() -> None:
    assert not is_lease_stale(LEASED_AT, LEASED_AT, TTL_S)


def test_lease_with_zero_ttl_is_stale_at_once() -> None:
    assert is_lease_stale(LEASED_AT, LEASED_AT, 0)


@pytest.mark.parametrize(
    ("now", "stale"), [(1299.0, False), (1300.0, True), (1300.5, True)]
)
def test_lease_staleness_works_on_epoch_seconds(now: float, stale: bool) -> None:
    assert is_lease_stale(1000.0, now, 300) is stale


def test_mixing_datetimes_and_epoch_seconds_raises_type_error() -> None:
    with pytest.raises(TypeError, match="both"):
        is_lease_stale(LEASED_AT, 1000.0, TTL_S)
    with pytest.raises(TypeError, match="both"):
        is_lease_stale(1000.0, LEASED_AT, TTL_S)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 10**9),
    st.integers(-(10**6), 10**6),
    st.integers(0, 10**6),
)
def test_lease_is_stale_exactly_when_age_reaches_ttl(
    leased_at_s: int, age_s: int, ttl_s: int
) -> None:
    leased = datetime.fromtimestamp(leased_at_s, UTC)
    now = leased + timedelta(seconds=age_s)

    assert is_lease_stale(leased, now, ttl_s) is (age_s >= ttl_s)
    assert is_lease_stale(leased_at_s, leased_at_s + age_s, ttl_s) is (age_s >= ttl_s)


# --- should_give_up ----------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "max_attempts", "give_up"),
    [(0, 3, False), (2, 3, False), (3, 3, True), (4, 3, True), (0, 0, True)],
)
def test_gives_up_once_attempts_reach_the_maximum(
    attempts: int, max_attempts: int, give_up: bool
) -> None:
    assert should_give_up(attempts, max_attempts) is give_up


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 1000), st.integers(0, 1000))
def test_give_up_is_attempts_at_least_max(attempts: int, max_attempts: int) -> None:
    assert should_give_up(attempts, max_attempts) is (attempts >= max_attempts)


# --- the contract ------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "methods"),
    [
        (JobStore, {"claim", "complete", "fail", "recover_stale"}),
        (Transport, {"send"}),
        (WorkerExecutor, {"execute"}),
    ],
)
def test_protocols_name_the_contract_methods(protocol: type, methods: set[str]) -> None:
    """Apps implement these by name; a rename would break every adapter."""
    declared = {name for name in vars(protocol) if not name.startswith("_")}

    assert declared == methods
