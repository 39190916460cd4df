"""Running an admitted call: inline, or as a flow run on a backend's work pool.

A backend with no work pool runs the function right here, in the task, under
a timeout of ``max_runtime_s``. A backend with a pool runs it as a flow run of
the ``dispatch-gated-call`` deployment on that pool (created once per pool by
``dispatch-prefect pools deploy POOL``): a local process pool, a LAN machine's
pool, or a Cloud Run pool whose job timeout is set to ``max_runtime_s``.

``run_deployment`` is used rather than infrastructure-bound flows because it
takes per-call job variables (the timeout that makes the bound hold), an
idempotency key (a replayed attempt does not start a second job), and returns
the child run whose real start and end times the hooks reconcile from.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect import Task, flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun, StateType, TaskRun
from prefect.deployments import run_deployment
from prefect.states import Cancelling
from prefect.utilities.timeout import timeout, timeout_async

from dispatch_prefect.gate import GateError

if TYPE_CHECKING:
    from dispatch_prefect.gate import Plan
    from dispatch_prefect.ledger import ReservationKey

__all__ = [
    "EXECUTOR_FLOW_NAME",
    "JobFailedError",
    "JobNeverStartedError",
    "NotAdmittedError",
    "deploy_executor",
    "gated_call",
    "key_tag",
    "price_tag",
    "require_admitted_start",
    "submit_async",
    "submit_sync",
]

logger = logging.getLogger("dispatch_prefect.submit")

EXECUTOR_FLOW_NAME = "dispatch-gated-call"

_KEY_TAG_PREFIX = "dispatch-key:"

#: How long a job looks for its gated task run to be recorded as running
#: the attempt that started it, before it refuses to run.
ADMISSION_WAIT_S = 10

#: How long a job may wait in its pool's queue before it is called off
#: (and its reservation released): no worker is serving the pool.
START_DEADLINE_S = 600

#: Extra time beyond ``max_runtime_s`` before the gate stops waiting for a
#: job that should have timed out on its own, and cancels it.
FINISH_GRACE_S = 120

_FINAL = {
    StateType.COMPLETED,
    StateType.FAILED,
    StateType.CRASHED,
    StateType.CANCELLED,
}


class JobFailedError(RuntimeError):
    """The job ran on its backend and did not complete."""


class NotAdmittedError(GateError):
    """A job flow run that no admitted gated call started; nothing runs."""


class JobNeverStartedError(JobFailedError):
    """No worker picked the job up in time; nothing ran, nothing is charged."""


def key_tag(key: ReservationKey) -> str:
    """The tag that ties a child flow run to the reservation of ``key``."""
    return f"{_KEY_TAG_PREFIX}{key.task_run_id}:{key.attempt}"


def price_tag(plan: Plan) -> str:
    """The tag that lets the sweeper price a child run nobody settled.

    ``dispatch-price:<USD per second>:<idle tail s>``, both exact decimals.
    """
    backend = plan.backend
    if backend.cost_rates is None:
        return "dispatch-price:0:0"

    per_s = backend.actual_usd(plan.spec, Decimal(1)) - backend.actual_usd(
        plan.spec, Decimal(0)
    )

    return f"dispatch-price:{per_s}:{backend.cost_rates.idle_tail_s}"


def submit_sync(
    plan: Plan,
    function: Callable[..., Any],
    target: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run a sync gated function where the plan says."""
    if plan.backend.work_pool is None:
        return _run_inline(plan, lambda: function(*args, **kwargs))

    return _run_on_pool(plan, function, target, args, kwargs)


async def submit_async(
    plan: Plan,
    function: Callable[..., Any],
    target: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run an async gated function where the plan says."""
    if plan.backend.work_pool is not None:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(
            lambda: _run_on_pool(plan, function, target, args, kwargs)
        )

    with _measured(plan), timeout_async(plan.spec.max_runtime_s):
        return await function(*args, **kwargs)


def _run_inline(plan: Plan, call: Callable[[], Any]) -> Any:
    with _measured(plan), timeout(plan.spec.max_runtime_s):
        return call()


@contextlib.contextmanager
def _measured(plan: Plan) -> Iterator[None]:
    """Time an inline attempt; settle it at once if it fails.

    A failed attempt is settled here: a retry reserves afresh, and the
    failure hook only runs after the last attempt.
    """
    from dispatch_prefect.hooks import record_inline_runtime, settle

    task_run_id = UUID(plan.key.task_run_id)
    started = time.monotonic()
    try:
        yield
    except BaseException:
        record_inline_runtime(task_run_id, _elapsed(started))
        settle(task_run_id)
        raise
    finally:
        record_inline_runtime(task_run_id, _elapsed(started))


def _elapsed(started: float) -> Decimal:
    return Decimal(repr(round(time.monotonic() - started, 3)))


def _run_on_pool(
    plan: Plan,
    function: Callable[..., Any],
    target: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    from dispatch_prefect.hooks import record_child_run, settle

    task_run_id = UUID(plan.key.task_run_id)
    arguments = inspect.signature(function).bind(*args, **kwargs).arguments
    deployment = plan.backend.deployment or (
        f"{EXECUTOR_FLOW_NAME}/{plan.backend.work_pool}"
    )
    try:
        child: FlowRun = run_deployment(  # type: ignore[assignment]
            deployment,
            parameters={
                "target": target,
                "arguments": dict(arguments),
                "max_runtime_s": plan.spec.max_runtime_s,
            },
            job_variables=_job_variables(plan),
            timeout=0,
            idempotency_key=f"{plan.key.root_run_id}:{key_tag(plan.key)}",
            tags=[key_tag(plan.key), price_tag(plan), "dispatch-prefect"],
            flow_run_name=f"{plan.spec.tool_id}-{plan.key.attempt}",
        )
    except Exception as exc:
        settle(task_run_id)
        raise GateError(
            f"could not submit {plan.spec.tool_id} to deployment {deployment!r} "
            f"on pool {plan.backend.work_pool!r}: {exc}; create it with "
            f"`dispatch-prefect pools deploy {plan.backend.work_pool}`"
        ) from exc

    record_child_run(task_run_id, child.id)
    logger.info("submitted %s as flow run %s", plan.spec.tool_id, child.id)
    try:
        finished = _wait_for(child.id, plan)
    except BaseException:
        settle(task_run_id)
        raise

    if finished.state_type is not StateType.COMPLETED:
        settle(task_run_id)
        message = finished.state.message if finished.state else "no state"
        raise JobFailedError(
            f"{plan.spec.tool_id} on {plan.backend.name} ended "
            f"{finished.state_name}: {message}"
        )

    assert finished.state is not None
    return finished.state.result()


def _wait_for(flow_run_id: UUID, plan: Plan) -> FlowRun:
    """Poll the child run to its end, calling it off if it overstays."""
    submitted = time.monotonic()
    started: float | None = None
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state_type in _FINAL:
                return flow_run

            now = time.monotonic()
            if started is None and flow_run.start_time is not None:
                started = now
            if started is None and now - submitted > START_DEADLINE_S:
                _cancel(client, flow_run_id)
                raise JobNeverStartedError(
                    f"no worker started {plan.spec.tool_id} on pool "
                    f"{plan.backend.work_pool!r} within {START_DEADLINE_S} s; "
                    f"start one with `prefect worker start --pool "
                    f"{plan.backend.work_pool}`"
                )
            limit = plan.spec.max_runtime_s + FINISH_GRACE_S
            if started is not None and now - started > limit:
                _cancel(client, flow_run_id)
                raise JobFailedError(
                    f"{plan.spec.tool_id} ran past its max_runtime_s of "
                    f"{plan.spec.max_runtime_s} s and was cancelled"
                )
            time.sleep(1.0)


def _cancel(client: Any, flow_run_id: UUID) -> None:
    client.set_flow_run_state(flow_run_id, Cancelling(), force=True)


def _job_variables(plan: Plan) -> dict[str, Any]:
    variables = dict(plan.backend.job_variables)
    if plan.backend.runs_on_cloud_run_l4:
        from dispatch_prefect.templates import cloud_run_job_variables

        # The shape that was priced, and Cloud Run stops the job at its task
        # timeout: the bound holds.
        vcpus, memory_gib = plan.backend.billed_shape(plan.spec)
        variables |= cloud_run_job_variables(
            timeout_s=plan.spec.max_runtime_s,
            cpu=int(vcpus),
            memory_gib=int(memory_gib),
        )

    return variables


def child_runs_for(tag: str) -> list[FlowRun]:
    """Flow runs carrying a reservation's tag (for the sweeper)."""
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )


def resolve_target(target: str) -> Callable[..., Any]:
    """Import ``module:qualname`` and return the plain function behind it."""
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)

    raw = getattr(obj, "__dispatch_function__", None)
    if raw is not None:
        return raw  # type: ignore[no-any-return]
    if isinstance(obj, Task):
        return obj.fn
    if not callable(obj):
        raise TypeError(f"{target} is not callable")

    return obj  # type: ignore[no-any-return]


@flow(name=EXECUTOR_FLOW_NAME, persist_result=True)
def gated_call(target: str, arguments: dict[str, Any], max_runtime_s: int) -> Any:
    """Run one admitted gated function on this worker, within its runtime.

    Started by the gate only: its parameters come from an approved,
    reserved call. A run of this deployment started any other way (from
    the UI, the CLI or the API) fails before the function is imported.

    Raises:
        NotAdmittedError: no running gated call started this flow run.
    """
    require_admitted_start()
    function = resolve_target(target)
    if inspect.iscoroutinefunction(function):
        return asyncio.run(
            asyncio.wait_for(function(**arguments), timeout=max_runtime_s)
        )

    with timeout(max_runtime_s):
        return function(**arguments)


def require_admitted_start() -> None:
    """Let the running job flow run go on only if an admitted gated call started it.

    The gate starts each job with the key tag of the gated task run and
    attempt that reserved its bound, and an idempotency key ending in that
    tag; the server keeps one flow run per flow and idempotency key. That
    task run must still be running that attempt.

    Raises:
        NotAdmittedError: a tag or key is missing or does not match, or the
            gated task run is unknown, finished or on another attempt.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    flow_run = None if context is None else context.flow_run
    if flow_run is None:
        raise NotAdmittedError("not inside a job flow run")

    tags = [tag for tag in flow_run.tags if tag.startswith(_KEY_TAG_PREFIX)]
    started_by_gate = len(tags) == 1 and (flow_run.idempotency_key or "").endswith(
        f":{tags[0]}"
    )
    if not started_by_gate:
        raise NotAdmittedError(
            f"flow run {flow_run.id} carries no reservation: this deployment "
            "runs only jobs started by a @gated_task call that was admitted "
            "and reserved; call the gated task from a flow instead"
        )

    _prefix, task_run_id, attempt = tags[0].rsplit(":", 2)
    try:
        task_run = _running_attempt(UUID(task_run_id), int(attempt))
    except ValueError as exc:
        raise NotAdmittedError(
            f"flow run {flow_run.id} has a malformed tag {tags[0]!r}; nothing was run"
        ) from exc
    if task_run is None:
        raise NotAdmittedError(
            f"flow run {flow_run.id} names gated task run {task_run_id}, "
            "which does not exist; nothing was run"
        )
    if task_run.state_type is not StateType.RUNNING or task_run.run_count != int(
        attempt
    ):
        raise NotAdmittedError(
            f"flow run {flow_run.id} belongs to attempt {attempt} of gated task "
            f"run {task_run_id}, which is {task_run.state_name} on attempt "
            f"{task_run.run_count}; its reservation is over, so nothing was run"
        )


def _running_attempt(task_run_id: UUID, attempt: int) -> TaskRun | None:
    """The gated task run as the server has it, once it shows ``attempt`` running.

    The server records task run states from events, a moment after they
    happen, so a job that starts quickly may find its gated task not yet
    recorded, or on its previous attempt: it looks again for up to
    ``ADMISSION_WAIT_S`` before it takes what it sees as the answer.
    """
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + ADMISSION_WAIT_S
    with get_client(sync_client=True) as client:
        while True:
            try:
                task_run: TaskRun | None = client.read_task_run(task_run_id)
            except ObjectNotFound:
                task_run = None
            running = (
                task_run is not None
                and task_run.state_type is StateType.RUNNING
                and task_run.run_count == attempt
            )
            if running or time.monotonic() > deadline:
                return task_run
            time.sleep(0.5)


def deploy_executor(
    work_pool: str, *, job_variables: dict[str, Any] | None = None
) -> UUID:
    """Create or update the ``dispatch-gated-call/<pool>`` deployment.

    The entrypoint is a module path, so a worker runs it from the installed
    ``dispatch_prefect`` package with no code download; the worker's
    environment must also import the modules that define gated functions.
    """
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(EXECUTOR_FLOW_NAME)
        deployment_id: UUID = client.create_deployment(
            flow_id=flow_id,
            name=work_pool,
            work_pool_name=work_pool,
            entrypoint="dispatch_prefect.submit.gated_call",
            parameter_openapi_schema=gated_call.parameters.model_dump(),
            job_variables=job_variables or {},
            enforce_parameter_schema=True,
            description=(
                "Runs gated functions admitted by dispatch_prefect's gate on "
                f"work pool {work_pool!r}."
            ),
        )

    return deployment_id
