"""Tests for bbb.objective: the KL schedules, the free energy's scale and minibatch weighting
(against a numpy computation from the same sampled weights), its gradients (against finite
differences), the likelihoods and the config checks."""

import dataclasses
import math
from fractions import Fraction

import jax
import jax.extend.core
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.special
import scipy.stats

from bbb import models, objective, priors
from bbb.errors import ConfigError
from bbb.posterior import PointEstimate
from tests.conftest import all_equations, numpy_params, numpy_posterior

pytestmark = pytest.mark.usefixtures("fast_compile")

NUM_TRAIN, NUM_CLASSES = 16, 3
_rng = np.random.default_rng(0)
X = _rng.normal(size=(NUM_TRAIN, 2)).astype(np.float32)
Y = _rng.integers(0, NUM_CLASSES, size=NUM_TRAIN).astype(np.int32)
MODEL = models.MLP(hidden_sizes=(3,), num_outputs=NUM_CLASSES)


def _posterior(model=MODEL, rho=(-2.5, -0.5), seed=0, dtype=jnp.float32):
    """A mean-field posterior over `model`, μ and ρ drawn by numpy."""
    post = numpy_posterior(numpy_params(model, X[:1], seed=seed, scale=1.5), rho, seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), post)


def _np_mlp(w, x, activation=lambda h: np.maximum(h, 0.0)):
    """The MLP's forward pass in float64 numpy: Dense_0 → activation → Dense_1."""
    w = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), w)
    hidden = activation(x.astype(np.float64) @ w["Dense_0"]["kernel"] + w["Dense_0"]["bias"])
    return hidden @ w["Dense_1"]["kernel"] + w["Dense_1"]["bias"]


def _np_log_lik(w, x, y):
    log_probs = scipy.special.log_softmax(_np_mlp(w, x), axis=-1)
    return log_probs[np.arange(len(y)), y]  # [B]


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


# KL schedules ------------------------------------------------------------------------------

# Global steps 0..799 for every schedule (one array shape: the eager ops compile once).
STEPS = jnp.arange(800)


@pytest.mark.parametrize("num_batches", [1, 5, 10])
def test_blundell_weights_are_exact_powers_of_two(num_batches):
    steps = np.arange(2 * num_batches)  # two epochs: the schedule restarts every epoch
    weights = np.asarray(objective.kl_weight("blundell", STEPS, num_batches), np.float64)
    weights = weights[: 2 * num_batches]
    expected = [
        float(Fraction(2 ** (num_batches - i), 2**num_batches - 1))
        for i in (int(t) % num_batches + 1 for t in steps)
    ]
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert abs(weights[:num_batches].sum() - 1.0) < 1e-6
    assert np.all(np.diff(weights[:num_batches]) < 0)  # the first minibatch gets the most KL
    # A scalar step gives the same value.
    np.testing.assert_allclose(
        float(objective.kl_weight("blundell", num_batches + 1, num_batches)), weights[1], rtol=1e-7
    )


def test_blundell_weights_for_a_long_epoch_are_finite_and_sum_to_one():
    num_batches = 390  # 50,000 / 128
    weights = np.asarray(objective.kl_weight("blundell", STEPS, num_batches), np.float64)
    # The second epoch repeats the first.
    np.testing.assert_array_equal(weights[num_batches : 2 * num_batches], weights[:num_batches])
    weights = weights[:num_batches]
    assert np.all(np.isfinite(weights)) and np.all(weights >= 0)
    assert np.all(np.diff(weights) <= 0)
    assert abs(weights.sum() - 1.0) < 1e-6
    normal = slice(0, 120)  # where 2^−i is a normal float32
    expected = [float(Fraction(2 ** (num_batches - i), 2**num_batches - 1)) for i in range(1, 121)]
    np.testing.assert_allclose(weights[normal], expected, rtol=1e-6)


def test_uniform_and_anneal_weights():
    np.testing.assert_allclose(
        np.broadcast_to(objective.kl_weight("uniform", STEPS, 7), (800,)), 1 / 7, rtol=1e-7
    )
    assert float(objective.kl_weight("uniform", 123, 7)) == pytest.approx(1 / 7, rel=1e-7)
    warmup, num_batches = 10, 4
    weights = np.asarray(objective.kl_weight("anneal", STEPS, num_batches, warmup))
    expected = [float(min(Fraction(t + 1, warmup), 1) / num_batches) for t in range(800)]
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert weights[warmup - 1] == pytest.approx(1 / num_batches)
    np.testing.assert_allclose(weights[warmup:], 1 / num_batches, rtol=1e-7)


@pytest.mark.parametrize("warmup", [0, 1])
def test_anneal_without_a_warmup_is_the_uniform_schedule(warmup):
    """`objective.kl_warmup_steps` may be 0 (train.py admits any non-negative count): no warm-up,
    so π_i = 1/M from the very first step, as with a warm-up of one step."""
    num_batches = 4
    weights = np.asarray(objective.kl_weight("anneal", STEPS, num_batches, warmup))
    np.testing.assert_allclose(weights, 1 / num_batches, rtol=1e-7)
    assert float(objective.kl_weight("anneal", 0, num_batches, warmup)) == pytest.approx(0.25)


def test_unknown_kl_schedule_names_the_field():
    with pytest.raises(ConfigError) as info:
        objective.kl_weight("cosine", 0, 10)
    assert info.value.field == "objective.kl_schedule" and info.value.value == "cosine"


# The free energy: scale, KL weighting, temperature -------------------------------------------


def _free_energy(**kwargs):
    defaults = dict(
        model=MODEL,
        prior=priors.gaussian(1.0),
        likelihood=objective.Categorical(),
        num_train=NUM_TRAIN,
        num_batches=1,
    )
    return objective.FreeEnergy(**{**defaults, **kwargs})


@pytest.mark.parametrize("num_samples", [1, 2])
@pytest.mark.parametrize("kl", ["mc", "closed_form"])
def test_loss_matches_a_numpy_computation_from_the_same_weights(kl, num_samples):
    """loss = M π T KL / N − (1/B) Σ_b (1/K) Σ_k log p(y_b | x_b, w_k), and only KL has T.
    (K = 1 takes its own path, without a vmap.)"""
    num_train, num_batches, pi, batch = 40, 3, 0.3, slice(0, 5)
    sigma_p = math.exp(-1.0)
    post = _posterior()
    energies = {
        temperature: _free_energy(
            prior=priors.gaussian(sigma_p),
            num_train=num_train,
            num_batches=num_batches,
            num_samples=num_samples,
            kl=kl,
            temperature=temperature,
        )
        for temperature in (0.5, 2.0)
    }
    params = energies[0.5].init_params(post)
    key = jax.random.key(42)

    @jax.jit
    def run(params):
        outputs = {t: fe(params, (X[batch], Y[batch]), key, pi) for t, fe in energies.items()}
        # The weights the objective draws: K keys, each split into (weights, kl, dropout).
        weights = jax.vmap(lambda k: params["posterior"].sample(jax.random.split(k, 3)[0]))(
            jax.random.split(key, num_samples)
        )
        return outputs, weights

    outputs, weights = run(params)
    samples = [jax.tree_util.tree_map(lambda a, k=k: a[k], weights) for k in range(num_samples)]
    log_lik = np.mean([_np_log_lik(w, X[batch], Y[batch]) for w in samples], axis=0)  # [B]
    mu, sigma = _flat(post.mu), np.log1p(np.exp(_flat(post.rho)))
    if kl == "mc":
        kl_value = np.mean(
            [
                scipy.stats.norm.logpdf(_flat(w), mu, sigma).sum()
                - scipy.stats.norm.logpdf(_flat(w), 0.0, sigma_p).sum()
                for w in samples
            ]
        )
    else:
        kl_value = np.sum(np.log(sigma_p / sigma) + (sigma**2 + mu**2) / (2 * sigma_p**2) - 0.5)
    for temperature, (loss, metrics) in outputs.items():
        expected = num_batches * pi * temperature * kl_value / num_train - log_lik.mean()
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["elbo"]), -expected, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["nll"]), -log_lik.mean(), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["kl"]), kl_value, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["kl_weight"]), pi, rtol=1e-7)
        np.testing.assert_allclose(float(metrics["sigma_mean"]), sigma.mean(), rtol=1e-5)
        probs = np.mean([scipy.special.softmax(_np_mlp(w, X[batch]), -1) for w in samples], 0)
        assert float(metrics["accuracy"]) == pytest.approx(np.mean(probs.argmax(-1) == Y[batch]))
        assert {"loss", "nll", "kl", "kl_weight", "elbo", "accuracy", "sigma_mean"} <= set(metrics)
    # The temperature scales the KL term and nothing else.
    (cold, cold_metrics), (hot, hot_metrics) = outputs[0.5], outputs[2.0]
    assert float(cold_metrics["nll"]) == float(hot_metrics["nll"])
    np.testing.assert_allclose(
        float(hot - cold), 1.5 * num_batches * pi * kl_value / num_train, rtol=1e-4
    )


def _minibatches(num_batches):
    size = NUM_TRAIN // num_batches
    return X.reshape(num_batches, size, -1), Y.reshape(num_batches, size)


def test_minibatch_losses_average_to_the_full_batch_loss_exactly():
    """Same weights (same key): the mean over an epoch of F̂_i / N equals the full-batch F / N,
    for any KL schedule with Σ π_i = 1, so the KL is counted once per epoch, whatever B is."""
    num_batches = 4
    prior = priors.scale_mixture(0.5, 1.0, math.exp(-6.0))
    full = _free_energy(prior=prior, num_samples=2)
    mini = _free_energy(prior=prior, num_samples=2, num_batches=num_batches)
    xs, ys = _minibatches(num_batches)
    post = _posterior()

    @jax.jit
    def run(params, key, weights):
        loss, metrics = full(params, (X, Y), key, 1.0)
        losses, mini_metrics = jax.vmap(lambda x, y, pi: mini(params, (x, y), key, pi))(
            xs, ys, weights
        )
        return loss, metrics, losses, mini_metrics

    for schedule in ("uniform", "blundell"):
        weights = jnp.broadcast_to(
            objective.kl_weight(schedule, jnp.arange(num_batches), num_batches), (num_batches,)
        )
        for posterior in (post, PointEstimate(mu=post.mu)):
            params = full.init_params(posterior)
            loss, metrics, losses, mini_metrics = run(params, jax.random.key(3), weights)
            np.testing.assert_allclose(float(jnp.mean(losses)), float(loss), rtol=1e-5)
            np.testing.assert_allclose(
                np.asarray(mini_metrics["kl"]), float(metrics["kl"]), rtol=1e-6
            )
            np.testing.assert_allclose(
                float(jnp.mean(mini_metrics["nll"])), float(metrics["nll"]), rtol=1e-5
            )
            # The two terms are on different scales, so a wrong weighting of either shows.
            assert abs(float(metrics["kl"]) / NUM_TRAIN) > 0.2 * float(metrics["nll"])


def test_point_estimate_loss_is_penalised_negative_log_likelihood():
    """q a point mass at μ: F / N = −log P(μ) / N − (1/B) Σ log p(y | x, μ), in numpy."""
    post = PointEstimate(mu=numpy_params(MODEL, X[:1], seed=1, scale=1.5))
    fe = _free_energy(prior=priors.laplace(0.5), num_batches=2)
    loss, metrics = jax.jit(fe)(fe.init_params(post), (X[:8], Y[:8]), jax.random.key(0), 0.5)
    neg_log_prior = -scipy.stats.laplace(scale=0.5).logpdf(_flat(post.mu)).sum()
    log_lik = _np_log_lik(post.mu, X[:8], Y[:8])
    np.testing.assert_allclose(float(loss), neg_log_prior / NUM_TRAIN - log_lik.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), neg_log_prior, rtol=1e-5)
    assert float(metrics["sigma_mean"]) == 0.0


def test_kl_divergence_is_the_closed_form_or_log_q_minus_log_p_at_one_sample():
    """`FreeEnergy.kl_divergence`, public, is in the loss only by its MC branch (and only under
    local_reparam): both branches against numpy, the MC one at the weights of its own key."""
    sigma_p = math.exp(-1.0)
    post = _posterior()
    mu, sigma = _flat(post.mu), np.log1p(np.exp(_flat(post.rho)))
    closed = np.sum(np.log(sigma_p / sigma) + (sigma**2 + mu**2) / (2 * sigma_p**2) - 0.5)
    assert closed > 1.0  # a sign error shows
    key = jax.random.key(9)
    w = _flat(post.sample(key))
    at_sample = (
        scipy.stats.norm.logpdf(w, mu, sigma).sum() - scipy.stats.norm.logpdf(w, 0.0, sigma_p).sum()
    )
    for kl, expected in (("closed_form", closed), ("mc", at_sample)):
        fe = _free_energy(prior=priors.gaussian(sigma_p), kl=kl)
        got = jax.jit(fe.kl_divergence)(fe.init_params(post), key)
        np.testing.assert_allclose(float(got), expected, rtol=1e-5, err_msg=kl)


def test_dropout_is_on_in_the_training_loss():
    """The dropout baseline trains with dropout: its loss at fixed μ changes with the key, and
    equals the dropout-free loss on no key (a loss taken with train=False would)."""
    model = models.MLP(hidden_sizes=MODEL.hidden_sizes, num_outputs=NUM_CLASSES, dropout_rate=0.5)
    post = PointEstimate(mu=numpy_params(MODEL, X[:1], seed=1, scale=1.5))
    with_dropout = _free_energy(model=model, prior=priors.flat())
    without = _free_energy(prior=priors.flat())
    params = with_dropout.init_params(post)
    batch = (X[:8], Y[:8])
    losses = [float(with_dropout(params, batch, jax.random.key(k), 1.0)[0]) for k in range(4)]
    plain = float(without(params, batch, jax.random.key(0), 1.0)[0])
    assert len(set(losses)) == 4
    assert all(abs(loss - plain) > 1e-4 for loss in losses)


def test_loss_does_not_depend_on_batch_size_in_expectation():
    """Per-example noise (local_reparam): equal means over many keys, within MC error."""
    estimator = "local_reparam"
    num_batches, num_keys = 4, 600
    full = _free_energy(estimator=estimator)
    mini = _free_energy(estimator=estimator, num_batches=num_batches)
    xs, ys = _minibatches(num_batches)
    params = full.init_params(_posterior(rho=(-1.5, -0.5)))

    @jax.jit
    def run(params, keys):
        def full_loss(key):
            return full(params, (X, Y), key, 1.0)[0]

        def epoch_mean_loss(key):
            keys = jax.random.split(key, num_batches)
            return jnp.mean(
                jax.vmap(lambda x, y, k: mini(params, (x, y), k, 1.0 / num_batches)[0])(
                    xs, ys, keys
                )
            )

        return jax.vmap(full_loss)(keys), jax.vmap(epoch_mean_loss)(keys)

    keys = jax.random.split(jax.random.key(0), num_keys)
    full_losses, epoch_losses = (np.asarray(a, np.float64) for a in run(params, keys))
    standard_error = np.sqrt(
        full_losses.var(ddof=1) / num_keys + epoch_losses.var(ddof=1) / num_keys
    )
    difference = full_losses.mean() - epoch_losses.mean()
    assert abs(difference) < 4 * standard_error, (difference, standard_error)
    # Power: scaling the KL by 1/B instead of 1/N would move the mean by 3 KL/N here.
    kl_per_example = float(priors.gaussian(1.0).kl({}, params["posterior"])) / NUM_TRAIN
    assert 4 * standard_error < 0.5 * kl_per_example


# Gradients --------------------------------------------------------------------------------


def test_gradient_matches_central_finite_differences():
    """∂F/∂μ and ∂F/∂ρ at a fixed key (fixed ε), in float64, against central differences."""
    model = models.MLP(hidden_sizes=(3,), num_outputs=2, activation="tanh")
    y = (Y % 2).astype(np.int32)
    with jax.enable_x64(True):
        post = _posterior(model=model, dtype=jnp.float64)
        fe = _free_energy(
            model=model,
            prior=priors.scale_mixture(0.5, 1.0, math.exp(-2.0)),
            num_batches=4,
            num_samples=2,
        )
        flat, unravel = jax.flatten_util.ravel_pytree(post)
        key = jax.random.key(5)
        x = X[:8].astype(np.float64)

        def loss(theta):
            params = fe.init_params(unravel(theta))
            return fe(params, (x, y[:8]), key, 0.3)[0]

        step = 1e-5
        basis = np.eye(flat.size)
        shifts = np.concatenate([step * basis, -step * basis])  # [2P, P]: all ± perturbations

        @jax.jit
        def gradient_and_differences(theta):
            values = jax.vmap(loss)(theta + shifts)
            return jax.grad(loss)(theta), (values[: flat.size] - values[flat.size :]) / (2 * step)

        gradient, numeric = gradient_and_differences(flat)
        assert gradient.dtype == jnp.float64
    gradient, numeric = np.asarray(gradient), np.asarray(numeric)
    assert np.max(np.abs(gradient)) > 1e-2
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("estimator", ["reparam", "local_reparam", "flipout"])
def test_float32_gradient_is_the_float64_gradient(estimator):
    """Training's float32 path has the gradient that finite differences check in float64.

    In float32 σ's softplus and the mixture's logaddexp take this project's own derivatives
    (`bbb.special`); in float64 they are jnp's, which the test above checks. The hash noise is
    drawn in float32 and cast, so both precisions see the same ε: a wrong sign, or σ'(ρ) taken
    at −ρ, in a float32-only derivative would be off by O(1), not by float32's rounding.
    """
    model = models.MLP(hidden_sizes=(3,), num_outputs=2, activation="tanh")
    x, y = X[:8], (Y[:8] % 2).astype(np.int32)
    gradients = {}
    for dtype in (jnp.float32, jnp.float64):
        with jax.enable_x64(dtype == jnp.float64):
            post = _posterior(model=model, dtype=dtype).replace(noise="hash")
            fe = _free_energy(
                model=model,
                prior=priors.scale_mixture(0.5, 1.0, math.exp(-2.0)),
                num_batches=4,
                num_samples=2,
                estimator=estimator,
            )

            def loss(params, dtype=dtype, fe=fe):
                return fe(params, (x.astype(dtype), y), jax.random.key(5), 0.3)[0]

            grads = jax.jit(jax.grad(loss))(fe.init_params(post))
            assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(dtype)}
            gradients[dtype] = grads
    g32, g64 = (_flat(gradients[d]) for d in (jnp.float32, jnp.float64))
    rho_grad = _flat(gradients[jnp.float64]["posterior"].rho)
    assert np.max(np.abs(rho_grad)) > 1e-2  # σ's derivative carries weight here.
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-5 * np.max(np.abs(g64)))


# Likelihoods ------------------------------------------------------------------------------


def test_gaussian_likelihood_matches_scipy_and_learns_its_noise():
    rng = np.random.default_rng(3)
    outputs = rng.normal(size=(6, 2)).astype(np.float32)
    y = rng.normal(size=(6, 2)).astype(np.float32)
    fixed = objective.Gaussian(noise_std=0.3)
    learnable = objective.Gaussian(noise_std=0.3, learnable=True)
    params = learnable.init_params()
    assert fixed.init_params() == {} and set(params) == {"log_noise_std"}

    @jax.jit
    def evaluate(params):
        return (
            fixed.log_prob({}, outputs, y),
            fixed.log_prob({}, outputs[:, :1], y[:, 0]),  # one output, targets given as [B]
            learnable.log_prob(params, outputs, y),
            jax.grad(lambda p: jnp.sum(learnable.log_prob(p, outputs, y)))(params),
        )

    two_outputs, one_output, learned, grad = evaluate(params)
    expected = scipy.stats.norm.logpdf(y, loc=outputs, scale=0.3).sum(-1)
    np.testing.assert_allclose(np.asarray(two_outputs), expected, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(one_output),
        scipy.stats.norm.logpdf(y[:, 0], loc=outputs[:, 0], scale=0.3),
        rtol=1e-5,
    )
    np.testing.assert_allclose(np.asarray(learned), expected, rtol=1e-5)
    # d/d log s Σ log N(y | f, s²) = Σ (z² − 1).
    z = (y.astype(np.float64) - outputs) / 0.3
    np.testing.assert_allclose(float(grad["log_noise_std"]), np.sum(z**2 - 1.0), rtol=1e-4)


def test_categorical_likelihood_matches_scipy():
    logits = np.random.default_rng(4).normal(size=(5, 4)).astype(np.float32) * 3
    y = np.array([0, 3, 1, 1, 2], np.int32)
    expected = scipy.special.log_softmax(logits.astype(np.float64), -1)[np.arange(5), y]
    np.testing.assert_allclose(
        np.asarray(objective.Categorical().log_prob({}, logits, y)), expected, rtol=1e-5
    )


def test_learned_noise_gets_the_right_gradient_through_the_free_energy():
    """Too small a noise scale is pushed up, too large a one down."""
    model = models.MLP(hidden_sizes=(3,), num_outputs=1)
    targets = (3.0 * X[:, 0] + 1.0).astype(np.float32)
    fe = _free_energy(model=model, likelihood=objective.Gaussian(noise_std=0.1, learnable=True))
    params = fe.init_params(_posterior(model=model))
    loss_and_grad = jax.jit(
        jax.value_and_grad(lambda p, key: fe(p, (X, targets), key, 1.0), has_aux=True)
    )
    for noise_std, sign in [(0.01, -1.0), (100.0, 1.0)]:
        params["likelihood"] = {"log_noise_std": jnp.float32(math.log(noise_std))}
        (_, metrics), grads = loss_and_grad(params, jax.random.key(0))
        g = float(grads["likelihood"]["log_noise_std"])
        assert np.sign(g) == sign, (noise_std, g)
        assert "accuracy" not in metrics
        assert all(np.isfinite(float(v)) for v in metrics.values())
    # At a very large s the per-example gradient of −log N tends to +1 (from log s).
    assert g == pytest.approx(1.0, abs=1e-2)


def test_make_likelihood():
    config = ml_collections.ConfigDict(dict(name="gaussian", noise_std=0.2, learnable=True))
    assert objective.make_likelihood(config) == objective.Gaussian(0.2, learnable=True)
    assert isinstance(
        objective.make_likelihood(ml_collections.ConfigDict(dict(name="categorical"))),
        objective.Categorical,
    )
    with pytest.raises(ConfigError) as info:
        objective.make_likelihood(ml_collections.ConfigDict(dict(name="poisson")))
    assert info.value.field == "likelihood.name"
    config.noise_std = 0.0
    with pytest.raises(ConfigError) as info:
        objective.make_likelihood(config)
    assert info.value.field == "likelihood.noise_std" and info.value.value == 0.0


# Config checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_samples=0), "objective.num_samples"),
        (dict(num_samples=-2), "objective.num_samples"),
        (dict(num_samples=1.5), "objective.num_samples"),
        (dict(num_samples=True), "objective.num_samples"),
        (dict(kl="exact"), "objective.kl"),
        (dict(kl="closed_form", prior=priors.scale_mixture()), "objective.kl"),
        (dict(estimator="reparametrization"), "posterior.estimator"),
        (dict(temperature=0.0), "objective.kl_temperature"),
        (dict(temperature=-1.0), "objective.kl_temperature"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        _free_energy(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)
    value = next(iter(kwargs.values()))
    assert info.value.value == value and repr(value) in str(info.value)


# Shared values under the sample vmap -------------------------------------------------------


def _plain_vmap(monkeypatch):
    """Turns `bbb.posterior.shared` into the identity: JAX's own sum over the samples."""
    from bbb import estimators, posterior

    monkeypatch.setattr(posterior, "shared", lambda x, like: x)
    monkeypatch.setattr(estimators, "shared", lambda x, like: x)


@pytest.mark.parametrize("estimator", ["reparam", "local_reparam", "flipout"])
@pytest.mark.parametrize("kl", ["mc", "closed_form"])
def test_sample_gradients_equal_those_of_the_plain_vmap(estimator, kl, monkeypatch):
    """The samples' sums of the shared μ, σ and first-layer cotangents (`posterior.shared`) are
    JAX's own: same loss, same gradient (a missed sample or a mean would be off by 1/K)."""
    energy = _free_energy(num_samples=3, estimator=estimator, kl=kl, prior=priors.gaussian(0.7))
    params = energy.init_params(_posterior())
    batch, key = (X[:6], Y[:6]), jax.random.key(3)

    def grad(params):
        return jax.value_and_grad(lambda p: energy(p, batch, key, 0.5)[0])(params)

    loss, grads = grad(params)
    _plain_vmap(monkeypatch)
    plain_loss, plain_grads = grad(params)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    np.testing.assert_allclose(_flat(grads), _flat(plain_grads), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["reparam", "local_reparam", "flipout"])
def test_one_sample_is_not_vmapped_so_no_matmul_is_batched(estimator):
    """K = 1 is evaluated without the sample vmap: a vmap of one batches every matmul over a
    size-1 axis, and XLA:CPU then computed the weight gradients transposed (docs/performance.md,
    "One sample without a vmap"). K = 2 has batched matmuls (so this test can fail)."""

    def batched_dots(num_samples):
        energy = _free_energy(num_samples=num_samples, estimator=estimator, kl="mc")
        params = energy.init_params(_posterior())
        loss = lambda p: energy(p, (X[:6], Y[:6]), jax.random.key(0), 0.5)[0]
        jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
        return [
            eqn
            for eqn in all_equations(jaxpr)
            if eqn.primitive.name == "dot_general" and eqn.params["dimension_numbers"][1][0]
        ]

    assert batched_dots(1) == []
    if estimator == "reparam":  # A weight sample per MC sample: batched products at K = 2.
        assert batched_dots(2) != []
    # The same loss and gradient as under a vmap of one (the benchmark's ablation line).
    energy = _free_energy(estimator=estimator, kl="mc", prior=priors.gaussian(0.7))
    vmapped = dataclasses.replace(energy, vmap_one_sample=True)
    params = energy.init_params(_posterior())
    results = [
        jax.value_and_grad(lambda p, e=e: e(p, (X[:6], Y[:6]), jax.random.key(3), 0.5)[0])(params)
        for e in (energy, vmapped)
    ]
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    np.testing.assert_allclose(_flat(results[0][1]), _flat(results[1][1]), rtol=2e-5, atol=1e-6)


def _leading_sums(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of the operands of sums over axis 0 of rank ≥ 3 arrays, in a jaxpr and its
    sub-jaxprs: the reduction XLA:CPU runs slowly."""
    found = []
    for eqn in jaxpr.eqns:
        shape = getattr(eqn.invars[0].aval, "shape", ()) if eqn.invars else ()
        if eqn.primitive.name == "reduce_sum" and eqn.params["axes"] == (0,) and len(shape) >= 3:
            found.append(shape)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _leading_sums(sub)
    return found


@pytest.mark.parametrize("estimator", ["reparam", "local_reparam", "flipout"])
def test_no_sum_over_a_leading_sample_axis_in_the_gradient(estimator, monkeypatch):
    """The gradient's sums over the samples are adds, not XLA's slow leading-axis reduce; the
    plain vmap has them (so this test can fail)."""
    energy = _free_energy(num_samples=4, estimator=estimator, kl="mc", prior=priors.gaussian(1.0))
    params = energy.init_params(_posterior())

    def leading_sums():
        loss = lambda p: energy(p, (X[:6], Y[:6]), jax.random.key(0), 0.5)[0]
        return _leading_sums(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)

    assert leading_sums() == []
    _plain_vmap(monkeypatch)
    assert leading_sums() != []


def test_a_value_shared_by_two_nested_vmaps_is_summed_by_adds_at_both(monkeypatch):
    """μ shared by the examples of an outer vmap and the samples of an inner one (the
    per-example estimator of scripts/grad_variance.py): the same gradient as the plain vmaps,
    and no leading-axis sum left at either level."""
    from bbb import posterior

    rng = np.random.default_rng(1)
    mu = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(6, 5, 4, 3)), jnp.float32)  # examples × samples

    def loss(mu):
        inner = lambda e: jnp.sum(jnp.sin(posterior.shared(mu, e) * e))
        return jnp.sum(jax.vmap(lambda n: jnp.sum(jax.vmap(inner)(n)))(noise))

    grad, sums = jax.grad(loss)(mu), _leading_sums(jax.make_jaxpr(jax.grad(loss))(mu).jaxpr)
    monkeypatch.setattr(posterior, "shared", lambda x, like: x)
    np.testing.assert_allclose(grad, jax.grad(loss)(mu), rtol=1e-5, atol=1e-6)
    assert sums == []
    assert _leading_sums(jax.make_jaxpr(jax.grad(loss))(mu).jaxpr) != []


@pytest.mark.parametrize("field", ["num_train", "num_batches"])
def test_free_energy_refuses_a_dataset_size_or_batch_count_below_one(field):
    with pytest.raises(ConfigError, match=field):
        _free_energy(**{field: 0})
    with pytest.raises(ConfigError, match="num_batches"):
        objective.kl_weight("uniform", 0, 0)


@pytest.mark.parametrize("estimator", ["reparam", "local_reparam", "flipout"])
def test_learned_prior_hyperparameters_are_the_ones_in_params(estimator):
    """A learnable prior's trained hyperparameters, not its initial ones, enter the free energy
    (MC and closed-form KL, every estimator): at log σ_p = log 0.3 the loss is that of the fixed
    N(0, 0.3²) prior, and the closed-form KL's gradient in log σ_p is Σ (1 − (σ² + μ²) / σ_p²),
    scaled by M π T / N."""
    sigma_p, pi, temperature, num_batches = 0.3, 0.25, 0.5, 2
    post = _posterior()
    batch, key = (X[:8], Y[:8]), jax.random.key(4)
    energies = {
        (kl, learnable): _free_energy(
            prior=priors.gaussian(1.0 if learnable else sigma_p, learnable=learnable),
            num_batches=num_batches,
            num_samples=2,
            estimator=estimator,
            kl=kl,
            temperature=temperature,
        )
        for kl in ("mc", "closed_form")
        for learnable in (False, True)
    }
    trained = {"log_sigma": jnp.float32(math.log(sigma_p))}  # moved away from σ_p = 1 at init

    @jax.jit
    def run(post, trained):
        losses, grads = {}, {}
        for (kl, learnable), fe in energies.items():
            params = fe.init_params(post)
            if learnable:
                params["prior"] = trained
            loss = lambda p, fe=fe: fe(p, batch, key, pi)[0]
            losses[kl, learnable], grads[kl, learnable] = jax.value_and_grad(loss)(params)
        return losses, grads

    losses, grads = run(post, trained)
    for kl in ("mc", "closed_form"):
        np.testing.assert_allclose(
            float(losses[kl, True]), float(losses[kl, False]), rtol=1e-5, err_msg=kl
        )
    mu, sigma = _flat(post.mu), np.log1p(np.exp(_flat(post.rho)))
    dkl = np.sum(1.0 - (sigma**2 + mu**2) / sigma_p**2)
    expected = num_batches * pi * temperature * dkl / NUM_TRAIN
    assert abs(expected) > 1e-2  # the gradient is not vacuous
    np.testing.assert_allclose(
        float(grads["closed_form", True]["prior"]["log_sigma"]), expected, rtol=1e-4
    )


def test_accuracy_is_that_of_the_mean_predictive_probabilities():
    """`accuracy` is the argmax of (1/K) Σ_k softmax(f(x; w_k)), in numpy from the same weights;
    with a wide posterior the argmax of the mean logits, or of one sample, differs from it."""
    num_samples, num_keys = 2, 16
    fe = _free_energy(num_samples=num_samples)
    params = fe.init_params(_posterior(rho=(0.5, 1.5)))

    @jax.jit
    def run(params, keys):
        def one(key):
            weights = jax.vmap(lambda k: params["posterior"].sample(jax.random.split(k, 3)[0]))(
                jax.random.split(key, num_samples)
            )
            return fe(params, (X, Y), key, 1.0)[1]["accuracy"], weights

        return jax.vmap(one)(keys)

    accuracies, weights = run(params, jax.random.split(jax.random.key(8), num_keys))
    mismatch = 0
    for i in range(num_keys):
        logits = np.stack(
            [
                _np_mlp(jax.tree_util.tree_map(lambda a, i=i, k=k: a[i, k], weights), X)
                for k in range(num_samples)
            ]
        )  # [K, N, C]
        predicted = scipy.special.softmax(logits, -1).mean(0).argmax(-1)
        assert float(accuracies[i]) == pytest.approx(np.mean(predicted == Y)), i
        mismatch += np.sum(predicted != logits.mean(0).argmax(-1))
        mismatch += np.sum(predicted != logits[0].argmax(-1))
    assert mismatch > 0  # the test tells the predictive mean from the alternatives
