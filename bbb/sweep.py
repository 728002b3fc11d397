"""Sweeps: a config file's `get_sweep()` run member by member, or vectorised with `jax.vmap`.

A sweep is a list of dicts of dotted overrides (`{"prior.pi": 0.5, "prior.sigma1": 1.0}`), each
applied to the base config with `ConfigDict.update_from_flattened_dict`. Every member gets its
own sub-workdir, named from its overrides, holding an ordinary run (config.json, metrics.jsonl,
checkpoints, summary.json), so one member can be resumed, evaluated or pruned like any run.

- One by one: `train.train_and_evaluate` per member; finished members (summary.json) are
  skipped, interrupted ones resume from their checkpoints.
- Across machines: `member=i` runs member i only (a job array's task), and `collect` builds
  the table from whatever members have finished.
- Vectorised: the members that differ only in numeric hyperparameters (`VECTORIZABLE_FIELDS`:
  seed, prior π and σ's, learning rate, KL temperature) train as ONE jitted program,
  `jax.vmap` over a leading member axis of the train state. What varies is passed as traced
  values (`MemberHyperparameters`): the learning rate as a per-member scale of the optimiser's
  updates, the KL temperature as a factor on the KL weight, the prior's hyperparameters through
  the trainable-hyperparameter form of the prior (bbb/priors.py, `learnable=True`) with their
  gradient stopped. Each member's results equal its one-by-one run to float tolerance
  (tests/test_sweep.py). The member axis is split over the local devices, whole members per
  device (`_MemberLayout`). The paper tuned its priors with such a grid (Blundell et al. 2015,
  §5.1: π ∈ {1/4, 1/2, 3/4}, −log σ1 ∈ {0, 1, 2}, −log σ2 ∈ {6, 7, 8}).

The table (results.csv, results.md, results.png in the sweep workdir) lists the members best
validation figure first, with the test figure at the best-validation epoch: the test set never
chooses.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bbb import train
from bbb import workdir as workdir_lib
from bbb.curves import series
from bbb.errors import ConfigError, check_positive
from bbb.priors import Gaussian, Prior, ScaleMixture, make_prior
from bbb.workdir import WorkdirError, read_records, write_text_atomically

PyTree = Any
# Fields that a vectorised sweep may vary between the members of one program.
VECTORIZABLE_FIELDS = (
    "seed",
    "prior.pi",
    "prior.sigma1",
    "prior.sigma2",
    "prior.sigma",
    "optim.learning_rate",
    "objective.kl_temperature",
)
# Priors whose hyperparameters can be traced (their `learnable` form reads them from arrays).
_TRACEABLE_PRIORS = (Gaussian, ScaleMixture)
SLURM_TASK_VARIABLE = "SLURM_ARRAY_TASK_ID"
SWEEP_FILE = "sweep.json"  # The members and their sub-workdirs, in the sweep's folder.


@dataclasses.dataclass(frozen=True)
class Member:
    """One member of a sweep.

    Attributes:
      index: its position in `get_sweep()`.
      overrides: its dotted overrides.
      config: the base config with the overrides applied.
      name: its sub-workdir's name (from the overrides).
      workdir: its sub-workdir.
    """

    index: int
    overrides: dict[str, Any]
    config: ml_collections.ConfigDict
    name: str
    workdir: str

    @property
    def finished(self) -> bool:
        """Whether its summary.json exists and covers `config.num_epochs`."""
        summary = read_summary(self.workdir)
        return summary is not None and summary.get("epochs", 0) >= self.config.num_epochs

    @property
    def status(self) -> str:
        """ "finished", "interrupted" (checkpoints but no summary) or "new"."""
        if self.finished:
            return "finished"
        if os.path.isdir(os.path.join(self.workdir, "checkpoints")):
            return "interrupted"
        return "new"


# Loading and validating a sweep -----------------------------------------------------------


def load_get_sweep(config_path: str) -> Callable[[], Any]:
    """The `get_sweep` function of a config file.

    Args:
      config_path: the `--config` argument; a `path:arg` suffix is ignored (it selects the
        config, not the sweep).

    Returns:
      The config module's `get_sweep`.

    Raises:
      ConfigError: the file has no `get_sweep`.
    """
    path = config_path.partition(":")[0]
    name = "_bbb_sweep_" + re.sub(r"\W", "_", os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError("--config", config_path, "a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_sweep = getattr(module, "get_sweep", None)
    if not callable(get_sweep):
        raise ConfigError(
            "--config",
            config_path,
            "a config file that defines get_sweep(), returning a list of dicts of dotted "
            "overrides (see configs/mnist.py)",
        )
    return get_sweep


def _leaf_fields(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    fields = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            fields.update(_leaf_fields(value, f"{prefix}{key}."))
        else:
            fields[f"{prefix}{key}"] = value
    return fields


def _check_value(where: str, field: str, value: Any, current: Any) -> Any:
    """The override `value` for a field whose base value is `current`, normalised, or raises."""
    field_name = f"{where}.{field}"
    if current is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(field_name, value, "True or False (the field is a bool)")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(field_name, value, "an integer (the field is an int)")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(field_name, value, "a number (the field is a float)")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise ConfigError(field_name, value, "a string (the field is a str)")
        return value
    if isinstance(current, tuple | list):
        if not isinstance(value, tuple | list):
            raise ConfigError(field_name, value, "a tuple (the field is a tuple)")
        return tuple(value)
    if not isinstance(value, type(current)):
        raise ConfigError(field_name, value, f"a {type(current).__name__}")
    return value


def _unknown_field(where: str, key: Any, value: Any, fields: Sequence[str]) -> ConfigError:
    if not isinstance(key, str):
        return ConfigError(
            f"{where}", {key: value}, "string keys: dotted config fields such as 'prior.pi'"
        )
    close = difflib.get_close_matches(key, fields, n=3)
    block = key.partition(".")[0] + "."
    siblings = [f for f in fields if f.startswith(block)]
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    listed = siblings or list(fields)
    return ConfigError(
        f"{where}.{key}",
        value,
        f"a field of the config; {hint}the fields are {', '.join(listed[:40])}",
    )


def _canonical(overrides: dict[str, Any]) -> str:
    return json.dumps(sorted(overrides.items()), default=repr)


def _equals_base(value: Any, current: Any) -> bool:
    """Whether a normalised override `value` equals the base config's `current` value."""
    if isinstance(current, tuple | list):
        current = tuple(current)
    return type(value) is type(current) and value == current


def validate_sweep(base: ml_collections.ConfigDict, sweep: Any) -> list[dict[str, Any]]:
    """Checks every member's overrides against the base config, before any compute.

    Args:
      base: the base config.
      sweep: what `get_sweep()` returned.

    Returns:
      The overrides, one dict per member, with values normalised to the fields' types.

    Raises:
      ConfigError: an empty sweep, a non-dict entry, an unknown field, a wrong type, or a
        duplicate member; the message names the member (`sweep[i]`), the field and the value.
    """
    if not isinstance(sweep, list | tuple) or not sweep:
        raise ConfigError(
            "sweep",
            sweep,
            "a non-empty list of dicts of dotted overrides, such as "
            "[{'prior.pi': 0.25}, {'prior.pi': 0.5}]",
        )
    fields = _leaf_fields(base)
    members, seen = [], {}
    for index, entry in enumerate(sweep):
        where = f"sweep[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, entry, "a dict of dotted overrides, such as {'prior.pi': 0.5}")
        overrides = {}
        for key, value in entry.items():
            if key not in fields:
                raise _unknown_field(where, key, value, list(fields))
            overrides[key] = _check_value(where, key, value, fields[key])
        # Compared as the configs they make: an override equal to the base value changes
        # nothing, so {"seed": 0} repeats {} when the base seed is 0.
        canonical = _canonical(
            {k: v for k, v in overrides.items() if not _equals_base(v, fields[k])}
        )
        if canonical in seen:
            raise ConfigError(
                where,
                entry,
                f"members that differ from each other; it makes the same config as "
                f"sweep[{seen[canonical]}]",
            )
        seen[canonical] = index
        members.append(overrides)
    return members


def member_config(
    base: ml_collections.ConfigDict, overrides: dict[str, Any], index: int
) -> ml_collections.ConfigDict:
    """The base config with one member's overrides applied.

    Args:
      base: the base config (not modified).
      overrides: validated dotted overrides.
      index: the member's index, for error messages.

    Returns:
      A new config.

    Raises:
      ConfigError: ml_collections refused an override.
    """
    config = ml_collections.ConfigDict(base.to_dict())
    for key, value in overrides.items():
        try:
            config.update_from_flattened_dict({key: value})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(
                f"sweep[{index}].{key}", value, f"a value the field takes ({e})"
            ) from e
    return config


def _format_value(value: Any, digits: int) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, tuple | list):
        return "x".join(_format_value(v, digits) for v in value) or "empty"
    return str(value)


def _safe(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    return "_" + name if name.startswith((".", "-")) else name


def member_names(members: Sequence[dict[str, Any]]) -> list[str]:
    """Readable, filesystem-safe, distinct sub-workdir names, e.g. `prior.pi=0.25,seed=1`.

    The keys are sorted; floats get 3 significant digits, more where two members would
    otherwise share a name. A name longer than 120 characters is cut and given a hash suffix.

    Args:
      members: validated overrides, one dict per member.

    Returns:
      One name per member ("base" for empty overrides).
    """

    def name(overrides: dict[str, Any], digits: int) -> str:
        if not overrides:
            return "base"
        text = ",".join(f"{k}={_format_value(v, digits)}" for k, v in sorted(overrides.items()))
        text = _safe(text)
        if len(text) > 120:
            digest = hashlib.sha1(_canonical(overrides).encode()).hexdigest()[:8]
            text = f"{text[:111]}-{digest}"
        return text

    for digits in range(3, 18):
        names = [name(m, digits) for m in members]
        if len(set(names)) == len(names):
            return names
    return [  # Distinct values that read the same once made filesystem-safe ("a/b", "a_b").
        f"{n}-{hashlib.sha1(_canonical(m).encode()).hexdigest()[:8]}"
        for n, m in zip(names, members, strict=True)
    ]


def _keep_recorded_names(
    workdir: str, overrides: Sequence[dict[str, Any]], names: list[str]
) -> list[str]:
    """`names`, but a member that the sweep's `SWEEP_FILE` already lists keeps its recorded name.

    `member_names` widens every member's digits when two would collide, so a member added to
    a sweep could rename the others and orphan their runs; the names already on disk win. A new
    member whose name a recorded member holds gets a hash suffix.
    """
    path = os.path.join(workdir, SWEEP_FILE)
    try:
        with open(path) as f:
            recorded = {_canonical(e["overrides"]): e["workdir"] for e in json.load(f)}
    except (OSError, ValueError, TypeError, KeyError):
        return names
    kept = [recorded.get(_canonical(o)) for o in overrides]
    taken = {name for name in kept if name is not None}
    result = []
    for member, (name, old) in enumerate(zip(names, kept, strict=True)):
        if old is not None:
            result.append(old)
        elif name in taken:
            digest = hashlib.sha1(_canonical(overrides[member]).encode()).hexdigest()[:8]
            result.append(f"{name}-{digest}")
        else:
            result.append(name)
    return result


def make_members(
    base: ml_collections.ConfigDict,
    sweep: Any,
    workdir: str,
    *,
    build: bool = True,
    check_workdirs: bool = True,
) -> list[Member]:
    """Validates the sweep and every member's full config, and names their sub-workdirs.

    Nothing is computed or written: a bad member is reported before any member trains.

    Args:
      base: the base config (with any command-line overrides).
      sweep: what `get_sweep()` returned.
      workdir: the sweep's folder.
      build: also validate each member's full config with `train.build` (an abstract trace
        of one step); off for listing and collecting.
      check_workdirs: also check that `workdir` and the members' sub-workdirs can take them.

    Returns:
      The members, in sweep order.

    Raises:
      ConfigError: a bad sweep entry or member config (naming `sweep[i]` and the field).
      WorkdirError: a member's sub-workdir holds a run of a different config.
    """
    overrides = validate_sweep(base, sweep)
    names = _keep_recorded_names(workdir, overrides, member_names(overrides))
    if check_workdirs:
        workdir_lib.check_workdir(workdir, base)
    members = []
    traced = set()  # Members that differ only in vectorisable numbers trace the same step.
    for index, (member_overrides, name) in enumerate(zip(overrides, names, strict=True)):
        config = member_config(base, member_overrides, index)
        if build:
            try:
                experiment = train.build(config, *train.dataset_spec(config), trace=False)
                structure = _structure_key(config)
                if structure not in traced:
                    train.trace_step(experiment)
                    traced.add(structure)
            except ConfigError as e:
                raise ConfigError(f"sweep[{index}].{e.field}", e.value, e.allowed) from e
        member = Member(index, member_overrides, config, name, os.path.join(workdir, name))
        if check_workdirs and os.path.isdir(workdir):
            workdir_lib.check_workdir(member.workdir, config)
        members.append(member)
    return members


def select_member(members: Sequence[Member], member: int | None) -> Member | None:
    """The member that `--member`, or else `$SLURM_ARRAY_TASK_ID`, names; None for all.

    Args:
      members: the sweep.
      member: the `--member` flag (None when not given).

    Returns:
      The member, or None.

    Raises:
      ConfigError: the index is out of range or the variable is not an integer.
    """
    source = "--member"
    if member is None:
        task = os.environ.get(SLURM_TASK_VARIABLE, "")
        if not task:
            return None
        source = SLURM_TASK_VARIABLE
        try:
            member = int(task)
        except ValueError:
            raise ConfigError(source, task, "an integer member index") from None
    if not 0 <= member < len(members):
        raise ConfigError(source, member, f"a member index in [0, {len(members) - 1}]")
    return members[member]


def list_members(members: Sequence[Member]) -> str:
    """One line per member: index, sub-workdir and status, tab-separated.

    Args:
      members: the sweep.

    Returns:
      The lines, joined.
    """
    return "\n".join(f"{m.index}\t{m.workdir}\t{m.status}" for m in members)


# One by one -------------------------------------------------------------------------------


def run_member(member: Member, **kwargs: Any) -> dict[str, Any] | None:
    """Trains one member with `train.train_and_evaluate` (which resumes from checkpoints).

    Args:
      member: the member.
      **kwargs: passed to `train_and_evaluate` (e.g. `stop_after_epochs`).

    Returns:
      Its summary, or None if it stopped early.
    """
    if member.finished:
        print(f"sweep[{member.index}] {member.name}: finished, skipped.")
        return read_summary(member.workdir)
    print(f"sweep[{member.index}] {member.name}: training ({member.status}).")
    os.makedirs(os.path.dirname(member.workdir), exist_ok=True)  # The sweep's folder.
    return train.train_and_evaluate(member.config, member.workdir, **kwargs)


def run_sequential(members: Sequence[Member], **kwargs: Any) -> list[int]:
    """Trains the members one after another; a diverged member does not stop the others.

    A member that stops early (pre-empted by SIGTERM, or `stop_after_epochs`) stops the sweep:
    the same command resumes it.

    Args:
      members: the members to train.
      **kwargs: passed to `train_and_evaluate`.

    Returns:
      The indices of the members that diverged.
    """
    diverged = []
    for member in members:
        try:
            if run_member(member, **kwargs) is None:
                print(f"sweep[{member.index}] {member.name}: stopped early; the sweep stops.")
                break
        except train.TrainingDivergedError as e:
            print(f"sweep[{member.index}] {member.name}: {e}", file=sys.stderr)
            diverged.append(member.index)
    return diverged


# Vectorised -------------------------------------------------------------------------------


@flax.struct.dataclass
class MemberHyperparameters:
    """The numeric hyperparameters that vary between the members of one vectorised program.

    Each leaf has a leading member axis in the program, and is a scalar inside `jax.vmap`.

    Attributes:
      learning_rate_scale: the member's learning rate over the program's base rate.
      kl_temperature: T, multiplying the KL.
      prior: the prior's hyperparameters in its `learnable` form ({"log_sigma"}, or
        {"logit_pi", "log_sigma1", "log_sigma2"}); {} when the prior is trained or fixed.
    """

    learning_rate_scale: jax.Array
    kl_temperature: jax.Array
    prior: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TracedPrior(Prior):
    """A fixed prior whose hyperparameters are arrays (traced per member), not constants.

    It evaluates the `learnable` form of the prior at `hyperparameters`, with the gradient
    stopped, so that the prior is the same function as the fixed one and nothing is trained.

    Attributes:
      learnable: the prior with `learnable=True`.
      hyperparameters: its hyperparameter arrays.
    """

    learnable: Prior
    hyperparameters: dict[str, jax.Array]

    @property
    def has_closed_form_kl(self) -> bool:
        return self.learnable.has_closed_form_kl

    def log_density(self, params: dict[str, jax.Array], w: jax.Array) -> jax.Array:
        del params  # A fixed prior has no trained hyperparameters.
        return self.learnable.log_density(jax.lax.stop_gradient(self.hyperparameters), w)

    def kl(self, params: dict[str, jax.Array], posterior: Any) -> jax.Array:
        del params
        return self.learnable.kl(jax.lax.stop_gradient(self.hyperparameters), posterior)


@dataclasses.dataclass(frozen=True)
class TemperedFreeEnergy:
    """A free energy (built with T = 1) whose KL temperature is an array.

    Since F̂_i = M π_i T KL − (N/B) Σ E_q[log P(y|x, w)] (bbb/objective.py), a temperature T is
    the KL weight π_i multiplied by T; the logged `kl_weight` stays π_i.

    Attributes:
      free_energy: the `objective.FreeEnergy` with `temperature=1`.
      temperature: T.
    """

    free_energy: Any
    temperature: jax.Array

    def __getattr__(self, name: str) -> Any:
        if name == "free_energy":  # Not yet set (copying, unpickling): no recursion.
            raise AttributeError(name)
        return getattr(self.free_energy, name)

    def __call__(self, params, batch, key, kl_weight):
        """The free energy with the KL weight multiplied by T; as `FreeEnergy.__call__`."""
        loss, metrics = self.free_energy(params, batch, key, kl_weight * self.temperature)
        metrics["kl_weight"] = jnp.asarray(kl_weight, jnp.float32)
        return loss, metrics


def _scaled_updates(
    optimizer: optax.GradientTransformation, scale: jax.Array
) -> optax.GradientTransformation:
    """`optimizer` with its updates multiplied by `scale`, and the same state.

    Every optimiser of `train.make_optimizer` (sgd, momentum, adam, each after optional
    clipping) multiplies a direction that does not depend on the learning rate by the
    schedule, and every schedule there is linear in the peak rate: so the updates at rate
    η_i are those at rate η_0 times η_i / η_0, and the optimiser state is the same.
    """

    def update(updates, state, params=None):
        updates, state = optimizer.update(updates, state, params)
        return jax.tree_util.tree_map(lambda u: u * scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(optimizer.init, update)


def member_experiment(
    experiment: train.Experiment, hyperparameters: MemberHyperparameters
) -> train.Experiment:
    """The experiment of one member inside the vectorised program.

    Args:
      experiment: the group's base experiment (built from its first member, with T = 1).
      hyperparameters: the member's (traced) hyperparameters.

    Returns:
      An `Experiment` that `train.train_epoch` and `train.evaluate` take as they are.
    """
    free_energy = experiment.free_energy
    if hyperparameters.prior:
        learnable = dataclasses.replace(free_energy.prior, learnable=True)
        free_energy = dataclasses.replace(
            free_energy, prior=TracedPrior(learnable, hyperparameters.prior)
        )
    return dataclasses.replace(
        experiment,
        free_energy=TemperedFreeEnergy(free_energy, hyperparameters.kl_temperature),
        optimizer=_scaled_updates(experiment.optimizer, hyperparameters.learning_rate_scale),
    )


def _structure_key(config: ml_collections.ConfigDict) -> str:
    """What must be equal for two members' configs to share a vectorised program."""
    fields = _leaf_fields(config)
    prior = make_prior(config.prior)
    traceable = isinstance(prior, _TRACEABLE_PRIORS) and not prior.learnable
    if traceable or getattr(prior, "learnable", False):
        prior_key = type(prior).__name__
    else:  # Hyperparameters that cannot be traced: the prior itself must be equal.
        prior_key = repr(prior)
    structure = {k: v for k, v in fields.items() if k not in VECTORIZABLE_FIELDS}
    return json.dumps([sorted(structure.items()), prior_key], default=repr)


def group_members(members: Sequence[Member]) -> list[list[Member]]:
    """The members grouped by everything but `VECTORIZABLE_FIELDS`, in sweep order.

    Args:
      members: the members.

    Returns:
      The groups; each trains as one vectorised program.

    Raises:
      ConfigError: a prng_impl other than threefry2x32 (other key types may draw other
        numbers under `vmap`, so members would not repeat their one-by-one runs).
    """
    groups: dict[str, list[Member]] = {}
    for member in members:
        if member.config.prng_impl != "threefry2x32":
            raise ConfigError(
                f"sweep[{member.index}].prng_impl",
                member.config.prng_impl,
                "'threefry2x32' with --vectorize (other key types may draw other numbers "
                "under vmap than in a one-by-one run)",
            )
        groups.setdefault(_structure_key(member.config), []).append(member)
    return list(groups.values())


def _hyperparameters(members: Sequence[Member], base_learning_rate: float) -> MemberHyperparameters:
    """The members' own values, stacked; learning rates as multiples of the program's.

    Args:
      members: the members of one program (a subgroup: they start from the same step).
      base_learning_rate: the rate of the compiled program's optimiser, that of its group's
        first member, which need not be in this subgroup.
    """
    scales, temperatures, priors = [], [], []
    for member in members:
        config = member.config
        scales.append(config.optim.learning_rate / base_learning_rate)
        temperatures.append(config.objective.kl_temperature)
        prior = make_prior(config.prior)
        fixed = isinstance(prior, _TRACEABLE_PRIORS) and not prior.learnable
        priors.append(dataclasses.replace(prior, learnable=True).init_params() if fixed else {})
    return MemberHyperparameters(
        learning_rate_scale=jnp.asarray(scales, jnp.float32),
        kl_temperature=jnp.asarray(temperatures, jnp.float32),
        prior=jax.tree_util.tree_map(lambda *a: jnp.stack(a), *priors) if priors[0] else {},
    )


def _stack(trees: Sequence[PyTree]) -> PyTree:
    """The trees stacked on a new leading member axis: one compiled program for all leaves."""
    return jax.jit(lambda *ts: jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *ts))(
        *trees
    )


def _unstack(tree: PyTree, index: int) -> PyTree:
    """Member `index` of a stacked tree, sliced on the host and put back on the device.

    Slicing device arrays would compile one small program per leaf shape; the host copy is
    made once per evaluation or checkpoint and sliced for free.
    """
    return jax.tree_util.tree_map(lambda leaf: jnp.asarray(np.asarray(leaf)[index]), tree)


def _host_copy(tree: PyTree) -> PyTree:
    """A numpy copy of a device tree (owned by the host: safe after the buffers are donated)."""
    return jax.tree_util.tree_map(np.array, jax.device_get(tree))


@dataclasses.dataclass
class _Programs:
    """The jitted vectorised programs of one group."""

    init: Callable
    epoch: Callable
    evaluate: Callable


def _compile_programs(experiment: train.Experiment, learnable_prior: bool) -> _Programs:
    def init(key, prior_params):
        state = train.init_state(experiment, key)
        if not learnable_prior:
            return state
        params = {**state.params, "prior": prior_params}  # The member's own initial values.
        return train.TrainState(state.step, params, experiment.optimizer.init(params))

    def epoch(hyperparameters, state, data, epoch_index, keys):
        return train.train_epoch(
            member_experiment(experiment, hyperparameters), state, data, epoch_index, keys
        )

    def evaluate(params, data, key):
        return train.evaluate(experiment, params, data, key)

    options = train.compile_kwargs(experiment)  # As `train.run`'s programs.
    return _Programs(
        init=jax.jit(jax.vmap(init)),
        epoch=jax.jit(jax.vmap(epoch, in_axes=(0, 0, None, None, 0)), donate_argnums=1, **options),
        evaluate=jax.jit(jax.vmap(evaluate, in_axes=(0, None, 0)), **options),
    )


def train_vectorized(
    members: Sequence[Member], *, stop_after_epochs: int | None = None
) -> list[int]:
    """Trains the members, one vectorised program per group of `group_members`.

    Each member's sub-workdir receives what `train.train_and_evaluate` would write (config,
    metrics.jsonl, TensorBoard, checkpoints, plots, summary.json), and a member with
    checkpoints resumes from them: members at the same step share a program.

    Args:
      members: the members (finished ones are skipped).
      stop_after_epochs: stop every group (with checkpoints) after this many epochs of this
        session, as a pre-empted job would.

    Returns:
      The indices of the members that diverged (the others train on).
    """
    diverged = []
    groups = group_members([m for m in members if not m.finished])
    for member in members:
        if member.finished:
            print(f"sweep[{member.index}] {member.name}: finished, skipped.")
    for group in groups:
        group_diverged, stopped = _train_group(group, stop_after_epochs)
        diverged += group_diverged
        if stopped:  # Pre-empted: the same command resumes.
            break
    return diverged


def _without_mesh(obj: Any) -> Any:
    """`obj` (an Experiment or FreeEnergy) without its ("data", "samples") mesh, if it has one.

    A vectorised program's parallelism is the member axis (`_MemberLayout`), not the batch.
    """
    if "mesh" in {field.name for field in dataclasses.fields(obj)}:
        return dataclasses.replace(obj, mesh=None)
    return obj


@dataclasses.dataclass(frozen=True)
class _MemberLayout:
    """How a vectorised program spreads its members over the devices: whole members per device.

    With n members and D local devices, each of d = ⌈n / c⌉ devices holds c = ⌈n / D⌉ members;
    the member axis is padded with copies of the first member to c·d (the copies' results are
    dropped). One device needs neither mesh nor padding. The training data is replicated.

    Attributes:
      mesh: a one-axis ("members",) mesh of d devices, or None on one device.
      num_members: n.
      padded: c·d.
    """

    mesh: jax.sharding.Mesh | None
    num_members: int
    padded: int

    @classmethod
    def make(cls, num_members: int, devices: Sequence[Any] | None = None) -> _MemberLayout:
        devices = list(jax.local_devices() if devices is None else devices)
        per_device = -(-num_members // len(devices))
        used = -(-num_members // per_device)
        if used == 1:
            return cls(None, num_members, num_members)
        mesh = jax.sharding.Mesh(np.array(devices[:used]), ("members",))
        return cls(mesh, num_members, per_device * used)

    def describe(self) -> str:
        if self.mesh is None:
            return "on one device"
        padding = self.padded - self.num_members
        extra = f", padded with {padding} cop{'y' if padding == 1 else 'ies'}" if padding else ""
        return f"over {self.mesh.size} devices, {self.padded // self.mesh.size} each{extra}"

    def members(self, tree: PyTree) -> PyTree:
        """A stacked tree ([n, ...] leaves) padded to [padded, ...] and split over the mesh."""
        if self.mesh is None:
            return tree
        extra = self.padded - self.num_members

        def pad(leaf):
            copies = jnp.repeat(leaf[:1], extra, axis=0)
            return jnp.concatenate([leaf, copies]) if extra else leaf

        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("members"))
        return jax.device_put(jax.tree_util.tree_map(pad, tree), sharding)

    def shared(self, tree: PyTree) -> PyTree:
        """`tree` (the data) replicated on every device of the mesh."""
        if self.mesh is None:
            return tree
        return jax.device_put(
            tree, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        )


def _train_group(group: Sequence[Member], stop_after_epochs: int | None) -> tuple[list[int], bool]:
    """Trains one group; returns (diverged member indices, whether it stopped early)."""
    config = group[0].config
    experiment = train.build(config, *train.dataset_spec(config))
    free_energy = _without_mesh(dataclasses.replace(experiment.free_energy, temperature=1.0))
    experiment = _without_mesh(dataclasses.replace(experiment, free_energy=free_energy))
    splits = train.load_data(config)
    learnable_prior = bool(getattr(experiment.free_energy.prior, "learnable", False))
    programs = _compile_programs(experiment, learnable_prior)
    member_keys = [train.root_keys(m.config) for m in group]
    prior_init = [make_prior(m.config.prior).init_params() for m in group]
    states = programs.init(
        _stack([k["init"] for k in member_keys]), _stack(prior_init) if prior_init[0] else {}
    )
    runs, restored = [], []
    host_states = _host_copy(states)
    for index, member in enumerate(group):
        os.makedirs(os.path.dirname(member.workdir), exist_ok=True)  # The sweep's folder.
        run = workdir_lib.Run(member.workdir, member.config)
        runs.append(run)
        restored.append(run.restore(_unstack(host_states, index)))
    device_data = train.examples_on_device(splits, None)  # Flat examples (TPU memory).
    diverged = []
    by_step: dict[int, list[int]] = {}
    for index, (state, _) in enumerate(restored):
        by_step.setdefault(int(state.step), []).append(index)
    for step, indices in sorted(by_step.items()):
        layout = _MemberLayout.make(len(indices))
        print(
            f"vectorised: {len(indices)} members "
            f"({', '.join(str(group[i].index) for i in indices)}) as one program "
            f"{layout.describe()}, from epoch {step // experiment.steps_per_epoch}."
        )
        subgroup_diverged, stopped = _train_subgroup(
            experiment,
            programs,
            layout,
            [group[i] for i in indices],
            [runs[i] for i in indices],
            _stack([restored[i][0] for i in indices]),
            [restored[i][1] for i in indices],
            _stack([member_keys[i] for i in indices]),
            device_data,
            stop_after_epochs,
        )
        diverged += subgroup_diverged
        if stopped:  # The members of later subgroups wait for the next session.
            for later in (i for s, rest in by_step.items() if s > step for i in rest):
                runs[later].close()
            return diverged, True
    return diverged, False


def _train_subgroup(
    experiment, programs, layout, members, runs, state, histories, keys, device_data, stop_after
) -> tuple[list[int], bool]:
    """The loop of `train.train_and_evaluate`, over a member axis laid out by `layout`.

    Returns:
      (the indices of the members that diverged, whether the loop stopped early).
    """
    from tqdm.auto import tqdm

    config = members[0].config
    base_learning_rate = experiment.config.optim.learning_rate  # The group's first member's.
    hyperparameters = layout.members(_hyperparameters(members, base_learning_rate))
    state, keys = layout.members(state), layout.members(keys)
    device_data = layout.shared(device_data)
    steps_per_epoch = experiment.steps_per_epoch
    start_epoch = int(state.step[0]) // steps_per_epoch
    alive = [True] * len(members)
    diverged = []
    bar = tqdm(
        total=config.num_epochs, initial=start_epoch, unit="epoch", disable=not config.progress
    )
    started = time.perf_counter()
    steps_done = 0
    start_step = int(state.step[0])
    # The next epoch is dispatched before this one's logs and checkpoints are written, so that
    # the per-member host work (TensorBoard's fsync, Orbax) overlaps the device's compute.
    if start_epoch < config.num_epochs:
        pending = programs.epoch(
            hyperparameters, state, device_data["train"], jnp.int32(start_epoch), keys
        )
    with train.PreemptionWatcher() as preemption:
        for epoch in range(start_epoch, config.num_epochs):
            first_step = start_step + (epoch - start_epoch) * steps_per_epoch
            state, metrics = pending
            metrics = jax.device_get(metrics)  # each [members, M]
            steps_done += steps_per_epoch
            last = epoch + 1 == config.num_epochs
            evaluated = (epoch + 1) % config.eval.every_epochs == 0 or last
            results = {}
            if evaluated:
                eval_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys["eval"], epoch)
                for split in ("validation", "test"):
                    prefix = "eval/val_" if split == "validation" else "eval/test_"
                    out = jax.device_get(
                        programs.evaluate(state.params, device_data[split], eval_keys)
                    )
                    results.update({prefix + k: v for k, v in out.items()})
            interrupted = preemption.requested or (
                stop_after is not None and epoch + 1 - start_epoch >= stop_after
            )
            save = (epoch + 1) % config.checkpoint_every_epochs == 0 or last or interrupted
            member_states = {}
            if evaluated or save:  # Copies, made before the next epoch takes the buffers.
                host_state = _host_copy(state)
                member_states = {i: _unstack(host_state, i) for i, a in enumerate(alive) if a}
            if not (last or interrupted):
                pending = programs.epoch(
                    hyperparameters, state, device_data["train"], jnp.int32(epoch + 1), keys
                )
            for i, (member, run) in enumerate(zip(members, runs, strict=True)):
                if not alive[i]:
                    continue
                member_metrics = {k: v[i] for k, v in metrics.items()}
                try:
                    train.check_finite(member_metrics, first_step)
                except train.TrainingDivergedError as e:
                    print(f"sweep[{member.index}] {member.name}: {e}", file=sys.stderr)
                    alive[i] = False
                    diverged.append(member.index)
                    run.close()
                    continue
                record = {"step": first_step + steps_per_epoch, "epoch": epoch + 1}
                record.update({f"train/{k}": float(np.mean(v)) for k, v in member_metrics.items()})
                if evaluated:
                    record.update({k: float(v[i]) for k, v in results.items()})
                    histories[i].update_best(record)
                run.write_metrics(record, member_states.get(i))
                if save:
                    run.save(member_states[i], histories[i])
            bar.update(1)
            if interrupted and not last:
                bar.close()
                for i, run in enumerate(runs):
                    if alive[i]:
                        run.close()
                if preemption.requested:
                    print(
                        f"Pre-empted ({preemption.requested}) after epoch {epoch + 1}: "
                        "checkpoints saved. Run the same command to resume."
                    )
                return diverged, True
            if not any(alive):
                break
    bar.close()
    wall_time = time.perf_counter() - started
    host_state = _host_copy(state)
    for i, run in enumerate(runs):
        if alive[i]:
            run.finish(
                _unstack(host_state, i), histories[i], wall_time=wall_time, steps_done=steps_done
            )
    return diverged, False


# The results table ------------------------------------------------------------------------


def read_summary(workdir: str) -> dict[str, Any] | None:
    """A run's summary.json, or None if it has none (or an unreadable one)."""
    path = os.path.join(workdir, "summary.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _metric_name(summary: dict[str, Any]) -> str:
    """The figure that chose the best epoch: "error" (classification) or "nll" (regression)."""
    return "error" if "test_error" in summary else "nll"


def results_table(members: Sequence[Member]) -> tuple[list[dict[str, Any]], list[Member]]:
    """The finished members' figures, best validation first, and the unfinished members.

    Args:
      members: the sweep.

    Returns:
      (rows, unfinished). A row holds `member`, each override, `best_val_<metric>`,
      `test_<metric>_at_best_val`, `best_epoch`, `epochs`, `wall_time_s` and `workdir`, where
      <metric> is `error` for classification and `nll` for regression.
    """
    keys = sorted({k for m in members for k in m.overrides})
    rows, unfinished = [], []
    for member in members:
        summary = read_summary(member.workdir)
        if summary is None or not member.finished:  # A summary of fewer epochs is stale.
            unfinished.append(member)
            continue
        metric = _metric_name(summary)
        row = {"member": member.index}
        row.update({k: member.overrides.get(k, _get(member.config, k)) for k in keys})
        row[f"best_val_{metric}"] = summary.get("best_val_error", math.nan)
        row[f"test_{metric}_at_best_val"] = summary.get("test_error_at_best_val", math.nan)
        row["best_epoch"] = summary.get("best_epoch", 0)
        row["epochs"] = summary.get("epochs", 0)
        row["wall_time_s"] = summary.get("wall_time_s", math.nan)
        row["workdir"] = member.name
        rows.append(row)

    def order(row):
        value = next(v for k, v in row.items() if k.startswith("best_val_"))
        return (not math.isfinite(value), value, row["member"])

    return sorted(rows, key=order), unfinished


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _cell(value: Any, percent: bool) -> str:
    if isinstance(value, float):
        return f"{100 * value:.2f}" if percent else f"{value:.4g}"
    if isinstance(value, tuple | list):
        return "x".join(map(str, value))
    return str(value)


def write_results(workdir: str, members: Sequence[Member]) -> str:
    """Writes results.csv, results.md and results.png into the sweep workdir.

    Args:
      workdir: the sweep's folder.
      members: the sweep (members that have not finished are listed as such).

    Returns:
      The Markdown table, with a line on the unfinished members.
    """
    rows, unfinished = results_table(members)
    os.makedirs(workdir, exist_ok=True)
    columns = list(rows[0]) if rows else ["member"]
    write_text_atomically(os.path.join(workdir, "results.csv"), _csv_text(rows, columns))
    classification = any(k.endswith("_error") for k in columns)
    headers = [
        f"{c} (%)" if classification and c.endswith(("_error", "_at_best_val")) else c
        for c in columns
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [
            _cell(row[c], classification and c.endswith(("_error", "_at_best_val")))
            for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    text += f"\n{len(rows)} of {len(members)} members finished"
    if unfinished:
        shown = ", ".join(f"{m.index} ({m.status})" for m in unfinished[:20])
        text += f"; not finished: {shown}{', ...' if len(unfinished) > 20 else ''}"
    text += ".\n"
    write_text_atomically(os.path.join(workdir, "results.md"), text)
    if rows:
        _plot_results(workdir, rows, members)
    return text


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v, False) if isinstance(v, tuple) else v for k, v in row.items()})
    return buffer.getvalue()


def _plot_results(workdir: str, rows: list[dict[str, Any]], members: Sequence[Member]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val_key = next(k for k in rows[0] if k.startswith("best_val_"))
    test_key = next(k for k in rows[0] if k.startswith("test_") and k.endswith("_at_best_val"))
    metric = val_key.removeprefix("best_val_")
    scale = 100.0 if metric == "error" else 1.0
    unit = " (%)" if metric == "error" else ""
    labels = [f"{r['member']}: {r['workdir']}" for r in rows]
    fig, axes = plt.subplots(
        1, 2, figsize=(15, max(3.0, 0.3 * len(rows) + 1.5)), gridspec_kw={"width_ratios": [3, 2]}
    )
    positions = np.arange(len(rows))
    axes[0].barh(positions - 0.2, [scale * r[val_key] for r in rows], 0.4, label="validation")
    axes[0].barh(
        positions + 0.2, [scale * r[test_key] for r in rows], 0.4, label="test at best val"
    )
    axes[0].set_yticks(positions, labels, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel(f"{metric}{unit}")
    axes[0].set_title("members, best validation first")
    axes[0].legend()
    by_index = {m.index: m for m in members}
    curve_key = f"eval/val_{metric}"
    for row in rows[:10]:
        path = os.path.join(by_index[row["member"]].workdir, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        epochs, values = series(read_records(path), curve_key)
        if epochs:
            axes[1].plot(epochs, [scale * v for v in values], marker=".", label=str(row["member"]))
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel(f"validation {metric}{unit}")
    axes[1].set_title("validation curves (best 10)")
    if axes[1].get_lines():  # Members without validation records draw no curve.
        axes[1].legend(fontsize=7, title="member")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "results.png"), dpi=100)
    plt.close(fig)


# The command ------------------------------------------------------------------------------


def _write_sweep_file(workdir: str, members: Sequence[Member]) -> None:
    os.makedirs(workdir, exist_ok=True)
    entries = [{"member": m.index, "workdir": m.name, "overrides": m.overrides} for m in members]
    write_text_atomically(os.path.join(workdir, SWEEP_FILE), json.dumps(entries, indent=2) + "\n")


def run_sweep(
    base: ml_collections.ConfigDict,
    sweep: Any,
    workdir: str,
    *,
    list_only: bool = False,
    collect: bool = False,
    member: int | None = None,
    vectorize: bool = False,
    stop_after_epochs: int | None = None,
) -> str:
    """What `scripts/sweep.py` does: list, collect, run one member, or run them all.

    Args:
      base: the base config.
      sweep: what the config file's `get_sweep()` returned.
      workdir: the sweep's folder; member i trains in workdir/<its name>.
      list_only: print the members and their sub-workdirs, and do nothing else.
      collect: build the results from the members that have finished, training nothing.
      member: train only this member (else `$SLURM_ARRAY_TASK_ID`, else all).
      vectorize: train the members as vectorised programs (`train_vectorized`).
      stop_after_epochs: stop each run after this many epochs of this session (tests).

    Returns:
      What was printed last: the member list or the results table.

    Raises:
      ConfigError: a bad sweep, member or flag combination, before anything is computed.
      TrainingDivergedError: some member diverged (the others were trained).
    """
    if sum((list_only, collect, member is not None)) > 1:
        raise ConfigError("--list/--collect/--member", True, "at most one of them")
    # Listing writes nothing, so it needs no writable folder.
    members = make_members(
        base, sweep, workdir, build=not (list_only or collect), check_workdirs=not list_only
    )
    if list_only:
        text = list_members(members)
        print(text)
        return text
    if collect:
        if not os.path.isdir(workdir):
            raise WorkdirError(f"{workdir} holds no sweep to collect: the folder is missing.")
        text = write_results(workdir, members)
        print(text)
        return text
    chosen = select_member(members, member)
    if chosen is not None and vectorize:
        raise ConfigError(
            "--vectorize", True, "not with --member or $SLURM_ARRAY_TASK_ID (one member per task)"
        )
    if vectorize:
        group_members(members)  # Refuses what cannot be vectorised before anything is written.
    _write_sweep_file(workdir, members)
    if chosen is not None:
        run_member(chosen, stop_after_epochs=stop_after_epochs)
        text = f"sweep[{chosen.index}] done; build the table with --collect."
        print(text)
        return text
    if vectorize:
        diverged = train_vectorized(members, stop_after_epochs=stop_after_epochs)
    else:
        diverged = run_sequential(members, stop_after_epochs=stop_after_epochs)
    text = write_results(workdir, members)
    print(text)
    if diverged:
        raise train.TrainingDivergedError(
            f"members {diverged} diverged (NaN or Inf); the others are in {workdir}/results.md."
        )
    return text


def benchmark(
    base: ml_collections.ConfigDict, sweep: Any, workdir: str, *, repeats: int = 1
) -> dict[str, Any]:
    """Wall time of the whole sweep, vectorised against one member after another.

    Each repetition trains every member from scratch into fresh sub-folders of
    workdir/benchmark (compilation included, as a user would wait for it), alternating the
    two ways; the medians are compared.

    Args:
      base: the base config.
      sweep: the sweep (one vectorised group is the intended case).
      workdir: the folder for the benchmark's runs and benchmark.json.
      repeats: repetitions of each way.

    Returns:
      {"members", "repeats", "sequential_s", "vectorized_s" (lists), their medians and the
      `speedup` (sequential median / vectorised median)}.
    """
    import shutil

    check_positive("--benchmark_repeats", repeats, integer=True)
    root = os.path.join(workdir, "benchmark")
    # Every member, and whether they can be vectorised, before the first folder or run.
    group_members(make_members(base, sweep, root, check_workdirs=False))
    os.makedirs(root, exist_ok=True)
    times: dict[str, list[float]] = {"sequential": [], "vectorized": []}
    for repeat in range(repeats):
        for way in ("sequential", "vectorized"):
            folder = os.path.join(root, f"{way}_{repeat}")
            shutil.rmtree(folder, ignore_errors=True)
            members = make_members(base, sweep, folder)
            started = time.perf_counter()
            if way == "vectorized":
                train_vectorized(members)
            else:
                run_sequential(members)
            times[way].append(time.perf_counter() - started)
            print(f"benchmark: {way} repeat {repeat}: {times[way][-1]:.1f} s", flush=True)
    result = {
        "members": len(sweep),
        "repeats": repeats,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "sequential_s": times["sequential"],
        "vectorized_s": times["vectorized"],
        "sequential_median_s": statistics.median(times["sequential"]),
        "vectorized_median_s": statistics.median(times["vectorized"]),
    }
    result["speedup"] = result["sequential_median_s"] / result["vectorized_median_s"]
    write_text_atomically(os.path.join(root, "benchmark.json"), json.dumps(result, indent=2) + "\n")
    print(
        f"{len(sweep)} members: one after another {result['sequential_median_s']:.1f} s, "
        f"vectorised {result['vectorized_median_s']:.1f} s (median of {repeats}): "
        f"{result['speedup']:.2f}x faster."
    )
    return result
