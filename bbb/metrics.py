"""Metrics for evaluating a Bayesian classifier's predictions and its uncertainty.

Every function is pure JAX (`jax.numpy`, no host round trips) and is jitted (`auroc` and
`aupr` through the jitted function that computes both), so that it compiles once per input
shape when called eagerly (say, from a notebook) and is inlined when called inside another
jitted function; `num_bins` is a static argument.

Notation. A Bayesian network evaluated with K Monte-Carlo weight samples w_k ~ q(w) gives
per-sample class probabilities p_k(y | x) = p(y | x, w_k), an array `probs_samples` of shape
[K, N, C]. The predictive distribution is their average,

    p(y | x) ≈ (1 / K) Σ_k p_k(y | x),                                       # [N, C]

(Blundell et al. 2015, "Weight Uncertainty in Neural Networks", Sec. 3.3 / eq. 1).
Functions that score the predictive distribution (`error_rate`, `nll`, `brier_score`, the
calibration errors) accept either the samples [K, N, C] (averaged over K first) or the
predictive probabilities [N, C] themselves. Labels are integer class indices [N].

What is measured, and where it comes from:

- Error rate, negative log-likelihood (NLL) and the Brier score
  (Brier 1950, "Verification of forecasts expressed in terms of probability"):
  BS = (1 / N) Σ_n Σ_c (p(c | x_n) - 1[c = y_n])².
- Expected calibration error with equal-width confidence bins
  (Naeini et al. 2015, "Obtaining Well Calibrated Probabilities Using Bayesian Binning";
  Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3):
  ECE = Σ_b (|B_b| / N) |acc(B_b) - conf(B_b)|, and its equal-mass (adaptive) variant
  (Nixon et al. 2019, "Measuring Calibration in Deep Learning").
- Uncertainty decomposition (Houlsby et al. 2011, "Bayesian Active Learning for
  Classification and Preference Learning" (BALD); Depeweg et al. 2018, "Decomposition of
  Uncertainty in Bayesian Deep Learning"):
  H[p(y | x)]  (total, predictive entropy)
    = E_q[H[p(y | x, w)]]  (aleatoric, expected entropy)
    + I[y; w | x]  (epistemic, mutual information).
- Out-of-distribution detection as binary classification with out-of-distribution as the
  positive class and a higher score meaning "more OOD": the area under the ROC curve (the
  Mann-Whitney U statistic, ties counted as one half; Hanley & McNeil 1982) and the area under
  the precision-recall curve as average precision (step-wise, no interpolation; the definition
  of scikit-learn's `average_precision_score`).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp, xlogy

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Predictive distribution and accuracy-type scores.
# --------------------------------------------------------------------------------------------


@jax.jit
def predictive_mean(probs_samples: Array) -> Array:
    """Monte-Carlo estimate of the predictive distribution, the average over weight samples.

    p(y | x) ≈ (1 / K) Σ_k p(y | x, w_k) (Blundell et al. 2015, Sec. 3.3).

    Args:
      probs_samples: per-sample class probabilities, shape [K, N, C].

    Returns:
      The predictive class probabilities, shape [N, C].
    """
    if probs_samples.ndim != 3:
        raise ValueError(f"probs_samples must have shape [K, N, C], got {probs_samples.shape}.")
    return jnp.mean(probs_samples, axis=0)  # [N, C]


def _as_predictive(probs: Array) -> Array:
    """Returns predictive probabilities [N, C] from samples [K, N, C] or from [N, C] itself."""
    if probs.ndim == 3:
        return predictive_mean(probs)
    if probs.ndim == 2:
        return probs
    raise ValueError(f"probs must have shape [K, N, C] or [N, C], got {probs.shape}.")


def _check_labels(probs: Array, labels: Array) -> None:
    if labels.shape != probs.shape[-2:-1]:
        raise ValueError(f"labels must have shape [N] = {probs.shape[-2:-1]}, got {labels.shape}.")


@jax.jit
def error_rate(probs: Array, labels: Array) -> Array:
    """Fraction of examples whose most probable class (under the predictive) is not the label.

    Ties in the argmax go to the lowest class index (`jnp.argmax`).

    Args:
      probs: class probabilities, samples [K, N, C] (averaged over K) or predictive [N, C].
      labels: integer class labels, shape [N].

    Returns:
      The error rate in [0, 1], a scalar.
    """
    _check_labels(probs, labels)
    predictive = _as_predictive(probs)  # [N, C]
    return jnp.mean(jnp.argmax(predictive, axis=-1) != labels)


@jax.jit
def nll(probs: Array, labels: Array) -> Array:
    """Mean negative log-likelihood of the labels under the predictive distribution.

    NLL = -(1 / N) Σ_n log p(y_n | x_n), with p the Monte-Carlo average over samples. A
    probability of exactly 0 is clipped to the smallest normal float of its dtype, so the
    NLL stays finite (at most about 87 nats per example in float32). When log-probabilities
    are available, `nll_from_log_probs` is the accurate choice.

    Args:
      probs: class probabilities, samples [K, N, C] (averaged over K) or predictive [N, C].
      labels: integer class labels, shape [N].

    Returns:
      The mean NLL in nats, a scalar.
    """
    _check_labels(probs, labels)
    predictive = _as_predictive(probs)  # [N, C]
    label_probs = jnp.take_along_axis(predictive, labels[:, None], axis=-1)[:, 0]  # [N]
    tiny = jnp.finfo(predictive.dtype).tiny
    return -jnp.mean(jnp.log(jnp.maximum(label_probs, tiny)))


@jax.jit
def nll_from_log_probs(log_probs: Array, labels: Array) -> Array:
    """Mean negative log-likelihood of the labels under the predictive, from log-probabilities.

    log p(y | x) = log (1 / K) Σ_k p(y | x, w_k) = logsumexp_k log p(y | x, w_k) - log K,
    computed in log space so that it is exact where the probabilities underflow. This is the
    form to use in training and evaluation when the model gives logits
    (`log_probs = jax.nn.log_softmax(logits)`).

    Args:
      log_probs: per-sample log class probabilities [K, N, C], or [N, C] for a single sample.
      labels: integer class labels, shape [N].

    Returns:
      The mean NLL in nats, a scalar.
    """
    _check_labels(log_probs, labels)
    if log_probs.ndim == 2:
        log_probs = log_probs[None]  # [1, N, C]
    if log_probs.ndim != 3:
        raise ValueError(f"log_probs must have shape [K, N, C] or [N, C], got {log_probs.shape}.")
    num_samples = log_probs.shape[0]
    index = jnp.broadcast_to(labels[None, :, None], (*log_probs.shape[:2], 1))  # [K, N, 1]
    label_log_probs = jnp.take_along_axis(log_probs, index, axis=-1)[..., 0]  # [K, N]
    log_predictive = logsumexp(label_log_probs, axis=0) - math.log(num_samples)  # [N]
    return -jnp.mean(log_predictive)


@jax.jit
def brier_score(probs: Array, labels: Array) -> Array:
    """Brier score of the predictive distribution (Brier 1950).

    BS = (1 / N) Σ_n Σ_c (p(c | x_n) - 1[c = y_n])², in [0, 2]; summed, not averaged, over
    classes.

    Args:
      probs: class probabilities, samples [K, N, C] (averaged over K) or predictive [N, C].
      labels: integer class labels, shape [N].

    Returns:
      The Brier score, a scalar.
    """
    _check_labels(probs, labels)
    predictive = _as_predictive(probs)  # [N, C]
    one_hot = jax.nn.one_hot(labels, predictive.shape[-1], dtype=predictive.dtype)  # [N, C]
    return jnp.mean(jnp.sum(jnp.square(predictive - one_hot), axis=-1))


# --------------------------------------------------------------------------------------------
# Calibration.
# --------------------------------------------------------------------------------------------


def _confidence_and_correct(probs: Array, labels: Array) -> tuple[Array, Array]:
    """Top-label confidence max_c p(c | x) [N] and whether the argmax is correct [N] (float)."""
    _check_labels(probs, labels)
    predictive = _as_predictive(probs)  # [N, C]
    confidence = jnp.max(predictive, axis=-1)  # [N]
    correct = (jnp.argmax(predictive, axis=-1) == labels).astype(confidence.dtype)  # [N]
    return confidence, correct


def _equal_width_bins(confidence: Array, num_bins: int) -> Array:
    """Bin index of each confidence for the bins (0, 1/M], (1/M, 2/M], ..., ((M-1)/M, 1].

    A confidence of exactly 1 goes to the last bin; values at or below 0 go to the first and
    values above 1 (from rounding) to the last.
    """
    edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=confidence.dtype)  # [M + 1]
    # c is in bin b of (edges[b], edges[b + 1]] when exactly b of the inner edges are below it.
    inner_edges = edges[1:-1]  # [M - 1]
    return jnp.sum(confidence[:, None] > inner_edges[None, :], axis=-1)  # [N]


def _equal_mass_bins(confidence: Array, num_bins: int) -> Array:
    """Bin index of each confidence for bins holding (as nearly as possible) equal counts.

    Examples are ranked by confidence (a stable sort, so ties keep their input order) and the
    ranks split as `numpy.array_split` does: the first N mod M bins hold ⌊N/M⌋ + 1 examples,
    the rest ⌊N/M⌋. With N < M, the last M - N bins are empty.
    """
    num_examples = confidence.shape[0]
    size, remainder = divmod(num_examples, num_bins)
    ranks = jnp.arange(num_examples)  # [N]
    if size == 0:
        bin_of_rank = ranks
    else:
        large = remainder * (size + 1)  # ranks held by the larger bins
        bin_of_rank = jnp.where(
            ranks < large, ranks // (size + 1), remainder + (ranks - large) // size
        )  # [N]
    order = jnp.argsort(confidence, stable=True)  # [N]
    return jnp.zeros(num_examples, dtype=bin_of_rank.dtype).at[order].set(bin_of_rank)


def _binned_calibration_error(confidence: Array, correct: Array, bins: Array, num_bins: int):
    """Σ_b (|B_b| / N) |acc(B_b) - conf(B_b)| = (1 / N) Σ_b |Σ_{n ∈ B_b} (correct_n - conf_n)|.

    The second form needs no division by the bin count, so empty bins contribute 0.
    """
    gap_sums = jax.ops.segment_sum(correct - confidence, bins, num_segments=num_bins)  # [M]
    return jnp.sum(jnp.abs(gap_sums)) / confidence.shape[0]


@functools.partial(jax.jit, static_argnames="num_bins")
def expected_calibration_error(probs: Array, labels: Array, num_bins: int = 15) -> Array:
    """Expected calibration error (ECE) with equal-width confidence bins.

    ECE = Σ_b (|B_b| / N) |acc(B_b) - conf(B_b)| over the bins B_b = ((b-1)/M, b/M] of the
    top-label confidence max_c p(c | x), a confidence of exactly 1 in the last bin; acc and conf
    are the bin's accuracy and mean confidence (Naeini et al. 2015; Guo et al. 2017, eq. 3).
    This is the absolute-gap (L1) ECE, not the squared-gap variant.

    Args:
      probs: class probabilities, samples [K, N, C] (averaged over K) or predictive [N, C].
      labels: integer class labels, shape [N].
      num_bins: the number of bins M (static under `jax.jit`).

    Returns:
      The ECE in [0, 1], a scalar.
    """
    confidence, correct = _confidence_and_correct(probs, labels)  # [N], [N]
    bins = _equal_width_bins(confidence, num_bins)  # [N]
    return _binned_calibration_error(confidence, correct, bins, num_bins)


@functools.partial(jax.jit, static_argnames="num_bins")
def adaptive_calibration_error(probs: Array, labels: Array, num_bins: int = 15) -> Array:
    """Top-label calibration error with equal-mass (adaptive) confidence bins.

    As `expected_calibration_error`, but the bins are chosen so that each holds the same number
    of examples (N / M, up to rounding; see `_equal_mass_bins`), which spends resolution where
    the confidences are and is less biased than equal-width bins when confidences cluster near
    1 (Nixon et al. 2019, "Measuring Calibration in Deep Learning", Sec. 4). This is the
    top-label form; Nixon et al.'s ACE additionally averages such errors over all classes.

    Args:
      probs: class probabilities, samples [K, N, C] (averaged over K) or predictive [N, C].
      labels: integer class labels, shape [N].
      num_bins: the number of bins M (static under `jax.jit`).

    Returns:
      The adaptive calibration error in [0, 1], a scalar.
    """
    confidence, correct = _confidence_and_correct(probs, labels)  # [N], [N]
    bins = _equal_mass_bins(confidence, num_bins)  # [N]
    return _binned_calibration_error(confidence, correct, bins, num_bins)


@functools.partial(jax.jit, static_argnames="num_bins")
def reliability_diagram_data(probs: Array, labels: Array, num_bins: int = 15) -> dict[str, Array]:
    """Per-bin statistics of a reliability diagram (DeGroot & Fienberg 1983; Guo et al. 2017).

    Uses the equal-width bins of `expected_calibration_error`, so that
    ECE = Σ_b (count_b / N) |accuracy_b - confidence_b|.

    Args:
      probs: class probabilities, samples [K, N, C] (averaged over K) or predictive [N, C].
      labels: integer class labels, shape [N].
      num_bins: the number of bins M (static under `jax.jit`).

    Returns:
      A dict of arrays of shape [M]: `bin_lower` and `bin_upper` (the bin edges), `confidence`
      (mean top-label confidence in the bin), `accuracy` (fraction correct in the bin) and
      `count` (number of examples in the bin, int32). `confidence` and `accuracy` are 0 for an
      empty bin.
    """
    confidence, correct = _confidence_and_correct(probs, labels)  # [N], [N]
    bins = _equal_width_bins(confidence, num_bins)  # [N]
    count = jax.ops.segment_sum(jnp.ones_like(bins), bins, num_segments=num_bins)  # [M]
    confidence_sum = jax.ops.segment_sum(confidence, bins, num_segments=num_bins)  # [M]
    correct_sum = jax.ops.segment_sum(correct, bins, num_segments=num_bins)  # [M]
    denominator = jnp.maximum(count, 1).astype(confidence.dtype)  # [M]
    edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=confidence.dtype)  # [M + 1]
    return {
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "confidence": confidence_sum / denominator,
        "accuracy": correct_sum / denominator,
        "count": count.astype(jnp.int32),
    }


# --------------------------------------------------------------------------------------------
# Uncertainty decomposition.
# --------------------------------------------------------------------------------------------


def _entropy(probs: Array) -> Array:
    """Shannon entropy in nats over the last axis, with 0 log 0 = 0."""
    return -jnp.sum(xlogy(probs, probs), axis=-1)


@jax.jit
def predictive_entropy(probs_samples: Array) -> Array:
    """Entropy of the predictive distribution, the total uncertainty H[(1/K) Σ_k p_k].

    Args:
      probs_samples: per-sample class probabilities [K, N, C], or predictive [N, C].

    Returns:
      The predictive entropy in nats of each example, shape [N], in [0, log C].
    """
    return _entropy(_as_predictive(probs_samples))  # [N]


@jax.jit
def expected_entropy(probs_samples: Array) -> Array:
    """Average entropy of the per-sample predictions, (1/K) Σ_k H[p_k].

    The Monte-Carlo estimate of E_q(w)[H[p(y | x, w)]], the aleatoric part of the predictive
    entropy (Depeweg et al. 2018).

    Args:
      probs_samples: per-sample class probabilities, shape [K, N, C].

    Returns:
      The expected entropy in nats of each example, shape [N].
    """
    if probs_samples.ndim != 3:
        raise ValueError(f"probs_samples must have shape [K, N, C], got {probs_samples.shape}.")
    return jnp.mean(_entropy(probs_samples), axis=0)  # [K, N] -> [N]


@jax.jit
def mutual_information(probs_samples: Array) -> Array:
    """Mutual information between the label and the weights, the epistemic uncertainty.

    I[y; w | x] = H[E_q p(y | x, w)] - E_q H[p(y | x, w)], estimated with the K samples as
    `predictive_entropy - expected_entropy` (BALD, Houlsby et al. 2011; Gal et al. 2017;
    Depeweg et al. 2018). It is 0 when all samples agree and positive otherwise. The estimate
    is non-negative by concavity of the entropy; negative values can only come from float
    rounding and are clamped to 0.

    Args:
      probs_samples: per-sample class probabilities, shape [K, N, C].

    Returns:
      The mutual information in nats of each example, shape [N], in [0, log C].
    """
    total = predictive_entropy(probs_samples)  # [N]
    aleatoric = expected_entropy(probs_samples)  # [N]
    return jnp.maximum(total - aleatoric, 0.0)


# --------------------------------------------------------------------------------------------
# Out-of-distribution detection.
# --------------------------------------------------------------------------------------------


@jax.jit
def _auroc_and_average_precision(scores_in: Array, scores_out: Array) -> tuple[Array, Array]:
    """AUROC and average precision of OOD detection from one sort (see `auroc` and `aupr`).

    After sorting all N = N_in + N_out scores, each OOD score s needs the counts of in- and
    out-of-distribution scores below s and at or below s. Tied scores form a run in the sorted
    order, so these are cumulative counts read at the start and at the end of s's run.
    """
    num_in, num_out = scores_in.shape[0], scores_out.shape[0]
    if num_in == 0 or num_out == 0:  # Shapes are static: refused while tracing.
        raise ValueError(
            f"OOD detection needs scores on both sides; got {num_in} in-distribution and "
            f"{num_out} out-of-distribution scores."
        )
    num_scores = num_in + num_out
    scores = jnp.concatenate([scores_in, scores_out])  # [N]
    is_out = jnp.concatenate([jnp.zeros(num_in, jnp.int32), jnp.ones(num_out, jnp.int32)])  # [N]
    order = jnp.argsort(scores)  # [N]
    sorted_scores, is_out = scores[order], is_out[order]  # [N], [N]
    is_in = 1 - is_out  # [N]
    starts_new_run = jnp.concatenate(
        [jnp.zeros(1, jnp.int32), (sorted_scores[1:] != sorted_scores[:-1]).astype(jnp.int32)]
    )  # [N]
    # One cumulative sum for the three running counts (each is costly to compile on CPU).
    run_index, in_through, out_through = jnp.cumsum(
        jnp.stack([starts_new_run, is_in, is_out]), axis=1
    )  # [N] each; in_through[i] = #{in among sorted positions ≤ i}
    positions = jnp.arange(num_scores)  # [N]
    run_start = jax.ops.segment_min(positions, run_index, num_segments=num_scores)[run_index]
    run_end = jax.ops.segment_max(positions, run_index, num_segments=num_scores)[run_index]
    in_below = in_through[run_start] - is_in[run_start]  # [N], #{in < s}
    in_at_or_below = in_through[run_end]  # [N], #{in ≤ s}
    out_below = out_through[run_start] - is_out[run_start]  # [N], #{out < s}

    float_dtype = jnp.result_type(float)
    is_out = is_out.astype(float_dtype)  # [N]
    # AUROC: each OOD score beats the in-distribution scores below it and ties those equal to it.
    wins = 0.5 * (in_below + in_at_or_below).astype(float_dtype) / num_in  # [N]
    area_roc = jnp.sum(is_out * wins) / num_out
    # AP: the rule "score ≥ s" flags num_out - out_below OOD and num_in - in_below in-dist. inputs.
    true_positives = (num_out - out_below).astype(float_dtype)  # [N]
    false_positives = (num_in - in_below).astype(float_dtype)  # [N]
    precision = true_positives / jnp.maximum(true_positives + false_positives, 1.0)  # [N]
    average_precision = jnp.sum(is_out * precision) / num_out
    # A NaN score (a diverged model) has no rank: the sort would put it last, as the most OOD.
    has_nan = jnp.any(jnp.isnan(sorted_scores))
    return jnp.where(has_nan, jnp.nan, area_roc), jnp.where(has_nan, jnp.nan, average_precision)


def auroc(scores_in: Array, scores_out: Array) -> Array:
    """Area under the ROC curve for detecting out-of-distribution inputs.

    Out-of-distribution is the positive class and a higher score means "more OOD". The AUROC
    is the Mann-Whitney statistic P(s_out > s_in) + P(s_out = s_in) / 2 (Hanley & McNeil 1982),
    which equals the trapezoidal area of the ROC curve and so `sklearn.metrics.roc_auc_score`,
    ties included. Pure JAX with one sort, O(N log N) for N = N_in + N_out.

    Args:
      scores_in: scores of in-distribution inputs (negatives), shape [N_in], N_in ≥ 1.
      scores_out: scores of out-of-distribution inputs (positives), shape [N_out], N_out ≥ 1.

    Returns:
      The AUROC in [0, 1], a scalar; 0.5 for a detector no better than chance. NaN if any
      score is NaN.
    """
    return _auroc_and_average_precision(scores_in, scores_out)[0]


def aupr(scores_in: Array, scores_out: Array) -> Array:
    """Area under the precision-recall curve, as average precision, for detecting OOD inputs.

    Out-of-distribution is the positive class and a higher score means "more OOD".
    AP = Σ_t (R_t - R_{t-1}) P_t over the distinct score values t in decreasing order, with
    precision P_t and recall R_t of the rule "score ≥ t" (step-wise, no interpolation; the
    definition of `sklearn.metrics.average_precision_score`). Each OOD score s raises the
    recall by 1 / N_out at t = s, so AP = (1 / N_out) Σ_{s ∈ scores_out} P_s. Pure JAX with one
    sort, O(N log N) for N = N_in + N_out.

    Args:
      scores_in: scores of in-distribution inputs (negatives), shape [N_in].
      scores_out: scores of out-of-distribution inputs (positives), shape [N_out], N_out ≥ 1.

    Returns:
      The average precision in [0, 1], a scalar; about N_out / (N_in + N_out) for a detector
      no better than chance. NaN if any score is NaN.
    """
    return _auroc_and_average_precision(scores_in, scores_out)[1]


# --------------------------------------------------------------------------------------------
# Summaries.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="num_bins")
def classification_metrics(
    probs_samples: Array, labels: Array, num_bins: int = 15
) -> dict[str, Array]:
    """All scalar metrics of a classifier's Monte-Carlo predictions on a labelled set.

    Args:
      probs_samples: per-sample class probabilities, shape [K, N, C].
      labels: integer class labels, shape [N].
      num_bins: the number of calibration bins (static under `jax.jit`).

    Returns:
      A flat dict of scalar (0-d) arrays: `error`, `nll` (nats), `brier`, `ece` (equal-width
      bins), `adaptive_ece` (equal-mass bins), and the means over examples of
      `predictive_entropy`, `expected_entropy` and `mutual_information` (nats). Use
      `float(value)` to log them.
    """
    predictive = predictive_mean(probs_samples)  # [N, C]
    return {
        "error": error_rate(predictive, labels),
        "nll": nll(predictive, labels),
        "brier": brier_score(predictive, labels),
        "ece": expected_calibration_error(predictive, labels, num_bins),
        "adaptive_ece": adaptive_calibration_error(predictive, labels, num_bins),
        "predictive_entropy": jnp.mean(predictive_entropy(predictive)),
        "expected_entropy": jnp.mean(expected_entropy(probs_samples)),
        "mutual_information": jnp.mean(mutual_information(probs_samples)),
    }


@jax.jit
def ood_metrics(probs_samples_in: Array, probs_samples_out: Array) -> dict[str, Array]:
    """Out-of-distribution detection scores, with two uncertainty measures as the score.

    The score is either the predictive entropy (total uncertainty) or the mutual information
    (epistemic uncertainty; Houlsby et al. 2011, Depeweg et al. 2018); OOD is the positive
    class.

    Args:
      probs_samples_in: per-sample class probabilities on in-distribution inputs,
        shape [K, N_in, C].
      probs_samples_out: per-sample class probabilities on out-of-distribution inputs,
        shape [K, N_out, C].

    Returns:
      A flat dict of scalar (0-d) arrays: `auroc_entropy`, `aupr_entropy`,
      `auroc_mutual_information` and `aupr_mutual_information`.
    """
    uncertainties = {"entropy": predictive_entropy, "mutual_information": mutual_information}
    result = {}
    for name, uncertainty in uncertainties.items():
        scores_in = uncertainty(probs_samples_in)  # [N_in]
        scores_out = uncertainty(probs_samples_out)  # [N_out]
        area_roc, average_precision = _auroc_and_average_precision(scores_in, scores_out)
        result[f"auroc_{name}"] = area_roc
        result[f"aupr_{name}"] = average_precision
    return result
