"""Gradient-variance measurement: a known variance, and the estimators' ordering."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbb import grad_variance, models, objective, posterior, priors
from bbb.errors import ConfigError


@pytest.fixture(scope="module")
def problem():
    model = models.MLP(hidden_sizes=(16,), num_outputs=3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(256, 8)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 256), jnp.int32)
    params = model.init(jax.random.key(0), x[:1])["params"]
    q = posterior.init_posterior(jax.random.key(1), params, -2.0)
    fe = objective.FreeEnergy(
        model,
        priors.gaussian(1.0),
        objective.Categorical(),
        num_train=256,
        num_batches=8,
        kl="closed_form",
    )
    return fe, fe.init_params(q), (x, y)


def test_point_posterior_full_batch_has_zero_variance(problem):
    """No noise and the whole data set as the batch: every draw has the same gradient."""
    fe, params, data = problem
    point = {**params, "posterior": posterior.PointEstimate(params["posterior"].mu)}
    result = grad_variance.gradient_variance(
        fe, point, data, jax.random.key(0), estimator="reparam", batch_size=256, num_draws=5
    )
    assert all(v < 1e-12 for v in result.values()), result


def test_local_estimators_have_lower_variance_than_shared_weights(problem):
    fe, params, data = problem
    results = {
        e: grad_variance.gradient_variance(
            fe, params, data, jax.random.key(0), estimator=e, batch_size=32, num_draws=200
        )
        for e in ("reparam", "local_reparam", "per_example")
    }
    layer = "['Dense_0']['kernel']"
    assert results["local_reparam"][layer] < results["reparam"][layer]
    assert results["per_example"][layer] < results["reparam"][layer]
    table = grad_variance.variance_table(results)
    assert table.count("\n") == 2 + 3 and layer in table


def test_likelihood_term_leaves_out_the_kl_and_only_the_kl(problem):
    """The likelihood term's gradient does not depend on the KL's weight; the free energy's does.

    With the Monte-Carlo KL, its noise adds to the free energy's gradient variance, scaled by
    the KL's temperature squared, while the likelihood term's gradients are
    the same draws whatever the temperature (same keys); with the closed-form KL, a constant
    gradient, the two terms have the same variance.
    """
    fe, params, data = problem
    mc = dataclasses.replace(fe, kl="mc")
    # ∂(log q − log P)/∂μ = w = μ + σε per weight here: the KL's noise, T σ ε / N, has variance
    # T² σ² / N² ≈ 0.25 at T = 1000 (σ = softplus(−2), N = 256), over 100× the likelihood's.
    hot = dataclasses.replace(mc, temperature=1000.0)

    def measure(objective, term):
        return grad_variance.gradient_variance(
            objective,
            params,
            data,
            jax.random.key(3),
            estimator="reparam",
            batch_size=32,
            num_draws=50,
            term=term,
        )

    layer = "['Dense_0']['kernel']"
    assert measure(hot, "likelihood") == pytest.approx(measure(mc, "likelihood"), rel=1e-5)
    hot_variance = measure(hot, "free_energy")[layer]
    assert hot_variance > 10 * measure(mc, "free_energy")[layer]
    # The KL's share of the minibatch loss is M π_i T KL / N with π_i = 1/M: its gradient noise
    # T σ ε / (N σ_p²) has variance (T / N)² σ² here, whatever M (a KL weighted M times too
    # heavily would give M² = 64 times that).
    sigma = np.asarray(params["posterior"].stddev()["Dense_0"]["kernel"], np.float64)
    expected = (1000.0 / 256) ** 2 * np.mean(np.square(sigma))
    assert hot_variance == pytest.approx(expected, rel=0.15)
    closed = measure(fe, "free_energy")
    assert closed == pytest.approx(measure(fe, "likelihood"), rel=1e-4)
    results = {"free_energy": {"reparam": closed}, "likelihood": {"reparam": closed}}
    report = grad_variance.variance_report(results, 50, 7, "wd")
    assert report.count("| reparam |") == 2 and "KL weight 0" in report and "step 7" in report
    with pytest.raises(ConfigError, match="term"):
        measure(fe, "kl")


def test_fixed_batch_leaves_only_the_estimators_noise(problem):
    """On one fixed minibatch a point estimate has no variance at all (sampled minibatches do);
    and per-example noise beats one shared weight sample by more than with minibatch noise."""
    fe, params, data = problem
    point = {**params, "posterior": posterior.PointEstimate(params["posterior"].mu)}

    def measure(p, estimator, fixed):
        return grad_variance.gradient_variance(
            fe,
            p,
            data,
            jax.random.key(5),
            estimator=estimator,
            batch_size=32,
            num_draws=100,
            term="likelihood",
            fixed_batch=fixed,
        )

    layer = "['Dense_0']['kernel']"
    assert all(v < 1e-12 for v in measure(point, "reparam", True).values())
    assert measure(point, "reparam", False)[layer] > 1e-6
    fixed = {e: measure(params, e, True)[layer] for e in ("reparam", "local_reparam")}
    sampled = {e: measure(params, e, False)[layer] for e in ("reparam", "local_reparam")}
    assert fixed["local_reparam"] < fixed["reparam"]
    assert fixed["local_reparam"] / fixed["reparam"] < sampled["local_reparam"] / sampled["reparam"]
    report = grad_variance.variance_report({"likelihood": {"r": {layer: 1.0}}}, 9, 1, "wd", True)
    assert "noise, on one fixed minibatch" in report


def test_variance_is_the_sample_variance_of_the_draws_gradients(problem):
    """A point estimate, one example per draw: three draws' gradients computed here one by
    one, their sample variance (ddof = 1) averaged over each layer's parameters."""
    fe, params, data = problem
    point = {**params, "posterior": posterior.PointEstimate(params["posterior"].mu)}
    key = jax.random.key(11)
    result = grad_variance.gradient_variance(
        fe, point, data, key, estimator="reparam", batch_size=1, num_draws=3, term="likelihood"
    )
    x, y = data
    grads = []
    for k in jax.random.split(key, 3):
        index = jax.random.choice(jax.random.split(k)[0], x.shape[0], (1,), replace=False)
        loss = lambda p, i=index: fe(p, (x[i], y[i]), jax.random.key(0), 0.0)[0]
        grads.append(jax.grad(loss)(point)["posterior"].mu)
    flat = [jax.tree_util.tree_flatten_with_path(g)[0] for g in grads]
    for leaves in zip(*flat, strict=True):
        path = jax.tree_util.keystr(leaves[0][0])
        values = np.stack([np.asarray(v, np.float64) for _, v in leaves])
        expected = np.var(values, axis=0, ddof=1).mean()
        assert expected > 0
        assert result[path] == pytest.approx(expected, rel=1e-4), path


def test_per_example_keeps_the_runs_samples_and_needs_two_draws(problem):
    """With K = 8 samples each example's gradient averages 8 weight samples, as reparam's
    minibatch does: the per-example variance falls with K like the others'."""
    fe, params, data = problem

    def measure(objective, estimator):
        return grad_variance.gradient_variance(
            objective,
            params,
            data,
            jax.random.key(2),
            estimator=estimator,
            batch_size=32,
            num_draws=60,
            term="likelihood",
            fixed_batch=True,
        )["['Dense_0']['kernel']"]

    many = dataclasses.replace(fe, num_samples=8)
    for estimator in ("per_example", "reparam"):
        assert measure(many, estimator) < 0.5 * measure(fe, estimator), estimator
    for bad in (0, 1, 2.5):
        with pytest.raises(ConfigError, match="num_draws"):
            grad_variance.gradient_variance(
                fe,
                params,
                data,
                jax.random.key(0),
                estimator="reparam",
                batch_size=8,
                num_draws=bad,
            )


def test_every_estimator_sees_the_same_minibatches(problem):
    """A point estimate has no noise, so every estimator's gradients are the likelihood's on
    the minibatches drawn: equal variances mean equal minibatches (the comparison between
    estimators would otherwise carry the minibatches' own variance)."""
    fe, params, data = problem
    point = {**params, "posterior": posterior.PointEstimate(params["posterior"].mu)}
    results = [
        grad_variance.gradient_variance(
            fe, point, data, jax.random.key(4), estimator=e, batch_size=8, num_draws=20
        )
        for e in ("reparam", "per_example", "local_reparam", "flipout")
    ]
    assert results[0]["['Dense_0']['kernel']"] > 1e-8
    for other in results[1:]:
        assert other == pytest.approx(results[0], rel=1e-4)


def test_per_example_draws_whole_weight_samples_whatever_the_runs_estimator(problem):
    """per_example replaces the run's estimator by reparam for every example: the same draws,
    to the last bit, from an objective whose own estimator is reparam or flipout (with the MC
    KL, flipout takes its KL at its own perturbation: different gradients)."""
    fe, params, data = problem
    mc = dataclasses.replace(fe, kl="mc")
    results = [
        grad_variance.gradient_variance(
            dataclasses.replace(mc, estimator=own),
            params,
            data,
            jax.random.key(8),
            estimator="per_example",
            batch_size=4,
            num_draws=3,
        )
        for own in ("reparam", "flipout")
    ]
    assert results[1] == pytest.approx(results[0], rel=1e-6)


@pytest.mark.parametrize("estimator", grad_variance.ESTIMATORS)
def test_kl_gradient_noise_has_its_closed_form_variance_under_each_estimator(problem, estimator):
    """Inputs of zeros: the likelihood has no gradient in the first kernel, whose gradient is
    the MC KL's alone. With a N(0, 1) prior, ∂(log q − log P)/∂μ = w = μ + σε, weighted in the
    loss by M π T / N = 1 / N (π = 1/M, T = 1): variance σ² / N² per weight, and σ² / (N² B)
    for per_example, whose B examples each draw their own w and are averaged. The likelihood
    term (KL weight 0) has none. A KL weighted M or N/B times too heavily would give 64 times
    that; per_example keeping the KL in the likelihood term, a variance above 0."""
    fe, params, (x, y) = problem
    mc = dataclasses.replace(fe, kl="mc")
    zeros, batch_size, num_draws = jnp.zeros_like(x), 32, 60

    def measure(term):
        return grad_variance.gradient_variance(
            mc,
            params,
            (zeros, y),
            jax.random.key(6),
            estimator=estimator,
            batch_size=batch_size,
            num_draws=num_draws,
            term=term,
        )["['Dense_0']['kernel']"]

    sigma = np.asarray(params["posterior"].stddev()["Dense_0"]["kernel"], np.float64)
    expected = np.mean(np.square(sigma)) / fe.num_train**2
    if estimator == "per_example":
        expected /= batch_size
    # The mean over 8 × 16 independent weights of sample variances from 60 draws: relative
    # standard error √(2 / 59 / 128) ≈ 0.016.
    assert measure("free_energy") == pytest.approx(expected, rel=0.1)
    assert measure("likelihood") == 0.0
