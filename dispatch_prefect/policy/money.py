"""Exact money arithmetic shared by the policy rules.

Every sum and product of money runs in a decimal context with unbounded
precision that traps inexact results, so a cost is either exact or an error:
it is never silently rounded.
"""

from __future__ import annotations

import decimal
from decimal import Decimal

__all__ = ["EXACT", "as_quantity", "as_usd"]

EXACT = decimal.Context(
    prec=decimal.MAX_PREC,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[
        decimal.InvalidOperation,
        decimal.Inexact,
        decimal.Overflow,
        decimal.DivisionByZero,
    ],
)

Number = Decimal | int | float


def as_usd(value: object, *, name: str) -> Decimal:
    """Return ``value`` as a finite, non-negative ``Decimal`` amount of USD.

    Raises:
        TypeError: a float, bool or anything not ``Decimal``/``int``: money
            is never a float; the message shows the ``Decimal`` to use.
        ValueError: NaN, infinite or negative.
    """
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        hint = f"Decimal('{value}')" if isinstance(value, float) else "a Decimal"
        raise TypeError(
            f"{name} must be a Decimal or int amount of USD, got "
            f"{type(value).__name__} {value!r}; pass {hint}"
        )

    amount = Decimal(value)
    _require_finite_non_negative(amount, name=name)

    return amount


def as_quantity(value: object, *, name: str) -> Decimal:
    """Return a non-money quantity (seconds, vCPUs, GiB) as an exact Decimal.

    Floats are accepted for quantities and read by their shortest decimal
    form (``0.5`` is ``Decimal('0.5')``), so ``memory_gib=0.5`` means what it
    says.
    """
    if isinstance(value, bool) or not isinstance(value, Decimal | int | float):
        raise TypeError(
            f"{name} must be a number, got {type(value).__name__} {value!r}"
        )

    amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    _require_finite_non_negative(amount, name=name)

    return amount


def _require_finite_non_negative(amount: Decimal, *, name: str) -> None:
    if not amount.is_finite():
        raise ValueError(f"{name} must be a finite number, got {amount}")

    if amount < 0:
        raise ValueError(f"{name} must not be negative, got {amount}")
