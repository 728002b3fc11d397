"""Tests for bbb.posterior against closed forms, scipy, and sample statistics."""

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from bbb import models
from bbb.posterior import (
    MeanFieldGaussian,
    PointEstimate,
    count_params,
    init_posterior,
    inverse_softplus,
    shared,
    softplus,
    sum_samples,
)
from tests.conftest import numpy_params

pytestmark = pytest.mark.usefixtures("fast_compile")


def _posterior(seed: int = 0) -> MeanFieldGaussian:
    """A small posterior over two leaves, with σ spread over two orders of magnitude."""
    rng = np.random.default_rng(seed)
    mu = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,))}
    rho = {"a": rng.uniform(-5.0, 1.0, size=(3, 4)), "b": rng.uniform(-5.0, 1.0, size=(5,))}
    to_f32 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), t)
    return MeanFieldGaussian(mu=to_f32(mu), rho=to_f32(rho))


def _np_sigma(rho: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(np.asarray(rho, np.float64)))


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


class SoftplusTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_softplus_matches_float64_numpy_on_minus_30_to_30(self):
        rho = np.linspace(-30.0, 30.0, 6001).astype(np.float32)
        sigma = np.asarray(self.variant(softplus)(jnp.asarray(rho)), np.float64)
        expected = np.log1p(np.exp(rho.astype(np.float64)))
        assert np.all(np.isfinite(sigma)) and np.all(sigma > 0)
        # Relative accuracy everywhere, including σ ≈ 1e-13 at ρ = −30.
        np.testing.assert_allclose(sigma, expected, rtol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_softplus_gradient_is_sigmoid_and_finite(self):
        rho = jnp.linspace(-30.0, 30.0, 601)
        grad = self.variant(jax.vmap(jax.grad(softplus)))(rho)
        expected = 1.0 / (1.0 + np.exp(-np.asarray(rho, np.float64)))
        np.testing.assert_allclose(np.asarray(grad), expected, rtol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_softplus_is_within_3_ulp_of_float64_from_minus_90_to_90(self):
        """The polynomial log1p (`_LOG1P_OVER_T`) against numpy's float64 logaddexp."""
        rho = np.concatenate(
            [
                np.linspace(-90.0, 90.0, 400_001),
                -np.geomspace(1e-8, 90, 5000),
                np.geomspace(1e-8, 90, 5000),
            ]
        ).astype(np.float32)
        sigma = np.asarray(self.variant(softplus)(jnp.asarray(rho)), np.float64)
        expected = np.logaddexp(rho.astype(np.float64), 0.0)
        normal = expected > np.finfo(np.float32).tiny  # Below it, XLA:CPU flushes to 0.
        ulp = np.spacing(expected[normal].astype(np.float32)).astype(np.float64)
        assert np.max(np.abs(sigma[normal] - expected[normal]) / ulp) <= 3.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_softplus_second_derivative_and_forward_mode(self):
        """The custom JVP is itself differentiable: softplus'' = s(1 − s), s = sigmoid(ρ),
        by reverse-over-reverse and by forward mode."""
        rho = jnp.linspace(-30.0, 30.0, 601)
        r = np.asarray(rho, np.float64)
        s = 1.0 / (1.0 + np.exp(-r))
        t = np.exp(-np.abs(r))  # s(1 − s) = t / (1 + t)², without 1 − s's cancellation.
        second = self.variant(jax.vmap(jax.grad(jax.grad(softplus))))(rho)
        np.testing.assert_allclose(np.asarray(second), t / (1 + t) ** 2, rtol=1e-5, atol=1e-30)
        forward = self.variant(jax.vmap(jax.jacfwd(softplus)))(rho)
        np.testing.assert_allclose(np.asarray(forward), s, rtol=2e-6)

    def test_softplus_at_infinities_nan_and_integers(self):
        out = np.asarray(softplus(jnp.array([np.inf, -np.inf, np.nan, 0.0], jnp.float32)))
        assert out[0] == np.inf and out[1] == 0.0 and np.isnan(out[2])
        assert out[3] == np.float32(np.log(2.0))
        grads = np.asarray(jax.vmap(jax.grad(softplus))(jnp.array([np.inf, -np.inf], jnp.float32)))
        np.testing.assert_array_equal(grads, [1.0, 0.0])
        assert softplus(jnp.int32(0)).dtype == jnp.float32

    @chex.variants(with_jit=True, without_jit=True)
    def test_inverse_softplus_round_trips(self):
        sigma = np.geomspace(1e-12, 30.0, 500).astype(np.float32)
        rho = self.variant(inverse_softplus)(jnp.asarray(sigma))
        np.testing.assert_allclose(np.asarray(softplus(rho)), sigma, rtol=2e-6)
        # And against float64 numpy: ρ = log(expm1(σ)).
        np.testing.assert_allclose(
            np.asarray(rho), np.log(np.expm1(sigma.astype(np.float64))), rtol=1e-5, atol=1e-5
        )
        rho_grid = jnp.linspace(-30.0, 30.0, 601)
        np.testing.assert_allclose(
            np.asarray(self.variant(inverse_softplus)(softplus(rho_grid))),
            np.asarray(rho_grid),
            rtol=1e-5,
            atol=1e-5,
        )


def test_inverse_softplus_is_finite_for_large_sigma():
    """ρ = σ + log(1 − e^−σ) stays finite where log(expm1(σ)) overflows (σ ≳ 89 in float32),
    and agrees with float64 numpy; softplus(ρ) gives σ back."""
    sigma = np.array([50.0, 89.0, 100.0, 1e3, 1e6], np.float32)
    rho = np.asarray(jax.jit(inverse_softplus)(jnp.asarray(sigma)), np.float64)
    assert np.all(np.isfinite(rho))
    s64 = sigma.astype(np.float64)
    np.testing.assert_allclose(rho, s64 + np.log(-np.expm1(-s64)), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(softplus(jnp.asarray(rho, jnp.float32))), sigma, rtol=1e-6
    )


class MeanFieldGaussianTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_log_prob_matches_scipy(self):
        post = _posterior()
        w = jax.tree_util.tree_map(lambda m: m + 0.7 * jnp.cos(m), post.mu)
        expected = scipy.stats.norm.logpdf(
            _flat(w), loc=_flat(post.mu), scale=_np_sigma(_flat(post.rho))
        ).sum()
        got = self.variant(lambda p, w: p.log_prob(w))(post, w)
        np.testing.assert_allclose(float(got), expected, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sample_and_log_prob_agrees_with_log_prob_of_the_returned_sample(self):
        post = _posterior(1)
        w, log_q = self.variant(lambda p, k: p.sample_and_log_prob(k))(post, jax.random.key(3))
        np.testing.assert_allclose(float(log_q), float(post.log_prob(w)), rtol=1e-5)
        expected = scipy.stats.norm.logpdf(
            _flat(w), loc=_flat(post.mu), scale=_np_sigma(_flat(post.rho))
        ).sum()
        np.testing.assert_allclose(float(log_q), expected, rtol=1e-4)
        # w = μ + softplus(ρ) ε, with the ε of the same key (σ in numpy).
        eps = post.sample_noise(jax.random.key(3))
        np.testing.assert_allclose(
            _flat(w), _flat(post.mu) + _np_sigma(_flat(post.rho)) * _flat(eps), rtol=1e-6, atol=1e-7
        )
        assert np.std(_flat(eps)) > 0.5  # The noise is there.

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy_matches_scipy(self):
        post = _posterior(2)
        expected = scipy.stats.norm(scale=_np_sigma(_flat(post.rho))).entropy().sum()
        np.testing.assert_allclose(
            float(self.variant(lambda p: p.entropy())(post)), expected, rtol=1e-5
        )

    def test_stddev_mean_and_signal_to_noise(self):
        post = _posterior(3)
        sigma = _np_sigma(_flat(post.rho))
        np.testing.assert_allclose(_flat(post.stddev()), sigma, rtol=1e-6)
        chex.assert_trees_all_equal(post.mean(), post.mu)
        np.testing.assert_allclose(
            _flat(post.signal_to_noise()), np.abs(_flat(post.mu)) / sigma, rtol=1e-5
        )
        chex.assert_trees_all_equal_structs(post.signal_to_noise(), post.mu)

    def test_reparameterised_gradients(self):
        """∂w/∂μ = 1 and ∂w/∂ρ = ε · sigmoid(ρ) at fixed key; ∂ log q/∂μ = 0, ∂/∂ρ = −σ'/σ."""
        post = _posterior(5)
        key = jax.random.key(7)

        @jax.jit
        def gradients(post):
            sample_grads = jax.grad(
                lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p.sample(key)))
            )(post)
            log_q_grads = jax.grad(lambda p: p.sample_and_log_prob(key)[1])(post)
            return post.sample_noise(key), sample_grads, log_q_grads

        eps, grads, log_q_grads = gradients(post)
        eps = _flat(eps)
        np.testing.assert_allclose(_flat(grads.mu), 1.0)
        rho = _flat(post.rho)
        np.testing.assert_allclose(
            _flat(grads.rho), eps / (1.0 + np.exp(-rho)), rtol=1e-5, atol=1e-7
        )
        grads = log_q_grads
        np.testing.assert_allclose(_flat(grads.mu), 0.0)
        sigma = _np_sigma(rho)
        np.testing.assert_allclose(_flat(grads.rho), -1.0 / (1.0 + np.exp(-rho)) / sigma, rtol=1e-5)


@pytest.mark.parametrize("noise", ["jax", "hash"])
def test_samples_have_mean_mu_and_variance_sigma_squared(noise):
    post = _posterior(4).replace(noise=noise)
    num_samples = 20000
    samples = jax.jit(jax.vmap(post.sample))(jax.random.split(jax.random.key(0), num_samples))
    flat = np.concatenate(
        [np.asarray(a, np.float64).reshape(num_samples, -1) for a in jax.tree.leaves(samples)],
        axis=1,
    )  # [S, n]
    mu, sigma = _flat(post.mu), _np_sigma(_flat(post.rho))
    z_mean = (flat.mean(0) - mu) / (sigma / np.sqrt(num_samples))
    assert np.max(np.abs(z_mean)) < 4.5, z_mean
    var_ratio = flat.var(0, ddof=1) / sigma**2
    # The sample variance of a Gaussian has relative standard error sqrt(2 / (S − 1)).
    assert np.max(np.abs(var_ratio - 1.0)) < 4.5 * np.sqrt(2.0 / num_samples), var_ratio
    # Different weights, in the same leaf or not, are uncorrelated.
    standardised = (flat - mu) / sigma
    corr = np.corrcoef(standardised, rowvar=False)
    off_diagonal = corr[~np.eye(corr.shape[0], dtype=bool)]
    assert np.max(np.abs(off_diagonal)) < 5.0 / np.sqrt(num_samples)


def _mlp_params(hidden: int = 4, inputs: int = 3, outputs: int = 2):
    model = models.MLP(hidden_sizes=(hidden,), num_outputs=outputs)
    return numpy_params(model, jnp.zeros((1, inputs)))


def test_counts_two_n_variational_parameters():
    params = _mlp_params()
    n = 3 * 4 + 4 + 4 * 2 + 2
    assert count_params(params) == n
    post = MeanFieldGaussian(mu=params, rho=params)
    assert post.num_weights() == n
    assert post.num_variational_params() == 2 * n
    point = PointEstimate(mu=params)
    assert point.num_weights() == n
    assert point.num_variational_params() == n


def test_init_posterior_constant_rho_and_scaled_mu():
    params = _mlp_params()
    post = init_posterior(jax.random.key(1), params, -4.5, mu_scale=0.25)
    chex.assert_trees_all_equal_structs(post.mu, params)
    chex.assert_trees_all_close(post.mu, jax.tree_util.tree_map(lambda p: 0.25 * p, params))
    for leaf in jax.tree.leaves(post.rho):
        assert leaf.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(leaf), -4.5)
    for leaf in jax.tree.leaves(post.mu):
        assert leaf.dtype == jnp.float32


def test_init_posterior_uniform_rho_in_range():
    params = {"hidden": np.zeros((20, 50), np.float32), "out": np.zeros((50, 10), np.float32)}
    post = init_posterior(jax.random.key(1), params, (-3.5, -3.0))
    rho = _flat(post.rho)
    assert rho.min() >= -3.5 and rho.max() < -3.0
    # Uniform: the mean and spread of U(−3.5, −3), not a constant.
    assert abs(rho.mean() - (-3.25)) < 0.01
    assert abs(rho.std() - 0.5 / np.sqrt(12.0)) < 0.01
    # Different leaves get different draws.
    first = np.ravel(np.asarray(post.rho["hidden"]))[:500]
    second = np.ravel(np.asarray(post.rho["out"]))
    assert np.abs(first - second).max() > 0.1
    # A list (as a config gives) works as well as a tuple.
    chex.assert_trees_all_equal(
        init_posterior(jax.random.key(1), params, [-3.5, -3.0]).rho, post.rho
    )


def test_point_estimate_is_a_point_mass():
    params = _mlp_params()
    point = PointEstimate(mu=params)
    chex.assert_trees_all_equal(point.sample(jax.random.key(0)), params)
    w, log_q = point.sample_and_log_prob(jax.random.key(0))
    chex.assert_trees_all_equal(w, params)
    assert float(log_q) == 0.0
    assert all(np.all(np.asarray(s) == 0) for s in jax.tree.leaves(point.stddev()))


def test_point_estimate_reparameterize_is_the_point_mass_for_any_noise():
    """Flipout takes the MC KL at `reparameterize(sample_noise(key))`: for a point mass that is
    (μ, log q = 0), so its KL is −log P(μ) alone, whatever noise it is handed."""
    params = _mlp_params()
    point = PointEstimate(mu=params)
    noise = point.sample_noise(jax.random.key(0))
    assert all(np.all(np.asarray(e) == 0) for e in jax.tree.leaves(noise))
    chex.assert_trees_all_equal_structs(noise, params)
    for eps in (noise, jax.tree_util.tree_map(jnp.ones_like, params)):
        w, log_q = point.reparameterize(eps)
        chex.assert_trees_all_equal(w, params)
        assert float(log_q) == 0.0


@jax.jit
def _through_transformations(post, stacked, keys):
    """vmap over posteriors and over keys, and an Optax step, all inside jit."""
    entropies = jax.vmap(lambda p: p.entropy())(stacked)
    samples = jax.vmap(post.sample)(keys)
    optimizer = optax.sgd(0.1)
    grads = jax.grad(lambda p: -p.entropy())(post)
    updates, _ = optimizer.update(grads, optimizer.init(post))
    return entropies, samples, optax.apply_updates(post, updates)


def test_posterior_is_a_pytree_through_jit_vmap_and_optax():
    first, second = _posterior(6), _posterior(7)
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), first, second)
    entropies, samples, new = _through_transformations(
        first, stacked, jax.random.split(jax.random.key(0), 3)
    )
    expected = [
        scipy.stats.norm(scale=_np_sigma(_flat(p.rho))).entropy().sum() for p in (first, second)
    ]
    np.testing.assert_allclose(np.asarray(entropies), expected, rtol=1e-5)
    chex.assert_shape(samples["a"], (3, 3, 4))
    assert not np.allclose(samples["a"][0], samples["a"][1])
    # The update of a posterior is a posterior; the entropy gradient raises every ρ, not μ.
    assert isinstance(new, MeanFieldGaussian)
    assert np.all(_flat(new.rho) > _flat(first.rho))
    chex.assert_trees_all_close(new.mu, first.mu)


@flax.struct.dataclass
class _UsersPosterior(MeanFieldGaussian):
    """A user's posterior: the same fields as MeanFieldGaussian, other methods."""

    def stddev(self):
        return jax.tree_util.tree_map(lambda r: 2.0 * softplus(r), self.rho)


def test_a_subclass_with_the_same_fields_has_a_treedef_of_its_own():
    # JAX compares dataclass treedefs by fields and static values, not class: without the
    # static `pytree_class` these two treedefs are equal but hash differently, and a jit cache
    # whose buckets collide hands one the other's trace (a wrong σ here, silently).
    base, users = _posterior(0), _UsersPosterior(_posterior(0).mu, _posterior(0).rho)
    a, b = jax.tree_util.tree_structure(base), jax.tree_util.tree_structure(users)
    assert a != b
    assert base.pytree_class == "bbb.posterior.MeanFieldGaussian"
    assert users.pytree_class.endswith("._UsersPosterior")
    # It survives flattening, replace() and jit, and stays out of the leaves and the repr.
    assert len(jax.tree_util.tree_leaves(users)) == len(jax.tree_util.tree_leaves(base))
    again = jax.jit(lambda p: p.replace(mu=p.mu))(users)
    assert type(again) is _UsersPosterior and again.pytree_class == users.pytree_class
    assert "pytree_class" not in repr(base)
    sigma = jax.jit(lambda p: p.stddev())
    np.testing.assert_allclose(_flat(sigma(users)), 2.0 * _flat(sigma(base)), rtol=1e-6)


_jit_sample_and_log_prob = jax.jit(lambda p, k: (p.sample_and_log_prob(k), p.sample_noise(k)))


@settings(max_examples=30, deadline=None)
@given(
    rho=st.floats(-30.0, 30.0, allow_nan=False, width=32),
    mu=st.floats(-5.0, 5.0, allow_nan=False, width=32),
)
def test_sample_and_log_prob_property(rho, mu):
    """log q(w) from ε equals log N(w | μ, σ²) for the returned w, for any μ and ρ."""
    post = MeanFieldGaussian(
        mu={"w": np.full((2,), mu, np.float32)}, rho={"w": np.full((2,), rho, np.float32)}
    )
    (w, log_q), eps = _jit_sample_and_log_prob(post, jax.random.key(11))
    eps = np.asarray(eps["w"], np.float64)
    sigma = float(_np_sigma(np.float32(rho)))
    assert np.isfinite(float(log_q))
    # scipy at w − μ = σ ε (forming w = μ + σ ε in float64 would cancel for tiny σ).
    expected = scipy.stats.norm.logpdf(sigma * eps, loc=0.0, scale=sigma).sum()
    np.testing.assert_allclose(float(log_q), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(w["w"]), mu + sigma * eps, rtol=1e-5, atol=1e-6 * (1.0 + sigma)
    )


@jax.jit
def _values_and_rho_gradient(post, key):
    w, log_q = post.sample_and_log_prob(key)
    grads = jax.grad(lambda p: p.sample_and_log_prob(key)[1] + p.entropy())(post)
    return w, log_q, post.entropy(), grads


@pytest.mark.parametrize("rho", [-30.0, 30.0])
def test_extreme_rho_is_finite(rho):
    post = MeanFieldGaussian(
        mu={"w": np.zeros((4,), np.float32)}, rho={"w": np.full((4,), rho, np.float32)}
    )
    w, log_q, entropy, grads = _values_and_rho_gradient(post, jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(w["w"])))
    assert np.isfinite(float(log_q)) and np.isfinite(float(entropy))
    assert np.all(np.isfinite(_flat(grads.rho)))


@pytest.mark.parametrize("num_samples", [1, 2, 16, 17, 40])
def test_sum_samples_matches_numpy(num_samples):
    """Adds in order up to 16 samples, a product with ones beyond: both the float64 sum."""
    x = np.random.default_rng(num_samples).normal(size=(num_samples, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(sum_samples(jnp.asarray(x)), x.astype(np.float64).sum(0), rtol=1e-5)


@pytest.mark.parametrize("num_samples", [1, 3, 17])
def test_sum_samples_on_other_backends_is_the_float64_sum(num_samples, monkeypatch):
    """Off the CPU `sum_samples` takes `jnp.sum` over the samples; the tests run on the CPU, so
    that branch is reached by reporting another backend. It too must sum, not average: the
    gradients of every value `shared` by the samples go through it."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x = np.random.default_rng(num_samples).normal(size=(num_samples, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(sum_samples(jnp.asarray(x)), x.astype(np.float64).sum(0), rtol=1e-5)


def test_shared_is_the_identity_with_summed_cotangents_under_nested_vmaps():
    """Under a vmap over members of a vmap over samples, `shared(x, noise)` is x (copied per
    sample), and x's gradient is the sum over the samples, as without it."""
    rng = np.random.default_rng(0)
    mu = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)  # 2 members
    noise = jnp.asarray(rng.normal(size=(2, 5, 4, 3)), jnp.float32)  # 5 samples each

    def loss(share, mu, noise):
        def per_sample(e):
            w = share(mu, e) + share(softplus(mu), e) * e
            return jnp.sum(jnp.sin(w) * e)

        return jnp.sum(jax.vmap(per_sample)(noise))

    def grads(share):
        return jax.vmap(jax.grad(lambda m, n: loss(share, m, n)))(mu, noise)

    np.testing.assert_allclose(grads(shared), grads(lambda x, like: x), rtol=1e-6, atol=1e-6)

    def hessian_vector_products(share):  # forward over reverse: both ways through `shared`
        hvp = lambda m, n: jax.jvp(jax.grad(lambda m: loss(share, m, n)), (m,), (n[0],))[1]
        return jax.vmap(hvp)(mu, noise)

    np.testing.assert_allclose(
        hessian_vector_products(shared),
        hessian_vector_products(lambda x, like: x),
        rtol=1e-5,
        atol=1e-6,
    )
    copies = jax.vmap(lambda e: shared(mu[0], e))(noise[0])
    np.testing.assert_array_equal(copies, np.broadcast_to(mu[0], (5, 4, 3)))
    np.testing.assert_array_equal(shared(mu, noise), mu)  # outside a vmap: the identity
