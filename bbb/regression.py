"""The toy regression experiment (Blundell et al. 2015, §5.2, Figure 5): Bayes by Backprop next
to a plain network, their predictive median and interquartile range over x ∈ [−0.2, 1.2].

The band is that of the network's output f(x; w) under w ~ q (the epistemic uncertainty, as the
paper plots it; the likelihood's noise is not added). A point estimate has one w, so its
interquartile range is 0 everywhere; Bayes by Backprop's should widen away from the training
inputs x ∈ [0, 0.5].
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bbb import predict as predict_lib
from bbb import train
from bbb.errors import check_integer_at_least

X_PLOT = (-0.2, 1.2)  # The plotted range (the paper's Figure 5).
X_IN, X_OUT = 0.25, 1.0  # Where the band is compared: inside the data, and far outside it.


def predictive_quantiles(
    experiment: train.Experiment,
    params: dict[str, Any],
    x: np.ndarray,
    key: jax.Array,
    num_samples: int = 200,
) -> dict[str, np.ndarray]:
    """The 25th, 50th and 75th percentiles of f(x; w), w ~ q, at each input.

    Args:
      experiment: a regression experiment (from `train.build` or `train.load_run`).
      params: its trained pytree ({"posterior", ...}).
      x: inputs [B, 1].
      key: the key of the posterior samples.
      num_samples: K, the posterior samples.

    Returns:
      {"lower", "median", "upper", "iqr"}, each float [B].
    """
    prediction = predict_lib.predict(
        experiment.model,
        params["posterior"],
        jnp.asarray(x, jnp.float32),
        key,
        num_samples,
        classification=False,
    )
    samples = np.asarray(prediction.samples[..., 0], np.float64)  # [K, B]
    lower, median, upper = np.percentile(samples, [25, 50, 75], axis=0)
    return {"lower": lower, "median": median, "upper": upper, "iqr": upper - lower}


def iqr_at(
    experiment: train.Experiment, params: dict[str, Any], points: tuple[float, ...], **kwargs
) -> list[float]:
    """The predictive interquartile range at each of `points`.

    Args:
      experiment: a regression experiment.
      params: its trained pytree.
      points: scalar inputs x.
      **kwargs: `key` and `num_samples`, passed to `predictive_quantiles`.

    Returns:
      One IQR per point.
    """
    x = np.asarray(points, np.float32)[:, None]
    return [float(v) for v in predictive_quantiles(experiment, params, x, **kwargs)["iqr"]]


def plot_regression(
    path: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    grid: np.ndarray,
    bands: dict[str, dict[str, np.ndarray]],
) -> None:
    """Side-by-side panels: each model's median and interquartile range, and the data.

    Args:
      path: the PNG file.
      x_train: training inputs [N, 1].
      y_train: training targets [N, 1].
      grid: the plotted inputs [G].
      bands: panel title → `predictive_quantiles` on `grid`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bbb.data.regression import toy_function

    fig, axes = plt.subplots(1, len(bands), figsize=(6 * len(bands), 4.5), sharey=True)
    for ax, (title, band) in zip(np.atleast_1d(axes), bands.items(), strict=True):
        ax.plot(grid, toy_function(grid), color="0.6", lw=1, ls=":", label="noise-free curve")
        ax.scatter(x_train[:, 0], y_train[:, 0], s=4, c="k", marker="x", lw=0.5, label="data")
        ax.fill_between(
            grid, band["lower"], band["upper"], color="C0", alpha=0.35, label="interquartile range"
        )
        ax.plot(grid, band["median"], color="C3", lw=1.5, label="median")
        ax.set_title(title)
        ax.set_xlabel("x")
        ax.set_xlim(*X_PLOT)
        ax.set_ylim(-1.0, 2.0)
    np.atleast_1d(axes)[0].set_ylabel("y")
    np.atleast_1d(axes)[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def regression_experiment(
    workdir: str,
    bbb_config: ml_collections.ConfigDict,
    plain_config: ml_collections.ConfigDict,
    num_samples: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Trains both models (resuming finished or partial runs), plots Figure 5, writes figures.

    Writes `workdir/bbb/` and `workdir/plain/` (two ordinary runs), `workdir/plots/regression.png`
    and `workdir/regression.json`.

    Args:
      workdir: the output folder.
      bbb_config: configs/regression.py.
      plain_config: configs/regression.py:plain.
      num_samples: posterior samples for the band.
      seed: the seed of those samples.

    Returns:
      Per model: the IQR at x = 0.25 and x = 1.0, their ratio, and the test RMSE and NLL.

    Raises:
      ConfigError: `num_samples` is not an integer of at least 2, or either config has a bad
        field, before anything is written or trained.
    """
    check_integer_at_least("num_samples", num_samples, 2, "a band")
    for config in (bbb_config, plain_config):  # Both configs' errors before the workdir exists.
        train.build(config, *train.dataset_spec(config))
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    grid = np.linspace(*X_PLOT, 281)
    bands, results = {}, {}
    for name, config, title in (
        ("bbb", bbb_config, "Bayes by Backprop"),
        ("plain", plain_config, "plain network"),
    ):
        run_dir = os.path.join(workdir, name)
        train.train_and_evaluate(config, run_dir)
        experiment, state = train.load_run(run_dir)
        key = jax.random.key(seed)
        inside, outside = iqr_at(
            experiment, state.params, (X_IN, X_OUT), key=key, num_samples=num_samples
        )
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        results[name] = {
            "iqr_at_0.25": inside,
            "iqr_at_1.0": outside,
            "iqr_ratio": outside / inside if inside > 0 else None,
            "test_rmse": summary.get("test_rmse"),
            "test_nll": summary.get("test_nll"),
            "wall_time_s": summary.get("wall_time_s"),
        }
        bands[title] = predictive_quantiles(
            experiment, state.params, grid[:, None], key, num_samples
        )
    x_train, y_train = train.load_data(bbb_config)["train"]
    plot_regression(os.path.join(workdir, "plots", "regression.png"), x_train, y_train, grid, bands)
    with open(os.path.join(workdir, "regression.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results
