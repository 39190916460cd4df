"""Token-priced rates for paid LLM and SDK calls, and their exact costs.

Providers price tokens in USD per million. Before a call only the input size
and the cap on output are known, so the bound charges every input token at
the higher of the input and cached-input prices (whatever the cache serves
can only make the call cheaper) and assumes the model writes all
``max_output_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from dispatch_prefect.policy.money import EXACT, as_usd

__all__ = ["TokenRates", "estimate_token_cost", "token_cost"]

_PER_MILLION = -6


@dataclass(frozen=True)
class TokenRates:
    """USD per million input, output and (optionally) cached-input tokens."""

    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    cached_input_usd_per_mtok: Decimal | None = None

    def __post_init__(self) -> None:
        for name in ("input_usd_per_mtok", "output_usd_per_mtok"):
            object.__setattr__(self, name, as_usd(getattr(self, name), name=name))
        if self.cached_input_usd_per_mtok is not None:
            object.__setattr__(
                self,
                "cached_input_usd_per_mtok",
                as_usd(
                    self.cached_input_usd_per_mtok,
                    name="cached_input_usd_per_mtok",
                ),
            )


def estimate_token_cost(
    rates: TokenRates, *, input_tokens: int, max_output_tokens: int
) -> Decimal:
    """The exact upper-bound cost of one call.

    Every input token is charged at the higher of the input and cached-input
    rates, so the bound holds whatever part of the input the cache serves.

    Raises:
        ValueError: a negative token count, named.
    """
    inputs = _token_count(input_tokens, name="input_tokens")
    outputs = _token_count(max_output_tokens, name="max_output_tokens")

    input_rate = rates.input_usd_per_mtok
    cached_rate = rates.cached_input_usd_per_mtok
    if cached_rate is not None and cached_rate > input_rate:
        input_rate = cached_rate

    return EXACT.add(
        _priced(inputs, input_rate),
        _priced(outputs, rates.output_usd_per_mtok),
    )


def token_cost(
    rates: TokenRates,
    *,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
) -> Decimal:
    """The exact cost of a call from its reported usage.

    ``cached_input_tokens`` is the part of ``input_tokens`` served from the
    provider's cache; it is priced at the cached rate when one is known.
    """
    inputs = _token_count(input_tokens, name="input_tokens")
    outputs = _token_count(output_tokens, name="output_tokens")
    cached = _token_count(cached_input_tokens, name="cached_input_tokens")
    if cached > inputs:
        raise ValueError(
            f"cached_input_tokens ({cached}) cannot exceed input_tokens ({inputs})"
        )

    cached_rate = rates.cached_input_usd_per_mtok
    if cached_rate is None:
        cached_rate = rates.input_usd_per_mtok

    return EXACT.add(
        EXACT.add(
            _priced(inputs - cached, rates.input_usd_per_mtok),
            _priced(cached, cached_rate),
        ),
        _priced(outputs, rates.output_usd_per_mtok),
    )


def _token_count(value: object, *, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")

    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")

    return value


def _priced(tokens: int, usd_per_mtok: Decimal) -> Decimal:
    return EXACT.multiply(Decimal(tokens), usd_per_mtok).scaleb(_PER_MILLION, EXACT)
