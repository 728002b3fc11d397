"""The error type for bad configuration, and the one-line checks that raise it.

Every message names the field, the bad value and what is allowed, so that a user who typed
`--config.prior.pi=1.5` knows at once what to change.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A configuration field has a value that bbb cannot use."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"config field {field}={value!r} is invalid: allowed is {allowed}.")


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    """Raises ConfigError unless `value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(field, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_signed(field: str, value: Any, integer: bool, *, zero: bool) -> None:
    """Raises ConfigError unless `value` is a finite number > 0 (>= 0 with `zero`), and an int if
    `integer`: `check_positive` and `check_non_negative`."""
    kind = "non-negative" if zero else "positive"
    kinds = (int,) if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or not (value >= 0 if zero else value > 0)
    ):
        raise ConfigError(field, value, f"a {kind} " + ("integer" if integer else "number"))
    if not integer and value == float("inf"):
        raise ConfigError(field, value, f"a finite {kind} number")


def check_positive(field: str, value: Any, *, integer: bool = False) -> None:
    """Raises ConfigError unless `value` is a (finite) number > 0, and an int if `integer`."""
    _check_signed(field, value, integer, zero=False)


def check_non_negative(field: str, value: Any, *, integer: bool = False) -> None:
    """Raises ConfigError unless `value` is a (finite) number >= 0, and an int if `integer`."""
    _check_signed(field, value, integer, zero=True)


def check_integer_at_least(field: str, value: Any, minimum: int, why: str = "") -> None:
    """Raises ConfigError unless `value` is an int >= `minimum`; `why` says what needs it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        reason = f" ({why})" if why else ""
        raise ConfigError(field, value, f"an integer of at least {minimum}{reason}")


def check_in_range(
    field: str, value: Any, low: float, high: float, *, include_high: bool = True
) -> None:
    """Raises ConfigError unless `value` is a number in [low, high] ([low, high) if not
    `include_high`)."""
    is_number = not isinstance(value, bool) and isinstance(value, int | float)
    if not (is_number and low <= value and (value <= high if include_high else value < high)):
        raise ConfigError(
            field, value, f"a number in [{low:g}, {high:g}{']' if include_high else ')'}"
        )


def check_probability(field: str, value: Any) -> None:
    """Raises ConfigError unless `value` is a number in [0, 1]."""
    check_in_range(field, value, 0, 1)


def check_open_interval(field: str, value: Any, low: float, high: float) -> None:
    """Raises ConfigError unless low < value < high."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low < value < high:
        raise ConfigError(field, value, f"a number strictly between {low} and {high}")


def check_seed(field: str, value: Any) -> None:
    """Raises ConfigError unless `value` is an integer in [0, 2³²).

    JAX keys a seed by its low 32 bits (with 64-bit types off, as here): 2³² would repeat seed
    0 and −1 seed 2³² − 1, so two "different" runs would be the same.
    """
    if isinstance(value, bool) or not (isinstance(value, int) and 0 <= value < 2**32):
        raise ConfigError(field, value, "an integer in [0, 2**32) (JAX keys seeds by 32 bits)")
