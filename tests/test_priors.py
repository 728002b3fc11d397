"""Tests for bbb.priors: densities against scipy in float64, the closed-form KL against an
independent formula, quadrature and Monte Carlo, config errors, and a user-defined prior."""

import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bbb import models, objective, priors
from bbb.errors import ConfigError
from bbb.posterior import MeanFieldGaussian, inverse_softplus
from tests.conftest import numpy_params, numpy_posterior

pytestmark = pytest.mark.usefixtures("fast_compile")
TESTS_DIR = Path(__file__).parent


def _np_sigma(rho) -> np.ndarray:
    return np.log1p(np.exp(np.asarray(rho, np.float64)))


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _tree(values):
    """Splits a flat float array into a two-leaf pytree (sums must cover every leaf)."""
    values = jnp.asarray(values, jnp.float32)
    half = values.size // 2
    return {"a": values[:half], "b": {"c": values[half:]}}


def _np_scale_mixture_logpdf(w, pi, sigma1, sigma2):
    """log(π N(w|0, σ1²) + (1 − π) N(w|0, σ2²)) in float64, by log-sum-exp."""
    w = np.asarray(w, np.float64)
    return scipy.special.logsumexp(
        [
            math.log(pi) + scipy.stats.norm.logpdf(w, scale=sigma1),
            math.log1p(-pi) + scipy.stats.norm.logpdf(w, scale=sigma2),
        ],
        axis=0,
    )


# Weights from 0 to |w| = 10, both signs, including values between and beyond the two scales.
W_GRID = np.concatenate(
    [[0.0, 1e-6, -1e-4, 3e-4], np.geomspace(1e-3, 10.0, 60), -np.geomspace(1e-3, 10.0, 17)]
).astype(np.float32)


class ScaleMixtureTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_log_density_matches_scipy_logsumexp_over_the_paper_grid(self):
        grid = [
            (pi, math.exp(log_sigma1), math.exp(log_sigma2))
            for pi in (0.25, 0.5, 0.75)
            for log_sigma1 in (0.0, -1.0, -2.0)
            for log_sigma2 in (-6.0, -7.0, -8.0)
        ]
        mixtures = [priors.scale_mixture(*hyperparameters) for hyperparameters in grid]
        log_densities = self.variant(
            lambda w: jnp.stack([prior.log_density({}, w) for prior in mixtures])
        )(jnp.asarray(W_GRID))
        for hyperparameters, got in zip(grid, np.asarray(log_densities, np.float64), strict=True):
            expected = _np_scale_mixture_logpdf(W_GRID, *hyperparameters)
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(
                got, expected, rtol=1e-5, atol=1e-5, err_msg=str(hyperparameters)
            )

    def test_log_prob_sums_over_every_leaf(self):
        prior = priors.scale_mixture(0.25, math.exp(-1.0), math.exp(-8.0))
        expected = _np_scale_mixture_logpdf(W_GRID, 0.25, math.exp(-1.0), math.exp(-8.0)).sum()
        np.testing.assert_allclose(float(prior.log_prob({}, _tree(W_GRID))), expected, rtol=1e-5)

    def test_finite_with_extreme_scales_and_weights(self):
        prior = priors.scale_mixture(0.5, 1.0, math.exp(-10.0))
        w = jnp.asarray([-50.0, -10.0, 0.0, 1e-30, 10.0, 50.0])
        value, grad = jax.jit(
            lambda w: (prior.log_density({}, w), jax.vmap(jax.grad(prior.log_density, 1))({}, w))
        )(w)
        assert np.all(np.isfinite(np.asarray(value))) and np.all(np.isfinite(np.asarray(grad)))
        np.testing.assert_allclose(
            np.asarray(value, np.float64),
            _np_scale_mixture_logpdf(w, 0.5, 1.0, math.exp(-10.0)),
            rtol=1e-5,
        )
        # d/dw log p = −w / σ1² far from 0, where the wide component dominates.
        np.testing.assert_allclose(float(grad[-1]), -50.0, rtol=1e-5)


class OtherPriorsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_log_prob_matches_scipy(self):
        w = np.random.default_rng(0).standard_t(2.0, size=40).astype(np.float32) * 2.0
        cases = [
            (priors.gaussian(math.exp(-1.0)), scipy.stats.norm(scale=math.exp(-1.0))),
            (priors.gaussian(3.0), scipy.stats.norm(scale=3.0)),
            (priors.laplace(0.3), scipy.stats.laplace(scale=0.3)),
            (priors.student_t(3.0, 0.5), scipy.stats.t(df=3.0, scale=0.5)),
            (priors.student_t(1.5, 2.0), scipy.stats.t(df=1.5, scale=2.0)),
        ]
        values = self.variant(
            lambda w: [
                (prior.log_density({}, w), prior.log_prob({}, _tree(w))) for prior, _ in cases
            ]
        )(jnp.asarray(w))
        for (prior, reference), (density, total) in zip(cases, values, strict=True):
            expected = reference.logpdf(w.astype(np.float64))
            np.testing.assert_allclose(
                np.asarray(density, np.float64),
                expected,
                rtol=1e-5,
                atol=1e-6,
                err_msg=repr(prior),
            )
            np.testing.assert_allclose(float(total), expected.sum(), rtol=1e-5, err_msg=repr(prior))

    def test_flat_prior_is_zero(self):
        assert float(priors.flat().log_prob({}, _tree(W_GRID))) == 0.0


@pytest.mark.parametrize("log_scale", [-60.0, 60.0])
def test_a_trained_scale_past_the_admitted_range_is_used_at_its_bound(log_scale):
    """A learnable σ that the optimiser drove past [1e-15, 1e15] gives the log density (and the
    closed-form KL) of σ at that bound, finite, with zero gradient outward; unclipped, σ = e⁻⁶⁰
    overflows (w/σ)² into inf, and the scale mixture's gradient into NaN."""
    w = np.array([0.0, 1e-3, 0.5, -2.0], np.float32)
    bound = 1e-15 if log_scale < 0 else 1e15
    tree = _tree(w)
    gaussian = priors.gaussian(1.0, learnable=True)
    at_bound = priors.gaussian(bound).log_prob({}, tree)
    value, grad = jax.value_and_grad(gaussian.log_prob)({"log_sigma": jnp.float32(log_scale)}, tree)
    np.testing.assert_allclose(float(value), float(at_bound), rtol=1e-6)
    assert float(grad["log_sigma"]) == 0.0
    post = MeanFieldGaussian(mu=tree, rho=jax.tree_util.tree_map(jnp.zeros_like, tree))
    kl = gaussian.kl({"log_sigma": jnp.float32(log_scale)}, post)
    np.testing.assert_allclose(float(kl), float(priors.gaussian(bound).kl({}, post)), rtol=1e-6)

    mixture = priors.scale_mixture(0.5, 1.0, 0.01, learnable=True)
    params = mixture.init_params()
    params["log_sigma2" if log_scale < 0 else "log_sigma1"] = jnp.float32(log_scale)
    sigma1, sigma2 = (1.0, bound) if log_scale < 0 else (bound, 0.01)
    value, grad = jax.value_and_grad(mixture.log_prob)(params, tree)
    expected = priors.scale_mixture(0.5, sigma1, sigma2).log_prob({}, tree)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)
    assert all(np.isfinite(float(g)) for g in jax.tree_util.tree_leaves(grad))


def test_learnable_priors_agree_at_init_and_have_correct_hyperparameter_gradients():
    w = np.random.default_rng(1).normal(size=30).astype(np.float32) * 0.3
    w64 = w.astype(np.float64)
    pi, sigma1, sigma2 = 0.25, math.exp(-1.0), math.exp(-3.0)
    pairs = {
        "gaussian": (priors.gaussian(0.5), priors.gaussian(0.5, learnable=True)),
        "scale_mixture": (
            priors.scale_mixture(pi, sigma1, sigma2),
            priors.scale_mixture(pi, sigma1, sigma2, learnable=True),
        ),
    }
    hyperparameters = {name: learnable.init_params() for name, (_, learnable) in pairs.items()}
    assert set(hyperparameters["gaussian"]) == {"log_sigma"}
    assert set(hyperparameters["scale_mixture"]) == {"logit_pi", "log_sigma1", "log_sigma2"}
    assert all(fixed.init_params() == {} for fixed, _ in pairs.values())

    @jax.jit
    def values_and_gradients(hyperparameters, w):
        tree = _tree(w)
        return {
            name: (
                fixed.log_prob({}, tree),
                learnable.log_prob(hyperparameters[name], tree),
                jax.grad(learnable.log_prob)(hyperparameters[name], tree),
            )
            for name, (fixed, learnable) in pairs.items()
        }

    results = values_and_gradients(hyperparameters, w)
    for fixed_value, learnable_value, _ in results.values():
        np.testing.assert_allclose(float(learnable_value), float(fixed_value), rtol=1e-6)

    # Gaussian: d/d log σ Σ log N(w | 0, σ²) = Σ (w² / σ² − 1).
    grad = results["gaussian"][2]
    np.testing.assert_allclose(float(grad["log_sigma"]), np.sum(w64**2 / 0.25 - 1.0), rtol=1e-4)

    # Scale mixture: against central differences of the float64 scipy density.
    def reference(logit_pi, log_sigma1, log_sigma2):
        return _np_scale_mixture_logpdf(
            w64, scipy.special.expit(logit_pi), math.exp(log_sigma1), math.exp(log_sigma2)
        ).sum()

    at = {k: float(v) for k, v in hyperparameters["scale_mixture"].items()}
    grad = results["scale_mixture"][2]
    h = 1e-5
    for name in at:
        plus, minus = dict(at), dict(at)
        plus[name] += h
        minus[name] -= h
        numeric = (reference(**plus) - reference(**minus)) / (2 * h)
        assert abs(numeric) > 1e-2, name  # the check below is not vacuous
        np.testing.assert_allclose(float(grad[name]), numeric, rtol=1e-3, err_msg=name)


def _np_gaussian_kl(mu, sigma, sigma_p):
    """KL[N(μ, σ²) ‖ N(0, σ_p²)] = ½ Σ [σ²/σ_p² + μ²/σ_p² − 1 − log(σ²/σ_p²)]."""
    ratio = (sigma / sigma_p) ** 2
    return 0.5 * np.sum(ratio + (mu / sigma_p) ** 2 - 1.0 - np.log(ratio))


def _posterior(seed: int, size: int = 24, rho_range=(-4.0, 0.5)) -> MeanFieldGaussian:
    rng = np.random.default_rng(seed)
    return MeanFieldGaussian(
        mu=_tree(rng.normal(size=size) * 0.5), rho=_tree(rng.uniform(*rho_range, size=size))
    )


@pytest.mark.parametrize("sigma_p", [1.0, math.exp(-2.0), 4.0])
def test_closed_form_kl_matches_numpy_formula(sigma_p):
    post = _posterior(2)
    mu, sigma = _flat(post.mu), _np_sigma(_flat(post.rho))
    expected = _np_gaussian_kl(mu, sigma, sigma_p)
    np.testing.assert_allclose(float(priors.gaussian(sigma_p).kl({}, post)), expected, rtol=1e-5)
    learnable = priors.gaussian(sigma_p, learnable=True)
    np.testing.assert_allclose(
        float(learnable.kl(learnable.init_params(), post)), expected, rtol=1e-5
    )


def test_closed_form_kl_matches_quadrature():
    """One weight: KL = ∫ q log(q / p), by numerical integration."""
    for mu, sigma, sigma_p in [(0.3, 0.1, 1.0), (-1.2, 0.7, 0.5), (0.0, 2.0, 1.0)]:
        q, p = scipy.stats.norm(mu, sigma), scipy.stats.norm(0.0, sigma_p)
        expected, _ = scipy.integrate.quad(
            lambda x, q=q, p=p: q.pdf(x) * (q.logpdf(x) - p.logpdf(x)),
            mu - 12 * sigma,
            mu + 12 * sigma,
        )
        post = MeanFieldGaussian(
            mu={"w": jnp.asarray([mu], jnp.float32)},
            rho={"w": jnp.asarray(inverse_softplus(sigma)).reshape(1)},
        )
        np.testing.assert_allclose(
            float(priors.gaussian(sigma_p).kl({}, post)), expected, rtol=1e-4, atol=1e-6
        )


def test_monte_carlo_kl_matches_closed_form():
    """mean of log q(w) − log P(w), w ~ q, is within 3 standard errors of the closed form."""
    post = _posterior(3)
    prior = priors.gaussian(math.exp(-1.0))
    num_samples = 20000

    @jax.jit
    def mc_terms(keys):
        def one(key):
            w, log_q = post.sample_and_log_prob(key)
            return log_q - prior.log_prob({}, w)

        return jax.vmap(one)(keys)

    terms = np.asarray(mc_terms(jax.random.split(jax.random.key(0), num_samples)), np.float64)
    closed_form = float(prior.kl({}, post))
    standard_error = terms.std(ddof=1) / np.sqrt(num_samples)
    assert abs(terms.mean() - closed_form) < 3 * standard_error, (
        terms.mean(),
        closed_form,
        standard_error,
    )
    # The test has power: a KL off by 2% would be seen.
    assert 3 * standard_error < 0.02 * closed_form


def test_closed_form_kl_gradients_match_their_closed_forms():
    """∂KL/∂μ = μ/σ_p², ∂KL/∂ρ = (σ/σ_p² − 1/σ) sigmoid(ρ) and, for the learnable prior,
    ∂KL/∂ log σ_p = Σ (1 − (σ² + μ²)/σ_p²): what empirical Bayes with the closed-form KL
    trains the prior's scale by (a value-only check misses a stopped or wrong gradient)."""
    post = _posterior(4)
    prior = priors.gaussian(1.0, learnable=True)
    log_sigma_p = math.log(0.4)  # away from the initial σ_p = 1
    grads = jax.jit(jax.grad(prior.kl, argnums=(0, 1)))(
        {"log_sigma": jnp.float32(log_sigma_p)}, post
    )
    prior_grad, post_grad = grads
    mu, rho = _flat(post.mu), _flat(post.rho)
    sigma, sigma_p = _np_sigma(rho), math.exp(log_sigma_p)
    np.testing.assert_allclose(_flat(post_grad.mu), mu / sigma_p**2, rtol=1e-5)
    np.testing.assert_allclose(
        _flat(post_grad.rho),
        (sigma / sigma_p**2 - 1.0 / sigma) * scipy.special.expit(rho),
        rtol=1e-4,
    )
    expected = np.sum(1.0 - (sigma**2 + mu**2) / sigma_p**2)
    assert abs(expected) > 1.0  # not vacuous
    np.testing.assert_allclose(float(prior_grad["log_sigma"]), expected, rtol=1e-5)


_kl_jit = jax.jit(
    lambda mu, rho, log_sigma: priors.gaussian(1.0, learnable=True).kl(
        {"log_sigma": log_sigma}, MeanFieldGaussian(mu={"w": mu}, rho={"w": rho})
    )
)


@settings(max_examples=40, deadline=None)
@given(
    mu=hnp.arrays(np.float32, 8, elements=st.floats(-3.0, 3.0, width=32)),
    rho=hnp.arrays(np.float32, 8, elements=st.floats(-8.0, 3.0, width=32)),
    log_sigma_p=st.floats(-3.0, 1.0, width=32),
)
def test_kl_is_nonnegative_and_zero_only_for_q_equal_p(mu, rho, log_sigma_p):
    kl = float(_kl_jit(mu, rho, np.float32(log_sigma_p)))
    expected = _np_gaussian_kl(mu.astype(np.float64), _np_sigma(rho), math.exp(log_sigma_p))
    assert kl >= -1e-4
    np.testing.assert_allclose(kl, expected, rtol=1e-4, atol=1e-4)
    # q = p: μ = 0 and σ = σ_p.
    rho_p = np.full(8, float(inverse_softplus(math.exp(log_sigma_p))), np.float32)
    assert abs(float(_kl_jit(np.zeros(8, np.float32), rho_p, np.float32(log_sigma_p)))) < 1e-4


# Configs -----------------------------------------------------------------------------------


def test_make_prior_from_dict_and_config_dict():
    prior = priors.make_prior({"name": "gaussian", "sigma": 0.5, "pi": 0.3, "df": 2.0})
    assert prior == priors.Gaussian(sigma=0.5)
    config = ml_collections.ConfigDict(
        dict(name="scale_mixture", pi=0.25, sigma=0.5, sigma1=1.0, sigma2=math.exp(-7.0))
    )
    assert priors.make_prior(config) == priors.ScaleMixture(0.25, 1.0, math.exp(-7.0))
    assert priors.make_prior({"name": "laplace", "scale": 2.0, "learnable": False}) == (
        priors.Laplace(2.0)
    )
    assert priors.make_prior({"name": "student_t", "df": 4.0, "scale": 0.1}) == (
        priors.StudentT(4.0, 0.1)
    )
    assert isinstance(priors.make_prior({"name": "flat"}), priors.Flat)
    learnable = priors.make_prior({"name": "scale_mixture", "learnable": True})
    assert learnable.learnable and set(learnable.init_params()) == {
        "logit_pi",
        "log_sigma1",
        "log_sigma2",
    }


@pytest.mark.parametrize(
    "config, field, value",
    [
        ({"name": "gausian"}, "prior.name", "gausian"),
        ({"name": None}, "prior.name", None),
        ({"name": "gaussian", "sigma": 0.0}, "prior.sigma", 0.0),
        ({"name": "gaussian", "sigma": -1.0}, "prior.sigma", -1.0),
        ({"name": "scale_mixture", "pi": 0.0}, "prior.pi", 0.0),
        ({"name": "scale_mixture", "pi": 1.0}, "prior.pi", 1.0),
        ({"name": "scale_mixture", "pi": 1.5}, "prior.pi", 1.5),
        ({"name": "scale_mixture", "sigma1": -0.1}, "prior.sigma1", -0.1),
        ({"name": "scale_mixture", "sigma2": 0.0}, "prior.sigma2", 0.0),
        ({"name": "laplace", "scale": 0.0}, "prior.scale", 0.0),
        ({"name": "student_t", "df": -2.0}, "prior.df", -2.0),
        ({"name": "laplace", "learnable": True}, "prior.learnable", True),
        ({"name": "student_t", "learnable": True}, "prior.learnable", True),
        ({"name": "no_such_module_xyz:prior"}, "prior.name", "no_such_module_xyz:prior"),
        ({"name": "math:no_such_callable"}, "prior.name", "math:no_such_callable"),
        ({"name": "math:pi"}, "prior.name", "math:pi"),
        ({"name": "math:"}, "prior.name", "math:"),
        ({"name": "math:sqrt(2)"}, "prior.name", "math:sqrt(2)"),
    ],
)
def test_make_prior_errors_name_the_field_and_value(config, field, value):
    with pytest.raises(ConfigError) as info:
        priors.make_prior(config)
    assert info.value.field == field
    assert info.value.value == value
    assert field in str(info.value) and repr(value) in str(info.value)


def test_factory_that_does_not_return_a_prior_is_rejected(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    with pytest.raises(ConfigError) as info:
        priors.make_prior({"name": "custom_prior_module:not_a_prior", "scale": 2.0})
    assert info.value.field == "prior.name"
    assert "Prior" in info.value.allowed


def test_closed_form_kl_with_scale_mixture_names_objective_kl():
    model = models.MLP(hidden_sizes=(2,), num_outputs=2)
    for prior in (priors.scale_mixture(), priors.laplace(), priors.student_t(), priors.flat()):
        with pytest.raises(ConfigError) as info:
            objective.FreeEnergy(
                model,
                prior,
                objective.Categorical(),
                num_train=10,
                num_batches=1,
                kl="closed_form",
            )
        assert info.value.field == "objective.kl"
        assert "objective.kl" in str(info.value)
        with pytest.raises(ConfigError, match=r"objective\.kl"):
            prior.kl({}, _posterior(0))


# A prior from user code --------------------------------------------------------------------


def test_custom_prior_from_module_builds_and_matches_scipy(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    prior = priors.make_prior({"name": "custom_prior_module:my_prior", "scale": 0.5, "pi": 0.3})
    assert type(prior).__name__ == "Logistic" and prior.scale == 0.5
    w = np.linspace(-6.0, 6.0, 41).astype(np.float32)
    np.testing.assert_allclose(
        float(prior.log_prob({}, _tree(w))),
        scipy.stats.logistic(scale=0.5).logpdf(w.astype(np.float64)).sum(),
        rtol=1e-5,
    )
    with pytest.raises(ConfigError, match=r"prior\.scale"):
        priors.make_prior({"name": "custom_prior_module:my_prior", "scale": -1.0})
    with pytest.raises(ConfigError, match=r"prior\.learnable"):
        priors.make_prior({"name": "custom_prior_module:my_prior", "learnable": True})


def test_custom_prior_trains(monkeypatch):
    """A few Adam steps of the free energy with the user's prior lower the loss, and the prior
    is the one in the KL: log q(w) − log P(w) with the logistic density, at the step's w."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    prior = priors.make_prior({"name": "custom_prior_module:my_prior", "scale": 0.3})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 2)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
    model = models.MLP(hidden_sizes=(4,), num_outputs=2)
    free_energy = objective.FreeEnergy(
        model, prior, objective.Categorical(), num_train=32, num_batches=1
    )
    posterior = numpy_posterior(numpy_params(model, x[:1]), -3.0)
    optimizer = optax.adam(0.03)

    @jax.jit
    def step(params, opt_state, key):
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: free_energy(p, (x, y), key, 1.0), has_aux=True
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        # The weights of this step's one MC sample (the objective's key split: K keys, each
        # split into weights / KL / dropout keys).
        weights = params["posterior"].sample(jax.random.split(jax.random.split(key, 1)[0], 3)[0])
        return optax.apply_updates(params, updates), opt_state, loss, metrics["kl"], weights

    params = free_energy.init_params(posterior)
    opt_state, losses = optimizer.init(params), []
    for index, key in enumerate(jax.random.split(jax.random.key(2), 30)):
        params, opt_state, loss, kl, weights = step(params, opt_state, key)
        losses.append(float(loss))
        if index == 0:
            w = _flat(weights)
            sigma = _np_sigma(np.full(w.shape, -3.0))
            expected_kl = (
                scipy.stats.norm.logpdf(w, _flat(posterior.mu), sigma).sum()
                - scipy.stats.logistic(scale=0.3).logpdf(w).sum()
            )
            np.testing.assert_allclose(float(kl), expected_kl, rtol=1e-4)
    losses = np.array(losses)  # each before its step's update
    assert np.all(np.isfinite(losses))
    assert losses[-5:].mean() < losses[:3].mean() - 0.3, losses


def test_custom_factory_missing_a_field_or_failing_on_import_names_it(tmp_path, monkeypatch):
    """Both were tracebacks (TypeError, or the module's own exception), not config errors."""
    (tmp_path / "needs_width_prior.py").write_text(
        "from bbb.priors import gaussian\n\ndef factory(width, sigma=1.0):\n"
        "    return gaussian(sigma * width)\n"
    )
    (tmp_path / "broken_prior.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        priors.make_prior({"name": "needs_width_prior:factory", "sigma": 2.0})
    assert info.value.field == "prior.width" and "needs_width_prior:factory" in str(info.value)
    prior = priors.make_prior({"name": "needs_width_prior:factory", "sigma": 2.0, "width": 0.5})
    assert prior.sigma == 1.0
    with pytest.raises(ConfigError) as info:
        priors.make_prior({"name": "broken_prior:factory"})
    assert info.value.field == "prior.name" and "boom at import" in str(info.value)


def test_the_extreme_allowed_scales_give_finite_log_densities_and_gradients():
    """At the scales the config accepts, the float32 log density and its gradient are finite
    from w = 0 to |w| = 10⁴ (below ~1e-19, (w / σ)² overflowed and 0 · inf gave NaN at 0)."""
    w = jnp.asarray([0.0, 1e-16, 1e-3, 1.0, -1e4], jnp.float32)
    for prior in (
        priors.scale_mixture(pi=0.5, sigma1=1e15, sigma2=1e-15),
        priors.gaussian(sigma=1e-15),
        priors.gaussian(sigma=1e15),
    ):
        values = prior.log_density({}, w)
        grads = jax.vmap(jax.grad(lambda x, p=prior: p.log_density({}, x)))(w)
        assert np.all(np.isfinite(np.asarray(values))), prior
        assert np.all(np.isfinite(np.asarray(grads))), prior
    for bad in (1e-16, 1e16):
        with pytest.raises(ConfigError, match=r"prior.sigma2.*a scale in \[1e-15, 1e\+15\]"):
            priors.scale_mixture(sigma2=bad)
