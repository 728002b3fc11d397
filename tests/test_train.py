"""End-to-end tests of the training loop on real (prepared) MNIST, with configs/test.py."""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bbb import train
from bbb.errors import ConfigError
from bbb.workdir import WorkdirError
from configs import test as test_config
from tests.conftest import REPO, all_equations, saved_run


@pytest.fixture(autouse=True)
def cached_data(monkeypatch):
    """Loads MNIST once per test session (TensorFlow's import alone takes seconds)."""
    monkeypatch.setattr(train, "load_data", _cached_load)


@functools.cache
def _load(key: str):
    config = test_config.get_config()
    config.data.train_subset, config.data.eval_subset = json.loads(key)
    return _original_load(config)


_original_load = train.load_data


def _cached_load(config):
    return _load(json.dumps([config.data.train_subset, config.data.eval_subset]))


def _read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _digest(workdir):
    """A hash of every file's path and bytes under `workdir`."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(workdir, "**"), recursive=True)):
        if os.path.isfile(path):
            digest.update(path.encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One run of configs/test.py, shared by the tests that read its files."""
    workdir = str(tmp_path_factory.mktemp("run") / "wd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "load_data", _cached_load)
        summary = train.train_and_evaluate(test_config.get_config(), workdir)
    return workdir, summary


def test_end_to_end_writes_every_file(finished_run):
    workdir, summary = finished_run
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    for name in ("learning_curves.png", "posterior_histograms.png"):
        assert os.path.getsize(os.path.join(workdir, "plots", name)) > 1000, name
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert os.listdir(os.path.join(workdir, "checkpoints"))
    records = _read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1, 2]
    required = (
        "step epoch train/loss train/nll train/kl train/kl_weight eval/val_error "
        "eval/test_error eval/test_nll eval/test_error_mean_weights"
    ).split()
    for r in records:
        assert set(required) <= set(r), set(required) - set(r)
    assert records[-1]["step"] == 2 * (2048 // 64)
    with open(os.path.join(workdir, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == pytest.approx(summary)
    for key in (
        "test_error test_error_mean_weights test_nll best_val_error test_error_at_best_val "
        "epochs wall_time_s steps_per_s"
    ).split():
        assert key in on_disk, key
    assert on_disk["epochs"] == 2
    assert 0.0 <= on_disk["test_error"] < 0.9  # It learned something in 64 steps.
    # The logged KL weight is the epoch's mean, 1/M (M = 32); the per-step weights are checked
    # in test_blundell_kl_weights_reach_each_step_of_each_epoch.
    assert records[0]["train/kl_weight"] == pytest.approx(1 / 32)


def test_tensorboard_has_curves_and_histograms(finished_run):
    from tensorboard.backend.event_processing import event_accumulator

    workdir, _ = finished_run
    acc = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard"), size_guidance={"histograms": 0, "scalars": 0}
    )
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/kl", "eval/test_error"} <= set(tags["scalars"])
    assert {"posterior/sigma", "posterior/log10_snr"} <= set(tags["histograms"])


def test_learning_decreases_the_loss(finished_run):
    records = _read_metrics(finished_run[0])
    assert records[1]["train/nll"] < records[0]["train/nll"]


def test_a_different_config_or_a_rerun_leaves_a_finished_run_as_it_was(existing_workdir):
    """A valid config that differs in a field a resumed run may not change is refused; the
    same config started again trains nothing and rewrites nothing (its summary keeps the
    wall time of the run that made it)."""
    before = _digest(existing_workdir)
    with open(os.path.join(existing_workdir, "summary.json")) as f:
        summary = json.load(f)
    config = test_config.get_config()
    config.prior.sigma1 = 0.5
    with pytest.raises(WorkdirError, match=r"prior\.sigma1: 1\.0 -> 0\.5"):
        train.train_and_evaluate(config, existing_workdir)
    assert _digest(existing_workdir) == before
    compiled = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "compile_epoch", lambda *a: compiled.append(a))
        again = train.train_and_evaluate(test_config.get_config(), existing_workdir)
    assert not compiled
    assert again == summary and summary["wall_time_s"] > 0
    assert _digest(existing_workdir) == before


def _sgd_rates(schedule: str, num_epochs: int, steps: int = 64) -> np.ndarray:
    """The learning rate of each of the first `steps` steps (M = 32), read from SGD's updates."""
    config = test_config.get_config()
    config.optim.name, config.optim.schedule = "sgd", schedule
    tx = train.make_optimizer(config.optim, 32, num_epochs)
    params = {"w": jnp.zeros(())}
    state, rates = tx.init(params), []
    for _ in range(steps):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        rates.append(-float(updates["w"]))
    return np.asarray(rates)


@pytest.mark.parametrize("warmup_epochs", [0.0, 0.5])
def test_step_schedule_and_warm_up_rates_step_by_step(warmup_epochs):
    """M = 4 steps per epoch, η = 0.1 × 10⁻¹ at epochs 1.5 and 2 (global steps 6 and 8), after a
    linear warm-up from 0 over the first warmup_epochs · M steps."""
    config = test_config.get_config().optim
    config.name, config.schedule, config.learning_rate = "sgd", "step", 0.1
    config.step_epochs, config.step_factor, config.warmup_epochs = (1.5, 2), 0.1, warmup_epochs
    tx = train.make_optimizer(config, 4, 3)
    params = {"w": jnp.zeros(())}
    state, rates = tx.init(params), []
    for _ in range(12):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        rates.append(-float(updates["w"]))
    expected = [0.1] * 6 + [0.01] * 2 + [0.001] * 4
    if warmup_epochs:
        expected[:2] = [0.0, 0.05]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


def test_where_the_data_are_and_how_the_epoch_loops_may_change_on_resume(tmp_path):
    """Locations and the loop's form change nothing trained; the learning rate does."""
    from bbb import workdir as workdir_lib

    saved_run(tmp_path / "wd", test_config.get_config())
    moved = test_config.get_config()
    moved.data.data_dir, moved.data.cache_dir = "/elsewhere/tfds", "/elsewhere/cache"
    moved.data.manual_dir, moved.epoch_loop = "/elsewhere/idx", "steps"
    workdir_lib.check_workdir(str(tmp_path / "wd"), moved)
    moved.optim.learning_rate *= 2
    with pytest.raises(WorkdirError, match=r"optim\.learning_rate"):
        workdir_lib.check_workdir(str(tmp_path / "wd"), moved)


@pytest.mark.parametrize("schedule", ["cosine", "constant", "step"])
def test_num_epochs_may_change_on_resume_unless_the_schedule_decays_over_it(tmp_path, schedule):
    """A run of 2 epochs resumed with 4 would follow another schedule over its first 2 epochs
    under "cosine" only; check_workdir refuses exactly that case."""
    from bbb import workdir as workdir_lib

    config = test_config.get_config()
    config.optim.schedule = schedule
    saved_run(tmp_path / "wd", config)
    workdir_lib.check_workdir(str(tmp_path / "wd"), config)  # The same config: fine.
    longer = test_config.get_config()
    longer.optim.schedule = schedule
    longer.num_epochs = 4
    same_rates = np.array_equal(_sgd_rates(schedule, 2), _sgd_rates(schedule, 4))
    assert same_rates == (schedule != "cosine")
    if schedule == "cosine":
        with pytest.raises(WorkdirError, match=r"num_epochs=2 .*cosine.*num_epochs=4"):
            workdir_lib.check_workdir(str(tmp_path / "wd"), longer)
    else:
        workdir_lib.check_workdir(str(tmp_path / "wd"), longer)


def test_resume_is_bit_for_bit(tmp_path):
    """Stop after one epoch, resume with the same command, and compare with an uninterrupted
    run: every logged number and every parameter must be identical."""
    config = test_config.get_config()
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(config, straight)

    resumed = str(tmp_path / "resumed")
    assert train.train_and_evaluate(config, resumed, stop_after_epochs=1) is None
    assert len(_read_metrics(resumed)) == 1
    assert not os.path.exists(os.path.join(resumed, "summary.json"))
    train.train_and_evaluate(config, resumed)

    a, b = _read_metrics(straight), _read_metrics(resumed)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        assert ra == rb  # exact float equality, every logged number
    summaries = []
    for workdir in (straight, resumed):
        with open(os.path.join(workdir, "summary.json")) as f:
            summaries.append(json.load(f))
        for timing in ("wall_time_s", "steps_per_s"):  # Of each session, not of the run.
            summaries[-1].pop(timing)
    assert summaries[0] == summaries[1]  # best validation and its epoch restored with the state
    # The final checkpoints hold the same parameters.
    import orbax.checkpoint as ocp

    restored = [
        ocp.CheckpointManager(os.path.join(w, "checkpoints")).restore(64)["state"]
        for w in (straight, resumed)
    ]
    for x, y in zip(*(jax.tree_util.tree_leaves(r) for r in restored), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_best_validation_record_is_saved_and_restored_with_the_state(tmp_path):
    """The checkpoint holds the best-validation record, and a resumed run continues from it
    (the test config's validation error falls every epoch, so the comparison of a straight and
    a resumed run above cannot tell a restored record from a fresh one)."""
    import orbax.checkpoint as ocp

    config = test_config.get_config()
    workdir = str(tmp_path / "wd")
    train.train_and_evaluate(config, workdir, stop_after_epochs=1)
    (first,) = _read_metrics(workdir)
    history_file = os.path.join(workdir, "checkpoints", "32", "history", "metadata")
    with open(history_file) as f:
        saved = json.load(f)
    assert saved == {
        "best_val_error": first["eval/val_error"],
        "best_epoch": 1,
        "test_error_at_best_val": first["eval/test_error"],
    }
    assert ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).latest_step() == 32
    # A record that epoch 2 cannot beat: the resumed run must keep it.
    with open(history_file, "w") as f:
        json.dump({**saved, "best_val_error": 0.0, "test_error_at_best_val": 0.125}, f)
    summary = train.train_and_evaluate(config, workdir)
    assert (summary["best_epoch"], summary["best_val_error"]) == (1, 0.0)
    assert summary["test_error_at_best_val"] == 0.125


def test_an_epoch_takes_whole_minibatches_of_distinct_examples():
    """N = 100, B = 16: M = 6 minibatches of distinct examples; the 4 left over differ from
    epoch to epoch (a fresh permutation each), so every example is used equally often in
    expectation, and the KL is spread over the M steps that run."""
    config = test_config.get_config()
    config.batch_size = 16
    experiment = train.build(config, 100, (28, 28, 1), trace=False)
    keys = train.root_keys(config)
    assert experiment.steps_per_epoch == 6
    left_out = []
    for epoch in range(3):
        order = np.asarray(train.epoch_order(experiment, 100, jnp.int32(epoch), keys))
        assert order.shape == (6, 16)
        assert len(set(order.ravel())) == 96 and set(order.ravel()) <= set(range(100))
        left_out.append(frozenset(range(100)) - frozenset(order.ravel()))
    assert len(set(left_out)) == 3
    # The KL is shared by the M steps that run (π_i = 1/M sums to 1 over the epoch), and the
    # likelihood is scaled to all N examples.
    assert experiment.free_energy.num_batches == 6
    assert experiment.free_energy.num_train == 100


def test_epoch_is_compiled_once(tmp_path):
    """The jitted epoch is traced once: later epochs (and another epoch index) reuse it."""
    config = test_config.get_config()
    splits = train.load_data(config)
    x, y = splits["train"]
    experiment = train.build(config, num_train=x.shape[0], input_shape=x.shape[1:])
    keys = train.root_keys(config)
    state = train.init_state(experiment, keys["init"])
    epoch_fn = train.compile_epoch(experiment)
    data = (jnp.asarray(x), jnp.asarray(y))
    for epoch in range(3):
        state, _ = epoch_fn(state, data, jnp.int32(epoch), keys)
    assert epoch_fn._cache_size() == 1
    eval_fn = train.compile_evaluate(experiment)
    for split in ("validation", "test"):
        eval_fn(state.params, tuple(jnp.asarray(a) for a in splits[split]), keys["eval"])
    assert eval_fn._cache_size() == 1


@pytest.mark.parametrize(
    ("estimator", "posterior_name"),
    [("reparam", "mean_field"), ("local_reparam", "mean_field"), ("reparam", "point")],
)
def test_the_update_copies_no_parameter(estimator, posterior_name):
    """The new parameters are written over the old ones (the step's state is donated; the
    epoch's scan carries it). Unless every reader of the old parameters comes first in the
    data flow (`train._after`), XLA copies each parameter that one of them reads (μ, for the
    loss's KL term and the layers' input gradients) every step."""
    config = test_config.get_config()
    config.posterior.estimator, config.posterior.name = estimator, posterior_name
    if posterior_name == "point":
        config.prior.name, config.objective.kl = "flat", "mc"
    experiment = train.build(config, num_train=256, input_shape=(28, 28, 1))
    keys = train.root_keys(config)
    state = train.init_state(experiment, keys["init"])
    x = jnp.zeros((256, 28, 28, 1), jnp.float32)
    y = jnp.zeros((256,), jnp.int32)
    step = jax.jit(functools.partial(train.train_step, experiment), donate_argnums=0)
    step_hlo = step.lower(state, (x[:64], y[:64]), keys["train"]).compile().as_text()
    epoch_hlo = (
        train.compile_epoch(experiment).lower(state, (x, y), jnp.int32(0), keys).compile().as_text()
    )
    kernels = {tuple(k.shape) for k in jax.tree_util.tree_leaves(state.params) if k.ndim == 2}
    assert kernels == {(784, 32), (32, 32), (32, 10)}
    for hlo in (step_hlo, epoch_hlo):
        copied = re.findall(r"= f32\[(\d+),(\d+)\]\{1,0\} copy\(", hlo)
        assert not {(int(a), int(b)) for a, b in copied} & kernels, copied


def _stored_once(hlo: str) -> int:
    """The fused computations of a compiled program that end in `materialize`'s x · d / d
    (d = 2 where x = 1: a comparison for equality and a division)."""
    return sum("direction=EQ" in c and " divide(" in c for c in re.split(r"\n(?=\S)", hlo))


@pytest.mark.parametrize(
    ("posterior_name", "prior", "chain"),
    [("point", "flat", False), ("point", "gaussian", True), ("point", "scale_mixture", True)],
)
def test_the_step_stores_its_gradients_once_only_after_elementwise_work(
    posterior_name, prior, chain
):
    """A penalty's (or σ's) elementwise chain between the backward pass and the gradients is
    stored once, one `materialize` per parameter; a point estimate under the flat prior has
    none, and its gradients, the backward pass's products, are not copied again."""
    config = test_config.get_config()
    config.posterior.name, config.prior.name, config.objective.kl = posterior_name, prior, "mc"
    experiment = train.build(config, num_train=256, input_shape=(28, 28, 1))
    keys = train.root_keys(config)
    state = train.init_state(experiment, keys["init"])
    assert train.has_gradient_chain(experiment, state.params) == chain
    batch = (jnp.zeros((64, 28, 28, 1), jnp.float32), jnp.zeros((64,), jnp.int32))
    step = jax.jit(functools.partial(train.train_step, experiment))
    hlo = step.lower(state, batch, keys["train"]).compile().as_text()
    leaves = len(jax.tree_util.tree_leaves(state.params))
    assert leaves == 6  # Three Dense layers' kernels and biases.
    assert _stored_once(hlo) == (leaves if chain else 0)


def test_every_posterior_with_scales_has_a_gradient_chain():
    for prior, kl in (("flat", "mc"), ("gaussian", "closed_form"), ("scale_mixture", "mc")):
        config = test_config.get_config()
        config.posterior.name, config.prior.name, config.objective.kl = "mean_field", prior, kl
        experiment = train.build(config, num_train=256, input_shape=(28, 28, 1))
        state = train.init_state(experiment, train.root_keys(config)["init"])
        assert train.has_gradient_chain(experiment, state.params), prior


def test_after_returns_its_tree_bit_for_bit_whatever_the_values():
    # (Subnormals flush to 0 in any arithmetic on XLA:CPU; the gradients it gets have none.)
    tree = {"a": jnp.asarray([-0.0, 1e-30, 3.0, -jnp.inf, jnp.nan], jnp.float32)}
    for value in (0.0, -2.5, jnp.inf, -jnp.inf, jnp.nan):
        out = jax.jit(train._after)(tree, {"loss": jnp.float32(value), "n": jnp.int32(3)})
        assert np.asarray(out["a"]).tobytes() == np.asarray(tree["a"]).tobytes(), value


def test_stepwise_epoch_runs_the_scans_steps_and_compiles_once():
    """`epoch_loop="steps"` draws the same batches and keys as the scan: same trajectory."""
    config = test_config.get_config()
    x, y = train.load_data(config)["train"]
    data = (jnp.asarray(x), jnp.asarray(y))
    results = {}
    for loop in ("scan", "steps"):
        config.epoch_loop = loop
        experiment = train.build(config, num_train=x.shape[0], input_shape=x.shape[1:])
        keys = train.root_keys(config)
        state = train.init_state(experiment, keys["init"])
        epoch_fn = train.compile_epoch(experiment)
        losses = []
        for epoch in range(2):
            state, metrics = epoch_fn(state, data, np.int32(epoch), keys)
            losses.append(np.asarray(metrics["loss"]))
        assert epoch_fn._cache_size() == 1
        assert losses[0].shape == (experiment.steps_per_epoch,)
        results[loop] = (np.concatenate(losses), state)
    assert isinstance(train.compile_epoch(experiment), train.StepwiseEpoch)
    np.testing.assert_allclose(results["steps"][0], results["scan"][0], rtol=1e-5)
    assert int(results["steps"][1].step) == int(results["scan"][1].step)
    leaves = [jax.tree_util.tree_leaves(results[k][1].params) for k in ("scan", "steps")]
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loop", ["scan", "steps"])
def test_sigma_mean_is_the_epochs_last_and_the_step_does_not_compute_it(loop):
    """`train/sigma_mean` is the posterior's mean σ = softplus(ρ) at the end of the epoch
    (numpy, float64), in both loops; the step itself leaves it out (its pass over every σ
    would cost each step)."""
    config = test_config.get_config()
    config.epoch_loop = loop
    num_batches, batch_size = 3, config.batch_size
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(size=(num_batches * batch_size, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=num_batches * batch_size), jnp.int32)
    experiment = train.build(config, num_train=x.shape[0], input_shape=(28, 28, 1))
    keys = train.root_keys(config)
    state = train.init_state(experiment, keys["init"])
    epoch_fn = train.compile_epoch(experiment)

    def numpy_sigma_mean(params):
        rho = [
            np.asarray(r, np.float64) for r in jax.tree_util.tree_leaves(params["posterior"].rho)
        ]
        return np.concatenate([np.logaddexp(r, 0.0).ravel() for r in rho]).mean()

    at_start = numpy_sigma_mean(state.params)
    for epoch in range(2):
        state, metrics = epoch_fn(state, (x, y), np.int32(epoch), keys)
        sigma = np.asarray(jax.device_get(metrics["sigma_mean"]))
        assert sigma.shape == (num_batches,)
        np.testing.assert_allclose(sigma, numpy_sigma_mean(state.params), rtol=2e-6)
    assert abs(sigma[0] / at_start - 1) > 1e-4  # The updates moved σ: the end is not the start.
    _, step_metrics = train.train_step(
        experiment, state, (x[:batch_size], y[:batch_size]), keys["train"]
    )
    assert "sigma_mean" not in step_metrics and "loss" in step_metrics


# π_t of steps t = 0 … 7 (two epochs of M = 4): Blundell's 2^(M−i)/(2^M − 1) in every epoch,
# and the anneal ramp min(1, (t + 1) / W) / M with W = 6 (by hand).
_KL_WEIGHTS = {
    "blundell": (0, np.array([[8, 4, 2, 1], [8, 4, 2, 1]]) / 15),
    "anneal": (6, np.array([[1, 2, 3, 4], [5, 6, 6, 6]]) / 6 / 4),
}


@pytest.mark.parametrize("schedule", sorted(_KL_WEIGHTS))
@pytest.mark.parametrize("loop", ["scan", "steps"])
def test_kl_schedule_weights_reach_each_step_of_each_epoch(loop, schedule):
    """Through the real epoch loop, step t weights the KL by the schedule's π_t: Blundell's
    2^(M−i)/(2^M − 1) at position i of every epoch, and "anneal"'s ramp over
    objective.kl_warmup_steps steps of the run.

    The logged `train/kl_weight` is the epoch's mean (1/M under Blundell's), so only the
    per-step metrics can show that the global step (and the warm-up length) reaches the
    schedule, and that the weight is the one the loss used: loss = M π_t KL / N + nll at T = 1.
    """
    warmup, expected = _KL_WEIGHTS[schedule]
    config = test_config.get_config()
    config.objective.kl_schedule, config.objective.kl_warmup_steps = schedule, warmup
    config.epoch_loop = loop
    num_batches, batch_size = 4, config.batch_size
    rng = np.random.default_rng(0)
    num_train = num_batches * batch_size
    x = jnp.asarray(rng.uniform(size=(num_train, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=num_train), jnp.int32)
    experiment = train.build(config, num_train=num_train, input_shape=(28, 28, 1))
    assert experiment.steps_per_epoch == num_batches
    keys = train.root_keys(config)
    state = train.init_state(experiment, keys["init"])
    epoch_fn = train.compile_epoch(experiment)
    for epoch in range(2):
        state, metrics = epoch_fn(state, (x, y), np.int32(epoch), keys)
        metrics = jax.device_get(metrics)
        np.testing.assert_allclose(metrics["kl_weight"], expected[epoch], rtol=1e-6)
        np.testing.assert_allclose(
            metrics["loss"],
            num_batches * expected[epoch] * metrics["kl"] / num_train + metrics["nll"],
            rtol=1e-5,
        )
    assert int(state.step) == 2 * num_batches


def test_unknown_epoch_loop_is_a_config_error():
    config = test_config.get_config()
    config.epoch_loop = "while"
    with pytest.raises(ConfigError, match=r"epoch_loop.*'while'.*scan.*steps"):
        train.build(config, num_train=1000, input_shape=(28, 28, 1))


def test_cpu_vector_width_is_chosen_for_the_cpu_and_reaches_every_program(tmp_path):
    """0 takes 512-bit vectors for a program that draws noise on a CPU with AVX-512 and XLA's
    default otherwise; a width set in the config is taken as it is; accelerators get no CPU
    option. The options reach the compilation of the epoch (both loops) and of the
    evaluation."""
    width = "xla_cpu_prefer_vector_width"
    assert train.compiler_options(0, "cpu", True, avx512=True) == {width: 512}
    assert train.compiler_options(0, "cpu", True, avx512=False) == {}
    assert train.compiler_options(0, "cpu", False, avx512=True) == {}  # No noise to draw.
    assert train.compiler_options(256, "cpu", True, avx512=True) == {width: 256}
    assert train.compiler_options(128, "cpu", False, avx512=False) == {width: 128}
    assert train.compiler_options(512, "gpu", True) == {}
    assert train.compiler_options(0, "tpu", True) == {}
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512dq\n")
    assert train.cpu_has_avx512(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_vnni\n")
    assert not train.cpu_has_avx512(str(cpuinfo))
    assert not train.cpu_has_avx512(str(tmp_path / "absent"))

    config = test_config.get_config()
    auto = train.build(config, num_train=64, input_shape=(28, 28, 1)).compiler_options
    assert auto == (((width, 512),) if train.cpu_has_avx512() else ())
    config.posterior.name, config.objective.kl = "point", "mc"
    assert train.build(config, num_train=64, input_shape=(28, 28, 1)).compiler_options == ()
    config.cpu_vector_bits = 256
    experiment = train.build(config, num_train=64, input_shape=(28, 28, 1))
    assert experiment.compiler_options == ((width, 256),)
    assert train.jit_options(experiment) == {"compiler_options": {width: 256}}
    # An option XLA does not know fails the compilation of each program that carries it.
    broken = dataclasses.replace(experiment, compiler_options=(("xla_cpu_no_such_option", 1),))
    state = train.init_state(broken, jax.random.key(0))
    data = (jnp.zeros((64, 784)), jnp.zeros((64,), jnp.int32))
    keys = train.root_keys(config)
    epoch = train.compile_epoch(broken)
    stepwise = train.StepwiseEpoch(broken)
    order = jnp.zeros((1, config.batch_size), jnp.int32)
    programs = [
        lambda: epoch.lower(state, data, np.int32(0), keys),
        lambda: stepwise._step.lower(state, data, order, np.int32(0), keys),
        lambda: train.compile_evaluate(broken).lower(state.params, data, keys["eval"]),
    ]
    for lower in programs:
        lower()  # Lowering is option-free; compiling reads them.
        with pytest.raises(Exception, match="xla_cpu_no_such_option"):
            lower().compile()


def test_no_compilation_after_the_first_epoch(tmp_path):
    """Counts XLA compilations in whole runs: 2 and 4 epochs compile the same number."""
    counts = []

    def run(num_epochs, workdir):
        events = []

        def listener(event, duration, **kwargs):
            if event == "/jax/compilation_cache/compile_requests_use_cache" or (
                event.endswith("backend_compile_duration")
            ):
                events.append(event)

        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            config = test_config.get_config()
            config.num_epochs = num_epochs
            train.train_and_evaluate(config, workdir)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        return len(events)

    jax.clear_caches()
    counts.append(run(2, str(tmp_path / "a")))
    jax.clear_caches()
    counts.append(run(4, str(tmp_path / "b")))
    assert counts[0] > 0
    assert counts[0] == counts[1]


BAD_VALUES = [
    ("prior.name", "nope", "prior.name"),
    ("prior.name", "no_such_module:prior", "prior.name"),
    ("prior.sigma1", -1.0, "prior.sigma1"),
    ("prior.sigma2", 0.0, "prior.sigma2"),
    ("prior.sigma2", 1e-20, "prior.sigma2"),  # (w / σ2)² overflows float32: NaN at w = 0.
    ("prior.pi", 1.5, "prior.pi"),
    ("prior.pi", 0.0, "prior.pi"),
    ("objective.num_samples", 0, "objective.num_samples"),
    ("objective.kl", "exact", "objective.kl"),
    ("objective.kl", "closed_form", "objective.kl"),  # the scale mixture has none
    ("objective.kl_schedule", "cyclic", "objective.kl_schedule"),
    ("objective.kl_temperature", -1.0, "objective.kl_temperature"),
    ("posterior.estimator", "magic", "posterior.estimator"),
    ("posterior.name", "full_rank", "posterior.name"),
    ("posterior.noise", "philox", "posterior.noise"),
    ("posterior.init_rho", 99.0, "posterior.init_rho"),
    ("batch_size", 10**6, "batch_size"),
    ("batch_size", -8, "batch_size"),
    ("num_epochs", 0, "num_epochs"),
    ("model.hidden_sizes", (32, -4), "model.hidden_sizes"),
    ("model.activation", "swish2", "model.activation"),
    ("model.dropout_rate", 1.0, "model.dropout_rate"),
    ("model.dtype", "float16", "model.dtype"),
    ("optim.name", "lbfgs", "optim.name"),
    ("optim.learning_rate", 0.0, "optim.learning_rate"),
    ("eval.num_samples", 0, "eval.num_samples"),
    ("eval.sample_batch", 0, "eval.sample_batch"),
    ("data.name", "cifar10", "data.name"),
    ("data.num_train", 70000, "data.num_train"),
    ("likelihood.name", "poisson", "likelihood.name"),
    ("likelihood.name", "gaussian", "likelihood.name"),  # MNIST's labels are classes.
    ("model.num_outputs", 5, "model.num_outputs"),  # MNIST has ten.
    ("prng_impl", "mersenne", "prng_impl"),
    ("cpu_vector_bits", 384, "cpu_vector_bits"),
    ("seed", 2**32, "seed"),  # JAX keys seeds by 32 bits: this would repeat seed 0.
]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"schedule": "step", "step_epochs": ("x",)}, "optim.step_epochs"),
        ({"schedule": "step", "step_epochs": (-3,)}, "optim.step_epochs"),
        ({"schedule": "step", "step_epochs": (2, 2)}, "optim.step_epochs"),
        ({"schedule": "step", "step_epochs": ()}, "optim.step_epochs"),
        ({"schedule": "step", "step_epochs": (1,), "warmup_epochs": 1}, "optim.step_epochs"),
        ({"name": "momentum", "momentum": 1.0}, "optim.momentum"),
        ({"name": "momentum", "momentum": -0.1}, "optim.momentum"),
    ],
)
def test_bad_optimiser_fields_are_named(fields, named):
    config = test_config.get_config().optim
    config.update(fields)
    with pytest.raises(ConfigError, match=re.escape(named)):
        train.make_optimizer(config, steps_per_epoch=4, num_epochs=3)
    if "step_epochs" in fields:  # The same schedule with good epochs builds.
        config.step_epochs, config.warmup_epochs = (1.5, 2), 0
        train.make_optimizer(config, steps_per_epoch=4, num_epochs=3)


def test_divergence_names_the_earliest_bad_step_of_any_metric():
    metrics = {"elbo": [1.0, 1.0, np.nan, np.nan], "grad_norm": [1.0, np.inf, np.nan, np.nan]}
    with pytest.raises(train.TrainingDivergedError, match=r"train/grad_norm is inf at step 66\."):
        train.check_finite(metrics, 64)
    with pytest.raises(train.TrainingDivergedError, match=r"train/elbo is nan at step 67\."):
        train.check_finite({"elbo": metrics["elbo"], "loss": [1.0, 1.0, 1.0, np.nan]}, 64)
    train.check_finite({"loss": [1.0, 2.0]}, 0)  # Finite: no error.


@pytest.fixture(scope="module")
def existing_workdir(tmp_path_factory):
    """A workdir with a finished run in it, which no bad start may touch."""
    workdir = str(tmp_path_factory.mktemp("existing") / "wd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "load_data", _cached_load)
        train.train_and_evaluate(test_config.get_config(), workdir)
    return workdir


@pytest.mark.parametrize(("field", "value", "named"), BAD_VALUES)
def test_bad_config_fails_before_touching_the_workdir(existing_workdir, field, value, named):
    before = _digest(existing_workdir)
    config = test_config.get_config()
    *path, last = field.split(".")
    node = config
    for p in path:
        node = node[p]
    node[last] = value
    compiled = []
    with pytest.MonkeyPatch.context() as mp:  # No epoch may be compiled, let alone run.
        mp.setattr(train, "compile_epoch", lambda *a: compiled.append(a))
        with pytest.raises((ConfigError, WorkdirError)) as info:
            train.train_and_evaluate(config, existing_workdir)
    message = str(info.value)
    assert named in message
    assert repr(value) in message or str(value) in message
    assert "allowed" in message or "valid" in message
    assert not compiled
    assert _digest(existing_workdir) == before


def test_missing_workdir_parent_is_a_clear_error(tmp_path):
    workdir = str(tmp_path / "missing" / "wd")
    with pytest.raises(WorkdirError, match="does not exist"):
        train.train_and_evaluate(test_config.get_config(), workdir)
    assert not os.path.exists(tmp_path / "missing")


@pytest.mark.parametrize("parent", ["/proc", "read-only"])
def test_unwritable_workdir_parent_is_a_clear_error(tmp_path, parent):
    # /proc refuses new files even to root; a 0o500 folder refuses them to everyone else.
    if parent == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root may write into a 0o500 folder; the /proc case covers root")
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
    workdir = os.path.join(str(parent), "bbb-run")
    with pytest.raises(WorkdirError, match="not writable"):
        train.train_and_evaluate(test_config.get_config(), workdir)
    assert not os.path.exists(workdir)


def test_cli_unwritable_workdir_exits_2():
    result = _cli("--config=configs/test.py", "--workdir=/proc/bbb-run")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "not writable" in result.stderr and "/proc/bbb-run" in result.stderr


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_cli_misspelt_field_exits_2(tmp_path):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("precious")
    result = _cli("--config=configs/test.py", f"--workdir={workdir}", "--config.prior.nmae=x")
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        'config field prior.nmae does not exist (from --config.prior.nmae=x). Did you mean "name"'
        in result.stderr
    )
    assert sorted(os.listdir(workdir)) == ["keep.txt"]


def test_bad_override_messages_name_the_field_and_the_flag():
    from bbb.cli import describe_bad_override

    argv = ["train.py", "--config=configs/test.py", "--config.optim.lr=1", "--config.foo.bar=2"]
    # ml_collections raises AttributeError(KeyError("'name'\nDid you mean ...")).
    hinted = AttributeError(KeyError('\'lr\'\nDid you mean "learning_rate" instead of "lr"?'))
    assert describe_bad_override(argv, hinted) == (
        "config field optim.lr does not exist (from --config.optim.lr=1). "
        'Did you mean "learning_rate" instead of "lr"?'
    )
    assert describe_bad_override(argv, AttributeError(KeyError("'foo'"))) == (
        "config field foo does not exist (from --config.foo.bar=2)"
    )
    assert describe_bad_override(argv, KeyError("'zzz'")) == (
        "bad config override: unknown config field 'zzz'"
    )
    assert describe_bad_override(argv, TypeError("bad type")) == "bad config override: bad type"
    # A valid override (a flag ml_collections defined) whose path has the missing name is not
    # the bad one.
    argv = ["t.py", "--config.model.dropout_rate=0.1", "--config.posterior.dropout_rate=0.1"]
    error = AttributeError(KeyError("'dropout_rate'"))
    assert describe_bad_override(argv, error, {"config.model.dropout_rate"}) == (
        "config field posterior.dropout_rate does not exist "
        "(from --config.posterior.dropout_rate=0.1)"
    )


@pytest.mark.parametrize(
    ("flag", "named"),
    [
        ("--config.num_epochs=ten", "num_epochs"),  # wrong type
        ("--config.model.hidden_sizes=(32,-4)", "model.hidden_sizes"),
        ("--config.posterior.estimator=local", "posterior.estimator"),
    ],
)
def test_cli_bad_flags_exit_2_and_leave_the_workdir(tmp_path, flag, named):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("precious")
    result = _cli("--config=configs/test.py", f"--workdir={workdir}", flag)
    assert result.returncode == 2, result.stderr[-2000:]
    assert named in result.stderr
    assert sorted(os.listdir(workdir)) == ["keep.txt"]


def test_cli_bad_value_exits_2(tmp_path):
    result = _cli(
        "--config=configs/test.py", f"--workdir={tmp_path / 'wd'}", "--config.prior.pi=1.5"
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "prior.pi=1.5" in result.stderr and "between 0" in result.stderr
    assert not os.path.exists(tmp_path / "wd")


def test_histograms_of_identical_sigmas_are_plotted(tmp_path):
    # All σ equal (a constant ρ₀ that the optimiser has not moved): matplotlib alone refuses
    # 100 bins over a range of a few ulps.
    from bbb import workdir as workdir_lib

    (tmp_path / "plots").mkdir()
    sigma = np.full(1000, 0.0024726231566347743, np.float32) * (1 + np.float32(1e-7))
    workdir_lib._plot_histograms(str(tmp_path), sigma, np.abs(np.linspace(-1, 1, 1000)) / sigma)
    assert (tmp_path / "plots" / "posterior_histograms.png").stat().st_size > 0
    lo, hi = workdir_lib._histogram_range(np.log10(sigma))
    assert hi - lo == pytest.approx(1.0)


def test_posterior_arrays_equal_the_posterior_methods_leaf_by_leaf():
    # The plots' and TensorBoard's σ and |μ|/σ come from one jitted, flattened program; they
    # must be the posterior's own stddev() and signal_to_noise(), in leaf order.
    from bbb import posterior as posterior_lib
    from bbb import workdir as workdir_lib

    rng = np.random.default_rng(0)
    mu = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(5, np.float32)}
    rho = {"a": rng.uniform(-30, 5, (3, 4)).astype(np.float32), "b": np.full(5, -6, np.float32)}
    posterior = posterior_lib.MeanFieldGaussian(mu=mu, rho=rho)
    sigma, snr = workdir_lib._posterior_arrays({"posterior": posterior})
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
    np.testing.assert_allclose(sigma, flat(posterior.stddev()), rtol=1e-6)
    np.testing.assert_allclose(snr, flat(posterior.signal_to_noise()), rtol=1e-6)
    assert sigma.dtype == np.float32 and sigma.min() > 0


def test_global_norm_is_the_euclidean_norm_of_all_leaves():
    rng = np.random.default_rng(0)
    shapes = [(), (3,), (4, 5), (3, 3, 2, 6), (1, 7)]
    leaves = [rng.normal(size=shape).astype(np.float32) for shape in shapes]
    tree = {"a": jnp.asarray(leaves[0]), "b": [jnp.asarray(x) for x in leaves[1:]]}
    expected = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in leaves))
    np.testing.assert_allclose(float(jax.jit(train.global_norm)(tree)), expected, rtol=1e-6)
    np.testing.assert_allclose(
        float(train.global_norm(tree)), float(optax.tree.norm(tree)), rtol=1e-6
    )
    # Its products ask for full float32 precision, which TPUs (bfloat16 passes by default)
    # and GPUs with TF32 give only when asked; this CPU computes float32 either way.
    dots = [
        eqn
        for eqn in all_equations(jax.make_jaxpr(train.global_norm)(tree).jaxpr)
        if eqn.primitive.name == "dot_general"
    ]
    assert len(dots) == len(shapes)
    highest = jax.lax.Precision.HIGHEST
    assert all(eqn.params["precision"] == (highest, highest) for eqn in dots)


def test_evaluate_against_numpy_from_the_same_samples():
    """error, NLL (−log of the mean probability, not the mean log-probability) and the
    mean-weights error, over exactly N = 7 examples in evaluation chunks of 3."""
    from bbb import predict as predict_lib

    config = test_config.get_config()
    config.eval.batch_size, config.eval.num_samples = 3, 4
    config.posterior.init_rho = -1.0  # Samples far apart: log-mean and mean-log differ.
    experiment = train.build(config, num_train=64, input_shape=(28, 28, 1))
    params = train.init_state(experiment, jax.random.key(0)).params
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(size=(7, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 7), jnp.int32)
    key = jax.random.key(5)
    result = {k: float(v) for k, v in train.evaluate(experiment, params, (x, y), key).items()}
    prediction = predict_lib.predict_in_batches(
        experiment.model, params["posterior"], x, key, 4, batch_size=3, estimator="reparam"
    )
    samples = np.asarray(prediction.samples, np.float64)  # [K, N, C] probabilities
    assert samples.shape == (4, 7, 10)
    labels = np.asarray(y)
    picked = samples[:, np.arange(7), labels]  # [K, N]
    nll = -np.mean(np.log(picked.mean(axis=0)))
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert nll < -np.mean(np.log(picked)) - 1e-3  # Jensen: the two readings differ here.
    assert result["error"] == pytest.approx(np.mean(samples.mean(0).argmax(-1) != labels))
    mean_weights = np.asarray(prediction.mean_weights)
    assert result["error_mean_weights"] == pytest.approx(np.mean(mean_weights.argmax(-1) != labels))


def test_best_validation_keeps_the_earliest_lowest_and_its_test_error():
    from bbb.workdir import History

    history = History()
    for epoch, (val, test) in enumerate([(0.3, 0.31), (0.2, 0.21), (0.2, 0.19), (0.25, 0.1)], 1):
        history.update_best({"epoch": epoch, "eval/val_error": val, "eval/test_error": test})
        history.update_best({"epoch": epoch})  # An epoch without evaluation changes nothing.
    assert (history.best_val_error, history.best_epoch) == (0.2, 2)
    assert history.test_error_at_best_val == 0.21


@pytest.mark.parametrize("loop", ["scan", "steps"])
def test_two_epochs_replay_a_hand_written_loop(loop):
    """Step i of epoch e (global step t = e M + i) takes row i of the permutation drawn from
    fold_in(shuffle key, e), cut to M·B entries (the remainder left out), the noise
    fold_in(train key, t), the weight π = 1/M, and one Adam update of the gradient; its logged
    `loss` and `grad_norm` are that step's. Replayed by hand with optax.adam and
    optax.tree.norm, so that the key, the batch or the optimiser cannot be the wrong one."""
    config = test_config.get_config()
    config.optim.schedule = "constant"
    config.batch_size, config.epoch_loop = 8, loop
    num_batches, batch_size = 3, 8
    num_train = num_batches * batch_size + 5  # 5 examples left over each epoch.
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(num_train, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=num_train).astype(np.int32)
    experiment = train.build(config, num_train=num_train, input_shape=(28, 28, 1))
    keys = train.root_keys(config)
    state = train.init_state(experiment, keys["init"])
    params = jax.device_get(state.params)  # Before the epoch donates the state's buffers.
    tx = optax.adam(config.optim.learning_rate)
    opt_state = tx.init(params)
    grad_fn = jax.jit(jax.value_and_grad(experiment.free_energy, has_aux=True))
    epoch_fn = train.compile_epoch(experiment)
    for epoch in range(2):
        state, metrics = epoch_fn(state, (jnp.asarray(x), jnp.asarray(y)), np.int32(epoch), keys)
        metrics = jax.device_get(metrics)
        shuffle_key = jax.random.fold_in(keys["shuffle"], epoch)
        permutation = np.asarray(jax.random.permutation(shuffle_key, num_train))
        losses, norms = [], []
        for i in range(num_batches):
            indices = permutation[i * batch_size : (i + 1) * batch_size]
            step_key = jax.random.fold_in(keys["train"], epoch * num_batches + i)
            (loss, _), grads = grad_fn(
                params, (x[indices], y[indices]), step_key, jnp.float32(1 / num_batches)
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            losses.append(float(loss))
            norms.append(float(optax.tree.norm(grads)))
        np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], norms, rtol=1e-4)
    assert int(state.step) == 2 * num_batches
    leaves = [jax.tree_util.tree_leaves(p) for p in (state.params, params)]
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_the_loop_logs_epoch_means_and_evaluates_every_eval_every_epochs_and_at_the_end(
    tmp_path, monkeypatch
):
    """num_epochs = 3 with eval.every_epochs = checkpoint_every_epochs = 2: epochs 2 and 3 (the
    last) are evaluated and checkpointed, epoch 1 neither. Each train/ metric is the mean of the
    epoch's M per-step values (not the last step's); eval/val_* holds the evaluation of the
    validation split and eval/test_* that of the test split, both with fold_in(eval key, e)."""
    import orbax.checkpoint as ocp

    config = test_config.get_config()
    config.num_epochs, config.eval.every_epochs, config.checkpoint_every_epochs = 3, 2, 2
    config.max_checkpoints = 5
    config.data.train_subset, config.data.eval_subset, config.eval.batch_size = 256, 100, 50
    splits = train.load_data(config)
    epochs, evaluations = [], []
    compile_epoch, compile_evaluate = train.compile_epoch, train.compile_evaluate

    def spy_epoch(experiment):
        epoch_fn = compile_epoch(experiment)

        def run(state, data, epoch, keys):
            state, metrics = epoch_fn(state, data, epoch, keys)
            epochs.append(jax.device_get(metrics))
            return state, metrics

        return run

    def spy_evaluate(experiment):
        eval_fn = compile_evaluate(experiment)

        def run(params, data, key):
            result = eval_fn(params, data, key)
            seen = (np.asarray(data[0]), np.asarray(jax.random.key_data(key)))
            evaluations.append((*seen, jax.device_get(result)))
            return result

        return run

    monkeypatch.setattr(train, "compile_epoch", spy_epoch)
    monkeypatch.setattr(train, "compile_evaluate", spy_evaluate)
    workdir = str(tmp_path / "wd")
    summary = train.train_and_evaluate(config, workdir)
    records = _read_metrics(workdir)
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 4), (2, 8), (3, 12)]
    assert ["eval/val_nll" in r or "eval/test_nll" in r for r in records] == [False, True, True]
    checkpoints = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()
    assert sorted(checkpoints) == [8, 12]
    assert len(epochs) == 3
    for record, metrics in zip(records, epochs, strict=True):
        assert set(metrics) == {k[len("train/") :] for k in record if k.startswith("train/")}
        for name, values in metrics.items():
            assert values.shape == (4,)
            assert record[f"train/{name}"] == pytest.approx(float(np.mean(values)), rel=1e-6)
    eval_key = train.root_keys(config)["eval"]
    assert len(evaluations) == 4  # validation and test at epochs 2 and 3
    for j, record in enumerate(records[1:]):
        expected_key = np.asarray(jax.random.key_data(jax.random.fold_in(eval_key, j + 1)))
        for (x, key, result), split, prefix in zip(
            evaluations[2 * j : 2 * j + 2], ("validation", "test"), ("val", "test"), strict=True
        ):
            np.testing.assert_array_equal(x, splits[split][0].reshape(len(x), -1))  # Stored flat.
            np.testing.assert_array_equal(key, expected_key)
            for name, value in result.items():
                assert record[f"eval/{prefix}_{name}"] == pytest.approx(float(value), rel=1e-6)
    assert summary["test_nll"] == records[-1]["eval/test_nll"]


def _updates(tx, grads: dict, steps: int) -> np.ndarray:
    """The updates [steps, ...] of `tx` fed the same gradient `grads` every step, at w = 0."""
    params = jax.tree_util.tree_map(jnp.zeros_like, grads)
    state, updates = tx.init(params), []
    for _ in range(steps):
        update, state = tx.update(grads, state, params)
        updates.append([float(update[k]) for k in sorted(update)])
    return np.asarray(updates)


@pytest.mark.parametrize("warmup_epochs", [0.0, 0.5])
def test_cosine_schedule_decays_to_zero_over_the_steps_after_the_warm_up(warmup_epochs):
    """M = 4 steps per epoch, 3 epochs (T = 12 steps): η_t = η t / W during a linear warm-up
    of W = warmup_epochs · M steps, then η (1 + cos(π (t − W) / (T − W))) / 2."""
    config = test_config.get_config().optim
    config.name, config.schedule, config.learning_rate = "sgd", "cosine", 0.1
    config.warmup_epochs = warmup_epochs
    rates = -_updates(train.make_optimizer(config, 4, 3), {"w": jnp.ones(())}, 12)[:, 0]
    t, warmup = np.arange(12), int(warmup_epochs * 4)
    cosine = 0.05 * (1 + np.cos(np.pi * (t - warmup) / (12 - warmup)))
    expected = np.where(t < warmup, 0.1 * t / max(warmup, 1), cosine)
    np.testing.assert_allclose(rates, expected, rtol=1e-5, atol=1e-8)


def test_momentum_is_heavy_ball_and_clipping_comes_before_the_optimiser():
    """optim.name = "momentum": under a constant gradient 1 the t-th update is η Σ_{k≤t} β^k
    (heavy ball, not Nesterov). grad_clip_norm = 1: the gradient (3, 4) is cut to norm 1 before
    SGD (updates η (0.6, 0.8)), not the update after it."""
    config = test_config.get_config().optim
    config.name, config.schedule, config.learning_rate, config.momentum = (
        "momentum",
        "constant",
        0.1,
        0.5,
    )
    rates = -_updates(train.make_optimizer(config, 4, 3), {"w": jnp.ones(())}, 4)[:, 0]
    np.testing.assert_allclose(rates, 0.1 * np.cumsum(0.5 ** np.arange(4)), rtol=1e-6)
    config.name, config.grad_clip_norm = "sgd", 1.0
    grads = {"a": jnp.float32(3.0), "b": jnp.float32(4.0)}
    updates = _updates(train.make_optimizer(config, 4, 3), grads, 2)
    np.testing.assert_allclose(updates, [[-0.06, -0.08]] * 2, rtol=1e-6)


def test_adam_is_plain_adam_whatever_the_weights():
    """optim.name = "adam" is Adam without weight decay: at weights 5 and −3 the first update of
    the gradient (2, −0.5) is −η sign(g) (bias-corrected moments, to float32's 7e−6), as at
    weights 0; AdamW would add η · 10⁻⁴ · w."""
    config = test_config.get_config().optim
    config.name, config.schedule, config.learning_rate = "adam", "constant", 0.01
    tx = train.make_optimizer(config, 4, 3)
    params = {"a": jnp.float32(5.0), "b": jnp.float32(-3.0)}
    grads = {"a": jnp.float32(2.0), "b": jnp.float32(-0.5)}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose([float(updates[k]) for k in "ab"], [-0.01, 0.01], rtol=5e-5)


def test_step_epochs_that_round_to_one_step_each_decay_there():
    """M = 4 steps per epoch: epochs 1.1 and 1.2 both fall on step 4, where the rate must
    decay twice (η · 0.1² from step 4), not once."""
    config = test_config.get_config().optim
    config.name, config.schedule, config.learning_rate = "sgd", "step", 0.1
    config.step_epochs, config.step_factor, config.warmup_epochs = (1.1, 1.2, 2.0), 0.1, 0.0
    rates = -_updates(train.make_optimizer(config, 4, 3), {"w": jnp.ones(())}, 10)[:, 0]
    np.testing.assert_allclose(rates, [0.1] * 4 + [0.001] * 4 + [0.0001] * 2, rtol=1e-5)


def test_divergence_on_one_step_in_two_metrics_names_the_alphabetically_first():
    """A tie on the earliest bad step names the metric that sorts first, whatever the dict
    order (a later name winning ties would blame the loss for the gradient's overflow)."""
    for metrics in (
        {"loss": [1.0, np.nan], "grad_norm": [1.0, np.inf]},
        {"grad_norm": [1.0, np.inf], "loss": [1.0, np.nan]},
    ):
        with pytest.raises(train.TrainingDivergedError, match=r"train/grad_norm is inf at step 12"):
            train.check_finite(metrics, 10)


def test_regression_evaluate_against_scipy_from_the_same_samples():
    """A Gaussian likelihood's NLL is −mean log((1/K) Σ_k N(y | f_k(x), s²)) with the learned s
    (not the mean of the log-densities, nor without the 1/K), and the RMSE is that of the
    mean of the K outputs; N = 7 examples in evaluation chunks of 3."""
    from scipy import special, stats

    from bbb import predict as predict_lib
    from configs import regression as regression_config

    config = regression_config.get_config()
    config.model.hidden_sizes = (16,)
    config.likelihood.learnable = True
    config.eval.batch_size, config.eval.num_samples = 3, 4
    config.posterior.init_rho = -1.0  # Outputs far apart: log-mean and mean-log differ.
    experiment = train.build(config, num_train=100, input_shape=(1,), trace=False)
    params = train.init_state(experiment, jax.random.key(0)).params
    noise_std = 0.3  # Not the config's 0.0625: the learned s must be the one used.
    params["likelihood"] = {"log_noise_std": jnp.float32(np.log(noise_std))}
    rng = np.random.default_rng(4)
    x = rng.uniform(0.0, 0.5, size=(7, 1)).astype(np.float32)
    y = rng.normal(0.5, 0.5, size=(7, 1)).astype(np.float32)
    key = jax.random.key(5)
    result = train.evaluate(experiment, params, (jnp.asarray(x), jnp.asarray(y)), key)
    assert set(result) == {"rmse", "nll"}
    prediction = predict_lib.predict_in_batches(
        experiment.model,
        params["posterior"],
        jnp.asarray(x),
        key,
        4,
        batch_size=3,
        classification=False,
        estimator="reparam",
    )
    outputs = np.asarray(prediction.samples, np.float64)[..., 0]  # [K, N]
    assert outputs.shape == (4, 7)
    log_densities = stats.norm.logpdf(y[:, 0], loc=outputs, scale=noise_std)  # [K, N]
    nll = -np.mean(special.logsumexp(log_densities, axis=0) - np.log(4))
    assert float(result["nll"]) == pytest.approx(nll, rel=1e-5)
    assert nll < -np.mean(log_densities) - 1e-2  # Jensen: the two readings differ here.
    rmse = np.sqrt(np.mean((outputs.mean(0) - y[:, 0]) ** 2))
    assert float(result["rmse"]) == pytest.approx(rmse, rel=1e-5)
    assert rmse != pytest.approx(np.sqrt(np.mean((outputs - y[:, 0]) ** 2)), rel=1e-3)


def test_initial_rho_is_uniform_over_the_spread_centred_on_init_rho():
    """posterior.init_rho_spread = s draws every ρ₀ from U(init_rho − s/2, init_rho + s/2)
    (configs/mnist.py): here U(−4, −2), whose mean is −3 and variance 1/3; s = 0 gives −3."""
    config = test_config.get_config()
    config.posterior.init_rho, config.posterior.init_rho_spread = -3.0, 2.0
    experiment = train.build(config, num_train=64, input_shape=(28, 28, 1), trace=False)
    state = train.init_state(experiment, jax.random.key(0))
    rho = np.concatenate(
        [np.ravel(r) for r in jax.tree_util.tree_leaves(state.params["posterior"].rho)]
    )
    assert rho.size > 25_000
    assert -4.0 <= rho.min() < -3.99 and -2.01 < rho.max() <= -2.0
    assert np.mean(rho) == pytest.approx(-3.0, abs=0.02)
    assert np.var(rho) == pytest.approx(1 / 3, rel=0.03)
    config.posterior.init_rho_spread = 0.0
    experiment = train.build(config, num_train=64, input_shape=(28, 28, 1), trace=False)
    state = train.init_state(experiment, jax.random.key(0))
    for r in jax.tree_util.tree_leaves(state.params["posterior"].rho):
        np.testing.assert_array_equal(np.asarray(r), -3.0)


def test_load_data_cuts_train_to_train_subset_and_validation_and_test_to_eval_subset(
    monkeypatch,
):
    """The MNIST splits as `bbb.data.mnist.load_mnist` gives them (faked here, each example
    tagged by its split and index), cut to their first train_subset and eval_subset examples,
    with the config's pixel_scale and num_train passed on."""
    from bbb.data import mnist

    calls = []

    def fake_load_mnist(**kwargs):
        calls.append(kwargs)
        sizes = {"train": 300, "validation": 200, "test": 150}
        return {
            name: (
                np.full((n, 28, 28, 1), tag, np.float32),
                np.arange(n, dtype=np.int32),
            )
            for tag, (name, n) in enumerate(sizes.items())
        }

    monkeypatch.setattr(mnist, "load_mnist", fake_load_mnist)
    config = test_config.get_config()
    config.data.train_subset, config.data.eval_subset = 100, 40
    splits = _original_load(config)
    assert calls[0]["pixel_scale"] == config.data.pixel_scale
    assert calls[0]["num_train"] == config.data.num_train
    for tag, (name, n) in enumerate((("train", 100), ("validation", 40), ("test", 40))):
        x, y = splits[name]
        assert x.shape == (n, 28, 28, 1) and np.all(x == tag), name
        np.testing.assert_array_equal(y, np.arange(n))  # The first n, in order.
    config.data.eval_subset = 0  # 0: the whole split.
    assert len(_original_load(config)["test"][1]) == 150


def test_the_loop_passes_each_epochs_own_index_across_a_resume(tmp_path, monkeypatch):
    """Epoch e's permutation is drawn from fold_in(shuffle key, e): the loop must hand the
    epoch function e = 0, 1 and, after a resume, 2 (a constant index would reshuffle the same
    way every epoch, which neither the straight-vs-resumed comparison nor the logged means
    can see)."""
    config = test_config.get_config()
    config.num_epochs, config.eval.every_epochs = 3, 3
    config.data.train_subset, config.data.eval_subset = 128, 50
    seen = []
    compile_epoch = train.compile_epoch

    def spy_epoch(experiment):
        epoch_fn = compile_epoch(experiment)

        def run(state, data, epoch, keys):
            seen.append(int(epoch))
            return epoch_fn(state, data, epoch, keys)

        return run

    monkeypatch.setattr(train, "compile_epoch", spy_epoch)
    workdir = str(tmp_path / "wd")
    assert train.train_and_evaluate(config, workdir, stop_after_epochs=2) is None
    assert seen == [0, 1]
    summary = train.train_and_evaluate(config, workdir)
    assert seen == [0, 1, 2]
    assert [r["epoch"] for r in _read_metrics(workdir)] == [1, 2, 3]
    # The throughput is of this session: one epoch of M = 128 / 64 = 2 steps, not all 6.
    assert summary["steps_per_s"] * summary["wall_time_s"] == pytest.approx(2, rel=1e-6)


def test_train_subset_larger_than_the_training_split_takes_the_whole_split():
    """data.train_subset cuts the training split; one larger than data.num_train leaves it
    whole, so N (which scales the likelihood and fixes M) is num_train, not the subset."""
    config = test_config.get_config()
    config.data.num_train = 50000
    for subset, expected in ((2048, 2048), (55000, 50000), (0, 50000)):
        config.data.train_subset = subset
        assert train.dataset_spec(config) == (expected, (28, 28, 1)), subset
