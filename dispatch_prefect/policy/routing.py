"""Where a job runs: the first backend that fits, LOCAL -> LAN -> CLOUD -> SDK.

SDK backends (paid third-party APIs) are never chosen unless the caller opts
in with ``allow_sdk=True``, even when nothing else fits.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from dispatch_prefect.policy.estimate import vram_fits

__all__ = [
    "ROUTING_ORDER",
    "BackendCapabilities",
    "BackendKind",
    "NoEligibleBackendError",
    "NodeIdentity",
    "Routable",
    "ToolRequirements",
    "select_backend",
]


class BackendKind(enum.StrEnum):
    """The kinds of place work can run, in the order they are preferred."""

    LOCAL = "local"
    LAN_WORKER = "lan_worker"
    CLOUD_WORKER = "cloud_worker"
    SDK = "sdk"


ROUTING_ORDER: tuple[BackendKind, ...] = (
    BackendKind.LOCAL,
    BackendKind.LAN_WORKER,
    BackendKind.CLOUD_WORKER,
    BackendKind.SDK,
)


@dataclass(frozen=True)
class NodeIdentity:
    """A machine that runs work, by name and optional network address."""

    name: str
    address: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("NodeIdentity.name must not be empty")


@dataclass(frozen=True)
class ToolRequirements:
    """What a job needs: its tool, its minimum VRAM, and a pinned image."""

    tool_id: str
    min_vram_gb: float | None = None
    image: str | None = None


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend offers; ``None`` images or tools mean unrestricted."""

    has_gpu: bool = False
    available_vram_gb: float | None = None
    images: frozenset[str] | tuple[str, ...] | None = None
    tool_ids: frozenset[str] | tuple[str, ...] | None = None

    def can_satisfy(self, req: ToolRequirements) -> bool:
        """Whether a job with these requirements can run on this backend.

        VRAM first; then a pinned image must be one the backend lists (when
        it restricts images); a job with no image must use a listed tool
        (when the backend restricts tools).
        """
        return self.why_not(req) is None

    def why_not(self, req: ToolRequirements) -> str | None:
        """The reason this backend cannot take the job, or None if it can."""
        vram = self.available_vram_gb if self.has_gpu else None
        if not vram_fits(vram, req.min_vram_gb):
            offered = "no GPU" if vram is None else f"{vram:g} GB of VRAM"
            return f"needs {req.min_vram_gb:g} GB of VRAM, has {offered}"

        if req.image is not None and self.images is not None:
            if req.image not in self.images:
                return f"image {req.image!r} is not among {sorted(self.images)}"

            return None

        if (
            req.image is None
            and self.tool_ids is not None
            and req.tool_id not in self.tool_ids
        ):
            return f"tool {req.tool_id!r} is not among {sorted(self.tool_ids)}"

        return None


class Routable(Protocol):
    """Anything the router can choose: it has a kind and says what it fits."""

    @property
    def kind(self) -> BackendKind: ...

    def can_satisfy(self, req: ToolRequirements) -> bool: ...


class NoEligibleBackendError(RuntimeError):
    """No backend can run the job; the message says what was asked."""


R = TypeVar("R", bound=Routable)


def select_backend(
    backends: Iterable[R],
    requirements: ToolRequirements,
    *,
    allow_sdk: bool = False,
) -> R:
    """Return the first backend, in routing order, that can run the job.

    Within a kind, backends keep the order they were given in.

    Raises:
        NoEligibleBackendError: nothing fits (an SDK backend that would fit
            does not count unless ``allow_sdk`` is True).
    """
    candidates = list(backends)
    for kind in ROUTING_ORDER:
        if kind is BackendKind.SDK and not allow_sdk:
            continue

        for backend in candidates:
            if backend.kind == kind and backend.can_satisfy(requirements):
                return backend

    raise NoEligibleBackendError(_describe_refusal(requirements, allow_sdk))


def _describe_refusal(req: ToolRequirements, allow_sdk: bool) -> str:
    asked = [f"tool {req.tool_id!r}"]
    if req.min_vram_gb is not None:
        asked.append(f"{req.min_vram_gb:g} GB of VRAM")
    if req.image is not None:
        asked.append(f"image {req.image!r}")
    sdk = "" if allow_sdk else " (SDK backends not allowed: pass allow_sdk=True)"

    return f"no backend can run {', '.join(asked)}{sdk}"
