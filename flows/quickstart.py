"""The quick start: the gate's whole story on this machine, offline.

Run it with ``make demo``. It starts a temporary Prefect server and a worker,
keeps the ledger in an embedded SQLite file, and shows in plain lines:

1. a free job, routed to this machine and run inline;
2. a GPU job refused under the default $0 cap, with the reason;
3. a budget set;
4. the same GPU job approved by an operator from a second process (the CLI
   an operator would use) and run on its work pool;
5. its spend reconciled from the real runtime;
6. where to look at all of it.

No GPU and no Google account are needed: a local process pool stands in for
the Cloud Run L4 pool, and the output says so.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STANDIN_POOL = "cloud-run-l4-standin"


def say(line: str = "") -> None:
    print(line, flush=True)


def tokenize(text: str) -> list[str]:
    """A free job: CPU only, a few milliseconds."""
    return text.split()


def cofold(sequence: str) -> dict[str, Any]:
    """A GPU job: pretends to fold a protein for two seconds."""
    time.sleep(2)
    return {"sequence": sequence, "residues": len(sequence)}


def main(argv: list[str]) -> int:
    keep = "--keep" in argv
    home = Path(tempfile.mkdtemp(prefix="dispatch-prefect-demo-"))
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # The story is told in plain lines; Prefect's own logs stay in the UI.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")

    from dispatch_prefect.testing import local_prefect_server

    say("dispatch-prefect quick start")
    say(f"  starting a temporary Prefect server (PREFECT_HOME={home}) ...")
    with local_prefect_server(home=home, ui=True) as server:
        os.environ["PREFECT_API_URL"] = server.api_url
        status = run_story(server)
        if keep and status == 0:
            say(f"   serving {server.ui_url} until you press Ctrl-C")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)

        return status


def run_story(server: Any) -> int:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from dispatch_prefect import gated_task
    from dispatch_prefect.blocks import (
        BackendBlock,
        BudgetBlock,
        apply_block_documents,
        read_block_documents,
    )
    from dispatch_prefect.ledger import BudgetExceeded, Ledger
    from dispatch_prefect.submit import deploy_executor
    from dispatch_prefect.testing import prefect_worker

    say(f"  server ready at {server.ui_url}")
    say("  applying the team's block documents from blocks/ ...")
    apply_block_documents(read_block_documents(REPO / "blocks"))
    # Paid work is off until someone sets a budget: start from the $0 default.
    BudgetBlock().save("default", overwrite=True)
    # Offline, a local process pool stands in for the Cloud Run L4 pool.
    cloud = BackendBlock.load("cloud-run-l4")
    cloud.work_pool = STANDIN_POOL
    cloud.job_variables = {}
    cloud.save("cloud-run-l4", overwrite=True)
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(name=STANDIN_POOL, type="process"), overwrite=True
        )
    deploy_executor(STANDIN_POOL)
    say(
        "  note: no Google here, so the cloud-run-l4 backend's jobs go to a "
        f"local process pool '{STANDIN_POOL}' standing in for Cloud Run L4"
    )

    free = gated_task(tool_id="tokenize", max_runtime_s=60)(tokenize)
    gpu = gated_task(
        tool_id="cofold", min_vram_gb=24, max_runtime_s=3600, vcpus=4, memory_gib=16
    )(cofold)

    @flow(name="quickstart-free")
    def free_flow() -> list[str]:
        return free("gate every expensive call")

    @flow(name="quickstart-fold")
    def fold_flow() -> dict[str, Any]:
        return gpu("MKVLAAGIVALLLAAGCS")

    say()
    say("1. a free job")
    words = free_flow()
    say(f"   routed LOCAL (this machine), bound $0: ran inline -> {words}")

    say()
    say("2. a GPU job (24 GB of VRAM, up to 1 hour, 4 vCPU, 16 GiB)")
    try:
        fold_flow()
    except BudgetExceeded as exc:
        say(f"   {exc}")
    else:
        say("   NOT refused: the $0 default cap did not hold")
        return 1

    say()
    say("3. a budget: $5 a run, $100 a month (block 'default')")
    BudgetBlock(run_usd=Decimal(5), month_usd=Decimal(100)).save(
        "default", overwrite=True
    )

    say()
    say("4. the same GPU job, now under the budget: it waits for a person")
    worker_env = {
        **server.env,
        "PYTHONPATH": str(HERE),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    approver = threading.Thread(target=operator_approves, args=(server,))
    with prefect_worker(STANDIN_POOL, env=worker_env, cwd=HERE):
        approver.start()
        result = fold_flow()
        approver.join()
    say(f"   ran on {STANDIN_POOL} (standing in for Cloud Run L4) -> {result}")

    say()
    say("5. the spend, reconciled from the child run's real start and end")
    ledger = Ledger.open(None)
    for row in reversed(ledger.reservations("default")):
        if row.actual_usd is None:
            continue
        say(
            f"   reconciled {row.label}: reserved ${row.bound_usd}, "
            f"spent ${row.actual_usd} ({row.status.value})"
        )
    for total in ledger.month_totals("default"):
        say(
            f"   month {total.month}: spent ${total.spent_usd}, "
            f"reserved ${total.reserved_usd} of the $100 cap"
        )

    say()
    say("6. where to look")
    say(f"   Prefect UI: {server.ui_url}/runs (flow runs, their artifacts)")
    say("   artifacts: 'dispatch-run-spend-default' and 'dispatch-month-default'")
    say("   spend from the shell: dispatch-prefect spend")
    say(f"   the ledger: {ledger.url}")
    say(
        "   the server stops with the demo; `.venv/bin/python flows/quickstart.py "
        "--keep` "
        "keeps it up to browse"
    )

    return 0


def operator_approves(server: Any) -> None:
    """A second process approves the waiting run, as an operator would."""
    command = [sys.executable, "-m", "dispatch_prefect.cli"]
    env = {**server.env, "PYTHONPATH": str(REPO)}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        listing = subprocess.run(
            [*command, "approvals", "list", "--ids"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        waiting = listing.stdout.split()
        if waiting:
            say(f"   a run waits for approval: {waiting[0]}")
            say(
                "   operator, in a second process: dispatch-prefect approvals "
                f"approve {waiting[0]} --by operator --reason 'weekly fold'"
            )
            decided = subprocess.run(
                [
                    *command,
                    "approvals",
                    "approve",
                    waiting[0],
                    "--by",
                    "operator",
                    "--reason",
                    "weekly fold",
                ],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            say(f"   approved: {decided.stdout.strip() or decided.stderr.strip()}")
            return
        time.sleep(1)

    say("   nobody approved within 120 s")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
