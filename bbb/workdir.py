"""What a run leaves in its workdir: config, metrics, TensorBoard, checkpoints, plots, summary.

- `config.json`: the config of the run.
- `metrics.jsonl`: one JSON object per epoch (`step`, `epoch`, `train/…`, `eval/…`).
- `tensorboard/`: the same curves, and histograms of σ and of |μ|/σ.
- `checkpoints/`: Orbax checkpoints of the whole train state and the best-validation record.
- `plots/`: learning curves and histograms of σ and of the signal-to-noise ratio (PNG).
- `summary.json`: the final figures.

Nothing is overwritten by a start that fails: the workdir is checked before anything is written,
and a resumed run only drops the metrics lines that come after the checkpoint it resumes from
(they are computed again, identically).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bbb import parallel
from bbb.errors import ConfigError

PyTree = Any
# Fields that may change between a run and its resumption (training length, logging cadence,
# where the data are found, and how the steps run: the device mesh, so a run may resume on
# other hardware, the epoch loop, which follows the scan's trajectory, and how many posterior
# samples an evaluation draws at once, which changes its memory, not its values). The length may not
# change under the cosine schedule, which decays over it (`check_workdir`).
RESUMABLE_FIELDS = (
    "num_epochs",
    "progress",
    "checkpoint_every_epochs",
    "max_checkpoints",
    "mesh.data",
    "mesh.samples",
    "epoch_loop",
    "cpu_vector_bits",
    "eval.sample_batch",
    "data.data_dir",
    "data.manual_dir",
    "data.cache_dir",
)


class WorkdirError(RuntimeError):
    """The workdir cannot be used as it is; the message says why and what to do."""


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config's JSON as {"a.b.c": value}, nested dicts joined by dots."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_records(path: str) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file such as metrics.jsonl, in order, blank lines skipped.

    A last line cut short (a kill or a full disk mid-write) is dropped: it always comes after
    the last checkpoint, which a resumed run redoes. A bad line before the last is an error.
    """
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for index, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if index == len(lines) - 1:
                break
            raise WorkdirError(
                f"{path}, line {index + 1}, is not JSON ({e}); move the file away to start "
                "its log afresh."
            ) from e
    return records


def write_text_atomically(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename: readers never see half.

    The temporary name carries the process id, so that the tasks of a job array may write the
    same file at once (the last rename wins).
    """
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


def can_create_files(folder: str) -> bool:
    """Whether a file can be created (and is then removed) in `folder`.

    `os.access` says yes to root on a read-only mount or a pseudo file system such as /proc;
    creating a file is the test that cannot be fooled.
    """
    try:
        handle, probe = tempfile.mkstemp(prefix=".bbb-write-probe-", dir=folder)
    except OSError:
        return False
    os.close(handle)
    os.remove(probe)
    return True


def holds_results(path: str) -> bool:
    """Whether workdir `path` holds anything a run produced: a checkpoint, a metrics line or
    a results or summary file."""
    checkpoints = os.path.join(path, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        return True
    if any(os.path.exists(os.path.join(path, f)) for f in ("results.json", "summary.json")):
        return True
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            return any(line.strip() for line in f)
    return False


def with_added_fields(flat: dict[str, Any], added: Mapping[str, Any] | None) -> dict[str, Any]:
    """A saved, flattened config with the fields it predates filled in.

    Args:
      flat: a config saved before some fields existed, flattened (`flatten_config`).
      added: each added field and the value that runs saved without it behaved as.

    Returns:
      `flat`, with `added`'s value for each field that it lacks.
    """
    return {**(added or {}), **flat}


def check_workdir(
    workdir: str,
    config: ml_collections.ConfigDict,
    resumable: tuple[str, ...] = RESUMABLE_FIELDS,
    added: Mapping[str, Any] | None = None,
) -> None:
    """Checks, leaving nothing behind, that `workdir` can take this run.

    Args:
      workdir: the output folder.
      config: the run's config.
      resumable: the fields that may differ from the config saved in the workdir.
      added: fields added to the config after runs were made, each with the value that runs
        saved without it behaved as (`with_added_fields`).

    Raises:
      WorkdirError: the parent folder is missing or not writable, the workdir is a file, or it
        holds a run of a different config (one with results: `holds_results`).
    """
    if not workdir:
        raise ConfigError("--workdir", workdir, "a folder path")
    path = os.path.abspath(workdir)
    parent = os.path.dirname(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"workdir {path} exists and is not a folder.")
    if not os.path.isdir(parent):
        raise WorkdirError(f"the parent folder of workdir {path} does not exist: create {parent}.")
    target = path if os.path.isdir(path) else parent
    if not os.access(target, os.W_OK | os.X_OK) or not can_create_files(target):
        raise WorkdirError(
            f"workdir {path} is not writable ({target} denies writing): choose a --workdir "
            "under a folder you can write to."
        )
    saved = os.path.join(path, "config.json")
    # A config.json beside no results is that of a start which failed before its first metrics
    # line or checkpoint (a missing data set, a compile error): nothing there to keep, so any
    # config may start afresh in that workdir.
    if os.path.exists(saved) and holds_results(path):
        with open(saved) as f:
            old = with_added_fields(flatten_config(json.load(f)), added)
        new = flatten_config(_config_dict(config))
        changed = sorted(
            k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in resumable
        )
        # The cosine schedule decays to 0 over num_epochs: another length is another schedule,
        # and resuming with it would jump the learning rate (from ~0 back to η/2, say).
        if new.get("optim.schedule") == "cosine" and old.get("num_epochs") != new.get("num_epochs"):
            raise WorkdirError(
                f"workdir {path} holds a run of num_epochs={old.get('num_epochs')!r} with "
                "optim.schedule='cosine', whose learning rate decays over exactly that many "
                f"epochs; num_epochs={new.get('num_epochs')!r} would change the schedule midway. "
                f"Resume with num_epochs={old.get('num_epochs')!r}, or train longer in a new "
                "--workdir (or with optim.schedule='constant')."
            )
        if changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
            raise WorkdirError(
                f"workdir {path} holds a run with a different config ({diffs}). Resume it with "
                f"its own config (only {', '.join(resumable)} may change), or choose a new "
                "--workdir."
            )


@dataclasses.dataclass
class History:
    """The best-validation record: the test error there is the one a researcher may report.

    Attributes:
      best_val_error: the lowest validation error so far.
      best_epoch: the epoch where it was reached.
      test_error_at_best_val: the test error at that epoch (the test set never chooses).
    """

    best_val_error: float = math.inf
    best_epoch: int = 0
    test_error_at_best_val: float = math.nan

    def update_best(self, record: dict[str, Any]) -> None:
        """Updates the record from an epoch's metrics, if its validation error is lower."""
        val = record.get("eval/val_error", record.get("eval/val_nll"))
        if val is not None and val < self.best_val_error:
            self.best_val_error = val
            self.best_epoch = record["epoch"]
            self.test_error_at_best_val = record.get(
                "eval/test_error", record.get("eval/test_nll", math.nan)
            )


def restore_checkpoint(manager: Any, step: int, abstract_state: PyTree) -> tuple[PyTree, History]:
    """Restores (state, best-validation record) of checkpoint `step` of an Orbax manager.

    Args:
      manager: an `orbax.checkpoint.CheckpointManager`.
      step: the checkpoint's step.
      abstract_state: the structure, shapes and dtypes to restore into.

    Returns:
      (state, history).

    Raises:
      WorkdirError: the checkpoint cannot be read; says which and what to do.
    """
    state, history = restore_state_and_json(manager, step, abstract_state, "history")
    return state, History(**history)


def restore_state_and_json(
    manager: Any, step: int, abstract_state: PyTree, json_item: str
) -> tuple[PyTree, dict[str, Any]]:
    """Restores checkpoint `step` saved as a Composite of `state` (a pytree) and one JSON item.

    Args:
      manager: an `orbax.checkpoint.CheckpointManager`.
      step: the checkpoint's step.
      abstract_state: the structure, shapes and dtypes to restore `state` into.
      json_item: the name of the JSON item ("history" for training, "timing" for the bandit).

    Returns:
      (state, the JSON item).

    Raises:
      WorkdirError: the checkpoint cannot be read; says which and what to do.
    """
    import orbax.checkpoint as ocp

    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    "state": ocp.args.StandardRestore(abstract_state),
                    json_item: ocp.args.JsonRestore(),
                }
            ),
        )
    except Exception as e:  # Orbax raises several types for unreadable files.
        path = os.path.join(str(manager.directory), str(step))
        raise WorkdirError(
            f"checkpoint {path} cannot be restored ({type(e).__name__}: {e}). It is left as it "
            f"is. To resume from an earlier checkpoint, move {path} out of the workdir; to "
            "start fresh, use a new --workdir."
        ) from e
    return restored["state"], restored[json_item]


def _plot_training(workdir: str, records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [r["train/loss"] for r in records], label="free energy / N")
    axes[0].plot(epochs, [r["train/nll"] for r in records], label="NLL per example")
    curves = [r[k] for r in records for k in ("train/loss", "train/nll")]
    if all(v > 0 for v in curves if math.isfinite(v)):  # A Gaussian NLL can be negative.
        axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    axes[0].set_title("training objective")
    axes[1].plot(epochs, [r["train/kl"] for r in records])
    axes[1].set_xlabel("epoch")
    axes[1].set_title("KL[q ‖ P] (nats)")
    classification = any("eval/val_error" in r for r in records)
    metric, unit, scale = ("error", "error (%)", 100) if classification else ("rmse", "RMSE", 1)
    evals = [r for r in records if f"eval/val_{metric}" in r]
    if evals:
        ev_epochs = [r["epoch"] for r in evals]
        for key, label in (
            (f"eval/val_{metric}", "validation"),
            (f"eval/test_{metric}", "test"),
            (f"eval/test_{metric}_mean_weights", "test, mean weights"),
        ):
            if key in evals[-1]:
                axes[2].plot(ev_epochs, [scale * r[key] for r in evals], label=label)
        axes[2].set_ylabel(unit)
        axes[2].set_xlabel("epoch")
        axes[2].legend()
        axes[2].set_title(unit.split(" ")[0])
    # Fixed margins: tight_layout() would draw the figure an extra time (a third of the cost,
    # paid once per member of a sweep).
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.92, wspace=0.22)
    fig.savefig(os.path.join(workdir, "plots", "learning_curves.png"), dpi=100)
    plt.close(fig)


def _histogram_range(values: np.ndarray) -> tuple[float, float]:
    """A finite range for 100 bins: nearly equal values (all σ at ρ₀) get a unit-wide range.

    matplotlib refuses 100 bins over a range of a few ulps ("Too many bins for data range").
    """
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if hi - lo < 1e-3 * max(1.0, abs(lo), abs(hi)):
        return lo - 0.5, hi + 0.5
    return lo, hi


def _plot_histograms(workdir: str, sigma: np.ndarray, snr: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # np.histogram + stairs draws one path per panel where hist() draws 100 rectangles: the
    # same figure in about half the time, which a vectorised sweep pays once per member.
    log_sigma = np.log10(np.maximum(sigma, 1e-30))
    counts, edges = np.histogram(log_sigma, bins=100, range=_histogram_range(log_sigma))
    axes[0].stairs(counts, edges, fill=True)
    axes[0].set_xlabel("log10 σ")
    axes[0].set_title("posterior standard deviations")
    snr_db = 10 * np.log10(np.maximum(snr, 1e-30))
    density, edges = np.histogram(snr_db, bins=100, range=_histogram_range(snr_db), density=True)
    axes[1].stairs(density, edges, fill=True)
    axes[1].set_xlabel("signal-to-noise |μ|/σ (dB)")
    axes[1].set_title("signal-to-noise ratio (Blundell et al. 2015, Fig. 3)")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.2)
    fig.savefig(os.path.join(workdir, "plots", "posterior_histograms.png"), dpi=100)
    plt.close(fig)


@jax.jit
def _flat_sigma_and_snr(posterior: Any) -> tuple[jax.Array, jax.Array]:
    """The posterior's own stddev() and signal_to_noise(), flattened, as one compiled program."""
    flat = lambda tree: jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
    return flat(posterior.stddev()), flat(posterior.signal_to_noise())


def _posterior_arrays(params: PyTree) -> tuple[np.ndarray, np.ndarray] | None:
    """(σ, |μ|/σ) of every weight, flat, from the posterior's own methods.

    The parameters are fetched to the host first: process 0 alone must not run a computation on
    arrays that span hosts. One jitted program (compiled once per posterior structure) rather
    than eager ops, which would compile one small program per leaf shape and operation.
    """
    posterior = jax.device_get(params["posterior"])
    if not hasattr(posterior, "signal_to_noise"):
        return None
    sigma, snr = jax.device_get(_flat_sigma_and_snr(posterior))
    return np.asarray(sigma), np.asarray(snr)


class Run:
    """The writers of one run: metrics, TensorBoard, checkpoints, plots and summary.

    Only process 0 writes logs, metrics, TensorBoard, plots, config.json and summary.json; every
    process calls the Orbax checkpoint manager (save, restore, wait), which coordinates the
    writes across processes, as Orbax requires.
    """

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        import orbax.checkpoint as ocp

        self.workdir = os.path.abspath(workdir)
        self.config = config
        self.is_writer = parallel.is_main_process()
        self.records: list[dict[str, Any]] = []
        if self.is_writer:
            os.makedirs(os.path.join(self.workdir, "plots"), exist_ok=True)
        self.checkpoint_dir = os.path.join(self.workdir, "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.checkpoint_dir,
            options=ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints, create=True),
        )
        self._tb = None
        self._metrics_file = None
        self._resumed_step = 0  # The step of the checkpoint restored (0: a fresh start).

    @property
    def tensorboard(self):
        """The TensorBoard writer (process 0 only), created on first use."""
        if self._tb is None and self.is_writer:
            from tensorboardX import SummaryWriter

            # A resumed run redoes the steps after its checkpoint: purge_step drops the events
            # the earlier session logged for them, so TensorBoard shows each step once.
            self._tb = SummaryWriter(
                os.path.join(self.workdir, "tensorboard"), purge_step=self._resumed_step + 1
            )
        return self._tb

    @property
    def metrics_path(self) -> str:
        """workdir/metrics.jsonl."""
        return os.path.join(self.workdir, "metrics.jsonl")

    def restore(self, state: PyTree) -> tuple[PyTree, History]:
        """The latest checkpoint's state and best-validation record, or the inputs if none.

        Args:
          state: the freshly initialised state (gives the structure to restore into).

        Returns:
          (state, history).

        Writes config.json once the checkpoint is read (a start that cannot read it leaves the
        saved config, with the run's own `num_epochs`, as it was).

        Raises:
          WorkdirError: the latest checkpoint cannot be read; says which and what to do.
        """
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        if step is None:
            history, max_step = History(), 0
        else:
            abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
            state, history = restore_checkpoint(self.manager, step, abstract)
            max_step = int(state.step)
        self._resumed_step = max_step
        self._load_records(max_step=max_step)
        if self.is_writer:
            write_text_atomically(
                os.path.join(self.workdir, "config.json"),
                json.dumps(_config_dict(self.config), indent=2, sort_keys=True),
            )
        return state, history

    def _load_records(self, max_step: int) -> None:
        """Keeps the metrics lines up to `max_step` (a resumed run redoes the rest)."""
        if not (self.is_writer and os.path.exists(self.metrics_path)):
            return
        records = read_records(self.metrics_path)
        self.records = [r for r in records if r["step"] <= max_step]
        if len(self.records) != len(records):
            write_text_atomically(
                self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.records)
            )

    def write_metrics(self, record: dict[str, Any], state: PyTree) -> None:
        """Appends one epoch's metrics to metrics.jsonl and TensorBoard."""
        if not self.is_writer:
            return
        self.records.append(record)
        if self._metrics_file is None:  # Opened once: a sweep appends many lines per epoch.
            self._metrics_file = open(self.metrics_path, "a")  # Closed in close().
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        step = record["step"]
        for key, value in record.items():
            if key not in ("step",):
                self.tensorboard.add_scalar(key, value, step)
        if "eval/val_error" in record or "eval/val_nll" in record:
            arrays = _posterior_arrays(state.params)
            if arrays is not None:
                sigma, snr = arrays
                self.tensorboard.add_histogram("posterior/sigma", sigma, step)
                self.tensorboard.add_histogram("posterior/log10_snr", np.log10(snr + 1e-30), step)
            # Flushed (an fsync) at evaluations and checkpoints, not every epoch: a vectorised
            # sweep logs many members per epoch. metrics.jsonl is written at once regardless.
            self.tensorboard.flush()

    def save(self, state: PyTree, history: History) -> None:
        """Saves an Orbax checkpoint of the state and the best-validation record."""
        import orbax.checkpoint as ocp

        self.manager.save(
            int(state.step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                history=ocp.args.JsonSave(dataclasses.asdict(history)),
            ),
        )
        self.manager.wait_until_finished()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Waits for pending checkpoint writes and closes the writers."""
        self.manager.wait_until_finished()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        self.manager.close()

    def saved_summary(self) -> dict[str, Any] | None:
        """The summary.json of a finished run, or None if there is none."""
        path = os.path.join(self.workdir, "summary.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def finish(
        self, state: PyTree, history: History, *, wall_time: float, steps_done: int
    ) -> dict[str, Any]:
        """Writes plots and summary.json, prints a summary paragraph, and returns the summary."""
        self.manager.wait_until_finished()
        last = next((r for r in reversed(self.records) if "eval/test_nll" in r), {})
        summary = {
            "test_error": last.get("eval/test_error"),
            "test_error_mean_weights": last.get("eval/test_error_mean_weights"),
            "test_nll": last.get("eval/test_nll"),
            "test_rmse": last.get("eval/test_rmse"),
            "best_val_error": history.best_val_error,
            "best_epoch": history.best_epoch,
            "test_error_at_best_val": history.test_error_at_best_val,
            "epochs": self.records[-1]["epoch"] if self.records else 0,
            "wall_time_s": wall_time,
            "steps_per_s": steps_done / wall_time if wall_time > 0 else None,
        }
        if "test_rmse" in summary and summary["test_rmse"] is not None:
            # A regression run chooses its epoch by validation NLL: the History holds NLLs.
            # Named as what they are; the error-named keys stay for the tools that read them.
            summary["best_val_nll"] = history.best_val_error
            summary["test_nll_at_best_val"] = history.test_error_at_best_val
        summary = {k: v for k, v in summary.items() if v is not None}
        if self.is_writer:
            if self.records:
                _plot_training(self.workdir, self.records)
            arrays = _posterior_arrays(state.params)
            if arrays is not None:
                _plot_histograms(self.workdir, *arrays)
            # Last, and whole or not at all: its presence marks the run finished (a rerun
            # returns it), so a kill while plotting or writing must leave no partial one.
            write_text_atomically(
                os.path.join(self.workdir, "summary.json"), json.dumps(summary, indent=2)
            )
            print(summary_paragraph(summary, self.workdir))
        self.close()
        return summary


def summary_paragraph(summary: dict[str, Any], workdir: str) -> str:
    """A few human sentences on how the run ended."""
    parts = [f"Trained {summary['epochs']} epochs; {summary['wall_time_s']:.0f} s this session"]
    if summary.get("steps_per_s"):
        parts[0] += f" ({summary['steps_per_s']:.0f} steps/s this session)"
    if "test_error" in summary:
        parts.append(
            f"test error {100 * summary['test_error']:.2f}% with the posterior predictive, "
            f"{100 * summary['test_error_mean_weights']:.2f}% with the mean weights; "
            f"test NLL {summary['test_nll']:.4f}"
        )
        parts.append(
            f"best validation error {100 * summary['best_val_error']:.2f}% at epoch "
            f"{summary['best_epoch']}, where the test error was "
            f"{100 * summary['test_error_at_best_val']:.2f}%"
        )
    elif "test_rmse" in summary:
        parts.append(f"test RMSE {summary['test_rmse']:.4f}, test NLL {summary['test_nll']:.4f}")
        if "best_val_nll" in summary:
            parts.append(
                f"best validation NLL {summary['best_val_nll']:.4f} at epoch "
                f"{summary['best_epoch']}, where the test NLL was "
                f"{summary['test_nll_at_best_val']:.4f}"
            )
    return "; ".join(parts) + f". Files are in {workdir}."


class Progress:
    """A tqdm bar over epochs with ETA and the live loss and errors."""

    def __init__(self, num_epochs: int, start_epoch: int, enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=num_epochs,
            initial=start_epoch,
            unit="epoch",
            disable=not enabled or not parallel.is_main_process(),
            dynamic_ncols=True,
        )
        self.postfix: dict[str, str] = {}

    def update(self, record: dict[str, Any]) -> None:
        """Advances one epoch and shows the latest loss and errors."""
        self.postfix["loss"] = f"{record['train/loss']:.4f}"
        if "train/accuracy" in record:
            self.postfix["train_err"] = f"{100 * (1 - record['train/accuracy']):.2f}%"
        for key, label in (("eval/val_error", "val_err"), ("eval/test_error", "test_err")):
            if key in record:
                self.postfix[label] = f"{100 * record[key]:.2f}%"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        """Closes the bar."""
        self.bar.close()
