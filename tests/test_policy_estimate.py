"""The one VRAM rule: no GPU means a GPU job cannot run here."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch_prefect.policy import (
    BackendCapabilities,
    CostEstimate,
    HostCapabilities,
    ToolRequirements,
    vram_fits,
)

vram_gb = st.one_of(
    st.none(), st.floats(0, 1024, allow_nan=False, allow_infinity=False)
)


@pytest.mark.parametrize("available_gb", [None, 0.0, 8.0])
def test_cpu_job_always_fits(available_gb: float | None) -> None:
    assert vram_fits(available_gb, None)


def test_gpu_job_does_not_fit_a_host_without_gpu() -> None:
    assert not vram_fits(None, 1.0)
    assert not vram_fits(None, 0.0)


@pytest.mark.parametrize(
    ("available_gb", "required_gb", "fits"),
    [(24.0, 24.0, True), (23.99, 24.0, False), (80.0, 24.0, True), (8, 16, False)],
)
def test_gpu_job_needs_at_least_the_required_vram(
    available_gb: float, required_gb: float, fits: bool
) -> None:
    assert vram_fits(available_gb, required_gb) is fits


def test_host_without_gpu_fits_only_cpu_jobs() -> None:
    host = HostCapabilities()

    assert host.available_vram_gb is None
    assert host.can_fit_vram(None)
    assert not host.can_fit_vram(4.0)


def test_host_with_gpu_fits_jobs_up_to_its_vram() -> None:
    host = HostCapabilities(available_vram_gb=24.0)

    assert host.can_fit_vram(24.0)
    assert not host.can_fit_vram(24.5)


@settings(max_examples=100, deadline=None)
@given(vram_gb, vram_gb)
def test_host_and_router_agree_with_vram_fits(
    available_gb: float | None, required_gb: float | None
) -> None:
    """The gate and the router ask the same rule, so they never disagree."""
    host = HostCapabilities(available_vram_gb=available_gb)
    backend = BackendCapabilities(
        has_gpu=available_gb is not None, available_vram_gb=available_gb
    )
    job = ToolRequirements("cofold", min_vram_gb=required_gb)

    expected = vram_fits(available_gb, required_gb)
    assert host.can_fit_vram(required_gb) is expected
    assert backend.can_satisfy(job) is expected


def test_cost_estimate_holds_what_the_gate_reports() -> None:
    estimate = CostEstimate(
        estimated_seconds=3600.0,
        estimated_vram_gb=None,
        feasible_locally=True,
        reason="a CPU job fits this laptop",
    )

    assert estimate.feasible_locally
    assert estimate.estimated_vram_gb is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        estimate.reason = "changed"  # type: ignore[misc]
