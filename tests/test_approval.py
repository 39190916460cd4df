"""The approval step against a real Prefect server: pause, answer, record."""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any
from uuid import UUID

import pydantic
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.states import Cancelling
from ui.approval_flows import (
    InThread,
    asks_twice_with_one_key,
    async_flow_asking_from_a_thread,
    async_gated_flow,
    run_gated_flow,
    sample_request,
    side_by_side_flow,
    unique_tool_id,
    wait_for_any_pending,
    wait_for_pending,
    wait_until_not_pending,
)

from dispatch_prefect.approval import (
    ApprovalInput,
    ApprovalNotPending,
    ApprovalRejected,
    ApprovalRequest,
    auto_approve,
    decide,
    describe_request,
    format_usd,
    pending_approvals,
    record_approval,
    request_approval,
)
from dispatch_prefect.policy import Approval, ApprovalOutcome

# --- the form, the request and the record, without a server ------------------


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
@pytest.mark.parametrize("name", ["approver", "reason"])
def test_form_refuses_a_blank_approver_or_reason(name: str, blank: str) -> None:
    answer = {"approve": True, "approver": "Ann", "reason": "in budget"}

    with pytest.raises(pydantic.ValidationError) as caught:
        ApprovalInput(**{**answer, name: blank})

    assert [error["loc"] for error in caught.value.errors()] == [(name,)]


def test_form_keeps_approver_and_reason_required_next_to_its_description() -> None:
    form = ApprovalInput.with_initial_data(description="# job")

    schema = form.model_json_schema()

    assert sorted(schema["required"]) == ["approver", "reason"]
    assert schema["properties"]["approver"]["pattern"] == r"\S"
    assert form.model_fields["approve"].default is False


def test_description_shows_tool_backend_bound_and_both_windows() -> None:
    text = describe_request(sample_request("cofold-x"))

    assert "`cofold-x`" in text
    assert "`cloud-l4` (cloud_worker)" in text
    assert "**$1.2345** at most" in text
    # run: committed 0.50 of 10 -> 9.50 left, 8.2655 after; month likewise.
    assert "| This run | $0.50 | $10.00 | $9.50 | $8.2655 |" in text
    assert "| Month 2026-12 | $42.10 | $100.00 | $57.90 | $56.6655 |" in text
    assert "| Max runtime | 3600 s |" in text


def test_description_keeps_a_hostile_tool_id_inside_its_cell() -> None:
    request = sample_request("a|b`c\nd")

    text = describe_request(request)

    assert "`a\\|b'c d`" in text


def test_usd_shows_cents_and_never_rounds() -> None:
    assert format_usd(Decimal(3)) == "$3.00"
    assert format_usd(Decimal("0.5")) == "$0.50"
    assert format_usd(Decimal("0.000125")) == "$0.000125"
    assert format_usd(Decimal("1E+3")) == "$1000.00"
    assert format_usd(Decimal("-2.5")) == "-$2.50"


def test_request_refuses_money_as_float() -> None:
    fields = sample_request("cofold-x").__dict__

    with pytest.raises(TypeError, match="bound_usd"):
        ApprovalRequest(**{**fields, "bound_usd": 1.5})


def test_request_refuses_a_month_label_that_is_not_a_month() -> None:
    fields = sample_request("cofold-x").__dict__

    with pytest.raises(ValueError, match="2026-12"):
        ApprovalRequest(**{**fields, "month_label": "December"})


def test_auto_approves_only_strictly_below_the_threshold() -> None:
    request = sample_request("cofold-x")

    below = auto_approve(request, threshold_usd=Decimal("1.2346"))
    at = auto_approve(request, threshold_usd=Decimal("1.2345"))

    assert below is not None
    assert below.author == "policy"
    assert below.outcome is ApprovalOutcome.APPROVED
    assert "$1.2345" in below.reason and "research" in below.reason
    assert at is None


def test_auto_approve_refuses_a_float_threshold() -> None:
    with pytest.raises(TypeError, match="threshold_usd"):
        auto_approve(sample_request("cofold-x"), threshold_usd=0.5)  # type: ignore[arg-type]


def test_rejection_names_who_why_tool_and_bound_and_survives_pickling() -> None:
    approval = Approval.decide("Ann", "too big", ApprovalOutcome.REJECTED)
    request = sample_request("cofold-x")

    error = ApprovalRejected(approval, request)
    copy = pickle.loads(pickle.dumps(error))

    assert isinstance(error, PermissionError)
    for part in ("'Ann'", "too big", "'cofold-x'", "$1.2345"):
        assert part in str(error)
    assert str(copy) == str(error)
    assert copy.approval == approval


@pytest.mark.parametrize(
    ("approver", "reason", "named"),
    [("", "ok", "approver"), ("Ann", "  ", "reason"), (" ", "", "approver and reason")],
)
def test_decide_refuses_a_blank_answer_before_sending_anything(
    approver: str, reason: str, named: str
) -> None:
    # No server is needed: the answer is refused before any request.
    with pytest.raises(ValueError, match=f"non-blank {named}"):
        decide(UUID(int=1), approve=True, approver=approver, reason=reason)


def test_the_blocking_api_refuses_to_block_an_event_loop() -> None:
    request = sample_request("cofold-x")

    async def on_the_loop() -> None:
        request_approval(request, timeout_s=5)

    with pytest.raises(RuntimeError, match="await arequest_approval"):
        asyncio.run(on_the_loop())


def test_request_approval_outside_a_flow_run_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="context"):
        request_approval(sample_request("cofold-x"), timeout_s=5)


@pytest.mark.usefixtures("prefect_server")
def test_request_approval_refuses_a_non_positive_timeout() -> None:
    @flow
    def bad_timeout() -> None:
        request_approval(sample_request("cofold-x"), timeout_s=0)

    with pytest.raises(ValueError, match="timeout_s"):
        bad_timeout()


# --- against the real server -------------------------------------------------

pytestmark_server = pytest.mark.usefixtures("prefect_server")


@pytestmark_server
@pytest.mark.parametrize(
    ("approve", "outcome"),
    [(True, ApprovalOutcome.APPROVED), (False, ApprovalOutcome.REJECTED)],
)
def test_a_person_decides_from_another_thread(
    approve: bool, outcome: ApprovalOutcome
) -> None:
    tool_id = unique_tool_id()
    running = run_gated_flow(tool_id)

    pending = wait_for_pending(tool_id)
    decide(pending.flow_run_id, approve=approve, approver="Ann", reason="grant")
    approval = running.result()

    assert approval.outcome is outcome
    assert (approval.author, approval.reason) == ("Ann", "grant")
    assert approval.decided_at.endswith("+00:00")
    assert "**$1.2345** at most" in pending.description
    assert pending.expires_at is not None


@pytestmark_server
def test_tasks_submitted_side_by_side_are_asked_one_after_another() -> None:
    """A flow run has one state, so its pauses take turns."""
    tool_ids = [unique_tool_id(), unique_tool_id()]
    running = InThread(lambda: side_by_side_flow(tool_ids))

    for _ in tool_ids:
        pending = wait_for_any_pending(tool_ids)
        tool_id = next(t for t in tool_ids if t in pending.description)
        decide(pending.flow_run_id, approve=True, approver="Ann", reason=tool_id)
        wait_until_not_pending(pending)
    approvals = running.result()

    assert [approval.reason for approval in approvals] == tool_ids
    assert {approval.outcome for approval in approvals} == {ApprovalOutcome.APPROVED}


@pytestmark_server
@pytest.mark.parametrize(
    "async_flow",
    [async_gated_flow, async_flow_asking_from_a_thread],
    ids=["async-api", "blocking-api-on-a-worker-thread"],
)
def test_an_async_task_asks_and_records_the_same_way(
    async_flow: Callable[[str], Coroutine[Any, Any, Approval]],
) -> None:
    """On a worker thread of an async task Prefect's sync calls turn async."""
    tool_id = unique_tool_id()
    running = InThread(lambda: asyncio.run(async_flow(tool_id)))

    pending = wait_for_pending(tool_id)
    decide(pending.flow_run_id, approve=True, approver="Ann", reason="async")
    approval = running.result()

    assert (approval.outcome, approval.reason) == (ApprovalOutcome.APPROVED, "async")
    assert "| Why | async |" in str(_only_artifact(pending.flow_run_id).data)


@pytestmark_server
def test_a_reused_pause_key_returns_the_answer_already_given() -> None:
    """Prefect skips a pause whose key fired: a replay gets the same decision."""
    tool_id = unique_tool_id()
    running = InThread(lambda: asks_twice_with_one_key(tool_id, key="attempt-1"))

    pending = wait_for_pending(tool_id)
    decide(pending.flow_run_id, approve=True, approver="Ann", reason="once")
    first, replay = running.result()

    assert (replay.author, replay.reason, replay.outcome) == (
        first.author,
        first.reason,
        first.outcome,
    )


@pytestmark_server
def test_pending_approvals_leaves_out_a_pause_that_asks_for_no_approval() -> None:
    @flow
    def plain_pause() -> None:
        pause_flow_run(timeout=60, poll_interval=1)

    running = InThread(plain_pause)
    plain = _wait_for_paused_run("plain-pause")

    listed = {pending.flow_run_id for pending in pending_approvals()}
    resume_flow_run(plain)
    running.result()

    assert plain not in listed


@pytestmark_server
def test_the_server_refuses_a_blank_answer_and_the_run_keeps_waiting() -> None:
    tool_id = unique_tool_id()
    running = run_gated_flow(tool_id)
    pending = wait_for_pending(tool_id)

    blank = {"approve": True, "approver": "  ", "reason": "ok"}
    with pytest.raises(RuntimeError, match="approver"):
        resume_flow_run(pending.flow_run_id, run_input=blank)
    with pytest.raises(RuntimeError, match="reason"):
        resume_flow_run(pending.flow_run_id, run_input={"approver": "Ann"})

    assert wait_for_pending(tool_id).flow_run_id == pending.flow_run_id
    decide(pending.flow_run_id, approve=True, approver="Ann", reason="ok")
    assert running.result().outcome is ApprovalOutcome.APPROVED


@pytestmark_server
def test_no_answer_in_time_is_a_rejection_by_timeout() -> None:
    tool_id = unique_tool_id()
    started = time.monotonic()

    approval = run_gated_flow(tool_id, timeout_s=2).result()

    assert approval.outcome is ApprovalOutcome.REJECTED
    assert approval.author == "timeout"
    assert "2 s timeout" in approval.reason
    assert time.monotonic() - started < 30


@pytestmark_server
def test_a_run_cancelled_while_it_waits_is_a_rejection_by_cancellation() -> None:
    tool_id = unique_tool_id()
    running = run_gated_flow(tool_id, timeout_s=4)
    pending = wait_for_pending(tool_id)

    with get_client(sync_client=True) as client:
        # What the UI's "Cancel" sends.
        client.set_flow_run_state(pending.flow_run_id, Cancelling())
    approval = running.result()

    assert approval.outcome is ApprovalOutcome.REJECTED
    assert approval.author == "cancelled"


@pytestmark_server
def test_decide_on_a_run_that_is_not_waiting_names_the_run() -> None:
    tool_id = unique_tool_id()
    running = run_gated_flow(tool_id)
    pending = wait_for_pending(tool_id)
    decide(pending.flow_run_id, approve=True, approver="Ann", reason="ok")
    running.result()

    with pytest.raises(ApprovalNotPending, match=str(pending.flow_run_id)):
        decide(pending.flow_run_id, approve=True, approver="Ann", reason="again")


@pytestmark_server
def test_the_decision_lands_as_an_artifact_and_an_event_on_the_flow_run() -> None:
    tool_id = unique_tool_id()
    running = run_gated_flow(tool_id)
    pending = wait_for_pending(tool_id)
    decide(pending.flow_run_id, approve=True, approver="Ann", reason="fits")
    approval = running.result()

    artifact = _only_artifact(pending.flow_run_id)
    event = _wait_for_event(pending.flow_run_id)

    assert artifact.key == f"approval-{tool_id}"
    for part in ("approved", "Ann", "fits", approval.decided_at, tool_id, "$1.2345"):
        assert part in str(artifact.data)
    assert event.event == "dispatch.approval.approved"
    assert event.payload["author"] == "Ann"
    assert event.payload["bound_usd"] == "1.2345"
    assert event.resource.name == pending.flow_run_name
    roles = {related.role: related.id for related in event.related}
    assert roles["tool"] == f"dispatch.tool.{tool_id}"
    assert roles["backend"] == "dispatch.backend.cloud-l4"


@pytestmark_server
def test_a_policy_approval_is_recorded_with_the_author_policy() -> None:
    request = sample_request(unique_tool_id())

    @flow
    def recorded() -> UUID:
        from prefect.runtime import flow_run

        approval = auto_approve(request, threshold_usd=Decimal(5))
        assert approval is not None
        record_approval(approval, request)

        return UUID(flow_run.id)

    flow_run_id = recorded()

    assert "| Who | policy |" in str(_only_artifact(flow_run_id).data)
    assert _wait_for_event(flow_run_id).payload["author"] == "policy"


def test_record_approval_outside_a_flow_run_is_an_error() -> None:
    approval = Approval.decide("Ann", "ok")

    with pytest.raises(RuntimeError, match="inside a flow"):
        record_approval(approval, sample_request("cofold-x"))


def _only_artifact(flow_run_id: UUID) -> Any:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )

    assert len(artifacts) == 1, artifacts

    return artifacts[0]


def _wait_for_event(flow_run_id: UUID, timeout_s: float = 20) -> Any:
    """Events are sent in the background; read until this run's one arrives."""
    wanted = EventFilter(
        event=EventNameFilter(prefix=["dispatch.approval."]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    )
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            events = client.read_events(filter=wanted, limit=50).events
            if events:
                assert len(events) == 1, events
                return events[0]
            time.sleep(0.3)

    raise AssertionError(f"no approval event for flow run {flow_run_id}")


def _wait_for_paused_run(flow_name: str, timeout_s: float = 30) -> UUID:
    paused = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
    )
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                flow_run_filter=paused,
            )
            if runs:
                return runs[0].id
            time.sleep(0.2)

    raise AssertionError(f"no paused run of {flow_name} within {timeout_s} s")
