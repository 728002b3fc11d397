"""The variational free energy of Bayes by Backprop, its KL schedules and likelihoods.

Blundell et al. (2015), eqs. (1)–(2) and (8)–(9). For a dataset D of N examples split into M
minibatches D_i of size B, the free energy (the negative ELBO) is

    F(D, θ) = KL[q(w|θ) ‖ P(w)] − E_q[log P(D|w)],

and minibatch i is given the cost

    F_i = π_i · T · KL[q ‖ P] − Σ_{(x, y) ∈ D_i} E_q[log P(y | x, w)],      Σ_i π_i = 1,

with a temperature T (1 for the true posterior; T < 1 gives a "cold" posterior). Scaled by M,
F̂_i = M π_i T KL − (N / B) Σ_{D_i} E_q[log P(y|x, w)] is an unbiased estimate of F for the
uniform schedule π_i = 1/M. The optimised and logged `loss` is F̂_i / N, the free energy per
training example: the KL and the log-likelihood are on the same scale, whatever B is.

The expectations are estimated with K Monte-Carlo samples (`objective.num_samples`), vmapped
over keys (one sample is evaluated without the vmap); on a device mesh the K samples are split
over its "samples" axis and the minibatch over its "data" axis (`bbb.parallel`), with the same
keys, hence the same noise, as on one device. The KL is either the paper's Monte-Carlo estimate
log q(w) − log P(w) at the sampled weights (`"mc"`, the only option for non-conjugate priors
such as the scale mixture), or its closed form where one exists (`"closed_form"`, Gaussian
prior). Under `reparam` and `flipout` the MC KL is taken at the weights of the likelihood's own
sample (flipout's w = μ + ΔW); `local_reparam` samples no weights, so its MC KL draws a weight
sample of its own.

KL schedules (`objective.kl_schedule`), as π_i for step `step` of an epoch of M steps:
- `"uniform"`: π_i = 1/M.
- `"blundell"`: π_i = 2^(M−i) / (2^M − 1), i = 1..M (Blundell et al. 2015, §3.4): the KL
  dominates the first minibatches of each epoch.
- `"anneal"`: π_i = min(1, (t + 1) / warm-up steps) / M at global step t (a linear warm-up).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bbb import estimators, parallel
from bbb.errors import ConfigError, check_positive
from bbb.posterior import MeanFieldGaussian, PointEstimate, sum_samples
from bbb.priors import Prior, closed_form_unavailable
from bbb.special import HALF_LOG_2PI

PyTree = Any
Metrics = dict[str, jax.Array]
KL_MODES = ("mc", "closed_form")
KL_SCHEDULES = ("uniform", "blundell", "anneal")


# Likelihoods ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Categorical:
    """P(y | x, w) = softmax(f(x; w))_y, for classification."""

    is_classification = True

    def init_params(self) -> dict[str, jax.Array]:
        """No trainable parameters."""
        return {}

    def log_prob(self, params: dict[str, jax.Array], outputs: jax.Array, y: jax.Array):
        """log P(y | logits), per example.

        Args:
          params: unused.
          outputs: logits [B, C].
          y: integer labels [B].

        Returns:
          [B] log-probabilities.
        """
        log_probs = jax.nn.log_softmax(outputs, axis=-1)
        return jnp.take_along_axis(log_probs, y[:, None].astype(jnp.int32), axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """P(y | x, w) = N(y | f(x; w), s²), with a fixed or learned noise scale s.

    With `learnable`, log s is a point-estimated parameter trained with μ and ρ.
    """

    noise_std: float = 0.1
    learnable: bool = False
    is_classification = False

    def init_params(self) -> dict[str, jax.Array]:
        """{"log_noise_std": log s} when the noise is learned, else {}."""
        if self.learnable:
            return {"log_noise_std": jnp.float32(math.log(self.noise_std))}
        return {}

    def log_noise_std(self, params: dict[str, jax.Array]) -> jax.Array:
        """log s, learned or fixed."""
        if self.learnable:
            return params["log_noise_std"]
        return jnp.float32(math.log(self.noise_std))

    def log_prob(self, params: dict[str, jax.Array], outputs: jax.Array, y: jax.Array):
        """log N(y | outputs, s²), summed over output dimensions.

        Args:
          params: the likelihood's parameters.
          outputs: predicted means [B, D].
          y: targets [B, D] (or [B] when D = 1).

        Returns:
          [B] log-densities.
        """
        y = y.reshape(outputs.shape)
        log_s = self.log_noise_std(params)
        z = (y - outputs) * jnp.exp(-log_s)
        return jnp.sum(-0.5 * jnp.square(z) - log_s - HALF_LOG_2PI, axis=-1)


def make_likelihood(config: Any) -> Categorical | Gaussian:
    """The likelihood that `config.likelihood` names: "categorical" or "gaussian".

    Args:
      config: the `config.likelihood` block (`name`, `noise_std`, `learnable`).

    Returns:
      The likelihood.
    """
    if config.name == "categorical":
        return Categorical()
    if config.name == "gaussian":
        check_positive("likelihood.noise_std", config.noise_std)
        return Gaussian(noise_std=float(config.noise_std), learnable=bool(config.learnable))
    raise ConfigError("likelihood.name", config.name, "'categorical' or 'gaussian'")


# KL schedules -----------------------------------------------------------------------------


def kl_weight(
    schedule: str, step: jax.Array | int, num_batches: int, warmup_steps: int = 0
) -> jax.Array:
    """π_i, the share of the KL given to the minibatch at global step `step`.

    Args:
      schedule: "uniform", "blundell" or "anneal".
      step: the global step t (0-based); the position in the epoch is t mod M.
      num_batches: M, the minibatches per epoch.
      warmup_steps: the length of the linear warm-up for "anneal".

    Returns:
      A float32 scalar π_i.
    """
    check_positive("num_batches", num_batches, integer=True)
    step = jnp.asarray(step)
    if schedule == "uniform":
        return jnp.float32(1.0 / num_batches)
    if schedule == "blundell":
        # 2^(M−i)/(2^M − 1) = 2^(−i) / (1 − 2^(−M)), computed without overflow for large M.
        # ldexp gives 2^(−i) exactly (exp2 in float32 is off by up to ~4e−6 relative).
        i = (step % num_batches + 1).astype(jnp.int32)
        return jnp.ldexp(jnp.float32(1.0), -i) / jnp.float32(
            -math.expm1(-num_batches * math.log(2.0))
        )
    if schedule == "anneal":
        ramp = jnp.minimum(1.0, (step + 1).astype(jnp.float32) / max(warmup_steps, 1))
        return ramp / num_batches
    raise ConfigError("objective.kl_schedule", schedule, f"one of {KL_SCHEDULES}")


# The free energy --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FreeEnergy:
    """The minibatch free energy of a model under a variational posterior.

    Attributes:
      model: the Flax model.
      prior: the prior over its weights.
      likelihood: `Categorical` or `Gaussian`.
      num_train: N, the training-set size.
      num_batches: M, the minibatches per epoch.
      num_samples: K, the Monte-Carlo samples per step.
      estimator: "reparam", "local_reparam" or "flipout".
      kl: "mc" or "closed_form".
      temperature: T, multiplying the KL.
      mesh: a ("data", "samples") `jax.sharding.Mesh` to shard the minibatch and the K samples
        over (`bbb.parallel`); None (or one device) computes everything on one device.
      vmap_one_sample: evaluate K = 1 under a vmap of one sample, as up to 7859124 (the same
        values; slower on a CPU): for the benchmark's ablation, not a config field.
    """

    model: nn.Module
    prior: Prior
    likelihood: Categorical | Gaussian
    num_train: int
    num_batches: int
    num_samples: int = 1
    estimator: str = "reparam"
    kl: str = "mc"
    temperature: float = 1.0
    mesh: jax.sharding.Mesh | None = None
    vmap_one_sample: bool = False

    def __post_init__(self):
        check_positive("num_train", self.num_train, integer=True)
        check_positive("num_batches", self.num_batches, integer=True)
        check_positive("objective.num_samples", self.num_samples, integer=True)
        check_positive("objective.kl_temperature", self.temperature)
        if self.kl not in KL_MODES:
            raise ConfigError("objective.kl", self.kl, f"one of {KL_MODES}")
        if self.estimator not in estimators.ESTIMATORS:
            raise ConfigError("posterior.estimator", self.estimator, str(estimators.ESTIMATORS))
        if self.kl == "closed_form" and not self.prior.has_closed_form_kl:
            raise closed_form_unavailable(self.prior)

    def init_params(self, posterior: MeanFieldGaussian | PointEstimate) -> dict[str, PyTree]:
        """The trained pytree: the posterior, and the prior's and likelihood's parameters.

        Args:
          posterior: the initial posterior.

        Returns:
          {"posterior": ..., "prior": {...}, "likelihood": {...}}.
        """
        return {
            "posterior": posterior,
            "prior": self.prior.init_params(),
            "likelihood": self.likelihood.init_params(),
        }

    def kl_divergence(self, params: dict[str, PyTree], key: jax.Array) -> jax.Array:
        """One estimate of KL[q ‖ P]: closed form, or log q(w) − log P(w) at one w ~ q."""
        posterior = params["posterior"]
        if self.kl == "closed_form":
            return self.prior.kl(params["prior"], posterior)
        w, log_q = posterior.sample_and_log_prob(key)
        return log_q - self.prior.log_prob(params["prior"], w)

    def _sample(self, params: dict[str, PyTree], x: jax.Array, key: jax.Array):
        """One MC sample: (outputs [B, ...], the MC KL at this sample's weights, or 0)."""
        posterior = params["posterior"]
        key_weights, key_kl, key_dropout = jax.random.split(key, 3)
        rngs = {"dropout": key_dropout}
        if self.estimator == "reparam":
            w, log_q = posterior.sample_and_log_prob(key_weights)
            outputs = self.model.apply({"params": w}, x, rngs=rngs, **train_kwargs(self.model))
            if self.kl != "mc":
                return outputs, jnp.zeros((), jnp.float32)
            # The MC KL keeps the parameters' dtype (a float32 cast rounds it under x64).
            return outputs, log_q - self.prior.log_prob(params["prior"], w)
        noise = None
        if self.estimator == "flipout" and self.kl == "mc":
            # One ε for both terms, as `apply_local` would draw it: ΔW = σ ∘ ε perturbs the
            # layers, and the KL is taken at w = μ + ΔW.
            noise = posterior.sample_noise(estimators.flipout_keys(key_weights)[1])
        outputs = estimators.apply_local(
            self.model,
            posterior,
            x,
            key_weights,
            self.estimator,
            rngs=rngs,
            noise=noise,
            samples_as_rows=not parallel.is_sharded(self.mesh),
            **train_kwargs(self.model),
        )
        if self.kl != "mc":
            return outputs, jnp.zeros((), jnp.float32)
        if noise is not None:
            w, log_q = posterior.reparameterize(noise)
            return outputs, log_q - self.prior.log_prob(params["prior"], w)
        return outputs, self.kl_divergence(params, key_kl)

    def __call__(
        self,
        params: dict[str, PyTree],
        batch: tuple[jax.Array, jax.Array],
        key: jax.Array,
        kl_weight: jax.Array | float,
    ) -> tuple[jax.Array, Metrics]:
        """The minibatch free energy per training example, F̂_i / N, and its parts.

        Args:
          params: {"posterior", "prior", "likelihood"} from `init_params`.
          batch: (x [B, ...], y [B, ...]).
          key: a PRNG key for this step.
          kl_weight: π_i, this minibatch's share of the KL (sums to 1 over an epoch).

        Returns:
          (loss, metrics): loss = F̂_i / N; metrics hold `loss`, `nll` (expected negative
          log-likelihood per example), `kl` (KL[q‖P] in nats, for the whole network),
          `kl_weight` (π_i), `elbo` (−loss), `accuracy` (classification) and `sigma_mean`.
        """
        x, y = parallel.constrain(batch, self.mesh, "data")
        batch_size = x.shape[0]
        # The keys are split as on one device, then each device takes its K / samples of them.
        keys = parallel.constrain(jax.random.split(key, self.num_samples), self.mesh, "samples")
        if self.num_samples == 1 and not self.vmap_one_sample:
            # One sample, no vmap: a vmap of one batches every matmul over a sample axis of
            # size 1, and XLA:CPU then computed each weight gradient transposed ([out, in]) and
            # transposed it back inside every fusion that reads it (the K = 1 steps 2–19%
            # slower; docs/performance.md, "One sample without a vmap").
            sample = self._sample(params, x, keys[0])
            outputs, kl_samples = jax.tree_util.tree_map(lambda a: a[None], sample)
        else:
            outputs, kl_samples = jax.vmap(lambda k: self._sample(params, x, k))(keys)
        # outputs [K, B, ...], kl_samples [K].
        outputs = parallel.constrain(outputs, self.mesh, "samples", "data")
        kl_samples = parallel.constrain(kl_samples, self.mesh, "samples")  # [K]
        log_lik = jax.vmap(lambda out: self.likelihood.log_prob(params["likelihood"], out, y))(
            outputs
        )  # [K, B]
        expected_log_lik = jnp.mean(log_lik, axis=0)  # [B]
        if self.kl == "closed_form":
            kl = self.prior.kl(params["prior"], params["posterior"])
        else:
            kl = jnp.mean(kl_samples)
        kl_scale = self.num_batches * kl_weight * self.temperature
        free_energy = kl_scale * kl - (self.num_train / batch_size) * jnp.sum(expected_log_lik)
        loss = free_energy / self.num_train
        metrics = {
            "loss": loss,
            "nll": -jnp.mean(expected_log_lik),
            "kl": kl,
            "kl_weight": jnp.asarray(kl_weight, jnp.float32),
            "elbo": -loss,
            "sigma_mean": sigma_mean(params["posterior"]),
        }
        if self.likelihood.is_classification:
            probs = sum_samples(jax.nn.softmax(outputs, axis=-1)) / self.num_samples  # [B, C]
            metrics["accuracy"] = jnp.mean(jnp.argmax(probs, axis=-1) == y)
        return loss, metrics


def train_kwargs(model: nn.Module, train: bool = True) -> dict[str, bool]:
    """`{"train": train}` if the model's `__call__` takes a `train` flag (dropout), else {}."""
    return {"train": train} if "train" in inspect.signature(model.__call__).parameters else {}


def sigma_mean(posterior: Any) -> jax.Array:
    """The posterior's mean standard deviation over every parameter (0 for a point estimate)."""
    return _tree_mean(posterior.stddev())


def _tree_mean(tree: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    total = sum((jnp.sum(leaf) for leaf in leaves), jnp.float32(0.0))
    return total / sum(leaf.size for leaf in leaves)
