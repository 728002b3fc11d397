"""Tests of bbb/workdir.py that need no training: resumable fields, the summary and its words."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import pytest

from bbb import train
from bbb.posterior import MeanFieldGaussian
from bbb.workdir import History, Run, WorkdirError, check_workdir, summary_paragraph
from configs import test as test_config
from tests.conftest import saved_run


def _saved_workdir(tmp_path) -> str:
    return saved_run(tmp_path / "wd", test_config.get_config())


@pytest.mark.parametrize(
    "field, value",
    [("seed", 1), ("eval.num_samples", 7), ("eval.every_epochs", 3), ("prng_impl", "rbg")],
)
def test_the_seed_and_the_evaluation_may_not_change_on_resume(tmp_path, field, value):
    """Another seed or another evaluation would mix two runs in one metrics.jsonl: refused,
    naming the field, while the fields of RESUMABLE_FIELDS (here the data's place) may change."""
    workdir = _saved_workdir(tmp_path)
    moved = test_config.get_config()
    moved.data.data_dir = "/elsewhere"
    check_workdir(workdir, moved)
    changed = test_config.get_config()
    section, _, name = field.rpartition(".")
    setattr(changed[section] if section else changed, name, value)
    with pytest.raises(WorkdirError, match=rf"{field.replace('.', '[.]')}: "):
        check_workdir(workdir, changed)


@pytest.mark.parametrize(
    "result", [None, "checkpoints/7/x", "metrics.jsonl", "summary.json", "results.json"]
)
def test_only_a_workdir_with_results_refuses_another_config(tmp_path, result):
    """config.json beside empty folders, an empty checkpoints folder and a blank metrics file is
    a failed start's: any config may take the workdir. Any one result (a checkpoint, a metrics
    line, a summary, a bandit's results) makes it a run that only its own config may resume."""
    workdir = tmp_path / "wd"
    for folder in ("checkpoints", "plots", "tensorboard"):
        (workdir / folder).mkdir(parents=True)
    (workdir / "config.json").write_text(test_config.get_config().to_json_best_effort())
    (workdir / "metrics.jsonl").write_text("\n \n")
    if result is not None:
        (workdir / result).parent.mkdir(parents=True, exist_ok=True)
        (workdir / result).write_text('{"step": 7}\n')
    changed = test_config.get_config()
    changed.optim.learning_rate *= 2
    if result is None:
        check_workdir(str(workdir), changed)
    else:
        with pytest.raises(WorkdirError, match=r"optim\.learning_rate: "):
            check_workdir(str(workdir), changed)


def test_summary_paragraph_states_each_figure_from_its_own_key():
    """Every number of the paragraph comes from its own summary key (none repeats another)."""
    summary = {
        "test_error": 0.0125,
        "test_error_mean_weights": 0.0175,
        "test_nll": 0.04321,
        "best_val_error": 0.0110,
        "best_epoch": 7,
        "test_error_at_best_val": 0.0130,
        "epochs": 9,
        "wall_time_s": 123.4,
        "steps_per_s": 56.7,
    }
    assert summary_paragraph(summary, "/runs/x") == (
        "Trained 9 epochs; 123 s this session (57 steps/s this session); test error 1.25% with "
        "the posterior predictive, 1.75% with the mean weights; test NLL 0.0432; best "
        "validation error 1.10% at epoch 7, where the test error was 1.30%. Files are in /runs/x."
    )
    regression = {
        "test_rmse": 0.5,
        "test_nll": 1.25,
        "best_val_nll": 1.125,
        "best_epoch": 3,
        "test_nll_at_best_val": 1.375,
        "epochs": 4,
        "wall_time_s": 2.0,
    }
    assert summary_paragraph(regression, "w") == (
        "Trained 4 epochs; 2 s this session; test RMSE 0.5000, test NLL 1.2500; best "
        "validation NLL 1.1250 at epoch 3, where the test NLL was 1.3750. Files are in w."
    )


def test_finish_summarises_the_last_evaluation_and_the_best_validation_record(tmp_path):
    """summary.json: the test figures of the last evaluated epoch (not of the first, nor of a
    later epoch without evaluation), the History's record, the last epoch and the step rate."""
    posterior = MeanFieldGaussian(
        mu={"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}, rho={"w": jnp.full((3, 4), -3.0)}
    )
    state = train.TrainState(step=jnp.int32(96), params={"posterior": posterior}, opt_state={})
    run = Run(str(tmp_path / "wd"), test_config.get_config())

    def evaluated(epoch, val, test, mean_weights, nll):
        return {
            "step": 32 * epoch,
            "epoch": epoch,
            "train/loss": 1.0 / epoch,
            "train/nll": 0.5 / epoch,
            "train/kl": 2.0,
            "eval/val_error": val,
            "eval/test_error": test,
            "eval/test_error_mean_weights": mean_weights,
            "eval/test_nll": nll,
        }

    run.records = [
        evaluated(1, 0.25, 0.5, 0.375, 1.5),
        evaluated(2, 0.125, 0.25, 0.1875, 0.75),
        {"step": 96, "epoch": 3, "train/loss": 0.25, "train/nll": 0.125, "train/kl": 2.0},
    ]
    history = History(best_val_error=0.0625, best_epoch=1, test_error_at_best_val=0.625)
    summary = run.finish(state, history, wall_time=4.0, steps_done=96)
    assert summary == {
        "test_error": 0.25,
        "test_error_mean_weights": 0.1875,
        "test_nll": 0.75,
        "best_val_error": 0.0625,
        "best_epoch": 1,
        "test_error_at_best_val": 0.625,
        "epochs": 3,
        "wall_time_s": 4.0,
        "steps_per_s": 24.0,
    }
    with open(os.path.join(run.workdir, "summary.json")) as f:
        assert json.load(f) == summary


def test_read_records_skips_blank_lines_anywhere_and_drops_only_a_cut_last_line(tmp_path):
    """Blank lines (an editor's, or a newline after a kill) are no records and no errors; a
    cut-short last line is dropped, the same line before a good one is an error."""
    from bbb.workdir import read_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 32}\n\n   \n{"step": 64}\n\n{"step": 9')
    assert read_records(str(path)) == [{"step": 32}, {"step": 64}]
    path.write_text('{"step": 32}\n{"step": 9\n\n{"step": 96}\n\n')
    with pytest.raises(WorkdirError, match=r"line 2\b"):
        read_records(str(path))


def test_a_resumed_run_drops_the_metrics_lines_after_its_checkpoint_from_the_file(tmp_path):
    """Resuming from the checkpoint at step 64 keeps the lines up to it, in memory and on disk
    (the lines after it are computed again; kept, they would appear twice)."""
    posterior = MeanFieldGaussian(mu={"w": jnp.zeros((2, 3))}, rho={"w": jnp.full((2, 3), -3.0)})
    state = train.TrainState(step=jnp.int32(64), params={"posterior": posterior}, opt_state={})
    workdir = str(tmp_path / "wd")
    first = Run(workdir, test_config.get_config())
    first.save(state, History())
    first.close()
    lines = [{"step": 32 * e, "epoch": e, "train/loss": 1.0 / e} for e in (1, 2, 3)]
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))
    resumed = Run(workdir, test_config.get_config())
    restored, _ = resumed.restore(state)
    resumed.close()
    assert int(restored.step) == 64
    assert resumed.records == lines[:2]
    with open(path) as f:
        assert [json.loads(line) for line in f] == lines[:2]
