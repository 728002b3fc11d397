"""Tests for bbb.predict: shapes, the predictive as the mean of posterior samples, the
posterior-mean prediction against numpy, chunked prediction, and the σ → 0 limit."""

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest
import scipy.special

from bbb import models
from bbb.posterior import MeanFieldGaussian, PointEstimate
from bbb.predict import Prediction, predict, predict_in_batches
from tests.conftest import numpy_posterior

pytestmark = pytest.mark.usefixtures("fast_compile")

K, B, C = 5, 4, 3  # one shape for most calls, so that they share one compilation
MODEL = models.MLP(hidden_sizes=(4,), num_outputs=C)
_rng = np.random.default_rng(0)
X = _rng.normal(size=(11, 2)).astype(np.float32)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Dense_0": {
            "kernel": rng.normal(size=(2, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32) * 0.3,
        },
        "Dense_1": {
            "kernel": rng.normal(size=(4, C)).astype(np.float32),
            "bias": rng.normal(size=(C,)).astype(np.float32) * 0.3,
        },
    }


def _np_mlp(w, x):
    w = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), w)
    hidden = np.maximum(x.astype(np.float64) @ w["Dense_0"]["kernel"] + w["Dense_0"]["bias"], 0)
    return hidden @ w["Dense_1"]["kernel"] + w["Dense_1"]["bias"]


def _posterior(rho=-1.0) -> MeanFieldGaussian:
    return numpy_posterior(_params(), rho, seed=1)


_predict_jit = jax.jit(
    predict, static_argnums=(0, 4), static_argnames=("classification", "estimator")
)


def _predict(model, posterior, x, key, num_samples, classification=True, estimator="reparam"):
    """`predict` under jit, with every static argument given the same way (one cache entry)."""
    return _predict_jit(
        model, posterior, x, key, num_samples, classification=classification, estimator=estimator
    )


def test_shapes_probabilities_and_predictive_is_the_sample_mean():
    post = _posterior()
    out = _predict(MODEL, post, X[:B], jax.random.key(0), K)
    assert isinstance(out, Prediction)
    chex.assert_shape(out.samples, (K, B, C))
    chex.assert_shape([out.predictive, out.mean_weights], (B, C))
    np.testing.assert_allclose(np.asarray(out.samples).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.predictive).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.mean_weights).sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(out.samples) >= 0)
    np.testing.assert_allclose(out.predictive, np.mean(out.samples, axis=0), rtol=1e-6)
    # The posterior-mean prediction is the model at μ, in numpy.
    np.testing.assert_allclose(
        out.mean_weights, scipy.special.softmax(_np_mlp(post.mu, X[:B]), -1), rtol=1e-5
    )
    # Each sample is the network at one posterior draw w_k (the draws differ).
    draws = jax.jit(jax.vmap(lambda k: post.sample(jax.random.split(k)[0])))(
        jax.random.split(jax.random.key(0), K)
    )
    for k in range(K):
        w = jax.tree_util.tree_map(lambda a, k=k: a[k], draws)
        np.testing.assert_allclose(
            out.samples[k], scipy.special.softmax(_np_mlp(w, X[:B]), -1), rtol=1e-4, atol=1e-6
        )
    assert np.abs(np.asarray(out.samples[0] - out.samples[1])).max() > 1e-3


def test_regression_outputs_are_raw():
    post = _posterior()
    out = _predict(MODEL, post, X[:B], jax.random.key(0), K, classification=False)
    np.testing.assert_allclose(out.mean_weights, _np_mlp(post.mu, X[:B]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.predictive, np.mean(out.samples, axis=0), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(out.samples).sum(-1) - 1.0).max() > 1e-2  # not probabilities


@pytest.mark.parametrize("estimator", ["reparam", "local_reparam", "flipout"])
def test_tiny_sigma_samples_equal_the_mean_weights_prediction(estimator):
    post = _posterior(rho=-30.0)  # σ ≈ 1e−13
    out = _predict(MODEL, post, X[:B], jax.random.key(0), K, estimator=estimator)
    chex.assert_shape(out.samples, (K, B, C))
    for k in range(K):
        np.testing.assert_allclose(out.samples[k], out.mean_weights, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.predictive, out.mean_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("estimator", ["reparam", "local_reparam", "flipout"])
def test_samples_come_from_the_estimator_asked_for(estimator):
    """One linear layer and two identical inputs: reparam draws whole networks, so the rows get
    the same output in every sample; local_reparam and flipout draw per example, and the
    rows' outputs are uncorrelated (independent weights per unit under local_reparam, random
    signs per example under flipout): sample correlation within 5 standard errors (1/√K) of 0."""
    rng = np.random.default_rng(5)
    layer = nn.Dense(C)
    params = {
        "kernel": rng.normal(size=(2, C)).astype(np.float32),
        "bias": rng.normal(size=(C,)).astype(np.float32),
    }
    num_samples = 2000
    x = np.repeat(X[:1], 2, axis=0)
    out = _predict(
        layer,
        numpy_posterior(params, -1.0),
        x,
        jax.random.key(6),
        num_samples,
        classification=False,
        estimator=estimator,
    )
    samples = np.asarray(out.samples, np.float64)  # [K, 2, C]
    if estimator == "reparam":
        np.testing.assert_array_equal(samples[:, 0], samples[:, 1])
        assert samples[:, 0].std(axis=0).min() > 0.1  # the networks drawn differ
        return
    for j in range(C):
        correlation = np.corrcoef(samples[:, 0, j], samples[:, 1, j])[0, 1]
        assert abs(correlation) < 5.0 / np.sqrt(num_samples), (j, correlation)


def test_point_estimate_predicts_its_parameters():
    point = PointEstimate(mu=_posterior().mu)
    out = _predict(MODEL, point, X[:B], jax.random.key(0), K)
    expected = scipy.special.softmax(_np_mlp(point.mu, X[:B]), -1)
    for k in range(2):
        np.testing.assert_allclose(out.samples[k], expected, rtol=1e-5)
    np.testing.assert_allclose(out.mean_weights, expected, rtol=1e-5)


def test_predict_in_batches_equals_predict_per_chunk():
    """N = 11 in chunks of B = 4: chunk i uses fold_in(key, i); the last chunk is padded."""
    post = _posterior()
    key = jax.random.key(3)
    batched = jax.jit(predict_in_batches, static_argnums=(0, 4, 5))(MODEL, post, X, key, K, B)
    chex.assert_shape(batched.samples, (K, 11, C))
    chex.assert_shape([batched.predictive, batched.mean_weights], (11, C))
    padded = np.concatenate([X, np.zeros((1, 2), np.float32)])
    for index, start in enumerate(range(0, 11, B)):
        # One `predict` per chunk; the reparam weights do not depend on the inputs, so the
        # padded last chunk's real rows are those of `predict` on the 3 rows alone.
        expected = _predict(
            MODEL, post, padded[start : start + B], jax.random.fold_in(key, index), K
        )
        stop = min(start + B, 11)
        rows = slice(0, stop - start)
        np.testing.assert_allclose(
            batched.samples[:, start:stop], expected.samples[:, rows], rtol=1e-5, atol=1e-7
        )
        np.testing.assert_allclose(
            batched.predictive[start:stop], expected.predictive[rows], rtol=1e-5, atol=1e-7
        )
        np.testing.assert_allclose(
            batched.mean_weights[start:stop], expected.mean_weights[rows], rtol=1e-5, atol=1e-7
        )
    np.testing.assert_allclose(
        batched.mean_weights, scipy.special.softmax(_np_mlp(post.mu, X), -1), rtol=1e-5
    )
    # A chunk larger than the data: one chunk, the same as one `predict` call.
    single = predict_in_batches(MODEL, post, X[:B], key, K, batch_size=500)
    chex.assert_trees_all_close(
        single,
        _predict(MODEL, post, X[:B], jax.random.fold_in(key, 0), K),
        rtol=1e-5,
        atol=1e-7,
    )


@pytest.mark.parametrize("estimator", ["reparam", "local_reparam"])
def test_samples_drawn_a_few_at_a_time_are_the_same_samples_in_less_memory(estimator):
    """`sample_batch` draws the K samples in groups (K = 7 in groups of 3: the last is short):
    the same keys, the same samples (to float32 rounding: a group is fused differently); the
    compiled program's temporaries shrink with the group (3 sampled networks and their
    activations, not 7)."""
    post, key = _posterior(), jax.random.key(4)
    x = np.repeat(X, 20, axis=0)  # 220 examples: activations that weigh.

    def run(sample_batch):
        fn = jax.jit(
            lambda post, x, key: predict(
                MODEL, post, x, key, 7, estimator=estimator, sample_batch=sample_batch
            )
        )
        compiled = fn.lower(post, x, key).compile()
        return compiled(post, x, key), compiled.memory_analysis().temp_size_in_bytes

    together, memory_together = run(None)
    grouped, memory_grouped = run(3)
    chex.assert_trees_all_close(grouped, together, rtol=2e-6, atol=1e-7)
    assert memory_grouped < 0.7 * memory_together, (memory_grouped, memory_together)
    assert run(7)[1] == memory_together  # A group of all K: one vectorised draw.


def test_mc_dropout_keeps_dropout_on_only_when_asked():
    model = models.MLP(hidden_sizes=(16,), num_outputs=C, dropout_rate=0.5)
    rng = np.random.default_rng(4)
    params = {
        "Dense_0": {
            "kernel": rng.normal(size=(2, 16)).astype(np.float32),
            "bias": np.ones(16, np.float32),
        },
        "Dense_1": {
            "kernel": rng.normal(size=(16, C)).astype(np.float32),
            "bias": np.zeros(C, np.float32),
        },
    }
    post = numpy_posterior(params, -30.0)
    run = jax.jit(predict, static_argnums=(0, 4), static_argnames=("mc_dropout",))
    off = run(model, post, X[:B], jax.random.key(0), 3, mc_dropout=False)
    on = run(model, post, X[:B], jax.random.key(0), 3, mc_dropout=True)
    np.testing.assert_allclose(off.samples[0], off.samples[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(off.samples[0], off.mean_weights, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(on.samples[0] - on.samples[1])).max() > 1e-2
    # The posterior-mean prediction never uses dropout.
    np.testing.assert_allclose(on.mean_weights, off.mean_weights, rtol=1e-6)
