"""Behaviour of the budget ledger on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import pickle
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from conftest import ledger_in_a_fresh_schema
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dispatch_prefect.ledger import (
    SCHEMA_VERSION,
    BudgetExceeded,
    Ledger,
    LedgerError,
    LedgerInputError,
    LedgerUnavailable,
    ReservationKey,
    ReservationSettled,
    ReservationStatus,
    UnknownReservation,
)
from dispatch_prefect.policy import (
    AdmissionDecision,
    BudgetCap,
    BudgetState,
    BudgetWindow,
    admits,
)

CAP = BudgetCap(run_usd=Decimal("1.00"), month_usd=Decimal("10.00"))
BUDGET = "team"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/ledger.db"


def key(
    task: str = "task-1", *, run: str = "run-1", attempt: int = 1
) -> ReservationKey:
    return ReservationKey(root_run_id=run, task_run_id=task, attempt=attempt)


def reserve(
    ledger: Ledger, bound: str, task: str = "task-1", *, run: str = "run-1"
) -> object:
    return ledger.reserve(
        key(task, run=run), budget=BUDGET, bound_usd=Decimal(bound), cap=CAP
    )


def test_reserve_then_reconcile_moves_the_bound_to_the_actual_cost(
    ledger: Ledger,
) -> None:
    made = ledger.reserve(
        key(), budget=BUDGET, bound_usd=Decimal("0.40"), cap=CAP, label="render"
    )

    assert made.status is ReservationStatus.RESERVED
    assert made.bound_usd == Decimal("0.40")
    assert made.actual_usd is None
    assert made.label == "render"
    assert ledger.window_states(BUDGET, "run-1") == (
        BudgetState(reserved_usd=Decimal("0.40")),
        BudgetState(reserved_usd=Decimal("0.40")),
    )

    spent = ledger.reconcile(key(), Decimal("0.31"))

    assert spent.status is ReservationStatus.SPENT
    assert spent.actual_usd == Decimal("0.31")
    assert not spent.overrun
    assert spent.settled_at is not None
    assert ledger.window_states(BUDGET, "run-1") == (
        BudgetState(spent_usd=Decimal("0.31")),
        BudgetState(spent_usd=Decimal("0.31")),
    )
    assert ledger.reservation(key()) == spent


def test_the_same_key_returns_the_existing_reservation_and_reserves_once(
    ledger: Ledger,
) -> None:
    first = reserve(ledger, "0.40")
    again = ledger.reserve(key(), budget=BUDGET, bound_usd=Decimal("0.90"), cap=CAP)

    assert again == first
    run_state, _month = ledger.window_states(BUDGET, "run-1")
    assert run_state.reserved_usd == Decimal("0.40")


def test_a_replay_is_not_refused_once_the_cap_is_full(ledger: Ledger) -> None:
    """The attempt that filled the cap finds its reservation, not a refusal."""
    first = reserve(ledger, "1.00")

    assert reserve(ledger, "1.00") == first


def test_refuses_when_the_run_cap_would_be_exceeded_and_writes_nothing(
    ledger: Ledger,
) -> None:
    reserve(ledger, "0.70", "task-1")

    with pytest.raises(BudgetExceeded) as refused:
        reserve(ledger, "0.40", "task-2")

    assert refused.value.decision.refused_window is BudgetWindow.RUN
    message = str(refused.value)
    for part in ("run window", "$0.70", "$1.00", "$0.40", "run_usd"):
        assert part in message
    with pytest.raises(UnknownReservation):
        ledger.reservation(key("task-2"))
    assert ledger.window_states(BUDGET, "run-1")[0].reserved_usd == Decimal("0.70")


def test_refuses_when_the_month_cap_is_spent_and_says_when_it_reopens(
    ledger: Ledger,
) -> None:
    cap = BudgetCap(run_usd=Decimal(100), month_usd=Decimal("2.00"))
    at = datetime(2026, 12, 15, tzinfo=UTC)
    ledger.reserve(
        key(run="run-a"), budget=BUDGET, bound_usd=Decimal("2.00"), cap=cap, at=at
    )

    with pytest.raises(BudgetExceeded) as refused:
        ledger.reserve(
            key(run="run-b"), budget=BUDGET, bound_usd=Decimal("0.01"), cap=cap, at=at
        )

    assert refused.value.decision.refused_window is BudgetWindow.MONTH
    assert "month_usd" in str(refused.value)
    assert "2027-01-01" in str(refused.value)


def test_default_caps_admit_only_zero_cost_work(ledger: Ledger) -> None:
    closed = BudgetCap()

    ledger.reserve(key("free"), budget=BUDGET, bound_usd=Decimal(0), cap=closed)
    with pytest.raises(BudgetExceeded):
        ledger.reserve(
            key("paid"), budget=BUDGET, bound_usd=Decimal("0.01"), cap=closed
        )


def test_check_decides_like_reserve_and_writes_nothing(ledger: Ledger) -> None:
    reserve(ledger, "0.70")

    assert ledger.check(BUDGET, "run-1", Decimal("0.30"), CAP).admitted
    refused = ledger.check(BUDGET, "run-1", Decimal("0.31"), CAP)
    assert not refused.admitted
    assert refused.refused_window is BudgetWindow.RUN
    assert ledger.check(BUDGET, "run-2", Decimal("0.31"), CAP).admitted
    assert len(ledger.reservations()) == 1


_AMOUNTS = st.decimals(min_value=0, max_value=1000, places=6)
# How far each cap sits from exactly fitting the bound: 0 is the edge.
_SLACK = st.sampled_from([Decimal(0), Decimal("0.000001"), Decimal("-0.000001")]) | (
    st.decimals(min_value=-50, max_value=50, places=6)
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    spent=_AMOUNTS,
    held=_AMOUNTS,
    elsewhere=_AMOUNTS,
    bound=_AMOUNTS,
    run_slack=_SLACK,
    month_slack=_SLACK,
)
@example(  # both windows exactly full after the bound: admitted
    spent=Decimal("0.3"),
    held=Decimal("0.2"),
    elsewhere=Decimal(1),
    bound=Decimal("0.5"),
    run_slack=Decimal(0),
    month_slack=Decimal(0),
)
def test_a_reservation_is_made_exactly_when_admits_says_so(
    ledger: Ledger,
    spent: Decimal,
    held: Decimal,
    elsewhere: Decimal,
    bound: Decimal,
    run_slack: Decimal,
    month_slack: Decimal,
) -> None:
    """Whatever the database decides under its locks is the rule's decision.

    The run window holds money spent and money reserved; the month holds
    them and another run's reservation. The caps sit at, just past or far
    from the edge for the bound.
    """
    budget = f"edge-{uuid.uuid4().hex[:8]}"
    run, other = f"{budget}-run", f"{budget}-other"
    open_cap = BudgetCap(run_usd=Decimal(10**9), month_usd=Decimal(10**9))
    made = ledger.reserve(
        key("spent", run=run), budget=budget, bound_usd=spent, cap=open_cap
    )
    ledger.reconcile(made.key, spent)
    ledger.reserve(key("held", run=run), budget=budget, bound_usd=held, cap=open_cap)
    ledger.reserve(
        key("other", run=other), budget=budget, bound_usd=elsewhere, cap=open_cap
    )
    run_state, month_state = ledger.window_states(budget, run)
    cap = BudgetCap(
        run_usd=max(run_state.committed() + bound + run_slack, Decimal(0)),
        month_usd=max(month_state.committed() + bound + month_slack, Decimal(0)),
    )
    expected = admits(bound, run_state, month_state, cap)

    try:
        ledger.reserve(key("new", run=run), budget=budget, bound_usd=bound, cap=cap)
    except BudgetExceeded as refused:
        assert not expected.admitted
        assert refused.decision.refused_window is expected.refused_window
    else:
        assert expected.admitted
    run_after, month_after = ledger.window_states(budget, run)
    added = bound if expected.admitted else Decimal(0)
    assert run_after.committed() == run_state.committed() + added
    assert month_after.committed() == month_state.committed() + added


def test_a_changed_cap_takes_effect_at_the_next_call(ledger: Ledger) -> None:
    reserve(ledger, "0.90")
    raised = BudgetCap(run_usd=Decimal("2.00"), month_usd=Decimal("10.00"))

    assert not ledger.check(BUDGET, "run-1", Decimal("0.50"), CAP).admitted
    ledger.reserve(key("task-2"), budget=BUDGET, bound_usd=Decimal("0.50"), cap=raised)


def test_budgets_keep_separate_totals(ledger: Ledger) -> None:
    ledger.reserve(key("a"), budget="alpha", bound_usd=Decimal("0.90"), cap=CAP)
    ledger.reserve(key("b"), budget="beta", bound_usd=Decimal("0.90"), cap=CAP)

    assert ledger.window_states("alpha", "run-1")[0].reserved_usd == Decimal("0.90")
    assert ledger.window_states("beta", "run-1")[0].reserved_usd == Decimal("0.90")
    assert [total.budget for total in ledger.month_totals()] == ["alpha", "beta"]


def test_reconcile_is_idempotent(ledger: Ledger) -> None:
    reserve(ledger, "0.40")
    first = ledger.reconcile(key(), Decimal("0.20"))

    assert ledger.reconcile(key(), Decimal("0.20")) == first
    assert ledger.reconcile(key(), Decimal("0.35")) == first
    assert ledger.window_states(BUDGET, "run-1")[0].spent_usd == Decimal("0.20")


def test_an_actual_above_the_bound_is_recorded_as_is_and_flagged(
    ledger: Ledger,
) -> None:
    reserve(ledger, "0.40")

    spent = ledger.reconcile(key(), Decimal("0.55"))

    assert spent.overrun
    assert spent.actual_usd == Decimal("0.55")
    assert ledger.window_states(BUDGET, "run-1")[0] == BudgetState(
        spent_usd=Decimal("0.55")
    )


def test_release_gives_the_reservation_back(ledger: Ledger) -> None:
    reserve(ledger, "0.80")

    released = ledger.release(key())

    assert released.status is ReservationStatus.RELEASED
    assert released.actual_usd is None
    assert ledger.release(key()) == released
    assert ledger.window_states(BUDGET, "run-1")[0] == BudgetState()
    reserve(ledger, "0.90", "task-2")


def test_released_and_spent_reservations_cannot_cross_over(ledger: Ledger) -> None:
    reserve(ledger, "0.10", "gone")
    reserve(ledger, "0.10", "done")
    ledger.release(key("gone"))
    ledger.reconcile(key("done"), Decimal("0.10"))

    with pytest.raises(ReservationSettled, match="released"):
        ledger.reconcile(key("gone"), Decimal("0.10"))
    with pytest.raises(ReservationSettled, match="already spent"):
        ledger.release(key("done"))


def test_reconciling_an_unknown_key_is_a_clear_error(ledger: Ledger) -> None:
    with pytest.raises(UnknownReservation, match="task-9") as unknown:
        ledger.reconcile(key("task-9"), Decimal("0.10"))

    assert "reserve it first" in str(unknown.value)
    assert ledger.reservations() == []
    with pytest.raises(UnknownReservation):
        ledger.release(key("task-9"))


def test_sweep_settles_stale_reservations_through_the_resolver(
    ledger: Ledger,
) -> None:
    now = datetime(2026, 12, 10, 12, tzinfo=UTC)
    for task, age_h in (("known", 5), ("lost", 4), ("young", 0.5), ("done", 6)):
        ledger.reserve(
            key(task),
            budget=BUDGET,
            bound_usd=Decimal("0.20"),
            cap=CAP,
            at=now - timedelta(hours=age_h),
        )
    ledger.reconcile(key("done"), Decimal("0.05"))
    asked: list[str] = []

    def resolve(reservation: object) -> Decimal | None:
        task = reservation.key.task_run_id  # type: ignore[attr-defined]
        asked.append(task)
        return Decimal("0.12") if task == "known" else None

    swept = ledger.sweep(older_than_s=3600, resolve=resolve, now=now)

    assert asked == ["known", "lost"]
    by_task = {reservation.key.task_run_id: reservation for reservation in swept}
    assert by_task["known"].actual_usd == Decimal("0.12")
    assert by_task["known"].swept and not by_task["known"].unverified
    assert by_task["lost"].actual_usd == Decimal("0.20")
    assert by_task["lost"].swept and by_task["lost"].unverified
    assert ledger.reservation(key("young")).status is ReservationStatus.RESERVED
    assert ledger.window_states(BUDGET, "run-1", at=now)[0] == BudgetState(
        reserved_usd=Decimal("0.20"), spent_usd=Decimal("0.37")
    )
    assert ledger.sweep(older_than_s=3600, resolve=resolve, now=now) == []


def test_the_month_is_taken_in_the_budget_time_zone_and_kept(ledger: Ledger) -> None:
    """23:30 UTC on New Year's Eve is January in Berlin, and stays there."""
    at = datetime(2026, 12, 31, 23, 30, tzinfo=UTC)
    made = ledger.reserve(
        key(),
        budget=BUDGET,
        bound_usd=Decimal("0.50"),
        cap=CAP,
        time_zone="Europe/Berlin",
        at=at,
    )
    in_utc = ledger.reserve(
        key("task-2"), budget=BUDGET, bound_usd=Decimal("0.25"), cap=CAP, at=at
    )

    ledger.reconcile(key(), Decimal("0.40"), at=at + timedelta(days=40))
    ledger.reconcile(key("task-2"), Decimal("0.20"), at=at + timedelta(days=40))

    assert made.month == "2027-01"
    assert in_utc.month == "2026-12"
    totals = {total.month: total for total in ledger.month_totals(BUDGET)}
    assert totals["2027-01"].spent_usd == Decimal("0.40")
    assert totals["2026-12"].spent_usd == Decimal("0.20")
    assert "2027-02" not in totals


def test_reservations_are_listed_newest_first_and_filtered(ledger: Ledger) -> None:
    start = datetime(2026, 11, 30, tzinfo=UTC)
    for number in range(4):
        ledger.reserve(
            key(f"task-{number}", run=f"run-{number % 2}"),
            budget=BUDGET,
            bound_usd=Decimal("0.10"),
            cap=CAP,
            at=start + timedelta(days=number),
        )
    ledger.reconcile(key("task-3", run="run-1"), Decimal("0.10"))

    listed = ledger.reservations(BUDGET)
    assert [r.key.task_run_id for r in listed] == [
        "task-3",
        "task-2",
        "task-1",
        "task-0",
    ]
    assert len(ledger.reservations(run_id="run-0")) == 2
    assert [r.key.task_run_id for r in ledger.reservations(month="2026-11")] == [
        "task-0"
    ]
    spent = ledger.reservations(status=ReservationStatus.SPENT)
    assert [r.key.task_run_id for r in spent] == ["task-3"]
    assert len(ledger.reservations(limit=1)) == 1
    assert ledger.reservations("other") == []


@pytest.mark.parametrize(
    ("amount", "named"),
    [
        (Decimal("-0.01"), "-0.01"),
        (Decimal("NaN"), "NaN"),
        (Decimal("Infinity"), "Infinity"),
        (0.1, "0.1"),
        (1, "int"),
        ("0.10", "str"),
        (Decimal("1e-31"), "decimal places"),
        (Decimal("1e15"), "beyond"),
    ],
)
def test_a_bad_amount_is_refused_before_anything_is_written(
    ledger: Ledger, amount: object, named: str
) -> None:
    with pytest.raises(LedgerInputError, match=named) as bad:
        ledger.reserve(key(), budget=BUDGET, bound_usd=amount, cap=CAP)  # type: ignore[arg-type]

    assert isinstance(bad.value, ValueError)
    assert ledger.reservations() == []
    with pytest.raises(LedgerInputError):
        ledger.check(BUDGET, "run-1", amount, CAP)  # type: ignore[arg-type]
    reserve(ledger, "0.10")
    with pytest.raises(LedgerInputError, match="actual_usd"):
        ledger.reconcile(key(), amount)  # type: ignore[arg-type]
    assert ledger.reservation(key()).status is ReservationStatus.RESERVED


@pytest.mark.parametrize(
    ("parts", "named"),
    [
        (("", "task", 1), "root_run_id"),
        (("run", " ", 1), "task_run_id"),
        (("run", "task", -1), "attempt"),
        (("run", "task", True), "attempt"),
        ((" run", "task", 1), "spaces"),
    ],
)
def test_an_empty_or_malformed_key_is_refused(
    parts: tuple[object, object, object], named: str
) -> None:
    with pytest.raises(LedgerInputError, match=named):
        ReservationKey(*parts)  # type: ignore[arg-type]


def test_other_bad_arguments_name_the_value_and_the_fix(ledger: Ledger) -> None:
    with pytest.raises(LedgerInputError, match="Mars/Olympus"):
        ledger.reserve(
            key(),
            budget=BUDGET,
            bound_usd=Decimal(1),
            cap=CAP,
            time_zone="Mars/Olympus",
        )
    with pytest.raises(LedgerInputError, match="no time zone"):
        ledger.reserve(
            key(), budget=BUDGET, bound_usd=Decimal(1), cap=CAP, at=datetime(2026, 1, 1)
        )
    with pytest.raises(LedgerInputError, match="budget"):
        ledger.reserve(key(), budget="", bound_usd=Decimal(1), cap=CAP)
    with pytest.raises(LedgerInputError, match="BudgetCap"):
        ledger.reserve(key(), budget=BUDGET, bound_usd=Decimal(1), cap=10)  # type: ignore[arg-type]
    with pytest.raises(LedgerInputError, match="YYYY-MM"):
        ledger.reservations(month="2026-1")
    with pytest.raises(LedgerInputError, match="older_than_s"):
        ledger.sweep(older_than_s=-1, resolve=lambda _reservation: None)
    assert ledger.reservations() == []


def test_a_refusal_keeps_its_decision_across_processes() -> None:
    decision = AdmissionDecision(
        admitted=False, refused_window=BudgetWindow.RUN, reason="no room"
    )
    refused = BudgetExceeded("budget 'team' has no room", decision)

    copied = pickle.loads(pickle.dumps(refused))

    assert str(copied) == "budget 'team' has no room"
    assert copied.decision == decision


def test_sqlite_stores_money_as_exact_text(sqlite_url: str, tmp_path: Path) -> None:
    amount = Decimal("0.000000037500000001")
    with Ledger.open(sqlite_url) as ledger:
        ledger.reserve(key(), budget=BUDGET, bound_usd=amount, cap=CAP)
        assert ledger.reservation(key()).bound_usd == amount

    with sqlite3.connect(tmp_path / "ledger.db") as connection:
        stored = connection.execute(
            "SELECT bound_usd, typeof(bound_usd) FROM dispatch_ledger_reservations"
        ).fetchone()
    assert stored == ("0.000000037500000001", "text")


def test_sqlite_runs_in_wal_mode_with_full_synchronous_commits(
    sqlite_url: str,
) -> None:
    with Ledger.open(sqlite_url) as ledger:
        reserve(ledger, "0.10")
        # The engine is private; the settings it gives every connection are
        # what this test is about.
        with ledger._engine.connect() as connection:
            journal = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
            synchronous = connection.exec_driver_sql("PRAGMA synchronous").scalar()

    assert journal == "wal"
    assert synchronous == 2  # FULL


def test_the_default_ledger_lives_under_prefect_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_HOME, temporary_settings

    monkeypatch.delenv("DISPATCH_PREFECT_LEDGER_URL", raising=False)
    # Prefect's settings, not the raw environment: they may be loaded already
    # and a profile may set the home too.
    with (
        temporary_settings(updates={PREFECT_HOME: tmp_path / "home"}),
        Ledger.open() as ledger,
    ):
        reserve(ledger, "0.10")

    assert (tmp_path / "home" / "dispatch_prefect" / "ledger.db").is_file()


def test_the_schema_is_versioned_and_a_newer_one_is_refused(
    sqlite_url: str,
) -> None:
    Ledger.open(sqlite_url).close()
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as connection:
        version = connection.exec_driver_sql(
            "SELECT version FROM dispatch_ledger_schema"
        ).scalar()
        assert version == SCHEMA_VERSION
        connection.exec_driver_sql(
            f"UPDATE dispatch_ledger_schema SET version = {SCHEMA_VERSION + 1}"
        )
    engine.dispose()

    with pytest.raises(LedgerError, match="upgrade dispatch-prefect"):
        Ledger.open(sqlite_url)


def test_urls_other_than_sqlite_files_and_postgresql_are_refused() -> None:
    with pytest.raises(LedgerInputError, match="in-memory"):
        Ledger.open("sqlite://")
    with pytest.raises(LedgerInputError, match="mysql"):
        Ledger.open("mysql://db/ledger")


def test_a_locked_sqlite_database_fails_closed(sqlite_url: str, tmp_path: Path) -> None:
    with Ledger.open(sqlite_url, lock_timeout_s=0.3) as ledger:
        holder = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(LedgerUnavailable, match="locked"):
                reserve(ledger, "0.10")
        finally:
            holder.execute("ROLLBACK")
            holder.close()

        assert ledger.reservations() == []
        reserve(ledger, "0.10")


def test_an_unreachable_postgresql_fails_closed() -> None:
    with pytest.raises(LedgerUnavailable, match="cannot be used right now"):
        Ledger.open("postgresql://postgres@127.0.0.1:1/test", lock_timeout_s=1)


@pytest.mark.postgres
def test_postgresql_urls_use_psycopg_and_a_held_lock_fails_closed(
    pg_url: str,
) -> None:
    schema = f"ledger_test_{uuid.uuid4().hex[:10]}"
    try:
        with Ledger.open(pg_url, schema=schema, lock_timeout_s=0.5) as ledger:
            assert ledger.url.startswith("postgresql+psycopg://")
            reserve(ledger, "0.10")
            month = ledger.reservation(key()).month
            with psycopg.connect(pg_url) as holder:
                holder.execute(
                    f"SELECT * FROM {schema}.dispatch_ledger_totals "
                    "WHERE window_kind = 'month' AND window_id = %s FOR UPDATE",
                    (month,),
                )
                with pytest.raises(LedgerUnavailable):
                    reserve(ledger, "0.10", "task-2")
            assert len(ledger.reservations()) == 1
    finally:
        with psycopg.connect(pg_url, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def pg_ledger(pg_url: str) -> Iterator[Ledger]:
    with ledger_in_a_fresh_schema(pg_url) as opened:
        yield opened


def _reserves_and_reconciles_after_task_1(ledger: Ledger) -> None:
    """A second reservation goes through, and the totals count both."""
    reserve(ledger, "0.10", "task-2")
    ledger.reconcile(key("task-2"), Decimal("0.05"))

    assert ledger.window_states(BUDGET, "run-1")[0].committed() == Decimal("0.15")


def test_postgresql_reserves_keep_working_after_listings_and_refusals(
    pg_ledger: Ledger,
) -> None:
    """A long-lived gate lists its windows often and meets refusals.

    Left to itself, psycopg prepares a query run five times and answers
    every ROLLBACK with DEALLOCATE ALL, which took the ledger's own prepared
    statements with it: every reserve after that failed.
    """
    reserve(pg_ledger, "0.10", "task-1")
    for _listing in range(6):
        pg_ledger.window_states(BUDGET, "run-1")
    with pytest.raises(BudgetExceeded):
        reserve(pg_ledger, "5.00", "too-much")  # rolled back

    _reserves_and_reconciles_after_task_1(pg_ledger)


def test_postgresql_statements_dropped_on_the_connection_are_prepared_again(
    pg_ledger: Ledger,
) -> None:
    reserve(pg_ledger, "0.10", "task-1")
    # A pooler or an administrator may reset sessions behind the ledger.
    with pg_ledger._engine.connect() as connection:
        connection.exec_driver_sql("DEALLOCATE ALL")

    _reserves_and_reconciles_after_task_1(pg_ledger)


def test_a_postgresql_connection_dropped_between_calls_is_replaced(
    pg_ledger: Ledger, pg_url: str
) -> None:
    """A server restart or a firewall ends idle sessions; the next call reconnects."""
    reserve(pg_ledger, "0.10", "task-1")
    with pg_ledger._engine.connect() as pooled:
        backend = pooled.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend,))

    _reserves_and_reconciles_after_task_1(pg_ledger)


def test_a_writer_stuck_in_its_turn_fails_closed(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Ledger writers queue on a lock file; a held turn times out, not hangs."""
    import fcntl

    with Ledger.open(sqlite_url, lock_timeout_s=0.3) as ledger:
        with open(tmp_path / "ledger.db.lock", "a+b") as turn:
            fcntl.flock(turn, fcntl.LOCK_EX)
            with pytest.raises(LedgerUnavailable, match="another ledger writer"):
                reserve(ledger, "0.10")
            assert ledger.check(BUDGET, "run-1", Decimal("0.10"), CAP).admitted

        reserve(ledger, "0.10")
        assert len(ledger.reservations()) == 1


def _open_files(path: Path) -> int:
    """How many file descriptors of this process point at ``path``."""
    target = str(path.resolve())
    count = 0
    for entry in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(entry) == target

    return count


@pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc"
)
def test_threads_that_end_do_not_leave_their_sqlite_connections_open(
    tmp_path: Path,
) -> None:
    # A long-lived process runs each flow run's tasks on new threads.
    database = tmp_path / "ledger.db"
    cap = BudgetCap(run_usd=Decimal(100), month_usd=Decimal(100))
    with Ledger.open(f"sqlite:///{database}") as ledger:

        def one_task(number: int) -> None:
            task = key(f"task-{number}")
            ledger.reserve(task, budget=BUDGET, bound_usd=Decimal("0.10"), cap=cap)
            ledger.reconcile(task, Decimal("0.05"))

        for number in range(30):
            thread = threading.Thread(target=one_task, args=(number,))
            thread.start()
            thread.join()
            assert _open_files(database) == 0  # closed as its thread ended

        assert ledger.window_states(BUDGET, "run-1")[0] == BudgetState(
            spent_usd=Decimal("1.50")
        )
    assert _open_files(database) == 0
