"""The human approval step: Prefect's pause form, its answer, its audit record.

A gated task that needs a person's go-ahead pauses its flow run with
:func:`request_approval`. The Prefect UI then shows, under the run's
"Resume" action, a form built from :class:`ApprovalInput`: a description of
the job and both budget windows, an "Approve" switch, the approver's name and
a reason. The CLI answers the same form through :func:`decide`, and finds
waiting runs with :func:`pending_approvals`.

Every path ends in a :class:`~dispatch_prefect.policy.Approval`. No answer is
never a yes: a pause that times out, or a run cancelled while it waits, comes
back as a rejection. :func:`record_approval` turns a decision into a markdown
artifact on the flow run and a ``dispatch.approval.<outcome>`` event.

```python
approval = auto_approve(request, threshold_usd=Decimal("0.50"))
if approval is None:
    approval = request_approval(request, timeout_s=3600)
record_approval(approval, request)
if not approval.approved:
    raise ApprovalRejected(approval, request)
```
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Final
from uuid import UUID

import httpx
import pydantic
from prefect.artifacts import acreate_markdown_artifact, create_markdown_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import emit_event
from prefect.exceptions import FlowPauseTimeout, NotPausedError
from prefect.flow_runs import (
    apause_flow_run,
    aresume_flow_run,
    pause_flow_run,
    resume_flow_run,
)
from prefect.input import RunInput
from prefect.logging import get_run_logger

from dispatch_prefect.policy import Approval, ApprovalOutcome, BackendKind, BudgetState
from dispatch_prefect.policy.money import EXACT, as_usd

__all__ = [
    "ApprovalInput",
    "ApprovalNotPending",
    "ApprovalRejected",
    "ApprovalRequest",
    "PendingApproval",
    "approval_from_answer",
    "arecord_approval",
    "arequest_approval",
    "auto_approve",
    "decide",
    "describe_request",
    "pending_approvals",
    "record_approval",
    "request_approval",
]

POLICY_AUTHOR: Final = "policy"
TIMEOUT_AUTHOR: Final = "timeout"
CANCELLED_AUTHOR: Final = "cancelled"
INVALID_ANSWER_AUTHOR: Final = "invalid-answer"

EVENT_PREFIX: Final = "dispatch.approval"

# Long enough for a paragraph, short enough to keep artifacts and events small.
_MAX_APPROVER_CHARS: Final = 200
_MAX_REASON_CHARS: Final = 2000

# A paused run saves its form's schema a moment after it enters PAUSED.
_SCHEMA_WAIT_S: Final = 10.0

_PAUSE_LOCKS: dict[UUID | None, threading.Lock] = {}
_PAUSE_LOCKS_GUARD = threading.Lock()

_logger = logging.getLogger("dispatch_prefect.approval")


class ApprovalInput(RunInput):
    """The form a person fills in to approve or reject one paid job.

    Only the description is given initial data (through
    ``with_initial_data(description=...)``): a field with a default shows as
    optional in the UI, and the approver and the reason must stay required.
    Both must contain something other than white space, a rule that the
    server checks before it resumes the run (the JSON schema's ``pattern``)
    and that pydantic checks again here.
    """

    approve: bool = pydantic.Field(
        default=False,
        title="Approve",
        description="On: run the job and reserve its bound. Off: reject it.",
    )
    approver: str = pydantic.Field(
        title="Approver",
        description="Your name, as it should stand in the audit record.",
        min_length=1,
        max_length=_MAX_APPROVER_CHARS,
        pattern=r"\S",
    )
    reason: str = pydantic.Field(
        title="Reason",
        description="Why you approve or reject this job.",
        min_length=1,
        max_length=_MAX_REASON_CHARS,
        pattern=r"\S",
    )

    @pydantic.field_validator("approver", "reason")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()


@dataclass(frozen=True)
class ApprovalRequest:
    """Everything a person needs to approve or reject one paid job.

    Attributes:
        tool_id: what the job runs (the gated function's tool).
        task_name: the Prefect task run asking.
        backend_name: where it would run.
        backend_kind: the kind of that backend.
        bound_usd: the most the job can cost; reserved on approval.
        budget_name: the budget block whose caps apply.
        run_state: what this root flow run has committed so far.
        run_cap_usd: the per-run cap.
        month_state: what the calendar month has committed so far.
        month_cap_usd: the per-month cap.
        month_label: the month, e.g. ``"2026-12"``.
        limits: the job's declared limits as (label, value) pairs for the
            form, e.g. ``(("max runtime", "3600 s"), ("GPU", "1 x L4"))``.
    """

    tool_id: str
    task_name: str
    backend_name: str
    backend_kind: BackendKind
    bound_usd: Decimal
    budget_name: str
    run_state: BudgetState
    run_cap_usd: Decimal
    month_state: BudgetState
    month_cap_usd: Decimal
    month_label: str
    limits: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("tool_id", "task_name", "backend_name", "budget_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"ApprovalRequest.{name} must be a non-empty string, got {value!r}"
                )

        if not re.fullmatch(r"\d{4}-\d{2}", self.month_label):
            raise ValueError(
                "ApprovalRequest.month_label must look like '2026-12', "
                f"got {self.month_label!r}"
            )

        object.__setattr__(self, "backend_kind", BackendKind(self.backend_kind))
        for name in ("bound_usd", "run_cap_usd", "month_cap_usd"):
            amount = as_usd(getattr(self, name), name=f"ApprovalRequest.{name}")
            object.__setattr__(self, name, amount)

        object.__setattr__(self, "limits", tuple(tuple(p) for p in self.limits))

    @property
    def run_left_usd(self) -> Decimal:
        """What the run window has left before this job (may be negative)."""
        return EXACT.subtract(self.run_cap_usd, self.run_state.committed())

    @property
    def month_left_usd(self) -> Decimal:
        """What the month window has left before this job (may be negative)."""
        return EXACT.subtract(self.month_cap_usd, self.month_state.committed())


class ApprovalRejected(PermissionError):
    """A paid job was rejected (by a person, a timeout or a cancellation).

    Nothing was reserved for it. The message names who, why, the tool and
    the bound.
    """

    def __init__(self, approval: Approval, request: ApprovalRequest) -> None:
        self.approval = approval
        self.request = request
        super().__init__(
            f"{request.tool_id!r} on backend {request.backend_name!r} (bound "
            f"{format_usd(request.bound_usd)}) was rejected by "
            f"{approval.author!r} at {approval.decided_at}: {approval.reason}; "
            "nothing was reserved. Ask for approval again, or lower the job's "
            "declared limits so its bound falls under the auto-approval "
            "threshold"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect pickles a failed task's exception; rebuild from the facts.
        return (type(self), (self.approval, self.request))


class ApprovalNotPending(LookupError):
    """A flow run that is not (or no longer) waiting for an approval."""


@dataclass(frozen=True)
class PendingApproval:
    """A paused flow run waiting for an answer to an :class:`ApprovalInput`.

    Attributes:
        flow_run_id: the paused flow run; pass it to :func:`decide`.
        flow_run_name: its human-readable name.
        description: the form's markdown (tool, backend, bound, windows).
        paused_since: when the run paused.
        expires_at: when the pause times out into a rejection, if known.
        pause_key: the pause's key within its flow run.
    """

    flow_run_id: UUID
    flow_run_name: str
    description: str
    paused_since: datetime
    expires_at: datetime | None
    pause_key: str


def format_usd(amount: Decimal) -> str:
    """``$1.50``, ``$0.000125``: cents at least, never rounded."""
    exact = amount.normalize()
    if int(exact.as_tuple().exponent) > -2:
        exact = exact.quantize(Decimal("0.01"), context=EXACT)

    sign = "-" if exact < 0 else ""

    return f"{sign}${abs(exact):f}"


def describe_request(request: ApprovalRequest) -> str:
    """The markdown shown above the approval form."""
    bound = format_usd(request.bound_usd)
    facts = [
        ("Tool", f"`{_md(request.tool_id)}` (task `{_md(request.task_name)}`)"),
        (
            "Backend",
            f"`{_md(request.backend_name)}` ({request.backend_kind.value})",
        ),
        ("Bound", f"**{bound}** at most, reserved on approval"),
        ("Budget", f"`{_md(request.budget_name)}`"),
        *((_md(label), _md(value)) for label, value in request.limits),
    ]
    windows = [
        _window_row("This run", request.run_state, request.run_cap_usd, request),
        _window_row(
            f"Month {request.month_label}",
            request.month_state,
            request.month_cap_usd,
            request,
        ),
    ]
    lines = [
        f"### Approve {bound} for `{_md(request.tool_id)}` on "
        f"`{_md(request.backend_name)}`?",
        "",
        "| | |",
        "|---|---|",
        *(f"| {label} | {value} |" for label, value in facts),
        "",
        "| Window | Committed | Cap | Left now | Left if approved |",
        "|---|---:|---:|---:|---:|",
        *windows,
        "",
        "Turn **Approve** on to run the job, or leave it off to reject it. "
        "Your name and a reason are required; both go into the audit record.",
    ]

    return "\n".join(lines)


def auto_approve(
    request: ApprovalRequest, *, threshold_usd: Decimal
) -> Approval | None:
    """Approve on the budget's behalf when the bound is below its threshold.

    Returns:
        An approval by the author ``"policy"`` when ``request.bound_usd`` is
        strictly below ``threshold_usd``; None when a person must decide.

    Raises:
        TypeError: ``threshold_usd`` is a float (money is never a float).
        ValueError: ``threshold_usd`` is negative.
    """
    threshold = as_usd(threshold_usd, name="threshold_usd")
    if request.bound_usd >= threshold:
        return None

    return Approval.decide(
        POLICY_AUTHOR,
        f"bound {format_usd(request.bound_usd)} is below the auto-approval "
        f"threshold {format_usd(threshold)} of budget '{request.budget_name}'",
    )


def request_approval(
    request: ApprovalRequest,
    *,
    timeout_s: int,
    key: str | None = None,
    poll_interval_s: int = 5,
) -> Approval:
    """Pause the current flow run until a person approves or rejects the job.

    Call it from inside a running task or flow (a sync one, or a worker
    thread of an async one). The flow run turns PAUSED and the Prefect UI
    offers the :class:`ApprovalInput` form under the run's "Resume" action;
    :func:`decide` answers the same form. A flow run has one state, so tasks
    of one run that ask at the same time in this process ask one after
    another.

    Prefect 3.9.1's wait only watches for the run to resume: a run cancelled
    while it waits in this process is seen as cancelled when ``timeout_s``
    runs out (a run served by a worker is stopped by the worker at once).

    Args:
        request: the job and both budget windows, shown in the form.
        timeout_s: seconds to wait for an answer before rejecting.
        key: the pause key; a repeated key within one flow run returns the
            answer already given to it (Prefect skips a pause that fired),
            so give each attempt of each task its own.
        poll_interval_s: how often the waiting task checks for an answer.

    Returns:
        The decision. A timeout is a rejection by ``"timeout"``; a run
        cancelled while it waits, a rejection by ``"cancelled"``. Neither
        raises.

    Raises:
        ValueError: ``timeout_s`` or ``poll_interval_s`` is not positive.
        RuntimeError: not inside a flow run, or called on a running event
            loop (await :func:`arequest_approval` there).
    """
    _refuse_running_loop("request_approval")

    if _prefect_dispatches_async():
        return asyncio.run(
            arequest_approval(
                request, timeout_s=timeout_s, key=key, poll_interval_s=poll_interval_s
            )
        )

    form = _prepare(request, timeout_s=timeout_s, poll_interval_s=poll_interval_s)

    try:
        with _pause_lock():
            answer = pause_flow_run(
                wait_for_input=form,
                timeout=timeout_s,
                poll_interval=poll_interval_s,
                key=key,
            )
    except (FlowPauseTimeout, pydantic.ValidationError) as exc:
        return _without_answer(exc, request, timeout_s=timeout_s)

    return _answered(answer, request)


async def arequest_approval(
    request: ApprovalRequest,
    *,
    timeout_s: int,
    key: str | None = None,
    poll_interval_s: int = 5,
) -> Approval:
    """The async twin of :func:`request_approval`, for async tasks and flows."""
    form = _prepare(request, timeout_s=timeout_s, poll_interval_s=poll_interval_s)

    lock = _pause_lock()
    while not lock.acquire(blocking=False):
        await asyncio.sleep(0.2)
    try:
        answer = await apause_flow_run(
            wait_for_input=form,
            timeout=timeout_s,
            poll_interval=poll_interval_s,
            key=key,
        )
    except (FlowPauseTimeout, pydantic.ValidationError) as exc:
        return _without_answer(exc, request, timeout_s=timeout_s)
    finally:
        lock.release()

    return _answered(answer, request)


def approval_from_answer(answer: ApprovalInput) -> Approval:
    """The decision a submitted form stands for, stamped now (UTC)."""
    outcome = ApprovalOutcome.APPROVED if answer.approve else ApprovalOutcome.REJECTED

    return Approval.decide(answer.approver, answer.reason, outcome)


def record_approval(approval: Approval, request: ApprovalRequest) -> None:
    """Record a decision as an artifact on the flow run and as an event.

    The artifact is markdown under the key ``approval-<tool>``, so the
    Artifacts page also keeps every decision about one tool as a history.
    The event is ``dispatch.approval.approved`` or
    ``dispatch.approval.rejected`` about the flow run, with the tool, backend
    and budget as related resources.

    Raises:
        RuntimeError: not inside a flow run.
    """
    _refuse_running_loop("record_approval")
    if _prefect_dispatches_async():
        asyncio.run(arecord_approval(approval, request))
        return

    flow_run = _current_flow_run()
    create_markdown_artifact(
        markdown=_audit_markdown(approval, request),
        key=_artifact_key(request),
        description=_artifact_description(approval, request),
    )
    _emit(approval, request, flow_run)


async def arecord_approval(approval: Approval, request: ApprovalRequest) -> None:
    """The async twin of :func:`record_approval`."""
    flow_run = _current_flow_run()
    await acreate_markdown_artifact(
        markdown=_audit_markdown(approval, request),
        key=_artifact_key(request),
        description=_artifact_description(approval, request),
    )
    _emit(approval, request, flow_run)


def pending_approvals(*, limit: int = 200) -> list[PendingApproval]:
    """Paused flow runs waiting for an answer to an approval form, oldest first.

    A run shows up once its form is saved (a moment after it pauses).
    """
    with get_client(sync_client=True) as client:
        paused = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.PAUSED])
                )
            ),
            sort=FlowRunSort.START_TIME_ASC,
            limit=limit,
        )
        waiting = (_read_pending(client, flow_run) for flow_run in paused)

        return sorted(
            (pending for pending in waiting if pending is not None),
            key=lambda pending: pending.paused_since,
        )


def decide(
    flow_run_id: UUID | str,
    *,
    approve: bool,
    approver: str,
    reason: str,
) -> None:
    """Answer a paused run's approval form, as the UI's "Resume" does.

    Args:
        flow_run_id: the paused run (see :func:`pending_approvals`).
        approve: True approves the job; False rejects it.
        approver: the deciding person's name.
        reason: why.

    Raises:
        ValueError: ``approver`` or ``reason`` is empty or blank (checked
            before anything is sent), or ``flow_run_id`` is not a UUID.
        RuntimeError: called on a running event loop.
        ApprovalNotPending: the run is not waiting for an approval (never
            was, already answered, timed out or cancelled).
    """
    try:
        answer = ApprovalInput(approve=approve, approver=approver, reason=reason)
    except pydantic.ValidationError as exc:
        fields = sorted({str(error["loc"][0]) for error in exc.errors()})
        raise ValueError(
            f"the approval form needs a non-blank {' and '.join(fields)} "
            f"(got approver={approver!r}, reason={reason!r}); say who decides "
            "and why"
        ) from exc

    _refuse_running_loop("decide", instead="call it on a worker thread")
    run_id = UUID(str(flow_run_id))
    _wait_for_form(run_id)
    run_input = answer.model_dump(mode="json")
    try:
        if _prefect_dispatches_async():
            asyncio.run(aresume_flow_run(run_id, run_input=run_input))
        else:
            resume_flow_run(run_id, run_input=run_input)
    except (NotPausedError, FlowPauseTimeout) as exc:
        raise ApprovalNotPending(
            f"flow run {run_id} can no longer take an approval ({exc}); list "
            "the runs still waiting with pending_approvals()"
        ) from exc

    _logger.info(
        "%s flow run %s as %r",
        "Approved" if answer.approve else "Rejected",
        run_id,
        answer.approver,
    )


def _refuse_running_loop(name: str, *, instead: str | None = None) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return

    fix = instead or f"await a{name}() instead"
    raise RuntimeError(f"{name}() blocks and cannot run on an event loop; {fix}")


def _prefect_dispatches_async() -> bool:
    """True inside an async task or flow, even on a worker thread of one.

    There Prefect's own sync-looking calls (``pause_flow_run``, the form's
    ``save``/``load``, ``create_markdown_artifact``) return coroutines, so
    the blocking API runs its async twin on a loop of its own instead.
    """
    task_run = TaskRunContext.get()
    if task_run is not None:
        return task_run.task.isasync

    flow_run = FlowRunContext.get()

    return flow_run is not None and flow_run.flow is not None and flow_run.flow.isasync


def _pause_lock() -> threading.Lock:
    """The lock that lets one task of this flow run pause at a time.

    A flow run has one state: a second task that proposes PAUSED while the
    run is already paused fails with Prefect's ``Pause`` signal ("Cannot
    pause flows that are not currently running"). Gated tasks submitted side
    by side in one process therefore ask one after another. One small lock
    per flow run stays for the life of the process.
    """
    context = FlowRunContext.get()
    flow_run_id = context.flow_run.id if context and context.flow_run else None
    with _PAUSE_LOCKS_GUARD:
        return _PAUSE_LOCKS.setdefault(flow_run_id, threading.Lock())


def _prepare(
    request: ApprovalRequest, *, timeout_s: int, poll_interval_s: int
) -> type[ApprovalInput]:
    """Check the wait's arguments and build the form with its description."""
    for name, value in (("timeout_s", timeout_s), ("poll_interval_s", poll_interval_s)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive whole number, got {value!r}")

    get_run_logger().info(
        "Waiting up to %d s for approval of %s on %s (bound %s); approve or "
        "reject it under the run's Resume action or with `dispatch-prefect "
        "approve`",
        timeout_s,
        request.tool_id,
        request.backend_name,
        format_usd(request.bound_usd),
    )

    return ApprovalInput.with_initial_data(description=describe_request(request))


def _answered(answer: ApprovalInput, request: ApprovalRequest) -> Approval:
    approval = approval_from_answer(answer)
    get_run_logger().info(
        "%s %s was %s by %r: %s",
        request.tool_id,
        format_usd(request.bound_usd),
        approval.outcome.value,
        approval.author,
        approval.reason,
    )

    return approval


def _without_answer(
    exc: FlowPauseTimeout | pydantic.ValidationError,
    request: ApprovalRequest,
    *,
    timeout_s: int,
) -> Approval:
    if isinstance(exc, pydantic.ValidationError):
        return _invalid_answer(exc)

    return _unanswered(request, timeout_s=timeout_s)


def _unanswered(request: ApprovalRequest, *, timeout_s: int) -> Approval:
    """A pause that ended without an answer: a cancellation or a timeout.

    Prefect 3.9.1's in-process wait only watches for the run to turn RUNNING,
    so a run cancelled while paused is noticed here, when the wait times
    out; a run served by a worker is stopped by its worker at once instead.
    """
    context = FlowRunContext.get()
    state_type = None
    if context is not None and context.flow_run is not None:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(context.flow_run.id).state
            state_type = state.type if state is not None else None

    if state_type in (StateType.CANCELLING, StateType.CANCELLED):
        author = CANCELLED_AUTHOR
        reason = "the flow run was cancelled while it waited for approval"
    else:
        author = TIMEOUT_AUTHOR
        reason = f"no one answered within the {timeout_s} s timeout"

    get_run_logger().warning(
        "%s %s rejected: %s", request.tool_id, format_usd(request.bound_usd), reason
    )

    return Approval.decide(author, reason, ApprovalOutcome.REJECTED)


def _invalid_answer(exc: pydantic.ValidationError) -> Approval:
    # The server validates the form against its schema before resuming, so
    # this only happens when a pause key is reused without a stored answer.
    get_run_logger().warning("The approval answer failed validation: %s", exc)

    return Approval.decide(
        INVALID_ANSWER_AUTHOR,
        f"the stored answer is not a valid approval ({exc.error_count()} errors)",
        ApprovalOutcome.REJECTED,
    )


def _read_pending(
    client: SyncPrefectClient, flow_run: FlowRun
) -> PendingApproval | None:
    """The approval a paused run waits on, or None if it waits on none."""
    state = flow_run.state
    if state is None or state.type is not StateType.PAUSED:
        return None

    keyset = state.state_details.run_input_keyset
    if not keyset:
        return None

    schema_text = _read_input(client, flow_run.id, keyset["schema"])
    if schema_text is None or not _is_approval_schema(schema_text):
        return None

    description = _read_input(client, flow_run.id, keyset["description"]) or ""

    return PendingApproval(
        flow_run_id=flow_run.id,
        flow_run_name=flow_run.name,
        description=_decode_json_string(description),
        paused_since=state.timestamp,
        expires_at=state.state_details.pause_timeout,
        pause_key=str(state.state_details.pause_key),
    )


def _read_input(client: SyncPrefectClient, flow_run_id: UUID, key: str) -> str | None:
    try:
        return client.read_flow_run_input(flow_run_id, key)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == httpx.codes.NOT_FOUND:
            return None
        raise


def _is_approval_schema(schema_text: str) -> bool:
    schema = pydantic.TypeAdapter(dict[str, Any]).validate_json(schema_text)
    properties = schema.get("properties", {})

    return schema.get("title") == ApprovalInput.__name__ and set(
        ApprovalInput.model_fields
    ) <= set(properties)


def _decode_json_string(text: str) -> str:
    """Flow run inputs are stored as JSON; the description is a JSON string."""
    try:
        value = pydantic.TypeAdapter(str).validate_json(text)
    except pydantic.ValidationError:
        return text

    return value


def _wait_for_form(flow_run_id: UUID) -> None:
    """Wait until the run's approval form is saved; fail if it never will be."""
    deadline = time.monotonic() + _SCHEMA_WAIT_S
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if _read_pending(client, flow_run) is not None:
                return

            paused = flow_run.state is not None and flow_run.state.is_paused()
            if not paused or time.monotonic() >= deadline:
                state = flow_run.state.name if flow_run.state else "no state"
                raise ApprovalNotPending(
                    f"flow run {flow_run_id} ({flow_run.name}, {state}) is not "
                    "waiting for an approval; list the runs that are with "
                    "pending_approvals()"
                )

            time.sleep(0.2)


def _current_flow_run() -> FlowRun:
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError(
            "record_approval() needs a running flow run to attach its artifact "
            "to; call it from inside a flow or task"
        )

    return context.flow_run


def _artifact_key(request: ApprovalRequest) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", request.tool_id.lower()).strip("-")

    return f"approval-{slug or 'tool'}"[:100].rstrip("-")


def _artifact_description(approval: Approval, request: ApprovalRequest) -> str:
    return (
        f"{approval.outcome.value.capitalize()} by {approval.author}: "
        f"{request.tool_id} on {request.backend_name}, bound "
        f"{format_usd(request.bound_usd)}"
    )


def _audit_markdown(approval: Approval, request: ApprovalRequest) -> str:
    task_run = TaskRunContext.get()
    task_run_name = task_run.task_run.name if task_run is not None else None
    facts = [
        ("Outcome", f"**{approval.outcome.value}**"),
        ("Who", _md(approval.author)),
        ("When", approval.decided_at),
        ("Why", _md(approval.reason)),
        ("Tool", f"`{_md(request.tool_id)}`"),
        ("Task", f"`{_md(task_run_name or request.task_name)}`"),
        (
            "Backend",
            f"`{_md(request.backend_name)}` ({request.backend_kind.value})",
        ),
        ("Bound", format_usd(request.bound_usd)),
        ("Budget", f"`{_md(request.budget_name)}`"),
        *((_md(label), _md(value)) for label, value in request.limits),
    ]
    lines = [
        f"### {approval.outcome.value.capitalize()}: `{_md(request.tool_id)}` "
        f"on `{_md(request.backend_name)}`",
        "",
        "| | |",
        "|---|---|",
        *(f"| {label} | {value} |" for label, value in facts),
        "",
        "Budget windows when the decision was asked for:",
        "",
        "| Window | Committed | Cap | Left | Left if approved |",
        "|---|---:|---:|---:|---:|",
        _window_row("This run", request.run_state, request.run_cap_usd, request),
        _window_row(
            f"Month {request.month_label}",
            request.month_state,
            request.month_cap_usd,
            request,
        ),
    ]

    return "\n".join(lines)


def _emit(approval: Approval, request: ApprovalRequest, flow_run: FlowRun) -> None:
    event = emit_event(
        event=f"{EVENT_PREFIX}.{approval.outcome.value}",
        resource={
            "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
            "prefect.resource.name": flow_run.name,
        },
        related=[
            {
                "prefect.resource.id": f"dispatch.tool.{request.tool_id}",
                "prefect.resource.role": "tool",
                "prefect.resource.name": request.tool_id,
            },
            {
                "prefect.resource.id": f"dispatch.backend.{request.backend_name}",
                "prefect.resource.role": "backend",
                "prefect.resource.name": request.backend_name,
            },
            {
                "prefect.resource.id": f"dispatch.budget.{request.budget_name}",
                "prefect.resource.role": "budget",
                "prefect.resource.name": request.budget_name,
            },
        ],
        payload=_event_payload(approval, request),
    )
    if event is None:
        _logger.warning(
            "Prefect events are off here: the %s decision on %s is recorded "
            "in the artifact only",
            approval.outcome.value,
            request.tool_id,
        )


def _event_payload(approval: Approval, request: ApprovalRequest) -> dict[str, Any]:
    """The decision and the job, money as exact decimal strings."""
    task_run = TaskRunContext.get()

    return {
        "outcome": approval.outcome.value,
        "author": approval.author,
        "reason": approval.reason,
        "decided_at": approval.decided_at,
        "tool_id": request.tool_id,
        "task_name": request.task_name,
        "task_run_id": str(task_run.task_run.id) if task_run is not None else None,
        "backend_name": request.backend_name,
        "backend_kind": request.backend_kind.value,
        "bound_usd": str(request.bound_usd),
        "budget_name": request.budget_name,
        "run_committed_usd": str(request.run_state.committed()),
        "run_cap_usd": str(request.run_cap_usd),
        "month": request.month_label,
        "month_committed_usd": str(request.month_state.committed()),
        "month_cap_usd": str(request.month_cap_usd),
    }


def _window_row(
    label: str, state: BudgetState, cap_usd: Decimal, request: ApprovalRequest
) -> str:
    left = EXACT.subtract(cap_usd, state.committed())
    after = EXACT.subtract(left, request.bound_usd)
    cells = [
        label,
        format_usd(state.committed()),
        format_usd(cap_usd),
        format_usd(left),
        format_usd(after),
    ]

    return "| " + " | ".join(cells) + " |"


def _md(text: str) -> str:
    """Keep a value inside its table cell and its code span."""
    return (
        text.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("`", "'")
        .replace("\n", " ")
    )
