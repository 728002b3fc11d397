"""Fault injection: kill -9, SIGTERM, NaN, corrupted checkpoints. A dead run costs minutes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbb import train
from bbb.errors import ConfigError
from bbb.workdir import WorkdirError
from configs import test as test_config
from tests.conftest import REPO
from tests.test_train import _cached_load, _digest, _read_metrics

LONG_RUN = [
    "--config.num_epochs=24",
    "--config.eval.every_epochs=12",
    "--config.checkpoint_every_epochs=3",
]


@pytest.fixture(autouse=True)
def cached_data(monkeypatch):
    monkeypatch.setattr(train, "load_data", _cached_load)


def _long_config():
    config = test_config.get_config()
    config.num_epochs = 24
    config.eval.every_epochs = 12
    config.checkpoint_every_epochs = 3
    return config


def _start(workdir):
    return subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "train.py"),
            "--config=configs/test.py",
            f"--workdir={workdir}",
            *LONG_RUN,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_epochs(workdir, process, epochs, timeout=300):
    deadline = time.monotonic() + timeout
    path = os.path.join(workdir, "metrics.jsonl")
    while time.monotonic() < deadline:
        if os.path.exists(path) and len(_read_metrics(workdir)) >= epochs:
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.communicate()[1][-3000:]}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError("training did not reach the epoch in time")


def _finish(workdir):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "train.py"),
            "--config=configs/test.py",
            f"--workdir={workdir}",
            *LONG_RUN,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Orbax's and TFDS's INFO lines stay hidden unless --verbosity=0 asks for them (bbb.cli).
    assert not re.search(r"^I\d{4} ", result.stderr, re.MULTILINE), result.stderr[:2000]
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run that interrupted ones must reproduce."""
    workdir = str(tmp_path_factory.mktemp("reference") / "wd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "load_data", _cached_load)
        train.train_and_evaluate(_long_config(), workdir)
    return _read_metrics(workdir)


def test_kill_9_then_rerun_matches_an_uninterrupted_run(tmp_path, reference):
    workdir = str(tmp_path / "wd")
    process = _start(workdir)
    _wait_for_epochs(workdir, process, epochs=5)  # past the checkpoint at epoch 3
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert len(_read_metrics(workdir)) < 24
    _finish(workdir)
    assert _read_metrics(workdir) == reference  # every number identical


def test_sigterm_checkpoints_and_exits_cleanly_then_resumes(tmp_path, reference):
    workdir = str(tmp_path / "wd")
    process = _start(workdir)
    _wait_for_epochs(workdir, process, epochs=1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Pre-empted (SIGTERM)" in stdout
    epochs_done = len(_read_metrics(workdir))
    assert epochs_done < 24
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    assert steps[-1] == epochs_done * 32  # a checkpoint at the epoch where it stopped
    _finish(workdir)
    assert _read_metrics(workdir) == reference


def test_nan_stops_with_the_step_and_metric_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """From epoch 3 on, the parameters blow up: the run stops within that epoch's logging,
    names the step and the metric, and the checkpoint of epoch 2 still restores."""
    original = train.compile_epoch

    def poisoned(experiment):
        epoch_fn = original(experiment)

        def run(state, data, epoch, keys):
            if int(epoch) >= 2:
                state = state.replace(
                    params=jax.tree_util.tree_map(lambda p: p * jnp.nan, state.params)
                )
            return epoch_fn(state, data, epoch, keys)

        return run

    monkeypatch.setattr(train, "compile_epoch", poisoned)
    config = test_config.get_config()
    config.num_epochs = 4
    workdir = str(tmp_path / "wd")
    with pytest.raises(train.TrainingDivergedError) as info:
        train.train_and_evaluate(config, workdir)
    message = str(info.value)
    assert "step 65" in message and "train/" in message and "nan" in message
    assert len(_read_metrics(workdir)) == 2
    _, state = train.load_run(workdir)
    assert int(state.step) == 64
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))


def test_cli_divergence_exits_nonzero(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "train.py"),
            "--config=configs/test.py",
            f"--workdir={tmp_path / 'wd'}",
            "--config.optim.learning_rate=1e12",
            "--config.optim.schedule=constant",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "diverged" in result.stderr and "at step" in result.stderr


def test_corrupted_checkpoint_is_named_and_nothing_is_overwritten(tmp_path):
    workdir = str(tmp_path / "wd")
    config = test_config.get_config()
    config.optim.schedule = "constant"  # So that num_epochs may change on resuming.
    train.train_and_evaluate(config, workdir, stop_after_epochs=1)
    checkpoint = os.path.join(workdir, "checkpoints", "32")
    victims = [
        os.path.join(root, name)
        for root, _, names in os.walk(checkpoint)
        for name in names
        if "state" in root and os.path.getsize(os.path.join(root, name)) > 100
    ]
    assert victims
    for path in victims:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    before = _digest(workdir)
    config.num_epochs = 5  # A field a resumed run may change: the failed start must not save it.
    with pytest.raises(WorkdirError) as info:
        train.train_and_evaluate(config, workdir)
    assert checkpoint in str(info.value) and "new --workdir" in str(info.value)
    assert _digest(workdir) == before
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["num_epochs"] == 2


def test_a_start_that_failed_before_any_result_leaves_a_workdir_any_config_may_take(
    tmp_path, monkeypatch
):
    """A first start stopped while compiling (Ctrl-C, an out-of-memory) leaves config.json and
    empty folders, no metrics and no checkpoint: the corrected command in the same workdir
    trains, and config.json becomes its config. One metrics line makes the workdir a run again."""
    workdir = str(tmp_path / "wd")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "compile_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(test_config.get_config(), workdir)
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    monkeypatch.undo()
    monkeypatch.setattr(train, "load_data", _cached_load)
    corrected = test_config.get_config()
    corrected.optim.learning_rate /= 2
    summary = train.train_and_evaluate(corrected, workdir)
    assert summary["epochs"] == corrected.num_epochs
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optim"]["learning_rate"] == corrected.optim.learning_rate
    with pytest.raises(WorkdirError, match=r"optim\.learning_rate"):
        train.train_and_evaluate(test_config.get_config(), workdir)


def test_a_crash_while_finishing_leaves_no_summary_and_the_rerun_finishes(tmp_path, monkeypatch):
    """summary.json marks a finished run (a rerun returns it), so it is written last and whole."""
    from bbb import workdir as workdir_lib

    workdir = str(tmp_path / "wd")
    summary_path = os.path.join(workdir, "summary.json")
    plot = workdir_lib._plot_histograms

    def crash(*args):
        raise KeyboardInterrupt  # As a kill while the last plot is drawn.

    monkeypatch.setattr(workdir_lib, "_plot_histograms", crash)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(test_config.get_config(), workdir)
    assert not os.path.exists(summary_path)
    monkeypatch.setattr(workdir_lib, "_plot_histograms", plot)
    summary = train.train_and_evaluate(test_config.get_config(), workdir)  # Nothing to train.
    with open(summary_path) as f:
        assert json.load(f) == summary
    assert summary["epochs"] == test_config.get_config().num_epochs
    assert os.path.exists(os.path.join(workdir, "plots", "posterior_histograms.png"))


def test_a_resumed_run_logs_each_tensorboard_step_once(tmp_path):
    """A run that dies after logging past its last checkpoint redoes those steps; TensorBoard
    must show each once, with the redone values, as metrics.jsonl does."""
    import shutil

    from tensorboard.backend.event_processing import event_accumulator

    workdir = str(tmp_path / "wd")
    config = test_config.get_config()
    train.train_and_evaluate(config, workdir)  # Two epochs: checkpoints at steps 32 and 64.
    # As if it had died after logging epoch 2 but before its checkpoint was written.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "64"))
    os.remove(os.path.join(workdir, "summary.json"))
    train.train_and_evaluate(config, workdir)
    acc = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}
    )
    acc.Reload()
    steps = [event.step for event in acc.Scalars("train/loss")]
    assert steps == [32, 64]
    assert [e.step for e in acc.Histograms("posterior/sigma")] == sorted(
        {e.step for e in acc.Histograms("posterior/sigma")}
    )
    (last,) = [r for r in _read_metrics(workdir) if r["step"] == 64]
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(last["train/loss"], rel=1e-6)


def test_a_metrics_line_cut_short_is_dropped_and_a_bad_one_before_it_is_named(tmp_path):
    from bbb.workdir import read_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 32}\n{"step": 64}\n{"step": 9')  # A kill mid-write.
    assert read_records(str(path)) == [{"step": 32}, {"step": 64}]
    path.write_text('{"step": 32}\n{"step": 6\n{"step": 96}\n')
    with pytest.raises(WorkdirError, match="line 2"):
        read_records(str(path))


def _fake_splits(num_train, shape=(28, 28, 1)):
    def split(n):
        return np.zeros((n, *shape), np.float32), np.zeros((n,), np.int32)

    return {"train": split(num_train), "validation": split(8), "test": split(8)}


def test_a_bad_config_fails_before_the_data_are_loaded(tmp_path, monkeypatch):
    """Config errors come first: before MNIST is loaded (minutes on a fresh machine, and a
    download where a network allows) and before the workdir is created."""
    loads = []
    monkeypatch.setattr(train, "load_data", lambda config: loads.append(config) or 1 / 0)
    config = test_config.get_config()
    config.posterior.init_rho_spread = -1.0
    workdir = tmp_path / "wd"
    with pytest.raises(ConfigError, match=r"posterior\.init_rho_spread=-1\.0"):
        train.train_and_evaluate(config, str(workdir))
    assert loads == [] and not workdir.exists()


@pytest.mark.parametrize("num_train", [2047, 2049])
def test_data_of_another_size_is_a_config_error_before_the_workdir_is_touched(
    tmp_path, monkeypatch, num_train
):
    """The loaded training split must have the size that the config declares (N sets the KL
    weight 1/N): otherwise a ConfigError, raised before the workdir is created, and an
    existing workdir keeps every byte."""
    monkeypatch.setattr(train, "load_data", lambda config: _fake_splits(num_train))
    config = test_config.get_config()  # Declares 2,048 training images.
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError) as info:
        train.train_and_evaluate(config, str(fresh))
    assert info.value.field == "data" and "declared size and shape" in str(info.value)
    assert not fresh.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text('{"step": 32}\n')
    (existing / "config.json").write_text(config.to_json_best_effort())
    before = _digest(str(existing))
    with pytest.raises(ConfigError):
        train.train_and_evaluate(config, str(existing))
    assert _digest(str(existing)) == before
    assert sorted(os.listdir(existing)) == ["config.json", "metrics.jsonl"]
