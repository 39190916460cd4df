"""The pure policy core: afford, route, approve, egress. Standard library only.

Its public names match dispatch-kit 0.3.0, so code written against that
library runs unchanged; ``TokenRates`` and the token estimates are additions
for paid LLM and SDK calls.
"""

from dispatch_prefect.policy.approval import Approval, ApprovalOutcome
from dispatch_prefect.policy.budget import (
    AdmissionDecision,
    BudgetCap,
    BudgetState,
    BudgetWindow,
    CostRates,
    admits,
    estimate_cost,
)
from dispatch_prefect.policy.dispatch import (
    DispatchError,
    JobStore,
    Lease,
    RetriableError,
    Transport,
    WorkerExecutor,
    is_lease_stale,
    should_give_up,
)
from dispatch_prefect.policy.egress import (
    EnvLookup,
    ExternalEndpoint,
    SecretMissingError,
    SecretRef,
    log_egress,
)
from dispatch_prefect.policy.estimate import CostEstimate, HostCapabilities, vram_fits
from dispatch_prefect.policy.lifecycle import (
    InvalidTransitionError,
    JobState,
    can_transition,
    ensure_transition,
)
from dispatch_prefect.policy.pricing import (
    TokenRates,
    estimate_token_cost,
    token_cost,
)
from dispatch_prefect.policy.routing import (
    BackendCapabilities,
    BackendKind,
    NodeIdentity,
    NoEligibleBackendError,
    Routable,
    ToolRequirements,
    select_backend,
)

__all__ = [
    "AdmissionDecision",
    "Approval",
    "ApprovalOutcome",
    "BackendCapabilities",
    "BackendKind",
    "BudgetCap",
    "BudgetState",
    "BudgetWindow",
    "CostEstimate",
    "CostRates",
    "DispatchError",
    "EnvLookup",
    "ExternalEndpoint",
    "HostCapabilities",
    "InvalidTransitionError",
    "JobState",
    "JobStore",
    "Lease",
    "NoEligibleBackendError",
    "NodeIdentity",
    "RetriableError",
    "Routable",
    "SecretMissingError",
    "SecretRef",
    "TokenRates",
    "ToolRequirements",
    "Transport",
    "WorkerExecutor",
    "admits",
    "can_transition",
    "ensure_transition",
    "estimate_cost",
    "estimate_token_cost",
    "is_lease_stale",
    "log_egress",
    "select_backend",
    "should_give_up",
    "token_cost",
    "vram_fits",
]
