"""What must hold on other hardware than the run's: a checkpoint read where its devices are not."""

from __future__ import annotations

import os

import jax
import numpy as np

from bbb import train
from tests.conftest import report_on_fake_cpus
from tests.test_mesh import _mesh_config, _synthetic_splits, _tiny_config


def train_on_two_devices(workdir: str) -> dict:
    """In a subprocess with 2 fake CPU devices: one epoch on a (2, 1) mesh, saved in `workdir`;
    returns the saved parameters' shardings and a digest of their values."""
    config = _mesh_config(_tiny_config(), 2, 1)
    config.num_epochs = 1
    train.load_data = lambda config: _synthetic_splits(config)  # This subprocess only.
    train.train_and_evaluate(config, workdir)
    _, state = train.load_run(workdir)
    leaves = jax.tree_util.tree_leaves(state.params)
    return {
        "devices": [len(leaf.sharding.device_set) for leaf in leaves],
        "sum": float(sum(np.asarray(leaf, np.float64).sum() for leaf in leaves)),
    }


def test_a_run_trained_on_more_devices_loads_on_one(tmp_path):
    """A run trained on a 2-device mesh (as on 8 GPUs or a TPU slice) is read for evaluation,
    pruning or plots where only one device exists: the parameters land on that device, with the
    values the 2-device process read back. Without a sharding in the restore target Orbax
    restores onto the saved devices, and fails here with a topology mismatch."""
    workdir = str(tmp_path / "wd")
    report, _ = report_on_fake_cpus(
        "tests.test_portability:train_on_two_devices", workdir, devices=2
    )
    assert set(report["devices"]) == {1}  # Read back on one device of the two.
    assert jax.device_count() == 1
    _, state = train.load_run(workdir)
    leaves = jax.tree_util.tree_leaves(state.params)
    assert all(leaf.sharding.device_set == {jax.devices()[0]} for leaf in leaves)
    total = sum(np.asarray(leaf, np.float64).sum() for leaf in leaves)
    assert total == report["sum"]
    assert os.path.exists(os.path.join(workdir, "summary.json"))
