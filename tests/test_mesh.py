"""SPMD over a ("data", "samples") mesh: same trajectory as one device, where each array lives,
clear errors, process 0.

The multi-device tests run in one subprocess with 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`), which computes every mesh at once and
reports in JSON; the others run in this process, on its one device. A layout mutation (the batch
replicated instead of sharded, the samples over the wrong axis, a lost constraint) leaves every
value unchanged: the layout tests read the shardings of the arrays and of the lowered and
compiled programs instead.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bbb import parallel, train
from bbb.errors import ConfigError
from bbb.posterior import MeanFieldGaussian
from bbb.workdir import History, Run
from configs import test as test_config
from tests.conftest import REPO, report_on_fake_cpus
from tests.test_train import _digest

MESHES = [(8, 1), (4, 2), (1, 8)]
NUM_TRAIN, NUM_EPOCHS = 64, 2


def _tiny_config() -> ml_collections.ConfigDict:
    """A 784-20-10 MLP, B = 16, K = 8: every mesh of 8 devices divides both. A Gaussian prior
    (with the MC KL, one per sample) and a constant learning rate, which compile faster."""
    config = test_config.get_config()
    config.model.hidden_sizes = (20,)
    config.prior.name = "gaussian"
    config.optim.schedule = "constant"
    config.batch_size = 16
    config.objective.num_samples = 8
    config.num_epochs = NUM_EPOCHS
    config.data.train_subset = NUM_TRAIN
    config.data.eval_subset = 40
    config.eval.num_samples = 2
    config.eval.batch_size = 20
    config.objective.kl_temperature = 1e-3  # A loss of order 1, so that 1e-5 is tight.
    return config


def _synthetic_splits(config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST-shaped random images and labels (the mesh tests need no real data)."""
    rng = np.random.default_rng(0)
    sizes = {
        "train": config.data.train_subset,
        "validation": config.data.eval_subset,
        "test": config.data.eval_subset,
    }
    return {
        name: (
            rng.normal(size=(n, 28, 28, 1)).astype(np.float32),
            rng.integers(0, 10, size=n).astype(np.int32),
        )
        for name, n in sizes.items()
    }


def _mesh_config(config, data, samples):
    config.mesh.data, config.mesh.samples = data, samples
    return config


def _layout(lowered_text: str) -> dict:
    """Where a lowered (StableHLO, Shardy) program puts its arrays, as written in its text.

    JAX lowers with the Shardy partitioner by default (`sdy.*` ops); with the older GSPMD one
    nothing here would be found, and the layout tests would fail rather than pass unchecked.

    Returns:
      {"mesh": the `sdy.mesh` axes, e.g. '"data"=4, "samples"=2' (or None),
       "constraints": {spec: sorted tensor types} of every `with_sharding_constraint`, e.g.
         {'[{"samples"}]': ["tensor<8xf32>"], '[{}]': [...]},
       "inputs"/"outputs": the specs of main's arguments and results, one per array (None for an
         array that has none, left to the partitioner)}.
    """
    mesh = re.search(r"sdy\.mesh @mesh = <\[(.*?)\]>", lowered_text)
    constraints: dict[str, set] = {}
    pattern = r"sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])> : (tensor<[^>]*>)"
    for spec, tensor in re.findall(pattern, lowered_text):
        constraints.setdefault(spec, set()).add(tensor)
    main = next(line for line in lowered_text.splitlines() if "func.func public @main(" in line)
    arguments, results = main.split(") -> (", 1)

    def specs(signature: str) -> list:
        parts = re.split(r"(?:%arg\d+: )?tensor<", signature)[1:]  # one per array
        found = [re.search(r"#sdy\.sharding<@mesh, (\[.*?\])>", part) for part in parts]
        return [m.group(1) if m else None for m in found]

    return {
        "mesh": mesh.group(1) if mesh else None,
        "constraints": {spec: sorted(types) for spec, types in constraints.items()},
        "inputs": specs(arguments),
        "outputs": specs(results),
    }


def _worker(workdir: str) -> dict:
    """In the 8-device subprocess: trajectories on one device and on each mesh, and the checks
    that need several devices. Returns what the tests assert on."""
    assert jax.device_count() == 8, jax.devices()
    # The whole-loop run below compiles the (4, 2) epoch again: let it hit the disk cache.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir + "_xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    splits = _synthetic_splits(_tiny_config())
    report = {"losses": {}, "cache_sizes": {}, "replicated": {}, "shapes": {}}
    report.update(layouts={}, logits={}, data_replicated={}, mesh_devices={})
    initial = None  # One initial state (on the host) for every mesh.
    for shape in [(1, 1), *MESHES]:
        name = "x".join(map(str, shape))
        config = _mesh_config(_tiny_config(), *shape)
        devices = jax.devices()[: shape[0] * shape[1]]
        experiment = train.build(config, NUM_TRAIN, (28, 28, 1), devices=devices)
        keys = train.root_keys(config)
        if initial is None:
            init = jax.jit(lambda key: train.init_state(experiment, key))  # noqa: B023
            initial = jax.device_get(init(keys["init"]))
        state = parallel.replicate(initial, experiment.mesh)
        data = parallel.replicate(splits, experiment.mesh)
        report["mesh_devices"][name] = [d.id for d in experiment.mesh.devices.flat]
        report["data_replicated"][name] = [
            leaf.sharding.is_equivalent_to(NamedSharding(experiment.mesh, P()), leaf.ndim)
            for leaf in jax.tree_util.tree_leaves((state, data))
        ]
        epoch_fn = train.compile_epoch(experiment)
        lowered = epoch_fn.lower(state, data["train"], np.int32(0), keys)
        report["layouts"][name] = _layout(lowered.as_text())
        text = lowered.compile().as_text()
        # The sampled first-layer weights: [K / samples, 784, 20] on each device.
        report["shapes"][name] = [k for k in (1, 2, 4, 8) if f"f32[{k},784,20]" in text]
        # The logits [K, B, 10] as each device holds them, e.g. "4,4": [K / 2, B / 4, 10].
        sizes = [(k, b) for k in (1, 2, 4, 8) for b in (1, 2, 4, 8, 16)]
        report["logits"][name] = [f"{k},{b}" for k, b in sizes if f"f32[{k},{b},10]" in text]
        losses = []
        for epoch in range(NUM_EPOCHS):
            state, metrics = epoch_fn(state, data["train"], np.int32(epoch), keys)
            losses.extend(np.asarray(metrics["loss"]).tolist())
        report["losses"][name] = losses
        report["cache_sizes"][name] = epoch_fn._cache_size()
        report["replicated"][name] = all(
            leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == len(devices)
            for leaf in jax.tree_util.tree_leaves(state)
        )

    # local_reparam's epoch on the (4, 2) mesh: the all-gathers in its program. Taking the K
    # samples as rows of one product (`estimators.rows_dot`) would merge the "samples" and
    # "data" axes, and XLA would gather the activations over "data" to do so.
    config = _mesh_config(_tiny_config(), 4, 2)
    config.posterior.estimator = "local_reparam"
    experiment = train.build(config, NUM_TRAIN, (28, 28, 1))
    state = parallel.replicate(initial, experiment.mesh)
    data = parallel.replicate(splits, experiment.mesh)
    lowered = train.compile_epoch(experiment).lower(state, data["train"], np.int32(0), keys)
    report["local_reparam_gathers"] = lowered.compile().as_text().count(" all-gather")

    # The stepwise epoch on the (4, 2) mesh: its programs' layouts, and its first epoch.
    config = _mesh_config(_tiny_config(), 4, 2)
    config.epoch_loop = "steps"
    experiment = train.build(config, NUM_TRAIN, (28, 28, 1))
    state = parallel.replicate(initial, experiment.mesh)
    data = parallel.replicate(splits, experiment.mesh)
    stepwise = train.compile_epoch(experiment)
    order = stepwise._order(data["train"], np.int32(0), keys)
    step = stepwise._step.lower(state, data["train"], order, np.int32(0), keys)
    evaluate = train.compile_evaluate(experiment)
    report["stepwise"] = {
        "order": _layout(stepwise._order.lower(data["train"], np.int32(0), keys).as_text()),
        "step": _layout(step.as_text()),
        "evaluate": _layout(evaluate.lower(state.params, data["test"], keys["eval"]).as_text()),
    }
    state, metrics = stepwise(state, data["train"], np.int32(0), keys)
    report["losses"]["4x2 steps"] = np.asarray(metrics["loss"]).tolist()

    # The whole loop on the (4, 2) mesh, stopped after one epoch and resumed; whether each
    # array that its epoch and evaluation programs receive is a whole copy on every device.
    config = _mesh_config(_tiny_config(), 4, 2)
    train.load_data = lambda config: splits
    report["loop_inputs"] = {"epoch": [], "evaluate": []}

    def recording(compile_fn, calls):
        def compile_and_record(experiment):
            fn = compile_fn(experiment)
            whole = NamedSharding(experiment.mesh, P())

            def call(*args):
                leaves = [a for a in jax.tree_util.tree_leaves(args) if isinstance(a, jax.Array)]
                calls.append([a.sharding.is_equivalent_to(whole, a.ndim) for a in leaves])
                return fn(*args)

            return call

        return compile_and_record

    train.compile_epoch = recording(train.compile_epoch, report["loop_inputs"]["epoch"])
    train.compile_evaluate = recording(train.compile_evaluate, report["loop_inputs"]["evaluate"])
    train.train_and_evaluate(config, workdir, stop_after_epochs=1)
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        report["run"] = [json.loads(line) for line in f]

    # Meshes on 8 real devices, bad ones and ones that use fewer devices: the error message,
    # or the mesh's shape and devices.
    report["errors"], report["fewer"] = {}, {}
    for data_axis, samples_axis, num_samples in [(4, 2, 3), (3, -1, 8), (2, 2, 8), (-1, 1, 4)]:
        config = _mesh_config(_tiny_config(), data_axis, samples_axis)
        config.objective.num_samples = num_samples
        config.batch_size = 12 if data_axis == -1 else 16
        case = f"{data_axis},{samples_axis},{num_samples}"
        try:
            mesh = train.build(config, NUM_TRAIN, (28, 28, 1)).mesh
            report["fewer"][case] = [list(mesh.devices.shape), [d.id for d in mesh.devices.flat]]
            message = ""
        except ConfigError as e:
            message = str(e)
        report["errors"][case] = message

    # A config without a mesh block (as before there was one).
    config = _tiny_config()
    del config["mesh"]
    report["default_mesh"] = dict(train.build(config, NUM_TRAIN, (28, 28, 1)).mesh.shape)
    return report


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory) -> dict:
    """The report of `_worker`, run with 8 fake CPU devices."""
    workdir = str(tmp_path_factory.mktemp("mesh") / "wd")
    report, _ = report_on_fake_cpus(
        "tests.test_mesh:_worker", workdir, 8, JAX_DISABLE_MOST_OPTIMIZATIONS="1"
    )
    return report


@pytest.mark.parametrize("shape", MESHES)
def test_mesh_gives_the_one_device_loss_trajectory(eight_devices, shape):
    name = "x".join(map(str, shape))
    reference = eight_devices["losses"]["1x1"]
    assert len(reference) == NUM_EPOCHS * NUM_TRAIN // 16
    np.testing.assert_allclose(eight_devices["losses"][name], reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), *MESHES])
def test_epoch_compiles_once_and_the_state_stays_replicated(eight_devices, shape):
    name = "x".join(map(str, shape))
    assert eight_devices["cache_sizes"][name] == 1
    assert eight_devices["replicated"][name]


def test_samples_axis_splits_the_monte_carlo_samples(eight_devices):
    """Each device draws K / samples weight samples: 8 on one device, 4 on (4, 2), 1 on (1, 8)."""
    shapes = eight_devices["shapes"]
    assert 8 in shapes["1x1"] and 8 in shapes["8x1"]
    assert 4 in shapes["4x2"] and 8 not in shapes["4x2"]
    assert shapes["1x8"] == [1]


def test_training_loop_on_a_mesh_resumes_and_matches_one_device(eight_devices):
    records = eight_devices["run"]
    assert [r["epoch"] for r in records] == [1, 2]
    reference = np.reshape(eight_devices["losses"]["1x1"], (NUM_EPOCHS, -1)).mean(axis=1)
    np.testing.assert_allclose([r["train/loss"] for r in records], reference, rtol=1e-5)
    assert all("eval/test_error" in r for r in records)


# Where the arrays live: the same values on a wrong layout would pass every test above.

# The step's `with_sharding_constraint`s on every mesh (B = 16, K = 8, M = 4, 784-20-10): each
# spec with the arrays it applies to.
STEP_CONSTRAINTS = {
    '[{"data"}, {}, {}, {}]': ["tensor<16x28x28x1xf32>"],  # the minibatch's images [B, ...]
    '[{"data"}]': ["tensor<16xi32>"],  # and labels [B]
    '[{"samples"}, {}]': ["tensor<8x2xui32>"],  # the K samples' keys
    '[{"samples"}, {"data"}, {}]': ["tensor<8x16x10xf32>"],  # the logits [K, B, 10]
    '[{"samples"}]': ["tensor<8xf32>"],  # the K MC KL estimates (and their cotangent)
    # The new state, a whole copy on every device: the step, the biases and the kernels.
    "[]": ["tensor<i32>"],
    "[{}]": ["tensor<10xf32>", "tensor<20xf32>"],
    "[{}, {}]": ["tensor<20x10xf32>", "tensor<784x20xf32>"],
}
ORDER_CONSTRAINT = {'[{}, {"data"}]': ["tensor<4x16xi32>"]}  # the epoch's minibatches [M, B]


def _is_replicated(specs: list) -> bool:
    """Whether every array of a program's signature is given, and given no mesh axis."""
    return bool(specs) and all(spec is not None and '"' not in spec for spec in specs)


@pytest.mark.parametrize("shape", MESHES)
def test_mesh_lays_out_the_configured_axes_over_the_given_devices(eight_devices, shape):
    """("data", "samples") in this order, of the configured sizes, over the devices in order."""
    name = "x".join(map(str, shape))
    assert eight_devices["layouts"][name]["mesh"] == f'"data"={shape[0]}, "samples"={shape[1]}'
    assert eight_devices["mesh_devices"][name] == list(range(8))
    assert eight_devices["mesh_devices"]["1x1"] == [0]


@pytest.mark.parametrize("shape", MESHES)
def test_step_shards_the_batch_over_data_and_the_samples_over_samples(eight_devices, shape):
    """The epoch's program constrains the minibatch [M, B] and [B, ...] over "data", the K keys,
    KL estimates and logits over "samples" (and the logits' B over "data"), and the new state
    to a whole copy: exactly these specs, on exactly these arrays."""
    name = "x".join(map(str, shape))
    expected = STEP_CONSTRAINTS | ORDER_CONSTRAINT
    assert eight_devices["layouts"][name]["constraints"] == expected


def test_local_reparam_on_a_mesh_gathers_no_activations(eight_devices):
    """On a mesh the free energy keeps `lax.dot_general`'s batching of the samples
    (`samples_as_rows=False`): the compiled epoch has no all-gather."""
    assert eight_devices["local_reparam_gathers"] == 0


@pytest.mark.parametrize("shape", MESHES)
def test_epoch_takes_and_returns_whole_copies(eight_devices, shape):
    """Every argument and result of the epoch's program is replicated (given, no mesh axis);
    on one device none is given, as with plain `jax.jit`."""
    layout = eight_devices["layouts"]["x".join(map(str, shape))]
    assert _is_replicated(layout["inputs"]) and _is_replicated(layout["outputs"])
    one_device = eight_devices["layouts"]["1x1"]
    assert set(one_device["inputs"]) == set(one_device["outputs"]) == {None}
    assert one_device["mesh"] is None and one_device["constraints"] == {}


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((1, 1), (8, 16)), ((8, 1), (8, 2)), ((4, 2), (4, 4)), ((1, 8), (1, 16))],
)
def test_each_device_computes_its_share_of_the_logits(eight_devices, shape, expected):
    """In the compiled program each device holds logits [K / samples, B / data, 10] and no
    larger block of them: the sharding took effect, and the work is split."""
    found = [
        tuple(map(int, kb.split(","))) for kb in eight_devices["logits"]["x".join(map(str, shape))]
    ]
    assert expected in found
    assert max(k * b for k, b in found) == expected[0] * expected[1], found


@pytest.mark.parametrize("shape", [(1, 1), *MESHES])
def test_replicate_puts_a_whole_copy_on_every_device_of_the_mesh(eight_devices, shape):
    """`parallel.replicate` of the initial state and of the data: every one of the 33 arrays
    is equivalent to NamedSharding(mesh, P()) (on one device: that device)."""
    flags = eight_devices["data_replicated"]["x".join(map(str, shape))]
    assert len(flags) == 33 and all(flags)


def test_stepwise_epoch_on_a_mesh_has_the_layouts_and_losses_of_the_scan(eight_devices):
    """`epoch_loop="steps"` on (4, 2): the order's program constrains [M, B] over "data", the
    step's has the scan's step constraints, and both they and the evaluation take and return
    whole copies; its first epoch has the one-device losses."""
    layouts = eight_devices["stepwise"]
    assert layouts["order"]["constraints"] == ORDER_CONSTRAINT
    assert layouts["step"]["constraints"] == STEP_CONSTRAINTS
    assert layouts["evaluate"]["constraints"] == {}
    for name in ("order", "step", "evaluate"):
        assert layouts[name]["mesh"] == '"data"=4, "samples"=2'
        assert _is_replicated(layouts[name]["inputs"]), name
        assert _is_replicated(layouts[name]["outputs"]), name
    reference = eight_devices["losses"]["1x1"][: NUM_TRAIN // 16]
    np.testing.assert_allclose(
        eight_devices["losses"]["4x2 steps"], reference, rtol=1e-5, atol=1e-5
    )


def test_training_loop_gives_its_programs_whole_copies(eight_devices):
    """`train_and_evaluate` on (4, 2): the state, data and keys each epoch receives (33 arrays),
    and the parameters, data and key of each evaluation (validation and test, 11 arrays), are
    replicated over the whole mesh (the keys and initial state are made on the mesh)."""
    calls = eight_devices["loop_inputs"]
    assert [len(c) for c in calls["epoch"]] == [33, 33]  # epoch 1, and epoch 2 after the resume
    assert [len(c) for c in calls["evaluate"]] == [11] * 4
    assert all(all(c) for c in calls["epoch"] + calls["evaluate"])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("4,2,3", "mesh.samples=2 is invalid: allowed is a divisor of objective.num_samples=3"),
        ("3,-1,8", "mesh.data=3 is invalid: allowed is a divisor of batch_size=16"),
    ],
)
def test_bad_mesh_on_eight_devices_names_the_field(eight_devices, case, expected):
    assert expected in eight_devices["errors"][case]


def test_a_mesh_may_take_fewer_devices_than_there_are(eight_devices):
    """On 8 devices a 2 × 2 mesh takes the first 4, and mesh.data = -1 with a batch of 12 takes
    6, the most that divide it (a batch of 100 on 8 GPUs runs on 4, rather than not at all)."""
    assert eight_devices["errors"]["2,2,8"] == eight_devices["errors"]["-1,1,4"] == ""
    assert eight_devices["fewer"]["2,2,8"] == [[2, 2], [0, 1, 2, 3]]
    assert eight_devices["fewer"]["-1,1,4"] == [[6, 1], [0, 1, 2, 3, 4, 5]]


def test_config_without_a_mesh_splits_the_batch_over_every_device(eight_devices):
    """No `config.mesh`: the default is data = -1, samples = 1 (the minibatch over all 8)."""
    assert eight_devices["default_mesh"] == {"data": 8, "samples": 1}


# In this process (one device) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "samples", "devices", "expected"),
    [((-1, 1, 8, (8, 1))), (2, -1, 8, (2, 4)), (-1, 4, 8, (2, 4)), (4, 2, 8, (4, 2))]
    + [(-1, 1, 1, (1, 1)), (1, -1, 1, (1, 1)), (2, 1, 8, (2, 1)), (3, -1, 8, (3, 2))]
    + [(-1, 1, 5, (4, 1)), (-1, 3, 8, (2, 3)), (1, -1, 7, (1, 6)), (-1, 1, 40, (32, 1))],
)
def test_mesh_shape_takes_the_devices_the_other_axis_leaves(data, samples, devices, expected):
    """-1 takes the most of the devices the other axis leaves that its own count divides
    (B = 96, K = 12 here); a mesh may use fewer devices than there are."""
    mesh = ml_collections.ConfigDict({"data": data, "samples": samples})
    assert parallel.mesh_shape(mesh, devices, batch_size=96, num_samples=12) == expected


@pytest.mark.parametrize(
    ("data", "samples", "expected"),
    [(-1, 1, (8, 1)), (-1, 2, (4, 2)), (4, -1, (4, 2)), (2, 4, (2, 4))],
)
def test_a_multi_host_mesh_takes_every_device(data, samples, expected):
    mesh = ml_collections.ConfigDict({"data": data, "samples": samples})
    shape = parallel.mesh_shape(mesh, 8, batch_size=64, num_samples=8, every_device=True)
    assert shape == expected


@pytest.mark.parametrize(
    ("data", "samples", "devices", "batch_size", "num_samples", "field", "allowed"),
    [
        (-1, -1, 8, 64, 8, "mesh.samples=-1", "one axis at most"),
        (0, 1, 8, 64, 8, "mesh.data=0", "a positive integer, or -1"),
        (2.0, 1, 2, 64, 8, "mesh.data=2.0", "a positive integer, or -1"),
        (1, True, 1, 64, 8, "mesh.samples=True", "a positive integer, or -1"),
        (3, -1, 8, 64, 8, "mesh.data=3", "a divisor of batch_size=64"),
        (-1, 3, 8, 64, 8, "mesh.samples=3", "a divisor of objective.num_samples=8"),
        (9, -1, 8, 64, 8, "mesh.data=9", "at most the 8 devices"),
        (-1, 9, 8, 64, 8, "mesh.samples=9", "at most the 8 devices"),
        (8, 2, 8, 64, 8, "mesh.data=8", "8 × 2 = 16 at most the 8 devices"),
        (2, 1, 1, 64, 8, "mesh.data=2", "2 × 1 = 2 at most the 1 device "),
        (4, 2, 8, 64, 3, "mesh.samples=2", "a divisor of objective.num_samples=3"),
        (1, 8, 8, 64, 4, "mesh.samples=8", "a divisor of objective.num_samples=4"),
        (2, 1, "8 hosts", 64, 8, "mesh.data=2", "2 × 1 = 2 equal to the 8 devices of this"),
        (3, -1, "8 hosts", 64, 8, "mesh.data=3", "a divisor of the 8 devices of this multi"),
        (-1, 1, "8 hosts", 100, 8, "mesh.data=-1", "a divisor of batch_size=100"),
    ],
)
def test_bad_mesh_is_a_config_error_naming_the_field(
    data, samples, devices, batch_size, num_samples, field, allowed
):
    """ "8 hosts": 8 devices of a multi-host job, where the mesh must cover every device."""
    mesh = ml_collections.ConfigDict({"data": data, "samples": samples})
    every_device = devices == "8 hosts"
    devices = 8 if every_device else devices
    with pytest.raises(ConfigError) as info:
        parallel.mesh_shape(
            mesh,
            devices,
            batch_size=batch_size,
            num_samples=num_samples,
            every_device=every_device,
        )
    assert f"config field {field} is invalid" in str(info.value)
    assert allowed in str(info.value)


def test_build_checks_the_mesh_against_the_devices_before_any_compute():
    """`build` with 8 stand-in devices: the checks run on their count, before a mesh exists."""
    config = _mesh_config(_tiny_config(), 4, 2)
    config.objective.num_samples = 3
    with pytest.raises(ConfigError, match=r"objective\.num_samples=3"):
        train.build(config, NUM_TRAIN, (28, 28, 1), devices=jax.devices() * 8)
    config = _mesh_config(_tiny_config(), 2, 1)  # 2 devices asked, 1 here
    with pytest.raises(ConfigError, match=r"mesh\.data=2 .* at most the 1 device "):
        train.build(config, NUM_TRAIN, (28, 28, 1))


def test_one_device_program_has_no_sharding_annotation_of_bbb():
    """On one device the mesh adds nothing: no constraint beyond the one inside jax.random."""
    config = _tiny_config()
    experiment = train.build(config, NUM_TRAIN, (28, 28, 1))
    assert not parallel.is_sharded(experiment.mesh)
    keys = train.root_keys(config)
    state = jax.eval_shape(lambda: train.init_state(experiment, keys["init"]))
    data = (jnp.zeros((NUM_TRAIN, 28, 28, 1)), jnp.zeros((NUM_TRAIN,), jnp.int32))
    text = train.compile_epoch(experiment).lower(state, data, np.int32(0), keys).as_text()
    constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
    assert all("tensor<2xui32>" in line for line in constraints), constraints  # PRNG key data


def test_cli_bad_mesh_exits_2_and_leaves_the_workdir(tmp_path):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    config = test_config.get_config()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    (workdir / "keep.txt").write_text("precious")
    before = _digest(str(workdir))
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "train.py"),
            "--config=configs/test.py",
            f"--workdir={workdir}",
            "--config.mesh.data=2",  # one device here
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "mesh.data=2" in result.stderr and "at most the 1 device " in result.stderr
    assert _digest(str(workdir)) == before


# Processes ----------------------------------------------------------------------------------


def test_only_process_0_is_the_main_process(monkeypatch):
    assert parallel.is_main_process()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert not parallel.is_main_process()


@functools.cache
def _small_state() -> train.TrainState:
    posterior = MeanFieldGaussian(
        mu={"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}, rho={"w": jnp.full((3, 4), -3.0)}
    )
    return train.TrainState(step=jnp.int32(5), params={"posterior": posterior}, opt_state={})


def _record(step: int) -> dict:
    return {"step": step, "epoch": 1, "train/loss": 1.0, "eval/val_error": 0.5}


def test_other_processes_write_only_checkpoints(tmp_path, monkeypatch, capsys):
    """Process 1 of a multi-host job: no logs, metrics, plots, TensorBoard or config.json; it
    still calls Orbax's save, which every process must."""
    monkeypatch.setattr(parallel, "is_main_process", lambda: False)
    workdir = str(tmp_path / "wd")
    run = Run(workdir, test_config.get_config())
    state, _ = run.restore(_small_state())
    run.write_metrics(_record(5), state)
    run.save(state, History())
    run.finish(state, History(), wall_time=1.0, steps_done=5)
    assert os.listdir(workdir) == ["checkpoints"]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["5"]
    assert capsys.readouterr().out == ""


def test_process_0_writes_the_logs(tmp_path):
    workdir = str(tmp_path / "wd")
    run = Run(workdir, test_config.get_config())
    run.restore(_small_state())  # Writes config.json, once no checkpoint failed to load.
    run.write_metrics(_record(5), _small_state())
    run.save(_small_state(), History())
    run.close()
    assert {"config.json", "metrics.jsonl", "tensorboard", "checkpoints", "plots"} <= set(
        os.listdir(workdir)
    )


def test_multihost_without_a_cluster_is_a_clear_error(monkeypatch):
    def no_cluster():
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    with pytest.raises(ConfigError, match=r"--multihost.*SLURM \(srun\)"):
        parallel.initialize_multihost()


def test_a_stop_on_any_process_stops_every_process(monkeypatch):
    from jax.experimental import multihost_utils

    assert parallel.any_process(True) and not parallel.any_process(False)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    gathered = []

    def allgather(flag):  # This process's flag, and another process's that got SIGTERM.
        gathered.append(int(flag))
        return np.array([int(flag), 1])

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    assert parallel.any_process(False)
    assert gathered == [0]
