"""The ledger under load: many processes, one small cap, and exact sums."""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dispatch_prefect.ledger import (
    BudgetExceeded,
    Ledger,
    ReservationKey,
    ReservationRequest,
    ReservationSettled,
)
from dispatch_prefect.policy import BudgetCap
from dispatch_prefect.policy.money import EXACT

PROCESSES = 8
ATTEMPTS = 20
RUNS = ("run-a", "run-b", "run-c")
# Three runs of $1.00 would hold $3.00; the month stops them at $2.50.
CAP = BudgetCap(run_usd=Decimal("1.00"), month_usd=Decimal("2.50"))
BUDGET = "shared"


@pytest.fixture(params=["sqlite", "postgres"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, str | None]]:
    """``(url, schema)`` of an empty ledger; a fresh schema on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/ledger.db"
        Ledger.open(url).close()
        yield url, None
        return

    pg_url: str = request.getfixturevalue("pg_url")
    schema = f"ledger_test_{uuid.uuid4().hex[:10]}"
    Ledger.open(pg_url, schema=schema).close()
    try:
        yield pg_url, schema
    finally:
        with psycopg.connect(pg_url, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def reserve_against_the_small_cap(
    url: str, schema: str | None, index: int, ready: Any
) -> dict[str, Any]:
    """One process: reserve ATTEMPTS times, reconcile every second one."""
    randomness = random.Random(index)
    committed: list[tuple[str, str]] = []
    refused = 0
    with Ledger.open(url, schema=schema, lock_timeout_s=60) as ledger:
        ready.wait(timeout=120)
        for attempt in range(ATTEMPTS):
            run_id = RUNS[attempt % len(RUNS)]
            key = ReservationKey(run_id, f"process-{index}-task-{attempt}", 1)
            bound = Decimal(randomness.choice(["0.05", "0.10", "0.15", "0.35"]))
            try:
                ledger.reserve(key, budget=BUDGET, bound_usd=bound, cap=CAP)
            except BudgetExceeded:
                refused += 1
                continue
            if attempt % 2:
                actual = bound - Decimal("0.01")
                ledger.reconcile(key, actual)
                committed.append((run_id, str(actual)))
            else:
                committed.append((run_id, str(bound)))

    return {"committed": committed, "refused": refused}


def reserve_the_same_key(
    url: str, schema: str | None, index: int, ready: Any
) -> dict[str, Any]:
    """One process: reserve the one key every process reserves."""
    with Ledger.open(url, schema=schema, lock_timeout_s=60) as ledger:
        ready.wait(timeout=120)
        made = ledger.reserve(
            ReservationKey("run-a", "the-task", 1),
            budget=BUDGET,
            bound_usd=Decimal("0.50"),
            cap=CAP,
            label=f"process-{index}",
        )

    return {"label": made.label}


def settle_the_same_key(
    url: str, schema: str | None, index: int, ready: Any
) -> dict[str, Any]:
    """One process: reconcile (even) or release (odd) the one reservation."""
    key = ReservationKey("run-a", "the-task", 1)
    with Ledger.open(url, schema=schema, lock_timeout_s=60) as ledger:
        ready.wait(timeout=120)
        try:
            if index % 2:
                settled = ledger.release(key)
            else:
                settled = ledger.reconcile(key, Decimal("0.30") + index)
        except ReservationSettled as exc:
            return {"crossed": str(exc)}

    return {"status": settled.status.value, "actual": str(settled.actual_usd)}


def in_processes(target: Any, url: str, schema: str | None) -> list[dict[str, Any]]:
    """Run ``target`` in PROCESSES spawned processes released at once."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(PROCESSES) as pool:
        ready = manager.Barrier(PROCESSES)
        pending = [
            pool.apply_async(target, (url, schema, index, ready))
            for index in range(PROCESSES)
        ]
        return [result.get(timeout=240) for result in pending]


def test_many_processes_never_commit_more_than_the_cap(
    database: tuple[str, str | None],
) -> None:
    url, schema = database

    outcomes = in_processes(reserve_against_the_small_cap, url, schema)

    committed = [entry for outcome in outcomes for entry in outcome["committed"]]
    assert committed, "nothing was admitted: the test proves nothing"
    assert sum(outcome["refused"] for outcome in outcomes) > 0
    with Ledger.open(url, schema=schema) as ledger:
        for run_id in RUNS:
            run_state, month_state = ledger.window_states(BUDGET, run_id)
            admitted_run = sum(
                (Decimal(usd) for run, usd in committed if run == run_id), Decimal(0)
            )
            assert run_state.committed() == admitted_run
            assert run_state.committed() <= CAP.run_usd
        admitted = sum((Decimal(usd) for _run, usd in committed), Decimal(0))
        assert month_state.committed() == admitted
        assert month_state.committed() <= CAP.month_usd
        assert len(ledger.reservations(BUDGET, limit=1000)) == len(committed)


def test_many_processes_reserving_one_key_reserve_it_once(
    database: tuple[str, str | None],
) -> None:
    url, schema = database

    outcomes = in_processes(reserve_the_same_key, url, schema)

    assert len({outcome["label"] for outcome in outcomes}) == 1
    with Ledger.open(url, schema=schema) as ledger:
        run_state, _month = ledger.window_states(BUDGET, "run-a")
        assert run_state.reserved_usd == Decimal("0.50")
        assert len(ledger.reservations()) == 1


def test_many_processes_settling_one_reservation_settle_it_once(
    database: tuple[str, str | None],
) -> None:
    url, schema = database
    with Ledger.open(url, schema=schema) as ledger:
        ledger.reserve(
            ReservationKey("run-a", "the-task", 1),
            budget=BUDGET,
            bound_usd=Decimal("0.50"),
            cap=CAP,
        )

    outcomes = in_processes(settle_the_same_key, url, schema)

    # One settle won; every other saw that outcome or was refused crossing it.
    settled = {(o["status"], o["actual"]) for o in outcomes if "status" in o}
    assert len(settled) == 1
    [(status, actual)] = settled
    with Ledger.open(url, schema=schema) as ledger:
        run_state, month_state = ledger.window_states(BUDGET, "run-a")
        spent = Decimal(0) if status == "released" else Decimal(actual)
        assert run_state == month_state
        assert run_state.reserved_usd == 0
        assert run_state.spent_usd == spent


def test_100000_sub_cent_amounts_sum_exactly(
    database: tuple[str, str | None],
) -> None:
    url, schema = database
    randomness = random.Random(100_000)
    amounts = [Decimal(randomness.randint(1, 99_999)) / 10**7 for _ in range(100_000)]
    expected = Decimal(0)
    for amount in amounts:
        expected = EXACT.add(expected, amount)
    roomy = BudgetCap(run_usd=Decimal(1000), month_usd=Decimal(1000))

    with Ledger.open(url, schema=schema) as ledger:
        for start in range(0, len(amounts), 10_000):
            ledger.reserve_many(
                [
                    ReservationRequest(
                        key=ReservationKey(f"run-{start}", f"task-{number}", 1),
                        budget="exact",
                        bound_usd=amounts[number],
                        cap=roomy,
                    )
                    for number in range(start, start + 10_000)
                ]
            )

        _run, month_state = ledger.window_states("exact", "run-0")
        assert month_state.reserved_usd == expected
        [month_total] = ledger.month_totals("exact")
        assert month_total.reserved_usd == expected

    assert sorted(stored_bounds(url, schema)) == sorted(amounts)


def stored_bounds(url: str, schema: str | None) -> list[Decimal]:
    """Every stored bound, read past the ledger with the bare driver."""
    query = "SELECT bound_usd FROM dispatch_ledger_reservations"
    if schema is None:
        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            return [Decimal(text) for (text,) in connection.execute(query)]

    with psycopg.connect(url, options=f"-c search_path={schema}") as connection:
        return [amount for (amount,) in connection.execute(query)]
