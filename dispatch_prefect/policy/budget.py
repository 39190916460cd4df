"""The hard dollar cap: two windows, a reserve-on-approval admission rule.

A job is admitted only when its upper-bound cost fits under the cap of the
run window (one root flow run) and of the month window, counting what is
already reserved and spent. Both caps default to zero, so until someone sets
a budget only a zero-cost job is admitted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal

from dispatch_prefect.policy.money import EXACT, as_quantity, as_usd

__all__ = [
    "AdmissionDecision",
    "BudgetCap",
    "BudgetState",
    "BudgetWindow",
    "CostRates",
    "admits",
    "estimate_cost",
]


class BudgetWindow(enum.StrEnum):
    """The span a cap applies to."""

    RUN = "run"
    MONTH = "month"


@dataclass(frozen=True)
class BudgetCap:
    """The most a run and a calendar month may commit, in USD."""

    run_usd: Decimal = Decimal(0)
    month_usd: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_usd", as_usd(self.run_usd, name="run_usd"))
        object.__setattr__(self, "month_usd", as_usd(self.month_usd, name="month_usd"))

    def for_window(self, window: BudgetWindow) -> Decimal:
        """The cap of one window.

        Raises:
            ValueError: ``window`` is not a budget window.
        """
        if BudgetWindow(window) is BudgetWindow.RUN:
            return self.run_usd

        return self.month_usd


@dataclass(frozen=True)
class BudgetState:
    """What a window has committed so far: reserved and spent, in USD."""

    reserved_usd: Decimal = Decimal(0)
    spent_usd: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "reserved_usd", as_usd(self.reserved_usd, name="reserved_usd")
        )
        object.__setattr__(self, "spent_usd", as_usd(self.spent_usd, name="spent_usd"))

    def committed(self) -> Decimal:
        """Reserved plus spent: the money no other job may count on."""
        return EXACT.add(self.reserved_usd, self.spent_usd)


@dataclass(frozen=True)
class CostRates:
    """Per-second prices of a backend and the idle tail billed after a job.

    ``idle_tail_s`` covers time a backend keeps billing after the work ends
    (a Cloud Run instance winding down, say).
    """

    gpu_usd_per_s: Decimal
    vcpu_usd_per_s: Decimal
    gib_usd_per_s: Decimal
    idle_tail_s: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        for name in ("gpu_usd_per_s", "vcpu_usd_per_s", "gib_usd_per_s"):
            object.__setattr__(self, name, as_usd(getattr(self, name), name=name))
        object.__setattr__(
            self, "idle_tail_s", as_quantity(self.idle_tail_s, name="idle_tail_s")
        )


@dataclass(frozen=True)
class AdmissionDecision:
    """Whether a bound was admitted and, if not, which window refused it."""

    admitted: bool
    refused_window: BudgetWindow | None
    reason: str


def admits(
    estimate_usd: Decimal,
    run_state: BudgetState,
    month_state: BudgetState,
    cap: BudgetCap,
) -> AdmissionDecision:
    """Decide whether a job with this upper-bound cost may be reserved.

    The run window is checked first, then the month window; each must hold
    ``committed + estimate <= cap``. A negative estimate is refused with no
    window named: it would hand money back.

    Example:
        >>> from decimal import Decimal
        >>> admits(Decimal("1.50"), BudgetState(), BudgetState(),
        ...        BudgetCap(run_usd=Decimal(1), month_usd=Decimal(10))).admitted
        False
    """
    if not isinstance(estimate_usd, Decimal | int) or isinstance(estimate_usd, bool):
        raise TypeError(
            f"estimate_usd must be a Decimal, got {type(estimate_usd).__name__} "
            f"{estimate_usd!r}"
        )

    estimate = Decimal(estimate_usd)
    if not estimate.is_finite() or estimate < 0:
        return AdmissionDecision(
            admitted=False,
            refused_window=None,
            reason=(
                f"estimate ${estimate} is not a non-negative amount; "
                "an upper bound of cost must be zero or more"
            ),
        )

    windows = (
        (BudgetWindow.RUN, run_state),
        (BudgetWindow.MONTH, month_state),
    )
    for window, state in windows:
        limit = cap.for_window(window)
        committed = state.committed()
        after = EXACT.add(committed, estimate)
        if after > limit:
            return AdmissionDecision(
                admitted=False,
                refused_window=window,
                reason=_refusal_reason(window, committed, estimate, limit),
            )

    return AdmissionDecision(
        admitted=True,
        refused_window=None,
        reason=(
            f"${estimate} fits: run ${run_state.committed()} of "
            f"${cap.run_usd}, month ${month_state.committed()} of "
            f"${cap.month_usd} committed before it"
        ),
    )


def _refusal_reason(
    window: BudgetWindow, committed: Decimal, estimate: Decimal, limit: Decimal
) -> str:
    field = f"{window.value}_usd"
    if limit == 0:
        return (
            f"the {window.value} cap is $0, so paid work is off; "
            f"this job may cost up to ${estimate}: set {field} on the budget "
            "to allow it"
        )

    left = max(EXACT.subtract(limit, committed), Decimal(0))
    return (
        f"the {window.value} window has ${committed} committed of a "
        f"${limit} cap (${left} left) and this job may cost up to "
        f"${estimate}; raise {field} on the budget or wait for committed "
        "work to settle"
    )


def estimate_cost(
    rates: CostRates,
    *,
    max_runtime_s: Decimal | int | float,
    vcpus: Decimal | int | float,
    memory_gib: Decimal | int | float,
) -> Decimal:
    """The exact upper-bound cost of a job that runs at most ``max_runtime_s``.

    ``(max_runtime_s + idle_tail_s) * (gpu + vcpu * vcpus + gib * memory_gib)``

    Raises:
        ValueError: a negative or non-finite input, named.
    """
    runtime = as_quantity(max_runtime_s, name="max_runtime_s")
    cpu_count = as_quantity(vcpus, name="vcpus")
    memory = as_quantity(memory_gib, name="memory_gib")

    per_second = EXACT.add(
        rates.gpu_usd_per_s,
        EXACT.add(
            EXACT.multiply(rates.vcpu_usd_per_s, cpu_count),
            EXACT.multiply(rates.gib_usd_per_s, memory),
        ),
    )
    billed_s = EXACT.add(runtime, rates.idle_tail_s)

    return EXACT.multiply(billed_s, per_second)
