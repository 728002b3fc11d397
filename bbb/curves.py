"""Learning curves of several runs side by side, from their `metrics.jsonl` files.

Used to compare the gradient estimators on one config (reparameterisation, Blundell et al.
2015; local reparameterisation, Kingma et al. 2015; flipout, Wen et al. 2018), or any runs
that log the same metrics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from bbb.errors import ConfigError
from bbb.workdir import WorkdirError, read_records

# (metric, axis title): the panels of the figure, in order.
PANELS = (
    ("train/loss", "free energy per example (train)"),
    ("eval/val_error", "validation error"),
    ("eval/test_error", "test error (posterior predictive)"),
)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of a run's `metrics.jsonl`, one per epoch.

    Args:
      workdir: a run's workdir.

    Returns:
      The records, in the order they were written.

    Raises:
      WorkdirError: the file is missing or holds no record.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise WorkdirError(f"{workdir} holds no run: {path} is missing.")
    records = read_records(path)
    if not records:
        raise WorkdirError(f"{path} holds no record yet.")
    return records


def series(records: Sequence[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the records that carry `metric`."""
    pairs = [(r["epoch"], r[metric]) for r in records if metric in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def comparison_rows(runs: dict[str, Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per run: the last epoch's test error and NLL, and the best validation epoch.

    Args:
      runs: label → the run's records.

    Returns:
      One row per run: label, epochs, test_error, test_nll, best_val_error, best_epoch,
      test_error_at_best_val (the test set never chooses).
    """
    rows = []
    for label, records in runs.items():
        evaluated = [r for r in records if "eval/val_error" in r]
        last = evaluated[-1] if evaluated else {}
        best = min(evaluated, key=lambda r: r["eval/val_error"]) if evaluated else {}
        rows.append(
            {
                "run": label,
                "epochs": records[-1]["epoch"],
                "test_error": last.get("eval/test_error"),
                "test_nll": last.get("eval/test_nll"),
                "best_val_error": best.get("eval/val_error"),
                "best_epoch": best.get("epoch"),
                "test_error_at_best_val": best.get("eval/test_error"),
            }
        )
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of `comparison_rows` as a Markdown table (errors in %)."""

    def pct(value):
        return "–" if value is None else f"{100 * value:.2f}%"

    lines = [
        "| run | epochs | test error | test NLL | best val. error (epoch) | test error there |",
        "|--|--|--|--|--|--|",
    ]
    for r in rows:
        nll = "–" if r["test_nll"] is None else f"{r['test_nll']:.4f}"
        lines.append(
            f"| {r['run']} | {r['epochs']} | {pct(r['test_error'])} | {nll} | "
            f"{pct(r['best_val_error'])} ({r['best_epoch']}) | {pct(r['test_error_at_best_val'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_runs(workdirs: Sequence[str], labels: Sequence[str] | None, out: str) -> str:
    """Plots the runs' curves side by side into `out` (PNG) and returns the Markdown table.

    Args:
      workdirs: the runs' workdirs.
      labels: a label per run, or None for the workdirs' base names.
      out: the PNG path; the table is also written next to it, as `out` with `.md`.

    Returns:
      The Markdown table of `comparison_rows`.
    """
    labels = list(labels) if labels else [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(labels) != len(workdirs):
        raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:  # e.g. runs/s0/mnist and runs/s1/mnist: one would hide the other.
        raise ConfigError(
            "--labels",
            ",".join(labels),
            f"a distinct label per run ({repeated[0]!r} names two; give --labels)",
        )
    runs = {label: read_metrics(w) for label, w in zip(labels, workdirs, strict=True)}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (metric, title) in zip(axes, PANELS, strict=True):
        for label, records in runs.items():
            epochs, values = series(records, metric)
            if "error" in metric:
                values = [100 * v for v in values]
            ax.plot(epochs, values, marker="o" if "eval" in metric else None, ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if "error" in metric:
            ax.set_ylabel("%")
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    table = markdown_table(comparison_rows(runs))
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    return table
