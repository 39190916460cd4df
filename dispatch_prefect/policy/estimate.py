"""Whether a job's GPU memory need fits a host: the single home of that rule.

The gate and the router both ask ``vram_fits``, so "no GPU means a GPU job
cannot run here" is decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CostEstimate", "HostCapabilities", "vram_fits"]


def vram_fits(available_gb: float | None, required_gb: float | None) -> bool:
    """True when a job needing ``required_gb`` of VRAM can run on a host.

    A CPU job (``required_gb`` None) always fits. A GPU job needs a GPU
    (``available_gb`` not None) with at least the required memory.
    """
    if required_gb is None:
        return True

    if available_gb is None:
        return False

    return available_gb >= required_gb


@dataclass(frozen=True)
class HostCapabilities:
    """What the machine at hand offers; ``None`` VRAM means no GPU."""

    available_vram_gb: float | None = None

    def can_fit_vram(self, required_gb: float | None) -> bool:
        """Whether a job needing ``required_gb`` of VRAM fits this host."""
        return vram_fits(self.available_vram_gb, required_gb)


@dataclass(frozen=True)
class CostEstimate:
    """A job's expected runtime and VRAM, and whether it can run locally."""

    estimated_seconds: float
    estimated_vram_gb: float | None
    feasible_locally: bool
    reason: str
