"""bbb.special: the polynomial log1p behind softplus and logaddexp, against float64 numpy.

softplus has its own tests in tests/test_posterior.py (it is re-exported there).
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbb import priors, special


def _ulp_error(got, expected):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    ulp = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    return np.abs(got - expected) / ulp


def _pairs(n=200_000, seed=0):
    """Pairs (a, b) with differences from 0 to far beyond float32's exp range."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-100.0, 100.0, n)
    b = a + rng.choice([-1.0, 1.0], n) * np.geomspace(1e-7, 200.0, n)
    return a.astype(np.float32), b.astype(np.float32)


class LogaddexpTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_within_3_ulp_of_float64(self):
        """Error in ulps of the larger of |max(a, b)| and the result: where the two cancel
        (a, b ≈ −log 2), float32's max(a, b) itself carries that much (so does jnp's)."""
        a, b = _pairs()
        got = self.variant(special.logaddexp)(jnp.asarray(a), jnp.asarray(b))
        expected = np.logaddexp(a.astype(np.float64), b.astype(np.float64))
        scale = np.maximum(np.abs(np.maximum(a, b)), np.abs(expected)).astype(np.float32)
        error = np.abs(np.asarray(got, np.float64) - expected) / np.spacing(scale)
        assert np.max(error) <= 3.0
        jnp_error = np.abs(np.asarray(jnp.logaddexp(a, b), np.float64) - expected)
        assert np.max(error) <= np.max(jnp_error / np.spacing(scale)) + 1.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_are_the_two_sigmoids(self):
        """∂/∂a = sigmoid(a − b), ∂/∂b = sigmoid(b − a): a swapped pair or a wrong sign fails."""
        a, b = _pairs(20_000, seed=1)
        grad = self.variant(jax.vmap(jax.grad(special.logaddexp, argnums=(0, 1))))
        da, db = (np.asarray(g, np.float64) for g in grad(jnp.asarray(a), jnp.asarray(b)))
        # a − b rounded to float32 as the function computes it: the rest is its own error.
        d = (a - b).astype(np.float64)
        np.testing.assert_allclose(da, 1.0 / (1.0 + np.exp(-d)), rtol=2e-6, atol=1e-37)
        np.testing.assert_allclose(db, 1.0 / (1.0 + np.exp(d)), rtol=2e-6, atol=1e-37)

    @chex.variants(with_jit=True, without_jit=True)
    def test_second_derivative(self):
        d = jnp.linspace(-30.0, 30.0, 601)
        second = self.variant(jax.vmap(jax.grad(jax.grad(special.logaddexp))))(d, jnp.zeros_like(d))
        t = np.exp(-np.abs(np.asarray(d, np.float64)))
        np.testing.assert_allclose(np.asarray(second), t / (1 + t) ** 2, rtol=1e-5, atol=1e-30)

    def test_infinities_nan_and_broadcasting_as_jnp(self):
        inf, nan = np.inf, np.nan
        a = jnp.array([-inf, inf, -inf, 0.0, nan, 3.0, -inf], jnp.float32)
        b = jnp.array([-inf, inf, 0.0, inf, 0.0, 3.0, 5.0], jnp.float32)
        np.testing.assert_array_equal(
            np.asarray(special.logaddexp(a, b)), np.asarray(jnp.logaddexp(a, b))
        )
        assert special.logaddexp(jnp.bfloat16(1.0), jnp.bfloat16(2.0)).dtype == jnp.bfloat16
        assert special.logaddexp(1, 2).dtype == jnp.float32  # as jnp: integers become floats
        out = special.logaddexp(jnp.zeros((3, 1)), jnp.arange(4.0))
        assert out.shape == (3, 4) and out.dtype == jnp.float32
        np.testing.assert_allclose(
            np.asarray(out), np.logaddexp(0.0, np.arange(4.0))[None].repeat(3, 0), rtol=1e-6
        )

    def test_float64_takes_jnp(self):
        with jax.enable_x64(True):
            a = jnp.asarray(np.linspace(-50, 50, 101))
            np.testing.assert_array_equal(
                np.asarray(special.logaddexp(a, 0.5)), np.asarray(jnp.logaddexp(a, 0.5))
            )
            assert special.softplus(a).dtype == jnp.float64


def test_float64_softplus_is_jnp_logaddexp_not_the_float32_polynomial():
    """The polynomial log1p is accurate to float32 only (relative error 1.3e-8): float64 ρ must
    give jnp.logaddexp(ρ, 0) bit for bit, and its gradient the float64 sigmoid."""
    with jax.enable_x64(True):
        rho = jnp.asarray(np.linspace(-40.0, 40.0, 801))
        np.testing.assert_array_equal(
            np.asarray(special.softplus(rho)), np.asarray(jnp.logaddexp(rho, 0.0))
        )
        grad = np.asarray(jax.vmap(jax.grad(special.softplus))(rho))
        np.testing.assert_allclose(grad, 1.0 / (1.0 + np.exp(-np.asarray(rho))), rtol=1e-14)


@pytest.mark.parametrize(
    "pi, sigma1, sigma2", [(0.5, 1.0, math.exp(-6.0)), (0.25, math.exp(-1.0), math.exp(-8.0))]
)
def test_scale_mixture_weight_gradient_is_minus_w_over_the_mixed_variance(pi, sigma1, sigma2):
    """d log p / dw = −w (r / σ1² + (1 − r) / σ2²), r the first component's responsibility:
    the gradient the MC KL follows, through `special.logaddexp`'s custom JVP."""
    w = np.concatenate([np.linspace(-3.0, 3.0, 2001), np.geomspace(1e-6, 3.0, 500)])
    prior = priors.scale_mixture(pi, sigma1, sigma2)
    got = jax.vmap(jax.grad(lambda x: prior.log_density({}, x)))(jnp.asarray(w, jnp.float32))
    w64 = np.asarray(w, np.float32).astype(np.float64)
    log_n1 = math.log(pi) - math.log(sigma1) - 0.5 * (w64 / sigma1) ** 2
    log_n2 = math.log1p(-pi) - math.log(sigma2) - 0.5 * (w64 / sigma2) ** 2
    r = np.exp(log_n1 - np.logaddexp(log_n1, log_n2))
    expected = -w64 * (r / sigma1**2 + (1.0 - r) / sigma2**2)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=1e-6)
