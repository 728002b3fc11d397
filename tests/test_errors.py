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


def test_message_names_the_field_the_value_and_what_is_allowed():
    """The promised sentence, word for word: the value by repr (a string keeps its quotes, so
    `--config.x=''` is visible) and the choices by repr."""
    with pytest.raises(ConfigError) as raised:
        errors.check_choice("optim.name", "lbfgs", ("sgd", "adam"))
    assert str(raised.value) == (
        "config field optim.name='lbfgs' is invalid: allowed is one of 'sgd', 'adam'."
    )
    assert (raised.value.field, raised.value.value) == ("optim.name", "lbfgs")
    errors.check_choice("optim.name", "adam", ("sgd", "adam"))


@pytest.mark.parametrize(
    ("value", "integer", "allowed"),
    [
        (0, False, "a positive number"),  # The bound itself is out: > 0, not >= 0.
        (-1e-9, False, "a positive number"),
        (math.nan, False, "a positive number"),  # NaN compares false with everything.
        (math.inf, False, "a finite positive number"),
        (True, True, "a positive integer"),  # True == 1, but a bool is not a count.
        (True, False, "a positive number"),
        (2.5, True, "a positive integer"),  # A float where a count is needed.
        (2.0, True, "a positive integer"),
        ("3", False, "a positive number"),
    ],
)
def test_check_positive_refuses(value, integer, allowed):
    with pytest.raises(ConfigError) as raised:
        errors.check_positive("eval.every_epochs", value, integer=integer)
    assert (raised.value.field, raised.value.allowed) == ("eval.every_epochs", allowed)
    assert repr(value) in str(raised.value)


@pytest.mark.parametrize(("value", "integer"), [(1, True), (1e-9, False), (3, False)])
def test_check_positive_accepts(value, integer):
    errors.check_positive("eval.every_epochs", value, integer=integer)


@pytest.mark.parametrize(
    ("value", "integer", "ok"),
    [
        (0, True, True),  # The bound itself is in: >= 0.
        (0.0, False, True),
        (2.5, False, True),
        (-1, True, False),
        (-1e-9, False, False),
        (math.nan, False, False),
        (False, True, False),  # False == 0, but a bool is not a count.
        (1.5, True, False),
    ],
)
def test_check_non_negative(value, integer, ok):
    def check():
        errors.check_non_negative("data.train_subset", value, integer=integer)

    if ok:
        check()
    else:
        with pytest.raises(ConfigError) as raised:
            check()
        kind = "integer" if integer else "number"
        assert raised.value.allowed == f"a non-negative {kind}"
        assert repr(value) in str(raised.value)


def test_check_non_negative_refuses_infinity():
    """inf passed `value >= 0`: `--config.optim.warmup_epochs=inf` then crashed with an
    OverflowError traceback (exit code 1, not 2) and `posterior.init_rho_spread=inf` gave
    non-finite ρ at initialisation, a divergence after compute had started."""
    with pytest.raises(ConfigError) as raised:
        errors.check_non_negative("optim.warmup_epochs", math.inf)
    assert raised.value.allowed == "a finite non-negative number"
    assert "optim.warmup_epochs=inf" in str(raised.value)


@pytest.mark.parametrize(("value", "ok"), [(2, True), (3, True), (1, False), (2.0, False)])
def test_check_integer_at_least_includes_the_minimum(value, ok):
    if ok:
        errors.check_integer_at_least("num_draws", value, 2, "a sample variance")
    else:
        with pytest.raises(ConfigError) as raised:
            errors.check_integer_at_least("num_draws", value, 2, "a sample variance")
        assert raised.value.allowed == "an integer of at least 2 (a sample variance)"


def test_check_integer_at_least_refuses_a_bool():
    """True == 1 >= 1, but `--config.x=True` is not a count."""
    errors.check_integer_at_least("num_seeds", 1, 1)
    with pytest.raises(ConfigError) as raised:
        errors.check_integer_at_least("num_seeds", True, 1)
    assert raised.value.allowed == "an integer of at least 1"


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0.5, True), (1e-9, True), (0.0, False), (1.0, False), (True, False), (math.nan, False)],
)
def test_check_open_interval_excludes_both_ends(value, ok):
    """The mixture weight π must be strictly inside (0, 1): at either end one component
    vanishes and its log is −inf. (True is 1: out as a bool and as the high end.)"""
    if ok:
        errors.check_open_interval("prior.pi", value, 0.0, 1.0)
    else:
        with pytest.raises(ConfigError) as raised:
            errors.check_open_interval("prior.pi", value, 0.0, 1.0)
        assert raised.value.allowed == "a number strictly between 0.0 and 1.0"


def test_check_open_interval_refuses_a_bool_inside_the_interval():
    errors.check_open_interval("prior.df", 1, 0, 2)
    with pytest.raises(ConfigError, match=r"prior\.df=True"):
        errors.check_open_interval("prior.df", True, 0, 2)


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0, True), (2**32 - 1, True), (2**32, False), (-1, False), (True, False), (1.0, False)],
)
def test_check_seed_is_the_32_bit_range(value, ok):
    """JAX keys a seed by its low 32 bits: 2**32 would repeat seed 0 and −1 seed 2**32 − 1."""
    if ok:
        errors.check_seed("seed", value)
    else:
        with pytest.raises(ConfigError) as raised:
            errors.check_seed("seed", value)
        assert raised.value.field == "seed" and "2**32" in raised.value.allowed


def test_check_in_range_includes_the_high_end_by_default():
    errors.check_in_range("posterior.init_rho", 30, -30, 30)
    with pytest.raises(ConfigError, match=r"\[-30, 30\]"):
        errors.check_in_range("posterior.init_rho", 31, -30, 30)


@pytest.mark.parametrize(
    ("make_error", "code"),
    [
        (lambda: ConfigError("seed", -1, "an integer"), 2),
        (lambda: _workdir_error("workdir /x is not writable"), 2),
        (lambda: _data_error("MNIST is missing"), 2),
        (lambda: _diverged("train/loss is nan at step 3."), 3),
    ],
    ids=["config", "workdir", "data", "diverged"],
)
def test_run_or_exit_turns_promised_errors_into_exit_codes(make_error, code, capsys):
    """Bad input (config, workdir, data) exits with 2 and divergence with 3, the message on
    stderr after "error: "; the scripts and README promise these codes."""
    from bbb import cli

    error = make_error()

    def fail():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        cli.run_or_exit(fail)
    assert exit_info.value.code == code
    captured = capsys.readouterr()
    assert captured.err == f"error: {error}\n" and captured.out == ""


def test_run_or_exit_lets_other_errors_through_and_returns_the_result():
    from bbb import cli

    assert cli.run_or_exit(lambda: 7) == 7

    def fail():
        raise RuntimeError("a bug, with its traceback")

    with pytest.raises(RuntimeError, match="a bug"):
        cli.run_or_exit(fail)


def _workdir_error(message):
    from bbb.workdir import WorkdirError

    return WorkdirError(message)


def _data_error(message):
    from bbb.data import DataError

    return DataError(message)


def _diverged(message):
    from bbb.train import TrainingDivergedError

    return TrainingDivergedError(message)


def test_parse_flags_hides_info_lines_unless_verbosity_is_asked_for(monkeypatch):
    """absl's INFO lines (Orbax, TFDS: over a hundred per run) are hidden by default: the
    scripts start at WARNING; an explicit --verbosity keeps what it asks for."""
    from absl import flags
    from absl import logging as absl_logging

    from bbb import cli, hostmem

    monkeypatch.setattr(hostmem, "restart_with_huge_pages", lambda: None)
    monkeypatch.setattr(hostmem, "keep_freed_memory", lambda: None)
    previous = absl_logging.get_verbosity()
    try:
        absl_logging.set_verbosity(absl_logging.INFO)
        cli.parse_flags_or_exit(["prog"])
        assert absl_logging.get_verbosity() == absl_logging.WARNING
        flags.FLAGS.unparse_flags()
        cli.parse_flags_or_exit(["prog", "--verbosity=1"])
        assert absl_logging.get_verbosity() == 1
    finally:
        flags.FLAGS.unparse_flags()
        absl_logging.set_verbosity(previous)
