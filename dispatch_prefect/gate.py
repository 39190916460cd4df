"""``@gated_task``: route, estimate, admit, approve, reserve, then submit.

A gated task is an ordinary Prefect task whose body first answers, in
order and fail-closed, where the work runs, what it can cost at most, whether
the budget can hold that, and who approved it; only then does the work run,
inline or as a flow run on the chosen backend's work pool. Hooks on the task
settle the reservation from what really ran (see ``dispatch_prefect.hooks``).

```python
from prefect import flow
from dispatch_prefect import gated_task

@gated_task(tool_id="cofold", min_vram_gb=24, max_runtime_s=3600,
            vcpus=8, memory_gib=32)
def cofold(sequence: str) -> dict:
    ...

@flow
def fold(sequence: str) -> dict:
    return cofold(sequence)
```
"""

from __future__ import annotations

import functools
import inspect
import logging
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, overload

import anyio.to_thread
from prefect import Task, task
from prefect.context import TaskRunContext

from dispatch_prefect.policy import (
    Approval,
    BackendCapabilities,
    BackendKind,
    BudgetCap,
    BudgetState,
    CostRates,
    NoEligibleBackendError,
    SecretMissingError,
    TokenRates,
    ToolRequirements,
    estimate_cost,
    estimate_token_cost,
    select_backend,
)
from dispatch_prefect.policy.money import as_quantity

if TYPE_CHECKING:
    from dispatch_prefect.ledger import ReservationKey

__all__ = [
    "GateError",
    "GateOutsideFlowError",
    "GateSpec",
    "NoBackendFitsError",
    "PricingError",
    "RoutedBackend",
    "gated_task",
]

logger = logging.getLogger("dispatch_prefect.gate")

P = ParamSpec("P")
R = TypeVar("R")

#: Backend kinds that run on hardware the team already owns: with no rates
#: declared they cost nothing. Rented kinds must declare rates.
OWNED_KINDS = frozenset({BackendKind.LOCAL, BackendKind.LAN_WORKER})

#: The name the implicit backend of the machine at hand goes by.
IMPLICIT_LOCAL = "local"


class GateError(RuntimeError):
    """The gate refused the call before anything was reserved or started."""


class GateOutsideFlowError(GateError):
    """A gated task was called with no flow run around it."""


class NoBackendFitsError(NoEligibleBackendError, GateError):
    """No backend can run the call; the message lists every backend and why."""


class PricingError(GateError):
    """The call cannot be priced, so it cannot be admitted."""


@dataclass(frozen=True)
class GateSpec:
    """What a gated function declares: its needs, its limits, its budget.

    ``max_runtime_s`` is both the bound's runtime and the job's timeout, so
    the reservation really is an upper bound. Token limits price SDK calls.
    """

    tool_id: str
    max_runtime_s: int
    vcpus: Decimal = Decimal(1)
    memory_gib: Decimal = Decimal(1)
    min_vram_gb: float | None = None
    image: str | None = None
    input_tokens: int | None = None
    max_output_tokens: int | None = None
    budget: str = "default"
    ledger: str = "default"
    backends: tuple[str, ...] | None = None
    allow_sdk: bool = False

    def __post_init__(self) -> None:
        if not self.tool_id or not self.tool_id.strip():
            raise ValueError("gated_task tool_id must name the tool, got ''")

        if isinstance(self.max_runtime_s, bool) or not isinstance(
            self.max_runtime_s, int
        ):
            raise TypeError(
                f"gated_task max_runtime_s must be whole seconds, got "
                f"{self.max_runtime_s!r}"
            )
        if self.max_runtime_s <= 0:
            raise ValueError(
                f"gated_task max_runtime_s must be positive, got "
                f"{self.max_runtime_s}; it is the job's timeout"
            )

        object.__setattr__(self, "vcpus", as_quantity(self.vcpus, name="vcpus"))
        object.__setattr__(
            self, "memory_gib", as_quantity(self.memory_gib, name="memory_gib")
        )
        if self.min_vram_gb is not None and self.min_vram_gb < 0:
            raise ValueError(
                f"gated_task min_vram_gb must not be negative, got {self.min_vram_gb}"
            )

        for name in ("input_tokens", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(
                    f"gated_task {name} must be a whole number >= 0, got {value!r}"
                )

        for name in ("budget", "ledger"):
            if not getattr(self, name):
                raise ValueError(f"gated_task {name} must name a block, got ''")

        if self.backends is not None and not self.backends:
            raise ValueError(
                "gated_task backends is empty; name at least one backend block "
                "or leave it out to use every saved backend"
            )

    @property
    def requirements(self) -> ToolRequirements:
        """The routing question this call asks."""
        return ToolRequirements(
            tool_id=self.tool_id, min_vram_gb=self.min_vram_gb, image=self.image
        )


class SecretSource(Protocol):
    """Anything that reads a key at call time (a secret reference block)."""

    def resolve(self) -> str: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class RoutedBackend:
    """A backend as the router sees it: the policy view of a backend block."""

    name: str
    kind: BackendKind
    capabilities: BackendCapabilities
    cost_rates: CostRates | None = None
    token_rates: TokenRates | None = None
    work_pool: str | None = None
    deployment: str | None = None
    job_variables: dict[str, Any] = field(default_factory=dict)
    pool_type: str | None = None
    base_url: str | None = None
    secret: SecretSource | None = field(default=None, repr=False)

    def read_key(self) -> str:
        """The key of this SDK backend, read from its secret reference now.

        Raises:
            SecretMissingError: the backend names no secret, or it is unset.
        """
        if self.secret is None:
            raise SecretMissingError(
                f"SDK backend {self.name!r} names no secret; set its secret "
                "reference block"
            )

        return self.secret.resolve()

    @property
    def runs_on_cloud_run_l4(self) -> bool:
        """A GPU backend reached through a Cloud Run pool: one NVIDIA L4."""
        pool_type = self.pool_type or ""

        return pool_type.startswith("cloud-run") and self.capabilities.has_gpu

    def billed_shape(self, spec: GateSpec) -> tuple[Decimal, Decimal]:
        """The vCPUs and GiB the backend bills for a call of ``spec``.

        Cloud Run gives an L4 task at least 4 vCPUs and 16 GiB whatever the
        call declares, and bills them, so the bound prices that shape.
        """
        if not self.runs_on_cloud_run_l4:
            return spec.vcpus, spec.memory_gib

        from dispatch_prefect.templates import cloud_run_l4_shape

        cpu, memory_gib = cloud_run_l4_shape(
            min_vcpus=float(spec.vcpus), min_memory_gib=float(spec.memory_gib)
        )

        return Decimal(cpu), Decimal(memory_gib)

    def can_satisfy(self, req: ToolRequirements) -> bool:
        """Whether this backend can run the call."""
        return self.capabilities.can_satisfy(req)

    def why_not(self, req: ToolRequirements) -> str | None:
        """Why this backend cannot run the call, or None when it can."""
        return self.capabilities.why_not(req)

    def bound_usd(self, spec: GateSpec) -> Decimal:
        """The exact upper-bound cost of one call of ``spec`` here.

        Raises:
            PricingError: a rented backend with no rates, or an SDK call with
                no declared token limits.
        """
        if self.kind is BackendKind.SDK:
            return self._token_bound(spec)

        if self.cost_rates is None:
            if self.kind in OWNED_KINDS:
                return Decimal(0)

            raise PricingError(
                f"backend {self.name!r} ({self.kind.value}) has no compute rates, "
                "so the call cannot be priced; set rates on its backend block"
            )

        vcpus, memory_gib = self.billed_shape(spec)

        return estimate_cost(
            self.cost_rates,
            max_runtime_s=spec.max_runtime_s,
            vcpus=vcpus,
            memory_gib=memory_gib,
        )

    def actual_usd(self, spec: GateSpec, runtime_s: Decimal) -> Decimal:
        """What ``runtime_s`` of real work cost here (idle tail included)."""
        if self.cost_rates is None:
            return Decimal(0)

        vcpus, memory_gib = self.billed_shape(spec)

        return estimate_cost(
            self.cost_rates,
            max_runtime_s=runtime_s,
            vcpus=vcpus,
            memory_gib=memory_gib,
        )

    def _token_bound(self, spec: GateSpec) -> Decimal:
        if self.token_rates is None:
            raise PricingError(
                f"SDK backend {self.name!r} has no token rates, so the call "
                "cannot be priced; set token rates on its rates block"
            )
        if spec.input_tokens is None or spec.max_output_tokens is None:
            raise PricingError(
                f"tool {spec.tool_id!r} on SDK backend {self.name!r} needs "
                "input_tokens and max_output_tokens on @gated_task to be priced"
            )

        return estimate_token_cost(
            self.token_rates,
            input_tokens=spec.input_tokens,
            max_output_tokens=spec.max_output_tokens,
        )


@dataclass(frozen=True)
class Plan:
    """Everything decided about one call before it is reserved."""

    spec: GateSpec
    backend: RoutedBackend
    bound_usd: Decimal
    key: ReservationKey
    cap: BudgetCap
    time_zone: str
    run_state: BudgetState
    month_state: BudgetState
    auto_approve_below_usd: Decimal
    approval_timeout_s: int
    task_name: str
    flow_run_id: str


def local_host_vram_gb() -> float | None:
    """The largest GPU memory on this machine in GB, or None with no GPU.

    Read from ``nvidia-smi`` when it is installed; no tool, no GPU.
    """
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None

    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        logger.warning("nvidia-smi is installed but did not answer; no GPU used")
        return None

    sizes_mib = [float(line) for line in out.split() if line.strip()]
    if not sizes_mib:
        return None

    return max(sizes_mib) / 1024


def route(spec: GateSpec, backends: Sequence[RoutedBackend]) -> RoutedBackend:
    """Pick the backend with the pure router; explain every refusal.

    Raises:
        NoBackendFitsError: nothing fits; each backend is listed with why.
    """
    try:
        return select_backend(backends, spec.requirements, allow_sdk=spec.allow_sdk)
    except NoEligibleBackendError as exc:
        reasons = []
        for backend in backends:
            why = backend.why_not(spec.requirements)
            if why is None and backend.kind is BackendKind.SDK:
                why = "SDK backends need allow_sdk=True on @gated_task"
            reasons.append(f"  - {backend.name} ({backend.kind.value}): {why}")
        listing = "\n".join(reasons) if reasons else "  (no backends configured)"
        raise NoBackendFitsError(f"{exc}; backends passed over:\n{listing}") from exc


@overload
def gated_task(
    fn: Callable[P, R],
) -> Task[P, R]: ...


@overload
def gated_task(
    fn: None = None,
    *,
    tool_id: str | None = None,
    max_runtime_s: int = 3600,
    vcpus: Decimal | int | float = 1,
    memory_gib: Decimal | int | float = 1,
    min_vram_gb: float | None = None,
    image: str | None = None,
    input_tokens: int | None = None,
    max_output_tokens: int | None = None,
    budget: str = "default",
    ledger: str = "default",
    backends: Sequence[str] | None = None,
    allow_sdk: bool = False,
    **task_options: Any,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def gated_task(
    fn: Callable[P, R] | None = None,
    *,
    tool_id: str | None = None,
    max_runtime_s: int = 3600,
    vcpus: Decimal | int | float = 1,
    memory_gib: Decimal | int | float = 1,
    min_vram_gb: float | None = None,
    image: str | None = None,
    input_tokens: int | None = None,
    max_output_tokens: int | None = None,
    budget: str = "default",
    ledger: str = "default",
    backends: Sequence[str] | None = None,
    allow_sdk: bool = False,
    **task_options: Any,
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Turn a function that can cost money into a gated Prefect task.

    Args:
        tool_id: what the job runs, for routing; the function's name if None.
        max_runtime_s: the longest the job may run; its timeout and the
            runtime of the cost bound.
        vcpus: vCPUs the job asks for (priced, and passed to the pool).
        memory_gib: memory the job asks for in GiB.
        min_vram_gb: GPU memory the job needs; None for a CPU job.
        image: a container image the backend must offer, if pinned.
        input_tokens: for SDK/LLM calls: the input size the bound assumes.
        max_output_tokens: for SDK/LLM calls: the output cap of the call.
        budget: the name of the budget block that caps this call.
        ledger: the name of the ledger block (the embedded SQLite file when
            no such block is saved and the name is ``"default"``).
        backends: names of backend blocks to choose from; every saved
            backend block when None.
        allow_sdk: let the router pick a paid third-party API.
        **task_options: passed to ``prefect.task`` (``retries``, ``name``,
            ``tags``, ...).

    Returns:
        A Prefect task: call it, ``.submit()`` it or ``.map()`` it inside a
        flow; each attempt is gated afresh.

    Raises:
        ValueError: a limit is negative or a name is empty.
    """

    def decorate(function: Callable[P, R]) -> Task[P, R]:
        spec = GateSpec(
            tool_id=tool_id or function.__name__,
            max_runtime_s=max_runtime_s,
            vcpus=vcpus,  # type: ignore[arg-type]  # coerced in __post_init__
            memory_gib=memory_gib,  # type: ignore[arg-type]
            min_vram_gb=min_vram_gb,
            image=image,
            input_tokens=input_tokens,
            max_output_tokens=max_output_tokens,
            budget=budget,
            ledger=ledger,
            backends=tuple(backends) if backends is not None else None,
            allow_sdk=allow_sdk,
        )

        return _build_task(function, spec, task_options)

    if fn is not None:
        return decorate(fn)

    return decorate


def import_path(function: Callable[..., Any]) -> str:
    """``module:qualname`` a worker imports to run ``function``.

    A function defined in a script run as ``__main__`` is named by the
    script's file name, so a worker with the script's folder on its
    ``PYTHONPATH`` finds it.
    """
    module = function.__module__
    if module == "__main__":
        module = Path(inspect.getfile(function)).stem

    return f"{module}:{function.__qualname__}"


def _build_task(
    function: Callable[P, R], spec: GateSpec, task_options: dict[str, Any]
) -> Task[P, R]:
    from dispatch_prefect.hooks import settle_on_completion, settle_on_failure

    target = import_path(function)
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            plan = await anyio.to_thread.run_sync(
                functools.partial(_admit, spec, function.__name__)
            )
            from dispatch_prefect.submit import submit_async

            return await submit_async(plan, function, target, args, kwargs)

        body: Callable[..., Any] = run_async
    else:

        @functools.wraps(function)
        def run_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            plan = _admit(spec, function.__name__)
            from dispatch_prefect.submit import submit_sync

            return submit_sync(plan, function, target, args, kwargs)

        body = run_sync

    options = {
        "name": task_options.pop("name", function.__name__),
        "on_completion": [
            settle_on_completion,
            *task_options.pop("on_completion", []),
        ],
        "on_failure": [settle_on_failure, *task_options.pop("on_failure", [])],
        **task_options,
    }
    gated: Task[P, R] = task(body, **options)
    gated.__dispatch_spec__ = spec  # type: ignore[attr-defined]
    gated.__dispatch_function__ = function  # type: ignore[attr-defined]

    return gated


def _admit(spec: GateSpec, task_name: str) -> Plan:
    """Route, price, check, approve and reserve one call, or refuse it."""
    from dispatch_prefect import report
    from dispatch_prefect.config import load_gate_config
    from dispatch_prefect.hooks import remember_reservation
    from dispatch_prefect.ledger import BudgetExceeded, ReservationKey

    task_ctx = TaskRunContext.get()
    flow_run_id = None if task_ctx is None else task_ctx.task_run.flow_run_id
    if task_ctx is None or flow_run_id is None:
        raise GateOutsideFlowError(
            f"gated task {task_name!r} was called outside a flow; call it from "
            "inside a @flow so the run window and the approval have a run"
        )

    task_run = task_ctx.task_run
    config = load_gate_config(spec, flow_run_id)
    backend = route(spec, config.backends)
    bound_usd = backend.bound_usd(spec)
    key = ReservationKey(
        root_run_id=str(config.root_run_id),
        task_run_id=str(task_run.id),
        attempt=task_run.run_count,
    )
    logger_ = _run_logger()
    logger_.info(
        "routed %s to %s (%s); bound $%s",
        spec.tool_id,
        backend.name,
        backend.kind.value,
        bound_usd,
    )

    if backend.kind is BackendKind.SDK:
        try:
            # Dropped at once: a call that could not authenticate is refused
            # before a person is asked or its bound is held for nothing.
            backend.read_key()
        except SecretMissingError as exc:
            report.emit_refusal(spec, backend, bound_usd, str(exc), flow_run_id)
            logger_.warning("refused %s: %s", spec.tool_id, exc)
            raise

    decision = config.ledger.check(
        spec.budget,
        key.root_run_id,
        bound_usd,
        config.cap,
        time_zone=config.time_zone,
    )
    if not decision.admitted:
        report.emit_refusal(spec, backend, bound_usd, decision.reason, flow_run_id)
        logger_.warning("refused %s: %s", spec.tool_id, decision.reason)
        raise BudgetExceeded(
            f"{spec.tool_id} on {backend.name} refused: {decision.reason}",
            decision=decision,
        )

    run_state, month_state = config.ledger.window_states(
        spec.budget, key.root_run_id, time_zone=config.time_zone
    )
    plan = Plan(
        spec=spec,
        backend=backend,
        bound_usd=bound_usd,
        key=key,
        cap=config.cap,
        time_zone=config.time_zone,
        run_state=run_state,
        month_state=month_state,
        auto_approve_below_usd=config.auto_approve_below_usd,
        approval_timeout_s=config.approval_timeout_s,
        task_name=task_name,
        flow_run_id=str(flow_run_id),
    )

    if bound_usd > 0:
        _decide(plan)

    try:
        reservation = config.ledger.reserve(
            key,
            budget=spec.budget,
            bound_usd=bound_usd,
            cap=config.cap,
            time_zone=config.time_zone,
            label=f"{spec.tool_id} on {backend.name}",
        )
    except BudgetExceeded:
        logger_.warning("refused %s at reservation: the cap filled", spec.tool_id)
        raise

    remember_reservation(task_run.id, plan, config.ledger)
    report.emit_reserved(plan, reservation, flow_run_id)
    logger_.info("reserved $%s for %s", bound_usd, spec.tool_id)

    return plan


def _decide(plan: Plan) -> Approval:
    """Ask the policy, then a person; record the decision; raise on a no."""
    from dispatch_prefect import approval as approvals

    request = approvals.ApprovalRequest(
        tool_id=plan.spec.tool_id,
        task_name=plan.task_name,
        backend_name=plan.backend.name,
        backend_kind=plan.backend.kind,
        bound_usd=plan.bound_usd,
        budget_name=plan.spec.budget,
        run_state=plan.run_state,
        run_cap_usd=plan.cap.run_usd,
        month_state=plan.month_state,
        month_cap_usd=plan.cap.month_usd,
        month_label=_month_label(plan.time_zone),
        limits=_declared_limits(plan),
    )
    approval = approvals.auto_approve(
        request, threshold_usd=plan.auto_approve_below_usd
    )
    if approval is None:
        _run_logger().info(
            "waiting for a person to approve %s ($%s)",
            plan.spec.tool_id,
            plan.bound_usd,
        )
        approval = approvals.request_approval(
            request,
            timeout_s=plan.approval_timeout_s,
            key=f"approve-{plan.key.task_run_id}-{plan.key.attempt}",
        )
    approvals.record_approval(approval, request)
    _run_logger().info(
        "%s %s: %s by %s",
        approval.outcome.value,
        plan.spec.tool_id,
        approval.reason,
        approval.author,
    )
    if not approval.approved:
        raise approvals.ApprovalRejected(approval, request)

    return approval


def _declared_limits(plan: Plan) -> tuple[tuple[str, str], ...]:
    """What the call declared and the bound rests on, for the approver."""
    spec = plan.spec
    vcpus, memory_gib = plan.backend.billed_shape(spec)
    limits = [("Max runtime", f"{spec.max_runtime_s} s (the job's timeout)")]
    if plan.backend.kind is BackendKind.SDK:
        limits.append(("Input tokens", str(spec.input_tokens)))
        limits.append(("Max output tokens", str(spec.max_output_tokens)))
    else:
        limits.append(("vCPUs", str(vcpus)))
        limits.append(("Memory", f"{memory_gib} GiB"))
        if spec.min_vram_gb is not None:
            limits.append(("GPU memory", f"{spec.min_vram_gb:g} GB"))

    return tuple(limits)


def _month_label(time_zone: str) -> str:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    return datetime.now(ZoneInfo(time_zone)).strftime("%Y-%m")


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except Exception:
        return logger
