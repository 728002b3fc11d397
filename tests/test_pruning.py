"""Tests of bbb.pruning: the ranking, the masks, exact zeros in samples, the compact export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbb import models, pruning, train
from bbb.posterior import MeanFieldGaussian, PointEstimate
from configs import test as test_config
from tests.conftest import REPO, numpy_params


@pytest.fixture(scope="module")
def posterior():
    """A mean-field posterior over a 6-8-8-3 MLP with random μ and ρ (no two SNRs tie)."""
    model = models.MLP(hidden_sizes=(8, 8), num_outputs=3)
    mu = numpy_params(model, jnp.zeros((1, 6)), seed=1)
    rng = np.random.default_rng(2)
    rho = jax.tree_util.tree_map(
        lambda m: jnp.asarray(rng.uniform(-6.0, 0.0, m.shape), jnp.float32), mu
    )
    return MeanFieldGaussian(mu=mu, rho=rho)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def test_fraction_zero_changes_nothing_bitwise(posterior):
    pruned = pruning.prune(posterior, 0.0, "snr")
    for a, b in ((pruned.mu, posterior.mu), (pruned.rho, posterior.rho)):
        assert _flat(a).tobytes() == _flat(b).tobytes()  # Bitwise: a −0.0 would differ.
    key = jax.random.key(3)
    assert _flat(pruned.sample(key)).tobytes() == _flat(posterior.sample(key)).tobytes()
    assert _flat(pruned.mean()).tobytes() == _flat(posterior.mean()).tobytes()


@pytest.mark.parametrize("fraction", [0.1, 0.29, 0.5, 0.75, 0.95, 0.98, 1.0])
@pytest.mark.parametrize("criterion", ["snr", "magnitude"])
def test_removes_exactly_the_lowest_scores(posterior, fraction, criterion):
    n = posterior.num_weights()
    expected_count = math.floor(round(fraction * 100) * n / 100)  # ⌊f·n⌋ in exact arithmetic
    mu, sigma = _flat(posterior.mu), _flat(posterior.stddev())
    score = np.abs(mu) / sigma if criterion == "snr" else np.abs(mu)
    expected = np.sort(np.argsort(score)[:expected_count])
    mask = _flat(pruning.prune(posterior, fraction, criterion).mask)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.flatnonzero(mask == 0), expected)


def test_num_removed_reads_the_fraction_as_its_decimal():
    # Binary floating point gives ⌊0.29 · 100⌋ = 28 and ⌊0.57 · 100⌋ = 56.
    assert (math.floor(0.29 * 100), math.floor(0.57 * 100)) == (28, 56)
    assert pruning.num_removed(0.29, 100) == 29
    assert pruning.num_removed(0.57, 100) == 57
    assert pruning.num_removed(0.5, 7) == 3
    assert pruning.num_removed(1.0, 7) == 7
    assert pruning.num_removed(0.0, 7) == 0


@pytest.mark.parametrize("criterion", ["snr", "magnitude"])
def test_pruning_again_counts_the_weights_already_removed(posterior, criterion):
    """Pruning a pruned posterior to f removes ⌊f·n⌋ weights in all, the earlier ones first."""
    n = posterior.num_weights()
    once = pruning.prune(posterior, 0.5, criterion)
    twice = pruning.prune(once, 0.75, criterion)
    removed_once = _flat(once.mask) == 0
    removed_twice = _flat(twice.mask) == 0
    assert removed_twice.sum() == math.floor(0.75 * n)
    assert np.all(removed_twice[removed_once])
    assert np.all(np.isfinite(_flat(once.signal_to_noise())))
    # The same weights as pruning the original to 0.75 at once.
    np.testing.assert_array_equal(
        removed_twice, _flat(pruning.prune(posterior, 0.75, criterion).mask) == 0
    )
    sample = _flat(twice.sample(jax.random.key(0)))
    assert np.all(sample[removed_twice] == 0.0)
    assert np.all(sample[~removed_twice] != 0.0)


def test_pruning_again_to_a_smaller_fraction_is_refused(posterior):
    """A removed weight cannot come back (its μ and ρ are gone): 0.25 after 0.5 is refused."""
    once = pruning.prune(posterior, 0.5, "snr")
    with pytest.raises(ValueError, match=r"already has \d+ of its \d+ weights removed"):
        pruning.prune(once, 0.25, "snr")
    assert pruning.prune(once, 0.5, "snr").num_kept() == once.num_kept()


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_ties_at_the_threshold_remove_exactly_the_fraction(fraction):
    """|μ| in four tied groups of 25: the cut falls inside a tie, and ⌊f·n⌋ + 1 weights tie
    with the last one removed; exactly ⌊f·n⌋ go, the earliest of the tied ones first."""
    values = np.repeat(np.asarray([0.1, 0.2, 0.3, 0.4], np.float32), 25)  # n = 100
    values = np.random.default_rng(0).permutation(values) * np.where(np.arange(100) % 2, 1, -1)
    mu = {"kernel": jnp.asarray(values.reshape(10, 10))}
    point = PointEstimate(mu=mu)
    k = math.floor(fraction * 100) - 3  # Inside a group of ties.
    mask = _flat(pruning.prune_mask(point, k / 100, "magnitude"))
    removed = np.flatnonzero(mask == 0)
    assert removed.size == k
    threshold = np.sort(np.abs(values))[k - 1]
    assert np.all(np.abs(values[removed]) <= threshold)
    tied = np.flatnonzero(np.abs(values) == threshold)
    assert np.all(np.isin(tied[: np.sum(np.isin(tied, removed))], removed))  # Earliest first.


def test_snr_and_magnitude_rank_differently(posterior):
    snr = _flat(pruning.prune(posterior, 0.5, "snr").mask)
    magnitude = _flat(pruning.prune(posterior, 0.5, "magnitude").mask)
    assert np.any(snr != magnitude)


def test_pruned_weights_are_exactly_zero_in_every_sample(posterior):
    pruned = pruning.prune(posterior, 0.75, "snr")
    removed = _flat(pruned.mask) == 0
    assert removed.sum() == math.floor(0.75 * posterior.num_weights())
    samples = jax.vmap(pruned.sample)(jax.random.split(jax.random.key(0), 64))
    flat = np.stack(
        [_flat(jax.tree_util.tree_map(lambda x, i=i: x[i], samples)) for i in range(64)]
    )
    assert np.all(flat[:, removed] == 0.0)
    assert np.all(flat[:, ~removed] != 0.0)
    assert np.all(_flat(pruned.stddev())[removed] == 0.0)
    assert np.all(_flat(pruned.mean())[removed] == 0.0)
    # The kept weights are drawn exactly as in the unpruned posterior.
    key = jax.random.key(5)
    np.testing.assert_array_equal(
        _flat(pruned.sample(key))[~removed], _flat(posterior.sample(key))[~removed]
    )
    _, log_q = pruned.sample_and_log_prob(key)
    assert np.isfinite(log_q)


def test_pruned_log_q_is_the_gaussian_log_density_of_the_kept_weights(posterior):
    """log q = Σ over the kept weights of log N(w_i | μ_i, σ_i²) = −½ ε_i² − log σ_i − ½ log 2π,
    with the ε of the unpruned posterior and σ in float64 numpy; f = 0 gives the unpruned
    log q."""
    key = jax.random.key(9)
    eps = _flat(posterior.sample_noise(key)).astype(np.float64)
    for fraction in (0.0, 0.5):
        pruned = pruning.prune(posterior, fraction, "snr")
        kept = _flat(pruned.mask) > 0
        sigma = np.logaddexp(_flat(posterior.rho).astype(np.float64), 0.0)
        terms = -0.5 * eps**2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
        _, log_q = pruned.sample_and_log_prob(key)
        np.testing.assert_allclose(float(log_q), terms[kept].sum(), rtol=1e-5)
    _, unpruned_log_q = posterior.sample_and_log_prob(key)
    _, log_q_zero = pruning.prune(posterior, 0.0, "snr").sample_and_log_prob(key)
    np.testing.assert_allclose(float(log_q_zero), float(unpruned_log_q), rtol=1e-6)


def test_every_density_of_a_pruned_posterior_leaves_out_the_removed_weights(posterior):
    """`reparameterize` (flipout's MC KL takes it), `log_prob` and `entropy` sum over the kept
    weights only, as `sample_and_log_prob` does; the forms inherited from the unpruned
    posterior added log σ = log 0 per removed weight (log q = +inf, log_prob NaN, entropy −inf).
    Their gradients are finite too."""
    key = jax.random.key(4)
    pruned = pruning.prune(posterior, 0.5, "snr")
    kept = _flat(pruned.mask) > 0
    assert 0 < kept.sum() < kept.size
    eps = pruned.sample_noise(key)
    w, log_q = pruned.reparameterize(eps)
    w_drawn, log_q_drawn = pruned.sample_and_log_prob(key)
    assert _flat(w).tobytes() == _flat(w_drawn).tobytes() and float(log_q) == float(log_q_drawn)
    # Against float64 numpy: log N(w | μ, σ²) of the kept weights; the entropy's closed form.
    mu = _flat(posterior.mu).astype(np.float64)
    sigma = np.logaddexp(_flat(posterior.rho).astype(np.float64), 0.0)
    e = _flat(eps).astype(np.float64)
    expected = (-0.5 * e**2 - np.log(sigma) - 0.5 * np.log(2 * np.pi))[kept].sum()
    np.testing.assert_allclose(float(log_q), expected, rtol=1e-5)
    # log_prob of a point away from the sample: (w − μ)/σ is not ε there.
    shifted = jax.tree_util.tree_map(lambda m, x: x + 0.01 * m, pruned.mask, w)
    z = (_flat(shifted).astype(np.float64) - mu) / sigma
    expected = (-0.5 * z**2 - np.log(sigma) - 0.5 * np.log(2 * np.pi))[kept].sum()
    np.testing.assert_allclose(float(pruned.log_prob(shifted)), expected, rtol=1e-5)
    expected = (np.log(sigma) + 0.5 * np.log(2 * np.pi * np.e))[kept].sum()
    np.testing.assert_allclose(float(pruned.entropy()), expected, rtol=1e-5)
    # Gradients with respect to ρ: finite everywhere, 0 for the removed weights.
    for f in (
        lambda q: q.reparameterize(eps)[1],
        lambda q: q.log_prob(shifted),
        lambda q: q.entropy(),
    ):
        grad = _flat(jax.grad(f)(pruned).rho)
        assert np.all(np.isfinite(grad)) and np.all(grad[~kept] == 0.0)


def test_removed_weights_have_sigma_exactly_zero_from_rho_alone(posterior, tmp_path):
    """softplus(ρ) of a removed weight is exactly 0 in float32 and float64, without the mask:
    the unmasked σ of `MeanFieldGaussian.stddev` and of the compact export's ρ."""
    pruned = pruning.prune(posterior, 0.5, "snr")
    removed = _flat(pruned.mask) == 0
    assert np.all(_flat(MeanFieldGaussian.stddev(pruned))[removed] == 0.0)
    path = str(tmp_path / "pruned.npz")
    pruning.save_compact(path, pruned)
    assert np.all(_flat(MeanFieldGaussian.stddev(pruning.load_compact(path)))[removed] == 0.0)
    assert np.all(np.logaddexp(_flat(pruned.rho).astype(np.float64)[removed], 0.0) == 0.0)


def test_pruning_again_never_brings_back_a_removed_weight_on_a_tie():
    """A removed weight (SNR 0) tied with earlier kept weights of μ = 0 (SNR 0 too): the
    stable ranking removes the earlier ones, and the old mask keeps the removed one out, so it
    is not 'kept' with σ = 0 (which would make log q infinite)."""
    mu = {"w": jnp.asarray([0.0, 0.0, 0.0, 2.0, 3.0, 1.5, 0.7, 0.9], jnp.float32)}
    mask = {"w": jnp.asarray([1, 1, 0, 1, 1, 1, 1, 1], jnp.float32)}
    rho = {"w": jnp.where(mask["w"] > 0, -1.0, pruning.PRUNED_RHO)}
    once = pruning.PrunedGaussian(mu=mu, rho=rho, mask=mask)
    twice = pruning.prune(once, 0.25, "snr")  # ⌊0.25 · 8⌋ = 2: positions 0 and 1
    removed = _flat(twice.mask) == 0
    np.testing.assert_array_equal(np.flatnonzero(removed), [0, 1, 2])
    _, log_q = twice.sample_and_log_prob(jax.random.key(0))
    assert np.isfinite(float(log_q))


def test_point_estimate_prunes_by_magnitude_only(posterior):
    point = PointEstimate(mu=posterior.mu)
    pruned = pruning.prune(point, 0.5, "magnitude")
    assert np.sum(_flat(pruned.mu) == 0) == math.floor(0.5 * point.num_weights())
    with pytest.raises(ValueError, match="mean-field"):
        pruning.prune(point, 0.5, "snr")


def test_bad_fraction_and_criterion(posterior):
    with pytest.raises(ValueError, match="fraction"):
        pruning.prune(posterior, 1.5)
    with pytest.raises(ValueError, match="criterion"):
        pruning.prune(posterior, 0.5, "random")


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.98])
def test_compact_export_round_trips(posterior, tmp_path, fraction):
    pruned = pruning.prune(posterior, fraction, "snr")
    path = str(tmp_path / "pruned.npz")
    size = pruning.save_compact(path, pruned)
    assert size == os.path.getsize(path)
    loaded = pruning.load_compact(path)
    for field in ("mu", "rho", "mask"):
        a, b = getattr(loaded, field), getattr(pruned, field)
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        assert _flat(a).tobytes() == _flat(b).tobytes(), field
    key = jax.random.key(7)
    assert _flat(loaded.sample(key)).tobytes() == _flat(pruned.sample(key)).tobytes()


@pytest.mark.parametrize("fraction", [0.0, 0.1])
def test_compact_export_keeps_a_kept_weight_whose_mu_is_zero(posterior, tmp_path, fraction):
    """The export goes by the mask, not by μ ≠ 0: biases start at exactly 0 (as Flax's do).
    Of the 19 zero biases (SNR 0, the lowest), ⌊0.1 · 155⌋ = 15 go; the other 4, and all 19
    at f = 0, are kept with μ = 0 and must come back kept, with their own ρ."""
    zero_bias = posterior.replace(
        mu={
            layer: {**params, "bias": jnp.zeros_like(params["bias"])}
            for layer, params in posterior.mu.items()
        }
    )
    n = zero_bias.num_weights()
    assert n == 155 and int(np.sum(_flat(zero_bias.mu) == 0.0)) == 19
    pruned = pruning.prune(zero_bias, fraction, "snr")
    kept = _flat(pruned.mask) > 0
    assert kept.sum() == n - math.floor(round(fraction * 10) * n / 10)
    assert np.any(kept & (_flat(pruned.mu) == 0.0))  # Kept weights with μ exactly 0.
    path = str(tmp_path / "pruned.npz")
    pruning.save_compact(path, pruned)
    loaded = pruning.load_compact(path)
    assert loaded.num_kept() == kept.sum()
    for field in ("mu", "rho", "mask"):
        assert _flat(getattr(loaded, field)).tobytes() == _flat(getattr(pruned, field)).tobytes()


def test_a_pruned_gaussian_masks_its_mean_stddev_and_samples_whatever_its_mu_and_rho():
    """`PrunedGaussian`'s contract holds for any μ and ρ at a removed weight, not only for the
    μ = 0, ρ = PRUNED_RHO that `prune` writes there: mean μ ∘ mask, σ = softplus(ρ) ∘ mask
    (numpy's logaddexp), and samples exactly 0 at the removed weights."""
    mu = {"w": jnp.asarray([1.0, 2.0, -3.0, 0.5], jnp.float32)}
    rho = {"w": jnp.asarray([0.0, -1.0, 0.5, 1.0], jnp.float32)}
    mask = {"w": jnp.asarray([1.0, 0.0, 1.0, 0.0], jnp.float32)}
    q = pruning.PrunedGaussian(mu=mu, rho=rho, mask=mask)
    np.testing.assert_array_equal(np.asarray(q.mean()["w"]), [1.0, 0.0, -3.0, 0.0])
    sigma = np.logaddexp(np.asarray([0.0, -1.0, 0.5, 1.0]), 0.0) * [1, 0, 1, 0]
    np.testing.assert_allclose(np.asarray(q.stddev()["w"]), sigma, rtol=1e-6)
    samples = jax.vmap(q.sample)(jax.random.split(jax.random.key(0), 16))["w"]
    assert np.all(np.asarray(samples)[:, [1, 3]] == 0.0)
    assert np.all(np.asarray(samples)[:, [0, 2]] != 0.0)


# End to end on a tiny run -----------------------------------------------------------------


def _fake_mnist(config):
    """MNIST-shaped arrays whose class is written in the first pixels (learnable in 1 epoch)."""
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 10, n).astype(np.int32)
        x = rng.normal(0.0, 0.1, (n, 28, 28, 1)).astype(np.float32)
        x[np.arange(n), 0, y, 0] += 2.0
        return x, y

    return {"train": split(256), "validation": split(128), "test": split(128)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fast_compile):
    config = test_config.get_config()
    config.num_epochs = 1
    config.data.train_subset = 256
    config.data.eval_subset = 128
    config.eval.batch_size = 128
    workdir = str(tmp_path_factory.mktemp("prune") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "load_data", _fake_mnist)
        train.train_and_evaluate(config, workdir)
        rows = pruning.pruning_experiment(workdir, (0.0, 0.5, 0.98))
    return workdir, rows


def test_pruning_experiment_writes_table_plot_and_exports(tiny_run):
    workdir, rows = tiny_run
    assert [(r["criterion"], r["fraction_removed"]) for r in rows] == [
        (c, f) for c in ("snr", "magnitude") for f in (0.0, 0.5, 0.98)
    ]
    with open(os.path.join(workdir, "pruning.json")) as f:
        saved = json.load(f)
    assert saved["rows"] == rows
    n = saved["num_weights"]
    assert n == 784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert rows[2]["weights_kept"] == n - math.floor(0.98 * n)
    assert rows[2]["compact_bytes"] < saved["dense_bytes"] / 5
    assert os.path.getsize(os.path.join(workdir, "plots", "pruning.png")) > 1000
    with open(os.path.join(workdir, "pruning.md")) as f:
        table = f.read()
    assert "| snr | 98% |" in table and "1.39%" in table
    assert saved["dense_compressed_bytes"] < saved["dense_bytes"]
    assert "compressed as the compact files are" in table
    for r in rows:
        assert 0.0 <= r["test_error"] <= 1.0 and np.isfinite(r["test_nll"])


def test_each_row_evaluates_its_own_pruned_network(tiny_run):
    """The 98% rows against the pruned network evaluated by hand (not the dense one)."""
    workdir, rows = tiny_run
    experiment, state = train.load_run(workdir)
    test = tuple(jnp.asarray(a) for a in _fake_mnist(None)["test"])
    posterior = state.params["posterior"]
    for row in (rows[2], rows[5]):
        pruned = pruning.prune(posterior, row["fraction_removed"], row["criterion"])
        params = {**state.params, "posterior": pruned}
        result = train.evaluate(experiment, params, test, jax.random.key(0))
        assert row["test_nll"] == pytest.approx(float(result["nll"]), rel=1e-5)
        assert abs(row["test_nll"] - rows[0]["test_nll"]) > 1e-3  # Pruning changed it.


def test_a_point_estimate_run_is_pruned_by_magnitude(tmp_path, fast_compile):
    config = test_config.get_config()
    config.num_epochs = 1
    config.data.train_subset, config.data.eval_subset, config.eval.batch_size = 256, 128, 128
    config.posterior.name, config.prior.name = "point", "flat"
    workdir = str(tmp_path / "sgd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "load_data", _fake_mnist)
        train.train_and_evaluate(config, workdir)
        rows = pruning.pruning_experiment(workdir, (0.0, 0.5))
    assert [r["criterion"] for r in rows] == ["magnitude", "magnitude"]
    assert os.path.exists(os.path.join(workdir, "pruned", "dense.npz"))


def test_a_regression_run_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from bbb.errors import ConfigError
    from configs import regression as regression_config

    config = regression_config.get_config()
    experiment = train.build(config, *train.dataset_spec(config))
    state = jax.eval_shape(lambda: train.init_state(experiment, jax.random.key(0)))
    monkeypatch.setattr(train, "load_run", lambda workdir: (experiment, state))
    with pytest.raises(ConfigError, match="a classification run"):
        pruning.pruning_experiment(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_fraction_zero_matches_the_unpruned_evaluation(tiny_run):
    workdir, rows = tiny_run
    experiment, state = train.load_run(workdir)
    test = tuple(jnp.asarray(a) for a in _fake_mnist(None)["test"])
    result = train.evaluate(experiment, state.params, test, jax.random.key(0))
    assert rows[0]["test_error"] == pytest.approx(float(result["error"]), abs=1e-7)
    assert rows[0]["test_error_mean_weights"] == pytest.approx(
        float(result["error_mean_weights"]), abs=1e-7
    )


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--fractions=0.5,1.5", "--fractions"),
        ("--fractions=half", "--fractions"),
        ("--criteria=snr,size", "--criteria"),
    ],
)
def test_script_names_a_bad_flag_before_loading_the_run(tmp_path, flag, message):
    """No run needs to exist: the flags are checked before the workdir is read."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "prune.py"), f"--workdir={tmp_path}", flag],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert os.listdir(tmp_path) == []
