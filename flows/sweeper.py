"""Settle reservations whose end nobody saw: run it on a schedule.

A gated call's reservation is settled by the call itself. When the process
that ran it died first, the reservation stays open and keeps counting its
full bound. This flow settles such reservations: from the child flow run's
real runtime when the call ran on a pool and finished, at $0 when its job
never started, and at its full bound, flagged unverified, when the truth
cannot be found.

    python flows/sweeper.py                  # once, now
    prefect deploy flows/sweeper.py:sweep -n hourly --cron "0 * * * *" ...
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from dispatch_prefect.config import open_ledger
from dispatch_prefect.hooks import resolve_from_prefect


@flow(name="dispatch-sweep")
def sweep(ledger: str = "default", older_than_s: float = 7200) -> int:
    """Settle open reservations older than ``older_than_s``.

    Args:
        ledger: the ledger block to sweep (the embedded file for "default"
            when no such block is saved).
        older_than_s: the age past which nobody will settle a reservation
            any more: longer than your longest max_runtime_s plus the
            approval wait.

    Returns:
        How many reservations were settled.
    """
    logger = get_run_logger()
    settled = open_ledger(ledger).sweep(
        older_than_s=older_than_s, resolve=resolve_from_prefect
    )
    for reservation in settled:
        how = "unverified, full bound" if reservation.unverified else "from its run"
        logger.warning(
            "swept %s (%s): $%s of $%s, %s",
            reservation.label,
            reservation.key,
            reservation.actual_usd,
            reservation.bound_usd,
            how,
        )

    return len(settled)


if __name__ == "__main__":
    sweep()
