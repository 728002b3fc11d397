"""Tests of the toy regression (Blundell et al. 2015, Figure 5): data, config and the bands."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from bbb import regression, train
from bbb.data import regression as regression_data
from configs import regression as regression_config


def test_data_is_the_papers_function_seeded():
    splits = regression_data.load_toy_regression(200, 50, 50, seed=3)
    again = regression_data.load_toy_regression(200, 50, 50, seed=3)
    for name, (x, y) in splits.items():
        assert x.dtype == y.dtype == np.float32
        assert x.shape == y.shape == ((200, 1) if name == "train" else (50, 1))
        assert 0.0 <= x.min() and x.max() <= 0.5
        np.testing.assert_array_equal(x, again[name][0])
        np.testing.assert_array_equal(y, again[name][1])
    other = regression_data.load_toy_regression(200, 50, 50, seed=4)
    assert not np.array_equal(splits["train"][0], other["train"][0])
    # The noise-free curve at a few points, and the noise level of ε.
    x = np.asarray([0.0, 0.25, 0.5])
    np.testing.assert_allclose(regression_data.toy_function(x), [0.0, 0.55, 0.5], atol=1e-12)
    # sin(4πx) vanishes at those three; here each sine has its own value.
    x = np.asarray([0.0625, 0.125])
    expected = [
        0.0625 + 0.3 * math.sin(math.pi / 8) + 0.3 * math.sin(math.pi / 4),
        0.125 + 0.3 * math.sin(math.pi / 4) + 0.3,
    ]
    np.testing.assert_allclose(regression_data.toy_function(x), expected, atol=1e-12)
    x, y = regression_data.sample(20000, np.random.default_rng(0))
    residual = y - regression_data.toy_function(x)
    # ε ~ N(0, 0.02²) enters the sines too, so y varies more than ε: the residual's standard
    # deviation from the paper's formula, by Monte Carlo here (2·10⁶ draws).
    rng = np.random.default_rng(1)
    xs, eps = rng.uniform(0.0, 0.5, 2_000_000), rng.normal(0.0, 0.02, 2_000_000)
    shifted = xs + eps
    reference = (
        eps
        + 0.3 * (np.sin(2 * np.pi * shifted) - np.sin(2 * np.pi * xs))
        + 0.3 * (np.sin(4 * np.pi * shifted) - np.sin(4 * np.pi * xs))
    ).std()
    assert residual.std() == pytest.approx(reference, rel=0.03)


def test_load_data_and_dataset_spec():
    config = regression_config.get_config()
    assert train.dataset_spec(config) == (1000, (1,))
    splits = train.load_data(config)
    assert splits["train"][0].shape == (1000, 1) and splits["train"][1].shape == (1000, 1)
    assert splits["validation"][0].shape == (500, 1) and splits["test"][0].shape == (500, 1)
    plain = regression_config.get_config("plain")
    assert plain.posterior.name == "point" and plain.prior.name == "flat"
    with pytest.raises(ValueError, match="plain"):
        regression_config.get_config("other")


@pytest.mark.slow
def test_bbb_band_widens_away_from_the_data_and_plain_has_none(tmp_path):
    bbb_config = regression_config.get_config()
    bbb_config.num_epochs = 150  # Half the real run (about 30 s on a 2-core CPU).
    bbb_config.eval.every_epochs = 150
    plain_config = regression_config.get_config("plain")
    plain_config.num_epochs = 20
    plain_config.eval.every_epochs = 20
    workdir = str(tmp_path / "regression")
    results = regression.regression_experiment(workdir, bbb_config, plain_config, num_samples=400)
    bbb, plain = results["bbb"], results["plain"]
    assert bbb["iqr_at_1.0"] >= 3.0 * bbb["iqr_at_0.25"] > 0.0
    assert plain["iqr_at_0.25"] == 0.0 and plain["iqr_at_1.0"] == 0.0
    assert bbb["test_rmse"] < 0.1  # The Bayes-optimal RMSE here is about 0.062.
    assert os.path.getsize(os.path.join(workdir, "plots", "regression.png")) > 10000
    with open(os.path.join(workdir, "regression.json")) as f:
        assert json.load(f) == results


@pytest.mark.parametrize("num_samples", [0, 1, 2.5])
def test_bad_num_samples_is_named_before_training(tmp_path, num_samples):
    from bbb.errors import ConfigError

    with pytest.raises(ConfigError, match="num_samples"):
        regression.regression_experiment(
            str(tmp_path / "wd"),
            regression_config.get_config(),
            regression_config.get_config("plain"),
            num_samples=num_samples,
        )
    assert not (tmp_path / "wd").exists()
