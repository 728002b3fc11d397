"""Predictions under the posterior: per-sample outputs, the MC-averaged predictive, and the
prediction of the posterior-mean weights.

The Bayesian predictive p(y | x, D) ≈ (1/K) Σ_k p(y | x, w_k), w_k ~ q (Blundell et al. 2015,
§2, eq. (2) and §5.1, which also reports the posterior-mean weights as a cheap alternative).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from bbb import estimators
from bbb.objective import train_kwargs
from bbb.posterior import MeanFieldGaussian, PointEstimate

PyTree = Any


@flax.struct.dataclass
class Prediction:
    """What the posterior says about a batch of inputs.

    Attributes:
      samples: per-sample outputs [K, B, ...]: class probabilities for classification, the raw
        network outputs for regression.
      predictive: the MC average over the K samples [B, ...] (for classification, the Bayesian
        predictive distribution).
      mean_weights: the output at the posterior-mean weights μ [B, ...] (probabilities for
        classification).
    """

    samples: jax.Array
    predictive: jax.Array
    mean_weights: jax.Array


def predict(
    model: nn.Module,
    posterior: MeanFieldGaussian | PointEstimate,
    x: jax.Array,
    key: jax.Array,
    num_samples: int,
    *,
    classification: bool = True,
    estimator: str = "reparam",
    mc_dropout: bool = False,
    sample_batch: int | None = None,
) -> Prediction:
    """Per-sample outputs, the MC-averaged predictive, and the posterior-mean prediction.

    Args:
      model: the Flax model.
      posterior: the posterior over its parameters.
      x: inputs [B, ...].
      key: a PRNG key.
      num_samples: K, the posterior samples.
      classification: map outputs to probabilities with a softmax.
      estimator: how a sample is drawn ("reparam" draws whole networks, the others per example).
      mc_dropout: keep dropout on at prediction (MC dropout; Gal & Ghahramani 2016).
      sample_batch: draw the samples this many at a time (`lax.map` over groups, each
        vectorised), so that memory holds that many networks and their activations rather
        than K; None draws all K at once. The samples are the same either way (to float
        rounding: a group is fused differently).

    Returns:
      A `Prediction`.
    """
    kwargs = train_kwargs(model, mc_dropout)
    transform = (lambda out: jax.nn.softmax(out, axis=-1)) if classification else (lambda o: o)

    def one_sample(k: jax.Array) -> jax.Array:
        return transform(estimators.sample_output(model, posterior, x, k, estimator, **kwargs))

    keys = jax.random.split(key, num_samples)
    if sample_batch is None or sample_batch >= num_samples:
        samples = jax.vmap(one_sample)(keys)  # [K, B, ...]
    else:
        samples = jax.lax.map(one_sample, keys, batch_size=sample_batch)
    mean_out = model.apply(
        {"params": posterior.mean()}, x, rngs={"dropout": key}, **train_kwargs(model, False)
    )
    return Prediction(
        samples=samples, predictive=jnp.mean(samples, axis=0), mean_weights=transform(mean_out)
    )


def predict_in_batches(
    model: nn.Module,
    posterior: MeanFieldGaussian | PointEstimate,
    x: jax.Array,
    key: jax.Array,
    num_samples: int,
    batch_size: int = 500,
    input_shape: tuple[int, ...] | None = None,
    **kwargs: Any,
) -> Prediction:
    """`predict` over a large array, in chunks that `lax.map` runs one after another.

    Memory is that of one chunk (K × batch_size activations); the result is the same as one
    `predict` call but for the noise, which is drawn per chunk (fold_in(key, chunk index)).

    Args:
      model: the Flax model.
      posterior: the posterior.
      x: inputs [N, ...]; N need not divide by `batch_size` (the last chunk is padded).
      key: a PRNG key.
      num_samples: K.
      batch_size: examples per chunk.
      input_shape: the model's shape of one example, for `x` stored flat ([N, D], as
        `train.examples_on_device` places data); None: `x.shape[1:]`.
      **kwargs: passed to `predict`.

    Returns:
      A `Prediction` with samples [K, N, ...].
    """
    n = x.shape[0]
    batch_size = min(batch_size, n)
    num_chunks = -(-n // batch_size)
    padded = jnp.concatenate([x, jnp.zeros((num_chunks * batch_size - n, *x.shape[1:]), x.dtype)])
    chunks = padded.reshape(num_chunks, batch_size, *x.shape[1:])

    shape = x.shape[1:] if input_shape is None else tuple(input_shape)

    def one_chunk(args):
        index, chunk = args
        # Shaped per chunk, not as a whole: flat data stay flat in device memory (TPU padding).
        chunk = chunk.reshape(batch_size, *shape)
        return predict(
            model, posterior, chunk, jax.random.fold_in(key, index), num_samples, **kwargs
        )

    out = jax.lax.map(one_chunk, (jnp.arange(num_chunks), chunks))

    def unchunk(a: jax.Array, axis: int) -> jax.Array:
        a = jnp.moveaxis(a, 0, axis)  # chunk axis next to the example axis
        shape = a.shape[:axis] + (num_chunks * batch_size,) + a.shape[axis + 2 :]
        return jax.lax.slice_in_dim(a.reshape(shape), 0, n, axis=axis)

    return Prediction(
        samples=unchunk(out.samples, 1),
        predictive=unchunk(out.predictive, 0),
        mean_weights=unchunk(out.mean_weights, 0),
    )
