"""The ledger against a model of it, over random sequences of calls.

Hypothesis drives reserve, replay, reconcile, release and sweep in any
order, with amounts chosen to land on and around the caps, in two runs and
two months. After every call the ledger must agree with a plain dictionary
of reservations: each answer, every window's reserved and spent totals, and
the month totals it lists.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

from dispatch_prefect.ledger import (
    BudgetExceeded,
    Ledger,
    ReservationKey,
    ReservationSettled,
    ReservationStatus,
    UnknownReservation,
)
from dispatch_prefect.policy import BudgetCap, BudgetState, admits

CAP = BudgetCap(run_usd=Decimal("1.00"), month_usd=Decimal("1.50"))
MONTHS = {
    "2026-12": datetime(2026, 12, 31, 23, 59, tzinfo=UTC),
    "2027-01": datetime(2027, 1, 1, 0, 1, tzinfo=UTC),
}
# When the sweeper runs: after every reservation of both months.
AFTER = datetime(2027, 2, 1, tzinfo=UTC)
AMOUNTS = st.sampled_from(
    [Decimal(0), Decimal("0.25"), Decimal("0.333333"), Decimal("0.5"), Decimal(1)]
)


@dataclass(frozen=True)
class Held:
    """What the model knows of one reservation."""

    key: ReservationKey
    run: str
    month: str
    bound: Decimal
    status: ReservationStatus = ReservationStatus.RESERVED
    actual: Decimal | None = None


def test_the_ledger_agrees_with_its_model(ledger: Ledger) -> None:
    class LedgerModel(RuleBasedStateMachine):
        """One budget of its own per sequence, in the shared ledger."""

        keys = Bundle("keys")

        def __init__(self) -> None:
            super().__init__()
            self.budget = f"model-{uuid.uuid4().hex[:8]}"
            self.runs = [f"{self.budget}-run-a", f"{self.budget}-run-b"]
            self.held: dict[ReservationKey, Held] = {}
            self.tasks = 0

        def state(
            self, *, run: str | None = None, month: str | None = None
        ) -> BudgetState:
            """A run's window (all months) or a month's (all runs)."""
            reserved, spent = Decimal(0), Decimal(0)
            for held in self.held.values():
                if run not in (None, held.run) or month not in (None, held.month):
                    continue
                if held.status is ReservationStatus.RESERVED:
                    reserved += held.bound
                elif held.actual is not None:
                    spent += held.actual
            return BudgetState(reserved_usd=reserved, spent_usd=spent)

        @rule(
            target=keys,
            run=st.integers(0, 1),
            month=st.sampled_from(sorted(MONTHS)),
            bound=AMOUNTS,
        )
        def reserve(self, run: int, month: str, bound: Decimal) -> ReservationKey:
            self.tasks += 1
            key = ReservationKey(self.runs[run], f"task-{self.tasks}", 1)
            expected = admits(
                bound,
                self.state(run=self.runs[run]),
                self.state(month=month),
                CAP,
            )
            try:
                made = ledger.reserve(
                    key, budget=self.budget, bound_usd=bound, cap=CAP, at=MONTHS[month]
                )
            except BudgetExceeded as refused:
                assert not expected.admitted
                assert refused.decision.refused_window is expected.refused_window
            else:
                assert expected.admitted, expected.reason
                assert (made.bound_usd, made.month) == (bound, month)
                self.held[key] = Held(key, self.runs[run], month, bound)
            return key

        @rule(key=keys, bound=AMOUNTS)
        def replay(self, key: ReservationKey, bound: Decimal) -> None:
            held = self.held.get(key)
            if held is None:
                return  # refused the first time; a replay decides afresh
            again = ledger.reserve(
                key, budget=self.budget, bound_usd=bound, cap=CAP, at=MONTHS[held.month]
            )
            assert (again.bound_usd, again.status) == (held.bound, held.status)

        @rule(key=keys, actual=AMOUNTS)
        def reconcile(self, key: ReservationKey, actual: Decimal) -> None:
            held = self.held.get(key)
            if held is None:
                with pytest.raises(UnknownReservation):
                    ledger.reconcile(key, actual)
                return
            if held.status is ReservationStatus.RELEASED:
                with pytest.raises(ReservationSettled):
                    ledger.reconcile(key, actual)
                return
            settled = ledger.reconcile(key, actual)
            if held.status is ReservationStatus.RESERVED:
                held = self.held[key] = replace(
                    held, status=ReservationStatus.SPENT, actual=actual
                )
            assert (settled.status, settled.actual_usd) == (held.status, held.actual)
            assert settled.overrun == (
                held.actual is not None and held.actual > held.bound
            )

        @rule(key=consumes(keys))
        def release(self, key: ReservationKey) -> None:
            held = self.held.get(key)
            if held is None:
                with pytest.raises(UnknownReservation):
                    ledger.release(key)
                return
            if held.status is ReservationStatus.SPENT:
                with pytest.raises(ReservationSettled):
                    ledger.release(key)
                return
            released = ledger.release(key)
            self.held[key] = replace(held, status=ReservationStatus.RELEASED)
            assert released.status is ReservationStatus.RELEASED

        @rule(known=st.booleans())
        def sweep(self, known: bool) -> None:
            def resolve(found: object) -> Decimal | None:
                return Decimal("0.1") if known else None

            settled = ledger.sweep(older_than_s=0, resolve=resolve, now=AFTER)
            swept = {r.key: r for r in settled if r.budget == self.budget}
            for key, held in list(self.held.items()):
                if held.status is not ReservationStatus.RESERVED:
                    assert key not in swept
                    continue
                found = swept[key]
                actual = Decimal("0.1") if known else held.bound
                assert (found.actual_usd, found.unverified) == (actual, not known)
                self.held[key] = replace(
                    held, status=ReservationStatus.SPENT, actual=actual
                )

        @invariant()
        def totals_match(self) -> None:
            for month, at in MONTHS.items():
                for run in self.runs:
                    run_state, month_state = ledger.window_states(
                        self.budget, run, at=at
                    )
                    assert run_state == self.state(run=run)
                    assert month_state == self.state(month=month)
            listed = {
                total.month: BudgetState(total.reserved_usd, total.spent_usd)
                for total in ledger.month_totals(self.budget)
            }
            for month, state in listed.items():
                assert state == self.state(month=month)

    run_state_machine_as_test(
        LedgerModel,
        settings=settings(
            max_examples=60,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        ),
    )
