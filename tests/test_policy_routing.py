"""The router: LOCAL -> LAN -> CLOUD -> SDK, the first backend that fits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from dispatch_prefect.policy import (
    BackendCapabilities,
    BackendKind,
    NodeIdentity,
    NoEligibleBackendError,
    Routable,
    ToolRequirements,
    select_backend,
)

CPU_JOB = ToolRequirements(tool_id="cofold")
GPU_JOB = ToolRequirements(tool_id="cofold", min_vram_gb=24.0)
OPEN = BackendCapabilities()
BIG_GPU = BackendCapabilities(has_gpu=True, available_vram_gb=48.0)


@dataclass(frozen=True)
class Backend:
    """A backend the way an app declares one: a name, a kind, what it offers."""

    name: str
    kind: BackendKind
    capabilities: BackendCapabilities = OPEN

    def can_satisfy(self, req: ToolRequirements) -> bool:
        return self.capabilities.can_satisfy(req)


DOCK_ONLY = Backend(
    "laptop", BackendKind.LOCAL, BackendCapabilities(tool_ids=("dock",))
)


def test_backend_kind_values() -> None:
    assert [kind.value for kind in BackendKind] == [
        "local",
        "lan_worker",
        "cloud_worker",
        "sdk",
    ]
    assert BackendKind("sdk") is BackendKind.SDK


def test_node_identity_keeps_name_and_address() -> None:
    node = NodeIdentity("gpu-box", address="100.64.0.7")

    assert (node.name, node.address) == ("gpu-box", "100.64.0.7")
    assert NodeIdentity("laptop").address is None


def test_node_identity_refuses_an_empty_name() -> None:
    with pytest.raises(ValueError, match="name"):
        NodeIdentity("")


def test_tool_requirements_default_to_a_cpu_job_with_no_image() -> None:
    assert CPU_JOB.min_vram_gb is None
    assert CPU_JOB.image is None


@pytest.mark.parametrize(
    "frozen",
    [CPU_JOB, OPEN, NodeIdentity("n")],
)
def test_routing_values_are_frozen(frozen: object) -> None:
    field = dataclasses.fields(frozen)[0].name  # type: ignore[arg-type]

    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(frozen, field, None)


# --- can_satisfy -------------------------------------------------------------


def test_unrestricted_cpu_backend_takes_a_cpu_job() -> None:
    assert OPEN.can_satisfy(CPU_JOB)


def test_backend_without_gpu_refuses_a_gpu_job() -> None:
    assert not OPEN.can_satisfy(GPU_JOB)


def test_backend_reporting_vram_but_no_gpu_refuses_a_gpu_job() -> None:
    """``has_gpu=False`` wins over a stray VRAM figure."""
    caps = BackendCapabilities(has_gpu=False, available_vram_gb=80.0)

    assert not caps.can_satisfy(GPU_JOB)


def test_gpu_backend_with_unknown_vram_refuses_a_gpu_job() -> None:
    assert not BackendCapabilities(has_gpu=True).can_satisfy(GPU_JOB)


@pytest.mark.parametrize(
    ("vram_gb", "fits"), [(23.9, False), (24.0, True), (48.0, True)]
)
def test_gpu_job_needs_at_least_the_required_vram(vram_gb: float, fits: bool) -> None:
    caps = BackendCapabilities(has_gpu=True, available_vram_gb=vram_gb)

    assert caps.can_satisfy(GPU_JOB) is fits


def test_gpu_backend_takes_a_cpu_job() -> None:
    assert BIG_GPU.can_satisfy(CPU_JOB)


def test_vram_is_checked_before_the_image_list() -> None:
    """A listed image does not make up for missing VRAM."""
    caps = BackendCapabilities(images=("cofold:1",))
    job = ToolRequirements("cofold", min_vram_gb=24.0, image="cofold:1")

    assert not caps.can_satisfy(job)
    assert "VRAM" in (caps.why_not(job) or "")


def test_pinned_image_must_be_listed_when_the_backend_restricts_images() -> None:
    caps = BackendCapabilities(images=frozenset({"cofold:1"}))

    assert caps.can_satisfy(ToolRequirements("cofold", image="cofold:1"))
    assert not caps.can_satisfy(ToolRequirements("cofold", image="cofold:2"))


def test_pinned_image_fits_a_backend_that_does_not_restrict_images() -> None:
    assert OPEN.can_satisfy(ToolRequirements("cofold", image="anything:latest"))


def test_listed_image_fits_even_when_the_tool_is_not_listed() -> None:
    """The image is what runs; the tool list only speaks for image-less jobs."""
    caps = BackendCapabilities(images=("cofold:1",), tool_ids=("other",))

    assert caps.can_satisfy(ToolRequirements("cofold", image="cofold:1"))


def test_pinned_image_ignores_the_tool_list_when_images_are_unrestricted() -> None:
    caps = BackendCapabilities(tool_ids=("other",))

    assert caps.can_satisfy(ToolRequirements("cofold", image="cofold:1"))


def test_job_without_image_needs_a_listed_tool_when_tools_are_restricted() -> None:
    caps = BackendCapabilities(tool_ids=frozenset({"cofold"}))

    assert caps.can_satisfy(ToolRequirements("cofold"))
    assert not caps.can_satisfy(ToolRequirements("dock"))


def test_job_without_image_ignores_the_image_list() -> None:
    caps = BackendCapabilities(images=("cofold:1",))

    assert caps.can_satisfy(ToolRequirements("dock"))


def test_why_not_names_the_missing_tool() -> None:
    caps = BackendCapabilities(tool_ids=("cofold",))

    assert "'dock'" in (caps.why_not(ToolRequirements("dock")) or "")
    assert caps.why_not(CPU_JOB) is None


# --- select_backend ----------------------------------------------------------


def test_backend_satisfies_the_routable_protocol() -> None:
    backend: Routable = Backend("laptop", BackendKind.LOCAL)

    assert backend.can_satisfy(CPU_JOB)


def test_prefers_local_over_lan_over_cloud() -> None:
    cloud = Backend("cloud", BackendKind.CLOUD_WORKER)
    lan = Backend("lan", BackendKind.LAN_WORKER)
    local = Backend("local", BackendKind.LOCAL)

    assert select_backend([cloud, lan, local], CPU_JOB) is local
    assert select_backend([cloud, lan], CPU_JOB) is lan
    assert select_backend([cloud], CPU_JOB) is cloud


def test_skips_a_preferred_kind_that_cannot_fit() -> None:
    local = Backend("laptop", BackendKind.LOCAL)
    cloud = Backend("l4", BackendKind.CLOUD_WORKER, BIG_GPU)

    assert select_backend([local, cloud], GPU_JOB) is cloud


def test_walks_the_full_order_local_lan_cloud_sdk() -> None:
    """Each kind is chosen exactly when every earlier kind cannot fit."""
    kinds = [
        BackendKind.SDK,
        BackendKind.CLOUD_WORKER,
        BackendKind.LAN_WORKER,
        BackendKind.LOCAL,
    ]
    backends = [Backend(kind.value, kind) for kind in kinds]

    chosen = []
    while backends:
        pick = select_backend(backends, CPU_JOB, allow_sdk=True)
        chosen.append(pick.kind)
        backends.remove(pick)

    assert chosen == [
        BackendKind.LOCAL,
        BackendKind.LAN_WORKER,
        BackendKind.CLOUD_WORKER,
        BackendKind.SDK,
    ]


def test_keeps_the_given_order_within_a_kind() -> None:
    first = Backend("first", BackendKind.LAN_WORKER)
    second = Backend("second", BackendKind.LAN_WORKER)

    assert select_backend([first, second], CPU_JOB) is first
    assert select_backend([second, first], CPU_JOB) is second


def test_takes_the_first_fitting_backend_within_a_kind() -> None:
    small = Backend("small", BackendKind.LAN_WORKER, BackendCapabilities(True, 8.0))
    big = Backend("big", BackendKind.LAN_WORKER, BIG_GPU)
    bigger = Backend("bigger", BackendKind.LAN_WORKER, BIG_GPU)

    assert select_backend([small, big, bigger], GPU_JOB) is big


def test_never_picks_sdk_without_allow_sdk_even_if_it_is_the_only_fit() -> None:
    sdk = Backend("gemini", BackendKind.SDK)
    assert sdk.can_satisfy(CPU_JOB)

    with pytest.raises(NoEligibleBackendError, match="allow_sdk=True"):
        select_backend([DOCK_ONLY, sdk], CPU_JOB)

    with pytest.raises(NoEligibleBackendError):
        select_backend([sdk], CPU_JOB)


def test_picks_sdk_when_allowed_and_nothing_else_fits() -> None:
    sdk = Backend("gemini", BackendKind.SDK)

    assert select_backend([sdk, DOCK_ONLY], CPU_JOB, allow_sdk=True) is sdk


def test_prefers_a_fitting_non_sdk_backend_even_when_sdk_is_allowed() -> None:
    sdk = Backend("gemini", BackendKind.SDK)
    cloud = Backend("l4", BackendKind.CLOUD_WORKER, BIG_GPU)

    assert select_backend([sdk, cloud], GPU_JOB, allow_sdk=True) is cloud


def test_accepts_a_one_shot_iterable_of_backends() -> None:
    lan = Backend("lan", BackendKind.LAN_WORKER)
    local = Backend("local", BackendKind.LOCAL)

    assert select_backend(iter([lan, local]), CPU_JOB) is local


def test_routes_a_backend_whose_kind_is_the_string_value() -> None:
    """An app may declare ``kind="local"`` as read from its config."""
    from_config = Backend("laptop", "local")  # type: ignore[arg-type]
    lan = Backend("lan", BackendKind.LAN_WORKER)

    assert select_backend([lan, from_config], CPU_JOB) is from_config


def test_refuses_when_there_are_no_backends() -> None:
    with pytest.raises(NoEligibleBackendError, match="'cofold'"):
        select_backend([], CPU_JOB)


def test_no_eligible_backend_error_says_what_was_asked() -> None:
    job = ToolRequirements("cofold", min_vram_gb=24.0, image="cofold:1")

    with pytest.raises(NoEligibleBackendError) as caught:
        select_backend([Backend("laptop", BackendKind.LOCAL)], job)

    message = str(caught.value)
    assert "'cofold'" in message
    assert "24 GB of VRAM" in message
    assert "'cofold:1'" in message
    assert "allow_sdk=True" in message
    assert isinstance(caught.value, RuntimeError)


def test_no_eligible_backend_error_with_sdk_allowed_does_not_suggest_it() -> None:
    with pytest.raises(NoEligibleBackendError) as caught:
        select_backend([], GPU_JOB, allow_sdk=True)

    assert "allow_sdk" not in str(caught.value)


def test_routes_any_object_with_a_kind_and_can_satisfy() -> None:
    """Anything with ``kind`` and ``can_satisfy`` routes, dataclass or not."""

    class Worker:
        kind = BackendKind.LAN_WORKER

        def can_satisfy(self, req: ToolRequirements) -> bool:
            return req.tool_id == "cofold"

    worker = Worker()

    assert select_backend([worker], CPU_JOB) is worker
    with pytest.raises(NoEligibleBackendError, match="'dock'"):
        select_backend([worker], ToolRequirements("dock"))
