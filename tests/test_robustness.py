"""Numerical robustness: log-probabilities, KLs and their gradients stay finite at extremes.

ρ ∈ [−30, 30], weights and means up to ±50, the mixture's σ2 down to e^−10.
"""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from bbb import posterior, priors

SIZE = 64


def _free_energy_terms(mu, rho, prior_params, log_sigma2, logit_pi):
    """MC KL (log q − log p at a sample), the mixture's and a Gaussian's log p, closed-form KL."""
    q = posterior.MeanFieldGaussian({"w": mu}, {"w": rho})
    w, log_q = q.sample_and_log_prob(jax.random.key(0))
    mixture = priors.ScaleMixture(learnable=True)
    params = {"logit_pi": logit_pi, "log_sigma1": jnp.float32(0.0), "log_sigma2": log_sigma2}
    mc_kl = log_q - mixture.log_prob(params, w)
    gaussian = priors.Gaussian(learnable=True)
    closed_kl = gaussian.kl({"log_sigma": prior_params}, q)
    return mc_kl + closed_kl + gaussian.log_prob({"log_sigma": prior_params}, {"w": mu})


_value_and_grad = jax.jit(jax.value_and_grad(_free_energy_terms, argnums=(0, 1, 2, 3, 4)))


def _numpy_terms(mu, rho, log_sigma_prior, log_sigma2, pi):
    """The terms of `_free_energy_terms` in float64 numpy (scipy's densities), at its sample."""
    q = posterior.MeanFieldGaussian({"w": jnp.asarray(mu)}, {"w": jnp.asarray(rho)})
    w = np.asarray(q.sample(jax.random.key(0))["w"], np.float64)
    eps = np.asarray(q.sample_noise(jax.random.key(0))["w"], np.float64)
    mu, rho = np.asarray(mu, np.float64), np.asarray(rho, np.float64)
    sigma = np.logaddexp(0.0, rho)
    sigma_p, sigma2 = math.exp(log_sigma_prior), math.exp(log_sigma2)
    # log q at w = μ + σε from ε itself: (w − μ) / σ in floats is lost to rounding when σ ≪ |μ|.
    log_q = scipy.stats.norm.logpdf(eps) - np.log(sigma)
    log_mixture = np.logaddexp(
        math.log(pi) + scipy.stats.norm.logpdf(w, 0.0, 1.0),
        math.log1p(-pi) + scipy.stats.norm.logpdf(w, 0.0, sigma2),
    )
    closed_kl = np.log(sigma_p / sigma) + (sigma**2 + mu**2) / (2 * sigma_p**2) - 0.5
    log_p_mu = scipy.stats.norm.logpdf(mu, 0.0, sigma_p)
    return [log_q, -log_mixture, closed_kl, log_p_mu]


def _assert_value_matches_numpy(value, terms):
    """float32 against float64: within 1e-4 of the terms' total magnitude, so that a wrong sign
    or scale of any term that is not negligible against the others shows."""
    expected = sum(float(np.sum(t)) for t in terms)
    magnitude = sum(float(np.sum(np.abs(t))) for t in terms)
    assert abs(float(value) - expected) <= 1e-4 * magnitude, (float(value), expected, magnitude)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    rho_low=st.floats(-30, 30),
    mu_scale=st.floats(0, 50),
    log_sigma2=st.floats(-10, -1),
    pi=st.floats(0.01, 0.99),
    log_sigma_prior=st.floats(-10, 2),
)
def test_everything_finite_at_extremes(seed, rho_low, mu_scale, log_sigma2, pi, log_sigma_prior):
    rng = np.random.default_rng(seed)
    rho = jnp.asarray(rng.uniform(rho_low, 30.0, SIZE).clip(-30, 30), jnp.float32)
    mu = jnp.asarray(rng.uniform(-mu_scale, mu_scale, SIZE), jnp.float32)
    value, grads = _value_and_grad(
        mu,
        rho,
        jnp.float32(log_sigma_prior),
        jnp.float32(log_sigma2),
        jnp.float32(math.log(pi / (1 - pi))),
    )
    assert np.isfinite(float(value))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    # The float32 parameters' own values, as the function saw them.
    f32 = lambda v: float(np.float32(v))
    pi32 = 1.0 / (1.0 + math.exp(-f32(math.log(pi / (1 - pi)))))
    terms = _numpy_terms(mu, rho, f32(log_sigma_prior), f32(log_sigma2), pi32)
    _assert_value_matches_numpy(value, terms)


def test_extremes_by_hand():
    """The corners hypothesis may miss: ρ = ±30 and |w| = 50 with σ2 = e^−10."""
    mu = jnp.asarray(np.r_[np.full(32, 50.0), np.full(32, -50.0)], jnp.float32)
    for rho_value in (-30.0, 30.0):
        rho = jnp.full(SIZE, rho_value, jnp.float32)
        value, grads = _value_and_grad(
            mu, rho, jnp.float32(-10.0), jnp.float32(-10.0), jnp.float32(0.0)
        )
        assert np.isfinite(float(value))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
        _assert_value_matches_numpy(value, _numpy_terms(mu, rho, -10.0, -10.0, 0.5))
