"""Speed of a training step: the benchmark grid, the epoch loop, an ablation, and a peer.

`scripts/benchmark.py` is the entry point; everything it does lives here, importable and
testable. What is measured, for the MLP 784-H-H-10 on MNIST-shaped inputs, batch 128, Adam:

- The step: the real `bbb.train.train_step` of an `Experiment` built from the MNIST config,
  jitted with its state donated, called on one fixed random batch. Compilation (`lower` +
  `compile`) is timed on its own. All cases of one H are compiled first; then `warmup`
  rounds, then `repeats` rounds, each running every case's step in turn (interleaved, so that
  the machine's drift does not enter the ratios): one untimed call that refills the caches the
  other cases evicted, then `calls_per_round` calls back to back, each timed alone with
  `jax.block_until_ready`, as training runs its steps and as the peer's steps are timed. The
  median is reported (min, 25% and 75% quantiles too), and the median of the rounds' first,
  cold calls beside it (`ms_per_step_first_call`; with `calls_per_round = 0` only those are
  timed, as the benchmark did before).
- The grid (`benchmark_grid`): every H, every K, every estimator; the paper's scale-mixture
  prior with the Monte-Carlo KL and the Gaussian prior with the closed-form KL (what
  bayesian-torch computes); each with threefry ("jax") noise and with the counter hash
  ("hash"), which `posterior.noise` makes the source of all of an estimator's noise (the weight
  sample, the MC KL's, local reparam's per-example noise, flipout's ΔW and signs), so that
  estimators are compared like with like.
  And, per H, the floor: the project's plain MLP (`posterior.name="point"`, flat prior) of the
  same shape and optimiser. Each step's time is also given as a ratio to the floor of the same
  H measured in the same run: on a noisy machine absolute times drift by ±30%, ratios less.
- The epoch: `bbb.train.compile_epoch`, the real training loop (a `lax.scan` over the steps of
  an epoch, with the permutation and the batch gathers on the device), on 50,000 random
  examples in device memory (390 steps of 128), one epoch per case in each of `epoch_repeats`
  rounds spread evenly over the timed rounds (`epoch_rounds`), right after that case's steps
  of the round, and each epoch straight away followed by as many separate step calls, back
  to back and timed together. `host_overhead_pct` = epoch wall time / those calls' wall time
  − 1, the median over the epochs (each kept in `host_overhead_pct_runs`): what the loop adds
  to (or, negative, saves over) step calls, dispatch and gathers included, measured over the
  same stretch of time. (Until 2026-12-01 the epochs ran in the first rounds and were set
  against steps × the median step of all rounds, so the shared machine's drift between them
  went into the overhead: the floor's came out from −13% to +7% in six runs of one day.)
  Compilation of the epoch is timed on its own.
- The ablation (`run_ablation`, H ∈ {400, 1200}, reparam, scale mixture, MC KL, K = 1): the
  full step against the same step with one part taken out; the differences give the cost of
  the RNG, of the prior's log-density, of log q, of the optimiser and of the matmuls. The same
  for `local_reparam` with the Gaussian prior and the closed-form KL: its KL, its optimiser and
  its likelihood (`local_breakdown`). `ablation_lines` says what each line times,
  `ablation_breakdown` how the parts are derived.
- The peer (`run_peer`): bayesian-torch's `LinearReparameterization` MLP (Gaussian prior,
  closed-form KL, Adam, batch 128, 2 threads) and a plain torch MLP of the same shapes, in a
  subprocess of a separate Python environment, so that torch is never imported next to JAX.
  That environment is made with

      python3 -m venv .venv-peer
      .venv-peer/bin/pip install torch==2.13.0 bayesian-torch==0.5.0

  (where the torch CPU wheel is on disk, give its path instead of `torch==2.13.0`), and is
  passed as `--peer_python=.venv-peer/bin/python`.

JAX runs on every core XLA's CPU client sees; on the 2-core machines of REFERENCE.md that
matches the peer's 2 torch threads.
Timings are never asserted in tests; the numbers belong to the machine they were taken on,
which `machine_info` describes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bbb import hostmem
from bbb import posterior as posterior_lib
from bbb import train as train_lib
from bbb import workdir as workdir_lib
from bbb.errors import ConfigError, check_choice, check_non_negative, check_positive
from bbb.estimators import ESTIMATORS
from bbb.models import DTYPES

INPUT_SHAPE = (28, 28, 1)  # MNIST-shaped examples.
NUM_CLASSES = 10
EPOCH_EXAMPLES = 50_000  # The paper's training set: 390 steps of 128.
DETERMINISTIC = "deterministic"  # The `estimator` of the floor (a point posterior).
# The peer's malloc policies: glibc's default, or the one bbb's processes run under (hostmem).
HOST_MEMORY = ("kept", "default")
# The prior of each benchmarked pair (prior, KL): what the paper does, and what bayesian-torch
# does.
PRIOR_KL = {"scale_mixture": "mc", "gaussian": "closed_form"}
NOISES = posterior_lib.NOISE_GENERATORS


# The grid ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of the benchmark grid.

    Attributes:
      hidden: H, the width of both hidden layers.
      num_samples: K, Monte-Carlo samples per step (1 for the floor).
      estimator: one of `bbb.estimators.ESTIMATORS`, or "deterministic" for the floor.
      prior: "scale_mixture", "gaussian", or "flat" (the floor).
      kl: "mc", "closed_form", or "none" (the floor: no KL term).
      noise: "jax" (threefry), "hash", or "none" (the floor draws no noise).
      dtype: the hidden layers' compute dtype, `model.dtype` ("float32" or "bfloat16").
      cpu_vector_bits: `config.cpu_vector_bits` (0: the config's choice for this CPU).
    """

    hidden: int
    num_samples: int
    estimator: str
    prior: str
    kl: str
    noise: str
    dtype: str = "float32"
    cpu_vector_bits: int = 0

    @property
    def is_deterministic(self) -> bool:
        """Whether this is the floor (a plain MLP)."""
        return self.estimator == DETERMINISTIC

    def config(self, base_config: ml_collections.ConfigDict, batch_size: int = 128):
        """The experiment config of this case: `base_config` with the case's fields set.

        Args:
          base_config: the MNIST config (configs/mnist.py); not modified.
          batch_size: B.

        Returns:
          A new `ConfigDict`.
        """
        config = ml_collections.ConfigDict(base_config.to_dict())
        config.batch_size = batch_size
        config.model.name = "mlp"
        config.model.hidden_sizes = (self.hidden, self.hidden)
        config.model.dropout_rate = 0.0
        config.model.dtype = self.dtype
        config.optim.name = "adam"
        config.objective.num_samples = self.num_samples
        config.cpu_vector_bits = self.cpu_vector_bits
        if self.is_deterministic:
            config.posterior.name = "point"
            config.posterior.estimator = "reparam"
            config.prior.name = "flat"
            config.objective.kl = "mc"  # log q = 0 and log P = 0: no KL term at all.
        else:
            config.posterior.name = "mean_field"
            config.posterior.estimator = self.estimator
            config.posterior.noise = self.noise
            config.prior.name = self.prior
            config.objective.kl = self.kl
        return config

    def record(self, batch_size: int) -> dict[str, Any]:
        """The identifying fields of a result record."""
        return {
            "system": "bbb",
            "model": "mlp",
            "hidden": self.hidden,
            "num_samples": self.num_samples,
            "estimator": self.estimator,
            "prior": self.prior,
            "kl": self.kl,
            "noise": self.noise,
            "dtype": self.dtype,
            "optimizer": "adam",
            "batch_size": batch_size,
        }


def deterministic_case(hidden: int, dtype: str = "float32") -> Case:
    """The floor of width `hidden`: the plain MLP, same shape, optimiser and dtype."""
    return Case(hidden, 1, DETERMINISTIC, "flat", "none", "none", dtype)


def benchmark_grid(
    hidden: Sequence[int] = (400, 1200),
    num_samples: Sequence[int] = (1, 2, 8),
    estimators: Sequence[str] = ESTIMATORS,
    priors: Sequence[str] = tuple(PRIOR_KL),
    noises: Sequence[str] = NOISES,
    dtypes: Sequence[str] = ("float32",),
) -> list[Case]:
    """The configurations to time, the floors of each H first.

    For every H: the deterministic floor of each dtype; then for every K, estimator and prior
    (scale mixture with the MC KL, Gaussian with the closed-form KL), threefry noise; and the
    same with each other generator in `noises` (the source of all of an estimator's noise),
    each in every dtype. Estimators compare like with like.

    Args:
      hidden: the widths H.
      num_samples: the K.
      estimators: a subset of `ESTIMATORS`.
      priors: a subset of `PRIOR_KL`.
      noises: a subset of `NOISES`; "jax" is always timed.
      dtypes: a subset of `bbb.models.DTYPES` (the hidden layers' compute dtype).

    Returns:
      A list of `Case`.

    Raises:
      ConfigError: an unknown estimator, prior, noise or dtype, or a non-positive H or K.
    """
    for name, values, allowed in (
        ("estimators", estimators, ESTIMATORS),
        ("priors", priors, tuple(PRIOR_KL)),
        ("noises", noises, NOISES),
        ("dtypes", dtypes, tuple(DTYPES)),
    ):
        for value in values:
            if value not in allowed:
                raise ConfigError(name, value, f"a subset of {allowed}")
    for name, values in (("hidden", hidden), ("num_samples", num_samples)):
        if not values or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
            raise ConfigError(name, values, "positive integers")
    if not dtypes:  # Every case, the floors included, has a dtype: none is no grid.
        raise ConfigError("dtypes", dtypes, f"a non-empty subset of {tuple(DTYPES)}")
    cases = []
    for width in hidden:
        cases += [deterministic_case(width, dtype) for dtype in dtypes]
        for k in num_samples:
            for estimator in estimators:
                for prior in priors:
                    # The generator draws all of an estimator's noise (weights, activations,
                    # flipout's signs), so every estimator is timed with each.
                    generators = ["jax"] + [n for n in noises if n != "jax"]
                    for noise in generators:
                        cases += [
                            Case(width, k, estimator, prior, PRIOR_KL[prior], noise, dtype)
                            for dtype in dtypes
                        ]
    return cases


# Timing -----------------------------------------------------------------------------------


def _summary(
    times_ms: list[float], first_times_ms: list[float] | None = None, calls_per_round: int = 0
) -> dict[str, Any]:
    """The median and spread of `times_ms`; with `first_times_ms`, the median cold call too."""
    quartiles = np.percentile(times_ms, [25, 75])
    summary = {
        "ms_per_step": statistics.median(times_ms),
        "ms_per_step_min": min(times_ms),
        "ms_per_step_q25": float(quartiles[0]),
        "ms_per_step_q75": float(quartiles[1]),
        "repeats": len(first_times_ms) if first_times_ms is not None else len(times_ms),
    }
    if first_times_ms is not None:
        summary["calls_per_round"] = calls_per_round
        summary["timed_calls"] = len(times_ms)
        summary["ms_per_step_first_call"] = statistics.median(first_times_ms)
    return summary


def host_overhead_pct(epoch_s: float, calls_s: float) -> float:
    """An epoch's wall time over that of as many separate step calls, less 1, in per cent."""
    return 100.0 * (epoch_s / calls_s - 1.0)


def epoch_rounds(repeats: int, epoch_repeats: int) -> list[int]:
    """The timed rounds in which the grid runs its epochs: `epoch_repeats` of the `repeats`,
    spread evenly (the middle of each of `epoch_repeats` equal stretches), so that the epochs
    sample the run's conditions as the steps do rather than only its start."""
    return [(2 * j + 1) * repeats // (2 * epoch_repeats) for j in range(epoch_repeats)]


def random_batch(key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """A fixed random minibatch: x ~ U[0, 2) [B, 28, 28, 1] (pixels / 126), y [B] in 0..9.

    Args:
      key: a PRNG key.
      batch_size: B.

    Returns:
      (x, y) on the device.
    """
    key_x, key_y = jax.random.split(key)
    x = jax.random.uniform(key_x, (batch_size, *INPUT_SHAPE), jnp.float32, 0.0, 2.0)
    y = jax.random.randint(key_y, (batch_size,), 0, NUM_CLASSES, jnp.int32)
    return jax.block_until_ready((x, y))


def temp_bytes(compiled: Any) -> int | None:
    """The bytes of temporaries a compiled program allocates at every call, or None where the
    backend does not say (`memory_analysis`)."""
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError):
        return None
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def large_temporaries_note(records: list[dict[str, Any]], backend: str) -> str | None:
    """A line naming the CPU cases whose temporaries outgrow a thread's arena, or None.

    glibc's per-thread arenas hold at most `hostmem.HEAP_BYTES` (64 MiB) a heap; XLA:CPU
    allocates a program's temporaries on a thread of its own, so a larger block is mapped afresh
    at every call (docs/performance.md, "A worker thread's temporaries over 64 MiB").
    """
    if backend != "cpu":
        return None
    large = [
        f"{_name(r)} ({r['temp_bytes'] / 2**20:.1f} MiB)"
        for r in records
        if r.get("system", "bbb") == "bbb" and (r.get("temp_bytes") or 0) > hostmem.HEAP_BYTES
    ]
    if not large:
        return None
    return (
        f"Over {hostmem.HEAP_BYTES // 2**20} MiB of temporaries, which glibc maps afresh at every "
        "call from XLA's threads "
        "(page faults that an epoch's loop pays once; MALLOC_ARENA_MAX=1 in the environment "
        "avoids them at a cost to small steps; docs/performance.md): " + ", ".join(large) + "."
    )


def compile_step(
    experiment: train_lib.Experiment,
    state: train_lib.TrainState,
    batch: tuple[jax.Array, jax.Array],
    key: jax.Array,
) -> tuple[float, Callable[[], None], list[train_lib.TrainState], int | None]:
    """Compiles the jitted `train_step`, its state donated, timing the compilation.

    Args:
      experiment: from `bbb.train.build`.
      state: the initial state (donated: do not use it afterwards).
      batch: the fixed minibatch.
      key: the train key (the step folds in its own step number).

    Returns:
      (compile seconds, a function that runs one step and blocks, a one-element list holding
      the current state, the bytes of temporaries of a call or None: `temp_bytes`).
    """
    step = jax.jit(
        functools.partial(train_lib.train_step, experiment),
        donate_argnums=0,
        **train_lib.jit_options(experiment),
    )
    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    box = [state]

    def run_once():
        box[0], metrics = compiled(box[0], batch, key)
        jax.block_until_ready((box[0], metrics))

    return compile_s, run_once, box, temp_bytes(compiled)


def compile_epoch_timer(
    experiment: train_lib.Experiment,
    box: list[train_lib.TrainState],
    data: tuple[jax.Array, jax.Array],
    keys: dict[str, jax.Array],
) -> tuple[float, Callable[[int], float]]:
    """Compiles the real training loop (`compile_epoch`) for a case, timing the compilation.

    Args:
      experiment: from `bbb.train.build`, with `num_train` = the examples in `data`.
      box: the case's one-element list holding its current state (`compile_step`); an epoch
        takes the state from it and puts the new one back, as the steps do.
      data: (x [N, ...], y [N]) in device memory.
      keys: from `bbb.train.root_keys`.

    Returns:
      (compile seconds, a function that runs epoch e (a new permutation each) and returns its
      wall time in seconds).
    """
    epoch_fn = train_lib.compile_epoch(experiment)
    start = time.perf_counter()
    compiled = epoch_fn.lower(box[0], data, jnp.int32(0), keys).compile()
    compile_s = time.perf_counter() - start

    def run_epoch(epoch: int) -> float:
        start = time.perf_counter()
        box[0], metrics = compiled(box[0], data, jnp.int32(epoch), keys)
        jax.block_until_ready((box[0], metrics))
        return time.perf_counter() - start

    return compile_s, run_epoch


def random_dataset(key: jax.Array, num_examples: int) -> tuple[jax.Array, jax.Array]:
    """`num_examples` random MNIST-shaped examples and labels, in device memory."""
    return random_batch(key, num_examples)


@dataclasses.dataclass
class PreparedCase:
    """A grid case built and compiled, ready to be timed.

    Attributes:
      record: its identifying fields and `compile_s`.
      experiment: from `bbb.train.build`.
      keys: its root keys.
      run_once: runs one step and blocks.
      box: a one-element list holding the current state.
    """

    record: dict[str, Any]
    experiment: train_lib.Experiment
    keys: dict[str, jax.Array]
    run_once: Callable[[], None]
    box: list[Any]


def vector_width_record(experiment: train_lib.Experiment) -> dict[str, Any]:
    """The record's `vector_bits`: XLA:CPU's preferred vector width that the case was compiled
    with (`train.compiler_options`), or None for XLA's default."""
    return {"vector_bits": dict(experiment.compiler_options).get(train_lib.VECTOR_WIDTH_OPTION)}


def prepare_case(
    case: Case,
    base_config: ml_collections.ConfigDict,
    batch: tuple[jax.Array, jax.Array],
    epoch_examples: int,
) -> PreparedCase:
    """Builds one case's experiment and compiles its step.

    Args:
      case: the configuration.
      base_config: the MNIST config.
      batch: the fixed minibatch (its size is the batch size).
      epoch_examples: N, the examples of an epoch (sets the KL scaling and the step count).

    Returns:
      The prepared case.
    """
    batch_size = batch[0].shape[0]
    config = case.config(base_config, batch_size)
    experiment = train_lib.build(config, epoch_examples, INPUT_SHAPE)
    keys = train_lib.root_keys(config)
    state = jax.jit(lambda key: train_lib.init_state(experiment, key))(keys["init"])
    compile_s, run_once, box, temp = compile_step(experiment, state, batch, keys["train"])
    record = {
        "kind": "grid",
        **case.record(batch_size),
        **vector_width_record(experiment),
        "compile_s": compile_s,
        "temp_bytes": temp,
    }
    return PreparedCase(record, experiment, keys, run_once, box)


def add_ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sets each record's ms/step as ratios to the deterministic floors of the same H and dtype.

    `ratio_to_deterministic` divides by bbb's floor (the plain JAX MLP), the same reference for
    every system; `ratio_to_own_floor` by the floor of the record's own system (torch's plain
    MLP for bayesian-torch). Both are None where the floor was not timed in this run. Records
    without a dtype (the peer's) are float32. Each of bbb's records that does the peer's work
    (Gaussian prior, closed-form KL) also gets `peer_speedup`: for each of the peer's malloc
    policies timed ("default", "kept"), the peer's step at the same H and K over this one (how
    many times faster bbb is), the ratios the targets are stated in.

    Args:
      records: results of one run (bbb's and the peer's); changed in place.

    Returns:
      `records`.
    """
    floors = {
        (r["system"], r["hidden"], r.get("host_memory"), r.get("dtype", "float32")): r[
            "ms_per_step"
        ]
        for r in records
        if r["estimator"] == DETERMINISTIC and r.get("kind") != "ablation"
    }
    own = {"bbb": "bbb", "torch": "torch", "bayesian-torch": "torch"}
    for r in records:
        dtype = r.get("dtype", "float32")
        floor = floors.get(("bbb", r["hidden"], None, dtype))  # bbb's have no host_memory
        own_floor = floors.get((own.get(r["system"]), r["hidden"], r.get("host_memory"), dtype))
        r["ratio_to_deterministic"] = r["ms_per_step"] / floor if floor else None
        r["ratio_to_own_floor"] = r["ms_per_step"] / own_floor if own_floor else None
    peers = {
        (r["hidden"], r["num_samples"], r.get("host_memory")): r["ms_per_step"]
        for r in records
        if r["system"] == "bayesian-torch"
    }
    for r in records:
        same_work = (r.get("prior"), r.get("kl"), r.get("dtype", "float32")) == (
            "gaussian",
            "closed_form",
            "float32",  # The peer multiplies in float32.
        )
        if r["system"] == "bbb" and same_work and r.get("kind") != "ablation":
            r["peer_speedup"] = {
                memory: peers[(r["hidden"], r["num_samples"], memory)] / r["ms_per_step"]
                for memory in HOST_MEMORY
                if (r["hidden"], r["num_samples"], memory) in peers
            }
    return records


def check_peer(peer_python: str, peer_threads: int) -> None:
    """Raises ConfigError unless the peer's python exists and `peer_threads` is positive.

    `run_peer` alone skips a missing peer with a message; asked for by `run`, a missing one is
    an error before the hour of timing, not a note after it.
    """
    if not os.path.exists(peer_python):
        raise ConfigError(
            "--peer_python",
            peer_python,
            "the python of an environment with bayesian-torch (README, Performance)",
        )
    check_positive("--peer_threads", peer_threads, integer=True)


def check_timing(repeats: int, warmup: int, calls_per_round: int, epoch_repeats: int) -> None:
    """Raises ConfigError naming the first timing setting out of range."""
    check_positive("repeats", repeats, integer=True)
    check_non_negative("warmup", warmup, integer=True)
    check_non_negative("calls_per_round", calls_per_round, integer=True)
    check_non_negative("epoch_repeats", epoch_repeats, integer=True)
    if epoch_repeats > repeats:
        raise ConfigError(
            "epoch_repeats", epoch_repeats, f"at most repeats ({repeats}): one epoch per round"
        )


def run_grid(
    cases: Sequence[Case],
    base_config: ml_collections.ConfigDict,
    *,
    repeats: int = 20,
    warmup: int = 3,
    calls_per_round: int = 4,
    epoch_repeats: int = 1,
    epoch_examples: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Times every case on one fixed batch and one random dataset.

    The cases of one width H (every K) are all compiled first (steps and epochs);
    then their steps are timed in interleaved rounds (`time_interleaved`), each case's steps
    back to back within a round, and in `epoch_repeats` rounds spread over the run
    (`epoch_rounds`) every case also runs one whole epoch after its steps, followed by as many
    step calls, so that the ratios between cases, and each case's epoch against its steps
    (`host_overhead_pct`), are not the machine's drift.

    Args:
      cases: from `benchmark_grid`.
      base_config: the MNIST config (configs/mnist.py).
      repeats: timed rounds per case (the brief: at least 20 for a real run).
      warmup: untimed rounds after compilation.
      calls_per_round: timed steps of each case per round, after one untimed call
        (`time_interleaved`); 0 times single cold calls.
      epoch_repeats: timed epochs per case (at most `repeats`); 0 skips the epoch.
      epoch_examples: N of an epoch; None takes `EPOCH_EXAMPLES` (50,000).
      batch_size: B.
      seed: for the random batch and dataset.
      log: called with one line per finished case (progress), or None.
      progress: show a bar with ETA over the compilations and timed rounds (stderr).

    Returns:
      One record per case (kind "grid"), in order; `add_ratios` sets the ratios.
    """
    check_timing(repeats, warmup, calls_per_round, epoch_repeats)
    epoch_examples = EPOCH_EXAMPLES if epoch_examples is None else epoch_examples
    key_batch, key_data = jax.random.split(jax.random.key(seed))
    batch = random_batch(key_batch, batch_size)
    data = random_dataset(key_data, epoch_examples) if epoch_repeats > 0 else None
    # Interleaved within one width H, every K together, so that the ratios between sample
    # counts (K = 8 against K = 1) and to the floor are as free of drift as the rest. (Until
    # each round began with an untimed call, cases were grouped by H and K too: a K = 8 step
    # run just before would have left a K = 1 step cold caches.)
    groups: dict[int, list[int]] = {}
    for index, case in enumerate(cases):
        groups.setdefault(case.hidden, []).append(index)
    records: list[dict[str, Any]] = [{} for _ in cases]
    compiles_per_case = 1 if data is None else 2
    bar = _Progress(
        sum(compiles_per_case * len(g) + warmup + repeats for g in groups.values()), progress, log
    )
    done = 0
    for width, indices in groups.items():
        prepared = []
        for i in indices:
            bar.start(f"compiling {_name(cases[i].record(batch_size))}")
            prepared.append(prepare_case(cases[i], base_config, batch, epoch_examples))
            bar.done()
        epochs = []
        for p in prepared if data is not None else ():
            bar.start(f"compiling the epoch of {_name(p.record)}")
            epochs.append(compile_epoch_timer(p.experiment, p.box, data, p.keys))
            bar.done()
        # Per case, (epoch wall time, wall time of as many step calls right after it), in s.
        epoch_times: list[list[tuple[float, float]]] = [[] for _ in prepared]
        rounds = _round_names(width, warmup, repeats, bar)
        with_epoch = epoch_rounds(repeats, epoch_repeats) if epochs else []

        def run_epoch(
            round_index: int,
            index: int,
            epochs=epochs,
            epoch_times=epoch_times,
            with_epoch=with_epoch,
            prepared=prepared,
        ):
            if round_index in with_epoch:  # Epoch j has permutation j.
                epoch_s = epochs[index][1](with_epoch.index(round_index))
                start = time.perf_counter()
                for _ in range(prepared[index].experiment.steps_per_epoch):
                    prepared[index].run_once()
                epoch_times[index].append((epoch_s, time.perf_counter() - start))

        times, first_times = time_interleaved(
            [p.run_once for p in prepared],
            repeats,
            warmup,
            calls_per_round,
            run_epoch,
            after_round=rounds,
        )
        for i, (index, p) in enumerate(zip(indices, prepared, strict=True)):
            record = {**p.record, **_summary(times[i], first_times[i], calls_per_round)}
            record["examples_per_s"] = batch_size / (record["ms_per_step"] / 1e3)
            record.update(
                epoch_compile_s=None,
                epoch_s=None,
                epoch_steps=None,
                host_overhead_pct=None,
                host_overhead_pct_runs=None,
            )
            if epochs:
                overheads = [host_overhead_pct(e, s) for e, s in epoch_times[i]]
                record["epoch_compile_s"] = epochs[i][0]
                record["epoch_s"] = statistics.median(e for e, _ in epoch_times[i])
                record["epoch_steps"] = p.experiment.steps_per_epoch
                record["host_overhead_pct"] = statistics.median(overheads)
                record["host_overhead_pct_runs"] = overheads
            records[index] = record
            done += 1
            bar.log(f"[{done}/{len(cases)}] {_describe(record)}")
        del prepared, epochs  # Frees this group's states before the next.
    bar.close()
    return records


def _name(record: dict[str, Any]) -> str:
    """The case of a grid record, in words: "H=400 K=1 reparam gaussian/closed_form noise=hash"."""
    return (
        f"H={record['hidden']} K={record['num_samples']} {record['estimator']} "
        f"{record['prior']}/{record['kl']} noise={record['noise']}"
        f"{'' if record.get('dtype', 'float32') == 'float32' else ' ' + record['dtype']}"
    )


def _describe(record: dict[str, Any]) -> str:
    text = f"{_name(record)}: {record['ms_per_step']:.2f} ms/step"
    if record.get("compile_s") is not None:
        text += f", compile {record['compile_s']:.1f} s"
    if record.get("epoch_s") is not None:
        text += f", epoch {record['epoch_s']:.1f} s"
    return text


# The ablation -----------------------------------------------------------------------------


@flax.struct.dataclass
class NoiselessPosterior(posterior_lib.MeanFieldGaussian):
    """The mean-field posterior with ε = 0: the sampling arithmetic without any RNG."""

    def sample_noise(self, key: jax.Array) -> Any:
        """Zeros like `mu` (the key is unused)."""
        del key
        return jax.tree_util.tree_map(jnp.zeros_like, self.mu)


@flax.struct.dataclass
class NoLogQPosterior(posterior_lib.MeanFieldGaussian):
    """The mean-field posterior whose samples come with log q = 0: no entropy term."""

    def sample_and_log_prob(self, key: jax.Array) -> tuple[Any, jax.Array]:
        """(w = μ + σ ∘ ε, 0)."""
        eps = self.sample_noise(key)
        w = jax.tree_util.tree_map(lambda m, s, e: m + s * e, self.mu, self.stddev(), eps)
        return w, jnp.float32(0.0)


@flax.struct.dataclass
class FlatCounterPosterior(posterior_lib.MeanFieldGaussian):
    """The mean-field posterior whose hash ε takes its counters from one flat `iota`.

    The same numbers as `posterior.map_hash_bits`'s two rows of counters (to an ulp), in the
    loop that bbb compiled before 8cdddfa: the ablation's measure of that layout.
    """

    def sample_noise(self, key: jax.Array) -> Any:
        """Hash ε like `mu`, one draw for all leaves, counters 0, …, n − 1 as a flat iota."""
        n = posterior_lib.count_params(self.mu)
        seed = jax.random.bits(key, (2,), jnp.uint32)
        counter = jax.lax.iota(jnp.uint32, n)
        flat = posterior_lib.bits_to_normal(posterior_lib.hash_counter(counter, seed))
        return posterior_lib.unflatten_like(flat, self.mu)


@dataclasses.dataclass(frozen=True)
class AblationLine:
    """One line of the ablation: a configuration with a part removed, and what it times.

    Attributes:
      name: a short name ("full", "no_noise", ...).
      measures: what exactly the line times.
      case: the configuration built (the full step's prior is a scale mixture with MC KL).
      posterior_class: replaces `MeanFieldGaussian` in the state (same μ and ρ), or None.
      gradient_only: time `value_and_grad` of the free energy alone (no optimiser, no
        grad-norm metric) instead of the whole `train_step`.
      vmap_one_sample: evaluate the free energy's one sample under a vmap of one
        (`FreeEnergy.vmap_one_sample`).
      sigma_mean_in_step: compute σ's mean in every step, among the step's metrics
        (`sigma_mean_in_step`).
    """

    name: str
    measures: str
    case: Case
    posterior_class: type | None = None
    gradient_only: bool = False
    vmap_one_sample: bool = False
    sigma_mean_in_step: bool = False


def ablation_lines(hidden: int) -> list[AblationLine]:
    """The lines of the ablation at width `hidden` (K = 1, batch B, Adam).

    The paper's step (reparam, scale mixture, MC KL) and its parts (`ablation_breakdown`); the
    plain MLP; and the `local_*` lines, the parts of `local_reparam`'s step with the Gaussian
    prior and the closed-form KL (`local_breakdown`).

    Args:
      hidden: H.

    Returns:
      A list of `AblationLine`, "full" first.
    """
    full = Case(hidden, 1, "reparam", "scale_mixture", "mc", "hash")
    flat = dataclasses.replace(full, prior="flat")
    floor = deterministic_case(hidden)
    # The MNIST config's estimator, doing the peer's work (`local_breakdown`).
    local = Case(hidden, 1, "local_reparam", "gaussian", "closed_form", "hash")
    local_flat = dataclasses.replace(local, prior="flat", kl="mc")
    return [
        AblationLine(
            "full", "train_step: scale-mixture prior, MC KL, counter-hash ε (as MNIST), Adam", full
        ),
        AblationLine(
            "threefry_noise",
            "the same with threefry ε (jax.random)",
            dataclasses.replace(full, noise="jax"),
        ),
        AblationLine(
            "flat_counter_noise",
            "the same with the hash's counters as one flat iota (before 8cdddfa)",
            full,
            FlatCounterPosterior,
        ),
        AblationLine(
            "vmapped_one_sample",
            "the same with its one sample under a vmap of one (as up to 7859124)",
            full,
            vmap_one_sample=True,
        ),
        AblationLine(
            "sigma_mean_in_step",
            "the same with σ's mean computed in every step (as up to f4419b4)",
            full,
            sigma_mean_in_step=True,
        ),
        AblationLine(
            "vector_256",
            "the same compiled for 256-bit vectors (XLA:CPU's default; config.cpu_vector_bits)",
            dataclasses.replace(full, cpu_vector_bits=256),
        ),
        AblationLine(
            "no_noise", "the same with ε = 0 (no RNG; w = μ + σ·0)", full, NoiselessPosterior
        ),
        AblationLine("no_prior", "the same with a flat prior: log P(w) = 0", flat),
        AblationLine("no_kl", "flat prior and log q = 0: no KL term at all", flat, NoLogQPosterior),
        AblationLine(
            "grad_only", "value_and_grad of the full free energy, no optimiser", full, None, True
        ),
        AblationLine("deterministic", "train_step of the plain MLP (point posterior), Adam", floor),
        AblationLine(
            "deterministic_vector_256",
            "the plain MLP's train_step compiled for 256-bit vectors",
            dataclasses.replace(floor, cpu_vector_bits=256),
        ),
        AblationLine(
            "deterministic_grad_only",
            "value_and_grad of the plain MLP's loss: matmuls, ReLU, softmax",
            floor,
            None,
            True,
        ),
        AblationLine(
            "local_full",
            "train_step of local_reparam: Gaussian prior, closed-form KL (the peer's work), "
            "hash ε, Adam",
            local,
        ),
        AblationLine(
            "local_no_kl",
            "the same with a flat prior and log q = 0: no KL term at all",
            local_flat,
            NoLogQPosterior,
        ),
        AblationLine(
            "local_grad_only",
            "value_and_grad of local_reparam's free energy, no optimiser",
            local,
            None,
            True,
        ),
        AblationLine(
            "local_likelihood",
            "value_and_grad of its expected log-likelihood alone: no KL, no optimiser",
            local_flat,
            NoLogQPosterior,
            True,
        ),
    ]


def compile_gradient(
    experiment: train_lib.Experiment,
    params: Any,
    batch: tuple[jax.Array, jax.Array],
    key: jax.Array,
) -> tuple[float, Callable[[], None]]:
    """Compiles jitted `value_and_grad` of the free energy alone (no optimiser).

    Args:
      experiment: from `bbb.train.build`.
      params: the parameters.
      batch: the fixed minibatch.
      key: the step key.

    Returns:
      (compile seconds, a function that runs it once and blocks).
    """
    kl_weight = jnp.float32(1.0 / experiment.steps_per_epoch)
    grad_fn = jax.value_and_grad(experiment.free_energy, has_aux=True)
    gradient = jax.jit(
        lambda p, b, k: grad_fn(p, b, k, kl_weight), **train_lib.jit_options(experiment)
    )
    start = time.perf_counter()
    compiled = gradient.lower(params, batch, key).compile()
    compile_s = time.perf_counter() - start
    return compile_s, lambda: jax.block_until_ready(compiled(params, batch, key))


def sigma_mean_in_step(free_energy: Callable) -> Callable:
    """`free_energy`, its metrics also holding σ's mean as `sigma_mean_in_step`, which
    `train_step` keeps: the step computes it, as every step did up to f4419b4 (since then
    `sigma_mean` is an epoch's metric, `train.with_sigma_mean`)."""

    def with_sigma(params, batch, key, kl_weight):
        loss, metrics = free_energy(params, batch, key, kl_weight)
        return loss, {**metrics, "sigma_mean_in_step": metrics["sigma_mean"]}

    return with_sigma


def compile_ablation_line(
    line: AblationLine, base_config: ml_collections.ConfigDict, batch: tuple[jax.Array, jax.Array]
) -> tuple[dict[str, Any], Callable[[], None]]:
    """Builds and compiles one ablation line.

    Args:
      line: the line.
      base_config: the MNIST config.
      batch: the fixed minibatch.

    Returns:
      (the record: the case's fields, `ablation`, `measures`, `compile_s`; a function that
      runs the line's step once and blocks).
    """
    batch_size = batch[0].shape[0]
    config = line.case.config(base_config, batch_size)
    experiment = train_lib.build(config, EPOCH_EXAMPLES, INPUT_SHAPE)
    if line.vmap_one_sample:
        free_energy = dataclasses.replace(experiment.free_energy, vmap_one_sample=True)
        experiment = dataclasses.replace(experiment, free_energy=free_energy)
    keys = train_lib.root_keys(config)
    state = jax.jit(lambda key: train_lib.init_state(experiment, key))(keys["init"])
    if line.posterior_class is not None:
        q = state.params["posterior"]
        params = {**state.params, "posterior": line.posterior_class(q.mu, q.rho, q.noise)}
        state = state.replace(params=params, opt_state=experiment.optimizer.init(params))
    if line.sigma_mean_in_step:  # After the state: only the step calls the wrapped function.
        free_energy = sigma_mean_in_step(experiment.free_energy)
        experiment = dataclasses.replace(experiment, free_energy=free_energy)
    if line.gradient_only:
        step_key = jax.random.fold_in(keys["train"], 0)
        compile_s, run_once = compile_gradient(experiment, state.params, batch, step_key)
    else:
        compile_s, run_once, _, _ = compile_step(experiment, state, batch, keys["train"])
    record = {
        "kind": "ablation",
        **line.case.record(batch_size),
        "ablation": line.name,
        "measures": line.measures,
        **vector_width_record(experiment),
        "compile_s": compile_s,
    }
    if line.gradient_only:
        record["optimizer"] = "none"  # value_and_grad alone.
    return record, run_once


def time_interleaved(
    run_onces: Sequence[Callable[[], None]],
    repeats: int,
    warmup: int,
    calls_per_round: int = 0,
    after_call: Callable[[int, int], None] | None = None,
    after_round: Callable[[], None] | None = None,
) -> tuple[list[list[float]], list[list[float]]]:
    """Wall times in ms of each function, called in turn: round r runs every function in turn.

    On a shared machine whose speed drifts over seconds, timing the functions one after
    another puts the drift into their differences; interleaved, every function sees the same
    conditions, and differences of medians measure the functions.

    With `calls_per_round = c > 0`, each function runs 1 + c times in a row in each round: the
    first call refills the caches that the other functions' calls evicted, and only the c
    calls after it are the function's times. That is how a training step runs (back to back,
    its state in cache) and how the peer's steps are timed; a single call per round
    (`c = 0`) times a step with cold caches, which training never pays; the grid records both
    (`ms_per_step` warm, `ms_per_step_first_call` cold; docs/performance.md).

    Args:
      run_onces: functions that run once and block.
      repeats: timed rounds.
      warmup: untimed rounds first.
      calls_per_round: timed calls of each function after its first call in a round; 0 times
        the first (cold) call instead.
      after_call: called as `after_call(r, i)` after function i's calls in timed round r
        (untimed here): the benchmark times its epochs there, interleaved too.
      after_round: called after every round, warm-up rounds included (progress).

    Returns:
      (times, first_times): per function, its timed calls (`repeats` × max(1, c)) and the
      times of each round's first call (`repeats`; the same as `times` when c = 0).
    """
    times: list[list[float]] = [[] for _ in run_onces]
    first_times: list[list[float]] = [[] for _ in run_onces]
    for round_index in range(warmup + repeats):
        timed_round = round_index >= warmup
        for index, run_once in enumerate(run_onces):
            for call in range(1 + calls_per_round):
                start = time.perf_counter()
                run_once()
                elapsed = (time.perf_counter() - start) * 1e3
                if timed_round and call == 0:
                    first_times[index].append(elapsed)
                if timed_round and (call > 0 or calls_per_round == 0):
                    times[index].append(elapsed)
            if timed_round and after_call is not None:
                after_call(round_index - warmup, index)
        if after_round is not None:
            after_round()
    return times, first_times


class _Progress:
    """A tqdm bar (on stderr, with ETA) over the compilations and rounds of a benchmark, and
    the `log` lines printed above it; no bar when disabled."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None] | None):
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total, unit="task", file=sys.stderr, disable=not enabled, dynamic_ncols=True
        )
        self._log = log

    def start(self, description: str) -> None:
        """Shows what runs now."""
        self._bar.set_description_str(description)

    def done(self) -> None:
        """Counts the running task as done."""
        self._bar.update(1)

    def log(self, line: str) -> None:
        """Prints `line` through `log` (if any), above the bar."""
        if self._log is not None:
            with self._bar.external_write_mode(file=sys.stderr):
                self._log(line)

    def close(self) -> None:
        self._bar.close()


def _round_names(width: int, warmup: int, repeats: int, bar: _Progress) -> Callable[[], None]:
    """Names the first round on the bar now; the function returned (`time_interleaved`'s
    `after_round`) counts a round done and names the next."""
    names = [f"H={width}: warm-up round {r + 1}/{warmup}" for r in range(warmup)]
    names += [f"H={width}: timed round {r + 1}/{repeats}" for r in range(repeats)]
    rounds = iter(names[1:])
    bar.start(names[0])

    def after_round() -> None:
        bar.done()
        bar.start(next(rounds, ""))

    return after_round


def mlp_weights(hidden: int) -> int:
    """n: the weights and biases of the MLP 784-H-H-10 (each has a μ and a ρ)."""
    sizes = [int(np.prod(INPUT_SHAPE)), hidden, hidden, NUM_CLASSES]
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def mlp_matmul_flops(hidden: int, batch_size: int) -> int:
    """FLOPs of one forward and backward pass of the MLP's matmuls (2 per multiply-add).

    Forward x·W for each layer, the weight gradients (same count), and the input gradients of
    layers 2 and 3 (the first layer's input needs none).
    """
    sizes = [int(np.prod(INPUT_SHAPE)), hidden, hidden, NUM_CLASSES]
    products = [a * b for a, b in itertools.pairwise(sizes)]
    return 2 * batch_size * (2 * sum(products) + sum(products[1:]))


# The fewest bytes each elementwise part of the ablation must move per weight (float32 reads
# and writes, each array touched once): its floor on a memory-bound machine.
BYTES_PER_WEIGHT = {
    "rng": 4,  # Write ε.
    "prior": 8,  # Read w; write ∂log P/∂w.
    "entropy": 16,  # Read ε and ρ; write ∂log q/∂μ and ∂log q/∂ρ.
    # Adam on 2n parameters: read θ, g, m, v and write θ, m, v (28 bytes each), and the
    # gradient norm's read of g (4 bytes each).
    "optimiser": 64,
    # w = μ + σ ∘ ε: read μ, ρ, ε, write w; backward: read ∂w, ε, ρ, write ∂μ, ∂ρ.
    "rest": 36,
    # local_reparam's closed-form KL: read μ and ρ; write its ∂μ and ∂ρ.
    "local_kl": 16,
    "local_optimiser": 64,  # As "optimiser".
}
# Parts bound by matmuls: the plain MLP's matmul FLOPs times this (`mlp_matmul_flops`):
# local_reparam's mean and variance paths are two such MLPs, forward and backward.
MATMUL_PARTS = {"matmuls": 1, "local_likelihood": 2}


def measure_rates(num_weights: int, repeats: int = 20) -> dict[str, float]:
    """This machine's practical memory and matmul rates, measured now, for the floors.

    - `gb_per_s`: a jitted loop of 32 passes of x ← a·x + b over `num_weights` float32 (one
      read and one write each), so at the size, and in the caches, of the model's arrays.
    - `gflop_per_s`: a jitted 1024 × 1024 by 1024 × 1024 float32 matmul.

    Args:
      num_weights: the array size of the memory test.
      repeats: timed calls (the median).

    Returns:
      {"gb_per_s", "gflop_per_s"}.
    """
    passes = 32
    x = jnp.ones((num_weights,), jnp.float32)
    stream = jax.jit(lambda x: jax.lax.fori_loop(0, passes, lambda i, v: v * 0.999 + 0.001, x))
    a = jnp.ones((1024, 1024), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    (stream_times, matmul_times), _ = time_interleaved(
        [lambda: jax.block_until_ready(stream(x)), lambda: jax.block_until_ready(matmul(a))],
        repeats,
        3,
    )
    stream_ms, matmul_ms = statistics.median(stream_times), statistics.median(matmul_times)
    return {
        "gb_per_s": passes * 8 * num_weights / stream_ms / 1e6,
        "gflop_per_s": 2 * 1024**3 / matmul_ms / 1e6,
    }


def add_floors(
    parts: list[dict[str, Any]], hidden: int, batch_size: int, rates: dict[str, float]
) -> list[dict[str, Any]]:
    """Gives each part of `ablation_breakdown` its floor and how far above it it runs.

    The matmuls' floor is their FLOPs at the measured matmul rate (`MATMUL_PARTS`: twice the
    plain MLP's for local_reparam's likelihood); every other part's is the bytes it must move
    (`BYTES_PER_WEIGHT` × n) at the measured memory rate. `x_floor` = measured ms / floor ms.

    Args:
      parts: from `ablation_breakdown` or `local_breakdown`; updated in place.
      hidden: H.
      batch_size: B.
      rates: from `measure_rates`.

    Returns:
      `parts`, each with "bound" ("FLOPs" or "memory"), "floor_ms" and "x_floor".
    """
    n = mlp_weights(hidden)
    for part in parts:
        key = part["key"]
        if key in MATMUL_PARTS:
            bound = "FLOPs"
            flops = MATMUL_PARTS[key] * mlp_matmul_flops(hidden, batch_size)
            floor = flops / rates["gflop_per_s"] / 1e6
        else:
            bound = "memory"
            floor = BYTES_PER_WEIGHT["rng" if key.endswith("_rng") else key] * n
            floor = floor / rates["gb_per_s"] / 1e6
        part.update(bound=bound, floor_ms=floor, x_floor=part["ms"] / floor)
    return parts


def ablation_breakdown(ms: dict[str, float]) -> list[dict[str, Any]]:
    """The cost of each part of the full step, as differences of the lines' medians.

    The parts are not exactly additive (XLA fuses the elementwise work differently once a part
    is gone), and a difference of two noisy medians can come out negative: read them as
    estimates. "rest" is the full step minus the sum of the others; the threefry and flat-counter
    lines are alternatives to the hash line, not parts of the sum.

    Args:
      ms: ablation name → median ms/step at one H.

    Returns:
      Records {"key", "component", "formula", "ms", "pct_of_full"}.
    """
    parts = [
        _difference("rng", "RNG: hash ε for every weight", "full", "no_noise", ms),
        _difference("prior", "prior: scale-mixture log P(w), fwd + bwd", "full", "no_prior", ms),
        _difference("entropy", "entropy: log q(w), fwd + bwd", "no_prior", "no_kl", ms),
        _difference(
            "optimiser",
            "optimiser: Adam on 2n parameters, and the grad norm",
            "full",
            "grad_only",
            ms,
        ),
        _line("matmuls", "matmuls: the plain MLP's fwd + bwd", "deterministic_grad_only", ms),
    ]
    rest = ms["full"] - sum(part[3] for part in parts)
    parts.append(("rest", "rest: w = μ + σε, softplus, their gradients", "full − Σ above", rest))
    parts.append(
        _difference(
            "threefry_rng", "(instead of hash) RNG: threefry ε", "threefry_noise", "no_noise", ms
        )
    )
    parts.append(
        _difference(
            "flat_counter_rng",
            "(instead of two-row counters) RNG: hash ε from a flat counter",
            "flat_counter_noise",
            "no_noise",
            ms,
        )
    )
    return _part_records(parts, ms["full"])


def local_breakdown(ms: dict[str, float]) -> list[dict[str, Any]]:
    """The cost of each part of `local_reparam`'s step (the `local_*` lines), as differences of
    the lines' medians, `pct_of_full` of "local_full". Estimates, as in `ablation_breakdown`;
    what the three parts leave of "local_full" is how far they overlap.

    The likelihood's part is everything the estimator itself does: the mean and the variance
    paths' matmuls (twice the plain MLP's FLOPs), the per-example noise, σ² and softplus.

    Args:
      ms: ablation name → median ms/step at one H.

    Returns:
      Records {"key", "component", "formula", "ms", "pct_of_full"}.
    """
    parts = [
        _difference(
            "local_kl", "local_reparam: closed-form KL, fwd + bwd", "local_full", "local_no_kl", ms
        ),
        _difference(
            "local_optimiser",
            "local_reparam: Adam on 2n parameters, and the grad norm",
            "local_full",
            "local_grad_only",
            ms,
        ),
        _line(
            "local_likelihood",
            "local_reparam: its likelihood, fwd + bwd (two matmul paths, noise, σ², softplus)",
            "local_likelihood",
            ms,
        ),
    ]
    return _part_records(parts, ms["local_full"])


def _difference(
    key: str, component: str, minuend: str, subtrahend: str, ms: dict[str, float]
) -> tuple[str, str, str, float]:
    """A part of a breakdown as the difference of two lines' medians, its formula their names."""
    return key, component, f"{minuend} − {subtrahend}", ms[minuend] - ms[subtrahend]


def _line(key: str, component: str, name: str, ms: dict[str, float]) -> tuple[str, str, str, float]:
    """A part of a breakdown that one line times by itself."""
    return key, component, name, ms[name]


def _part_records(parts: list[tuple[str, str, str, float]], step_ms: float) -> list[dict]:
    """The breakdown's records of (key, component, formula, ms) parts of a step of `step_ms`."""
    return [
        {
            "key": key,
            "component": name,
            "formula": formula,
            "ms": value,
            "pct_of_full": 100 * value / step_ms,
        }
        for key, name, formula, value in parts
    ]


def run_ablation(
    base_config: ml_collections.ConfigDict,
    hidden: Sequence[int] = (400, 1200),
    *,
    repeats: int = 20,
    warmup: int = 3,
    calls_per_round: int = 4,
    batch_size: int = 128,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Times every ablation line at every H, and breaks the full step down.

    The lines of one H are all compiled first and then timed interleaved (`time_interleaved`),
    so that their differences are not the machine's drift.

    Args:
      base_config: the MNIST config.
      hidden: the widths H.
      repeats: timed rounds (each line's calls back to back in each).
      warmup: untimed rounds.
      calls_per_round: timed calls of each line per round, after one untimed call; 0 times
        single cold calls.
      batch_size: B.
      seed: for the random batch.
      log: called with one line per finished line, or None.
      progress: show a bar with ETA over the compilations and timed rounds (stderr).

    Returns:
      The lines' records (kind "ablation", with `pct_of_full`), then the breakdown's records
      (kind "breakdown", with `hidden`, the machine's measured rates and each part's floor:
      `add_floors`).
    """
    batch = random_batch(jax.random.key(seed), batch_size)
    records, breakdown = [], []
    bar = _Progress(
        sum(len(ablation_lines(width)) + warmup + repeats for width in hidden), progress, log
    )
    for width in hidden:
        compiled = []
        for line in ablation_lines(width):
            bar.start(f"H={width}: compiling {line.name}")
            compiled.append(compile_ablation_line(line, base_config, batch))
            bar.done()
        times, first_times = time_interleaved(
            [run_once for _, run_once in compiled],
            repeats,
            warmup,
            calls_per_round,
            after_round=_round_names(width, warmup, repeats, bar),
        )
        lines = [
            {**r, **_summary(t, first, calls_per_round)}
            for (r, _), t, first in zip(compiled, times, first_times, strict=True)
        ]
        del compiled  # Frees the lines' states before the next width.
        ms = {r["ablation"]: r["ms_per_step"] for r in lines}
        for r in lines:
            r["pct_of_full"] = 100 * r["ms_per_step"] / ms["full"]
            r["examples_per_s"] = batch_size / (r["ms_per_step"] / 1e3)
            bar.log(f"ablation H={width} {r['ablation']}: {r['ms_per_step']:.2f} ms")
        records += lines
        rates = measure_rates(mlp_weights(width), repeats)
        bar.log(
            f"ablation H={width}: memory {rates['gb_per_s']:.1f} GB/s, "
            f"matmul {rates['gflop_per_s']:.1f} GFLOP/s"
        )
        # Each part with the identifying fields of the step it is a part of, as every record has.
        steps = {line.name: line.case.record(batch_size) for line in ablation_lines(width)}
        for parts, of_step in (
            (ablation_breakdown(ms), steps["full"]),
            (local_breakdown(ms), steps["local_full"]),
        ):
            parts = add_floors(parts, width, batch_size, rates)
            breakdown += [{"kind": "breakdown", **of_step, **rates, **part} for part in parts]
    bar.close()
    return records + breakdown


# The peer ---------------------------------------------------------------------------------

# Runs in the peer's own Python (argv[1]: JSON arguments); prints one JSON object.
PEER_SCRIPT = r"""
import importlib.metadata, json, sys, time
import torch
import torch.nn.functional as F
from bayesian_torch.layers import LinearReparameterization

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
B, N = args["batch_size"], args["num_train"]
x = torch.rand(B, 1, 28, 28) * 2.0
y = torch.randint(0, 10, (B,))


class BayesMLP(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        sizes = [784, h, h, 10]
        self.layers = torch.nn.ModuleList(
            LinearReparameterization(a, b) for a, b in zip(sizes[:-1], sizes[1:])
        )

    def forward(self, x, return_kl=True):
        x, kl = x.flatten(1), 0.0
        for i, layer in enumerate(self.layers):
            if return_kl:
                x, layer_kl = layer(x)
                kl = kl + layer_kl
            else:
                x = layer(x, return_kl=False)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x, kl


def timed(step):
    for _ in range(args["warmup"]):
        step()
    times = []
    for _ in range(args["repeats"]):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


records = []
for h in args["hidden"]:
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, h), torch.nn.ReLU(),
        torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    records.append({"system": "torch", "hidden": h, "num_samples": 1, "times_ms": timed(step)})
    for k in args["num_samples"]:
        model = BayesMLP(h)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            # The free energy per example, K samples: mean NLL + KL / N (bbb's scaling). The
            # closed-form KL does not depend on the sample: computed once, as bbb does.
            optimizer.zero_grad()
            nll, kl = 0.0, 0.0
            for sample in range(k):
                out, sample_kl = model(x, return_kl=sample == 0)
                nll, kl = nll + F.cross_entropy(out, y), kl + sample_kl
            (nll / k + kl / N).backward()
            optimizer.step()

        records.append(
            {"system": "bayesian-torch", "hidden": h, "num_samples": k, "times_ms": timed(step)}
        )
versions = {
    "torch": torch.__version__, "bayesian_torch": importlib.metadata.version("bayesian-torch")
}
print(json.dumps({"versions": versions, "records": records}))
"""


def run_peer(
    peer_python: str,
    hidden: Sequence[int] = (400, 1200),
    num_samples: Sequence[int] = (1, 2, 8),
    *,
    repeats: int = 20,
    warmup: int = 3,
    batch_size: int = 128,
    threads: int = 2,
    num_train: int | None = None,
    host_memory: str = "default",
    timeout_s: float = 3600.0,
) -> list[dict[str, Any]]:
    """Times bayesian-torch's LinearReparameterization MLP and a plain torch MLP, in a subprocess.

    The peer computes the same free energy per example as bbb (mean NLL + KL / N, Gaussian
    prior N(0, 1), closed-form KL, recomputed at every forward pass as bayesian-torch does),
    with Adam, on one fixed random batch, `threads` torch threads. Torch is eager: there is no
    compilation to time, and the first `warmup` steps absorb its allocator's warm-up.

    Args:
      peer_python: the python of an environment with torch and bayesian-torch.
      hidden: the widths H.
      num_samples: the K.
      repeats: timed steps.
      warmup: untimed steps.
      batch_size: B.
      threads: `torch.set_num_threads`.
      num_train: N for the KL scaling; None takes `EPOCH_EXAMPLES`.
      host_memory: "default" runs the peer with glibc's default malloc; "kept" with the policies
        this process runs under (`bbb.hostmem`, through the environment: freed memory kept, the
        heap on transparent huge pages, unless switched off here by BBB_KEEP_FREED_MEMORY=0 or
        BBB_HUGE_PAGES=0), so that like is compared with like. Other GLIBC_TUNABLES stay.
        Recorded in each record's `host_memory`.
      timeout_s: the subprocess's time limit.

    Returns:
      Records (kind "peer") with the grid's fields, or [] if the peer cannot run (the reason is
      printed to stderr).
    """
    if not peer_python or not os.path.exists(peer_python):
        print(
            f"peer: no python at {peer_python!r}; make one with\n"
            "  python3 -m venv .venv-peer && "
            ".venv-peer/bin/pip install torch==2.13.0 bayesian-torch==0.5.0",
            file=sys.stderr,
        )
        return []
    arguments = {
        "hidden": list(hidden),
        "num_samples": list(num_samples),
        "repeats": repeats,
        "warmup": warmup,
        "batch_size": batch_size,
        "threads": threads,
        "num_train": EPOCH_EXAMPLES if num_train is None else num_train,
    }
    check_choice("peer_host_memory", host_memory, HOST_MEMORY)
    # "kept": the policies this process runs under (bbb's, unless switched off), no others.
    kept = host_memory == "kept"
    env = hostmem.peer_environment(
        {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
        keep_freed=kept and hostmem.is_kept(),
        huge_pages=kept and hostmem.HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""),
    )
    try:
        result = subprocess.run(
            [peer_python, "-c", PEER_SCRIPT, json.dumps(arguments)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"peer: could not run {peer_python}: {e}", file=sys.stderr)
        return []
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1:] or ["(no message)"]
        print(f"peer: {peer_python} failed (exit {result.returncode}): {last[0]}", file=sys.stderr)
        return []
    try:
        output = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):  # Whatever the peer printed, the grid's records stand.
        print(
            f"peer: {peer_python} printed no JSON line: {result.stdout[-300:]!r}", file=sys.stderr
        )
        return []
    records = []
    for raw in output["records"]:
        bayesian = raw["system"] == "bayesian-torch"
        record = {
            "kind": "peer",
            "system": raw["system"],
            "model": "mlp",
            "hidden": raw["hidden"],
            "num_samples": raw["num_samples"],
            "estimator": "reparam" if bayesian else DETERMINISTIC,
            "prior": "gaussian" if bayesian else "flat",
            "kl": "closed_form" if bayesian else "none",
            "noise": "torch" if bayesian else "none",
            "optimizer": "adam",
            "batch_size": batch_size,
            "compile_s": None,
            **_summary(raw["times_ms"]),
            "threads": threads,
            "host_memory": host_memory,
            "versions": output["versions"],
        }
        record["examples_per_s"] = batch_size / (record["ms_per_step"] / 1e3)
        records.append(record)
    return records


# Reporting --------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """The machine the numbers belong to: CPU, cores, load, Python and JAX.

    Returns:
      {"cpu", "logical_cores", "usable_cores", "load_average", "python", "jax", "jaxlib",
      "backend", "devices"}.
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import jaxlib

    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "host_memory": "kept" if hostmem.is_kept() else "default",  # bbb.hostmem's policy
        "huge_pages": hostmem.huge_pages_in_effect(),  # glibc's heap on transparent huge pages
    }


def format_machine(info: dict[str, Any]) -> str:
    """`machine_info` as two lines of text."""
    return (
        f"machine: {info['cpu']}, {info['logical_cores']} logical cores "
        f"({info['usable_cores']} usable), load average {info['load_average']}\n"
        f"software: Python {info['python']}, jax {info['jax']} / jaxlib {info['jaxlib']}, "
        f"backend {info['backend']} {info['devices']}; host memory "
        f"{info.get('host_memory')}, huge pages {info.get('huge_pages')}"
    )


def _cell(value: Any, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _peer_cell(record: dict[str, Any]) -> str:
    """ "a / b": the peer's step over this one, as shipped / malloc kept (`add_ratios`)."""
    speedup = record.get("peer_speedup") or {}
    return (
        " / ".join(f"{speedup[m]:.2f}×" if m in speedup else "–" for m in ("default", "kept"))
        if speedup
        else "–"
    )


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The grid's and the peer's records as a Markdown table, with the ratios to the floors.

    Args:
      records: records of kind "grid" or "peer", after `add_ratios`.

    Returns:
      The table.
    """
    header = (
        "| system | H | K | estimator | prior / KL | noise | dtype | compile s | ms/step | "
        "[q25, q75] | first call | examples/s | × floor | × own floor | epoch s | "
        "loop overhead | bayesian-torch ÷ this |"
    )
    lines = [header, "|" + "--|" * (header.count("|") - 1)]
    for r in records:
        spread = f"[{r['ms_per_step_q25']:.2f}, {r['ms_per_step_q75']:.2f}]"
        overhead = r.get("host_overhead_pct")
        system = r["system"] + (" (malloc kept)" if r.get("host_memory") == "kept" else "")
        lines.append(
            f"| {system} | {r['hidden']} | {r['num_samples']} | {r['estimator']} | "
            f"{r['prior']} / {r['kl']} | {r['noise']} | {r.get('dtype', 'float32')} | "
            f"{_cell(r.get('compile_s'), '.1f')} | "
            f"{r['ms_per_step']:.2f} | {spread} | "
            f"{_cell(r.get('ms_per_step_first_call'), '.2f')} | {r['examples_per_s']:,.0f} | "
            f"{_cell(r.get('ratio_to_deterministic'), '.2f')} | "
            f"{_cell(r.get('ratio_to_own_floor'), '.2f')} | {_cell(r.get('epoch_s'), '.2f')} | "
            f"{'–' if overhead is None else f'{overhead:+.1f}%'} | {_peer_cell(r)} |"
        )
    return "\n".join(lines)


def format_ablation(records: Sequence[dict[str, Any]]) -> str:
    """The ablation's lines and breakdown, per H, as Markdown tables.

    Args:
      records: from `run_ablation`.

    Returns:
      The tables.
    """
    out = []
    for width in dict.fromkeys(r["hidden"] for r in records):
        out.append(f"\nAblation, H={width} (K=1, B={records[0].get('batch_size')}):\n")
        out.append("| line | what it times | ms/step | % of full |")
        out.append("|--|--|--|--|")
        for r in records:
            if r["kind"] == "ablation" and r["hidden"] == width:
                out.append(
                    f"| {r['ablation']} | {r['measures']} | {r['ms_per_step']:.2f} | "
                    f"{r['pct_of_full']:.0f}% |"
                )
        rates = next(r for r in records if r["kind"] == "breakdown" and r["hidden"] == width)
        out.append(
            f"\nFloors from this machine's rates, measured in the same run: memory "
            f"{rates['gb_per_s']:.1f} GB/s (arrays of n = {mlp_weights(width):,} floats), "
            f"matmul {rates['gflop_per_s']:.1f} GFLOP/s.\n"
        )
        out.append("| component | from | ms | % of full | bound | floor ms | × floor |")
        out.append("|--|--|--|--|--|--|--|")
        for r in records:
            if r["kind"] == "breakdown" and r["hidden"] == width:
                cells = (
                    r["component"],
                    r["formula"],
                    f"{r['ms']:.2f}",
                    f"{r['pct_of_full']:.0f}%",
                    r["bound"],
                    f"{r['floor_ms']:.3f}",
                    f"{r['x_floor']:.1f}",
                )
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def run(
    base_config: ml_collections.ConfigDict,
    *,
    hidden: Sequence[int] = (400, 1200),
    num_samples: Sequence[int] = (1, 2, 8),
    estimators: Sequence[str] = ESTIMATORS,
    priors: Sequence[str] = tuple(PRIOR_KL),
    noises: Sequence[str] = NOISES,
    dtypes: Sequence[str] = ("float32",),
    repeats: int = 20,
    warmup: int = 3,
    calls_per_round: int = 4,
    epoch_repeats: int = 1,
    epoch_examples: int | None = None,
    batch_size: int = 128,
    ablation: bool = False,
    peer_python: str | None = None,
    peer_threads: int = 2,
    peer_host_memory: Sequence[str] = HOST_MEMORY,
    json_path: str | None = None,
    list_only: bool = False,
    out: Callable[[str], None] = print,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The benchmark of `scripts/benchmark.py`: prints the machine and the tables.

    Without `ablation`: times the grid (`benchmark_grid` of the given lists), and the peer if
    `peer_python` is given. With `ablation`: runs `run_ablation` at each H instead. With
    `list_only`: prints the configurations, one JSON object a line, and times nothing.

    Args:
      base_config: the MNIST config (configs/mnist.py).
      hidden, num_samples, estimators, priors, noises, dtypes: the grid (`benchmark_grid`).
      repeats: timed rounds per configuration (`time_interleaved`).
      warmup: untimed rounds after compilation.
      calls_per_round: timed steps of a configuration per round, back to back after one
        untimed call; 0 times one cold call per round. The peer, whose steps all run back to
        back, is timed for as many steps.
      epoch_repeats: timed epochs per configuration; 0 skips the epoch.
      epoch_examples: N of an epoch; None takes `EPOCH_EXAMPLES`.
      batch_size: B.
      ablation: run the ablation instead of the grid.
      peer_python: the python of the peer's environment; None or "" skips the peer.
      peer_threads: torch threads in the peer.
      peer_host_memory: the peer's malloc policies (`run_peer`'s `host_memory`), one peer run
        each.
      json_path: where to write the records as a JSON list, or None.
      list_only: list the configurations (records without timings) instead of timing them.
      out: prints the report.
      log: prints progress, or None.
      progress: show a bar with ETA over the compilations and timed rounds (stderr).

    Returns:
      The records (each with a `kind`: "grid", "peer", "ablation" or "breakdown"; the machine
      is in every record's `machine`).
    """
    for host_memory in peer_host_memory:  # before any timing
        check_choice("peer_host_memory", host_memory, HOST_MEMORY)
    check_timing(repeats, warmup, calls_per_round, 0 if ablation else epoch_repeats)
    check_positive("--batch_size", batch_size, integer=True)
    for width in hidden:
        check_positive("--hidden", width, integer=True)
    for count in num_samples:
        check_positive("--num_samples", count, integer=True)
    if epoch_examples is not None and not ablation and epoch_repeats > 0:
        if isinstance(epoch_examples, bool) or not (
            isinstance(epoch_examples, int) and epoch_examples >= batch_size
        ):
            raise ConfigError(
                "--epoch_examples",
                epoch_examples,
                f"an integer of at least --batch_size={batch_size}",
            )
    if peer_python and not list_only and not ablation:
        check_peer(peer_python, peer_threads)
    if json_path and not list_only:  # The records of an hour's timing must have somewhere to go.
        folder = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(folder) or not workdir_lib.can_create_files(folder):
            raise ConfigError("--json", json_path, "a file in an existing, writable folder")
    if list_only:
        if ablation:
            records = [
                {"kind": "ablation", **line.case.record(batch_size), "ablation": line.name}
                for width in hidden
                for line in ablation_lines(width)
            ]
        else:
            cases = benchmark_grid(hidden, num_samples, estimators, priors, noises, dtypes)
            records = [{"kind": "grid", **case.record(batch_size)} for case in cases]
        for record in records:
            out(json.dumps(record))
        return records
    info = machine_info()
    out(format_machine(info))
    if ablation:
        records = run_ablation(
            base_config,
            hidden,
            repeats=repeats,
            warmup=warmup,
            calls_per_round=calls_per_round,
            batch_size=batch_size,
            log=log,
            progress=progress,
        )
        out(format_ablation(records))
    else:
        cases = benchmark_grid(hidden, num_samples, estimators, priors, noises, dtypes)
        records = run_grid(
            cases,
            base_config,
            repeats=repeats,
            warmup=warmup,
            calls_per_round=calls_per_round,
            epoch_repeats=epoch_repeats,
            epoch_examples=epoch_examples,
            batch_size=batch_size,
            log=log,
            progress=progress,
        )
        if json_path and peer_python:  # The grid's hour is kept whatever the peer does.
            _write_records(json_path, records, info, out)
        for host_memory in peer_host_memory if peer_python else ():
            records += run_peer(
                peer_python,
                hidden,
                num_samples,
                repeats=repeats * max(1, calls_per_round),
                warmup=warmup,
                batch_size=batch_size,
                threads=peer_threads,
                num_train=epoch_examples,
                host_memory=host_memory,
            )
        add_ratios(records)
        out(format_table(records))
        out(
            "\nms/step: steps back to back (warm caches); first call: a round's first step, after "
            "the other configurations' (cold caches). "
            "× floor: ms/step over bbb's deterministic MLP of the same H, timed in this run. "
            "× own floor: over the same system's plain MLP. Loop overhead: epoch wall time "
            "over that of as many step calls run right after it, − 1, the median over the "
            "epochs. bayesian-torch ÷ this: the peer's step at the "
            "same H and K over this one, the peer as shipped / under bbb's malloc policies."
        )
        note = large_temporaries_note(records, info["backend"])
        if note:
            out(note)
    if json_path:
        _write_records(json_path, records, info, out)
    else:
        for record in records:
            record["machine"] = info
    return records


def _write_records(
    path: str, records: list[dict[str, Any]], info: dict[str, Any], out: Callable[[str], None]
) -> None:
    """Writes the records, each with the machine, as a JSON list."""
    for record in records:
        record["machine"] = info
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    out(f"wrote {len(records)} records to {path}")
