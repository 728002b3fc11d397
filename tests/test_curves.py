"""Tests of bbb/curves.py: the side-by-side learning curves of several runs."""

from __future__ import annotations

import json

import pytest

from bbb import curves
from bbb.workdir import WorkdirError


def _write_run(path, val_errors, test_errors):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for epoch, (val, test) in enumerate(zip(val_errors, test_errors, strict=True), start=1):
            record = {"epoch": epoch, "train/loss": 10.0 / epoch}
            if val is not None:
                record.update(
                    {"eval/val_error": val, "eval/test_error": test, "eval/test_nll": 0.1}
                )
            f.write(json.dumps(record) + "\n")
    return str(path)


def test_table_takes_the_test_error_at_the_best_validation_epoch(tmp_path):
    a = _write_run(
        tmp_path / "a", [None, 0.03, None, 0.02, 0.025], [None, 0.031, None, 0.024, 0.019]
    )
    b = _write_run(tmp_path / "b", [0.05, 0.04, None], [0.06, 0.045, None])  # Ends unevaluated.
    table = curves.plot_runs([a, b], ["first", "second"], str(tmp_path / "out" / "c.png"))
    rows = {r["run"]: r for r in curves.comparison_rows({"first": curves.read_metrics(a)})}
    assert rows["first"]["best_epoch"] == 4
    assert rows["first"]["test_error_at_best_val"] == pytest.approx(0.024)
    assert rows["first"]["test_error"] == pytest.approx(0.019)  # the last evaluation
    assert "| first | 5 | 1.90% | 0.1000 | 2.00% (4) | 2.40% |" in table
    assert "| second | 3 | 4.50% |" in table  # The last evaluation's, not the last epoch's.
    assert curves.series(curves.read_metrics(a), "eval/val_error") == (
        [2, 4, 5],
        [0.03, 0.02, 0.025],
    )
    assert (tmp_path / "out" / "c.png").stat().st_size > 0
    assert (tmp_path / "out" / "c.md").read_text() == table


def test_missing_run_and_mismatched_labels_are_errors(tmp_path):
    with pytest.raises(WorkdirError, match=r"metrics\.jsonl is missing"):
        curves.read_metrics(str(tmp_path))
    a = _write_run(tmp_path / "a", [0.1], [0.1])
    with pytest.raises(ValueError, match="1 labels for 2 workdirs"):
        curves.plot_runs([a, a], ["x"], str(tmp_path / "c.png"))


def test_runs_of_the_same_name_need_their_own_labels(tmp_path):
    """runs/s0/mnist and runs/s1/mnist: default labels would collide and one run vanish."""
    from bbb.errors import ConfigError

    first = _write_run(tmp_path / "s0", [0.1], [0.1])
    (tmp_path / "s1").mkdir()
    second = _write_run(tmp_path / "s1" / "s0", [0.2], [0.2])
    with pytest.raises(ConfigError, match=r"--labels.*'s0' names two"):
        curves.plot_runs([first, second], None, str(tmp_path / "c.png"))
    assert not (tmp_path / "c.png").exists()
    table = curves.plot_runs([first, second], ["a", "b"], str(tmp_path / "c.png"))
    assert "| a |" in table and "| b |" in table


def test_a_tie_in_validation_keeps_the_earliest_epoch_as_the_history_does(tmp_path):
    """Equal validation errors: the earliest epoch is the best, as `History.update_best`."""
    a = _write_run(tmp_path / "a", [0.03, 0.02, 0.02, 0.04], [0.031, 0.024, 0.019, 0.05])
    (row,) = curves.comparison_rows({"a": curves.read_metrics(a)})
    assert row["best_epoch"] == 2
    assert row["best_val_error"] == 0.02
    assert row["test_error_at_best_val"] == 0.024
    assert row["test_error"] == 0.05


def test_curves_are_drawn_at_their_own_epochs_with_errors_in_percent(tmp_path, monkeypatch):
    """Each run's points sit at the epochs that logged them (runs evaluated at other epochs
    line up), and every error panel is in percent while the loss is as logged."""
    import matplotlib.axes

    calls = []
    original = matplotlib.axes.Axes.plot

    def recording_plot(self, x, y, *args, **kwargs):
        calls.append((self, kwargs.get("label"), list(x), list(y)))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    a = _write_run(tmp_path / "a", [None, 0.03, None, 0.02], [None, 0.04, None, 0.01])
    b = _write_run(tmp_path / "b", [0.05, None, 0.25], [0.5, None, 0.125])
    curves.plot_runs([a, b], ["a", "b"], str(tmp_path / "c.png"))
    titles = [title for _, title in curves.PANELS]
    drawn = {(ax.get_title(), label): (x, y) for ax, label, x, y in calls}
    assert drawn == {
        (titles[0], "a"): ([1, 2, 3, 4], [10.0, 5.0, 10.0 / 3, 2.5]),
        (titles[0], "b"): ([1, 2, 3], [10.0, 5.0, 10.0 / 3]),
        (titles[1], "a"): ([2, 4], [3.0, 2.0]),
        (titles[1], "b"): ([1, 3], [5.0, 25.0]),
        (titles[2], "a"): ([2, 4], [4.0, 1.0]),
        (titles[2], "b"): ([1, 3], [50.0, 12.5]),
    }


def test_an_empty_log_is_named_and_default_labels_ignore_a_trailing_slash(tmp_path):
    """A run that has logged nothing yet is a WorkdirError, not an IndexError in the table;
    "runs/a/" is labelled "a" as "runs/a" is (not "")."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    with pytest.raises(WorkdirError, match="holds no record yet"):
        curves.read_metrics(str(tmp_path / "empty"))
    a = _write_run(tmp_path / "a", [0.1], [0.1])
    b = _write_run(tmp_path / "b", [0.2], [0.2])
    table = curves.plot_runs([a + "/", b + "/"], None, str(tmp_path / "c.png"))
    assert "| a | 1 | 10.00% |" in table and "| b | 1 | 20.00% |" in table
