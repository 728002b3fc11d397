"""Tests of the toy regression (Blundell et al. 2015, Figure 5): data, config and the bands."""

from __future__ import annotations

import json
import math
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbb import regression, train
from bbb.data import regression as regression_data
from bbb.posterior import MeanFieldGaussian, PointEstimate
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
    assert bbb["iqr_ratio"] == pytest.approx(bbb["iqr_at_1.0"] / bbb["iqr_at_0.25"])
    assert plain["iqr_ratio"] is None


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


def test_script_takes_config_overrides_and_names_a_bad_one_before_anything(tmp_path):
    """`--config.…` reaches Bayes by Backprop's config: a bad value exits with code 2, naming
    the field, before the workdir is made; a misspelt field is a flag error (code 2 too)."""
    from tests.conftest import run_script

    for flag, message in [
        ("--config.likelihood.noise_std=-1", "likelihood.noise_std"),
        ("--config.likelihood.noise_sd=1", "noise_sd"),
    ]:
        result = run_script(
            "regression.py", f"--workdir={tmp_path / 'wd'}", "--config=configs/regression.py", flag
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "wd").exists()


class _SquaredWeight(nn.Module):
    """f(x; w) = (x w)²: with w ~ N(0, 1), f(x) = x² χ²₁, a skewed band of known quartiles."""

    @nn.compact
    def __call__(self, x):
        return jnp.square(x * self.param("w", nn.initializers.zeros, (1,)))


def _chi2_run(posterior):
    experiment = types.SimpleNamespace(model=_SquaredWeight())
    return experiment, {"posterior": posterior}


# The quartiles of χ²₁ (scipy.stats.chi2(1).ppf([0.25, 0.5, 0.75])), and its mean 1.
CHI2_QUARTILES = (0.1015310, 0.4549364, 1.3233037)
UNIT_NORMAL = MeanFieldGaussian(mu={"w": jnp.zeros(1)}, rho={"w": jnp.full(1, 0.5413249)})


def test_predictive_band_is_the_median_and_quartiles_of_the_sampled_outputs():
    """`lower`, `median`, `upper` are the 25th, 50th and 75th percentiles of f(x; w), w ~ q
    (not the 20th/80th, not the mean), and `iqr` = upper − lower, at every input."""
    experiment, params = _chi2_run(UNIT_NORMAL)  # softplus(0.5413) = 1: w ~ N(0, 1).
    x = np.asarray([[1.0], [2.0]], np.float32)
    band = regression.predictive_quantiles(
        experiment, params, x, jax.random.key(0), num_samples=20000
    )
    q25, q50, q75 = CHI2_QUARTILES
    for i, scale in enumerate((1.0, 4.0)):  # f(2; w) = 4 w².
        # Standard errors of the sample quartiles of 20,000 draws: about 0.1%, 0.5%, 1.3%.
        assert band["lower"][i] == pytest.approx(scale * q25, rel=0.02)
        assert band["median"][i] == pytest.approx(scale * q50, rel=0.03)
        assert band["upper"][i] == pytest.approx(scale * q75, rel=0.05)
    np.testing.assert_allclose(band["iqr"], band["upper"] - band["lower"], rtol=1e-12)


def test_experiment_reports_the_iqr_inside_and_outside_and_their_ratio(tmp_path, monkeypatch):
    """regression_experiment's IQR at x = 0.25 and x = 1.0 and their ratio (outside / inside;
    None for a point estimate's band of width 0), with the training stubbed out: under
    f(x; w) = (x w)² the same w give quartiles in the ratio (1 / 0.25)² = 16 exactly."""
    runs = {
        "bbb": _chi2_run(UNIT_NORMAL),
        "plain": _chi2_run(PointEstimate(mu={"w": jnp.ones(1)})),
    }

    def fake_train(config, run_dir):
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({"test_rmse": 0.1, "test_nll": -1.0, "wall_time_s": 1.0}, f)

    def fake_load(run_dir):
        experiment, params = runs[os.path.basename(run_dir)]
        return experiment, types.SimpleNamespace(params=params)

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(train, "load_run", fake_load)
    monkeypatch.setattr(regression, "plot_regression", lambda *args: None)
    config = regression_config.get_config()
    config.data.num_train = config.batch_size = 10  # Only load_data reads it: a small set.
    results = regression.regression_experiment(
        str(tmp_path), config, config, num_samples=4000, seed=1
    )
    bbb, plain = results["bbb"], results["plain"]
    q25, _, q75 = CHI2_QUARTILES
    assert bbb["iqr_at_1.0"] == pytest.approx(q75 - q25, rel=0.06)
    assert bbb["iqr_at_0.25"] == pytest.approx(bbb["iqr_at_1.0"] / 16, rel=1e-5)
    assert bbb["iqr_ratio"] == pytest.approx(16.0, rel=1e-5)
    assert plain["iqr_at_0.25"] == plain["iqr_at_1.0"] == 0.0 and plain["iqr_ratio"] is None
    assert bbb["test_rmse"] == 0.1 and bbb["test_nll"] == -1.0
    with open(tmp_path / "regression.json") as f:
        assert json.load(f) == results
