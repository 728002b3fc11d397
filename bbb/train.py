"""The training loop: `train_and_evaluate(config, workdir)`.

Everything of an epoch runs on the device: the data sit in device memory, the permutation is
drawn from fold_in(shuffle_key, epoch) inside `jit`, and a `lax.scan` runs the epoch's steps.
The host sees the device once per epoch, to log. Keys are derived from the step and epoch, and
Orbax checkpoints hold the whole state, so a resumed run repeats an uninterrupted one bit for
bit on the CPU.

On several devices (and hosts), `config.mesh` lays them out as a ("data", "samples") mesh: each
minibatch is sharded over "data", the MC samples over "samples", and the state is replicated
(`bbb.parallel`). The same keys give the same noise, so the loss trajectory is that of one device
up to the order of floating-point sums.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from bbb import objective as objective_lib
from bbb import parallel
from bbb import posterior as posterior_lib
from bbb import predict as predict_lib
from bbb.errors import (
    ConfigError,
    check_choice,
    check_in_range,
    check_non_negative,
    check_positive,
    check_seed,
)
from bbb.estimators import ESTIMATORS
from bbb.models import make_model
from bbb.priors import Flat, make_prior

PyTree = Any
POSTERIORS = ("mean_field", "point")
OPTIMIZERS = ("sgd", "momentum", "adam")
LR_SCHEDULES = ("constant", "cosine", "step")
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
EPOCH_LOOPS = ("scan", "steps")  # One lax.scan per epoch, or one jitted call per step.
# `cpu_vector_bits`: 0 chooses (512 for a program that draws noise on a CPU with AVX-512, else
# XLA's default: `compiler_options`); the others set XLA:CPU's preferred vector width.
CPU_VECTOR_BITS = (0, 128, 256, 512)
VECTOR_WIDTH_OPTION = "xla_cpu_prefer_vector_width"  # XLA:CPU's compile option for it.


class TrainingDivergedError(FloatingPointError):
    """A training metric became NaN or Inf."""


@flax.struct.dataclass
class TrainState:
    """Everything that a resumed run needs.

    Attributes:
      step: the global step (minibatches seen).
      params: {"posterior", "prior", "likelihood"}, the trained pytree.
      opt_state: the Optax state.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The pieces that a config builds, all validated before any compute.

    Attributes:
      config: the config.
      model: the Flax model.
      free_energy: the objective.
      optimizer: the Optax transformation.
      num_train: N.
      steps_per_epoch: M.
      input_shape: shape of one example.
      mesh: the ("data", "samples") device mesh (`bbb.parallel`); None means one device.
      compiler_options: XLA options of the experiment's compiled programs, as (name, value)
        pairs (`compiler_options`); empty on an accelerator.
    """

    config: ml_collections.ConfigDict
    model: Any
    free_energy: objective_lib.FreeEnergy
    optimizer: optax.GradientTransformation
    num_train: int
    steps_per_epoch: int
    input_shape: tuple[int, ...]
    mesh: jax.sharding.Mesh | None = None
    compiler_options: tuple[tuple[str, Any], ...] = ()


# Building and validation ------------------------------------------------------------------


def base_optimizer(config: ml_collections.ConfigDict, learning_rate: optax.ScalarOrSchedule):
    """The Optax optimiser that `config.name` names ("sgd", "momentum" or "adam").

    Args:
      config: an `optim` block with `name` and, for "momentum", `momentum`.
      learning_rate: a number or an Optax schedule.

    Returns:
      An `optax.GradientTransformation`.
    """
    check_choice("optim.name", config.name, OPTIMIZERS)
    if config.name == "sgd":
        return optax.sgd(learning_rate)
    if config.name == "momentum":
        check_in_range("optim.momentum", config.momentum, 0, 1, include_high=False)
        return optax.sgd(learning_rate, momentum=config.momentum)
    return optax.adam(learning_rate)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int):
    """The Optax optimiser and learning-rate schedule of `config.optim`.

    Args:
      config: the `config.optim` block.
      steps_per_epoch: M.
      num_epochs: the training length.

    Returns:
      An `optax.GradientTransformation`.
    """
    check_choice("optim.name", config.name, OPTIMIZERS)
    check_choice("optim.schedule", config.schedule, LR_SCHEDULES)
    check_positive("optim.learning_rate", config.learning_rate)
    check_non_negative("optim.warmup_epochs", config.warmup_epochs)
    check_non_negative("optim.grad_clip_norm", config.grad_clip_norm)
    total = steps_per_epoch * num_epochs
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if warmup >= total and config.warmup_epochs > 0:
        raise ConfigError("optim.warmup_epochs", config.warmup_epochs, "fewer than num_epochs")
    lr = config.learning_rate
    if config.schedule == "constant":
        schedule = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
    else:
        check_positive("optim.step_factor", config.step_factor)
        epochs = config.step_epochs
        if (
            not isinstance(epochs, tuple | list)
            or not epochs
            or any(isinstance(e, bool) or not isinstance(e, int | float) for e in epochs)
            or not config.warmup_epochs < epochs[0]
            or any(a >= b for a, b in itertools.pairwise(epochs))
        ):
            raise ConfigError(
                "optim.step_epochs",
                epochs,
                f"a non-empty increasing tuple of epochs after the warm-up's "
                f"{config.warmup_epochs}, such as (50, 75)",
            )
        # Epochs that round to the same step decay there once each (a dict of one factor per
        # step would apply only one of them).
        boundaries = {}
        for e in config.step_epochs:
            step = int(e * steps_per_epoch) - warmup
            boundaries[step] = boundaries.get(step, 1.0) * config.step_factor
        schedule = optax.piecewise_constant_schedule(lr, boundaries)
    if warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), schedule], [warmup]
        )
    tx = base_optimizer(config, schedule)
    if config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx


def build(
    config: ml_collections.ConfigDict,
    num_train: int,
    input_shape: tuple[int, ...],
    *,
    devices: Sequence[Any] | None = None,
    trace: bool = True,
):
    """Validates `config` and builds the model, objective and optimiser, before any compute.

    Args:
      config: the experiment config.
      num_train: the number of training examples.
      input_shape: the shape of one example.
      devices: the devices that `config.mesh` lays out; None takes `jax.devices()` (every
        process's).
      trace: also trace one step abstractly (`trace_step`); a sweep does it once per program
        structure rather than once per member.

    Returns:
      An `Experiment`.

    Raises:
      ConfigError: naming the first bad field.
    """
    check_positive("num_epochs", config.num_epochs, integer=True)
    check_positive("batch_size", config.batch_size, integer=True)
    if config.batch_size > num_train:
        raise ConfigError("batch_size", config.batch_size, f"at most the {num_train} examples")
    check_choice("prng_impl", config.prng_impl, PRNG_IMPLS)
    check_seed("seed", config.seed)
    check_choice("epoch_loop", config.get("epoch_loop", "scan"), EPOCH_LOOPS)
    check_choice("cpu_vector_bits", config.get("cpu_vector_bits", 0), CPU_VECTOR_BITS)
    check_choice("posterior.name", config.posterior.name, POSTERIORS)
    check_choice("posterior.estimator", config.posterior.estimator, ESTIMATORS)
    check_choice("posterior.noise", config.posterior.noise, posterior_lib.NOISE_GENERATORS)
    check_non_negative("posterior.init_rho_spread", config.posterior.init_rho_spread)
    check_positive("posterior.mu_scale", config.posterior.mu_scale)
    check_in_range("posterior.init_rho", config.posterior.init_rho, -30, 30)
    if config.posterior.name == "point" and config.objective.kl != "mc":
        raise ConfigError("objective.kl", config.objective.kl, "'mc' for a point posterior")
    if config.posterior.name == "point" and config.posterior.estimator != "reparam":
        raise ConfigError(
            "posterior.estimator", config.posterior.estimator, "'reparam' for a point posterior"
        )
    check_positive("eval.num_samples", config.eval.num_samples, integer=True)
    check_positive("eval.every_epochs", config.eval.every_epochs, integer=True)
    check_positive("eval.batch_size", config.eval.batch_size, integer=True)
    check_positive("eval.sample_batch", config.eval.get("sample_batch", 1), integer=True)
    check_positive("checkpoint_every_epochs", config.checkpoint_every_epochs, integer=True)
    check_positive("max_checkpoints", config.max_checkpoints, integer=True)
    check_positive("objective.num_samples", config.objective.num_samples, integer=True)
    devices = jax.devices() if devices is None else list(devices)
    mesh_config = config.get("mesh") or ml_collections.ConfigDict({"data": -1, "samples": 1})
    shape = parallel.mesh_shape(
        mesh_config,
        len(devices),
        batch_size=config.batch_size,
        num_samples=config.objective.num_samples,
        every_device=jax.process_count() > 1,
    )
    used = math.prod(shape)
    if used < len(devices):
        logging.warning(
            "mesh: %d × %d uses %d of the %d devices (mesh.data=%s, mesh.samples=%s with "
            "batch_size=%d, objective.num_samples=%d); a batch size that the device count "
            "divides would use them all.",
            *shape,
            used,
            len(devices),
            mesh_config.data,
            mesh_config.samples,
            config.batch_size,
            config.objective.num_samples,
        )
    mesh = parallel.make_mesh(shape, devices[:used])
    steps_per_epoch = num_train // config.batch_size
    model = make_model(config.model)
    free_energy = objective_lib.FreeEnergy(
        model=model,
        prior=make_prior(config.prior),
        likelihood=objective_lib.make_likelihood(config.likelihood),
        num_train=num_train,
        num_batches=steps_per_epoch,
        num_samples=config.objective.num_samples,
        estimator=config.posterior.estimator,
        kl=config.objective.kl,
        temperature=config.objective.kl_temperature,
        mesh=mesh,
    )
    check_choice("objective.kl_schedule", config.objective.kl_schedule, objective_lib.KL_SCHEDULES)
    check_non_negative("objective.kl_warmup_steps", config.objective.kl_warmup_steps, integer=True)
    optimizer = make_optimizer(config.optim, steps_per_epoch, config.num_epochs)
    options = compiler_options(
        config.get("cpu_vector_bits", 0),
        devices[0].platform,
        draws_noise=config.posterior.name == "mean_field",
    )
    experiment = Experiment(
        config,
        model,
        free_energy,
        optimizer,
        num_train,
        steps_per_epoch,
        tuple(input_shape),
        mesh,
        tuple(options.items()),
    )
    if trace:
        trace_step(experiment)
    return experiment


def trace_step(experiment: Experiment) -> None:
    """Traces one training step abstractly (no compute).

    An estimator/layer mismatch or a shape error surfaces here, as a ConfigError, before
    anything is computed or written.

    Raises:
      ConfigError: the estimator does not support a layer, or the model cannot take the
        data's examples (say, `lenet` on the 1-D regression inputs).
    """
    try:
        jax.eval_shape(lambda: _abstract_step(experiment))
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            "model.name",
            experiment.config.model.name,
            f"a model that takes this data's examples of shape {experiment.input_shape} (one "
            f"abstract training step failed with {type(e).__name__}: {reason})",
        ) from e


def _abstract_step(experiment: Experiment):
    state = init_state(experiment, jax.random.key(0))
    batch = (
        jnp.zeros((experiment.config.batch_size, *experiment.input_shape), jnp.float32),
        jnp.zeros((experiment.config.batch_size,), jnp.int32),
    )
    return train_step(experiment, state, batch, jax.random.key(0))


def root_keys(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """The root key split once into init / shuffle / train / eval keys (big_vision style)."""
    root = jax.random.key(config.seed, impl=config.prng_impl)
    names = ("init", "shuffle", "train", "eval")
    return dict(zip(names, jax.random.split(root, len(names)), strict=True))


def init_state(experiment: Experiment, key: jax.Array) -> TrainState:
    """The initial posterior around the model's own initialisation, and the optimiser state.

    Args:
      experiment: from `build`.
      key: the init key.

    Returns:
      The initial `TrainState`.
    """
    config = experiment.config
    key_model, key_rho = jax.random.split(key)
    dummy = jnp.zeros((1, *experiment.input_shape), jnp.float32)
    params = experiment.model.init(key_model, dummy)["params"]
    if config.posterior.name == "point":
        posterior = posterior_lib.PointEstimate(mu=params)
    else:
        rho0, spread = config.posterior.init_rho, config.posterior.init_rho_spread
        init = (rho0 - spread / 2, rho0 + spread / 2) if spread else float(rho0)
        posterior = posterior_lib.init_posterior(
            key_rho, params, init, mu_scale=config.posterior.mu_scale, noise=config.posterior.noise
        )
    trained = experiment.free_energy.init_params(posterior)
    return TrainState(
        step=jnp.int32(0), params=trained, opt_state=experiment.optimizer.init(trained)
    )


# The step, the epoch, evaluation ----------------------------------------------------------


def global_norm(tree: Any) -> jax.Array:
    """√(Σ x²) over every leaf of `tree`: `optax.tree.norm`, computed as matrix-vector products.

    Each leaf, as a matrix [rows, rest], contributes Σᵢ (x² · 1)ᵢ. XLA:CPU rewrites a plain
    sum over a large array into a windowed reduction that runs at a few GB/s (3.8 ms of the
    24 ms deterministic step at H = 1200); its matrix-vector kernel streams at memory speed.

    Args:
      tree: a pytree of float arrays.

    Returns:
      A float32 scalar.
    """
    total = jnp.float32(0.0)
    for leaf in jax.tree_util.tree_leaves(tree):
        matrix = leaf.reshape(leaf.shape[0] if leaf.ndim > 1 else 1, -1)
        squares = jnp.square(matrix.astype(jnp.float32))
        # HIGHEST: TPUs (and GPUs with TF32) would otherwise round the squares to fewer bits.
        ones = jnp.ones((matrix.shape[1],), jnp.float32)
        total = total + jnp.sum(jnp.matmul(squares, ones, precision=jax.lax.Precision.HIGHEST))
    return jnp.sqrt(total)


def _after(tree: PyTree, values: PyTree) -> PyTree:
    """`tree`, bit for bit, but computed only once every leaf of `values` is.

    The new parameters are written into the buffers of the old ones (the state is donated, or
    carried by the epoch's scan). XLA:CPU then copies every parameter that a computation which
    the update does not wait for still reads (the loss's KL term, a layer's input gradient,
    which only the layers below need), so that the update cannot overwrite it first: a copy of
    μ per step. Multiplying the old parameters, as the update reads them, by a factor that
    depends on the gradient norm (which reads every gradient) and on every metric orders all
    those readers before the update, and the copies go (`tests/test_train.py`). The factor is
    exactly 1 whatever the values (a non-finite one is replaced by 0 first), and XLA cannot
    fold it away. (A subnormal leaf flushes to 0, as in any arithmetic on XLA:CPU, the update's
    own addition included.) In-process A/B of the step, interleaved, on a loaded machine:
    0.97–1.01× at H = 1200 and 0.97–1.03× at H = 400, within the rounds' noise.
    """
    total = sum(jnp.sum(v).astype(jnp.float32) for v in jax.tree_util.tree_leaves(values))
    one = 1.0 + 0.0 * jnp.where(jnp.isfinite(total), total, 0.0)
    return jax.tree_util.tree_map(lambda x: x * one.astype(x.dtype), tree)


def has_gradient_chain(experiment: Experiment, params: PyTree) -> bool:
    """Whether the free energy puts elementwise work between the backward pass and the
    gradients, so that `train_step` stores them once (`bbb.posterior.materialize`).

    Every posterior with scales has it (σ's softplus, the KL's terms), and so has any prior
    but the flat one (its log-density's gradient). A point estimate under the flat prior (the
    deterministic baselines, and the benchmark's floor) has none: its gradients are the
    backward pass's own products, and storing them again only copied every one of them (the
    plain MLP's temporaries at H = 1200 10.1 → 8.2 MB; docs/performance.md, "The gradient
    fix").

    Args:
      experiment: from `build`.
      params: the trained pytree, {"posterior": ..., "prior": ..., "likelihood": ...}.

    Returns:
      False for a point estimate under the flat prior, True otherwise.
    """
    point = isinstance(params["posterior"], posterior_lib.PointEstimate)
    return not (point and isinstance(experiment.free_energy.prior, Flat))


def train_step(
    experiment: Experiment, state: TrainState, batch: tuple[jax.Array, jax.Array], key: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One gradient step on the minibatch free energy.

    Args:
      experiment: from `build`.
      state: the current state.
      batch: (x [B, ...], y [B]).
      key: the train key; this step's noise is fold_in(key, step).

    Returns:
      (new state, metrics): the objective's metrics but `sigma_mean` (an epoch's metric,
      `train_epoch`), plus `grad_norm`.
    """
    objective = experiment.config.objective
    kl_weight = objective_lib.kl_weight(
        objective.kl_schedule, state.step, experiment.steps_per_epoch, objective.kl_warmup_steps
    )
    step_key = jax.random.fold_in(key, state.step)
    grad_fn = jax.value_and_grad(experiment.free_energy, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, batch, step_key, kl_weight)
    # σ's mean is logged once per epoch (`with_sigma_mean`): in every step it was one more pass
    # over every σ, 3% of the `local_reparam` step at H = 400 (docs/performance.md). Unused, its
    # computation is dropped from the compiled step.
    del metrics["sigma_mean"]
    # Stored once: XLA:CPU would otherwise fuse each gradient's elementwise chain (softplus',
    # the KL's terms) into every reader (Adam's two moments, the norm) and recompute it there;
    # 14-21% of the reparam step at H = 1200 (docs/performance.md).
    if has_gradient_chain(experiment, state.params):
        grads = jax.tree_util.tree_map(posterior_lib.materialize, grads)
    metrics["grad_norm"] = global_norm(grads)
    updates, opt_state = experiment.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(_after(state.params, metrics), updates)
    state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return parallel.constrain(state, experiment.mesh), metrics  # replicated on a mesh


def train_epoch(
    experiment: Experiment,
    state: TrainState,
    data: tuple[jax.Array, jax.Array],
    epoch: jax.Array,
    keys: dict[str, jax.Array],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One pass over the shuffled training set, as a `lax.scan` over M steps.

    Args:
      experiment: from `build`.
      state: the state at the start of the epoch.
      data: (x [N, ...] or flat [N, D] as `examples_on_device` places them, y [N]) in device
        memory.
      epoch: the epoch number (the permutation is drawn from fold_in(shuffle key, epoch)).
      keys: from `root_keys`.

    Returns:
      (state, metrics), each metric stacked over the epoch's steps [M] (`sigma_mean`: the
      value at the end of the epoch, M times).
    """
    x, y = data
    order = epoch_order(experiment, x.shape[0], epoch, keys)

    def step(state, indices):
        batch = (as_examples(experiment, x[indices]), y[indices])
        return train_step(experiment, state, batch, keys["train"])

    state, metrics = jax.lax.scan(step, state, order)
    return state, with_sigma_mean(metrics, state.params)


def with_sigma_mean(metrics: dict[str, jax.Array], params: PyTree) -> dict[str, jax.Array]:
    """The epoch's stacked step metrics [M] and `sigma_mean`: the posterior's mean σ at the
    epoch's end, repeated M times (so that every metric has the steps' shape)."""
    loss = metrics["loss"]
    sigma = objective_lib.sigma_mean(params["posterior"]).astype(loss.dtype)
    return {**metrics, "sigma_mean": jnp.broadcast_to(sigma, loss.shape)}


def examples_on_device(
    splits: dict[str, tuple[np.ndarray, np.ndarray]], mesh: Any
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The splits in device memory (a whole copy on every device of `mesh`), each example
    flattened: x [N, D], y [N].

    TPUs tile an array's last two dimensions by (8, 128): MNIST's [N, 28, 28, 1] would take 146
    times its size there (the trailing (28, 1) padded to (32, 128)), 23 GB for the training set;
    [N, 784] takes 1.14 times. `as_examples` gives each gathered batch its shape back.
    """
    flat = {name: (x.reshape(x.shape[0], -1), y) for name, (x, y) in splits.items()}
    return parallel.replicate(flat, mesh)


def as_examples(experiment: Experiment, x: jax.Array) -> jax.Array:
    """A batch [B, ...] (or flat [B, D]) in the model's input shape [B, *input_shape]."""
    return x.reshape(x.shape[0], *experiment.input_shape)


def epoch_order(
    experiment: Experiment, num_examples: int, epoch: jax.Array, keys: dict[str, jax.Array]
) -> jax.Array:
    """The epoch's minibatches [M, B]: a permutation drawn from fold_in(shuffle key, epoch)."""
    batch_size, steps = experiment.config.batch_size, experiment.steps_per_epoch
    order = jax.random.permutation(jax.random.fold_in(keys["shuffle"], epoch), num_examples)
    order = order[: steps * batch_size].reshape(steps, batch_size)  # [M, B]
    return parallel.constrain(order, experiment.mesh, None, "data")


class StepwiseEpoch:
    """`train_epoch` as M calls of one jitted step instead of one `lax.scan`
    (`config.epoch_loop = "steps"`).

    XLA's CPU backend computes the kernel gradient of a convolution far slower inside a while
    loop, which is what `lax.scan` lowers to, than at the top level of a program
    (jax-ml/jax#12868; configs/mnist_cnn.py trains in less than half the time without the
    scan on this project's 2-core CPU, README). This runs the same steps, with the same
    permutation, batches and keys, as top-level programs: the permutation, the batch gathers
    and the update stay on the device, and the host dispatches the M calls asynchronously and
    stacks their metrics in one more call. Each of the three programs compiles once.
    """

    def __init__(self, experiment: Experiment):
        shardings = jit_shardings(experiment)
        self.steps_per_epoch = experiment.steps_per_epoch

        def step(state, data, order, index, keys):
            indices = order[index]  # [B], sharded over "data" like the scan's
            batch = (as_examples(experiment, data[0][indices]), data[1][indices])
            return train_step(experiment, state, batch, keys["train"])

        self._order = jax.jit(
            lambda data, epoch, keys: epoch_order(experiment, data[0].shape[0], epoch, keys),
            **shardings,
        )
        self._step = jax.jit(step, donate_argnums=0, **jit_options(experiment))
        self._stack = jax.jit(
            lambda metrics, params: with_sigma_mean(
                jax.tree_util.tree_map(lambda *m: jnp.stack(m), *metrics), params
            ),
            **shardings,
        )

    def __call__(
        self,
        state: TrainState,
        data: tuple[jax.Array, jax.Array],
        epoch: jax.Array,
        keys: dict[str, jax.Array],
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """As the jitted `train_epoch`: (state, metrics stacked over the epoch's steps [M])."""
        order = self._order(data, epoch, keys)
        metrics = []
        for index in range(self.steps_per_epoch):
            state, step_metrics = self._step(state, data, order, np.int32(index), keys)
            metrics.append(step_metrics)
        return state, self._stack(metrics, state.params)

    def _cache_size(self) -> int:
        """Compiled versions of the step (1 after any number of epochs of one shape)."""
        return self._step._cache_size()


def evaluate(
    experiment: Experiment,
    params: PyTree,
    data: tuple[jax.Array, jax.Array],
    key: jax.Array,
    *,
    mc_dropout: bool = False,
) -> dict[str, jax.Array]:
    """Error and NLL of the MC-averaged predictive, and error of the posterior-mean weights.

    Args:
      experiment: from `build`.
      params: the trained pytree.
      data: (x [N, ...] or flat [N, D], y [N]).
      key: the key for the posterior samples.
      mc_dropout: keep dropout on in the K samples (MC dropout). Training validates dropout
        runs with dropout off, as the paper's dropout baseline; `scripts/evaluate.py` with it on.

    Returns:
      {"error", "error_mean_weights", "nll"} as scalars.
    """
    x, y = data
    config = experiment.config
    classification = experiment.free_energy.likelihood.is_classification
    prediction = predict_lib.predict_in_batches(
        experiment.model,
        params["posterior"],
        x,
        key,
        config.eval.num_samples,
        batch_size=config.eval.batch_size,
        input_shape=experiment.input_shape,
        sample_batch=config.eval.get("sample_batch"),
        classification=classification,
        estimator="reparam",
        mc_dropout=mc_dropout,
    )
    if classification:
        probs = prediction.predictive  # [N, C]
        picked = jnp.take_along_axis(probs, y[:, None], axis=-1)[:, 0]
        return {
            "error": jnp.mean(jnp.argmax(probs, -1) != y),
            "error_mean_weights": jnp.mean(jnp.argmax(prediction.mean_weights, -1) != y),
            "nll": -jnp.mean(jnp.log(jnp.maximum(picked, jnp.finfo(jnp.float32).tiny))),
        }
    likelihood = experiment.free_energy.likelihood
    log_lik = jax.vmap(lambda out: likelihood.log_prob(params["likelihood"], out, y))(
        prediction.samples
    )  # [K, N]
    log_pred = jax.nn.logsumexp(log_lik, axis=0) - math.log(config.eval.num_samples)
    return {
        "rmse": jnp.sqrt(
            jnp.mean(jnp.square(prediction.predictive - y.reshape(prediction.predictive.shape)))
        ),
        "nll": -jnp.mean(log_pred),
    }


# Data -------------------------------------------------------------------------------------


# (N of the training + validation pool, example shape). [regression] toy_regression: 1500 points
# x ~ U[0, 0.5] (bbb/data/regression.py); data.num_train of them train, the rest validate.
DATASETS = {"mnist": (60000, (28, 28, 1)), "toy_regression": (1500, (1,))}
# (the likelihood its labels take, model.num_outputs): ten classes, or one real target.
DATASET_TARGETS = {"mnist": ("categorical", 10), "toy_regression": ("gaussian", 1)}


def dataset_spec(config: ml_collections.ConfigDict) -> tuple[int, tuple[int, ...]]:
    """(N, example shape) of the training split that `config.data` asks for, without loading.

    Args:
      config: the experiment config.

    Returns:
      (num_train, input_shape).
    """
    data = config.data
    check_choice("data.name", data.name, DATASETS)
    check_non_negative("data.train_subset", data.train_subset, integer=True)
    check_non_negative("data.eval_subset", data.eval_subset, integer=True)
    total, shape = DATASETS[data.name]
    if isinstance(data.num_train, bool) or not (
        isinstance(data.num_train, int) and 0 < data.num_train < total
    ):
        raise ConfigError("data.num_train", data.num_train, f"an integer in [1, {total - 1}]")
    check_positive("data.pixel_scale", data.pixel_scale)
    likelihood, outputs = DATASET_TARGETS[data.name]
    if config.likelihood.name != likelihood:
        raise ConfigError(
            "likelihood.name", config.likelihood.name, f"{likelihood!r} for data.name={data.name!r}"
        )
    if config.model.num_outputs != outputs:
        raise ConfigError(
            "model.num_outputs", config.model.num_outputs, f"{outputs} for data.name={data.name!r}"
        )
    num_train = min(data.train_subset, data.num_train) if data.train_subset else data.num_train
    return num_train, shape


def load_data(config: ml_collections.ConfigDict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The train / validation / test splits that `config.data` names, as host arrays.

    Args:
      config: the experiment config.

    Returns:
      {"train", "validation", "test"} → (x, y).
    """
    data_config = config.data
    dataset_spec(config)
    if data_config.name == "toy_regression":  # [regression] Blundell et al. (2015), §5.2.
        from bbb.data import regression

        total = DATASETS["toy_regression"][0]
        num_validation = total - data_config.num_train
        splits = regression.load_toy_regression(
            data_config.num_train, num_validation, 500, seed=data_config.get("seed", 0)
        )
    else:
        from bbb.data import mnist  # Lazy: TensorFlow is imported only for data loading.

        splits = mnist.load_mnist(
            data_dir=data_config.data_dir or None,
            manual_dir=data_config.manual_dir or None,
            cache_dir=data_config.cache_dir or None,
            pixel_scale=data_config.pixel_scale,
            num_train=data_config.num_train,
        )
    limits = {
        "train": data_config.train_subset,
        "validation": data_config.eval_subset,
        "test": data_config.eval_subset,
    }
    return {
        name: tuple(a[: limits[name] or None] for a in arrays) for name, arrays in splits.items()
    }


# The loop ---------------------------------------------------------------------------------


def cpu_has_avx512(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this host's CPU executes AVX-512 (the `avx512f` flag; False where unknown)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def compiler_options(
    bits: int, platform: str, draws_noise: bool, avx512: bool | None = None
) -> dict[str, Any]:
    """XLA's compile options for `config.cpu_vector_bits` on `platform`.

    XLA:CPU vectorises elementwise loops for 256-bit registers by default, also on a CPU with
    512-bit ones. The weight and per-example noise is such a loop, bound by its arithmetic: on
    the Intel Xeon of the README's runs the hash noise alone ran 1.2–1.3× faster with 512-bit
    vectors, and the paper's step at H = 400 7–15% faster in three runs of the ablation, while
    the plain MLP, which draws no noise, did not gain (docs/performance.md, "512-bit
    vectors"). `bits` = 0 therefore takes 512 for a program that draws noise (a mean-field
    posterior) on a CPU with AVX-512 (`cpu_has_avx512`), and XLA's default otherwise;
    accelerators take no CPU option.

    Args:
      bits: `config.cpu_vector_bits`, one of `CPU_VECTOR_BITS`.
      platform: the devices' platform ("cpu", "gpu", "tpu", ...).
      draws_noise: whether the training step draws posterior noise.
      avx512: whether the CPU has AVX-512; None reads it from the host.

    Returns:
      The options for `jax.jit(..., compiler_options=...)`, {} for XLA's defaults.
    """
    if platform != "cpu":
        return {}
    if bits == 0 and draws_noise:
        bits = 512 if (cpu_has_avx512() if avx512 is None else avx512) else 0
    return {VECTOR_WIDTH_OPTION: bits} if bits else {}


def compile_kwargs(experiment: Experiment) -> dict[str, Any]:
    """`jax.jit`'s `compiler_options` keyword for the experiment (`compiler_options`), or {}."""
    if not experiment.compiler_options:
        return {}
    return {"compiler_options": dict(experiment.compiler_options)}


def jit_options(experiment: Experiment) -> dict[str, Any]:
    """The keyword arguments of `jax.jit` for the experiment's training and evaluation
    programs: its shardings (`jit_shardings`) and compile options (`compile_kwargs`)."""
    return {**jit_shardings(experiment), **compile_kwargs(experiment)}


def jit_shardings(experiment: Experiment) -> dict[str, Any]:
    """The keyword arguments of `jax.jit` for the experiment's mesh.

    Every input and output is replicated (the minibatch and the MC samples are sharded inside
    the step); on one device there are none, and the program is that of plain `jax.jit`.

    Args:
      experiment: from `build`.

    Returns:
      {"in_shardings", "out_shardings"}, or {} on one device.
    """
    if not parallel.is_sharded(experiment.mesh):
        return {}
    replicated = parallel.replicated(experiment.mesh)
    return {"in_shardings": replicated, "out_shardings": replicated}


def compile_epoch(experiment: Experiment) -> Callable:
    """`train_epoch` jitted once, with the state's buffers donated (and replicated on a mesh).

    With `config.epoch_loop = "steps"`, a `StepwiseEpoch` with the same signature instead.
    """
    if experiment.config.get("epoch_loop", "scan") == "steps":
        return StepwiseEpoch(experiment)
    return jax.jit(
        lambda s, d, e, k: train_epoch(experiment, s, d, e, k),
        donate_argnums=0,
        **jit_options(experiment),
    )


def compile_evaluate(experiment: Experiment) -> Callable:
    """`evaluate` jitted once (validation and test share the compiled program)."""
    return jax.jit(lambda p, d, k: evaluate(experiment, p, d, k), **jit_options(experiment))


def check_finite(metrics: dict[str, np.ndarray], first_step: int) -> None:
    """Raises TrainingDivergedError naming the first step that has a NaN or Inf metric.

    An overflow usually shows first in the gradient norm and a step later in the loss, so the
    earliest step is found across all metrics (alphabetical order breaks ties).
    """
    first = None  # (index, name, value)
    for name, values in sorted(metrics.items()):
        values = np.asarray(values)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size and (first is None or bad[0] < first[0]):
            first = (int(bad[0]), name, values[bad[0]])
    if first is not None:
        index, name, value = first
        raise TrainingDivergedError(
            f"training diverged: metric train/{name} is {value} at step {first_step + index + 1}. "
            "This workdir keeps its last good checkpoint, if it has one; start again in a new "
            "--workdir with a lower optim.learning_rate, or check the data."
        )


class PreemptionWatcher:
    """Notes SIGTERM (how schedulers pre-empt a job) so that the loop can checkpoint and stop
    at the end of the current epoch, instead of dying with the epoch's work lost.

    Installed only in the main thread (signal handlers cannot be set elsewhere).

    Attributes:
      requested: the name of the signal received, or "" while none was.
    """

    def __init__(self):
        self.requested = ""
        self._previous = None

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        del frame
        self.requested = signal.Signals(signum).name


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after_epochs: int | None = None
) -> dict[str, Any]:
    """Trains Bayes by Backprop as `config` says, logging and checkpointing into `workdir`.

    Starting on a workdir that holds checkpoints resumes from the latest one.

    Args:
      config: the experiment config (see configs/mnist.py).
      workdir: the output folder.
      stop_after_epochs: stop (with a checkpoint) after this many epochs of this session, as a
        pre-empted job would; the next start resumes. None trains to `config.num_epochs`.

    Returns:
      The summary written to `workdir/summary.json` (None if stopped early).
    """
    from bbb import workdir as workdir_lib  # Writers, plots and checkpoints.

    experiment = build(config, *dataset_spec(config))  # Every config error surfaces here.
    workdir_lib.check_workdir(workdir, config)
    splits = load_data(config)
    x_train = splits["train"][0]
    if (x_train.shape[0], x_train.shape[1:]) != (experiment.num_train, experiment.input_shape):
        raise ConfigError("data", config.data.name, "data matching its declared size and shape")
    run = workdir_lib.Run(workdir, config)  # Creates the workdir; config errors come first.

    shardings = jit_shardings(experiment)
    keys = root_keys(config)
    if shardings:  # Global arrays, replicated on every device of every process.
        keys = jax.jit(lambda: root_keys(config), out_shardings=shardings["out_shardings"])()
    state = jax.jit(lambda key: init_state(experiment, key), **shardings)(keys["init"])
    state, history = run.restore(state)
    start_epoch = int(state.step) // experiment.steps_per_epoch
    if start_epoch >= config.num_epochs and (summary := run.saved_summary()) is not None:
        run.close()  # Finished before: nothing to train, and its summary (wall time) stays.
        return summary

    device_data = examples_on_device(splits, experiment.mesh)  # every device, every process
    epoch_fn = compile_epoch(experiment)
    eval_fn = compile_evaluate(experiment)
    progress = workdir_lib.Progress(config.num_epochs, start_epoch, enabled=config.progress)
    started = time.perf_counter()
    steps_done = 0
    with PreemptionWatcher() as preemption:
        for epoch in range(start_epoch, config.num_epochs):
            first_step = int(state.step)
            state, metrics = epoch_fn(state, device_data["train"], np.int32(epoch), keys)
            metrics = jax.device_get(metrics)
            steps_done += experiment.steps_per_epoch
            check_finite(metrics, first_step)
            record = {"step": first_step + experiment.steps_per_epoch, "epoch": epoch + 1}
            # Each metric's mean over the epoch's steps: for `train/kl_weight`, 1/M under the
            # uniform and Blundell schedules alike (their π_i sum to 1), rising under "anneal".
            record.update({f"train/{k}": float(np.mean(v)) for k, v in metrics.items()})
            last = epoch + 1 == config.num_epochs
            if (epoch + 1) % config.eval.every_epochs == 0 or last:
                eval_key = jax.random.fold_in(keys["eval"], epoch)
                for split in ("validation", "test"):
                    result = jax.device_get(eval_fn(state.params, device_data[split], eval_key))
                    prefix = "eval/val_" if split == "validation" else "eval/test_"
                    record.update({prefix + k: float(v) for k, v in result.items()})
                history.update_best(record)
            run.write_metrics(record, state)
            progress.update(record)
            preempted = parallel.any_process(bool(preemption.requested))  # all hosts agree
            interrupted = preempted or (
                stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs
            )
            if (epoch + 1) % config.checkpoint_every_epochs == 0 or last or interrupted:
                run.save(state, history)
            if interrupted and not last:
                progress.close()
                run.close()
                if preempted and parallel.is_main_process():
                    print(
                        f"Pre-empted ({preemption.requested or 'another host'}) after epoch "
                        f"{epoch + 1}: checkpoint "
                        f"saved in {run.checkpoint_dir}. Run the same command to resume."
                    )
                return None
    progress.close()
    wall_time = time.perf_counter() - started
    summary = run.finish(state, history, wall_time=wall_time, steps_done=steps_done)
    return summary


def load_run(workdir: str, step: int | None = None) -> tuple[Experiment, TrainState]:
    """Restores a finished or running run: its experiment (from config.json) and a checkpoint.

    Reads only; writes nothing into `workdir`.

    Args:
      workdir: a run's workdir.
      step: the checkpoint step; None takes the latest.

    Returns:
      (experiment, state).

    Raises:
      WorkdirError: no config.json or no checkpoint, or the checkpoint cannot be read.
    """
    import orbax.checkpoint as ocp

    from bbb.workdir import WorkdirError, restore_checkpoint

    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise WorkdirError(f"{workdir} holds no run: {config_path} is missing.")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    for field in ("hidden_sizes", "features"):
        config.model[field] = tuple(config.model[field])
    # Reading needs no mesh: the run's own may not fit the devices at hand.
    config.mesh = ml_collections.ConfigDict({"data": 1, "samples": 1})
    experiment = build(config, *dataset_spec(config), devices=jax.local_devices()[:1])
    # On this process's first device: without a sharding Orbax would restore onto the saved
    # one, whose devices (8 GPUs, a TPU slice, other hosts) may not exist here.
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
        jax.eval_shape(lambda: init_state(experiment, root_keys(config)["init"])),
    )
    checkpoint_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(checkpoint_dir):
        raise WorkdirError(f"{workdir} holds no checkpoint: {checkpoint_dir} is missing.")
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    with ocp.CheckpointManager(checkpoint_dir, options=options) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise WorkdirError(f"{workdir} holds no checkpoint in {checkpoint_dir}.")
        state, _ = restore_checkpoint(manager, step, abstract)
    return experiment, state
