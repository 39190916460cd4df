"""dispatch_prefect: a fail-closed budget, router and approval gate for Prefect.

The policy names of dispatch-kit 0.3.0 are importable from here unchanged and
load only the standard library. The Prefect parts (``gated_task``, the Block
classes, the ledger) load on first use, so ``import dispatch_prefect.policy``
stays free of Prefect, while ``prefect block register -m dispatch_prefect``
still finds every Block class.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dispatch_prefect.policy import (
    AdmissionDecision,
    Approval,
    ApprovalOutcome,
    BackendCapabilities,
    BackendKind,
    BudgetCap,
    BudgetState,
    BudgetWindow,
    CostEstimate,
    CostRates,
    DispatchError,
    EnvLookup,
    ExternalEndpoint,
    HostCapabilities,
    InvalidTransitionError,
    JobState,
    JobStore,
    Lease,
    NodeIdentity,
    NoEligibleBackendError,
    RetriableError,
    Routable,
    SecretMissingError,
    SecretRef,
    TokenRates,
    ToolRequirements,
    Transport,
    WorkerExecutor,
    admits,
    can_transition,
    ensure_transition,
    estimate_cost,
    estimate_token_cost,
    is_lease_stale,
    log_egress,
    select_backend,
    should_give_up,
    token_cost,
    vram_fits,
)

if TYPE_CHECKING:
    from dispatch_prefect.approval import ApprovalInput, ApprovalRejected
    from dispatch_prefect.blocks import (
        BackendBlock,
        BlockNotFound,
        BudgetBlock,
        LedgerBlock,
        RatesBlock,
        SecretRefBlock,
    )
    from dispatch_prefect.gate import (
        GateError,
        GateOutsideFlowError,
        NoBackendFitsError,
        PricingError,
        gated_task,
    )
    from dispatch_prefect.hooks import settle_flow_run
    from dispatch_prefect.ledger import (
        BudgetExceeded,
        Ledger,
        LedgerUnavailable,
        ReservationKey,
    )

__version__ = "0.1.0"

_LAZY = {
    "ApprovalInput": "dispatch_prefect.approval",
    "ApprovalRejected": "dispatch_prefect.approval",
    "BackendBlock": "dispatch_prefect.blocks",
    "BlockNotFound": "dispatch_prefect.blocks",
    "BudgetBlock": "dispatch_prefect.blocks",
    "BudgetExceeded": "dispatch_prefect.ledger",
    "GateError": "dispatch_prefect.gate",
    "GateOutsideFlowError": "dispatch_prefect.gate",
    "Ledger": "dispatch_prefect.ledger",
    "LedgerBlock": "dispatch_prefect.blocks",
    "LedgerUnavailable": "dispatch_prefect.ledger",
    "NoBackendFitsError": "dispatch_prefect.gate",
    "PricingError": "dispatch_prefect.gate",
    "RatesBlock": "dispatch_prefect.blocks",
    "ReservationKey": "dispatch_prefect.ledger",
    "SecretRefBlock": "dispatch_prefect.blocks",
    "gated_task": "dispatch_prefect.gate",
    "settle_flow_run": "dispatch_prefect.hooks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dispatch_prefect' has no attribute {name!r}")

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value

    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AdmissionDecision",
    "Approval",
    "ApprovalInput",
    "ApprovalOutcome",
    "ApprovalRejected",
    "BackendBlock",
    "BackendCapabilities",
    "BackendKind",
    "BlockNotFound",
    "BudgetBlock",
    "BudgetCap",
    "BudgetExceeded",
    "BudgetState",
    "BudgetWindow",
    "CostEstimate",
    "CostRates",
    "DispatchError",
    "EnvLookup",
    "ExternalEndpoint",
    "GateError",
    "GateOutsideFlowError",
    "HostCapabilities",
    "InvalidTransitionError",
    "JobState",
    "JobStore",
    "Lease",
    "Ledger",
    "LedgerBlock",
    "LedgerUnavailable",
    "NoBackendFitsError",
    "NoEligibleBackendError",
    "NodeIdentity",
    "PricingError",
    "RatesBlock",
    "ReservationKey",
    "RetriableError",
    "Routable",
    "SecretMissingError",
    "SecretRef",
    "SecretRefBlock",
    "TokenRates",
    "ToolRequirements",
    "Transport",
    "WorkerExecutor",
    "__version__",
    "admits",
    "can_transition",
    "ensure_transition",
    "estimate_cost",
    "estimate_token_cost",
    "gated_task",
    "is_lease_stale",
    "log_egress",
    "select_backend",
    "settle_flow_run",
    "should_give_up",
    "token_cost",
    "vram_fits",
]
