"""The mushroom contextual bandit of Blundell et al. (2015), §5.3 and Figure 6.

At each step t a mushroom is drawn uniformly from the data set; the agent sees its context x
(the one-hot attributes) and chooses to eat it or to pass. Rewards: an edible mushroom eaten
gives +5; a poisonous one eaten gives −35 with probability ½ and +5 otherwise; passing gives 0.
The oracle eats exactly the edible mushrooms (+5 for edible, 0 for poisonous), and the regret of a
step is the oracle's reward minus the agent's. We also record the expected regret, with the
coin flip of a poisonous meal averaged out (5 for passing an edible mushroom, 15 for eating a
poisonous one), which has much less noise than the realised one.

Every agent has the same network, f(x, a; w) ≈ E[r | x, a]: a 2×100 ReLU MLP (`bbb.models.MLP`)
on the context concatenated with the one-hot action, trained with a Gaussian likelihood; the
same buffer of the last 4,096 interactions; and the same schedule: after each interaction, 64
steps of the same optimiser (`optim.name`: plain SGD by default, or Adam) on minibatches of 64
drawn uniformly (with replacement) from the buffer.

- Bayes by Backprop with Thompson sampling: w ~ q(w|θ) once per step, act greedily under w. The
  update minimises the free energy of `bbb.objective.FreeEnergy` with 2 posterior samples.
- ε-greedy (ε = 5%, 1%, 0%): a point estimate of w (`PointEstimate`, flat prior: a plain MLP
  trained by maximum likelihood), acting greedily except with probability ε, uniformly.

The KL weight with a growing buffer. Each minibatch is given the free energy per data point,
KL / N − mean log P(r | x, a, w) (`FreeEnergy` with num_train = num_batches = 1 and a KL weight
1/N, traced, so N may change every step). Two choices of N (`objective.kl_data_size`):

- "buffer": N = n_t = min(t, 4096), the buffer's size: the posterior of the data the likelihood
  sees. Early on, with a handful of data, the prior dominates and q stays wide, which drives
  exploration; once the buffer is full the KL's share stays at 1/4096, so q stops concentrating
  and Thompson sampling keeps exploring at a constant rate.
- "interactions": N = t, every interaction so far: the weights were trained on all of them, the
  buffer being a replayed sample, so the evidence keeps growing and q can keep concentrating.

Under Adam the two gave the same regret: Adam's step does not scale with the KL's weight. Under
plain SGD, "interactions" kept σ from creeping up all run and brought Bayes by Backprop's late
regret near the greedy agent's and its total below both ε > 0 agents' on every seed, below
greedy's on the mean over seeds but not seed by seed (README, "Contextual bandit").

The whole run lives on the device. A `lax.scan` runs a chunk of interactions; each interaction
runs its 64 updates in a `lax.scan`; the buffer is a fixed-size ring buffer with a counter;
the agents of one kind (the three ε-greedy agents, or Bayes by Backprop, each over all seeds) are
stacked on a leading axis and `vmap`ped. The host sees only chunk boundaries, to log, to
advance the progress bar and, every few chunks, to checkpoint (Orbax) what a resumed run needs.

Cost. The paper's schedule is 64 × 50,000 = 3.2M gradient steps per agent, each hundreds of
small ops (64 × 119 matmuls, elementwise work on ~22k weights) that one program cannot spread
over two cores. So scripts/bandit.py asks JAX for a CPU device per core
(`request_cpu_devices`), each kind's stack of agents is split over the devices
(`agent_shardings`: one seed of Bayes by Backprop and three ε-greedy agents on each of two)
and every device runs its share of each chunk at the same time. The results are those of one
device up to rounding, which differs with the number of agents a device's program holds (the
same device count gives the same results bit for bit). Every update's 64 minibatches are drawn
in one vectorised call; Bayes by Backprop's gradients are stored once per step. Bayes by
Backprop is most of the cost: its 2 weight samples, their log-densities under q and the
scale-mixture prior and the gradients of all three. docs/experiments.md ("Speed") has the
timings. `update_every` = k runs the same 64-step rounds after every k interactions instead
of after each, dividing the cost by k and keeping everything else as in the paper.

The setup follows Blundell et al. (2015), §5.3; the ε-greedy baselines and the uniform minibatch
updates from a buffer are those of Riquelme et al. (2018), "Deep Bayesian Bandits Showdown".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bbb import objective as objective_lib
from bbb import posterior as posterior_lib
from bbb.errors import (
    ConfigError,
    check_choice,
    check_in_range,
    check_non_negative,
    check_positive,
    check_probability,
    check_seed,
)
from bbb.models import make_model
from bbb.priors import make_prior
from bbb.special import materialize
from bbb.train import base_optimizer
from bbb.workdir import flatten_config, with_added_fields

PyTree = Any
PASS, EAT = 0, 1  # The two actions.
KL_DATA_SIZES = ("buffer", "interactions")  # N in the KL weight 1/N.
NUM_ACTIONS = 2


# Rewards and regret -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rewards:
    """The reward table of the mushroom bandit (Blundell et al. 2015, §5.3).

    Attributes:
      edible: the reward for eating an edible mushroom (+5).
      poisonous_bad: the reward for eating a poisonous one, when it makes the eater ill (−35).
      poisonous_good: the reward for eating a poisonous one otherwise (+5).
      poisonous_bad_probability: the chance of the bad outcome (½).
    """

    edible: float = 5.0
    poisonous_bad: float = -35.0
    poisonous_good: float = 5.0
    poisonous_bad_probability: float = 0.5

    def expected_poisonous(self) -> float:
        """E[r | poisonous, eat] (−15 with the paper's numbers)."""
        p = self.poisonous_bad_probability
        return p * self.poisonous_bad + (1 - p) * self.poisonous_good


def step_rewards(
    rewards: Rewards, poisonous: jax.Array, action: jax.Array, bad_outcome: jax.Array
) -> dict[str, jax.Array]:
    """The agent's reward, the oracle's reward, and the realised and expected regret.

    Args:
      rewards: the reward table.
      poisonous: 1 if the mushroom is poisonous (int or bool, any shape).
      action: `EAT` or `PASS` (same shape).
      bad_outcome: True if a poisonous meal makes the eater ill this time (same shape).

    Returns:
      {"reward", "oracle_reward", "regret", "expected_regret"}, float32, shape of `action`.
      The oracle eats edible mushrooms only; `regret` = oracle − agent reward (realised, so
      eating a poisonous mushroom that turns out well has regret −5); `expected_regret` averages
      the outcome of a poisonous meal.
    """
    poisonous = jnp.asarray(poisonous).astype(bool)
    eat = jnp.asarray(action) == EAT
    poison_reward = jnp.where(bad_outcome, rewards.poisonous_bad, rewards.poisonous_good)
    expected_poison = rewards.expected_poisonous()

    def realised(eats):
        return jnp.where(eats, jnp.where(poisonous, poison_reward, rewards.edible), 0.0)

    def expected(eats):
        return jnp.where(eats, jnp.where(poisonous, expected_poison, rewards.edible), 0.0)

    # The oracle knows the class and eats when that has a positive expected reward.
    oracle_eats = jnp.where(poisonous, expected_poison > 0, rewards.edible > 0)
    reward = realised(eat)
    oracle = realised(oracle_eats)
    return {
        "reward": reward.astype(jnp.float32),
        "oracle_reward": oracle.astype(jnp.float32),
        "regret": (oracle - reward).astype(jnp.float32),
        "expected_regret": (expected(oracle_eats) - expected(eat)).astype(jnp.float32),
    }


# The replay buffer ------------------------------------------------------------------------


@flax.struct.dataclass
class Buffer:
    """A ring buffer of the last `capacity` interactions, in fixed-size device arrays.

    Interaction number c (0-based) is stored at slot c mod capacity; `count` is the number ever
    added, so the filled slots are [0, min(count, capacity)).

    Attributes:
      context_index: the row of the data set that was the context, int32 [C].
      action: the action taken, int32 [C].
      reward: the reward received, float32 [C].
      count: interactions added so far, int32 scalar.
    """

    context_index: jax.Array
    action: jax.Array
    reward: jax.Array
    count: jax.Array

    @classmethod
    def empty(cls, capacity: int) -> Buffer:
        """An empty buffer of `capacity` slots."""
        return cls(
            context_index=jnp.zeros((capacity,), jnp.int32),
            action=jnp.zeros((capacity,), jnp.int32),
            reward=jnp.zeros((capacity,), jnp.float32),
            count=jnp.int32(0),
        )

    @property
    def capacity(self) -> int:
        """C, the number of slots."""
        return self.action.shape[-1]

    def size(self) -> jax.Array:
        """The number of filled slots, min(count, capacity)."""
        return jnp.minimum(self.count, self.capacity)

    def add(self, context_index: jax.Array, action: jax.Array, reward: jax.Array) -> Buffer:
        """The buffer with one more interaction, overwriting the oldest when full.

        Args:
          context_index: int scalar.
          action: int scalar.
          reward: float scalar.

        Returns:
          The new buffer.
        """
        slot = self.count % self.capacity
        return Buffer(
            context_index=self.context_index.at[slot].set(context_index),
            action=self.action.at[slot].set(action),
            reward=self.reward.at[slot].set(reward),
            count=self.count + 1,
        )

    def sample(self, key: jax.Array, batch_size: int) -> jax.Array:
        """Slots of a minibatch, uniform with replacement over the filled slots.

        Args:
          key: a PRNG key.
          batch_size: B.

        Returns:
          int32 [B] slot indices (all 0 if the buffer is empty).
        """
        return jax.random.randint(key, (batch_size,), 0, jnp.maximum(self.size(), 1))


# Agents -----------------------------------------------------------------------------------


def network_inputs(features: jax.Array, action: jax.Array) -> jax.Array:
    """The network's input: the context's features and the one-hot action, concatenated.

    Args:
      features: float32 [..., F].
      action: int [...].

    Returns:
      float32 [..., F + 2].
    """
    return jnp.concatenate([features, jax.nn.one_hot(action, NUM_ACTIONS, dtype=jnp.float32)], -1)


@flax.struct.dataclass
class AgentState:
    """One agent's state: its trained pytree, optimiser state and buffer.

    Attributes:
      params: {"posterior", "prior", "likelihood"} (see `FreeEnergy.init_params`).
      opt_state: the Optax state.
      buffer: its replay buffer.
    """

    params: PyTree
    opt_state: PyTree
    buffer: Buffer


@dataclasses.dataclass(frozen=True)
class Learner:
    """What the agents of one kind share: network, objective, optimiser and update schedule.

    Attributes:
      model: the Flax model f(x, a; w), output [B, 1].
      free_energy: the objective (a point posterior with a flat prior gives plain maximum
        likelihood).
      optimizer: the Optax optimiser.
      num_updates: gradient steps after each interaction (64).
      batch_size: minibatch size of each (64).
      thompson: act greedily under one posterior sample (True), or under the mean (False).
      kl_data_size: N in the KL weight 1/N: "buffer" (n_t = min(t, capacity)) or
        "interactions" (t, every interaction so far); see the module docstring.
    """

    model: nn.Module
    free_energy: objective_lib.FreeEnergy
    optimizer: optax.GradientTransformation
    num_updates: int
    batch_size: int
    thompson: bool
    kl_data_size: str = "buffer"

    def values(self, params: PyTree, features: jax.Array, key: jax.Array) -> jax.Array:
        """f(x, a; w) for both actions, with w ~ q (Thompson) or w = μ.

        Args:
          params: the trained pytree.
          features: one context, float32 [F].
          key: the key of the posterior sample.

        Returns:
          float32 [2], the predicted reward of PASS and EAT.
        """
        posterior = params["posterior"]
        weights = posterior.sample(key) if self.thompson else posterior.mean()
        inputs = network_inputs(jnp.stack([features, features]), jnp.arange(NUM_ACTIONS))
        return self.model.apply({"params": weights}, inputs)[:, 0]

    def update(
        self, state: AgentState, contexts: jax.Array, key: jax.Array
    ) -> tuple[AgentState, dict[str, jax.Array]]:
        """`num_updates` gradient steps on minibatches from the buffer (a `lax.scan`).

        The KL weight is 1 / N, N the buffer's size or the interactions so far (see the
        module docstring).

        Args:
          state: the agent's state, its buffer holding at least one interaction.
          contexts: the data set's features, float32 [N, F].
          key: this interaction's update key; step j uses fold_in(key, j).

        Returns:
          (state, metrics of the last step: loss, nll, kl, sigma_mean).
        """
        buffer = state.buffer
        data_size = buffer.size() if self.kl_data_size == "buffer" else buffer.count
        kl_weight = 1.0 / jnp.maximum(data_size, 1).astype(jnp.float32)
        grad_fn = jax.value_and_grad(self.free_energy, has_aux=True)

        def draws(j):
            key_batch, key_noise = jax.random.split(jax.random.fold_in(key, j))
            return buffer.sample(key_batch, self.batch_size), key_noise  # [B], key

        # Every step's minibatch and noise key at once: the same draws as step by step (the
        # buffer does not change during the updates), but one vectorised threefry call
        # instead of a few small looped ones per step (10–20% of an ε-greedy update, timed alone).
        slots, noise_keys = jax.vmap(draws)(jnp.arange(self.num_updates))

        def one_step(carry, draw):
            params, opt_state, _ = carry
            slots, key_noise = draw
            x = network_inputs(contexts[buffer.context_index[slots]], buffer.action[slots])
            y = buffer.reward[slots][:, None]  # [B, 1]
            (_, metrics), grads = grad_fn(params, (x, y), key_noise, kl_weight)
            if self.thompson:
                # Stored once, as in `bbb.train.train_step`: Adam's two moments would each
                # recompute the chain of noise, softplus and prior terms behind Bayes by
                # Backprop's gradients (a fifth of its update, timed alone). A point estimate's
                # chain is cheap, and left as it was (its rounding, and so its runs, unchanged).
                grads = jax.tree_util.tree_map(materialize, grads)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, _last_metrics(metrics)), None

        metrics0 = {k: jnp.float32(0.0) for k in _METRICS}
        (params, opt_state, metrics), _ = jax.lax.scan(
            one_step, (state.params, state.opt_state, metrics0), (slots, noise_keys)
        )
        return AgentState(params=params, opt_state=opt_state, buffer=buffer), metrics


_METRICS = ("loss", "nll", "kl", "sigma_mean")


def _last_metrics(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(metrics[k], jnp.float32) for k in _METRICS}


@flax.struct.dataclass
class Problem:
    """A mushroom-like bandit: contexts and which of them are poisonous.

    Attributes:
      contexts: float32 [N, F] features.
      poisonous: int32 [N], 1 for poisonous.
    """

    contexts: jax.Array
    poisonous: jax.Array


def draw_mushroom(
    rewards: Rewards, problem: Problem, env_key: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The mushroom of interaction t, uniform over the data set, and the outcome if eaten.

    Args:
      rewards: the reward table (its `poisonous_bad_probability`).
      problem: the bandit.
      env_key: the environment's key.
      t: the interaction number.

    Returns:
      (row index, int32 scalar; bad_outcome, bool scalar: a poisonous meal goes badly).
    """
    key_index, key_outcome = jax.random.split(jax.random.fold_in(env_key, t))
    index = jax.random.randint(key_index, (), 0, problem.contexts.shape[0])
    bad_outcome = jax.random.bernoulli(key_outcome, rewards.poisonous_bad_probability)
    return index, bad_outcome


def interact(
    learner: Learner,
    rewards: Rewards,
    problem: Problem,
    state: AgentState,
    t: jax.Array,
    env_key: jax.Array,
    agent_key: jax.Array,
    epsilon: jax.Array,
) -> tuple[AgentState, dict[str, jax.Array]]:
    """Interaction t of one agent: observe a mushroom, act, receive the reward, store it.

    The mushroom and the outcome of a poisonous meal come from fold_in(env_key, t), so every
    agent that shares `env_key` (one seed) meets the same mushrooms in the same order. On an
    exact tie of the two predicted rewards the agent passes, as the oracle does (it eats only
    where the expected reward is positive).

    Args:
      learner: the agent kind.
      rewards: the reward table.
      problem: the bandit.
      state: the agent's state.
      t: the interaction number (0-based).
      env_key: the environment's key (one per seed).
      agent_key: the agent's acting key.
      epsilon: the chance of a uniformly random action.

    Returns:
      (state with the interaction in its buffer, {"action", "reward", "regret",
      "expected_regret"}).
    """
    index, bad_outcome = draw_mushroom(rewards, problem, env_key, t)
    key_value, key_explore, key_random = jax.random.split(jax.random.fold_in(agent_key, t), 3)
    values = learner.values(state.params, problem.contexts[index], key_value)  # [2]
    explore = jax.random.uniform(key_explore) < epsilon
    action = jnp.where(
        explore, jax.random.randint(key_random, (), 0, NUM_ACTIONS), jnp.argmax(values)
    ).astype(jnp.int32)
    outcome = step_rewards(rewards, problem.poisonous[index], action, bad_outcome)
    buffer = state.buffer.add(index, action, outcome["reward"])
    state = AgentState(params=state.params, opt_state=state.opt_state, buffer=buffer)
    return state, {"action": action, **{k: outcome[k] for k in _OUTCOMES}}


_OUTCOMES = ("reward", "regret", "expected_regret")


def run_chunk(
    learner: Learner,
    rewards: Rewards,
    problem: Problem,
    states: AgentState,
    start: jax.Array,
    num_steps: int,
    update_every: int,
    env_keys: jax.Array,
    agent_keys: jax.Array,
    epsilons: jax.Array,
) -> tuple[AgentState, dict[str, jax.Array]]:
    """Interactions [start, start + num_steps) of a stack of A agents of one kind.

    A `lax.scan` over rounds; a round is `update_every` interactions (1 in the paper) followed
    by the learner's `num_updates` gradient steps. The agents are `vmap`ped; nothing returns to
    the host inside a chunk.

    Args:
      learner: the agents' kind.
      rewards: the reward table.
      problem: the bandit.
      states: the agents' states, each leaf with a leading axis [A].
      start: the first interaction number (a multiple of `update_every`).
      num_steps: L, the chunk's length (static, a multiple of `update_every`).
      update_every: interactions per round (static).
      env_keys: [A] environment keys (agents of one seed share theirs).
      agent_keys: [A] agent keys.
      epsilons: float32 [A].

    Returns:
      (states, metrics): `action`, `reward`, `regret`, `expected_regret` [L, A], and the last
      update of each round's `loss`, `nll`, `kl`, `sigma_mean` [L / update_every, A].
    """

    def agent_round(state, t0, env_key, agent_key, epsilon):
        act_key, update_key = jax.random.split(agent_key)

        def step(state, t):
            return interact(learner, rewards, problem, state, t, env_key, act_key, epsilon)

        state, outcomes = jax.lax.scan(step, state, t0 + jnp.arange(update_every))
        state, metrics = learner.update(state, problem.contexts, jax.random.fold_in(update_key, t0))
        return state, (outcomes, metrics)

    round_fn = jax.vmap(agent_round, in_axes=(0, None, 0, 0, 0))

    def body(states, t0):
        return round_fn(states, t0, env_keys, agent_keys, epsilons)

    starts = start + update_every * jnp.arange(num_steps // update_every)
    states, (outcomes, metrics) = jax.lax.scan(body, states, starts)
    # outcomes: [rounds, A, update_every] -> [L, A]
    outcomes = jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(x, 1, 2).reshape(num_steps, x.shape[1]), outcomes
    )
    return states, {**outcomes, **metrics}


# Building the agents from a config --------------------------------------------------------


def stack_sizes(config: ml_collections.ConfigDict) -> list[int]:
    """The rows of each kind's stack of agents (agents × seeds), Bayes by Backprop's first."""
    thompson = [config.num_seeds] if config.agents.thompson else []
    return thompson + (
        [len(config.agents.epsilons) * config.num_seeds] * bool(config.agents.epsilons)
    )


def request_cpu_devices(config: ml_collections.ConfigDict, cores: int | None = None) -> int | None:
    """Asks JAX for a CPU device per core (at most as many as the largest stack of agents), so
    that the agents' chunks run on all the cores at once.

    Each update of the paper's schedule is hundreds of small ops (64 × 119 matmuls, Adam on
    ~22k weights), which one program cannot spread over two cores; on several CPU devices each
    kind's stack of agents is split over them (`agent_shardings`), with the results of one
    device up to rounding.
    Called by scripts/bandit.py before JAX starts its backend, on any platform: the count is
    the CPU backend's alone, so on a GPU or TPU the agents stay on the accelerators
    (`jax.local_devices()`). A device count the user set
    (`XLA_FLAGS=--xla_force_host_platform_device_count`, `JAX_NUM_CPU_DEVICES`) is kept.

    Args:
      config: the bandit config.
      cores: the cores to use; None counts those this process may run on.

    Returns:
      The device count asked for, or None where nothing was changed (already set, or too late:
      JAX's backend had started).
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    if jax.config.jax_num_cpu_devices != -1:
        return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = max(1, min(cores or 1, max(stack_sizes(config), default=1)))
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # The backend has started: the devices are what they are.
        return None
    return count


def agent_shardings(rows: int, kind: int) -> tuple[jax.sharding.Sharding, jax.sharding.Sharding]:
    """Where a kind's stack of `rows` agents lives, and where the data its chunks read lives.

    The agents never exchange anything, so the stack is split over as many local devices as
    divide `rows` evenly: each device runs its share of every chunk, all at the same time,
    and every kind is spread over the same devices (Bayes by Backprop's 2 seeds and the six
    ε-greedy agents over two CPU devices: one seed and three agents on each). Where no split
    works, kind k sits on device k (mod the count), so two kinds still run at once.

    Args:
      rows: the stack's size (agents × seeds).
      kind: the kind's index (0 for Bayes by Backprop where it runs).

    Returns:
      (the stack's sharding, along its leading axis; the replicated sharding of the data).
    """
    devices = jax.local_devices()
    split = max(n for n in range(1, len(devices) + 1) if rows % n == 0)
    if split == 1:
        device = jax.sharding.SingleDeviceSharding(devices[kind % len(devices)])
        return device, device
    mesh = jax.sharding.Mesh(np.asarray(devices[:split]), ("agents",))
    return (
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("agents")),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a bandit run needs, built and checked from its config before any compute.

    Attributes:
      config: the config.
      rewards: the reward table.
      thompson: Bayes by Backprop with Thompson sampling (None if `agents.thompson` is off).
      greedy: the ε-greedy point-estimate learner (None if `agents.epsilons` is empty).
      epsilons: the ε of each ε-greedy agent.
    """

    config: ml_collections.ConfigDict
    rewards: Rewards
    thompson: Learner | None
    greedy: Learner | None
    epsilons: tuple[float, ...]

    def agent_names(self) -> list[str]:
        """Display names, Bayes by Backprop first: "BBB (Thompson)", "ε-greedy 5%", ..."""
        names = ["BBB (Thompson)"] if self.thompson is not None else []
        return names + [f"ε-greedy {100 * e:g}%" for e in self.epsilons]


def _make_learner(config: ml_collections.ConfigDict, model: nn.Module, bayesian: bool) -> Learner:
    likelihood = objective_lib.make_likelihood(config.likelihood)
    if bayesian:
        prior = make_prior(config.prior)
        num_samples, kl = config.objective.num_samples, config.objective.kl
    else:
        prior, num_samples, kl = make_prior({"name": "flat"}), 1, "mc"
    free_energy = objective_lib.FreeEnergy(
        model=model,
        prior=prior,
        likelihood=likelihood,
        num_train=1,  # With num_batches = 1 and KL weight 1/n_t: KL/n_t − mean log-likelihood.
        num_batches=1,
        num_samples=num_samples,
        kl=kl,
        temperature=config.objective.kl_temperature,
    )
    check_positive("optim.learning_rate", config.optim.learning_rate)
    optimizer = base_optimizer(config.optim, config.optim.learning_rate)
    return Learner(
        model=model,
        free_energy=free_energy,
        optimizer=optimizer,
        num_updates=config.num_updates,
        batch_size=config.batch_size,
        thompson=bayesian,
        kl_data_size=config.objective.kl_data_size,
    )


def build(config: ml_collections.ConfigDict) -> Experiment:
    """Checks `config` and builds the agents, before any data is read or anything is computed.

    Args:
      config: a bandit config (configs/bandit_mushroom.py).

    Returns:
      The `Experiment`.

    Raises:
      ConfigError: naming the first bad field.
    """
    check_seed("seed", config.seed)
    for field in ("num_steps", "num_seeds", "buffer_size", "num_updates", "batch_size"):
        check_positive(field, config[field], integer=True)
    for field in ("chunk_steps", "update_every", "checkpoint_every_chunks"):
        check_positive(field, config[field], integer=True)
    if config.num_steps % config.update_every or config.chunk_steps % config.update_every:
        raise ConfigError(
            "update_every",
            config.update_every,
            f"a divisor of num_steps ({config.num_steps}) and chunk_steps ({config.chunk_steps})",
        )
    if config.num_steps % config.chunk_steps:
        raise ConfigError(
            "chunk_steps", config.chunk_steps, f"a divisor of num_steps ({config.num_steps})"
        )
    check_positive("rewards.edible", config.rewards.edible)
    for field in ("poisonous_bad", "poisonous_good"):
        value = config.rewards[field]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(f"rewards.{field}", value, "a finite number")
    check_probability("rewards.poisonous_bad_probability", config.rewards.poisonous_bad_probability)
    rewards = Rewards(
        edible=float(config.rewards.edible),
        poisonous_bad=float(config.rewards.poisonous_bad),
        poisonous_good=float(config.rewards.poisonous_good),
        poisonous_bad_probability=float(config.rewards.poisonous_bad_probability),
    )
    epsilons = tuple(config.agents.epsilons)
    for i, epsilon in enumerate(epsilons):
        check_probability(f"agents.epsilons[{i}]", epsilon)
    names = [f"{100 * e:g}%" for e in epsilons]  # As the agents are named in the results.
    if len(set(names)) != len(names):
        raise ConfigError(
            "agents.epsilons", epsilons, "distinct values (each agent's results go by its ε)"
        )
    if not isinstance(config.agents.thompson, bool):
        raise ConfigError("agents.thompson", config.agents.thompson, "True or False")
    if not epsilons and not config.agents.thompson:
        raise ConfigError("agents.epsilons", epsilons, "at least one ε when agents.thompson=False")
    check_choice("model.name", config.model.name, ("mlp",))  # f(context, one-hot action).
    if config.model.num_outputs != 1:
        raise ConfigError("model.num_outputs", config.model.num_outputs, "1 (the expected reward)")
    check_choice("posterior.noise", config.posterior.noise, posterior_lib.NOISE_GENERATORS)
    check_positive("posterior.mu_scale", config.posterior.mu_scale)
    check_in_range("posterior.init_rho", config.posterior.init_rho, -30, 30)
    check_choice("likelihood.name", config.likelihood.name, ("gaussian",))
    check_non_negative("objective.kl_temperature", config.objective.kl_temperature)
    check_choice("objective.kl_data_size", config.objective.kl_data_size, KL_DATA_SIZES)
    model = make_model(config.model)
    thompson = _make_learner(config, model, bayesian=True) if config.agents.thompson else None
    greedy = _make_learner(config, model, bayesian=False) if epsilons else None
    return Experiment(
        config=config,
        rewards=rewards,
        thompson=thompson,
        greedy=greedy,
        epsilons=tuple(float(e) for e in epsilons),
    )


def init_agent(
    experiment: Experiment, learner: Learner, key: jax.Array, bayesian: bool, num_features: int
) -> AgentState:
    """A fresh agent: the model's own initial weights (μ₀ for Bayes by Backprop), empty buffer.

    Args:
      experiment: from `build`.
      learner: the agent's kind.
      key: the init key (agents of one seed share it, so they start from the same weights).
      bayesian: a mean-field posterior (True) or a point estimate.
      num_features: F, the width of a context (the network's input is F + 2 wide).

    Returns:
      The `AgentState`.
    """
    config = experiment.config
    key_model, key_rho = jax.random.split(key)
    params = learner.model.init(key_model, jnp.zeros((1, num_features + NUM_ACTIONS), jnp.float32))
    params = params["params"]
    if bayesian:
        posterior = posterior_lib.init_posterior(
            key_rho,
            params,
            float(config.posterior.init_rho),
            mu_scale=config.posterior.mu_scale,
            noise=config.posterior.noise,
        )
    else:
        posterior = posterior_lib.PointEstimate(mu=params)
    trained = learner.free_energy.init_params(posterior)
    return AgentState(
        params=trained,
        opt_state=learner.optimizer.init(trained),
        buffer=Buffer.empty(config.buffer_size),
    )


# The experiment ---------------------------------------------------------------------------


def load_problem(config: ml_collections.ConfigDict) -> Problem:
    """The mushroom bandit of `config.data` (a path, or a fetch when the path is empty).

    Args:
      config: the run's config.

    Returns:
      The `Problem`, in device memory.

    Raises:
      DataError: the file is missing, unreadable or not the UCI file.
    """
    from bbb.data import mushroom

    path = mushroom.resolve_path(config.data.path, config.data.cache_dir)
    data = mushroom.load_mushroom(path)
    return Problem(contexts=jnp.asarray(data.features), poisonous=jnp.asarray(data.poisonous))


@dataclasses.dataclass
class _Family:
    """The stacked agents of one kind and their compiled chunk."""

    names: list[str]
    learner: Learner
    states: AgentState
    env_keys: jax.Array
    agent_keys: jax.Array
    epsilons: jax.Array
    chunk: Callable


def _families(experiment: Experiment, problem: Problem) -> list[_Family]:
    config = experiment.config
    seeds = config.num_seeds
    root = jax.random.key(config.seed)
    init_root, env_root, agent_root = jax.random.split(root, 3)
    seed_ids = jnp.arange(seeds)
    init_keys = jax.vmap(lambda s: jax.random.fold_in(init_root, s))(seed_ids)  # [S]
    env_keys = jax.vmap(lambda s: jax.random.fold_in(env_root, s))(seed_ids)  # [S]
    kinds = []
    if experiment.thompson is not None:
        kinds.append((experiment.thompson, [experiment.agent_names()[0]], [0.0], True))
    if experiment.greedy is not None:
        names = experiment.agent_names()[-len(experiment.epsilons) :]
        kinds.append((experiment.greedy, names, list(experiment.epsilons), False))
    families, agent_index = [], 0
    # Each kind's stack split over the devices (`agent_shardings`): on a CPU whose cores the
    # small ops of one program cannot fill, the CPU devices scripts/bandit.py asks for run
    # their shares of every chunk at once.
    for kind, (learner, names, epsilons, bayesian) in enumerate(kinds):
        count = len(names)
        stack, replicated = agent_shardings(count * seeds, kind)
        problem_here = jax.device_put(problem, replicated)
        # Agent a of seed s sits at row a * S + s of the stack.
        states = jax.jit(
            jax.vmap(
                lambda k, learner=learner, b=bayesian: init_agent(
                    experiment, learner, k, b, int(problem.contexts.shape[1])
                )
            )
        )(jnp.tile(init_keys, count))
        states = jax.device_put(states, stack)
        agent_ids = jnp.repeat(agent_index + jnp.arange(count), seeds)
        agent_keys = jax.vmap(
            lambda a, s: jax.random.fold_in(jax.random.fold_in(agent_root, a), s)
        )(agent_ids, jnp.tile(seed_ids, count))
        chunk = jax.jit(
            lambda states, start, ek, ak, eps, learner=learner, problem=problem_here: run_chunk(
                learner,
                experiment.rewards,
                problem,
                states,
                start,
                config.chunk_steps,
                config.update_every,
                ek,
                ak,
                eps,
            ),
            donate_argnums=0,
        )
        families.append(
            _Family(
                names=names,
                learner=learner,
                states=states,
                env_keys=jax.device_put(jnp.tile(env_keys, count), stack),
                agent_keys=jax.device_put(agent_keys, stack),
                epsilons=jax.device_put(
                    jnp.repeat(jnp.asarray(epsilons, jnp.float32), seeds), stack
                ),
                chunk=chunk,
            )
        )
        agent_index += count
    return families


def summarize(
    names: list[str],
    regret: np.ndarray,
    expected_regret: np.ndarray,
    actions: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Cumulative regret at the last step per agent: mean and std over seeds, and per seed.

    The regret per step over the second half of the run (its last ⌈T/2⌉ interactions) tells an
    agent's rate once it has learnt from the cost of its start, which dominates the total on
    some seeds (README, "Contextual bandit"). With the actions, also what the regret is made
    of: the agent's meals that the oracle would have passed (poisonous mushrooms, under the
    paper's rewards) and its passes where the oracle would have eaten (edible ones), told
    apart by the expected regret, which is 0 exactly when the agent acts as the oracle does.

    Args:
      names: the agents' names [A].
      regret: realised per-step regret [A, S, T].
      expected_regret: expected per-step regret [A, S, T].
      actions: the actions [A, S, T] (`EAT` or `PASS`), or None.

    Returns:
      name → {"cumulative_regret_mean", "..._std", "..._per_seed", the same for the expected
      regret, and "second_half_regret_per_step_per_seed"}; with `actions`, also
      "eat_fraction", "wrong_meals_per_seed" and "wrong_passes_per_seed".
    """
    out = {}
    half = regret.shape[-1] // 2
    if actions is not None:
        wrong = expected_regret > 0
        wrong_meals = (wrong & (actions == EAT)).sum(axis=-1)  # [A, S]
        wrong_passes = (wrong & (actions == PASS)).sum(axis=-1)
    for i, name in enumerate(names):
        total = regret[i].sum(axis=-1)  # [S]
        expected_total = expected_regret[i].sum(axis=-1)  # [S]
        second_half = regret[i][:, half:].mean(axis=-1)  # [S]
        out[name] = {
            "cumulative_regret_mean": float(total.mean()),
            "cumulative_regret_std": float(total.std()),
            "cumulative_regret_per_seed": [float(v) for v in total],
            "cumulative_expected_regret_mean": float(expected_total.mean()),
            "cumulative_expected_regret_std": float(expected_total.std()),
            "cumulative_expected_regret_per_seed": [float(v) for v in expected_total],
            "second_half_regret_per_step_per_seed": [float(v) for v in second_half],
        }
        if actions is not None:
            out[name]["eat_fraction"] = float((actions[i] == EAT).mean())
            out[name]["wrong_meals_per_seed"] = [int(v) for v in wrong_meals[i]]
            out[name]["wrong_passes_per_seed"] = [int(v) for v in wrong_passes[i]]
    return out


def plot_regret(
    path: str,
    names: list[str],
    regret: np.ndarray | Sequence[np.ndarray],
    expected: np.ndarray | Sequence[np.ndarray],
) -> None:
    """Cumulative regret curves, mean ± std over seeds, realised and expected (as Figure 6).

    Args:
      path: the PNG file.
      names: the agents' names [A].
      regret: realised per-step regret [A, S, T], or per agent [S_a, T] (pooled runs, in which
        agents may have run on different numbers of seeds; the legend then gives each one's).
      expected: expected per-step regret, the same shapes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = {len(r) for r in regret}
    over = f"{len(regret[0])} seeds" if len(seeds) == 1 else "seeds"
    steps = np.arange(1, regret[0].shape[-1] + 1)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, values, title in (
        (axes[0], regret, "cumulative regret"),
        (axes[1], expected, "cumulative expected regret"),
    ):
        for i, name in enumerate(names):
            curves = np.cumsum(values[i], axis=-1)  # [S, T]
            mean, std = curves.mean(0), curves.std(0)
            label = name if len(seeds) == 1 else f"{name} ({len(curves)} seeds)"
            ax.plot(steps, mean, label=label, color=f"C{i}")
            ax.fill_between(steps, mean - std, mean + std, color=f"C{i}", alpha=0.2, lw=0)
        ax.set_xlabel("interaction")
        ax.set_title(f"{title} (mean ± std over {over})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("regret")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_table(summary: dict[str, dict[str, Any]], num_steps: int, num_seeds: int) -> str:
    """The results as a Markdown table (with the wrong meals and passes where `summarize` was
    given the actions)."""
    mistakes = all("wrong_meals_per_seed" in row for row in summary.values())
    lines = [
        f"Cumulative regret at {num_steps:,} interactions, mean ± std over {num_seeds} seeds, "
        "per seed, and regret per step over the second half of the run, per seed"
        + (
            "; wrong meals (eaten where the oracle passes) and wrong passes (passed where "
            "it eats), per seed."
            if mistakes
            else "."
        ),
        "",
        "| agent | cumulative regret | cumulative expected regret | per seed "
        "| regret per step, second half |" + (" wrong meals | wrong passes |" if mistakes else ""),
        "|---|---:|---:|---|---|" + ("---|---|" if mistakes else ""),
    ]
    for name, row in summary.items():
        per_seed = ", ".join(f"{v:.0f}" for v in row["cumulative_regret_per_seed"])
        rate = ", ".join(f"{v:.3f}" for v in row["second_half_regret_per_step_per_seed"])
        line = (
            f"| {name} | {row['cumulative_regret_mean']:.0f} ± {row['cumulative_regret_std']:.0f}"
            f" | {row['cumulative_expected_regret_mean']:.0f} ± "
            f"{row['cumulative_expected_regret_std']:.0f} | {per_seed} | {rate} |"
        )
        if mistakes:
            meals = ", ".join(str(v) for v in row["wrong_meals_per_seed"])
            passes = ", ".join(str(v) for v in row["wrong_passes_per_seed"])
            line += f" {meals} | {passes} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


# Pooling finished runs -----------------------------------------------------------------------

# Fields the config gained after runs were made, and what those runs did: resuming or pooling
# such a run compares it as if it had saved these values.
ADDED_FIELDS = {"optim.name": "adam", "optim.momentum": 0.9}

REFERENCE_AGENT = "BBB (Thompson)"
# Config fields that do not change what an agent meets or does: where the data are, how the
# run logs and checkpoints, which agents ran beside it, and the seeds themselves. (An agent's
# acting and update keys depend on the root seed, the seed's index and the agent's position in
# the run's list of agents: pooling two runs that hold one agent at different positions on a
# shared seed is refused, since their records of that agent disagree.)
_POOL_IGNORED = ("seed", "num_seeds", "progress", "chunk_steps", "checkpoint_every_chunks")
_POOL_IGNORED_PREFIXES = ("agents.", "data.")


AGENT_KINDS = ("thompson", "greedy")  # Bayes by Backprop; the ε-greedy agents.


def _agent_kind(name: str) -> str:
    return "thompson" if name == REFERENCE_AGENT else "greedy"


def pool_runs(workdirs: list[str]) -> dict[str, Any]:
    """The per-seed results of several finished runs, pooled by agent and seed.

    A seed is (config.seed, the seed's index in its run): the mushrooms and coin flips of a seed
    are the same for every agent of every run of it (`_families`), so agents are compared in
    pairs on the same interactions. An agent that ran on the same seed in two runs (ε-greedy
    beside two configurations of Bayes by Backprop) is kept once if the two agree exactly.
    A workdir written `path:greedy` (or `path:thompson`) gives only those agents: the ε-greedy
    agents of a run whose Bayes by Backprop had other settings.

    Args:
      workdirs: finished runs of `bandit_experiment` (their `config.json` and `regret.npz`),
        each optionally with `:greedy` or `:thompson`.

    Returns:
      {"workdirs", "num_steps", "agents": {name: {(root seed, index): {"total",
      "expected_total", "second_half"}}}, "curves": {name: {(root seed, index): (regret,
      expected regret), per step [T] each}}, "differences": {field: [value per run]}} where
      `differences` lists the config fields (but seeds, agents, data and logging) that differ
      between the runs.

    Raises:
      ConfigError: a workdir holds no finished run, runs differ in length, or the same agent
        on the same seed gave different results (runs of different configurations).
    """
    if not workdirs:
        raise ConfigError("workdirs", workdirs, "one or more finished bandit runs")
    agents: dict[str, dict[tuple[int, int], dict[str, float]]] = {}
    curves: dict[str, dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]] = {}
    origin: dict[tuple[str, tuple[int, int]], str] = {}
    configs, steps = [], None
    for entry in workdirs:
        workdir, _, kind = entry.rpartition(":")
        if kind not in AGENT_KINDS:
            workdir, kind = entry, None
        paths = [os.path.join(workdir, f) for f in ("config.json", "regret.npz")]
        if not all(os.path.exists(path) for path in paths):
            raise ConfigError("workdirs", workdir, "a finished run (config.json and regret.npz)")
        with open(paths[0]) as f:
            config = json.load(f)
        configs.append(with_added_fields(flatten_config(config), ADDED_FIELDS))
        with np.load(paths[1]) as record:
            names = [str(n) for n in record["names"]]
            regret, expected = record["regret"], record["expected_regret"]
        if steps not in (None, regret.shape[-1]):
            raise ConfigError("workdirs", workdir, f"runs of one length ({steps} interactions)")
        steps = regret.shape[-1]
        summary = summarize(names, regret, expected)
        for name, row in summary.items():
            if kind is not None and _agent_kind(name) != kind:
                continue
            for index, total in enumerate(row["cumulative_regret_per_seed"]):
                key = (int(config["seed"]), index)
                result = {
                    "total": total,
                    "expected_total": row["cumulative_expected_regret_per_seed"][index],
                    "second_half": row["second_half_regret_per_step_per_seed"][index],
                }
                known = agents.setdefault(name, {}).get(key)
                if known is not None and known != result:
                    raise ConfigError(
                        "workdirs",
                        workdir,
                        f"runs that agree where they overlap: {name} on seed {key} has regret "
                        f"{known['total']:.0f} in {origin[(name, key)]} and {total:.0f} in "
                        f"{entry}",
                    )
                agents[name][key] = result
                a = names.index(name)
                curves.setdefault(name, {})[key] = (regret[a, index], expected[a, index])
                origin.setdefault((name, key), entry)
    fields = sorted(set().union(*configs))
    differences = {
        field: [c.get(field) for c in configs]
        for field in fields
        if field not in _POOL_IGNORED
        and not field.startswith(_POOL_IGNORED_PREFIXES)
        and len({json.dumps(c.get(field)) for c in configs}) > 1
    }
    return {
        "workdirs": list(workdirs),
        "num_steps": steps,
        "agents": {name: dict(sorted(rows.items())) for name, rows in agents.items()},
        "curves": {name: dict(sorted(rows.items())) for name, rows in curves.items()},
        "differences": differences,
    }


def plot_pooled(path: str, pooled: dict[str, Any]) -> None:
    """`plot_regret` of pooled runs (`pool_runs`): each agent over every seed it ran."""
    names = list(pooled["curves"])
    per_agent = [list(pooled["curves"][name].values()) for name in names]
    regret = [np.stack([r for r, _ in rows]) for rows in per_agent]
    expected = [np.stack([e for _, e in rows]) for rows in per_agent]
    plot_regret(path, names, regret, expected)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a split at least this uneven | each side ½), ties dropped."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def pooled_table(pooled: dict[str, Any], reference: str = REFERENCE_AGENT) -> str:
    """The pooled results as Markdown: each agent over its seeds, then each against `reference`.

    The comparison counts, over the seeds both ran, those where `reference` had the lower
    cumulative regret, with the two-sided sign test's p-value and the mean difference.
    """
    steps = pooled["num_steps"]
    lines = [
        f"Pooled from {len(pooled['workdirs'])} runs ({', '.join(pooled['workdirs'])}): "
        f"cumulative regret at {steps:,} interactions, per seed (config seed / index).",
        "",
        "| agent | seeds | mean ± std | per seed | mean regret per step, second half |",
        "|---|--:|---:|---|--:|",
    ]
    for name, rows in pooled["agents"].items():
        totals = np.array([r["total"] for r in rows.values()])
        per_seed = ", ".join(f"{k[0]}/{k[1]}: {r['total']:.0f}" for k, r in rows.items())
        rate = np.mean([r["second_half"] for r in rows.values()])
        lines.append(
            f"| {name} | {len(rows)} | {totals.mean():.0f} ± {totals.std():.0f} | {per_seed} "
            f"| {rate:.3f} |"
        )
    ours = pooled["agents"].get(reference)
    if ours:
        lines += [
            "",
            f"{reference} against each agent, on the seeds both ran:",
            "",
            f"| agent | seeds | {reference} lower | sign test p | mean difference (agent − "
            f"{reference}) |",
            "|---|--:|--:|--:|--:|",
        ]
        for name, rows in pooled["agents"].items():
            common = [k for k in rows if k in ours and name != reference]
            if not common:
                continue
            diffs = np.array([rows[k]["total"] - ours[k]["total"] for k in common])
            wins, losses = int((diffs > 0).sum()), int((diffs < 0).sum())
            lines.append(
                f"| {name} | {len(common)} | {wins} of {len(common)} | "
                f"{sign_test(wins, losses):.3g} | {diffs.mean():+.0f} |"
            )
    if pooled["differences"]:
        lines += ["", "The runs' configs differ in (one value per run, in order):", ""]
        for field, values in pooled["differences"].items():
            lines.append(f"- `{field}`: " + ", ".join(json.dumps(v) for v in values))
    return "\n".join(lines) + "\n"


# Fields that may change when a run resumes: its length (a finished run can be extended) and
# the logging and checkpoint cadence. Anything else would change the run's trajectory.
RESUMABLE_FIELDS = ("num_steps", "progress", "checkpoint_every_chunks")
_PER_STEP = {"regret": np.float32, "expected_regret": np.float32, "action": np.int8}


def _checkpoint_target(families: list[_Family], num_agents: int, seeds: int, steps: int) -> dict:
    """What a checkpoint holds: every family's agents and the per-step record [A, S, steps]."""
    return {
        "states": [family.states for family in families],
        "per_step": {k: np.zeros((num_agents, seeds, steps), t) for k, t in _PER_STEP.items()},
    }


def bandit_experiment(
    config: ml_collections.ConfigDict,
    workdir: str,
    problem: Problem | None = None,
    *,
    stop_after_chunks: int | None = None,
) -> dict[str, Any] | None:
    """Runs every agent over every seed and writes the curves, table and config to `workdir`.

    Writes `config.json`, `metrics.jsonl` (one line per chunk: mean cumulative regret per agent
    and the last update's loss), `regret.npz` (per-step regret [agent, seed, step]),
    `plots/regret.png`, `results.md` and `results.json`, and Orbax checkpoints in
    `checkpoints/` (every `checkpoint_every_chunks` chunks, at the end, and on SIGTERM).

    Starting on a workdir that holds a checkpoint resumes from it, with the same results as an
    uninterrupted run: every random stream is a function of the seed and the interaction number.
    `num_steps` may be raised to extend a finished run.

    Args:
      config: configs/bandit_mushroom.py.
      workdir: the output folder.
      problem: a ready bandit (tests); None loads `config.data`.
      stop_after_chunks: stop (with a checkpoint) after this many chunks of this session, as a
        pre-empted job would; the next start resumes. None runs to `config.num_steps`.

    Returns:
      The contents of results.json (None if stopped early).

    Raises:
      ConfigError, DataError, WorkdirError: before anything is computed or written.
      TrainingDivergedError: a loss became NaN or Inf.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from bbb.train import PreemptionWatcher, TrainingDivergedError
    from bbb.workdir import (
        WorkdirError,
        check_workdir,
        read_records,
        restore_state_and_json,
        write_text_atomically,
    )

    check_workdir(workdir, config, resumable=RESUMABLE_FIELDS, added=ADDED_FIELDS)
    experiment = build(config)
    checkpoint_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if os.path.exists(os.path.join(workdir, "results.json")) and not os.path.isdir(checkpoint_dir):
        raise WorkdirError(
            f"workdir {workdir} holds a finished bandit run without checkpoints (made before "
            "runs could resume); it is left as it is: choose a new --workdir."
        )
    if problem is None:
        problem = load_problem(config)  # A bad data path fails before the workdir is touched.
    seeds, steps, chunk = config.num_seeds, config.num_steps, config.chunk_steps
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    manager = ocp.CheckpointManager(
        checkpoint_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )
    done = manager.latest_step() or 0
    if done > steps:
        manager.close()
        raise ConfigError(
            "num_steps", steps, f"at least {done}, the interactions done in {workdir}"
        )
    started = time.time()
    families = _families(experiment, problem)
    names = [name for family in families for name in family.names]
    timing = {"wall_time_s": 0.0, "first_chunk_s": None, "timed_s": 0.0, "timed_updates": 0}
    per_step = {k: [np.zeros((len(names), seeds, 0), t)] for k, t in _PER_STEP.items()}
    if done:
        target = _checkpoint_target(families, len(names), seeds, done)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        restored, timing = restore_state_and_json(manager, done, abstract, "timing")
        for family, states in zip(families, restored["states"], strict=True):
            family.states = states
        per_step = {k: [np.asarray(v)] for k, v in restored["per_step"].items()}
    # Only now, the checkpoint read: a start that fails to read it leaves the saved config (and
    # with it the run's own num_steps) as it was.
    write_text_atomically(
        os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2, sort_keys=True)
    )
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    kept = []
    if done and os.path.exists(metrics_path):  # A resumed run redoes the lines after `done`.
        kept = [r for r in read_records(metrics_path) if r["step"] <= done]
    write_text_atomically(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def save(step: int) -> None:
        history = {k: np.concatenate(v, axis=-1) for k, v in per_step.items()}
        per_step.update({k: [v] for k, v in history.items()})
        tree = {"states": [family.states for family in families], "per_step": history}
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), timing=ocp.args.JsonSave(timing)
            ),
        )
        manager.wait_until_finished()

    totals = per_step["regret"][0].sum(axis=-1).astype(np.float64)  # [A, S]
    bar = tqdm(
        total=steps, initial=done, unit="step", disable=not config.progress, dynamic_ncols=True
    )
    chunks_done, last_time = 0, started  # The first chunk's time includes the set-up.
    with PreemptionWatcher() as preemption:
        for start in range(done, steps, chunk):
            outputs = []
            # Dispatched asynchronously, every family's chunk runs before we wait. An argument
            # on another device would break that: its copy waits for the chunk running there,
            # and the kinds would run one after the other (as a jnp `start` on the default
            # device did until 2026-11-30). So `start` goes as a NumPy scalar, straight to each
            # family's devices, and a copy between devices is an error.
            with jax.transfer_guard_device_to_device("disallow"):
                for family in families:
                    family.states, metrics = family.chunk(
                        family.states,
                        np.int32(start),
                        family.env_keys,
                        family.agent_keys,
                        family.epsilons,
                    )
                    outputs.append(metrics)
            record = {"step": start + chunk}
            rows = []
            for family, metrics in zip(families, outputs, strict=True):
                metrics = jax.device_get(metrics)
                count = len(family.names)
                for key, dtype in _PER_STEP.items():
                    # [L, count * S] -> [count, S, L]
                    value = np.moveaxis(metrics[key], 0, -1).reshape(count, seeds, -1)
                    rows.append((key, value.astype(dtype)))
                loss = metrics["loss"]
                if not np.all(np.isfinite(loss)):
                    raise TrainingDivergedError(
                        f"the loss of {family.names} became NaN or Inf before step {start + chunk}."
                    )
                for i, name in enumerate(family.names):
                    record[f"{name}/loss"] = float(loss[-1, i * seeds : (i + 1) * seeds].mean())
                    if family.learner.thompson:
                        sigma = metrics["sigma_mean"][-1, i * seeds : (i + 1) * seeds]
                        record[f"{name}/sigma_mean"] = float(sigma.mean())
            for key in per_step:
                per_step[key].append(np.concatenate([r for k, r in rows if k == key], axis=0))
            totals += per_step["regret"][-1].sum(axis=-1)
            for i, name in enumerate(names):
                record[f"{name}/cumulative_regret"] = float(totals[i].mean())
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            now = time.time()
            if chunks_done == 0:  # This session's first chunk includes compilation.
                timing["first_chunk_s"] = timing["first_chunk_s"] or now - started
            else:
                timing["timed_s"] += now - last_time
                timing["timed_updates"] += chunk // config.update_every * config.num_updates
            timing["wall_time_s"] += now - last_time
            chunks_done, last_time = chunks_done + 1, now
            bar.set_postfix(
                {name.split(" ")[-1]: f"{totals[i].mean():.0f}" for i, name in enumerate(names)},
                refresh=False,
            )
            bar.update(chunk)
            last = start + chunk == steps
            interrupted = bool(preemption.requested) or (
                stop_after_chunks is not None and chunks_done >= stop_after_chunks
            )
            if (
                (start + chunk) // chunk % config.checkpoint_every_chunks == 0
                or last
                or interrupted
            ):
                save(start + chunk)
            if interrupted and not last:
                bar.close()
                manager.close()
                if preemption.requested:
                    print(
                        f"Pre-empted ({preemption.requested}) after {start + chunk} interactions: "
                        f"checkpoint saved in {checkpoint_dir}. Run the same command to resume."
                    )
                return None
    bar.close()
    manager.close()  # A finished run started again only rewrites its outputs from the checkpoint.

    regret = np.concatenate(per_step["regret"], axis=-1)  # [A, S, T]
    expected = np.concatenate(per_step["expected_regret"], axis=-1)
    actions = np.concatenate(per_step["action"], axis=-1)
    # Through a temporary file and a rename: pooling takes config.json + regret.npz as a finished
    # run, so a kill mid-write must not leave half a file.
    temporary = os.path.join(workdir, f".regret.{os.getpid()}.npz")
    np.savez_compressed(
        temporary, names=np.asarray(names), regret=regret, expected_regret=expected, action=actions
    )
    os.replace(temporary, os.path.join(workdir, "regret.npz"))
    summary = summarize(names, regret, expected, actions)
    plot_regret(os.path.join(workdir, "plots", "regret.png"), names, regret, expected)
    results = {
        "num_steps": steps,
        "num_seeds": seeds,
        "agents": summary,
        "wall_time_s": timing["wall_time_s"],
        "first_chunk_s": timing["first_chunk_s"],
        "gradient_steps_per_agent": steps // config.update_every * config.num_updates,
        "seconds_per_gradient_step_all_agents": timing["timed_s"] / timing["timed_updates"]
        if timing["timed_updates"]
        else None,
    }
    write_text_atomically(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
    table = results_table(summary, steps, seeds)
    agents = f"{len(names)} agent{'s' if len(names) != 1 else ''}"
    table += f"\nWall time {timing['wall_time_s']:.0f} s ({agents} × {seeds} seeds).\n"
    write_text_atomically(os.path.join(workdir, "results.md"), table)
    if config.progress:
        print(table)
    return results
