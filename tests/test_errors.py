"""The one-line config checks of bbb.errors: what each accepts, and that the refusal names the
field, the bad value and what is allowed."""

import math

import pytest

from bbb import errors
from bbb.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "include_high", "ok"),
    [
        (-30, True, True),  # Both ends are in [low, high].
        (30.0, True, True),
        (0.5, True, True),
        (-30.000001, True, False),
        (30.000001, True, False),
        (30.0, False, False),  # [low, high): the high end is out ...
        (29.999, False, True),
        (-30, False, True),  # ... the low end in.
        (math.nan, True, False),
        (True, True, False),  # A bool is not a number here.
        ("3", True, False),  # Nor is a string (no TypeError from the comparison).
        (None, True, False),
    ],
)
def test_check_in_range(value, include_high, ok):
    def check():
        errors.check_in_range("posterior.init_rho", value, -30, 30, include_high=include_high)

    if ok:
        check()
    else:
        allowed = "a number in [-30, 30" + ("]" if include_high else ")")
        with pytest.raises(ConfigError) as raised:
            check()
        assert (raised.value.field, raised.value.allowed) == ("posterior.init_rho", allowed)
        assert repr(value) in str(raised.value)


@pytest.mark.parametrize(("value", "ok"), [(0, True), (1, True), (0.3, True), (1.01, False)])
def test_check_probability_is_the_closed_unit_interval(value, ok):
    if ok:
        errors.check_probability("agents.epsilons[0]", value)
    else:
        with pytest.raises(ConfigError, match=r"agents\.epsilons\[0\]=1\.01 .* \[0, 1\]"):
            errors.check_probability("agents.epsilons[0]", value)
