"""Variance of the free energy's gradient under each estimator, per layer.

In the style of Kingma, Salimans & Welling (2015), Table 1: at fixed variational parameters,
draw many (minibatch, noise) pairs, compute ∂F̂/∂μ for each, and report the variance across
draws, averaged over the parameters of each layer. Estimators:

- `reparam`: one weight sample shared by the minibatch (Blundell et al. 2015);
- `per_example`: a separate weight sample for every example (the expensive reference);
- `local_reparam`: sampled pre-activations (Kingma et al. 2015);
- `flipout`: sign-flipped shared perturbations (Wen et al. 2018).

Terms (`term`): the whole free energy's gradient ("free_energy"), or the expected negative
log-likelihood's alone ("likelihood", the KL weighted by 0). The estimators differ only in how
they sample the likelihood term; with the Monte-Carlo KL every one of them still draws a whole
weight sample for log q(w) − log P(w), whose noise can hide the difference in the sum.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bbb import objective as objective_lib
from bbb.errors import check_choice, check_integer_at_least

PyTree = Any
ESTIMATORS = ("reparam", "per_example", "local_reparam", "flipout")
TERMS = ("free_energy", "likelihood")


def _per_example_loss(free_energy, params, batch, key, kl_weight):
    """F̂/N with separate weight samples for every example of the minibatch (the run's K
    per example, as the other estimators draw K per minibatch)."""
    x, y = batch
    keys = jax.random.split(key, x.shape[0])
    single = dataclasses.replace(free_energy, estimator="reparam")

    def one(xi, yi, k):
        loss, _ = single(params, (xi[None], yi[None]), k, kl_weight)
        return loss

    # Each example's loss estimates F/N with batch size 1; their mean has the KL once per
    # example's own sample, averaged: the same expectation as the minibatch estimate.
    return jnp.mean(jax.vmap(one)(x, y, keys))


def gradient_variance(
    free_energy: objective_lib.FreeEnergy,
    params: PyTree,
    data: tuple[jax.Array, jax.Array],
    key: jax.Array,
    *,
    estimator: str,
    batch_size: int,
    num_draws: int,
    term: str = "free_energy",
    fixed_batch: bool = False,
) -> dict[str, float]:
    """Var[∂F̂/∂μ] across draws of minibatch and noise, averaged over each layer's parameters.

    Args:
      free_energy: the run's objective (its estimator is replaced by `estimator`).
      params: {"posterior", "prior", "likelihood"} at which to measure.
      data: the training set (x [N, ...], y [N]).
      key: a PRNG key.
      estimator: one of `ESTIMATORS`.
      batch_size: B.
      num_draws: how many (minibatch, noise) draws, at least 2.
      term: "free_energy" (∂F̂/∂μ) or "likelihood" (the expected negative log-likelihood's
        gradient alone: the KL weighted by 0).
      fixed_batch: draw the noise only, on one minibatch (the same for every draw and every
        estimator), so that the variance is the estimator's own and not the minibatch's.

    Returns:
      {layer path: mean variance} for the μ of every parameter array.

    Raises:
      ConfigError: an unknown estimator or term, or fewer than 2 draws.
    """
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("term", term, TERMS)
    check_num_draws(num_draws)
    x, y = data
    kl_weight = 1.0 / free_energy.num_batches if term == "free_energy" else 0.0
    if estimator == "per_example":
        loss_fn = lambda p, b, k: _per_example_loss(free_energy, p, b, k, kl_weight)
    else:
        objective = dataclasses.replace(free_energy, estimator=estimator)
        loss_fn = lambda p, b, k: objective(p, b, k, kl_weight)[0]

    @jax.jit
    def one_draw(params, x, y, k):
        k_batch, k_noise = jax.random.split(k)
        if fixed_batch:
            k_batch = key
        indices = jax.random.choice(k_batch, x.shape[0], (batch_size,), replace=False)
        grads = jax.grad(loss_fn)(params, (x[indices], y[indices]), k_noise)
        return grads["posterior"].mu

    # Welford's running mean and sum of squares, so memory stays that of two gradients.
    mean = jax.tree_util.tree_map(jnp.zeros_like, params["posterior"].mu)
    m2 = jax.tree_util.tree_map(jnp.zeros_like, mean)
    for i, k in enumerate(jax.random.split(key, num_draws)):
        g = one_draw(params, x, y, k)
        delta = jax.tree_util.tree_map(lambda a, b: a - b, g, mean)
        count = i + 1
        mean = jax.tree_util.tree_map(lambda m, d, n=count: m + d / n, mean, delta)
        m2 = jax.tree_util.tree_map(lambda s, d, a, m: s + d * (a - m), m2, delta, g, mean)
    variance = jax.tree_util.tree_map(lambda s: s / (num_draws - 1), m2)
    flat = jax.tree_util.tree_flatten_with_path(variance)[0]
    return {jax.tree_util.keystr(path): float(np.mean(np.asarray(v))) for path, v in flat}


def check_num_draws(num_draws: int) -> None:
    """Raises ConfigError unless `num_draws` is an integer ≥ 2 (a variance needs two draws)."""
    check_integer_at_least("num_draws", num_draws, 2, "a sample variance")


def variance_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per estimator, one column per layer."""
    layers = list(next(iter(results.values())))
    lines = [
        "| estimator | " + " | ".join(layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    for estimator, row in results.items():
        lines.append(f"| {estimator} | " + " | ".join(f"{row[k]:.3g}" for k in layers) + " |")
    return "\n".join(lines) + "\n"


def variance_report(
    results: dict[str, dict[str, dict[str, float]]],
    num_draws: int,
    step: int,
    workdir: str,
    fixed_batch: bool = False,
) -> str:
    """The Markdown report of `scripts/grad_variance.py`: one table per term.

    Args:
      results: {term: {estimator: {layer: variance}}}.
      num_draws: the draws behind each variance.
      step: the checkpoint's step.
      workdir: the run measured.
      fixed_batch: whether the draws were of the noise alone, on one minibatch.

    Returns:
      The report.
    """
    titles = {
        "free_energy": "Var[∂F̂/∂μ], the free energy's gradient",
        "likelihood": "Var of the expected negative log-likelihood's gradient alone (KL weight 0)",
    }
    parts = [
        f"Per layer (mean over its parameters), {num_draws} draws of "
        f"{'noise, on one fixed minibatch' if fixed_batch else 'minibatch and noise'}, at "
        f"step {step} of {workdir}.\n"
    ]
    for term, by_estimator in results.items():
        parts.append(f"\n{titles[term]}:\n\n" + variance_table(by_estimator))
    return "".join(parts)
