"""Every config file builds (traced abstractly, no compute) and keeps its promises."""

import importlib

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
