"""The gate's configuration, loaded from Prefect Blocks once per flow run.

A budget, the ledger and the backends are read from their blocks the first
time a flow run gates a call and kept for the rest of that run, so a loop of
gated calls costs one round of block reads, not one per call.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING
from uuid import UUID

from prefect.client.orchestration import get_client

from dispatch_prefect.gate import (
    IMPLICIT_LOCAL,
    GateError,
    GateSpec,
    RoutedBackend,
    local_host_vram_gb,
)
from dispatch_prefect.policy import BackendCapabilities, BackendKind, BudgetCap

if TYPE_CHECKING:
    from dispatch_prefect.blocks import BackendBlock
    from dispatch_prefect.ledger import Ledger

__all__ = ["GateConfig", "load_gate_config", "root_flow_run_id"]

logger = logging.getLogger("dispatch_prefect.config")

#: Approval wait when no budget block is saved (only free work passes then).
DEFAULT_APPROVAL_TIMEOUT_S = 3600


@dataclass(frozen=True)
class GateConfig:
    """Everything the gate reads from blocks for one flow run."""

    root_run_id: UUID
    cap: BudgetCap
    time_zone: str
    auto_approve_below_usd: Decimal
    approval_timeout_s: int
    backends: tuple[RoutedBackend, ...]
    ledger: Ledger


#: Flow runs whose configuration is kept; a long-lived process (a worker)
#: forgets the oldest beyond this.
CACHED_RUNS = 256

_cache: OrderedDict[tuple[object, ...], GateConfig] = OrderedDict()
# Open ledgers by database URL (kept in memory only: it may hold a password).
_ledgers: dict[str, Ledger] = {}
_lock = threading.Lock()


def load_gate_config(spec: GateSpec, flow_run_id: UUID) -> GateConfig:
    """The configuration a call of ``spec`` in ``flow_run_id`` runs under.

    Raises:
        GateError: a named block is missing (the message names it and the
            command that creates it) or the ledger cannot be opened.
    """
    cache_key = (flow_run_id, spec.budget, spec.ledger, spec.backends)
    with _lock:
        cached = _cache.get(cache_key)
    if cached is not None:
        return cached

    config = _load(spec, flow_run_id)
    with _lock:
        _cache[cache_key] = config
        while len(_cache) > CACHED_RUNS:
            _cache.popitem(last=False)

    return config


def _load(spec: GateSpec, flow_run_id: UUID) -> GateConfig:
    from dispatch_prefect.blocks import BlockNotFound, BudgetBlock, load_block

    try:
        budget = load_block(BudgetBlock, spec.budget)
    except BlockNotFound:
        if spec.budget != "default":
            raise
        logger.warning(
            "no budget block 'default' is saved: the cap is $0, so only free "
            "work runs; create one with `dispatch-prefect blocks apply blocks/`"
        )
        budget = None

    if budget is None:
        cap = BudgetCap()
        time_zone = "UTC"
        auto_below = Decimal(0)
        timeout_s = DEFAULT_APPROVAL_TIMEOUT_S
    else:
        cap = budget.to_cap()
        time_zone = budget.time_zone
        auto_below = budget.auto_approve_below_usd
        timeout_s = budget.approval_timeout_s

    return GateConfig(
        root_run_id=root_flow_run_id(flow_run_id),
        cap=cap,
        time_zone=time_zone,
        auto_approve_below_usd=auto_below,
        approval_timeout_s=timeout_s,
        backends=load_backends(spec.backends),
        ledger=open_ledger(spec.ledger),
    )


def open_ledger(name: str) -> Ledger:
    """The ledger a ledger block names, as the block reads now.

    A missing ``default`` block means the embedded file. The process keeps
    one open ledger per database, not per block name, so a block edited to
    point at another database is followed from the next flow run on, and
    spend is never split between the old database and the new one by a
    long-lived worker (runs already under way finish where they began).
    """
    from dispatch_prefect.blocks import BlockNotFound, LedgerBlock, load_block
    from dispatch_prefect.ledger.engine import default_url

    try:
        block = load_block(LedgerBlock, name)
    except BlockNotFound:
        if name != "default":
            raise
        block = LedgerBlock()
    url = default_url() if block.url is None else block.url.get_secret_value()

    with _lock:
        if url in _ledgers:
            return _ledgers[url]

    ledger = block.open_ledger()
    with _lock:
        _ledgers.setdefault(url, ledger)

        return _ledgers[url]


def load_backends(names: tuple[str, ...] | None) -> tuple[RoutedBackend, ...]:
    """The named backend blocks, or every saved one plus this machine."""
    if names is not None:
        return tuple(_named_backend(name) for name in names)

    routed = [to_routed(name, block) for name, block in _all_backend_blocks()]
    if not any(backend.kind is BackendKind.LOCAL for backend in routed):
        routed.insert(0, implicit_local_backend())

    return tuple(routed)


def _named_backend(name: str) -> RoutedBackend:
    from dispatch_prefect.blocks import BackendBlock, BlockNotFound, load_block

    try:
        return to_routed(name, load_block(BackendBlock, name))
    except BlockNotFound:
        if name != IMPLICIT_LOCAL:
            raise

        return implicit_local_backend()


def implicit_local_backend() -> RoutedBackend:
    """This machine, as it really is, at no cost: used when none is saved."""
    vram_gb = local_host_vram_gb()

    return RoutedBackend(
        name=IMPLICIT_LOCAL,
        kind=BackendKind.LOCAL,
        capabilities=BackendCapabilities(
            has_gpu=vram_gb is not None, available_vram_gb=vram_gb
        ),
    )


def to_routed(name: str, block: BackendBlock) -> RoutedBackend:
    """The router's view of a backend block.

    A LOCAL backend's GPU is read from the machine itself, whatever the block
    says: the host is the truth about what can run here.
    """
    capabilities = block.to_capabilities()
    if block.kind is BackendKind.LOCAL:
        vram_gb = local_host_vram_gb()
        capabilities = BackendCapabilities(
            has_gpu=vram_gb is not None,
            available_vram_gb=vram_gb,
            images=capabilities.images,
            tool_ids=capabilities.tool_ids,
        )

    return RoutedBackend(
        name=name,
        kind=BackendKind(block.kind),
        capabilities=capabilities,
        cost_rates=block.cost_rates(),
        token_rates=block.token_rates(),
        work_pool=block.work_pool,
        deployment=getattr(block, "deployment", None),
        job_variables=dict(block.job_variables or {}),
        pool_type=None if block.work_pool is None else pool_type(block.work_pool),
        base_url=block.base_url,
        secret=block.secret,
    )


def pool_type(pool: str) -> str | None:
    """The worker type of a work pool, or None when no such pool exists yet."""
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(pool).type
        except ObjectNotFound:
            return None


def _all_backend_blocks() -> list[tuple[str, BackendBlock]]:
    from dispatch_prefect.blocks import BackendBlock

    slug = BackendBlock.get_block_type_slug()
    with get_client(sync_client=True) as client:
        documents = client.read_block_documents_by_type(slug)

    found = []
    for document in sorted(documents, key=lambda doc: doc.name or ""):
        if document.name is None:
            continue
        block = BackendBlock._from_block_document(document)
        if not isinstance(block, BackendBlock):
            raise GateError(f"block {slug}/{document.name} is not a backend block")
        found.append((document.name, block))

    return found


def root_flow_run_id(flow_run_id: UUID) -> UUID:
    """The outermost flow run above ``flow_run_id``: the run window's id."""
    current = flow_run_id
    with get_client(sync_client=True) as client:
        for _ in range(100):
            flow_run = client.read_flow_run(current)
            if flow_run.parent_task_run_id is None:
                return current
            parent_task = client.read_task_run(flow_run.parent_task_run_id)
            if parent_task.flow_run_id is None:
                return current
            current = parent_task.flow_run_id

    return current
