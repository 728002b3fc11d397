"""What must hold on other hardware than this CPU: checkpoints read elsewhere, TPU meshes."""

from __future__ import annotations

import os

import chex
import jax
import numpy as np
import pytest

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


def test_a_mesh_the_topology_refuses_is_split_or_named(monkeypatch):
    """`jax.make_mesh` refuses shapes that would split a TPU slice's physical axes
    (NotImplementedError): the mesh is then laid out with its axes split; where even that is
    impossible the run stops with a config error naming mesh.data, not a traceback."""
    from jax.experimental import mesh_utils

    from bbb import parallel
    from bbb.errors import ConfigError

    def refuse(*args, **kwargs):
        raise NotImplementedError("Splitting axes is not supported")

    monkeypatch.setattr(jax, "make_mesh", refuse)
    mesh = parallel.make_mesh((1, 1), jax.devices()[:1])
    assert mesh.axis_names == parallel.AXES and mesh.devices.shape == (1, 1)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)
    with pytest.raises(ConfigError, match=r"mesh\.data=1 is invalid: .*\(1, 1\) cannot"):
        parallel.make_mesh((1, 1), jax.devices()[:1])


@pytest.mark.parametrize(("model", "epoch_loop"), [("mlp", "scan"), ("lenet", "steps")])
def test_examples_stored_flat_train_and_evaluate_as_the_images(model, epoch_loop):
    """The device copy of the data is [N, 784], not [N, 28, 28, 1] (which TPUs pad 146-fold);
    each gathered batch gets its shape back, so an epoch and an evaluation on the flat copy
    give, bit for bit, those on the images, for the MLP's scan and LeNet's stepwise loop."""
    config = _tiny_config()
    config.model.name, config.epoch_loop = model, epoch_loop
    if model == "lenet":
        config.model.features, config.model.hidden_sizes = (2, 3), (8,)
    config.objective.num_samples = 2
    experiment = train.build(config, config.data.train_subset, (28, 28, 1))
    splits = _synthetic_splits(config)
    flat = train.examples_on_device(splits, None)
    assert flat["train"][0].shape == (config.data.train_subset, 784)
    assert flat["test"][0].shape == (config.data.eval_subset, 784)
    images = {name: tuple(jax.numpy.asarray(a) for a in arrays) for name, arrays in splits.items()}
    keys = train.root_keys(config)
    results = []
    for data in (flat, images):
        state = jax.jit(lambda key: train.init_state(experiment, key))(keys["init"])
        state, metrics = train.compile_epoch(experiment)(state, data["train"], np.int32(0), keys)
        evaluation = train.compile_evaluate(experiment)(state.params, data["test"], keys["eval"])
        results.append(jax.device_get((state.params, metrics, evaluation)))
    chex.assert_trees_all_equal(results[0], results[1])


def test_training_places_the_examples_flat(tmp_path, monkeypatch):
    from bbb import parallel

    shapes = []
    replicate = parallel.replicate

    def recording(tree, mesh):
        shapes.extend(np.shape(leaf) for leaf in jax.tree_util.tree_leaves(tree))
        return replicate(tree, mesh)

    monkeypatch.setattr(parallel, "replicate", recording)
    config = _tiny_config()
    config.num_epochs = 1
    monkeypatch.setattr(train, "load_data", lambda config: _synthetic_splits(config))
    train.train_and_evaluate(config, str(tmp_path / "wd"))
    n, m = config.data.train_subset, config.data.eval_subset
    assert sorted(shapes) == sorted([(n, 784), (n,), (m, 784), (m,), (m, 784), (m,)])
