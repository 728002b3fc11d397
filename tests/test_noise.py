"""The noise generators: jax.random and the counter-based hash (normals and signs)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from bbb import posterior
from bbb.errors import ConfigError


def test_bits_to_normal_is_finite_and_symmetric_at_the_extremes():
    bits = jnp.array([0, 1, 511, 512, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF], jnp.uint32)
    z = np.asarray(posterior.bits_to_normal(bits))
    assert np.all(np.isfinite(z))
    assert z[0] == -z[-1] and z[0] < -5.0
    assert z[4] == -z[5] and abs(z[4]) < 1e-6
    # Monotone in the bits: the inverse CDF of a uniform.
    assert np.all(np.diff(z) >= 0)


def test_bits_to_normal_matches_the_normal_quantiles_at_every_input():
    """All 2²³ values of the top 23 bits, against float64 scipy: within 7 ulp (jax.lax.erf_inv
    in float32 is up to 91 ulp off), exactly antisymmetric and nondecreasing."""
    k = np.arange(0, 2**23, dtype=np.uint64)
    z = np.asarray(posterior.bits_to_normal(jnp.asarray((k << 9).astype(np.uint32))), np.float64)
    u = (k + 0.5) / 2**22 - 1.0  # Exact in float64.
    expected = np.sqrt(2.0) * scipy.special.erfinv(u)
    ulp = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(z - expected) / ulp) <= 7.0
    assert np.max(np.abs(z - expected)) < 1.2e-6
    np.testing.assert_array_equal(z, -z[::-1])
    assert np.all(np.diff(z) >= 0)
    # The low 9 bits are ignored: they do not move the number.
    low_bits = jnp.asarray((k[::4099] << 9 | 0x1FF).astype(np.uint32))
    low = np.asarray(posterior.bits_to_normal(low_bits))
    np.testing.assert_array_equal(low, z[::4099].astype(np.float32))


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_hash_normal_is_standard_normal(seed):
    z = np.asarray(posterior.hash_normal(jax.random.key(seed), 400_000))
    n = z.size
    assert abs(z.mean()) < 4 / np.sqrt(n)
    assert abs(z.var() - 1) < 4 * np.sqrt(2 / n)
    assert abs(scipy.stats.skew(z)) < 4 * np.sqrt(6 / n)
    assert abs(scipy.stats.kurtosis(z)) < 4 * np.sqrt(24 / n)
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3


def test_hash_normal_streams_are_uncorrelated():
    n = 200_000
    keys = jax.random.split(jax.random.key(7), 4)
    zs = np.stack([np.asarray(posterior.hash_normal(k, n)) for k in keys])
    corr = np.corrcoef(zs)
    off_diagonal = corr[~np.eye(4, dtype=bool)]
    assert np.all(np.abs(off_diagonal) < 5 / np.sqrt(n))
    # Neighbouring numbers of one stream, and the signs of products (a nonlinear check).
    z = zs[0]
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 / np.sqrt(n)
    assert abs(np.mean(np.sign(z[:-1] * z[1:]))) < 5 / np.sqrt(n)
    # The same key gives the same numbers; vmap over keys gives each key's stream.
    np.testing.assert_array_equal(np.asarray(posterior.hash_normal(keys[0], n)), z)
    batched = jax.vmap(lambda k: posterior.hash_normal(k, 1000))(keys)
    np.testing.assert_array_equal(np.asarray(batched[:, :1000]), zs[:, :1000])


def test_hash_signs_are_fair_and_independent():
    n = 200_000
    keys = jax.random.split(jax.random.key(3), 3)
    signs = np.stack([np.asarray(posterior.rademacher(k, (n // 400, 400), "hash")) for k in keys])
    assert set(np.unique(signs)) == {-1.0, 1.0}
    flat = signs.reshape(3, n)
    assert np.all(np.abs(flat.mean(axis=1)) < 5 / np.sqrt(n))
    assert abs(np.mean(flat[0, :-1] * flat[0, 1:])) < 5 / np.sqrt(n)  # neighbours
    corr = np.corrcoef(flat)[~np.eye(3, dtype=bool)]
    assert np.all(np.abs(corr) < 5 / np.sqrt(n))  # streams of different keys


def _lowbias32(h: np.ndarray) -> np.ndarray:
    """Chris Wellons' "lowbias32" integer finaliser, in numpy uint32 (wrapping) arithmetic."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))


def test_hash_bits_and_signs_follow_the_documented_formula():
    """bits_i = mix(mix(i·φ + s₀) ⊕ s₁), φ = 0x9E3779B9, (s₀, s₁) = jax.random.bits(key, (2,)),
    mix = lowbias32, recomputed in numpy; the hash signs are 1 − 2 · (top bit). The moment tests
    above cannot see a weaker mixer, a dropped round (each key's stream would be a shifted
    window of one sequence) or a sign bit shared with the normals' bits."""
    # Odd and even n: the counters are laid out as two rows and an odd n's last one
    # (`posterior.map_hash_bits`); the numbers are those of one flat counter all the same.
    for n, seed in [(4099, 0), (4099, 1), (4098, 12345), (1, 3), (2, 4), (0, 5)]:
        key = jax.random.key(seed)
        s0, s1 = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
        counter = np.arange(n, dtype=np.uint32)
        with np.errstate(over="ignore"):
            expected = _lowbias32(_lowbias32(counter * np.uint32(0x9E3779B9) + s0) ^ s1)
        np.testing.assert_array_equal(np.asarray(posterior.hash_bits(key, n)), expected)
        signs = np.asarray(posterior.rademacher(key, (n,), "hash"))
        np.testing.assert_array_equal(signs, 1.0 - 2.0 * (expected >> np.uint32(31)))
        # The normals are the quantiles of those bits (to an ulp: XLA may contract a
        # multiply-add differently in another loop).
        normals = np.asarray(jax.jit(posterior.hash_normal, static_argnums=1)(key, n))
        quantiles = np.asarray(posterior.bits_to_normal(jnp.asarray(expected)))
        np.testing.assert_allclose(normals, quantiles, rtol=3e-7, atol=1e-7)


def test_the_jax_generator_is_jax_random_and_the_hash_is_hash_normal():
    key, shape = jax.random.key(11), (7, 5)
    np.testing.assert_array_equal(
        posterior.standard_normal(key, shape, "jax"), jax.random.normal(key, shape)
    )
    np.testing.assert_array_equal(
        posterior.rademacher(key, shape, "jax"),
        jax.random.rademacher(key, shape, dtype=jnp.int8).astype(jnp.float32),
    )
    np.testing.assert_array_equal(
        posterior.standard_normal(key, shape, "hash"),
        posterior.hash_normal(key, 35).reshape(shape),
    )


@pytest.mark.parametrize("generator", posterior.NOISE_GENERATORS)
def test_posterior_samples_have_the_right_moments(generator):
    mu = {"a": jnp.full((3, 4), 0.5), "b": jnp.full((5,), -1.0)}
    rho = {"a": jnp.full((3, 4), -1.0), "b": jnp.full((5,), 0.5)}
    q = posterior.MeanFieldGaussian(mu, rho, noise=generator)
    samples = jax.vmap(q.sample)(jax.random.split(jax.random.key(0), 20_000))
    sigma = q.stddev()
    for name in ("a", "b"):
        s = np.asarray(samples[name])
        se = float(np.asarray(sigma[name]).max()) / np.sqrt(s.shape[0])
        np.testing.assert_allclose(s.mean(0), np.asarray(mu[name]), atol=5 * se)
        np.testing.assert_allclose(s.std(0), np.asarray(sigma[name]), rtol=0.03)
    # Different leaves get different noise.
    eps = q.sample_noise(jax.random.key(1))
    assert not np.allclose(np.asarray(eps["a"]).ravel()[:5], np.asarray(eps["b"]))


def test_materialize_returns_its_input_bit_for_bit():
    # Not subnormals: XLA's CPU arithmetic flushes those to 0 anyway (noise never has any).
    tiny = np.finfo(np.float32).tiny
    x = np.array(
        [1.0, -1.0, 0.0, -0.0, 0.5, 2.0, tiny, 3e38, -3e38, np.inf, -np.inf, np.nan], np.float32
    )
    x = np.concatenate([x, np.random.default_rng(0).normal(size=1000).astype(np.float32)])
    out = np.asarray(jax.jit(posterior.materialize)(jnp.asarray(x)))
    np.testing.assert_array_equal(out.view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize("generator", ["hash", "jax"])
def test_noise_is_computed_once_per_step_not_in_every_consumer(generator):
    """The slow path `materialize` removes: XLA recomputed the noise's inverse CDF (and the
    hash under it) inside each fusion that reads ε, five or six of them here. In the compiled
    gradient of a free-energy-like loss, erfinv must be computed in one fusion."""
    mu = {"a": jnp.zeros((30, 20)), "b": jnp.zeros((20,))}
    q = posterior.MeanFieldGaussian(
        mu=mu, rho=jax.tree_util.tree_map(lambda m: m - 5.0, mu), noise=generator
    )

    def loss(q, key):
        w, log_q = q.sample_and_log_prob(key)
        leaves = jax.tree_util.tree_leaves(w)
        return log_q + sum(jnp.sum(jnp.tanh(v) + jnp.exp(-jnp.square(v))) for v in leaves)

    hlo = jax.jit(jax.grad(loss)).lower(q, jax.random.key(0)).compile().as_text()
    computations = hlo.split("\n\n")  # The fused computations, one block each.
    # jax.random.normal calls erf_inv; the hash's inverse CDF is under a named scope.
    marker = "normal_quantile" if generator == "hash" else "erf_inv"

    def computes_erfinv(computation: str) -> bool:
        # An instruction under the marker that computes (a bitcast of ε only carries its name).
        return any(
            marker in line and not re.search(r"= \S+ (bitcast|slice|reshape|copy)\(", line)
            for line in computation.split("\n")
        )

    with_erfinv = [
        c.split("\n")[0] for c in computations if "fused" in c[:40] and computes_erfinv(c)
    ]
    assert len(with_erfinv) == 1, with_erfinv


def test_an_unknown_generator_is_refused_not_taken_for_threefry():
    key = jax.random.key(0)
    for draw in (
        lambda: posterior.normal_like(key, {"w": jnp.zeros(3)}, "philox"),
        lambda: posterior.standard_normal(key, (3,), "philox"),
        lambda: posterior.rademacher(key, (3,), "philox"),
    ):
        with pytest.raises(ConfigError, match=r"posterior\.noise='philox'"):
            draw()
