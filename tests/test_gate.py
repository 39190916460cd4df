"""The gate end to end: a real Prefect server, real workers, the real ledger."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import gated_jobs
import pytest
from conftest import saved_ledger
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.filesystems import LocalFileSystem

from dispatch_prefect import gated_task
from dispatch_prefect.approval import ApprovalRejected, decide, pending_approvals
from dispatch_prefect.blocks import (
    BackendBlock,
    BudgetBlock,
    LedgerBlock,
    RatesBlock,
)
from dispatch_prefect.gate import GateOutsideFlowError, NoBackendFitsError
from dispatch_prefect.ledger import BudgetExceeded, Ledger, ReservationStatus
from dispatch_prefect.submit import deploy_executor
from dispatch_prefect.testing import LocalPrefectServer, prefect_worker

pytestmark = pytest.mark.prefect_server

LEDGER = "gate-tests"
CLOUD_POOL = "gate-cloud-standin"
LAN_POOL = "gate-lan"
TESTS_DIR = Path(__file__).parent

# Cloud Run L4-like rates, large enough that a short job costs cents.
L4_RATES = RatesBlock(
    gpu_usd_per_s=Decimal("0.0001867"),
    vcpu_usd_per_s=Decimal("0.000018"),
    gib_usd_per_s=Decimal("0.000002"),
    idle_tail_s=Decimal(5),
)


@pytest.fixture(scope="module")
def ledger(prefect_server: LocalPrefectServer, tmp_path_factory: Any) -> Ledger:
    return saved_ledger(LEDGER, tmp_path_factory.mktemp("gate-ledger"))


@pytest.fixture(scope="module")
def pools(prefect_server: LocalPrefectServer, tmp_path_factory: Any) -> Iterator[None]:
    """A pool standing in for Cloud Run and a 'LAN' pool in another place."""
    shared = tmp_path_factory.mktemp("shared-results")
    LocalFileSystem(basepath=str(shared)).save("gate-shared-results", overwrite=True)
    with get_client(sync_client=True) as client:
        for pool in (CLOUD_POOL, LAN_POOL):
            client.create_work_pool(
                WorkPoolCreate(name=pool, type="process"), overwrite=True
            )
            deploy_executor(pool)

    fast = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONPATH": str(TESTS_DIR)}
    lan_home = tmp_path_factory.mktemp("lan-home")
    lan_env = {
        **prefect_server.env,
        **fast,
        "PREFECT_HOME": str(lan_home),
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": (
            "local-file-system/gate-shared-results"
        ),
    }
    with (
        prefect_worker(CLOUD_POOL, env={**prefect_server.env, **fast}),
        prefect_worker(LAN_POOL, env=lan_env, cwd=lan_home),
    ):
        yield


def save_backends() -> None:
    L4_RATES.save("gate-l4-rates", overwrite=True)
    BackendBlock(
        kind="cloud_worker",
        has_gpu=True,
        available_vram_gb=24,
        rates=RatesBlock.load("gate-l4-rates"),
        work_pool=CLOUD_POOL,
    ).save("gate-cloud-l4", overwrite=True)
    BackendBlock(
        kind="lan_worker",
        has_gpu=True,
        available_vram_gb=48,
        tool_ids=["lan-fold"],
        work_pool=LAN_POOL,
    ).save("gate-lan-box", overwrite=True)


def budget(name: str, **fields: Any) -> str:
    BudgetBlock(**fields).save(name, overwrite=True)
    return name


def approve_when_asked(
    *, approve: bool, approver: str = "ops", reason: str = "looks fine"
) -> threading.Thread:
    """A second person, watching for the next approval request."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            waiting = pending_approvals()
            if waiting:
                decide(
                    waiting[0].flow_run_id,
                    approve=approve,
                    approver=approver,
                    reason=reason,
                )
                return
            time.sleep(0.5)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    return thread


def gpu_task(budget_name: str, **options: Any) -> Any:
    """The GPU job the tests gate: 24 GB, 10 minutes, 4 vCPU, 16 GiB."""
    settings: dict[str, Any] = {
        "tool_id": "cofold",
        "min_vram_gb": 24,
        "max_runtime_s": 600,
        "vcpus": 4,
        "memory_gib": 16,
        "budget": budget_name,
        "ledger": LEDGER,
        "backends": ["local", "gate-cloud-l4"],
    }

    return gated_task(**(settings | options))(gated_jobs.gpu_job)


def run_in_flow(call: Callable[[], Any]) -> Any:
    @flow
    def pipeline() -> Any:
        return call()

    return pipeline()


def test_free_job_runs_inline_on_this_machine(ledger: Ledger) -> None:
    name = budget("gate-free")
    tokenize = gated_task(
        tool_id="tokenize",
        max_runtime_s=30,
        budget=name,
        ledger=LEDGER,
        backends=["local"],
    )(gated_jobs.count_attempt)
    marker = TESTS_DIR.parent / ".pytest_cache" / f"free-{time.time_ns()}"
    marker.parent.mkdir(exist_ok=True)

    assert run_in_flow(lambda: tokenize(str(marker))) == 1

    [row] = ledger.reservations(name)
    assert row.status is ReservationStatus.SPENT
    assert row.bound_usd == 0 and row.actual_usd == 0


def test_gpu_job_is_refused_under_the_zero_cap_before_anyone_is_asked(
    ledger: Ledger,
) -> None:
    save_backends()
    name = budget("gate-zero")
    cofold = gpu_task(name)

    with pytest.raises(BudgetExceeded, match=r"run cap is \$0"):
        run_in_flow(lambda: cofold("MKV"))

    assert ledger.reservations(name) == []
    assert pending_approvals() == []


def test_approved_gpu_job_runs_on_its_pool_and_is_reconciled_from_the_child_run(
    ledger: Ledger, pools: None
) -> None:
    save_backends()
    name = budget("gate-paid", run_usd=Decimal(5), month_usd=Decimal(50))
    cofold = gpu_task(name)
    approve_when_asked(approve=True, approver="ana", reason="weekly fold")

    result = run_in_flow(lambda: cofold("MKVLA", seconds=2))

    assert result["length"] == 5
    [row] = ledger.reservations(name)
    assert row.status is ReservationStatus.SPENT
    # The bound: (600 s + 5 s tail) * (gpu + 4 vcpu + 16 GiB).
    per_s = Decimal("0.0001867") + 4 * Decimal("0.000018") + 16 * Decimal("0.000002")
    assert row.bound_usd == 605 * per_s
    # The actual: the child run's real runtime (>= 2 s of work) plus the tail.
    assert row.actual_usd is not None
    assert 7 * per_s <= row.actual_usd < row.bound_usd
    assert not row.overrun


def test_rejection_fails_the_task_and_reserves_nothing(ledger: Ledger) -> None:
    save_backends()
    name = budget("gate-reject", run_usd=Decimal(5), month_usd=Decimal(50))
    cofold = gpu_task(name, backends=["gate-cloud-l4"])
    approve_when_asked(approve=False, approver="bo", reason="not this month")

    with pytest.raises(ApprovalRejected, match="not this month"):
        run_in_flow(lambda: cofold("MKV"))

    assert ledger.reservations(name) == []


def test_job_below_the_auto_approve_threshold_needs_no_person(
    ledger: Ledger, pools: None
) -> None:
    save_backends()
    name = budget(
        "gate-auto",
        run_usd=Decimal(5),
        month_usd=Decimal(50),
        auto_approve_below_usd=Decimal(1),
    )
    cofold = gpu_task(name, max_runtime_s=60, backends=["gate-cloud-l4"])

    assert run_in_flow(lambda: cofold("MK", seconds=0))["length"] == 2

    [row] = ledger.reservations(name)
    assert row.status is ReservationStatus.SPENT


def test_lan_worker_in_another_environment_runs_the_job(
    ledger: Ledger, pools: None
) -> None:
    save_backends()
    name = budget("gate-lan")
    fold = gated_task(
        tool_id="lan-fold",
        min_vram_gb=40,
        max_runtime_s=120,
        budget=name,
        ledger=LEDGER,
        backends=["local", "gate-lan-box", "gate-cloud-l4"],
    )(gated_jobs.gpu_job)

    result = run_in_flow(lambda: fold("ACGT", seconds=0))

    assert result["length"] == 4
    [row] = ledger.reservations(name)
    assert row.label == "lan-fold on gate-lan-box"
    assert row.status is ReservationStatus.SPENT


def test_each_retry_is_admitted_and_charged_afresh(
    ledger: Ledger, tmp_path: Path
) -> None:
    name = budget("gate-retry")
    flaky = gated_task(
        tool_id="flaky",
        max_runtime_s=30,
        budget=name,
        ledger=LEDGER,
        backends=["local"],
        retries=1,
    )(gated_jobs.flaky)

    assert run_in_flow(lambda: flaky(str(tmp_path / "marker"))) == "second attempt ran"

    rows = sorted(ledger.reservations(name), key=lambda row: row.key.attempt)
    assert [row.key.attempt for row in rows] == [1, 2]
    assert {row.status for row in rows} == {ReservationStatus.SPENT}


def test_submit_and_map_run_like_any_task(ledger: Ledger, tmp_path: Path) -> None:
    name = budget("gate-map")
    count = gated_task(
        tool_id="count",
        max_runtime_s=30,
        budget=name,
        ledger=LEDGER,
        backends=["local"],
    )(gated_jobs.count_attempt)

    @flow
    def pipeline() -> list[int]:
        single = count.submit(str(tmp_path / "a")).result()
        many = count.map([str(tmp_path / "b"), str(tmp_path / "c")]).result()
        return [single, *many]

    assert pipeline() == [1, 1, 1]
    assert len(ledger.reservations(name)) == 3


def test_async_functions_are_gated_too(ledger: Ledger) -> None:
    name = budget("gate-async")
    tokenize = gated_task(
        tool_id="tokenize",
        max_runtime_s=30,
        budget=name,
        ledger=LEDGER,
        backends=["local"],
    )(gated_jobs.async_tokenize)

    @flow
    async def pipeline() -> list[str]:
        return await tokenize("a b c")

    import asyncio

    assert asyncio.run(pipeline()) == ["a", "b", "c"]
    assert len(ledger.reservations(name)) == 1


def test_a_call_outside_a_flow_is_refused(ledger: Ledger) -> None:
    tokenize = gated_task(tool_id="tokenize", max_runtime_s=30, ledger=LEDGER)(
        gated_jobs.count_attempt
    )

    with pytest.raises(GateOutsideFlowError, match="inside a @flow"):
        tokenize("unused")


def test_no_fitting_backend_lists_every_backend_and_why(ledger: Ledger) -> None:
    save_backends()
    huge = gated_task(
        tool_id="huge",
        min_vram_gb=80,
        max_runtime_s=60,
        ledger=LEDGER,
        backends=["local", "gate-lan-box", "gate-cloud-l4"],
    )(gated_jobs.gpu_job)

    with pytest.raises(NoBackendFitsError) as caught:
        run_in_flow(lambda: huge("M"))

    message = str(caught.value)
    assert "gate-lan-box (lan_worker): needs 80 GB of VRAM" in message
    assert "gate-cloud-l4 (cloud_worker): needs 80 GB of VRAM, has 24 GB" in message
    assert "local (local)" in message


def test_an_unknown_backend_block_is_refused_by_name(ledger: Ledger) -> None:
    ghost = gated_task(
        tool_id="ghost", max_runtime_s=60, ledger=LEDGER, backends=["no-such-box"]
    )(gated_jobs.gpu_job)

    with pytest.raises(LookupError, match="no-such-box"):
        run_in_flow(lambda: ghost("M"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_runtime_s": 0}, "max_runtime_s must be positive"),
        ({"max_runtime_s": 10, "vcpus": -1}, "vcpus must not be negative"),
        ({"max_runtime_s": 10, "memory_gib": -2}, "memory_gib must not be negative"),
        ({"max_runtime_s": 10, "min_vram_gb": -1}, "min_vram_gb must not be"),
        ({"max_runtime_s": 10, "backends": []}, "backends is empty"),
        ({"max_runtime_s": 10, "budget": ""}, "budget must name a block"),
    ],
)
def test_bad_limits_are_refused_when_decorating(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        gated_task(tool_id="x", **options)(gated_jobs.gpu_job)


def test_cloud_run_l4_calls_are_priced_and_sized_as_the_l4_task_billed(
    prefect_server: LocalPrefectServer,
) -> None:
    """A call declaring 1 vCPU and 2 GiB still gets, and pays for, 4 and 16."""
    from dispatch_prefect.cloud_run import create_cloud_run_pool
    from dispatch_prefect.config import to_routed
    from dispatch_prefect.gate import GateSpec
    from dispatch_prefect.templates import check_cloud_run_l4_resources

    create_cloud_run_pool("gate-l4-pool")
    L4_RATES.save("gate-l4-rates", overwrite=True)
    block = BackendBlock(
        kind="cloud_worker",
        has_gpu=True,
        available_vram_gb=24,
        rates=RatesBlock.load("gate-l4-rates"),
        work_pool="gate-l4-pool",
    )
    backend = to_routed("gate-real-l4", block)
    spec = GateSpec(tool_id="small", max_runtime_s=600, vcpus=1, memory_gib=2)

    assert backend.runs_on_cloud_run_l4
    per_s = Decimal("0.0001867") + 4 * Decimal("0.000018") + 16 * Decimal("0.000002")
    assert backend.bound_usd(spec) == 605 * per_s

    from dispatch_prefect.submit import _job_variables

    plan = type("PlanLike", (), {"backend": backend, "spec": spec})()
    variables = _job_variables(plan)  # type: ignore[arg-type]
    assert variables["timeout"] == 600
    check_cloud_run_l4_resources(cpu=4, memory_gib=16, timeout_s=600)
    assert variables["cpu"] == "4" and variables["memory"] == "16Gi"


CRASHING_CALLER = """
import sys
from decimal import Decimal
from prefect import flow
import gated_jobs
from dispatch_prefect import gated_task

cofold = gated_task(
    tool_id="cofold", min_vram_gb=24, max_runtime_s=120, budget=sys.argv[1],
    ledger=sys.argv[2], backends=["gate-cloud-l4"],
)(gated_jobs.gpu_job)

@flow
def pipeline():
    return cofold("MKV", seconds=6)

pipeline()
"""


def test_sweep_charges_a_call_whose_caller_died_from_its_child_run(
    prefect_server: LocalPrefectServer, ledger: Ledger, pools: None, tmp_path: Path
) -> None:
    """The caller is killed while its job runs; the sweeper settles the truth."""
    import os
    import signal
    import subprocess
    import sys

    from dispatch_prefect.hooks import resolve_from_prefect

    save_backends()
    name = budget(
        "gate-crash",
        run_usd=Decimal(5),
        month_usd=Decimal(50),
        auto_approve_below_usd=Decimal(1),
    )
    script = tmp_path / "caller.py"
    script.write_text(CRASHING_CALLER)
    caller = subprocess.Popen(
        [sys.executable, str(script), name, LEDGER],
        env={**prefect_server.env, "PYTHONPATH": str(TESTS_DIR)},
    )
    deadline = time.monotonic() + 120
    while not ledger.reservations(name) and time.monotonic() < deadline:
        time.sleep(0.5)
    [reserved] = ledger.reservations(name)
    tag = f"dispatch-key:{reserved.key.task_run_id}:{reserved.key.attempt}"
    from dispatch_prefect.submit import child_runs_for

    while not child_runs_for(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    os.kill(caller.pid, signal.SIGKILL)
    caller.wait()
    [child] = child_runs_for(tag)
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            child = client.read_flow_run(child.id)
            if child.state is not None and child.state.is_final():
                break
            time.sleep(0.5)

    assert ledger.reservations(name)[0].status is ReservationStatus.RESERVED
    [swept] = ledger.sweep(older_than_s=0, resolve=resolve_from_prefect)

    assert swept.key == reserved.key
    assert swept.status is ReservationStatus.SPENT and swept.swept
    assert not swept.unverified
    assert child.start_time is not None and child.end_time is not None
    runtime_s = Decimal(
        str(round((child.end_time - child.start_time).total_seconds(), 3))
    )
    per_s = Decimal("0.0001867") + Decimal("0.000018") + Decimal("0.000002")
    assert swept.actual_usd == (runtime_s + 5) * per_s
    assert runtime_s >= 6


def test_sweep_charges_the_full_bound_when_the_truth_is_lost(
    ledger: Ledger,
) -> None:
    from dispatch_prefect.hooks import resolve_from_prefect
    from dispatch_prefect.ledger import ReservationKey
    from dispatch_prefect.policy import BudgetCap

    key = ReservationKey(root_run_id="lost-run", task_run_id="lost-task", attempt=1)
    ledger.reserve(
        key,
        budget="gate-lost",
        bound_usd=Decimal("0.42"),
        cap=BudgetCap(run_usd=Decimal(1), month_usd=Decimal(1)),
    )

    swept = [
        r
        for r in ledger.sweep(older_than_s=0, resolve=resolve_from_prefect)
        if r.key == key
    ]

    assert swept[0].actual_usd == Decimal("0.42") and swept[0].unverified


def test_an_unknown_budget_block_is_refused_with_the_command_that_creates_it(
    ledger: Ledger,
) -> None:
    from dispatch_prefect.blocks import BlockNotFound

    tokenize = gated_task(
        tool_id="tokenize",
        max_runtime_s=30,
        budget="no-such-budget",
        ledger=LEDGER,
        backends=["local"],
    )(gated_jobs.count_attempt)

    with pytest.raises(BlockNotFound, match="no-such-budget") as caught:
        run_in_flow(lambda: tokenize("unused"))

    assert "dispatch-prefect blocks apply" in str(caught.value)
    assert ledger.reservations("no-such-budget") == []


def test_an_unreachable_ledger_refuses_and_nothing_runs(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> None:
    from dispatch_prefect.ledger import LedgerError
    from dispatch_prefect.testing import free_port

    dead = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/test"
    LedgerBlock(url=dead).save("gate-dead-ledger", overwrite=True)
    name = budget("gate-dead", run_usd=Decimal(5), month_usd=Decimal(50))
    count = gated_task(
        tool_id="count",
        max_runtime_s=30,
        budget=name,
        ledger="gate-dead-ledger",
        backends=["local"],
    )(gated_jobs.count_attempt)
    marker = tmp_path / "ran"

    with pytest.raises(LedgerError) as caught:
        run_in_flow(lambda: count(str(marker)))

    assert not marker.exists()
    assert "cannot be used right now" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_the_job_deployment_refuses_a_run_the_gate_did_not_start(
    ledger: Ledger, pools: None, tmp_path: Path
) -> None:
    """Anyone can press "Run" on a deployment; no paid job may start that way."""
    from prefect.deployments import run_deployment

    from dispatch_prefect.submit import EXECUTOR_FLOW_NAME

    marker = tmp_path / "ran"
    by_hand = {
        "target": "gated_jobs:count_attempt",
        "arguments": {"marker": str(marker)},
        "max_runtime_s": 60,
    }
    forged_tag = f"dispatch-key:{uuid.uuid4()}:1"
    started = [
        run_deployment(
            f"{EXECUTOR_FLOW_NAME}/{CLOUD_POOL}", parameters=by_hand, timeout=120
        ),
        # A copied tag without the gate's idempotency key, and one with a key
        # for a task run that does not exist, are refused too.
        run_deployment(
            f"{EXECUTOR_FLOW_NAME}/{CLOUD_POOL}",
            parameters=by_hand,
            tags=[forged_tag],
            timeout=120,
        ),
        run_deployment(
            f"{EXECUTOR_FLOW_NAME}/{CLOUD_POOL}",
            parameters=by_hand,
            tags=[forged_tag],
            idempotency_key=f"someone:{forged_tag}",
            timeout=120,
        ),
    ]

    messages = []
    for run in started:
        assert run.state is not None and run.state.is_failed(), run.state
        messages.append(run.state.message or "")
    assert "carries no reservation" in messages[0]
    assert "carries no reservation" in messages[1]
    assert "does not exist; nothing was run" in messages[2]
    assert not marker.exists()
