"""SPMD over a device mesh, and across hosts: JAX's own runtime, configured by `config.mesh`.

The mesh has two axes (`jax.sharding.Mesh` with `AxisType.Auto`, so XLA's SPMD partitioner
places the collectives):

- `"data"`: each minibatch [B, ...] is split into B / data slices, one per device row;
- `"samples"`: the K Monte-Carlo samples of the free energy (Blundell et al. 2015, eq. (2)) are
  split into K / samples groups, one per device column, so that more samples cost no more time
  when there are devices to spare;
- the variational parameters θ = (μ, ρ), the prior's and likelihood's parameters and the
  optimiser state are replicated. Their gradient is the sum of the devices' partial sums (an
  all-reduce that the partitioner inserts), so every device applies the same update.

`jax.jit` with `NamedSharding`s on its inputs and outputs, and `jax.lax.with_sharding_constraint`
inside the step, say where each array lives (the pattern of the JAX guide "Distributed arrays
and automatic parallelization"); no `pmap` and no hand-written collectives. On one device
nothing here adds an operation: `constrain` is the identity and the jitted functions take no
shardings.

Across hosts, `initialize_multihost` calls `jax.distributed.initialize()` before anything touches
a device; the mesh then spans every process's devices (`jax.devices()` is global), each process
holds a full copy of the (small) training set, and `replicate` assembles the global arrays with
`jax.make_array_from_callback`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bbb.errors import ConfigError

PyTree = Any
AXES = ("data", "samples")  # The mesh's axis names, in its order.


def _axis_size(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (value > 0 or value == -1):
        raise ConfigError(
            field, value, "a positive integer, or -1 for all the devices the other axis leaves"
        )
    return value


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of `n` that is at most `at_most` (≥ 1)."""
    return max(d for d in range(1, max(at_most, 1) + 1) if n % d == 0)


def mesh_shape(
    mesh_config: Any,
    num_devices: int,
    *,
    batch_size: int,
    num_samples: int,
    every_device: bool = False,
) -> tuple[int, int]:
    """The (data, samples) shape of the mesh, with -1 resolved, checked against the run.

    The mesh takes the first data × samples devices, which may be fewer than there are: -1 on
    one axis takes as many of the devices the other axis leaves as that axis can use (the
    largest divisor of `batch_size`, or of `num_samples`, that fits), so that a batch of 100 runs
    on 4 of 8 GPUs rather than not at all.

    Args:
      mesh_config: the `config.mesh` block (`data`, `samples`).
      num_devices: the devices available (`jax.device_count()`, all processes).
      batch_size: B, which the data axis must divide.
      num_samples: K (`objective.num_samples`), which the samples axis must divide.
      every_device: the mesh must cover every device (a multi-host job, where each process
        must hold part of it).

    Returns:
      (data, samples), whose product is at most `num_devices` (exactly, with `every_device`).

    Raises:
      ConfigError: naming the field, its value and what is allowed.
    """
    data = _axis_size("mesh.data", mesh_config.data)
    samples = _axis_size("mesh.samples", mesh_config.samples)
    if data == -1 and samples == -1:
        raise ConfigError(
            "mesh.samples", samples, "a positive integer when mesh.data is -1 (one axis at most)"
        )
    devices = f"{num_devices} device" + ("s" if num_devices != 1 else "")
    if every_device:
        devices += " of this multi-host job"
    if data != -1 and samples != -1:
        product = data * samples
        if product > num_devices or (every_device and product != num_devices):
            bound = "equal to" if every_device else "at most"
            raise ConfigError(
                "mesh.data",
                data,
                f"mesh.data × mesh.samples = {data} × {samples} = {product} {bound} the "
                f"{devices} (or -1 on one axis, to take the devices the other leaves)",
            )
    else:
        field, given = ("mesh.samples", samples) if data == -1 else ("mesh.data", data)
        if given > num_devices or (every_device and num_devices % given):
            allowed = "a divisor of" if every_device else "at most"
            raise ConfigError(field, given, f"{allowed} the {devices}")
        left = num_devices // given
        if data == -1:
            data = left if every_device else _largest_divisor(batch_size, left)
        else:
            samples = left if every_device else _largest_divisor(num_samples, left)
    if batch_size % data:
        raise ConfigError(
            "mesh.data",
            mesh_config.data,
            f"a divisor of batch_size={batch_size} (the data axis has {data} devices); "
            "set mesh.data and mesh.samples explicitly, or change batch_size",
        )
    if num_samples % samples:
        raise ConfigError(
            "mesh.samples",
            mesh_config.samples,
            f"a divisor of objective.num_samples={num_samples} (the samples axis has {samples} "
            "devices)",
        )
    return data, samples


def make_mesh(shape: tuple[int, int], devices: Sequence[Any] | None = None) -> Mesh:
    """The ("data", "samples") mesh of `shape` over `devices` (default: every device).

    Args:
      shape: (data, samples), as `mesh_shape` returns it.
      devices: the devices, `math.prod(shape)` of them; None takes `jax.devices()`.

    Returns:
      A `jax.sharding.Mesh` whose axes are `AxisType.Auto` (sharding by annotation).

    Raises:
      ConfigError: naming `mesh.data`, for a shape that the devices' physical topology cannot
        be laid out as, even with its axes split (some TPU slices, multi-slice jobs).
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != math.prod(shape):
        raise ValueError(f"a {shape} mesh needs {math.prod(shape)} devices, not {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    try:
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    except (NotImplementedError, ValueError):
        # jax.make_mesh will not split a TPU's physical axes (a 32 × 2 mesh of a 4 × 4 × 4
        # slice); splitting them costs some interconnect locality, not correctness.
        from jax.experimental import mesh_utils

        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (NotImplementedError, ValueError) as error:
            raise ConfigError(
                "mesh.data",
                shape[0],
                f"a (mesh.data, mesh.samples) shape that these {len(devices)} devices' topology "
                f"can be laid out as; {shape} cannot ({error})",
            ) from error
        return Mesh(grid, AXES, axis_types=auto)


def is_sharded(mesh: Mesh | None) -> bool:
    """Whether `mesh` spans more than one device (on one device, nothing is annotated)."""
    return mesh is not None and mesh.size > 1


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a whole copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def constrain(tree: PyTree, mesh: Mesh | None, *spec: str | None) -> PyTree:
    """`with_sharding_constraint(leaf, NamedSharding(mesh, P(*spec)))` on every leaf.

    The identity on one device, so that the single-device program is unchanged.

    Args:
      tree: arrays (or a pytree of them), each with at least `len(spec)` dimensions.
      mesh: the mesh, or None.
      *spec: the mesh axis (or None) of each leading dimension; none at all replicates.

    Returns:
      `tree`, constrained.
    """
    if not is_sharded(mesh):
        return tree
    sharding = NamedSharding(mesh, PartitionSpec(*spec))
    return jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


def replicate(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Host arrays as device arrays: a whole copy on every device of `mesh`.

    Every process must pass the same values (each host loads the whole data set). Works across
    hosts: each process fills its own devices (`jax.make_array_from_callback`).

    Args:
      tree: numpy arrays (or a pytree of them).
      mesh: the mesh; None or one device places the arrays on the default device.

    Returns:
      `jax.Array`s.
    """
    if not is_sharded(mesh):
        return jax.tree_util.tree_map(jnp.asarray, tree)
    sharding = replicated(mesh)

    def put(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree_util.tree_map(put, tree)


def initialize_multihost() -> None:
    """Joins the processes of a multi-host job: `jax.distributed.initialize()`, as JAX documents.

    Call once per process, before anything touches a device. JAX finds the coordinator, the
    process count and this process's id in the job's environment: Cloud TPU, SLURM (`srun`),
    Open MPI (`mpirun`) or Kubernetes; `JAX_COORDINATOR_ADDRESS=host:port` overrides the
    coordinator.

    Raises:
      ConfigError: no such environment was found (names `--multihost` and what is needed).
    """
    try:
        jax.distributed.initialize()
    except (ValueError, TypeError) as e:
        raise ConfigError(
            "--multihost",
            True,
            "a job that jax.distributed.initialize() detects: Cloud TPU, SLURM (srun), Open MPI "
            f"(mpirun) or Kubernetes, optionally with JAX_COORDINATOR_ADDRESS ({e})",
        ) from e


def any_process(flag: bool) -> bool:
    """Whether `flag` is true in any process (a SIGTERM may reach one host only, and every
    process must stop at the same epoch). On one process, no collective runs.

    Args:
      flag: this process's value.

    Returns:
      The logical or over the processes.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes logs, metrics, plots and config.json."""
    return jax.process_index() == 0
