"""Every config file builds (traced abstractly, no compute) and keeps its promises."""

import importlib
import os
import subprocess

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
