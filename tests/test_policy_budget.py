"""The hard dollar cap: admission over two windows and the exact cost bound."""

from __future__ import annotations

import dataclasses
import decimal
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dispatch_prefect.policy import (
    AdmissionDecision,
    BudgetCap,
    BudgetState,
    BudgetWindow,
    CostRates,
    admits,
    estimate_cost,
)

PROPERTY = settings(max_examples=200, deadline=None)

# Amounts with up to 40 significant digits and down to 1E-40: beyond what
# the default 28-digit decimal context can add or multiply without rounding.
usd = st.builds(
    lambda coefficient, exponent: Decimal(f"{coefficient}E{exponent}"),
    st.integers(0, 10**40 - 1),
    st.integers(-40, 2),
)
tiny = Decimal("1E-40")

RATES = CostRates(
    gpu_usd_per_s=Decimal("0.0008"),
    vcpu_usd_per_s=Decimal("0.00001"),
    gib_usd_per_s=Decimal("0.000002"),
    idle_tail_s=Decimal(600),
)


def state(reserved: str | int = 0, spent: str | int = 0) -> BudgetState:
    return BudgetState(reserved_usd=Decimal(reserved), spent_usd=Decimal(spent))


def cap(run: str | int, month: str | int) -> BudgetCap:
    return BudgetCap(run_usd=Decimal(run), month_usd=Decimal(month))


def committed(window: BudgetState) -> Fraction:
    return Fraction(window.reserved_usd) + Fraction(window.spent_usd)


# --- the caps, states and rates ---------------------------------------------


def test_budget_window_values_are_run_and_month() -> None:
    assert [w.value for w in BudgetWindow] == ["run", "month"]
    assert BudgetWindow("run") is BudgetWindow.RUN
    assert isinstance(BudgetWindow.MONTH, str)


def test_default_cap_is_zero_in_both_windows() -> None:
    assert BudgetCap().run_usd == 0
    assert BudgetCap().month_usd == 0


def test_for_window_returns_that_windows_cap() -> None:
    limits = cap(3, 40)

    assert limits.for_window(BudgetWindow.RUN) == 3
    assert limits.for_window(BudgetWindow.MONTH) == 40


def test_for_window_reads_a_window_given_as_its_string_value() -> None:
    """A window read back from storage as ``"run"`` means the run window."""
    limits = cap(3, 40)

    assert limits.for_window("run") == 3  # type: ignore[arg-type]
    assert limits.for_window("month") == 40  # type: ignore[arg-type]


def test_for_window_refuses_an_unknown_window() -> None:
    with pytest.raises(ValueError, match="week"):
        cap(3, 40).for_window("week")  # type: ignore[arg-type]


def test_committed_is_reserved_plus_spent() -> None:
    assert state("1.25", "0.75").committed() == Decimal("2.00")
    assert BudgetState().committed() == 0


def test_committed_is_exact_where_a_28_digit_context_would_round() -> None:
    reserved = "0.1234567890123456789012345678901234567891"
    spent = "1000000.0000000000000000000000000000000000000001"

    total = state(reserved, spent).committed()

    assert Fraction(total) == Fraction(reserved) + Fraction(spent)
    assert total == Decimal("1000000.1234567890123456789012345678901234567892")


def test_int_amounts_are_accepted_as_exact_decimals() -> None:
    limits = BudgetCap(run_usd=5, month_usd=50)  # type: ignore[arg-type]

    assert limits.run_usd == Decimal(5)
    assert isinstance(limits.run_usd, Decimal)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda v: BudgetCap(run_usd=v), "run_usd"),
        (lambda v: BudgetCap(month_usd=v), "month_usd"),
        (lambda v: BudgetState(reserved_usd=v), "reserved_usd"),
        (lambda v: BudgetState(spent_usd=v), "spent_usd"),
        (
            lambda v: CostRates(v, Decimal(0), Decimal(0)),
            "gpu_usd_per_s",
        ),
        (
            lambda v: CostRates(Decimal(0), v, Decimal(0)),
            "vcpu_usd_per_s",
        ),
        (
            lambda v: CostRates(Decimal(0), Decimal(0), v),
            "gib_usd_per_s",
        ),
        (
            lambda v: CostRates(Decimal(0), Decimal(0), Decimal(0), idle_tail_s=v),
            "idle_tail_s",
        ),
    ],
)
class TestAmountValidation:
    def test_negative_value_raises_value_error_naming_the_field(
        self, build, field
    ) -> None:
        with pytest.raises(ValueError, match=field):
            build(Decimal("-0.01"))

    @pytest.mark.parametrize("bad", ["NaN", "sNaN", "Infinity", "-Infinity"])
    def test_non_finite_value_is_rejected(self, build, field, bad) -> None:
        with pytest.raises(ValueError, match=field):
            build(Decimal(bad))

    def test_zero_is_accepted(self, build, field) -> None:
        build(Decimal(0))


@pytest.mark.parametrize(
    "build",
    [
        lambda: BudgetCap(run_usd=1.5),
        lambda: BudgetCap(month_usd=0.0),
        lambda: BudgetState(reserved_usd=0.1),
        lambda: BudgetState(spent_usd=2.0),
        lambda: CostRates(0.0008, Decimal(0), Decimal(0)),
        lambda: CostRates(Decimal(0), 0.00001, Decimal(0)),
        lambda: CostRates(Decimal(0), Decimal(0), 0.000002),
        lambda: BudgetCap(run_usd=True),
        lambda: BudgetCap(run_usd="5"),
    ],
)
def test_money_that_is_not_decimal_or_int_raises_type_error(build) -> None:
    """Money is never a float (nor a bool or a string)."""
    with pytest.raises(TypeError, match="Decimal"):
        build()


def test_idle_tail_is_a_quantity_and_may_be_a_float() -> None:
    rates = CostRates(Decimal(0), Decimal(0), Decimal(0), idle_tail_s=0.5)  # type: ignore[arg-type]

    assert rates.idle_tail_s == Decimal("0.5")


@pytest.mark.parametrize(
    "frozen",
    [BudgetCap(), BudgetState(), RATES, AdmissionDecision(True, None, "ok")],
)
def test_budget_values_are_frozen(frozen: object) -> None:
    field = dataclasses.fields(frozen)[0].name  # type: ignore[arg-type]

    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(frozen, field, Decimal(1))


# --- admission ---------------------------------------------------------------


def test_default_caps_admit_a_zero_cost_job() -> None:
    decision = admits(Decimal(0), BudgetState(), BudgetState(), BudgetCap())

    assert decision.admitted
    assert decision.refused_window is None


def test_default_caps_refuse_any_paid_job_in_the_run_window() -> None:
    decision = admits(Decimal("0.000001"), BudgetState(), BudgetState(), BudgetCap())

    assert not decision.admitted
    assert decision.refused_window is BudgetWindow.RUN
    assert "run_usd" in decision.reason


def test_admits_a_job_that_fits_both_windows() -> None:
    decision = admits(Decimal(2), state(1, 1), state(10, 5), cap(5, 20))

    assert decision == AdmissionDecision(True, None, decision.reason)
    assert decision.reason


def test_admits_when_committed_plus_estimate_equals_both_caps() -> None:
    decision = admits(Decimal(2), state(2, 1), state(15, 3), cap(5, 20))

    assert decision.admitted


def test_refuses_when_run_cap_would_be_exceeded() -> None:
    decision = admits(Decimal("2.01"), state(2, 1), BudgetState(), cap(5, 100))

    assert not decision.admitted
    assert decision.refused_window is BudgetWindow.RUN


def test_refuses_when_month_cap_is_spent() -> None:
    decision = admits(Decimal("0.01"), BudgetState(), state(0, 100), cap(5, 100))

    assert not decision.admitted
    assert decision.refused_window is BudgetWindow.MONTH
    assert "month_usd" in decision.reason


def test_refuses_on_reserved_money_as_well_as_spent() -> None:
    """A reservation counts against the cap before any money is spent."""
    decision = admits(Decimal(1), BudgetState(), state(reserved=100), cap(5, 100))

    assert decision.refused_window is BudgetWindow.MONTH


def test_names_the_run_window_when_both_windows_would_overflow() -> None:
    decision = admits(Decimal(10), state(5), state(100), cap(5, 100))

    assert decision.refused_window is BudgetWindow.RUN


def test_refuses_a_zero_cost_job_once_committed_exceeds_the_cap() -> None:
    """A window already over its cap (a cap lowered later) admits nothing."""
    decision = admits(Decimal(0), BudgetState(), state(spent=101), cap(5, 100))

    assert decision.refused_window is BudgetWindow.MONTH


def test_refusal_reason_says_what_is_committed_and_how_to_fix_it() -> None:
    decision = admits(Decimal("3.50"), state(4), BudgetState(), cap(5, 100))

    assert "$4" in decision.reason
    assert "$5" in decision.reason
    assert "$3.50" in decision.reason
    assert "raise run_usd" in decision.reason


def test_refuses_a_negative_estimate_without_naming_a_window() -> None:
    decision = admits(Decimal("-1"), BudgetState(), BudgetState(), cap(5, 100))

    assert not decision.admitted
    assert decision.refused_window is None
    assert "-1" in decision.reason


@pytest.mark.parametrize("bad", ["NaN", "Infinity"])
def test_refuses_a_non_finite_estimate(bad: str) -> None:
    decision = admits(Decimal(bad), BudgetState(), BudgetState(), cap(5, 100))

    assert not decision.admitted
    assert decision.refused_window is None


@pytest.mark.parametrize("bad", [0.5, True, "1"])
def test_admits_raises_type_error_for_an_estimate_that_is_not_decimal(
    bad: object,
) -> None:
    with pytest.raises(TypeError, match="estimate_usd"):
        admits(bad, BudgetState(), BudgetState(), cap(5, 100))  # type: ignore[arg-type]


def test_admission_is_exact_where_a_28_digit_context_would_round() -> None:
    """One part in 1E40 over the cap is still over the cap."""
    over = Decimal("1.0000000000000000000000000000000000000001")

    with decimal.localcontext() as ctx:
        ctx.prec = 28
        assert Decimal("0.5") + over <= Decimal("1.5")  # rounding would admit it

    decision = admits(over, state("0.5"), BudgetState(), cap("1.5", 10))

    assert decision.refused_window is BudgetWindow.RUN
    assert admits(Decimal(1), state("0.5"), BudgetState(), cap("1.5", 10)).admitted


def _near(target: Fraction, offset: int) -> Decimal:
    """A cap just under, at, or just over ``target``, never negative."""
    with decimal.localcontext() as ctx:
        ctx.prec = 500
        value = Decimal(target.numerator) / Decimal(target.denominator)
        value += offset * tiny

    return max(value, Decimal(0))


@st.composite
def admission_case(
    draw: st.DrawFn,
) -> tuple[Decimal, BudgetState, BudgetState, BudgetCap]:
    estimate = draw(st.one_of(usd, usd.map(lambda d: -d)))
    run_state = BudgetState(reserved_usd=draw(usd), spent_usd=draw(usd))
    month_state = BudgetState(reserved_usd=draw(usd), spent_usd=draw(usd))
    limits = []
    for window in (run_state, month_state):
        needed = committed(window) + Fraction(estimate)
        near = st.integers(-1, 1).map(lambda offset, n=needed: _near(n, offset))
        limits.append(draw(st.one_of(usd, near)))

    return estimate, run_state, month_state, BudgetCap(*limits)


@PROPERTY
@given(admission_case())
def test_no_admission_lets_committed_plus_estimate_exceed_a_cap(
    case: tuple[Decimal, BudgetState, BudgetState, BudgetCap],
) -> None:
    """Admitted means both windows hold; refused names the first that fails."""
    estimate, run_state, month_state, limits = case
    decision = admits(estimate, run_state, month_state, limits)

    spend = Fraction(estimate)
    run_ok = committed(run_state) + spend <= Fraction(limits.run_usd)
    month_ok = committed(month_state) + spend <= Fraction(limits.month_usd)
    if decision.admitted:
        assert estimate >= 0
        assert run_ok
        assert month_ok
        assert decision.refused_window is None
    elif estimate < 0:
        assert decision.refused_window is None
    elif not run_ok:
        assert decision.refused_window is BudgetWindow.RUN
    else:
        assert not month_ok
        assert decision.refused_window is BudgetWindow.MONTH

    if estimate >= 0 and run_ok and month_ok:
        assert decision.admitted


# --- the cost bound ----------------------------------------------------------


def test_estimate_cost_follows_the_formula() -> None:
    """(3600 + 600) s at 0.0008 + 8 * 0.00001 + 32 * 0.000002 USD/s."""
    cost = estimate_cost(RATES, max_runtime_s=3600, vcpus=8, memory_gib=32)

    assert cost == Decimal("4200") * Decimal("0.000944")
    assert cost == Decimal("3.9648")


def test_estimate_cost_bills_the_idle_tail_even_for_zero_runtime() -> None:
    cost = estimate_cost(RATES, max_runtime_s=0, vcpus=0, memory_gib=0)

    assert cost == Decimal("0.48")


def test_estimate_cost_reads_float_quantities_by_their_decimal_form() -> None:
    """``memory_gib=0.1`` means 0.1 GiB, not the nearest binary float."""
    rates = CostRates(Decimal(0), Decimal(0), Decimal(1))

    cost = estimate_cost(rates, max_runtime_s=1, vcpus=0, memory_gib=0.1)

    assert cost == Decimal("0.1")


@pytest.mark.parametrize("field", ["max_runtime_s", "vcpus", "memory_gib"])
@pytest.mark.parametrize(
    "bad", [-1, Decimal("-0.5"), -0.5, float("nan"), float("inf"), Decimal("NaN")]
)
def test_estimate_cost_rejects_negative_or_non_finite_inputs(
    field: str, bad: object
) -> None:
    inputs: dict[str, object] = {"max_runtime_s": 1, "vcpus": 1, "memory_gib": 1}
    inputs[field] = bad

    with pytest.raises(ValueError, match=field):
        estimate_cost(RATES, **inputs)  # type: ignore[arg-type]


def test_estimate_cost_rejects_a_quantity_that_is_not_a_number() -> None:
    with pytest.raises(TypeError, match="vcpus"):
        estimate_cost(RATES, max_runtime_s=1, vcpus="8", memory_gib=1)  # type: ignore[arg-type]


def test_estimate_cost_is_exact_where_a_28_digit_context_would_round() -> None:
    rates = CostRates(
        gpu_usd_per_s=Decimal("0.000812345678901234567890123456789"),
        vcpu_usd_per_s=Decimal("0.0000109876543210987654321098765"),
        gib_usd_per_s=Decimal("0.00000212345678901234567890123"),
        idle_tail_s=Decimal("600.000000000000000000000000001"),
    )
    inputs = {
        "max_runtime_s": Decimal("3600.123456789012345678901234567"),
        "vcpus": Decimal(8),
        "memory_gib": Decimal("31.99999999999999999999999999999"),
    }
    exact = _formula(rates, **inputs)

    with decimal.localcontext() as ctx:
        ctx.prec = 28
        rounded = (inputs["max_runtime_s"] + rates.idle_tail_s) * (
            rates.gpu_usd_per_s
            + rates.vcpu_usd_per_s * inputs["vcpus"]
            + rates.gib_usd_per_s * inputs["memory_gib"]
        )
    assert Fraction(rounded) != exact

    assert Fraction(estimate_cost(rates, **inputs)) == exact


def _quantity(value: Decimal | int | float) -> Fraction:
    if isinstance(value, float):
        return Fraction(Decimal(repr(value)))

    return Fraction(value)


def _formula(
    rates: CostRates,
    *,
    max_runtime_s: Decimal | int | float,
    vcpus: Decimal | int | float,
    memory_gib: Decimal | int | float,
) -> Fraction:
    per_second = (
        Fraction(rates.gpu_usd_per_s)
        + Fraction(rates.vcpu_usd_per_s) * _quantity(vcpus)
        + Fraction(rates.gib_usd_per_s) * _quantity(memory_gib)
    )

    return (_quantity(max_runtime_s) + Fraction(rates.idle_tail_s)) * per_second


quantity = st.one_of(
    usd,
    st.integers(0, 10**6),
    st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
)
rates_strategy = st.builds(CostRates, usd, usd, usd, quantity)


@PROPERTY
@given(rates_strategy, quantity, quantity, quantity)
@example(RATES, 3600, 8, 32)
def test_estimate_cost_is_exact(
    rates: CostRates,
    runtime: Decimal | int | float,
    vcpus: Decimal | int | float,
    memory: Decimal | int | float,
) -> None:
    cost = estimate_cost(rates, max_runtime_s=runtime, vcpus=vcpus, memory_gib=memory)

    assert isinstance(cost, Decimal)
    assert Fraction(cost) == _formula(
        rates, max_runtime_s=runtime, vcpus=vcpus, memory_gib=memory
    )


COST_INPUTS = (
    "gpu_usd_per_s",
    "vcpu_usd_per_s",
    "gib_usd_per_s",
    "idle_tail_s",
    "max_runtime_s",
    "vcpus",
    "memory_gib",
)


@PROPERTY
@given(
    rates_strategy,
    st.fixed_dictionaries({"max_runtime_s": usd, "vcpus": usd, "memory_gib": usd}),
    st.sampled_from(COST_INPUTS),
    usd,
)
def test_estimate_cost_never_falls_when_an_input_grows(
    rates: CostRates,
    inputs: dict[str, Decimal],
    grown: str,
    increase: Decimal,
) -> None:
    before = estimate_cost(rates, **inputs)

    with decimal.localcontext() as ctx:
        ctx.prec = 200
        if grown in inputs:
            inputs = {**inputs, grown: inputs[grown] + increase}
        else:
            bigger = getattr(rates, grown) + increase
            rates = dataclasses.replace(rates, **{grown: bigger})
    after = estimate_cost(rates, **inputs)

    assert after >= before
