"""Every config file builds (traced abstractly, no compute) and keeps its promises."""

import importlib
import math
import os
import subprocess

import ml_collections
import pytest

from bbb import train
from bbb.errors import ConfigError

CONFIGS = [
    ("mnist", None),
    ("mnist", "1200"),
    ("mnist_gaussian", None),
    ("mnist_sgd", None),
    ("mnist_dropout", None),
    ("mnist_cnn", None),
    ("test", None),
    ("regression", None),
    ("regression", "plain"),
]


def _config(name, arg):
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize(("name", "arg"), CONFIGS)
def test_config_builds(name, arg):
    config = _config(name, arg)
    experiment = train.build(config, *train.dataset_spec(config))
    assert experiment.steps_per_epoch >= 1


def test_widths():
    assert _config("mnist", "1200").model.hidden_sizes == (1200, 1200)
    assert _config("mnist", None).model.hidden_sizes == (400, 400)


@pytest.mark.parametrize("estimator", ["reparam", "flipout"])
def test_cnn_runs_with_reparam_and_flipout(estimator):
    config = _config("mnist_cnn", None)
    config.posterior.estimator = estimator
    train.build(config, *train.dataset_spec(config))


def test_cnn_local_reparam_is_a_config_error_naming_the_layer():
    config = _config("mnist_cnn", None)
    config.posterior.estimator = "local_reparam"
    with pytest.raises(ConfigError, match="Conv_0"):
        train.build(config, *train.dataset_spec(config))


def test_paper_grid_sweep():
    sweep = importlib.import_module("configs.mnist").get_sweep()
    assert len(sweep) == 27
    config = _config("mnist", None)
    for overrides in sweep:
        config.update_from_flattened_dict(overrides)
        train.build(config, *train.dataset_spec(config))


def test_readme_workdirs_work_on_a_fresh_checkout(tmp_path):
    # A missing workdir parent is an error (a typo in a path must not scatter runs), so the
    # README's `--workdir=runs/...` needs runs/ in every clone, and `make train` creates the
    # parent of whatever WORKDIR it is given.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tracked = subprocess.run(
        ["git", "ls-files", "runs"], cwd=root, capture_output=True, text=True, check=False
    )
    if tracked.returncode == 0:  # A git checkout (CI's fresh clone is one).
        assert "runs/.gitignore" in tracked.stdout.split()
    workdir = tmp_path / "a" / "b" / "run"
    dry = subprocess.run(
        ["make", "-n", "train", f"WORKDIR={workdir}"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    mkdir = next(i for i, line in enumerate(dry) if line.startswith("mkdir -p"))
    train_line = next(i for i, line in enumerate(dry) if "scripts/train.py" in line)
    assert mkdir < train_line and str(workdir.parent) in dry[mkdir]


# The defaults that the README and the paper state --------------------------------------------

# (config, arg): {dotted field: value}, each value as the README, docs/experiments.md or the
# paper (Blundell et al. 2015) gives it for that config. A default changed without its text
# (say π back to ¼, or ρ₀ = −5) would make every figure quoted for `make train` wrong.
STATED_DEFAULTS = {
    ("mnist", None): {
        # README, "Measured so far": 2×400, π = ¾, σ1 = 1, σ2 = e⁻⁸, ρ₀ = −6, local
        # reparameterisation, K = 1, Adam 10⁻³ with cosine decay, 100 epochs, evaluations with
        # 100 posterior samples every 20 epochs.
        "model.hidden_sizes": (400, 400),
        "prior.name": "scale_mixture",
        "prior.pi": 0.75,
        "prior.sigma1": 1.0,
        "prior.sigma2": math.exp(-8),
        "posterior.name": "mean_field",
        "posterior.init_rho": -6.0,
        "posterior.estimator": "local_reparam",
        "objective.num_samples": 1,
        "objective.kl": "mc",
        "objective.kl_schedule": "uniform",
        "objective.kl_temperature": 1.0,
        "optim.name": "adam",
        "optim.learning_rate": 1e-3,
        "optim.schedule": "cosine",
        "num_epochs": 100,
        "eval.num_samples": 100,
        "eval.every_epochs": 20,
        # The paper: minibatches of 128, pixels divided by 126, 50,000 training images.
        "batch_size": 128,
        "data.pixel_scale": 126.0,
        "data.num_train": 50000,
        "data.train_subset": 0,
        "data.eval_subset": 0,
    },
    ("mnist", "800"): {"model.hidden_sizes": (800, 800)},
    ("mnist_gaussian", None): {
        "prior.name": "gaussian",
        "prior.sigma": math.exp(-1),
        "objective.kl": "closed_form",  # README: "Gaussian prior, closed-form KL".
        "posterior.name": "mean_field",
    },
    ("mnist_sgd", None): {"posterior.name": "point", "prior.name": "flat", "eval.num_samples": 1},
    # README's comparison table: "MC dropout (p=0.5)", a point estimate without a prior.
    ("mnist_dropout", None): {
        "model.dropout_rate": 0.5,
        "posterior.name": "point",
        "prior.name": "flat",
    },
    ("mnist_sgd", "1200"): {"model.hidden_sizes": (1200, 1200)},
    # README, "Convolutions": LeNet-5 with 6 and 16 channels, 120 and 84 units, 20 epochs,
    # evaluated with 10 posterior samples every 5 epochs, one compiled call per step.
    ("mnist_cnn", None): {
        "model.name": "lenet",
        "model.features": (6, 16),
        "model.hidden_sizes": (120, 84),
        "num_epochs": 20,
        "eval.num_samples": 10,
        "eval.every_epochs": 5,
        "epoch_loop": "steps",
        "posterior.estimator": "reparam",
        "prior.pi": 0.75,  # "the MLP's prior and optimiser".
        "optim.learning_rate": 1e-3,
    },
    # docs/experiments.md, "Regression": 2×100 ReLU, 300 epochs of 10 minibatches of 100,
    # Adam 10⁻² with cosine decay, N(0, 1) prior, ρ₀ = −5, Gaussian likelihood with the noise
    # fixed at s = 0.0625 (the data's own spread, not ε's 0.02), 1,000 training points.
    ("regression", None): {
        "model.hidden_sizes": (100, 100),
        "model.activation": "relu",
        "model.num_outputs": 1,
        "num_epochs": 300,
        "batch_size": 100,
        "optim.name": "adam",
        "optim.learning_rate": 1e-2,
        "optim.schedule": "cosine",
        "prior.name": "gaussian",
        "prior.sigma": 1.0,
        "posterior.name": "mean_field",
        "posterior.init_rho": -5.0,
        "likelihood.name": "gaussian",
        "likelihood.noise_std": 0.0625,
        "likelihood.learnable": False,
        "data.name": "toy_regression",
        "data.num_train": 1000,
    },
    # The plain network: same network, data and optimiser; a point estimate, flat prior.
    ("regression", "plain"): {
        "posterior.name": "point",
        "prior.name": "flat",
        "model.hidden_sizes": (100, 100),
        "num_epochs": 300,
        "optim.learning_rate": 1e-2,
    },
    # README, "Contextual bandit": ε = 5%, 1%, 0%; +5 if edible, −35 or +5 (½ each) if
    # poisonous; 2×100 ReLU; a buffer of the last 4,096 interactions; rounds of 64 optimiser steps
    # on minibatches of 64; scale mixture π = ½, σ1 = 1, σ2 = 0.0025; 2 posterior samples per
    # step; 50,000 interactions; ρ₀ = −3 since 2026-11-29; since 2026-11-30 plain SGD at 10⁻³
    # and the KL weighted by every interaction so far (Adam at 10⁻⁴ and the buffer's size before).
    ("bandit_mushroom", None): {
        "agents.thompson": True,
        "agents.epsilons": (0.05, 0.01, 0.0),
        "rewards.edible": 5.0,
        "rewards.poisonous_bad": -35.0,
        "rewards.poisonous_good": 5.0,
        "rewards.poisonous_bad_probability": 0.5,
        "model.hidden_sizes": (100, 100),
        "model.activation": "relu",
        "buffer_size": 4096,
        "num_updates": 64,
        "batch_size": 64,
        "update_every": 1,
        "num_steps": 50_000,
        "prior.name": "scale_mixture",
        "prior.pi": 0.5,
        "prior.sigma1": 1.0,
        "prior.sigma2": 0.0025,
        "objective.num_samples": 2,
        "posterior.init_rho": -3.0,
        "optim.name": "sgd",
        "optim.learning_rate": 1e-3,
        "objective.kl_data_size": "interactions",
    },
}


@pytest.mark.parametrize(("name", "arg"), list(STATED_DEFAULTS))
def test_defaults_are_those_the_readme_states(name, arg):
    config = _config(name, arg)
    for field, expected in STATED_DEFAULTS[(name, arg)].items():
        value = config
        for part in field.split("."):
            value = value[part]
        if isinstance(expected, float):
            assert value == pytest.approx(expected, rel=1e-12), (name, arg, field)
        else:
            assert value == expected, (name, arg, field)


def test_paper_grid_is_the_papers_values():
    """The 27 members are exactly π ∈ {¼, ½, ¾} × −log σ1 ∈ {0, 1, 2} × −log σ2 ∈ {6, 7, 8}
    (Blundell et al. 2015, §5.1), each once; and the Gaussian grid σ ∈ {e⁰, e⁻¹, e⁻²}."""
    sweep = importlib.import_module("configs.mnist").get_sweep()
    triples = sorted(
        (
            m["prior.pi"],
            round(-math.log(m["prior.sigma1"]), 9),
            round(-math.log(m["prior.sigma2"]), 9),
        )
        for m in sweep
    )
    expected = sorted(
        (pi, float(a), float(b)) for pi in (0.25, 0.5, 0.75) for a in (0, 1, 2) for b in (6, 7, 8)
    )
    assert triples == expected
    gaussian = importlib.import_module("configs.mnist_gaussian").get_sweep()
    assert [round(-math.log(m["prior.sigma"]), 9) for m in gaussian] == [0.0, 1.0, 2.0]


def test_width_argument_sets_every_hidden_layer_and_defaults_to_400():
    for width in ("400", "800", "1200"):
        assert _config("mnist", width).model.hidden_sizes == (int(width), int(width))
    assert importlib.import_module("configs.mnist").get_config("").model.hidden_sizes == (400, 400)


def test_regression_config_refuses_an_unknown_variant():
    regression = importlib.import_module("configs.regression")
    assert regression.get_config("bbb").posterior.name == "mean_field"
    with pytest.raises(ValueError, match=r"configs/regression\.py:plane: expected"):
        regression.get_config("plane")


# Boundaries of the checks in train.build, train.dataset_spec and train.make_optimizer ---------


def _build(**fields):
    """Builds configs/test.py with dotted `fields` set (no trace: the checks come before it).

    The config is copied without type safety, so that a float or a bool can reach a field that
    holds an int, as it can from a sweep's entries or a config file."""
    config = ml_collections.ConfigDict(_config("test", None).to_dict(), type_safe=False)
    config.update_from_flattened_dict(fields)
    return train.build(config, *train.dataset_spec(config), trace=False)


def _refused(field, value, allowed_words, **others):
    with pytest.raises(ConfigError) as raised:
        _build(**{field: value}, **others)
    assert raised.value.field == field and raised.value.value == value, str(raised.value)
    assert allowed_words in raised.value.allowed, raised.value.allowed
    return raised.value


@pytest.mark.parametrize(
    ("field", "value", "allowed_words"),
    [
        ("posterior.init_rho", 30.5, "[-30, 30]"),
        ("posterior.init_rho", -30.5, "[-30, 30]"),
        ("posterior.init_rho_spread", -1.0, "non-negative"),
        ("posterior.mu_scale", 0.0, "positive"),
        ("eval.every_epochs", 0, "positive integer"),
        ("eval.batch_size", 0, "positive integer"),
        ("eval.num_samples", 2.0, "positive integer"),
        ("checkpoint_every_epochs", 0, "positive integer"),
        ("max_checkpoints", 0, "positive integer"),
        ("num_epochs", True, "positive integer"),
        ("seed", -1, "2**32"),
        ("objective.kl_warmup_steps", 2.5, "non-negative integer"),
        ("objective.kl_warmup_steps", -1, "non-negative integer"),
        ("data.num_train", 60000, "[1, 59999]"),  # No validation images would be left.
        ("data.num_train", 0, "[1, 59999]"),
        ("data.num_train", True, "[1, 59999]"),
        ("data.train_subset", -1, "non-negative integer"),
        ("data.eval_subset", -1, "non-negative integer"),
        ("data.pixel_scale", 0.0, "positive"),
        ("optim.learning_rate", -1e-3, "positive"),
        ("optim.warmup_epochs", -1.0, "non-negative"),
        ("optim.grad_clip_norm", -1.0, "non-negative"),
        # inf passed the non-negative checks: warmup crashed with an OverflowError (exit 1),
        # a spread gave non-finite ρ at initialisation.
        ("optim.warmup_epochs", math.inf, "finite non-negative"),
        ("posterior.init_rho_spread", math.inf, "finite non-negative"),
    ],
)
def test_build_refuses_naming_field_value_and_allowed(field, value, allowed_words):
    _refused(field, value, allowed_words)


@pytest.mark.parametrize(
    "fields",
    [
        {"posterior.init_rho": 30.0},  # Both ends of [−30, 30] are allowed.
        {"posterior.init_rho": -30.0},
        {"posterior.init_rho_spread": 0.0},
        {"data.num_train": 59999, "data.train_subset": 0, "batch_size": 128},
        {"data.train_subset": 64, "batch_size": 64},  # One minibatch: all the training set.
        {"objective.kl_warmup_steps": 0},
        {"seed": 2**32 - 1},
        {"optim.warmup_epochs": 1.5},  # Less than num_epochs = 2.
    ],
)
def test_build_accepts_the_edges(fields):
    experiment = _build(**fields)
    assert experiment.steps_per_epoch >= 1


def test_train_subset_sets_n_and_the_steps():
    """N is the subset's size, not num_train's: the KL weight 1/N and the steps follow it."""
    experiment = _build(**{"data.train_subset": 640, "batch_size": 64})
    assert (experiment.num_train, experiment.steps_per_epoch) == (640, 10)
    assert _build(**{"data.train_subset": 0, "batch_size": 128}).num_train == 50000


def test_a_point_posterior_needs_mc_kl_and_reparam():
    point = {"posterior.name": "point", "prior.name": "flat"}
    _refused("objective.kl", "closed_form", "'mc' for a point posterior", **point)
    _refused("posterior.estimator", "flipout", "'reparam' for a point posterior", **point)


@pytest.mark.parametrize(
    ("fields", "allowed_words"),
    [
        ({"warmup_epochs": 2}, "fewer than num_epochs"),  # All of training would be warm-up.
        ({"schedule": "step", "step_factor": 0.0}, "positive"),
        ({"schedule": "step", "step_epochs": (True,)}, "increasing tuple"),
        ({"schedule": "step", "step_epochs": (1,), "warmup_epochs": 1}, "increasing tuple"),
    ],
)
def test_make_optimizer_refuses(fields, allowed_words):
    optim = _config("test", None).optim
    optim.update(fields)
    with pytest.raises(ConfigError) as raised:
        train.make_optimizer(optim, steps_per_epoch=4, num_epochs=2)
    field = "optim." + ("step_epochs" if "step_epochs" in fields else next(reversed(fields)))
    assert raised.value.field == field and allowed_words in raised.value.allowed


def test_an_estimator_error_keeps_its_field_and_a_type_error_names_the_model(monkeypatch):
    """trace_step passes a ConfigError through unchanged (the estimator names its layer) and
    turns a shape error, ValueError or TypeError, into one naming model.name."""
    config = _config("mnist_cnn", None)
    config.posterior.estimator = "local_reparam"
    with pytest.raises(ConfigError) as raised:
        train.build(config, *train.dataset_spec(config))
    assert raised.value.field == "posterior.estimator"

    def bad_step(*args):
        raise TypeError("dot_general requires contracting dimensions to have the same shape")

    monkeypatch.setattr(train, "train_step", bad_step)
    config = _config("test", None)
    with pytest.raises(ConfigError) as raised:
        train.build(config, *train.dataset_spec(config))
    assert raised.value.field == "model.name"
    assert "TypeError: dot_general" in raised.value.allowed
