"""A flow that asks for approval, run on a thread while the test answers it."""

from __future__ import annotations

import contextvars
import functools
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from uuid import uuid4

import anyio
from prefect import flow, task

from dispatch_prefect.approval import (
    ApprovalRequest,
    PendingApproval,
    arecord_approval,
    arequest_approval,
    pending_approvals,
    record_approval,
    request_approval,
)
from dispatch_prefect.policy import Approval, BackendKind, BudgetState


def unique_tool_id() -> str:
    """A tool id no other test uses, to find this test's paused run."""
    return f"cofold-{uuid4().hex[:8]}"


def sample_request(tool_id: str) -> ApprovalRequest:
    """A GPU job on Cloud Run with room left in both windows."""
    return ApprovalRequest(
        tool_id=tool_id,
        task_name="cofold-7c1",
        backend_name="cloud-l4",
        backend_kind=BackendKind.CLOUD_WORKER,
        bound_usd=Decimal("1.2345"),
        budget_name="research",
        run_state=BudgetState(reserved_usd=Decimal("0.50")),
        run_cap_usd=Decimal("10"),
        month_state=BudgetState(spent_usd=Decimal("42.10")),
        month_cap_usd=Decimal("100"),
        month_label="2026-12",
        limits=(("Max runtime", "3600 s"), ("GPU", "1 x NVIDIA L4")),
    )


@task
def ask_and_record(tool_id: str, timeout_s: int) -> Approval:
    request = sample_request(tool_id)
    approval = request_approval(request, timeout_s=timeout_s, poll_interval_s=1)
    record_approval(approval, request)

    return approval


@flow
def gated_flow(tool_id: str, timeout_s: int = 120) -> Approval:
    return ask_and_record(tool_id, timeout_s)


class InThread:
    """Run ``target`` on a thread; ``result()`` joins and returns or re-raises.

    The thread runs in a copy of the caller's context, so it talks to the
    same Prefect server (Prefect's settings live in a context variable).
    """

    def __init__(self, target: Callable[[], Any]) -> None:
        self._box: dict[str, Any] = {}
        context = contextvars.copy_context()

        def run() -> None:
            try:
                self._box["value"] = context.run(target)
            except BaseException as exc:
                self._box["error"] = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout_s: float = 60) -> Any:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the flow did not finish within {timeout_s} s")

        if "error" in self._box:
            raise self._box["error"]

        return self._box["value"]


def run_gated_flow(tool_id: str, timeout_s: int = 120) -> InThread:
    return InThread(lambda: gated_flow(tool_id, timeout_s))


def wait_for_pending(tool_id: str, timeout_s: float = 30) -> PendingApproval:
    """The paused run whose form describes ``tool_id``, once it is saved."""
    return wait_for_any_pending([tool_id], timeout_s)


def wait_for_any_pending(tool_ids: list[str], timeout_s: float = 30) -> PendingApproval:
    """The first paused run whose form describes one of ``tool_ids``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pending in pending_approvals():
            if any(tool_id in pending.description for tool_id in tool_ids):
                return pending
        time.sleep(0.2)

    raise TimeoutError(f"no approval for {tool_ids} appeared within {timeout_s} s")


def wait_until_not_pending(answered: PendingApproval, timeout_s: float = 30) -> None:
    """Wait until the answered pause is gone (the run resumed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(p.pause_key != answered.pause_key for p in pending_approvals()):
            return
        time.sleep(0.2)

    raise TimeoutError(f"pause {answered.pause_key} still waits after {timeout_s} s")


@flow
def side_by_side_flow(tool_ids: list[str], timeout_s: int = 120) -> list[Approval]:
    """Gated tasks submitted together in one flow run, each asking on its own."""
    futures = [ask_and_record.submit(tool_id, timeout_s) for tool_id in tool_ids]

    return [future.result() for future in futures]


@task
async def ask_and_record_async(tool_id: str, timeout_s: int) -> Approval:
    request = sample_request(tool_id)
    approval = await arequest_approval(request, timeout_s=timeout_s, poll_interval_s=1)
    await arecord_approval(approval, request)

    return approval


@flow
async def async_gated_flow(tool_id: str, timeout_s: int = 120) -> Approval:
    return await ask_and_record_async(tool_id, timeout_s)


@flow
def asks_twice_with_one_key(tool_id: str, key: str) -> list[Approval]:
    """The second ask reuses the pause key, as a replay of one attempt would."""
    request = sample_request(tool_id)

    return [
        request_approval(request, timeout_s=120, key=key, poll_interval_s=1)
        for _ in range(2)
    ]


@flow
async def async_flow_asking_from_a_thread(tool_id: str) -> Approval:
    """An async task asks through the blocking API on a worker thread."""

    @task
    async def gated() -> Approval:
        ask = functools.partial(ask_and_record.fn, tool_id, 120)

        return await anyio.to_thread.run_sync(ask)

    return await gated()
