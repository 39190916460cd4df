"""The operational flows shipped in flows/: the monthly report and the sweeper."""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from dispatch_prefect.blocks import LedgerBlock
from dispatch_prefect.ledger import Ledger, ReservationKey, ReservationStatus
from dispatch_prefect.policy import BudgetCap
from dispatch_prefect.testing import LocalPrefectServer

sys.path.insert(0, str(Path(__file__).parent.parent / "flows"))

from monthly_report import monthly_report
from sweeper import sweep

pytestmark = pytest.mark.prefect_server

CAP = BudgetCap(run_usd=Decimal(10), month_usd=Decimal(100))


@pytest.fixture
def ledger_name(prefect_server: LocalPrefectServer, tmp_path: Path) -> str:
    # A name per test: the gate keeps a ledger per block name for the process.
    name = f"flows-tests-{tmp_path.name}".lower().replace("_", "-")
    LedgerBlock(url=f"sqlite:///{tmp_path / 'ledger.db'}").save(name, overwrite=True)

    return name


def test_monthly_report_publishes_each_budgets_month(ledger_name: str) -> None:
    from dispatch_prefect.config import open_ledger

    book: Ledger = open_ledger(ledger_name)
    for attempt, (budget, bound, actual) in enumerate(
        [
            ("team-a", "1.25", "0.50"),
            ("team-a", "2.00", None),
            ("team-b", "3.10", "3.10"),
        ]
    ):
        key = ReservationKey("run-1", f"task-{attempt}", 1)
        book.reserve(key, budget=budget, bound_usd=Decimal(bound), cap=CAP)
        if actual is not None:
            book.reconcile(key, Decimal(actual))

    rows = monthly_report(ledger=ledger_name)

    by_budget = {row["budget"]: row for row in rows}
    assert by_budget["team-a"]["spent_usd"] == "0.50"
    assert by_budget["team-a"]["reserved_usd"] == "2.00"
    assert by_budget["team-a"]["committed_usd"] == "2.50"
    assert by_budget["team-b"]["spent_usd"] == "3.10"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["dispatch-monthly-spend"])
            )
        )
    assert artifacts and "team-b" in str(artifacts[0].data)


def test_sweeper_flow_charges_a_lost_reservation_its_full_bound(
    ledger_name: str,
) -> None:
    from dispatch_prefect.config import open_ledger

    book = open_ledger(ledger_name)
    key = ReservationKey("lost-run", "lost-task", 1)
    book.reserve(key, budget="team-c", bound_usd=Decimal("0.75"), cap=CAP)

    assert sweep(ledger=ledger_name, older_than_s=0) >= 1

    swept = book.reservation(key)
    assert swept.status is ReservationStatus.SPENT
    assert swept.actual_usd == Decimal("0.75") and swept.unverified
