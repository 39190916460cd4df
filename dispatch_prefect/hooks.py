"""Settling reservations from what really ran.

Each admitted call is remembered here from its reservation until it is
settled: reconciled at the cost of its real runtime (the child flow run's
start and end, plus the backend's idle tail; or the measured inline time),
or released when the job never started. Settling happens once per attempt,
whichever comes first: the task body when an attempt fails (so a retry is
charged for what the failed attempt used), the task's completion and
failure hooks, or a flow's crash and cancellation hooks. A call nobody
settles, because the process died, is left reserved for the sweeper, which
charges its full bound when it cannot find the truth.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect.client.orchestration import get_client

from dispatch_prefect.policy import BackendKind
from dispatch_prefect.policy.money import EXACT

if TYPE_CHECKING:
    from dispatch_prefect.gate import Plan
    from dispatch_prefect.ledger import Ledger, Reservation

__all__ = [
    "current_call",
    "price_from_tags",
    "record_child_run",
    "record_inline_runtime",
    "record_usage_usd",
    "remember_reservation",
    "resolve_from_prefect",
    "settle",
    "settle_flow_run",
    "settle_on_completion",
    "settle_on_failure",
]

logger = logging.getLogger("dispatch_prefect.hooks")


@dataclass
class _OpenCall:
    plan: Plan
    ledger: Ledger
    child_flow_run_id: UUID | None = None
    inline_runtime_s: Decimal | None = None
    usage_usd: Decimal | None = None


_open: dict[UUID, _OpenCall] = {}
_lock = threading.Lock()


def remember_reservation(task_run_id: UUID, plan: Plan, ledger: Ledger) -> None:
    """Track a reserved call until it is settled."""
    with _lock:
        _open[task_run_id] = _OpenCall(plan=plan, ledger=ledger)


def record_child_run(task_run_id: UUID, flow_run_id: UUID) -> None:
    """Note the flow run that carries a call on its work pool."""
    with _lock:
        if task_run_id in _open:
            _open[task_run_id].child_flow_run_id = flow_run_id


def record_inline_runtime(task_run_id: UUID, runtime_s: Decimal) -> None:
    """Note how long an inline call really ran."""
    with _lock:
        if task_run_id in _open:
            _open[task_run_id].inline_runtime_s = runtime_s


def current_call() -> tuple[Plan, UUID]:
    """The admitted call the running task belongs to.

    Raises:
        RuntimeError: not inside a gated call that was admitted.
    """
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    task_run_id = None if ctx is None else ctx.task_run.id
    with _lock:
        call = None if task_run_id is None else _open.get(task_run_id)
    if call is None or task_run_id is None:
        raise RuntimeError(
            "not inside an admitted gated call: use this from the body of a "
            "@gated_task function"
        )

    return call.plan, task_run_id


def record_usage_usd(task_run_id: UUID, cost_usd: Decimal) -> None:
    """Note what an SDK call's reported usage cost (added up per call)."""
    with _lock:
        call = _open.get(task_run_id)
        if call is not None:
            before = call.usage_usd or Decimal(0)
            call.usage_usd = EXACT.add(before, cost_usd)


def settle(task_run_id: UUID) -> Reservation | None:
    """Reconcile or release one call's reservation; at most once.

    Never raises: a call that cannot be settled now stays reserved, and the
    sweeper settles it later (charging its full bound if nothing is known).
    """
    with _lock:
        call = _open.pop(task_run_id, None)
    if call is None:
        return None

    try:
        return _settle(call)
    except Exception:
        logger.exception(
            "could not settle %s (%s); it stays reserved at $%s until the "
            "sweeper settles it",
            call.plan.spec.tool_id,
            call.plan.key,
            call.plan.bound_usd,
        )
        return None


def _settle(call: _OpenCall) -> Reservation:
    from dispatch_prefect import report

    plan = call.plan
    runtime_s = call.inline_runtime_s
    if call.child_flow_run_id is not None:
        runtime_s = child_runtime_s(call.child_flow_run_id)

    if plan.backend.kind is BackendKind.SDK:
        # Priced by tokens: what the call reported, or its whole bound when it
        # reported nothing (the provider bills what it billed).
        actual_usd = plan.bound_usd if call.usage_usd is None else call.usage_usd
        reservation = call.ledger.reconcile(plan.key, actual_usd)
        logger.info(
            "reconciled %s: $%s spent of $%s reserved (%s)",
            plan.spec.tool_id,
            actual_usd,
            plan.bound_usd,
            "reported usage" if call.usage_usd is not None else "no usage reported",
        )
    elif runtime_s is None:
        reservation = call.ledger.release(plan.key)
        logger.info("released $%s: %s never started", plan.bound_usd, plan.spec.tool_id)
    else:
        actual_usd = plan.backend.actual_usd(plan.spec, runtime_s)
        reservation = call.ledger.reconcile(plan.key, actual_usd)
        logger.info(
            "reconciled %s: $%s spent of $%s reserved (%s s)",
            plan.spec.tool_id,
            actual_usd,
            plan.bound_usd,
            runtime_s,
        )

    report.emit_settled(plan, reservation)
    report.publish_spend(plan, call.ledger)

    return reservation


def child_runtime_s(flow_run_id: UUID) -> Decimal | None:
    """Seconds a child flow run really ran; None if it never started."""
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)

    return runtime_between(flow_run.start_time, flow_run.end_time)


def runtime_between(start: datetime | None, end: datetime | None) -> Decimal | None:
    """Seconds from ``start`` to ``end`` (to now while running); None if unstarted."""
    if start is None:
        return None

    if end is None:
        from datetime import UTC

        end = datetime.now(UTC)

    seconds = max((end - start).total_seconds(), 0.0)

    return Decimal(repr(round(seconds, 3)))


def settle_on_completion(task: Any, task_run: Any, state: Any) -> None:
    """Task hook: the call completed; charge what it used."""
    settle(task_run.id)


def settle_on_failure(task: Any, task_run: Any, state: Any) -> None:
    """Task hook: the call failed for good; charge what it used, if anything."""
    settle(task_run.id)


def settle_flow_run(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook for ``on_crashed`` / ``on_cancellation``: settle what is open.

    ```python
    @flow(on_crashed=[settle_flow_run], on_cancellation=[settle_flow_run])
    def pipeline(): ...
    ```
    """
    run_id = str(flow_run.id)
    with _lock:
        open_ids = [
            task_run_id
            for task_run_id, call in _open.items()
            if run_id in (call.plan.flow_run_id, call.plan.key.root_run_id)
        ]
    for task_run_id in open_ids:
        settle(task_run_id)


def resolve_from_prefect(reservation: Reservation) -> Decimal | None:
    """The sweeper's resolver: what an unsettled call really cost, if known.

    A call that ran on a pool left a child flow run tagged with its key and
    its price: a finished child is charged its real runtime, one that never
    started costs nothing. Anything else (an inline call whose process died,
    a child still running, a child without a price) is unknown: None, so
    the ledger charges the full bound and flags it.
    """
    from dispatch_prefect.submit import child_runs_for, key_tag

    children = child_runs_for(key_tag(reservation.key))
    if len(children) != 1:
        return None

    child = children[0]
    if child.state is None or not child.state.is_final():
        return None

    runtime_s = runtime_between(child.start_time, child.end_time)
    if runtime_s is None:
        return Decimal(0)

    price = price_from_tags(child.tags)
    if price is None:
        return None
    per_s, tail_s = price

    return EXACT.multiply(EXACT.add(runtime_s, tail_s), per_s)


def price_from_tags(tags: list[str]) -> tuple[Decimal, Decimal] | None:
    """(USD per second, idle tail s) from a child run's price tag."""
    from decimal import InvalidOperation

    for tag in tags:
        if tag.startswith("dispatch-price:"):
            _, per_s, tail_s = tag.split(":")
            try:
                return Decimal(per_s), Decimal(tail_s)
            except InvalidOperation:
                return None

    return None
