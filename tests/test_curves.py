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
