"""Token pricing for paid LLM and SDK calls: an exact bound and an exact cost."""

from __future__ import annotations

import dataclasses
import decimal
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch_prefect.policy import TokenRates, estimate_token_cost, token_cost

PROPERTY = settings(max_examples=200, deadline=None)
MILLION = 10**6

# USD per million tokens with up to 40 significant digits.
usd_per_mtok = st.builds(
    lambda coefficient, exponent: Decimal(f"{coefficient}E{exponent}"),
    st.integers(0, 10**40 - 1),
    st.integers(-40, 2),
)
tokens = st.integers(0, 10**9)

GEMINI = TokenRates(
    input_usd_per_mtok=Decimal("1.25"),
    output_usd_per_mtok=Decimal("10"),
    cached_input_usd_per_mtok=Decimal("0.3125"),
)
NO_CACHE_PRICE = TokenRates(Decimal("3"), Decimal("15"))


def test_cached_rate_is_optional() -> None:
    assert NO_CACHE_PRICE.cached_input_usd_per_mtok is None


@pytest.mark.parametrize(
    "field",
    ["input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok"],
)
class TestRateValidation:
    def _build(self, field: str, value: object) -> TokenRates:
        values: dict[str, object] = {
            "input_usd_per_mtok": Decimal(1),
            "output_usd_per_mtok": Decimal(1),
            field: value,
        }
        return TokenRates(**values)  # type: ignore[arg-type]

    def test_negative_rate_raises_value_error_naming_it(self, field: str) -> None:
        with pytest.raises(ValueError, match=field):
            self._build(field, Decimal("-0.01"))

    @pytest.mark.parametrize("bad", ["NaN", "Infinity"])
    def test_non_finite_rate_is_rejected(self, field: str, bad: str) -> None:
        with pytest.raises(ValueError, match=field):
            self._build(field, Decimal(bad))

    def test_float_rate_raises_type_error(self, field: str) -> None:
        with pytest.raises(TypeError, match=field):
            self._build(field, 1.25)


def test_token_rates_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        GEMINI.input_usd_per_mtok = Decimal(0)  # type: ignore[misc]


# --- the bound ---------------------------------------------------------------


def test_estimate_prices_input_and_all_allowed_output() -> None:
    """200k input at $1.25/M plus 8k output at $10/M."""
    cost = estimate_token_cost(GEMINI, input_tokens=200_000, max_output_tokens=8_000)

    assert cost == Decimal("0.25") + Decimal("0.08")


def test_estimate_of_an_empty_call_is_zero() -> None:
    assert estimate_token_cost(GEMINI, input_tokens=0, max_output_tokens=0) == 0


@pytest.mark.parametrize("field", ["input_tokens", "max_output_tokens"])
def test_estimate_rejects_a_negative_token_count(field: str) -> None:
    counts = {"input_tokens": 10, "max_output_tokens": 10, field: -1}

    with pytest.raises(ValueError, match=field):
        estimate_token_cost(GEMINI, **counts)


@pytest.mark.parametrize("bad", [10.0, True, "10", Decimal(10)])
def test_estimate_rejects_token_counts_that_are_not_ints(bad: object) -> None:
    with pytest.raises(TypeError, match="input_tokens"):
        estimate_token_cost(GEMINI, input_tokens=bad, max_output_tokens=1)  # type: ignore[arg-type]


def test_estimate_is_exact_where_a_28_digit_context_would_round() -> None:
    rates = TokenRates(
        Decimal("1.234567890123456789012345678901234567"),
        Decimal("9.876543210987654321098765432109876543"),
    )
    exact = (
        Fraction(123_456_789) * Fraction(rates.input_usd_per_mtok)
        + Fraction(987_654) * Fraction(rates.output_usd_per_mtok)
    ) / MILLION

    with decimal.localcontext() as ctx:
        ctx.prec = 28
        rounded = (
            123_456_789 * rates.input_usd_per_mtok + 987_654 * rates.output_usd_per_mtok
        ) / MILLION
    assert Fraction(rounded) != exact

    cost = estimate_token_cost(
        rates, input_tokens=123_456_789, max_output_tokens=987_654
    )
    assert Fraction(cost) == exact


rates_strategy = st.builds(
    TokenRates, usd_per_mtok, usd_per_mtok, st.one_of(st.none(), usd_per_mtok)
)


@PROPERTY
@given(rates_strategy, tokens, tokens)
def test_estimate_is_exact(rates: TokenRates, inputs: int, outputs: int) -> None:
    cost = estimate_token_cost(rates, input_tokens=inputs, max_output_tokens=outputs)

    assert isinstance(cost, Decimal)
    assert Fraction(cost) == _bound(rates, inputs, outputs)


def _bound(rates: TokenRates, inputs: int, outputs: int) -> Fraction:
    input_rate = Fraction(rates.input_usd_per_mtok)
    if rates.cached_input_usd_per_mtok is not None:
        input_rate = max(input_rate, Fraction(rates.cached_input_usd_per_mtok))

    return (inputs * input_rate + outputs * Fraction(rates.output_usd_per_mtok)) / (
        MILLION
    )


ESTIMATE_INPUTS = (
    "input_usd_per_mtok",
    "output_usd_per_mtok",
    "cached_input_usd_per_mtok",
    "input_tokens",
    "max_output_tokens",
)


@PROPERTY
@given(
    rates_strategy,
    tokens,
    tokens,
    st.sampled_from(ESTIMATE_INPUTS),
    usd_per_mtok,
    tokens,
)
def test_estimate_never_falls_when_an_input_grows(
    rates: TokenRates,
    inputs: int,
    outputs: int,
    grown: str,
    rate_increase: Decimal,
    token_increase: int,
) -> None:
    counts = {"input_tokens": inputs, "max_output_tokens": outputs}
    before = estimate_token_cost(rates, **counts)

    if grown in counts:
        counts[grown] += token_increase
    else:
        with decimal.localcontext() as ctx:
            ctx.prec = 200
            bigger = (getattr(rates, grown) or Decimal(0)) + rate_increase
        rates = dataclasses.replace(rates, **{grown: bigger})
    after = estimate_token_cost(rates, **counts)

    assert after >= before


# --- the actual cost ---------------------------------------------------------


def test_token_cost_without_cache_prices_input_and_output() -> None:
    cost = token_cost(NO_CACHE_PRICE, input_tokens=1_000, output_tokens=500)

    assert cost == Decimal("0.003") + Decimal("0.0075")


def test_token_cost_prices_cached_tokens_at_the_cached_rate() -> None:
    """100k input of which 80k cached: 20k at $1.25/M, 80k at $0.3125/M."""
    cost = token_cost(
        GEMINI, input_tokens=100_000, output_tokens=1_000, cached_input_tokens=80_000
    )

    assert cost == Decimal("0.025") + Decimal("0.025") + Decimal("0.01")


def test_token_cost_prices_cached_tokens_at_the_input_rate_when_none_is_set() -> None:
    cached = token_cost(
        NO_CACHE_PRICE, input_tokens=1_000, output_tokens=0, cached_input_tokens=600
    )

    assert cached == token_cost(NO_CACHE_PRICE, input_tokens=1_000, output_tokens=0)


def test_token_cost_with_every_input_token_cached() -> None:
    cost = token_cost(
        GEMINI, input_tokens=1_000_000, output_tokens=0, cached_input_tokens=1_000_000
    )

    assert cost == Decimal("0.3125")


def test_cached_tokens_cannot_exceed_input_tokens() -> None:
    with pytest.raises(ValueError, match="cached_input_tokens"):
        token_cost(GEMINI, input_tokens=10, output_tokens=0, cached_input_tokens=11)


@pytest.mark.parametrize(
    "field", ["input_tokens", "output_tokens", "cached_input_tokens"]
)
def test_token_cost_rejects_a_negative_token_count(field: str) -> None:
    counts = {"input_tokens": 10, "output_tokens": 10, field: -1}

    with pytest.raises(ValueError, match=field):
        token_cost(GEMINI, **counts)


def test_token_cost_rejects_a_float_token_count() -> None:
    with pytest.raises(TypeError, match="output_tokens"):
        token_cost(GEMINI, input_tokens=1, output_tokens=1.0)  # type: ignore[arg-type]


@st.composite
def usage(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """Reported usage within what the bound declared: inputs, cached, out, max."""
    inputs = draw(tokens)
    max_outputs = draw(tokens)

    cached = draw(st.integers(0, inputs))
    outputs = draw(st.integers(0, max_outputs))
    return inputs, cached, outputs, max_outputs


@PROPERTY
@given(rates_strategy, usage())
def test_token_cost_is_exact(
    rates: TokenRates, used: tuple[int, int, int, int]
) -> None:
    inputs, cached, outputs, _ = used
    cached_rate = rates.cached_input_usd_per_mtok
    if cached_rate is None:
        cached_rate = rates.input_usd_per_mtok
    expected = (
        (inputs - cached) * Fraction(rates.input_usd_per_mtok)
        + cached * Fraction(cached_rate)
        + outputs * Fraction(rates.output_usd_per_mtok)
    ) / MILLION

    cost = token_cost(
        rates, input_tokens=inputs, output_tokens=outputs, cached_input_tokens=cached
    )

    assert Fraction(cost) == expected


@PROPERTY
@given(rates_strategy, usage())
def test_actual_cost_never_exceeds_the_estimate(
    rates: TokenRates, used: tuple[int, int, int, int]
) -> None:
    """The bound reserved before a call covers whatever the call reports."""
    inputs, cached, outputs, max_outputs = used

    bound = estimate_token_cost(
        rates, input_tokens=inputs, max_output_tokens=max_outputs
    )
    actual = token_cost(
        rates, input_tokens=inputs, output_tokens=outputs, cached_input_tokens=cached
    )

    assert actual <= bound
