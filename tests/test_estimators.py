"""Tests for bbb.estimators: the sampled pre-activations under each estimator have the analytic
mean x·μ + μ_b and variance x²·σ² + σ_b² (numpy), the right correlation across examples, the
same KL, clear errors for layers an estimator cannot handle, and each estimator trains; and
`rows_dot`, which takes the MC samples as rows of one product, against numpy."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from bbb import estimators, models, objective, priors
from bbb.errors import ConfigError
from bbb.posterior import MeanFieldGaussian, PointEstimate
from tests.conftest import all_equations, numpy_posterior

pytestmark = pytest.mark.usefixtures("fast_compile")

NUM_SAMPLES = 6000


def _posterior(params, seed, rho_range=(-2.0, -0.5)) -> MeanFieldGaussian:
    """μ from `params`, ρ ~ U(rho_range): σ between 0.13 and 0.47, far from 1."""
    return numpy_posterior(params, rho_range, seed)


def _np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _output_samples(model, posterior, x, estimator):
    """[S, B, ...] outputs, one MC sample per key."""
    keys = jax.random.split(jax.random.key(1), NUM_SAMPLES)
    sample = jax.jit(
        jax.vmap(lambda k: estimators.sample_output(model, posterior, x, k, estimator))
    )
    return np.asarray(sample(keys), np.float64)


def _check_moments(samples, mean, variance):
    """Sample mean within 5 standard errors, sample variance within 5 of its standard errors."""
    num = samples.shape[0]
    z = (samples.mean(0) - mean) / np.sqrt(variance / num)
    assert np.max(np.abs(z)) < 5.0, np.max(np.abs(z))
    ratio = samples.var(0, ddof=1) / variance
    assert np.max(np.abs(ratio - 1.0)) < 5.0 * np.sqrt(2.0 / num), ratio


# Dense ------------------------------------------------------------------------------------

DENSE = nn.Dense(4)
# Five examples: two identical rows (for the correlation check), a zero row (only the bias
# noise is left), and mixed signs.
X_DENSE = np.array(
    [[1.0, -2.0, 0.5], [1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [-1.5, 0.3, 2.0], [0.2, 0.1, -0.7]],
    np.float32,
)


@pytest.fixture(scope="module")
def dense_posterior():
    params = {
        "kernel": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
        "bias": np.random.default_rng(1).normal(size=(4,)).astype(np.float32),
    }
    return _posterior(params, seed=2)


@pytest.mark.parametrize("noise", ["jax", "hash"])
@pytest.mark.parametrize("estimator", estimators.ESTIMATORS)
def test_dense_pre_activations_have_the_analytic_mean_and_variance(
    estimator, noise, dense_posterior
):
    dense_posterior = dense_posterior.replace(noise=noise)
    samples = _output_samples(DENSE, dense_posterior, X_DENSE, estimator)  # [S, B, F]
    mu, sigma = _np(dense_posterior.mu), _np(dense_posterior.stddev())
    x = X_DENSE.astype(np.float64)
    mean = x @ mu["kernel"] + mu["bias"]
    variance = x**2 @ sigma["kernel"] ** 2 + sigma["bias"] ** 2
    _check_moments(samples, mean, variance)
    # Two identical inputs: one shared weight sample under reparam (correlation 1); independent
    # noise per example under local_reparam; decorrelated by the random signs under flipout.
    first, second = samples[:, 0, :], samples[:, 1, :]
    correlation = np.array([np.corrcoef(first[:, j], second[:, j])[0, 1] for j in range(4)])
    if estimator == "reparam":
        np.testing.assert_allclose(correlation, 1.0, atol=1e-6)
    else:
        assert np.max(np.abs(correlation)) < 5.0 / np.sqrt(NUM_SAMPLES), correlation
    if estimator == "flipout":
        # The output signs alone decorrelate the deviations but not their sizes: without the
        # input signs, the two rows' squared deviations would be equal (correlation 1).
        deviation = samples[:, :2, :] - mean[:2]  # [S, 2, F]
        squares = np.array(
            [np.corrcoef(deviation[:, 0, j] ** 2, deviation[:, 1, j] ** 2)[0, 1] for j in range(4)]
        )
        assert np.max(squares) < 0.8, squares


@pytest.mark.parametrize("estimator", estimators.ESTIMATORS)
def test_output_units_of_one_example_are_uncorrelated(estimator, dense_posterior):
    """The weights of different output units are independent, so for one input
    Cov(out_j, out_k) = Σ_i x_i² Cov(W_ij, W_ik) = 0 for j ≠ k, under every estimator. Noise
    drawn once per example and shared by its units would make them perfectly correlated."""
    samples = _output_samples(DENSE, dense_posterior, X_DENSE, estimator)  # [S, B, F]
    off_diagonal = ~np.eye(samples.shape[-1], dtype=bool)
    for b in range(samples.shape[1]):
        correlation = np.corrcoef(samples[:, b, :], rowvar=False)[off_diagonal]
        # Each sample correlation of independent units has standard error 1/√S.
        assert np.max(np.abs(correlation)) < 5.0 / np.sqrt(NUM_SAMPLES), (b, correlation)


@pytest.mark.parametrize("noise", ["jax", "hash"])
def test_flipout_perturbs_by_the_given_noise_with_independent_fair_signs(noise):
    """`apply_local` with ε given, no bias, and one-hot inputs x_b = e_b: unit j of example b is
    μ_bj + r_bj s_bb ΔW_bj exactly, with ΔW = σ ∘ ε. Its deviation must have the size σ|ε| of
    the given ε (not of a fresh draw, not σ²|ε|), and the four signs t_bj = r_bj s_bb (two
    examples, two units) must be independent fair coins, each of their 16 patterns with
    probability 1/16. Output signs shared by the units or by the examples, or s and r drawn
    from one stream, leave patterns empty."""
    rng = np.random.default_rng(8)
    mu = rng.normal(size=(2, 2))
    sigma = rng.uniform(0.2, 0.6, size=(2, 2))
    eps = np.array([[0.7, -1.3], [1.1, 0.4]])
    posterior = MeanFieldGaussian(
        mu={"kernel": jnp.asarray(mu, jnp.float32)},
        rho={"kernel": jnp.asarray(np.log(np.expm1(sigma)), jnp.float32)},
        noise=noise,
    )
    given = {"kernel": jnp.asarray(eps, jnp.float32)}
    layer, x = nn.Dense(2, use_bias=False), np.eye(2, dtype=np.float32)
    num_keys = 4000
    keys = jax.random.split(jax.random.key(4), num_keys)
    outputs = jax.jit(
        jax.vmap(lambda k: estimators.apply_local(layer, posterior, x, k, "flipout", noise=given))
    )(keys)
    deviation = np.asarray(outputs, np.float64) - mu  # x @ μ = μ: [S, 2, 2]
    delta = sigma * eps  # row b: the perturbation of input b, the only one example b has
    np.testing.assert_allclose(
        np.abs(deviation), np.abs(delta)[None].repeat(num_keys, 0), rtol=1e-4
    )
    heads = (deviation / delta > 0).reshape(num_keys, 4)
    counts = np.bincount(heads @ (2 ** np.arange(4)), minlength=16)
    expected = num_keys / 16
    chi_square = np.sum((counts - expected) ** 2 / expected)
    assert chi_square < scipy.stats.chi2.isf(1e-6, df=15), counts


class _TwoHeads(nn.Module):
    """Two Dense layers of one width on the same input, side by side."""

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([nn.Dense(4, name="a")(x), nn.Dense(4, name="b")(x)], axis=-1)


@pytest.mark.parametrize("noise", ["jax", "hash"])
@pytest.mark.parametrize("estimator", estimators.ESTIMATORS)
def test_layers_draw_independent_noise(estimator, noise, dense_posterior):
    """Two layers with the same μ, σ and input: their outputs must be uncorrelated (the hash
    stream of one key is the same whatever the length, so one key for both would make them
    equal)."""
    layer = jax.tree_util.tree_map(np.asarray, dense_posterior.mu)
    rho = jax.tree_util.tree_map(np.asarray, dense_posterior.rho)
    posterior = MeanFieldGaussian(
        mu={"a": layer, "b": layer}, rho={"a": rho, "b": rho}, noise=noise
    )
    samples = _output_samples(_TwoHeads(), posterior, X_DENSE, estimator)  # [S, B, 8]
    for j in range(4):
        correlation = np.corrcoef(samples[:, 0, j], samples[:, 0, 4 + j])[0, 1]
        assert abs(correlation) < 5.0 / np.sqrt(NUM_SAMPLES), (j, correlation)


# Conv -------------------------------------------------------------------------------------

CONV = nn.Conv(3, (3, 3), padding="SAME")


def _np_conv_same(x, kernel):
    """Cross-correlation with zero 'SAME' padding, [B, H, W, C] × [kh, kw, C, F], by loops."""
    kh, kw = kernel.shape[:2]
    padded = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    batch, height, width, _ = x.shape
    out = np.zeros((batch, height, width, kernel.shape[-1]))
    for i in range(height):
        for j in range(width):
            patch = padded[:, i : i + kh, j : j + kw, :]  # [B, kh, kw, C]
            out[:, i, j, :] = np.einsum("bhwc,hwcf->bf", patch, kernel)
    return out


@pytest.mark.parametrize("noise", ["jax", "hash"])
@pytest.mark.parametrize("estimator", ["reparam", "flipout"])
def test_conv_pre_activations_have_the_analytic_mean_and_variance(estimator, noise):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
    params = {
        "kernel": (rng.normal(size=(3, 3, 2, 3)) * 0.5).astype(np.float32),
        "bias": rng.normal(size=(3,)).astype(np.float32),
    }
    posterior = _posterior(params, seed=4).replace(noise=noise)
    samples = _output_samples(CONV, posterior, x, estimator)  # [S, B, H, W, F]
    mu, sigma = _np(posterior.mu), _np(posterior.stddev())
    x64 = x.astype(np.float64)
    mean = _np_conv_same(x64, mu["kernel"]) + mu["bias"]
    variance = _np_conv_same(x64**2, sigma["kernel"] ** 2) + sigma["bias"] ** 2
    _check_moments(samples, mean, variance)
    # Within one example the perturbation is one weight perturbation shared by every position:
    # Cov(out[p, f], out[q, f]) = Σ_{offset, c} x[p + offset, c] x[q + offset, c] σ²[offset, c, f]
    # + σ_b²[f], here for the neighbours p = (1, 1) and q = (1, 2).
    padded = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    left, right = padded[:, 1:4, 1:4, :], padded[:, 1:4, 2:5, :]  # [B, 3, 3, C] receptive fields
    covariance = (
        np.einsum("bhwc,bhwc,hwcf->bf", left, right, sigma["kernel"] ** 2) + sigma["bias"] ** 2
    )
    centred = samples - samples.mean(0)
    sample_covariance = np.mean(centred[:, :, 1, 1, :] * centred[:, :, 1, 2, :], axis=0)  # [B, F]
    standard_error = np.sqrt(
        (variance[:, 1, 1, :] * variance[:, 1, 2, :] + covariance**2) / NUM_SAMPLES
    )
    z = (sample_covariance - covariance) / standard_error
    assert np.max(np.abs(z)) < 5.0, z
    # The two examples get independent signs under flipout: uncorrelated outputs.
    if estimator == "flipout":
        correlation = np.corrcoef(samples[:, 0, 1, 1, 0], samples[:, 1, 1, 1, 0])[0, 1]
        assert abs(correlation) < 5.0 / np.sqrt(NUM_SAMPLES)


def _random_bits_sizes(fn, *args):
    """The sizes of all `random_bits` draws (jax.random's generator) in fn's jaxpr."""
    from jax.extend.core import jaxprs_in_params

    sizes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "random_bits":
                sizes.append(int(np.prod(eqn.params["shape"])))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return sizes


@pytest.mark.parametrize("estimator", ["local_reparam", "flipout"])
def test_posterior_noise_chooses_the_generator_of_the_per_example_noise(estimator, dense_posterior):
    """With `posterior.noise="hash"` no per-example draw (noise or signs) is left to threefry:
    jax.random only draws the hash's two seeds per call."""
    x = jnp.asarray(X_DENSE)

    def draw(posterior):
        return _random_bits_sizes(
            lambda k: estimators.sample_output(DENSE, posterior, x, k, estimator),
            jax.random.key(0),
        )

    assert max(draw(dense_posterior.replace(noise="jax"))) >= X_DENSE.shape[0] * 3
    assert max(draw(dense_posterior.replace(noise="hash"))) <= 2


# The KL does not depend on the estimator ----------------------------------------------------

_rng = np.random.default_rng(5)
X = _rng.normal(size=(32, 2)).astype(np.float32)
Y = (X[:, 0] - X[:, 1] > 0).astype(np.int32)
MLP = models.MLP(hidden_sizes=(6,), num_outputs=2)


@pytest.fixture(scope="module")
def mlp_posterior():
    kernel_0 = _rng.normal(size=(2, 6)).astype(np.float32)
    params = {
        "Dense_0": {"kernel": kernel_0, "bias": np.zeros(6, np.float32)},
        "Dense_1": {
            "kernel": _rng.normal(size=(6, 2)).astype(np.float32) * 0.4,
            "bias": np.zeros(2, np.float32),
        },
    }
    return numpy_posterior(params, (-3.0, -1.0), seed=6)


@pytest.mark.parametrize("estimator", estimators.ESTIMATORS)
def test_kl_is_the_same_whichever_estimator(estimator, mlp_posterior):
    prior = priors.gaussian(1.0)
    common = dict(
        model=MLP,
        prior=prior,
        likelihood=objective.Categorical(),
        num_train=32,
        num_batches=1,
        estimator=estimator,
    )
    monte_carlo = objective.FreeEnergy(**common, kl="mc")
    closed_form = objective.FreeEnergy(**common, kl="closed_form")
    params = monte_carlo.init_params(mlp_posterior)
    num_keys = 3000

    @jax.jit
    def kls(params, keys):
        mc = jax.vmap(lambda k: monte_carlo(params, (X, Y), k, 1.0)[1]["kl"])(keys)
        return mc, closed_form(params, (X, Y), keys[0], 1.0)[1]["kl"]

    mc, exact = kls(params, jax.random.split(jax.random.key(7), num_keys))
    expected = float(prior.kl({}, mlp_posterior))
    np.testing.assert_allclose(float(exact), expected, rtol=1e-6)
    mc = np.asarray(mc, np.float64)
    standard_error = mc.std(ddof=1) / np.sqrt(num_keys)
    assert abs(mc.mean() - expected) < 3 * standard_error, (mc.mean(), expected, standard_error)
    assert 3 * standard_error < 0.05 * expected  # the comparison has power


@pytest.mark.parametrize("noise", ["jax", "hash"])
def test_flipout_takes_the_mc_kl_at_its_own_perturbed_weights(noise):
    """One weight, one example: the output μ + s r σ ε reveals ±ε, and the sample's MC KL must
    be log q − log P at w = μ + σ ε for one of the two signs. With a separate ε for the KL it
    would match neither (the two ε would be independent)."""
    mu, sigma = 0.3, 0.5
    posterior = MeanFieldGaussian(
        mu={"kernel": jnp.full((1, 1), mu)},
        rho={"kernel": jnp.full((1, 1), float(np.log(np.expm1(sigma))))},
        noise=noise,
    )
    prior = priors.gaussian(1.0)
    fe = objective.FreeEnergy(
        nn.Dense(1, use_bias=False),
        prior,
        objective.Categorical(),
        num_train=1,
        num_batches=1,
        estimator="flipout",
        kl="mc",
    )
    params = fe.init_params(posterior)
    keys = jax.random.split(jax.random.key(3), 200)
    outputs, kls = jax.jit(jax.vmap(lambda k: fe._sample(params, jnp.ones((1, 1)), k)))(keys)
    eps = (np.asarray(outputs, np.float64).reshape(-1) - mu) / sigma  # ±ε

    def kl_at(e):
        w = mu + sigma * e
        log_q = -0.5 * e**2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
        return log_q - (-0.5 * w**2 - 0.5 * np.log(2 * np.pi))

    kls = np.asarray(kls, np.float64)
    error = np.minimum(np.abs(kls - kl_at(eps)), np.abs(kls - kl_at(-eps)))
    assert np.max(error) < 1e-4, np.max(error)
    assert np.std(eps) > 0.5  # the samples differ


# Layers an estimator cannot handle ---------------------------------------------------------


def _free_energy(model, estimator):
    return objective.FreeEnergy(
        model,
        priors.gaussian(1.0),
        objective.Categorical(),
        num_train=8,
        num_batches=1,
        estimator=estimator,
    )


def _abstract_loss(model, x, estimator):
    """Traces the loss under jax.eval_shape: shapes only, no compute."""
    fe = _free_energy(model, estimator)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = fe.init_params(MeanFieldGaussian(mu=shapes, rho=shapes))
    y = np.zeros((x.shape[0],), np.int32)
    return jax.eval_shape(lambda p: fe(p, (x, y), jax.random.key(0), 1.0)[0], params)


LENET = models.LeNet(features=(2, 3), hidden_sizes=(4,), num_outputs=3)
X_IMAGE = np.zeros((2, 8, 8, 1), np.float32)


def test_local_reparam_on_a_conv_model_raises_before_compute():
    with pytest.raises(ConfigError) as info:
        _abstract_loss(LENET, X_IMAGE, "local_reparam")
    assert info.value.field == "posterior.estimator"
    assert info.value.value == "local_reparam"
    assert "Conv_0" in str(info.value) and "reparam" in info.value.allowed
    # The same model is fine under reparam and flipout.
    for estimator in ("reparam", "flipout"):
        assert _abstract_loss(LENET, X_IMAGE, estimator).shape == ()


def test_local_reparam_names_dense_as_its_only_layer_for_a_conv():
    """A conv layer under local_reparam is refused for its type (Dense only), not for the shape
    of its inputs: the message must not suggest that [batch, features] inputs would do."""
    with pytest.raises(ConfigError, match=r"'local_reparam' supports nn\.Dense only") as info:
        _abstract_loss(LENET, X_IMAGE, "local_reparam")
    assert "Conv_0" in str(info.value) and "type Conv" in str(info.value)


class _DenseThenLayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.LayerNorm()(nn.Dense(4)(x)))


class _EmbedThenDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.Embed(10, 4)(x[:, 0].astype(jnp.int32)))


class _OwnParameter(nn.Module):
    """A parameter declared directly in the model, outside any Dense or Conv."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return nn.Dense(3)(x * scale)


@pytest.mark.parametrize(
    "model, layer",
    [
        (_DenseThenLayerNorm(), "LayerNorm"),
        (_EmbedThenDense(), "Embed"),
        (_OwnParameter(), "_OwnParameter"),
    ],
)
@pytest.mark.parametrize("estimator", ["local_reparam", "flipout"])
def test_unsupported_parametrised_layers_raise(model, layer, estimator):
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ConfigError) as info:
        _abstract_loss(model, x, estimator)
    assert info.value.field == "posterior.estimator" and info.value.value == estimator
    assert layer in str(info.value)
    assert _abstract_loss(model, x, "reparam").shape == ()


class _DenseOverPositions(nn.Module):
    """A Dense layer applied to every position of [B, T, F] inputs."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.Dense(4)(x.reshape(x.shape[0], 5, 1)).sum(axis=1))


class _SharedDense(nn.Module):
    """One Dense layer's weights used twice."""

    @nn.compact
    def __call__(self, x):
        layer = nn.Dense(5)
        return nn.Dense(3)(layer(jnp.tanh(layer(x))))


class _TiedEmbedding(nn.Module):
    """Output logits from the embedding's own weights (nn.Embed.attend)."""

    @nn.compact
    def __call__(self, x):
        embed = nn.Embed(3, 5)
        return embed.attend(nn.Dense(5)(x))


@pytest.mark.parametrize(
    "model, estimator, words",
    [
        # Positions share a weight sample; independent draws per output would not.
        (_DenseOverPositions(), "local_reparam", "3-D inputs"),
        (_SharedDense(), "local_reparam", "used twice"),
        (_SharedDense(), "flipout", "used twice"),
        (_TiedEmbedding(), "local_reparam", "not attend"),
        (_TiedEmbedding(), "flipout", "not attend"),
    ],
)
def test_layers_whose_noise_the_estimator_would_get_wrong_raise(model, estimator, words):
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ConfigError, match=words) as info:
        _abstract_loss(model, x, estimator)
    assert info.value.field == "posterior.estimator" and info.value.value == estimator
    assert _abstract_loss(model, x, "reparam").shape == ()


def test_flipout_takes_dense_layers_over_positions():
    """Flipout's signs are per example and feature, constant over positions: allowed."""
    assert (
        _abstract_loss(_DenseOverPositions(), np.zeros((2, 5), np.float32), "flipout").shape == ()
    )


def test_apply_local_rejects_other_estimators(mlp_posterior):
    with pytest.raises(ConfigError, match=r"posterior\.estimator"):
        estimators.apply_local(MLP, mlp_posterior, X, jax.random.key(0), "reparam")


# Each estimator trains ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("estimator", estimators.ESTIMATORS)
def test_each_estimator_trains_a_tiny_mlp(estimator, dtype, mlp_posterior):
    fe = objective.FreeEnergy(
        MLP.clone(dtype=models.DTYPES[dtype]),
        priors.gaussian(1.0),
        objective.Categorical(),
        num_train=32,
        num_batches=1,
        estimator=estimator,
    )
    optimizer = optax.adam(0.05)
    batch = (X, Y)

    @jax.jit
    def step(params, opt_state, key):
        (loss, metrics), grads = jax.value_and_grad(lambda p: fe(p, batch, key, 1.0), has_aux=True)(
            params
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics["nll"]

    params = fe.init_params(mlp_posterior)
    opt_state, losses, nlls = optimizer.init(params), [], []
    for key in jax.random.split(jax.random.key(9), 50):
        params, opt_state, loss, nll = step(params, opt_state, key)
        losses.append(float(loss))
        nlls.append(float(nll))
    losses, nlls = np.array(losses), np.array(nlls)  # each before its step's update
    assert np.all(np.isfinite(losses))
    assert losses[-5:].mean() < 0.7 * losses[:3].mean(), losses
    assert nlls[-5:].mean() < nlls[:3].mean(), nlls


def _dots(jaxpr) -> list[tuple[str, set[int]]]:
    """(operand dtype, operand dimensions) of every product (`lax.dot_general` or
    `estimators.rows_dot`) in `jaxpr`, nested ones too."""
    return [
        (str(eqn.invars[0].aval.dtype), {d for v in eqn.invars for d in v.aval.shape})
        for eqn in all_equations(jaxpr)
        if eqn.primitive.name in ("dot_general", "bbb_rows_dot")
    ]


@pytest.mark.parametrize("estimator", estimators.ESTIMATORS)
def test_bfloat16_hidden_layers_multiply_in_bfloat16_and_output_float32(estimator):
    """model.dtype="bfloat16": every product of the hidden layers (the mean, local_reparam's
    variance, flipout's perturbation), forward and backward, is a bfloat16 dot; the output
    layer's are float32, and so is the output, within bfloat16 rounding of the float32
    network's under the same noise."""
    sizes, num_outputs = (48, 48), 3  # No hidden or input dimension is 3: the output layer's.
    params = models.MLP(sizes, num_outputs).init(jax.random.key(0), jnp.zeros((1, 20)))
    posterior = numpy_posterior(params["params"], (-3.0, -2.0), seed=3)
    x = np.random.default_rng(4).normal(size=(16, 20)).astype(np.float32)
    outputs, dots = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = models.MLP(sizes, num_outputs, dtype=models.DTYPES[dtype])

        def output(mu, sigma_rho, model=model):
            p = posterior.replace(mu=mu, rho=sigma_rho)
            return estimators.sample_output(model, p, x, jax.random.key(5), estimator)

        outputs[dtype] = np.asarray(output(posterior.mu, posterior.rho))
        gradient = jax.grad(lambda m, r, f=output: f(m, r).sum(), argnums=(0, 1))
        dots[dtype] = _dots(jax.make_jaxpr(gradient)(posterior.mu, posterior.rho).jaxpr)
    assert outputs["bfloat16"].dtype == np.float32
    assert {dtype for dtype, _ in dots["float32"]} == {"float32"}
    hidden = [dtype for dtype, dims in dots["bfloat16"] if num_outputs not in dims]
    last = [dtype for dtype, dims in dots["bfloat16"] if num_outputs in dims]
    assert len(hidden) >= 5 and set(hidden) == {"bfloat16"}, dots["bfloat16"]
    assert len(last) >= 3 and set(last) == {"float32"}, dots["bfloat16"]
    assert len(dots["bfloat16"]) == len(dots["float32"])
    error = np.abs(outputs["bfloat16"] - outputs["float32"])
    scale = np.abs(outputs["float32"]).max()
    assert 1e-5 * scale < error.max() < 0.05 * scale, (error.max(), scale)


def test_zero_variance_gives_the_deterministic_network_and_finite_gradients(mlp_posterior):
    """A point mass (σ = 0): local_reparam adds no noise, and its gradients are not NaN."""
    point = PointEstimate(mu=mlp_posterior.mu)
    energies = {
        estimator: objective.FreeEnergy(
            MLP,
            priors.gaussian(1.0),
            objective.Categorical(),
            num_train=32,
            num_batches=1,
            estimator=estimator,
        )
        for estimator in ("reparam", "local_reparam")
    }
    params = energies["reparam"].init_params(point)

    @jax.jit
    def losses_and_gradients(params):
        return {
            name: jax.value_and_grad(lambda p, fe=fe: fe(p, (X, Y), jax.random.key(0), 1.0)[0])(
                params
            )
            for name, fe in energies.items()
        }

    results = losses_and_gradients(params)
    (loss, grads), (local_loss, local_grads) = results["reparam"], results["local_reparam"]
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(local_grads))
    np.testing.assert_allclose(float(local_loss), float(loss), rtol=1e-6)
    chex.assert_trees_all_close(local_grads, grads, rtol=1e-5, atol=1e-7)


# The MC samples as rows of one product -------------------------------------------------------


def _contractions(jaxpr) -> list[int]:
    """The number of axes each `dot_general` in `jaxpr` contracts, nested ones too."""
    return [
        len(eqn.params["dimension_numbers"][0][0])
        for eqn in all_equations(jaxpr)
        if eqn.primitive.name == "dot_general"
    ]


def test_rows_dot_is_the_product_and_has_its_gradients_under_vmap():
    """`rows_dot` against numpy: the values, and the gradients of Σ_k Σ c_k ∘ (x_k @ W) (by
    hand: ∂/∂x_k = c_k Wᵀ, ∂/∂W = Σ_k x_kᵀ c_k) with W shared by a vmap over k, with a W per
    k (a batched kernel), with members around the samples (two nested vmaps), in forward mode,
    and in bfloat16."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4)).astype(np.float32)  # [K, B, in]
    w = rng.normal(size=(4, 6)).astype(np.float32)
    c = rng.normal(size=(3, 5, 6)).astype(np.float32)
    x64, w64, c64 = (a.astype(np.float64) for a in (x, w, c))

    def total(w, x):
        terms = jax.vmap(lambda xk, ck: jnp.sum(ck * estimators.rows_dot(xk, w)))(x, c)
        return jnp.sum(terms)

    outputs = jax.vmap(estimators.rows_dot, in_axes=(0, None))(x, w)
    np.testing.assert_allclose(outputs, x64 @ w64, rtol=1e-5, atol=1e-5)
    grad_w, grad_x = jax.grad(total, argnums=(0, 1))(w, x)
    np.testing.assert_allclose(grad_w, np.einsum("kbi,kbo->io", x64, c64), rtol=1e-5)
    np.testing.assert_allclose(grad_x, c64 @ w64.T, rtol=1e-5, atol=1e-5)
    # A kernel per sample (reparam's weight samples, flipout's ΔW): lax.dot_general's batching.
    ws = rng.normal(size=(3, 4, 6)).astype(np.float32)

    def per_sample(ws):
        terms = jax.vmap(lambda xk, wk, ck: jnp.sum(ck * estimators.rows_dot(xk, wk)))(x, ws, c)
        return jnp.sum(terms)

    expected = np.einsum("kbi,kbo->kio", x64, c64)
    np.testing.assert_allclose(jax.grad(per_sample)(ws), expected, rtol=1e-5, atol=1e-5)
    # Members around the samples (a sweep): the kernel batched by the outer vmap only.
    by_member = jax.vmap(jax.grad(total), in_axes=(0, None))(np.stack([w, 2.0 * w]), x)
    np.testing.assert_allclose(by_member, np.stack([grad_w, grad_w]), rtol=1e-5)
    # Forward mode, and the dtype of a bfloat16 product.
    _, tangent = jax.jvp(lambda w: estimators.rows_dot(x, w), (w,), (w,))
    np.testing.assert_allclose(tangent, x64 @ w64, rtol=1e-5, atol=1e-5)
    half = estimators.rows_dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16 and half.shape == (3, 5, 6)


@pytest.mark.parametrize("estimator", ["local_reparam", "flipout"])
def test_samples_as_rows_leave_no_product_contracting_two_axes(estimator, mlp_posterior):
    """Under the vmap over K samples, the weight gradients of the layers after the first
    contract all K·B rows as one axis (XLA:CPU copies an operand transposed to contract two),
    with the same outputs and gradients as `lax.dot_general`'s own batching, which
    `samples_as_rows=False` keeps (the mesh's path, so this test can fail)."""
    x = np.random.default_rng(1).normal(size=(6, 2)).astype(np.float32)
    keys = jax.random.split(jax.random.key(2), 3)

    def loss(mu, rows):
        posterior = mlp_posterior.replace(mu=mu)

        def one(key):
            out = estimators.apply_local(MLP, posterior, x, key, estimator, samples_as_rows=rows)
            return jnp.sum(jnp.tanh(out))

        return jnp.sum(jax.vmap(one)(keys))

    found = {}
    for rows in (True, False):
        jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda m, r=rows: loss(m, r)))(mlp_posterior.mu)
        found[rows] = (_contractions(jaxpr.jaxpr), jax.value_and_grad(loss)(mlp_posterior.mu, rows))
    assert found[True][0] and set(found[True][0]) == {1}, found[True][0]
    assert 2 in found[False][0], found[False][0]
    (value, grads), (plain_value, plain_grads) = found[True][1], found[False][1]
    np.testing.assert_allclose(value, plain_value, rtol=1e-5)
    chex.assert_trees_all_close(grads, plain_grads, rtol=1e-4, atol=1e-5)
    # The free energy on one device takes its K = 3 samples as rows.
    energy = dataclasses.replace(_free_energy(MLP, estimator), num_samples=3)
    params = energy.init_params(mlp_posterior)
    batch = (x, np.zeros(6, np.int32))
    gradient = jax.grad(lambda p: energy(p, batch, jax.random.key(0), 1.0)[0])
    assert set(_contractions(jax.make_jaxpr(gradient)(params).jaxpr)) == {1}
