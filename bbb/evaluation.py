"""Uncertainty evaluation of a trained classifier: calibration, OOD detection, dataset shift.

`evaluate_run(workdir)` restores a run's latest checkpoint (Bayes by Backprop, the SGD baseline
with a point posterior, or the dropout baseline evaluated as MC dropout) and evaluates the
Monte-Carlo predictive p(y | x) ≈ (1 / K) Σ_k p(y | x, w_k), w_k ~ q (Blundell et al. 2015,
§3.3), on three kinds of data:

- MNIST test: error, NLL, Brier score, ECE and adaptive ECE (Guo et al. 2017; Nixon et al.
  2019), a reliability diagram, and the mean predictive entropy and mutual information.
- Fashion-MNIST test (Xiao et al. 2017) as the out-of-distribution set: AUROC and AUPR of
  detecting it by the predictive entropy (total uncertainty) or by the mutual information
  I[y; w | x] (epistemic uncertainty; Houlsby et al. 2011, Depeweg et al. 2018).
- MNIST test rotated by 0°, 15°, …, 180° (the dataset-shift curve of Ovadia et al. 2019,
  "Can You Trust Your Model's Uncertainty?"): error, NLL and ECE against the angle.

It also measures how the metrics depend on the number K of MC samples: 2·K_max samples are
drawn on MNIST and Fashion-MNIST, and for each K the metrics are computed on up to `MAX_SETS`
disjoint sets of K of them. Disjoint sets of independent samples are independent K-sample
evaluations, so the standard deviation over the sets is the Monte-Carlo standard error of a
single K-sample evaluation (it measures the sampling noise of the weights, not the finite test
set).

A point posterior without dropout is deterministic: all its samples are the same network, so it
is evaluated with one sample (K = 1) whatever `num_samples` says.

Everything that touches the data runs in `jit`: the K weight samples one network at a time over
the whole set (`make_predictor`, a `lax.map` over `bbb.estimators.sample_output`), the rotation
as a bilinear resampling (`jax.scipy.ndimage.map_coordinates`), and the metrics from
`bbb.metrics`; one compiled program (`make_dataset_evaluator`) serves MNIST, Fashion-MNIST and
every angle.

Files written: `workdir/eval.json` and, in `workdir/plots/`, `PLOT_FILES`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bbb import estimators, metrics
from bbb import predict as predict_lib
from bbb.errors import check_positive
from bbb.objective import train_kwargs

Array = jax.Array
PyTree = Any
Data = tuple[np.ndarray, np.ndarray]  # (images float32 [N, 28, 28, 1], labels int32 [N])

EVAL_FILE = "eval.json"
PLOT_FILES = (
    "reliability_diagram.png",
    "uncertainty_histograms.png",
    "rotation.png",
    "sample_counts.png",
)
ROTATION_ANGLES = tuple(range(0, 181, 15))  # Degrees, counter-clockwise.
SAMPLE_COUNTS = (1, 2, 5, 10, 20, 50, 100)  # K of the metrics-vs-samples curve.
MAX_SETS = 50  # At most this many disjoint K-sample sets per K.
NUM_BINS = 15  # Calibration bins (the ECE and the reliability diagram).
# The metrics computed for every K-sample set.
SAMPLE_COUNT_METRICS = ("error", "nll", "brier", "ece", "auroc_entropy", "auroc_mutual_information")
# The metrics recorded at each rotation angle.
ROTATION_METRICS = (
    "error",
    "nll",
    "ece",
    "brier",
    "predictive_entropy",
    "mutual_information",
    "error_mean_weights",
)


# --------------------------------------------------------------------------------------------
# Rotation.
# --------------------------------------------------------------------------------------------


@jax.jit
def rotate_images(images: Array, angle: Array | float) -> Array:
    """Rotates images counter-clockwise about their centre, with bilinear interpolation.

    As `scipy.ndimage.rotate(image, angle, reshape=False, order=1, mode="grid-constant")`: the
    output keeps the input's size, and a pixel (r, c) takes the bilinear interpolation at
    (r_in, c_in) = centre + R(−θ) ((r, c) − centre) in image coordinates (rows down), the
    centre being ((H − 1) / 2, (W − 1) / 2), of the image extended by zeros (so a point half a
    pixel outside the image gets half the edge pixel; scipy's default mode "constant" would
    give it 0). A rotation by 90° is `np.rot90(image)` (up to rounding in cos and sin); by 0°
    it is exactly the identity.

    Args:
      images: images [N, H, W, C].
      angle: the angle θ in degrees (a traced scalar: one compilation serves every angle).

    Returns:
      The rotated images [N, H, W, C], same dtype.
    """
    _, height, width, _ = images.shape
    theta = jnp.deg2rad(jnp.asarray(angle, jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    centre_row, centre_col = (height - 1) / 2.0, (width - 1) / 2.0
    rows, cols = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )  # [H, W] each
    # In (x right, y up) coordinates the content turns by +θ, so a pixel reads from R(−θ) p.
    x, y = cols - centre_col, centre_row - rows  # [H, W]
    x_in = cos * x + sin * y
    y_in = -sin * x + cos * y
    coordinates = [centre_row - y_in, centre_col + x_in]  # ([H, W], [H, W])

    def rotate_channel(channel: Array) -> Array:  # [H, W] -> [H, W]
        return jax.scipy.ndimage.map_coordinates(
            channel, coordinates, order=1, mode="constant", cval=0.0
        )

    per_channel = jax.vmap(rotate_channel, in_axes=-1, out_axes=-1)  # [H, W, C]
    return jax.vmap(per_channel)(images).astype(images.dtype)  # [N, H, W, C]


# --------------------------------------------------------------------------------------------
# What kind of run, and how to sample it.
# --------------------------------------------------------------------------------------------


def uses_mc_dropout(config: ml_collections.ConfigDict) -> bool:
    """Whether a run is evaluated as MC dropout: its model has dropout (Gal & Ghahramani 2016).

    Args:
      config: the run's config.

    Returns:
      True if `config.model.dropout_rate > 0`.
    """
    return config.model.dropout_rate > 0


def is_deterministic(config: ml_collections.ConfigDict) -> bool:
    """Whether every MC sample of a run is the same network (a point posterior, no dropout).

    Args:
      config: the run's config.

    Returns:
      True for the SGD baseline.
    """
    return config.posterior.name == "point" and not uses_mc_dropout(config)


def method_name(config: ml_collections.ConfigDict) -> str:
    """A short name of the run's method, for tables and plot titles.

    Args:
      config: the run's config.

    Returns:
      "Bayes by Backprop", "MC dropout (p=…)" or "SGD (point estimate)"; a mean-field run with
      dropout is "Bayes by Backprop + MC dropout (p=…)".
    """
    dropout = f"MC dropout (p={config.model.dropout_rate:g})"
    if config.posterior.name == "point":
        return dropout if uses_mc_dropout(config) else "SGD (point estimate)"
    return "Bayes by Backprop" + (f" + {dropout}" if uses_mc_dropout(config) else "")


def sample_counts(num_samples: int) -> list[int]:
    """The K of the metrics-vs-samples curve: `SAMPLE_COUNTS` below `num_samples`, then it.

    Args:
      num_samples: K_max.

    Returns:
      Increasing sample counts ending in `num_samples`, e.g. [1, 2, 5, 10, 20, 30] for 30.
    """
    check_positive("num_samples", num_samples, integer=True)
    return [k for k in SAMPLE_COUNTS if k < num_samples] + [num_samples]


@functools.cache
def make_predictor(
    model: Any, num_samples: int, mc_dropout: bool
) -> Callable[[PyTree, Array, Array], Array]:
    """The jitted sampling function of an evaluation, compiled once per input shape.

    Sample k is the network w_k ~ q drawn from `split(key, K)[k]` (and its dropout masks, for
    MC dropout), applied to all N inputs at once: a `lax.map` over the K samples, so that the
    memory is that of one network on N inputs and each weight sample is drawn once. (On a CPU
    this is about 1.5× faster than `bbb.predict.predict_in_batches`, which draws the K weight
    samples again for every chunk of examples and runs K networks as one batched matmul.) The
    same key gives the same K networks on any inputs: common random numbers across datasets.
    Cached: equal arguments (Flax modules compare by their fields) return the same compiled
    function.

    Args:
      model: the Flax model.
      num_samples: K, the MC samples.
      mc_dropout: keep dropout on (MC dropout; Gal & Ghahramani 2016).

    Returns:
      `predictor(posterior, images [N, ...], key) -> samples [K, N, C]`, the class
      probabilities p(y | x, w_k).
    """
    kwargs = train_kwargs(model, mc_dropout)

    @jax.jit
    def predictor(posterior: PyTree, images: Array, key: Array) -> Array:
        def one_network(network_key: Array) -> Array:  # [N, C]
            logits = estimators.sample_output(
                model, posterior, images, network_key, "reparam", **kwargs
            )  # Whole networks ("reparam"): the samples are K functions.
            return jax.nn.softmax(logits, axis=-1)

        return jax.lax.map(one_network, jax.random.split(key, num_samples))  # [K, N, C]

    return predictor


@functools.cache
def make_dataset_evaluator(
    model: Any, num_samples: int, mc_dropout: bool
) -> Callable[[PyTree, Array, Array, Array, Array], dict[str, Any]]:
    """The jitted evaluation of one (rotated) labelled set, compiled once per input shape.

    Args:
      model: the Flax model.
      num_samples: K, the MC samples.
      mc_dropout: keep dropout on (MC dropout).

    Returns:
      `evaluator(posterior, images [N, ...], labels [N], angle, key)`, which rotates the images
      by `angle` degrees (`rotate_images`; 0 leaves them as they are), samples them with
      `make_predictor(model, num_samples, mc_dropout)` and returns {"samples": [K, N, C],
      "metrics": `bbb.metrics.classification_metrics` plus `error_mean_weights` (the error of
      the posterior-mean weights, dropout off), "entropy": [N] predictive entropies,
      "mutual_information": [N], "reliability": `bbb.metrics.reliability_diagram_data`}.
    """
    predictor = make_predictor(model, num_samples, mc_dropout)

    @jax.jit
    def evaluator(
        posterior: PyTree, images: Array, labels: Array, angle: Array, key: Array
    ) -> dict[str, Any]:
        images = rotate_images(images, angle)  # [N, ...]
        samples = predictor(posterior, images, key)  # [K, N, C]
        values = metrics.classification_metrics(samples, labels, NUM_BINS)
        # The posterior-mean network, as `bbb.predict.predict` computes it (dropout off).
        mean_weights = predict_lib.predict(model, posterior, images, key, 1).mean_weights
        values["error_mean_weights"] = metrics.error_rate(mean_weights, labels)
        return {
            "samples": samples,
            "metrics": values,
            "entropy": metrics.predictive_entropy(samples),  # [N]
            "mutual_information": metrics.mutual_information(samples),  # [N]
            "reliability": metrics.reliability_diagram_data(samples, labels, NUM_BINS),
        }

    return evaluator


# --------------------------------------------------------------------------------------------
# Metrics against the number of samples.
# --------------------------------------------------------------------------------------------


def _set_metrics(
    predictive_in: Array,
    expected_entropy_in: Array,
    predictive_out: Array,
    expected_entropy_out: Array,
    labels: Array,
) -> dict[str, Array]:
    """`SAMPLE_COUNT_METRICS` of one sample set, from its averages over the set's K samples.

    The predictive [N, C] and the expected entropy (1/K) Σ_k H[p_k] [N] determine every metric
    of a set (the mutual information is their difference, as in `metrics.mutual_information`),
    so that sets of any size K share one compiled program.
    """
    entropy_in = metrics.predictive_entropy(predictive_in)  # [N_in]
    entropy_out = metrics.predictive_entropy(predictive_out)  # [N_out]
    information_in = jnp.maximum(entropy_in - expected_entropy_in, 0.0)  # [N_in]
    information_out = jnp.maximum(entropy_out - expected_entropy_out, 0.0)  # [N_out]
    return {
        "error": metrics.error_rate(predictive_in, labels),
        "nll": metrics.nll(predictive_in, labels),
        "brier": metrics.brier_score(predictive_in, labels),
        "ece": metrics.expected_calibration_error(predictive_in, labels, NUM_BINS),
        "auroc_entropy": metrics.auroc(entropy_in, entropy_out),
        "auroc_mutual_information": metrics.auroc(information_in, information_out),
    }


@functools.partial(jax.jit, static_argnames="max_sets")
def _metrics_of_sample_sets(
    samples_in: Array, samples_out: Array, labels: Array, num_samples: Array, max_sets: int
) -> dict[str, Array]:
    """Metrics of the disjoint sets {0..K-1}, {K..2K-1}, … of the pool; [max_sets] each.

    Set g holds samples gK … (g + 1)K − 1; sets beyond the ⌊P / K⌋ complete ones are empty and
    their entries meaningless. `num_samples` (K) is traced, so one compilation serves every K.
    """
    pool_size = samples_in.shape[0]
    num_sets = pool_size // num_samples
    sample_index = jnp.arange(pool_size)  # [P]
    # Samples of incomplete sets go to segment `max_sets`, which segment_sum drops.
    set_ids = jnp.where(
        sample_index < num_sets * num_samples, sample_index // num_samples, max_sets
    )

    def set_means(per_sample: Array) -> Array:  # [P, ...] -> [max_sets, ...]
        sums = jax.ops.segment_sum(per_sample, set_ids, num_segments=max_sets)
        return sums / num_samples.astype(per_sample.dtype)

    moments = (
        set_means(samples_in),  # [G, N_in, C]
        set_means(jax.vmap(metrics.predictive_entropy)(samples_in)),  # [G, N_in]
        set_means(samples_out),  # [G, N_out, C]
        set_means(jax.vmap(metrics.predictive_entropy)(samples_out)),  # [G, N_out]
    )
    return jax.lax.map(lambda m: _set_metrics(*m, labels), moments)


def check_labels(labels: Any, num_classes: int) -> None:
    """Raises ValueError unless every label is a class index in [0, num_classes).

    Inside jit an out-of-range label cannot be refused: NLL would gather another class (−1
    wraps to the last) or NaN while error and Brier count it as simply wrong.
    """
    labels = np.asarray(labels)
    if labels.size and (
        not np.issubdtype(labels.dtype, np.integer)
        or labels.min() < 0
        or labels.max() >= num_classes
    ):
        bad = labels[(labels < 0) | (labels >= num_classes) | (labels != np.floor(labels))]
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}); got {labels.dtype} labels "
            f"such as {bad[:3].tolist() if bad.size else labels[:3].tolist()}."
        )


def metrics_by_sample_count(
    samples_in: Array,
    samples_out: Array,
    labels: Array,
    counts: Sequence[int],
    max_sets: int = MAX_SETS,
) -> dict[str, Any]:
    """Metrics of K-sample evaluations for each K, with their Monte-Carlo standard errors.

    For each K the pool of P samples is cut into G = min(⌊P / K⌋, max_sets) disjoint sets of K
    samples; each set is one independent K-sample evaluation. `mean` is the average over the
    sets and `std` the standard deviation over them (ddof = 1): the Monte-Carlo standard error
    of one K-sample evaluation. `sem` = std / √G is the standard error of `mean`. With a single
    set (G = 1), `std` and `sem` are 0.

    Args:
      samples_in: per-sample class probabilities on in-distribution inputs [P, N_in, C].
      samples_out: per-sample class probabilities on out-of-distribution inputs [P, N_out, C];
        sample k must come from the same weights as `samples_in[k]` or an independent draw.
      labels: in-distribution labels [N_in].
      counts: the K to evaluate, each in [1, P].
      max_sets: the most sets per K (static).

    Returns:
      {"num_samples": counts, "num_sets": [G per K], and for each name in
      `SAMPLE_COUNT_METRICS`: {"mean": [...], "std": [...], "sem": [...]}}, lists of floats.
    """
    check_labels(labels, samples_in.shape[-1])
    pool_size = samples_in.shape[0]
    if samples_out.shape[0] != pool_size:
        raise ValueError(f"pools differ: {pool_size} and {samples_out.shape[0]} samples.")
    result: dict[str, Any] = {"num_samples": [int(k) for k in counts], "num_sets": []}
    result.update({name: {"mean": [], "std": [], "sem": []} for name in SAMPLE_COUNT_METRICS})
    for num_samples in counts:
        if not 1 <= num_samples <= pool_size:
            raise ValueError(f"sample count {num_samples} is not in [1, {pool_size}].")
        num_sets = min(pool_size // num_samples, max_sets)
        values = _metrics_of_sample_sets(
            samples_in, samples_out, labels, jnp.int32(num_samples), max_sets
        )
        result["num_sets"].append(num_sets)
        for name in SAMPLE_COUNT_METRICS:
            per_set = np.asarray(values[name], np.float64)[:num_sets]  # [G]
            std = float(np.std(per_set, ddof=1)) if num_sets > 1 else 0.0
            result[name]["mean"].append(float(np.mean(per_set)))
            result[name]["std"].append(std)
            result[name]["sem"].append(std / math.sqrt(num_sets))
    return result


# --------------------------------------------------------------------------------------------
# The evaluation.
# --------------------------------------------------------------------------------------------


def load_evaluation_data(config: ml_collections.ConfigDict) -> dict[str, Data]:
    """MNIST test and Fashion-MNIST test, read as the run's `config.data` says.

    The MNIST test split comes from `bbb.train.load_data` (so `data_dir`, `manual_dir`,
    `cache_dir`, `pixel_scale` and `eval_subset` apply as in training); Fashion-MNIST uses the
    same `data_dir` and `pixel_scale`, and the first `eval_subset` images if that is set.

    Args:
      config: the run's config.

    Returns:
      {"in_distribution": (images, labels), "out_of_distribution": (images, labels)}, images
      float32 [N, 28, 28, 1] and labels int32 [N].
    """
    from bbb import train
    from bbb.data import mnist  # Lazy: TensorFlow is imported only for data loading.

    test = train.load_data(config)["test"]
    fashion = mnist.load_fashion_mnist(
        data_dir=config.data.data_dir or None, pixel_scale=config.data.pixel_scale
    )["test"]
    limit = config.data.eval_subset or None
    return {
        "in_distribution": test,
        "out_of_distribution": tuple(a[:limit] for a in fashion),
    }


def _floats(values: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in values.items()}


def evaluate(
    experiment: Any,
    posterior: PyTree,
    data: Mapping[str, Data],
    key: Array,
    *,
    num_samples: int = 100,
    angles: Sequence[float] = ROTATION_ANGLES,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluates a posterior on MNIST, Fashion-MNIST (OOD) and rotated MNIST.

    Every prediction uses the same K weight samples (common random numbers): the in- and
    out-of-distribution scores, and every angle, compare the same K networks. The 0° rotation
    is the MNIST evaluation itself.

    Args:
      experiment: a classification `bbb.train.Experiment`.
      posterior: its posterior (`state.params["posterior"]`).
      data: {"in_distribution", "out_of_distribution"} → (images [N, ...], labels [N]).
      key: the PRNG key of the weight samples.
      num_samples: K_max, the MC samples (1 is used for a deterministic model).
      angles: the rotation angles in degrees.
      progress: show a tqdm bar.

    Returns:
      (summary, per_example): the JSON-ready results (see `evaluate_run`) and host arrays for
      the plots, {"entropy_in", "entropy_out", "mutual_information_in",
      "mutual_information_out"} [N] each.
    """
    from tqdm.auto import tqdm

    config = experiment.config
    check_positive("num_samples", num_samples, integer=True)
    deterministic = is_deterministic(config)
    num_samples = 1 if deterministic else num_samples
    counts = sample_counts(num_samples)
    # Two independent halves of the pool for the sample-count sets (one for a fixed network).
    halves = 1 if deterministic else 2
    evaluator = make_dataset_evaluator(
        experiment.model, num_samples, mc_dropout=uses_mc_dropout(config)
    )
    check_labels(data["in_distribution"][1], config.model.num_outputs)
    x_in, y_in = (jnp.asarray(a) for a in data["in_distribution"])
    x_out, y_out = (jnp.asarray(a) for a in data["out_of_distribution"])
    half_keys = jax.random.split(key, halves)
    no_rotation = jnp.float32(0.0)

    steps = 2 * halves + sum(1 for angle in angles if angle != 0) + 1
    bar = tqdm(total=steps, unit="step", disable=not progress, dynamic_ncols=True)
    results_in, results_out = [], []  # One per half of the pool.
    for half, half_key in enumerate(half_keys):
        bar.set_description(f"MNIST, {num_samples} samples ({half + 1}/{halves})")
        results_in.append(
            jax.block_until_ready(evaluator(posterior, x_in, y_in, no_rotation, half_key))
        )
        bar.update()
        bar.set_description(f"Fashion-MNIST, {num_samples} samples ({half + 1}/{halves})")
        results_out.append(
            jax.block_until_ready(evaluator(posterior, x_out, y_out, no_rotation, half_key))
        )
        bar.update()
    result_in, result_out = results_in[0], results_out[0]  # The first K samples.

    in_distribution = _floats(result_in["metrics"])
    in_distribution["num_examples"] = int(y_in.shape[0])
    per_example = {
        f"{name}_{where}": np.asarray(result[name])  # [N]
        for name in ("entropy", "mutual_information")
        for where, result in (("in", result_in), ("out", result_out))
    }
    ood = {}
    for name in ("entropy", "mutual_information"):
        scores_in, scores_out = result_in[name], result_out[name]  # [N_in], [N_out]
        ood[f"auroc_{name}"] = float(metrics.auroc(scores_in, scores_out))
        ood[f"aupr_{name}"] = float(metrics.aupr(scores_in, scores_out))
    ood["predictive_entropy"] = float(np.mean(per_example["entropy_out"]))
    ood["mutual_information"] = float(np.mean(per_example["mutual_information_out"]))
    ood["num_examples"] = int(x_out.shape[0])

    rotation: dict[str, list[float]] = {"angles": [float(a) for a in angles]}
    for angle in angles:
        if angle == 0:
            values = in_distribution  # Rotating by 0° is the identity; same samples.
        else:
            bar.set_description(f"rotated MNIST, {angle:g}°")
            result = evaluator(posterior, x_in, y_in, jnp.float32(angle), half_keys[0])
            values = _floats(result["metrics"])
            bar.update()
        for name in ROTATION_METRICS:
            rotation.setdefault(name, []).append(values[name])

    bar.set_description("metrics vs number of samples")
    pool_in = jnp.concatenate([r["samples"] for r in results_in])  # [halves × K, N_in, C]
    pool_out = jnp.concatenate([r["samples"] for r in results_out])  # [halves × K, N_out, C]
    sweep = metrics_by_sample_count(pool_in, pool_out, y_in, counts)
    sweep["pool_size"] = halves * num_samples
    sweep["standard_error"] = (
        "std: the standard deviation over num_sets disjoint sets of K independent weight "
        "samples, the Monte-Carlo standard error of one K-sample evaluation; "
        "sem = std / sqrt(num_sets), the standard error of mean."
    )
    bar.update()
    bar.close()

    reliability = result_in["reliability"]
    summary = {
        "method": method_name(config),
        "posterior": config.posterior.name,
        "mc_dropout": uses_mc_dropout(config),
        "deterministic": deterministic,
        "num_samples": num_samples,
        "in_distribution": {"dataset": "mnist/test", **in_distribution},
        "out_of_distribution": {"dataset": "fashion_mnist/test", **ood},
        "rotation": rotation,
        "sample_counts": sweep,
        "reliability_diagram": {k: np.asarray(v).tolist() for k, v in reliability.items()},
    }
    return summary, per_example


# --------------------------------------------------------------------------------------------
# Plots.
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_reliability(path: str, summary: Mapping[str, Any]) -> None:
    """Accuracy against confidence per bin (Guo et al. 2017, Fig. 1), and the bin counts."""
    plt = _pyplot()
    bins = {k: np.asarray(v) for k, v in summary["reliability_diagram"].items()}
    centres = (bins["bin_lower"] + bins["bin_upper"]) / 2  # [M]
    width = bins["bin_upper"] - bins["bin_lower"]  # [M]
    filled = bins["count"] > 0
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(
        centres[filled], bins["accuracy"][filled], width[filled], edgecolor="k", label="accuracy"
    )
    top.bar(
        centres[filled],
        (bins["confidence"] - bins["accuracy"])[filled],
        width[filled],
        bottom=bins["accuracy"][filled],
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    metrics_in = summary["in_distribution"]
    top.set_title(
        f"{summary['method']}, K={summary['num_samples']}\n"
        f"MNIST test: ECE {100 * metrics_in['ece']:.2f}%, error {100 * metrics_in['error']:.2f}%",
        fontsize=10,
    )
    bottom.bar(centres, bins["count"], width, edgecolor="k")
    bottom.set_yscale("log")
    bottom.set_xlabel("confidence max_c p(c | x)")
    bottom.set_ylabel("examples")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_uncertainty_histograms(
    path: str, summary: Mapping[str, Any], per_example: Mapping[str, np.ndarray]
) -> None:
    """Histograms of predictive entropy and mutual information, MNIST vs Fashion-MNIST."""
    plt = _pyplot()
    ood = summary["out_of_distribution"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, name, label, auroc_key in (
        (axes[0], "entropy", "predictive entropy H[p(y | x)] (nats)", "auroc_entropy"),
        (
            axes[1],
            "mutual_information",
            "mutual information I[y; w | x] (nats)",
            "auroc_mutual_information",
        ),
    ):
        values_in, values_out = per_example[f"{name}_in"], per_example[f"{name}_out"]
        top = max(float(np.max(values_in)), float(np.max(values_out)), 1e-6)
        edges = np.linspace(0.0, top, 51)
        axis.hist(values_in, edges, alpha=0.6, density=True, label="MNIST test (in)")
        axis.hist(values_out, edges, alpha=0.6, density=True, label="Fashion-MNIST test (OOD)")
        axis.set_yscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("density")
        axis.set_title(f"OOD AUROC {ood[auroc_key]:.3f}")
        axis.legend()
    fig.suptitle(f"{summary['method']}, K={summary['num_samples']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_rotation(path: str, summary: Mapping[str, Any]) -> None:
    """Error, NLL and ECE against the rotation angle of MNIST test."""
    plt = _pyplot()
    rotation = summary["rotation"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for axis, name, label, scale in (
        (axes[0], "error", "error (%)", 100),
        (axes[1], "nll", "NLL (nats)", 1),
        (axes[2], "ece", "ECE (%)", 100),
    ):
        axis.plot(rotation["angles"], scale * np.asarray(rotation[name]), "o-")
        axis.set_xlabel("rotation (degrees)")
        axis.set_ylabel(label)
        axis.set_xticks(rotation["angles"][::2])
        axis.grid(alpha=0.3)
    fig.suptitle(f"Rotated MNIST: {summary['method']}, K={summary['num_samples']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_sample_counts(path: str, summary: Mapping[str, Any]) -> None:
    """Metrics against the number of MC samples, with ± one MC standard error."""
    plt = _pyplot()
    sweep = summary["sample_counts"]
    panels = (
        ("error", "test error (%)", 100),
        ("nll", "test NLL (nats)", 1),
        ("ece", "test ECE (%)", 100),
        ("auroc_entropy", "OOD AUROC (entropy)", 1),
        ("auroc_mutual_information", "OOD AUROC (MI)", 1),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    for axis, (name, label, scale) in zip(axes, panels, strict=True):
        axis.errorbar(
            sweep["num_samples"],
            scale * np.asarray(sweep[name]["mean"]),
            yerr=scale * np.asarray(sweep[name]["std"]),
            fmt="o-",
            capsize=3,
        )
        if len(sweep["num_samples"]) > 1:
            axis.set_xscale("log")
            axis.minorticks_off()
        axis.set_xticks(sweep["num_samples"], [str(k) for k in sweep["num_samples"]])
        axis.set_xlabel("MC samples K")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    fig.suptitle(f"{summary['method']}: mean over disjoint K-sample sets ± one MC standard error")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(
    plots_dir: str, summary: Mapping[str, Any], per_example: Mapping[str, np.ndarray]
) -> list[str]:
    """Writes `PLOT_FILES` (PNG, matplotlib's Agg backend) into `plots_dir`.

    Args:
      plots_dir: the output folder (created if missing).
      summary: from `evaluate`.
      per_example: from `evaluate`.

    Returns:
      The paths written, in the order of `PLOT_FILES`.
    """
    os.makedirs(plots_dir, exist_ok=True)
    paths = [os.path.join(plots_dir, name) for name in PLOT_FILES]
    reliability, histograms, rotation, counts = paths
    _plot_reliability(reliability, summary)
    _plot_uncertainty_histograms(histograms, summary, per_example)
    _plot_rotation(rotation, summary)
    _plot_sample_counts(counts, summary)
    return paths


# --------------------------------------------------------------------------------------------
# Runs: evaluate one, compare several.
# --------------------------------------------------------------------------------------------


def _check_classification(experiment: Any, workdir: str) -> None:
    """Raises WorkdirError unless `experiment` is a classifier."""
    from bbb.workdir import WorkdirError

    if not experiment.free_energy.likelihood.is_classification:
        raise WorkdirError(
            f"{workdir} holds a regression run (likelihood.name="
            f"{experiment.config.likelihood.name!r}); the uncertainty evaluation needs a "
            "classification run (likelihood.name='categorical')."
        )


def evaluate_run(
    workdir: str,
    *,
    num_samples: int = 100,
    seed: int = 0,
    data: Mapping[str, Data] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates a run's latest checkpoint; writes `workdir/eval.json` and the plots.

    Reads the checkpoint only (`bbb.train.load_run`). The dropout baseline is evaluated as MC
    dropout with `num_samples` dropout masks; the SGD baseline with one sample.

    eval.json holds: `method`, `posterior`, `mc_dropout`, `deterministic`, `num_samples` (K),
    `seed`, `step` (the checkpoint), `workdir`, `wall_time_s`, `plots`;
    `in_distribution` (MNIST test: error, nll, brier, ece, adaptive_ece, predictive_entropy,
    expected_entropy, mutual_information (means over examples, nats), error_mean_weights,
    num_examples); `out_of_distribution` (Fashion-MNIST test: auroc_entropy, aupr_entropy,
    auroc_mutual_information, aupr_mutual_information, and the mean predictive_entropy and
    mutual_information); `rotation` (angles and, per angle, `ROTATION_METRICS`);
    `sample_counts` (see `metrics_by_sample_count`); `reliability_diagram` (per-bin lists, see
    `bbb.metrics.reliability_diagram_data`).

    Args:
      workdir: a classification run's workdir with a checkpoint.
      num_samples: K, the MC samples (K_max of the sample-count curve).
      seed: seeds the weight samples (`jax.random.key(seed)` with the run's PRNG).
      data: the evaluation data; None loads it with `load_evaluation_data`.
      progress: show a tqdm bar.

    Returns:
      The contents of eval.json.

    Raises:
      WorkdirError: `workdir` holds no run, no checkpoint, or a regression run.
      ConfigError: `num_samples` is not a positive integer.
    """
    from bbb import train

    started = time.perf_counter()
    check_positive("num_samples", num_samples, integer=True)
    experiment, state = train.load_run(workdir)
    _check_classification(experiment, workdir)
    config = experiment.config
    if data is None:
        data = load_evaluation_data(config)
    key = jax.random.key(seed, impl=config.prng_impl)
    summary, per_example = evaluate(
        experiment,
        state.params["posterior"],
        data,
        key,
        num_samples=num_samples,
        progress=progress,
    )
    plots = write_plots(os.path.join(workdir, "plots"), summary, per_example)
    summary.update(
        workdir=workdir,
        step=int(state.step),
        seed=seed,
        plots=[os.path.relpath(p, workdir) for p in plots],
        wall_time_s=time.perf_counter() - started,
    )
    with open(os.path.join(workdir, EVAL_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


TABLE_COLUMNS = (
    "method",
    "test error (%)",
    "NLL (nats)",
    "ECE (%)",
    "OOD AUROC (entropy)",
    "OOD AUROC (MI)",
)


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table comparing evaluated runs, one row per run, in the given order.

    Args:
      results: run name (e.g. its workdir) → its eval.json contents.

    Returns:
      The table with `TABLE_COLUMNS`: the method with K and the run name, MNIST test error
      and ECE in percent, NLL in nats, and the AUROC of detecting Fashion-MNIST by the
      predictive entropy and by the mutual information.
    """
    lines = [
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|",
    ]
    for name, result in results.items():
        in_distribution, ood = result["in_distribution"], result["out_of_distribution"]
        cells = (
            f"{result['method']}, K={result['num_samples']} (`{name}`)",
            f"{100 * in_distribution['error']:.2f}",
            f"{in_distribution['nll']:.4f}",
            f"{100 * in_distribution['ece']:.2f}",
            f"{ood['auroc_entropy']:.4f}",
            f"{ood['auroc_mutual_information']:.4f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_splits(workdir: str, *, num_samples: int = 100, seed: int = 0) -> dict[str, Any]:
    """Re-scores a run's latest checkpoint on its own validation and test splits with K samples.

    The quick question "what would this run's error be with more posterior samples?", without
    the out-of-distribution sets, rotations and plots of `evaluate_run`. It writes nothing.

    Args:
      workdir: a run's workdir with a checkpoint.
      num_samples: K, the posterior samples of the MC-averaged predictive.
      seed: seeds the weight samples (validation uses fold_in(key, 0), test fold_in(key, 1)).

    Returns:
      {"workdir", "step", "num_samples", "seed", "validation": {...}, "test": {...}}, each split
      with the metrics of `bbb.train.evaluate` (error, error_mean_weights and nll for a
      classifier) as floats. As in `evaluate_run`, a dropout run's samples are MC-dropout
      masks, and a point estimate without dropout is evaluated once ("num_samples": 1).

    Raises:
      WorkdirError: `workdir` holds no run or no checkpoint.
      ConfigError: `num_samples` is not a positive integer.
    """
    import dataclasses

    from bbb import train

    check_positive("num_samples", num_samples, integer=True)
    experiment, state = train.load_run(workdir)
    config = experiment.config.copy_and_resolve_references()
    # As `evaluate_run`: dropout runs as MC dropout, and a fixed network once.
    num_samples = 1 if is_deterministic(config) else num_samples
    config.eval.num_samples = num_samples
    experiment = dataclasses.replace(experiment, config=config)
    splits = train.load_data(config)
    key = jax.random.key(seed, impl=config.prng_impl)
    result: dict[str, Any] = dict(
        workdir=workdir, step=int(state.step), num_samples=num_samples, seed=seed
    )
    for index, split in enumerate(("validation", "test")):
        data = tuple(jnp.asarray(a) for a in splits[split])
        out = train.evaluate(
            experiment,
            state.params,
            data,
            jax.random.fold_in(key, index),
            mc_dropout=uses_mc_dropout(config),
        )
        result[split] = {k: float(v) for k, v in jax.device_get(out).items()}
    return result


def splits_line(result: Mapping[str, Any]) -> str:
    """One line of `evaluate_splits`'s figures."""
    parts = []
    for split in ("validation", "test"):
        figures = result[split]
        if "error" in figures:
            text = f"{split} error {100 * figures['error']:.2f}%"
        else:
            text = f"{split} RMSE {figures.get('rmse', math.nan):.4f}"
        parts.append(f"{text}, NLL {figures['nll']:.4f}")
    return (
        f"{result['workdir']} (step {result['step']}), K={result['num_samples']}: "
        + "; ".join(parts)
        + "."
    )


def _latest_checkpoint_step(workdir: str) -> int | None:
    """The latest checkpoint's step, as Orbax sees it (read-only), or None if there is none."""
    import orbax.checkpoint as ocp

    folder = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(folder):
        return None
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    with ocp.CheckpointManager(folder, options=options) as manager:
        return manager.latest_step()


def _stale_reason(stored: Mapping[str, Any], wanted: Mapping[str, Any], step: int | None) -> str:
    """Why an eval.json does not answer the evaluation asked for; "" if it does."""
    samples = 1 if stored.get("deterministic") else wanted["num_samples"]
    if stored.get("num_samples") != samples:
        return f"its eval.json used num_samples={stored.get('num_samples')}, not {samples}"
    if stored.get("seed") != wanted["seed"]:
        return f"its eval.json used seed={stored.get('seed')}, not {wanted['seed']}"
    if step is not None and stored.get("step") != step:
        return f"its eval.json is of step {stored.get('step')}; the latest checkpoint is {step}"
    return ""


def compare_runs(workdirs: Sequence[str], out: str | None = None, **evaluate_kwargs: Any) -> str:
    """Tabulates the runs, evaluating each one whose eval.json is missing or stale.

    A run's eval.json is reused only if it was made with the same K (`num_samples`; a
    deterministic run has K=1 whatever is asked) and seed, from the run's latest checkpoint.
    Otherwise the run is evaluated again, and a line says why: a table asked for with K=100
    never shows figures measured with K=20.

    Args:
      workdirs: the runs' workdirs, in the table's order.
      out: where to write the Markdown table; None writes nothing.
      **evaluate_kwargs: passed to `evaluate_run` (num_samples, seed, ...).

    Returns:
      The table (see `comparison_table`).

    Raises:
      WorkdirError: a run that needs evaluating cannot be evaluated (see `evaluate_run`).
    """
    wanted = {
        "num_samples": evaluate_kwargs.get("num_samples", 100),
        "seed": evaluate_kwargs.get("seed", 0),
    }
    results = {}
    for workdir in workdirs:
        path = os.path.join(workdir, EVAL_FILE)
        stale = "it has no eval.json"
        if os.path.exists(path):
            with open(path) as f:
                stored = json.load(f)
            stale = _stale_reason(stored, wanted, _latest_checkpoint_step(workdir))
        if stale:
            print(f"Evaluating {workdir}: {stale}.")
            results[workdir] = evaluate_run(workdir, **evaluate_kwargs)
        else:
            results[workdir] = stored
    table = comparison_table(results)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(table)
    return table


def summary_line(summary: Mapping[str, Any]) -> str:
    """One line of the headline figures of an evaluation, for the command line.

    Args:
      summary: an eval.json's contents.

    Returns:
      E.g. "Bayes by Backprop, K=100: MNIST error 1.52%, NLL 0.0501, ECE 0.31%; Fashion-MNIST
      AUROC 0.912 (entropy), 0.874 (MI). Files are in runs/mnist."
    """
    in_distribution, ood = summary["in_distribution"], summary["out_of_distribution"]
    return (
        f"{summary['method']}, K={summary['num_samples']}: MNIST error "
        f"{100 * in_distribution['error']:.2f}%, NLL {in_distribution['nll']:.4f}, ECE "
        f"{100 * in_distribution['ece']:.2f}%; Fashion-MNIST AUROC "
        f"{ood['auroc_entropy']:.3f} (entropy), {ood['auroc_mutual_information']:.3f} (MI). "
        f"Files are in {summary['workdir']}."
    )
