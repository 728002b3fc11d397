"""Numerical robustness: log-probabilities, KLs and their gradients stay finite at extremes.

ρ ∈ [−30, 30], weights and means up to ±50, the mixture's σ2 down to e^−10.
"""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

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
