"""Publish what every budget committed, month by month, as a Prefect artifact.

Run it on a schedule (daily, or on the first of the month) so the spend of
every budget is one click away in the UI, next to the runs that made it.

    python flows/monthly_report.py
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from dispatch_prefect.config import open_ledger


def month_rows(ledger: str = "default") -> list[dict[str, str]]:
    """One row per budget and month: spent, reserved and committed, in USD."""
    return [
        {
            "budget": total.budget,
            "month": total.month,
            "spent_usd": str(total.spent_usd),
            "reserved_usd": str(total.reserved_usd),
            "committed_usd": str(total.committed_usd),
        }
        for total in open_ledger(ledger).month_totals()
    ]


@flow(name="dispatch-monthly-report")
def monthly_report(ledger: str = "default") -> list[dict[str, str]]:
    """Publish the ``dispatch-monthly-spend`` table artifact and return its rows."""
    rows = month_rows(ledger)
    create_table_artifact(
        table=rows,
        key="dispatch-monthly-spend",
        description=(
            "What each budget has committed per month (spent after "
            "reconciliation, plus what is still reserved)."
        ),
    )

    return rows


if __name__ == "__main__":
    monthly_report()
