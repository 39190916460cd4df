"""What the gate tells Prefect: events for the feed, artifacts for people.

Events (``dispatch.gate.refused``, ``dispatch.reservation.reserved``,
``dispatch.reservation.reconciled`` / ``released``) name the budget as their
resource, so an automation can watch one budget. Artifacts on the flow run
show the run's spend and the month's budget progress. Amounts travel as
strings so no float ever carries money; no secret is ever included.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, create_table_artifact
from prefect.events import emit_event

if TYPE_CHECKING:
    from dispatch_prefect.gate import GateSpec, Plan, RoutedBackend
    from dispatch_prefect.ledger import Ledger, Reservation

__all__ = [
    "emit_refusal",
    "emit_reserved",
    "emit_settled",
    "publish_spend",
    "spend_rows",
]

logger = logging.getLogger("dispatch_prefect.report")


def _budget_resource(budget: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"dispatch.budget.{budget}",
        "prefect.resource.name": budget,
    }


def _flow_run_related(flow_run_id: UUID | str) -> list[dict[str, str]]:
    return [
        {
            "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
            "prefect.resource.role": "flow-run",
        }
    ]


def _emit(event: str, budget: str, flow_run_id: UUID | str, **payload: Any) -> None:
    try:
        emit_event(
            event=event,
            resource=_budget_resource(budget),
            related=_flow_run_related(flow_run_id),
            payload=payload,
        )
    except Exception:
        # Reporting never decides: a lost event must not lose the money trail,
        # which lives in the ledger.
        logger.warning("could not emit %s", event, exc_info=True)


def emit_refusal(
    spec: GateSpec,
    backend: RoutedBackend,
    bound_usd: Decimal,
    reason: str,
    flow_run_id: UUID | str,
) -> None:
    """A call was refused before anyone was asked."""
    _emit(
        "dispatch.gate.refused",
        spec.budget,
        flow_run_id,
        tool_id=spec.tool_id,
        backend=backend.name,
        bound_usd=str(bound_usd),
        reason=reason,
    )


def emit_reserved(
    plan: Plan, reservation: Reservation, flow_run_id: UUID | str
) -> None:
    """A call's bound was reserved."""
    _emit(
        "dispatch.reservation.reserved",
        plan.spec.budget,
        flow_run_id,
        tool_id=plan.spec.tool_id,
        backend=plan.backend.name,
        bound_usd=str(reservation.bound_usd),
        month=reservation.month,
        task_run_id=plan.key.task_run_id,
        attempt=plan.key.attempt,
    )


def emit_settled(plan: Plan, reservation: Reservation) -> None:
    """A call's reservation became spend, or was given back."""
    _emit(
        f"dispatch.reservation.{_settled_word(reservation)}",
        plan.spec.budget,
        plan.flow_run_id,
        tool_id=plan.spec.tool_id,
        backend=plan.backend.name,
        bound_usd=str(reservation.bound_usd),
        actual_usd=str(reservation.actual_usd),
        overrun=reservation.overrun,
        task_run_id=plan.key.task_run_id,
        attempt=plan.key.attempt,
    )


def _settled_word(reservation: Reservation) -> str:
    status = getattr(reservation.status, "value", reservation.status)

    return "reconciled" if status == "spent" else str(status)


def spend_rows(ledger: Ledger, budget: str, run_id: str) -> list[dict[str, str]]:
    """One row per gated call of a run, for a table people read."""
    rows = []
    for reservation in ledger.reservations(budget, run_id=run_id, limit=1000):
        status = getattr(reservation.status, "value", reservation.status)
        actual = reservation.actual_usd
        rows.append(
            {
                "call": reservation.label,
                "attempt": str(reservation.key.attempt),
                "status": str(status) + (" (overrun)" if reservation.overrun else ""),
                "bound_usd": str(reservation.bound_usd),
                "actual_usd": "" if actual is None else str(actual),
                "month": reservation.month,
            }
        )

    return rows


def publish_spend(plan: Plan, ledger: Ledger) -> None:
    """Refresh the run's spend table and the month's budget progress."""
    try:
        _publish_spend(plan, ledger)
    except Exception:
        logger.warning("could not publish spend artifacts", exc_info=True)


def _publish_spend(plan: Plan, ledger: Ledger) -> None:
    budget = plan.spec.budget
    run_id = plan.key.root_run_id
    run_state, month_state = ledger.window_states(
        budget, run_id, time_zone=plan.time_zone
    )
    slug = _artifact_slug(budget)
    create_table_artifact(
        table=spend_rows(ledger, budget, run_id),
        key=f"dispatch-run-spend-{slug}",
        description=(
            f"Gated calls of this run against budget {budget!r}: run committed "
            f"${run_state.committed()} of ${plan.cap.run_usd} "
            f"(spent ${run_state.spent_usd}, reserved ${run_state.reserved_usd})."
        ),
        _sync=True,  # type: ignore[call-arg]
    )
    cap = plan.cap.month_usd
    # A display percentage, not money: the figures in the text stay exact.
    share = Decimal(1) if cap == 0 else min(month_state.committed() / cap, Decimal(1))
    percent = float(share * 100)
    create_progress_artifact(
        progress=percent,
        key=f"dispatch-month-{slug}",
        description=(
            f"Budget {budget!r} this month: ${month_state.committed()} committed "
            f"of ${cap} (spent ${month_state.spent_usd}, reserved "
            f"${month_state.reserved_usd})."
        ),
        _sync=True,  # type: ignore[call-arg]
    )


def _artifact_slug(name: str) -> str:
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower())

    return slug.strip("-") or "budget"
