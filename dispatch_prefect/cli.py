"""The ``dispatch-prefect`` command.

Built on cyclopts, as Prefect's own CLI is, so it adds no dependency. Each
area is a sub-app; a new area is one more ``app.command(<sub-app>)``.

```
dispatch-prefect blocks register
dispatch-prefect blocks apply blocks/ [--dry-run]
dispatch-prefect approvals list [--ids]
dispatch-prefect approvals approve RUN_ID --by NAME --reason TEXT
dispatch-prefect approvals reject RUN_ID --by NAME --reason TEXT
dispatch-prefect pools deploy POOL
dispatch-prefect pools create-cloud-run NAME [--region R] [--image I]
dispatch-prefect spend [--budget B]
dispatch-prefect sweep [--older-than-s N]
```
"""

from __future__ import annotations

import sys
from pathlib import Path

import cyclopts
import httpx

__all__ = ["app", "approvals_app", "blocks_app", "main", "pools_app"]

app = cyclopts.App(
    name="dispatch-prefect",
    help="A fail-closed budget, router and approval gate for Prefect.",
)

blocks_app = cyclopts.App(
    name="blocks",
    help="The gate's Prefect Blocks: register their types, apply documents.",
)
app.command(blocks_app)


@blocks_app.command
def register() -> int:
    """Register every Dispatch block type with the Prefect API.

    The same as ``prefect block register -m dispatch_prefect.blocks``; the
    types then appear in the UI with their forms.
    """
    from dispatch_prefect.blocks import BLOCK_CLASSES

    try:
        for cls in BLOCK_CLASSES:
            cls.register_type_and_schema(_sync=True)  # type: ignore[call-arg]
            print(f"registered {cls.get_block_type_name()}")
    except httpx.HTTPError as exc:
        return _unreachable(exc)

    return 0


@blocks_app.command
def apply(folder: Path, /, *, dry_run: bool = False) -> int:
    """Validate every block document in FOLDER, then create or update each.

    Nothing is written when any document is invalid. Applying the same
    folder twice changes nothing the second time.

    Parameters
    ----------
    folder
        The folder of ``*.toml`` block documents, for example ``blocks/``.
    dry_run
        Validate and say what would change, without writing.
    """
    from dispatch_prefect.blocks import (
        BlockDocumentsInvalid,
        apply_block_documents,
        read_block_documents,
    )

    try:
        specs = read_block_documents(folder)
        outcomes = apply_block_documents(specs, dry_run=dry_run)
    except BlockDocumentsInvalid as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(
            f"{len(exc.problems)} problem(s); nothing was written",
            file=sys.stderr,
        )
        return 1
    except httpx.HTTPError as exc:
        return _unreachable(exc)

    prefix = "would be " if dry_run else ""
    for outcome in outcomes:
        print(f"{prefix}{outcome.action.value:<9} {outcome.spec.label()}")

    return 0


# -- approvals ----------------------------------------------------------------

approvals_app = cyclopts.App(
    name="approvals",
    help="Paid runs waiting for a person: list them, approve or reject them.",
)
app.command(approvals_app)


@approvals_app.command(name="list")
def list_approvals(*, ids: bool = False) -> int:
    """List the flow runs waiting for an approval, oldest first.

    Parameters
    ----------
    ids
        Print only the flow run ids, one a line (for scripts).
    """
    from dispatch_prefect.approval import pending_approvals

    try:
        waiting = pending_approvals()
    except httpx.HTTPError as exc:
        return _unreachable(exc)

    for pending in waiting:
        if ids:
            print(pending.flow_run_id)
            continue
        headline = next(
            (line.strip("# ") for line in pending.description.splitlines() if line),
            "",
        )
        print(
            f"{pending.flow_run_id}  {pending.flow_run_name}  waiting since "
            f"{pending.paused_since:%Y-%m-%d %H:%M:%S %Z}  {headline}"
        )
    if not waiting and not ids:
        print("no run is waiting for an approval")

    return 0


@approvals_app.command
def approve(flow_run_id: str, /, *, by: str, reason: str) -> int:
    """Approve the paid job a paused flow run waits on.

    Parameters
    ----------
    flow_run_id
        The waiting run (see ``dispatch-prefect approvals list``).
    by
        Who approves: recorded with the decision.
    reason
        Why: recorded with the decision.
    """
    return _decide(flow_run_id, approve=True, approver=by, reason=reason)


@approvals_app.command
def reject(flow_run_id: str, /, *, by: str, reason: str) -> int:
    """Reject the paid job a paused flow run waits on; nothing is reserved.

    Parameters
    ----------
    flow_run_id
        The waiting run (see ``dispatch-prefect approvals list``).
    by
        Who rejects: recorded with the decision.
    reason
        Why: recorded with the decision.
    """
    return _decide(flow_run_id, approve=False, approver=by, reason=reason)


def _decide(flow_run_id: str, *, approve: bool, approver: str, reason: str) -> int:
    from dispatch_prefect.approval import ApprovalNotPending, decide

    try:
        decide(flow_run_id, approve=approve, approver=approver, reason=reason)
    except (ValueError, ApprovalNotPending) as exc:
        print(exc, file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        return _unreachable(exc)

    print(f"{'approved' if approve else 'rejected'} {flow_run_id} as {approver}")

    return 0


# -- pools --------------------------------------------------------------------

pools_app = cyclopts.App(
    name="pools",
    help="Work pools that run gated calls: deploy the runner, create Cloud Run.",
)
app.command(pools_app)


@pools_app.command
def deploy(pool: str, /) -> int:
    """Create or update the ``dispatch-gated-call/POOL`` deployment.

    Every pool a backend names needs it: the gate starts admitted calls as
    runs of this deployment. The pool's workers must import the modules
    that define the gated functions.

    Parameters
    ----------
    pool
        The work pool's name.
    """
    from dispatch_prefect.submit import EXECUTOR_FLOW_NAME, deploy_executor

    try:
        deployment_id = deploy_executor(pool)
    except httpx.HTTPError as exc:
        return _unreachable(exc)

    print(f"deployed {EXECUTOR_FLOW_NAME}/{pool} ({deployment_id})")

    return 0


@pools_app.command(name="create-cloud-run")
def create_cloud_run(
    name: str,
    /,
    *,
    region: str | None = None,
    image: str | None = None,
    credentials_block: str | None = None,
) -> int:
    """Create or update a ``cloud-run-v2`` pool whose jobs get one NVIDIA L4.

    Parameters
    ----------
    name
        The pool's name.
    region
        The Google Cloud region (one with L4 GPUs).
    image
        The container image the jobs run.
    credentials_block
        The name of a GcpCredentials block.
    """
    from dispatch_prefect.cloud_run import CloudRunPoolError, create_cloud_run_pool

    try:
        pool = create_cloud_run_pool(
            name, region=region, image=image, credentials_block=credentials_block
        )
    except CloudRunPoolError as exc:
        print(exc, file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        return _unreachable(exc)

    print(f"work pool {pool.name} ({pool.type}) asks for one NVIDIA L4 per job")

    return 0


# -- spend ----------------------------------------------------------------------


@app.command
def spend(*, budget: str | None = None, ledger: str = "default", last: int = 20) -> int:
    """Show committed money: per budget and month, then the latest calls.

    Parameters
    ----------
    budget
        Only this budget; every budget when left out.
    ledger
        The ledger block to read ("default": the embedded file if unsaved).
    last
        How many of the latest gated calls to list.
    """
    from dispatch_prefect.config import open_ledger

    try:
        book = open_ledger(ledger)
    except httpx.HTTPError as exc:
        return _unreachable(exc)

    totals = book.month_totals(budget)
    if not totals:
        print("nothing reserved or spent yet")
    for total in totals:
        print(
            f"{total.budget:<16} {total.month}  spent ${total.spent_usd}  "
            f"reserved ${total.reserved_usd}"
        )
    for row in book.reservations(budget, limit=last):
        actual = "" if row.actual_usd is None else f" spent ${row.actual_usd}"
        flags = " overrun" if row.overrun else ""
        flags += " swept" if row.swept else ""
        flags += " unverified" if row.unverified else ""
        print(
            f"  {row.created_at:%Y-%m-%d %H:%M} {row.status.value:<8} "
            f"{row.label}: bound ${row.bound_usd}{actual}{flags}"
        )

    return 0


@app.command
def sweep(*, ledger: str = "default", older_than_s: float = 7200) -> int:
    """Settle reservations older than OLDER_THAN_S whose end nobody saw.

    Parameters
    ----------
    ledger
        The ledger block to sweep.
    older_than_s
        Longer than your longest max_runtime_s plus the approval wait.
    """
    from dispatch_prefect.config import open_ledger
    from dispatch_prefect.hooks import resolve_from_prefect

    try:
        settled = open_ledger(ledger).sweep(
            older_than_s=older_than_s, resolve=resolve_from_prefect
        )
    except httpx.HTTPError as exc:
        return _unreachable(exc)

    for row in settled:
        how = "unverified: full bound" if row.unverified else "from its run"
        print(f"swept {row.label}: ${row.actual_usd} of ${row.bound_usd} ({how})")
    print(f"{len(settled)} reservation(s) settled")

    return 0


def _unreachable(exc: httpx.HTTPError) -> int:
    from prefect.settings import PREFECT_API_URL

    print(
        f"cannot reach the Prefect API at {PREFECT_API_URL.value()} "
        f"({exc.__class__.__name__}); start it or set PREFECT_API_URL",
        file=sys.stderr,
    )

    return 1


def main() -> None:
    """Entry point of the ``dispatch-prefect`` console script."""
    result = app(result_action="return_value")

    raise SystemExit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
