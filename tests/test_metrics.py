"""Tests for bbb.metrics, each against an independent computation made here (numpy, sklearn,
or numbers worked out by hand)."""

import itertools

import chex
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from bbb import metrics

# Most tests share these shapes, so that the compiled operations are reused (keeps tests fast).
K, N, C = 4, 300, 10
N_OUT = 100


def _random_probs_samples(seed: int, k=K, n=N, c=C, concentration: float = 0.5):
    """Per-sample probabilities [K, N, C] (float32) and labels [N] (int32).

    The labels are drawn from the first sample's probabilities: related to the predictions but
    not calibrated, so that accuracy minus confidence changes sign from bin to bin and the
    binning matters (with labels independent of the predictions every bin is overconfident and
    any binning gives the same ECE).
    """
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(c, concentration), size=(k, n)).astype(np.float32)
    cumulative = np.cumsum(probs[0].astype(np.float64), axis=-1)  # [N, C]
    labels = (rng.random((n, 1)) > cumulative).sum(axis=-1).clip(0, c - 1).astype(np.int32)
    return probs, labels


def _numpy_ece(predictive: np.ndarray, labels: np.ndarray, num_bins: int, squared=False):
    """Plain loop over equal-width bins (lo, hi]; the textbook form with per-bin means."""
    predictive = predictive.astype(np.float64)
    confidence = predictive.max(axis=-1)
    correct = (predictive.argmax(axis=-1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi)
        if not in_bin.any():
            continue
        gap = correct[in_bin].mean() - confidence[in_bin].mean()
        total += in_bin.mean() * (gap**2 if squared else abs(gap))
    return total


def _numpy_entropy(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    logp = np.log(np.where(p > 0, p, 1.0))
    return -np.sum(p * logp, axis=-1)


# --------------------------------------------------------------------------------------------
# Error, NLL, Brier.
# --------------------------------------------------------------------------------------------


def test_error_rate_matches_numpy():
    probs, labels = _random_probs_samples(0)
    predictive = probs.astype(np.float64).mean(axis=0)
    expected = np.mean(predictive.argmax(axis=-1) != labels)
    np.testing.assert_allclose(metrics.error_rate(probs, labels), expected, atol=1e-7)
    np.testing.assert_allclose(
        metrics.error_rate(predictive.astype(np.float32), labels), expected, atol=1e-7
    )


def test_error_rate_hand_example():
    predictive = np.array([[0.6, 0.4], [0.2, 0.8], [0.7, 0.3], [0.1, 0.9]], np.float32)
    labels = np.array([0, 0, 0, 1])  # the second example is wrong
    assert float(metrics.error_rate(predictive, labels)) == pytest.approx(0.25)


def test_nll_matches_numpy_and_log_prob_variant():
    probs, labels = _random_probs_samples(1)
    p64 = probs.astype(np.float64)
    expected = -np.mean(np.log(p64[:, np.arange(len(labels)), labels].mean(axis=0)))
    np.testing.assert_allclose(metrics.nll(probs, labels), expected, rtol=1e-5)
    np.testing.assert_allclose(
        metrics.nll(p64.mean(axis=0).astype(np.float32), labels), expected, rtol=1e-5
    )
    log_probs = np.log(probs)
    np.testing.assert_allclose(metrics.nll_from_log_probs(log_probs, labels), expected, rtol=1e-5)


def test_nll_from_log_probs_single_sample_is_plain_cross_entropy():
    _, labels = _random_probs_samples(2)
    logits = np.random.default_rng(2).normal(size=(N, C))
    log_probs = (logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))).astype(np.float32)
    expected = -np.mean(log_probs[np.arange(N), labels].astype(np.float64))
    np.testing.assert_allclose(metrics.nll_from_log_probs(log_probs, labels), expected, rtol=1e-5)


def test_nll_from_log_probs_is_exact_where_probabilities_underflow():
    # log p(y | x, w_k) = -200 and -201: exp underflows in float32, the log-space form does not.
    log_probs = np.full((2, 1, 2), -1e-3, dtype=np.float32)
    log_probs[:, 0, 1] = [-200.0, -201.0]
    labels = np.array([1])
    expected = -(np.logaddexp(-200.0, -201.0) - np.log(2.0))  # 200.6201...
    np.testing.assert_allclose(metrics.nll_from_log_probs(log_probs, labels), expected, rtol=1e-6)
    # The probability path can only clip; it stays finite.
    assert np.isfinite(float(metrics.nll(np.exp(log_probs), labels)))


def test_nll_clips_a_zero_probability_at_the_smallest_normal_float():
    """A label probability of 1e-30 (a normal float32) counts in full, -log 1e-30 = 69.08
    nats, and an exact 0 is clipped to float32's smallest normal number, -log(2^-126) = 87.34
    nats; a clip at machine epsilon (1.2e-7) would cap both at 15.9 nats."""
    predictive = np.array([[1e-30, 1.0], [0.0, 1.0]], np.float32)
    labels = np.array([0, 0])
    expected = np.mean([-np.log(np.float64(np.float32(1e-30))), 126 * np.log(2.0)])
    np.testing.assert_allclose(metrics.nll(predictive, labels), expected, rtol=1e-6)


def test_brier_matches_numpy_and_hand_example():
    probs, labels = _random_probs_samples(3)
    predictive = probs.astype(np.float64).mean(axis=0)
    one_hot = np.eye(C)[labels]
    expected = np.mean(np.sum((predictive - one_hot) ** 2, axis=-1))
    np.testing.assert_allclose(metrics.brier_score(probs, labels), expected, rtol=1e-5)
    # (0.7-1)² + 0.2² + 0.1² = 0.14 and 0.5² + (0.5-1)² + 0² = 0.5; mean 0.32.
    hand = np.array([[0.7, 0.2, 0.1], [0.5, 0.0, 0.5]], np.float32)
    assert float(metrics.brier_score(hand, np.array([0, 2]))) == pytest.approx(0.32, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Calibration.
# --------------------------------------------------------------------------------------------


def test_calibrated_predictions_have_near_zero_ece():
    rng = np.random.default_rng(4)
    n, c = 200_000, 10
    predictive = rng.dirichlet(np.full(c, 0.3), size=n)
    # Labels drawn from the predicted probabilities: calibrated by construction.
    cumulative = predictive.cumsum(axis=-1)
    labels = (rng.random((n, 1)) > cumulative).sum(axis=-1).clip(0, c - 1)
    predictive = predictive.astype(np.float32)
    assert float(metrics.expected_calibration_error(predictive, labels)) < 0.01
    assert float(metrics.adaptive_calibration_error(predictive, labels)) < 0.01
    # The same labels scored with sharpened (overconfident) probabilities are miscalibrated.
    sharpened = predictive**3 / np.sum(predictive**3, axis=-1, keepdims=True)
    assert float(metrics.expected_calibration_error(sharpened, labels)) > 0.05


def test_overconfident_ece_hand_example_and_not_squared():
    # Four predictions at confidence 0.9, two of them right; two at 0.7, both wrong.
    predictive = np.array([[0.9, 0.1]] * 4 + [[0.7, 0.3]] * 2, np.float32)
    labels = np.array([0, 0, 1, 1, 1, 1])
    # 15 bins: 0.9 is in (13/15, 14/15], 0.7 in (10/15, 11/15].
    # ECE = 4/6 * |0.5 - 0.9| + 2/6 * |0 - 0.7| = 0.26667 + 0.23333 = 0.5
    # Squared: 4/6 * 0.16 + 2/6 * 0.49 = 0.27 (and its square root 0.5196).
    ece = float(metrics.expected_calibration_error(predictive, labels))
    assert ece == pytest.approx(0.5, abs=1e-6)
    assert ece != pytest.approx(0.27, abs=1e-3)
    assert ece != pytest.approx(np.sqrt(0.27), abs=1e-3)
    # Equal-mass bins over 6 examples and 3 bins: {0.7, 0.7}, {0.9, 0.9}, {0.9, 0.9}, the 0.9
    # ties in input order: ranks 2-3 are labels [0, 0] (both right), ranks 4-5 [1, 1].
    # ACE = 2/6 * 0.7 + 2/6 * |1 - 0.9| + 2/6 * |0 - 0.9| = (0.7 + 0.1 + 0.9) / 3
    ace = float(metrics.adaptive_calibration_error(predictive, labels, num_bins=3))
    assert ace == pytest.approx(1.7 / 3, abs=1e-6)


@pytest.mark.parametrize("num_bins", [1, 7, 15])
def test_ece_matches_numpy_loop(num_bins):
    probs, labels = _random_probs_samples(5, concentration=0.2)
    predictive = probs.astype(np.float64).mean(axis=0)
    expected = _numpy_ece(predictive, labels, num_bins)
    squared = _numpy_ece(predictive, labels, num_bins, squared=True)
    ece = float(metrics.expected_calibration_error(probs, labels, num_bins=num_bins))
    np.testing.assert_allclose(ece, expected, atol=1e-5)
    assert abs(ece - squared) > 1e-3
    if num_bins > 1:  # the data is such that the bins matter
        assert abs(ece - _numpy_ece(predictive, labels, 1)) > 1e-3


def test_ece_bins_are_right_closed_and_confidence_one_is_in_last_bin():
    # 4 bins with exactly representable edges 0, .25, .5, .75, 1.
    predictive = np.array(
        [[0.5, 0.5], [0.4, 0.6], [0.25, 0.75], [1.0, 0.0], [0.0, 1.0]], np.float32
    )
    labels = np.array([0, 0, 1, 0, 0])  # right, wrong, right, right, wrong
    data = metrics.reliability_diagram_data(predictive, labels, num_bins=4)
    # 0.5 -> (0.25, 0.5]; 0.6 and 0.75 -> (0.5, 0.75]; both 1.0 -> (0.75, 1].
    np.testing.assert_array_equal(data["count"], [0, 1, 2, 2])
    np.testing.assert_allclose(data["confidence"], [0.0, 0.5, 0.675, 1.0], rtol=1e-6)
    np.testing.assert_allclose(data["accuracy"], [0.0, 1.0, 0.5, 0.5])
    np.testing.assert_allclose(data["bin_lower"], [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(data["bin_upper"], [0.25, 0.5, 0.75, 1.0])
    # ECE = 1/5 * |1 - .5| + 2/5 * |.5 - .675| + 2/5 * |.5 - 1| = 0.1 + 0.07 + 0.2.
    # Left-closed bins [b/M, (b+1)/M) would give (|.5 - .6| + |.25 + 0 - 1|) / 5 = 0.17.
    ece = metrics.expected_calibration_error(predictive, labels, num_bins=4)
    assert float(ece) == pytest.approx(0.37, abs=1e-6)


def test_confidence_rounded_above_one_is_counted_in_the_last_bin():
    """A top-label probability a rounding step above 1 belongs to the last bin (not dropped):
    the bin counts still add up to N and the ECE includes it."""
    above_one = np.nextafter(np.float32(1.0), np.float32(2.0))
    predictive = np.array([[above_one, 0.0], [0.6, 0.4]], np.float32)
    labels = np.array([1, 0])  # wrong at confidence ~1, right at 0.6
    data = metrics.reliability_diagram_data(predictive, labels, num_bins=4)
    np.testing.assert_array_equal(data["count"], [0, 0, 1, 1])
    # ECE = 1/2 |0 - 1.0000001| + 1/2 |1 - 0.6|.
    expected = 0.5 * float(above_one) + 0.5 * 0.4
    ece = metrics.expected_calibration_error(predictive, labels, num_bins=4)
    assert float(ece) == pytest.approx(expected, abs=1e-6)


def test_reliability_diagram_is_consistent_with_ece():
    probs, labels = _random_probs_samples(6)
    data = jax.tree.map(np.asarray, metrics.reliability_diagram_data(probs, labels))
    assert data["count"].sum() == N
    from_diagram = np.sum(data["count"] / N * np.abs(data["accuracy"] - data["confidence"]))
    np.testing.assert_allclose(
        from_diagram, metrics.expected_calibration_error(probs, labels), atol=1e-6
    )


@pytest.mark.parametrize(("n", "num_bins"), [(N, 15), (N, 11), (7, 15)])
def test_adaptive_calibration_error_matches_numpy(n, num_bins):
    probs, labels = _random_probs_samples(7, n=n)
    predictive = probs.astype(np.float64).mean(axis=0)
    confidence = predictive.max(axis=-1)
    correct = predictive.argmax(axis=-1) == labels
    expected = 0.0
    for chunk in np.array_split(np.argsort(confidence, kind="stable"), num_bins):
        if len(chunk):
            expected += len(chunk) / n * abs(correct[chunk].mean() - confidence[chunk].mean())
    ace = metrics.adaptive_calibration_error(probs, labels, num_bins=num_bins)
    np.testing.assert_allclose(ace, expected, atol=1e-5)


def test_adaptive_calibration_error_splits_tied_confidences_in_input_order():
    """Equal-mass bins rank tied confidences by input order (a stable sort), as numpy's stable
    argsort and array_split do. 300 examples at three confidences; within each tie the first
    half is right and the second half wrong, so any other order of the ties moves right and
    wrong examples between bins and changes the error."""
    rng = np.random.default_rng(20)
    top = np.array([0.6, 0.75, 0.9])[rng.integers(0, 3, N)]  # [N], about 100 ties each
    predictive = np.zeros((N, C), np.float32)
    predictive[:, 0] = top
    predictive[:, 1:] = ((1.0 - top) / (C - 1))[:, None]
    rank_in_tie = np.array([np.sum(top[:n] == top[n]) for n in range(N)])
    right = rank_in_tie < np.array([np.sum(top == t) for t in top]) / 2
    labels = np.where(right, 0, 1).astype(np.int32)
    confidence = predictive.max(axis=-1).astype(np.float64)
    expected = 0.0
    for chunk in np.array_split(np.argsort(confidence, kind="stable"), 15):
        expected += len(chunk) / N * abs(right[chunk].mean() - confidence[chunk].mean())
    ace = metrics.adaptive_calibration_error(predictive, labels, num_bins=15)
    np.testing.assert_allclose(ace, expected, atol=1e-5)


def test_adaptive_calibration_error_with_fewer_examples_than_bins():
    """N < M: one example per bin, the rest empty, so the error is the mean |gap| over the
    examples, not |mean gap|: right at 0.6 (+0.4) and wrong at 0.9 (−0.9) give 0.65, not 0.25."""
    predictive = np.array([[0.6, 0.4], [0.1, 0.9]], np.float32)
    labels = np.array([0, 0])
    ace = metrics.adaptive_calibration_error(predictive, labels, num_bins=3)
    assert float(ace) == pytest.approx(0.65, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Uncertainty decomposition.
# --------------------------------------------------------------------------------------------


def test_mutual_information_is_zero_when_samples_agree():
    probs, _ = _random_probs_samples(8, k=1)
    agreeing = np.repeat(probs, K, axis=0)  # [K, N, C], identical samples
    np.testing.assert_allclose(metrics.mutual_information(agreeing), 0.0, atol=1e-6)
    np.testing.assert_allclose(
        metrics.predictive_entropy(agreeing), metrics.expected_entropy(agreeing), atol=1e-6
    )


def test_mutual_information_is_positive_when_samples_disagree():
    # Two confident samples that disagree: predictive (0.5, 0.5), each sample entropy ~0.
    disagreeing = np.array([[[1.0, 0.0]], [[0.0, 1.0]]], np.float32)  # [2, 1, 2]
    np.testing.assert_allclose(metrics.mutual_information(disagreeing), [np.log(2.0)], rtol=1e-6)
    probs, _ = _random_probs_samples(9)
    assert np.all(np.asarray(metrics.mutual_information(probs)) > 1e-4)


def test_mutual_information_is_clamped_at_zero_not_folded():
    """With K = 3 identical samples, float32 rounding makes the predictive entropy a little
    below the expected entropy for some examples; the mutual information is max(difference, 0),
    about 0 there, never negative (and not |difference|)."""
    probs, _ = _random_probs_samples(16, k=1, n=2000)
    agreeing = np.repeat(probs, 3, axis=0)  # [3, N, C]
    difference = np.asarray(metrics.predictive_entropy(agreeing)) - np.asarray(
        metrics.expected_entropy(agreeing)
    )
    assert difference.min() < -2e-7  # The data exercises the clamp.
    mutual_information = np.asarray(metrics.mutual_information(agreeing))
    assert np.all(mutual_information >= 0.0)
    np.testing.assert_allclose(mutual_information, np.maximum(difference, 0.0), rtol=0, atol=1e-7)


def test_entropy_of_uniform_is_log_num_classes():
    uniform = np.full((K, N, C), 1.0 / C, np.float32)
    np.testing.assert_allclose(metrics.predictive_entropy(uniform), np.log(C), rtol=1e-6)
    np.testing.assert_allclose(metrics.expected_entropy(uniform), np.log(C), rtol=1e-6)
    # One-hot: zero entropy, with 0 log 0 = 0 (no NaN).
    one_hot = np.eye(C, dtype=np.float32)[np.arange(N) % C]  # [N, C]
    np.testing.assert_allclose(metrics.predictive_entropy(one_hot), 0.0, atol=0)


def test_entropy_decomposition_matches_numpy():
    probs, _ = _random_probs_samples(10, concentration=0.3)
    p64 = probs.astype(np.float64)
    total = _numpy_entropy(p64.mean(axis=0))
    aleatoric = _numpy_entropy(p64).mean(axis=0)
    np.testing.assert_allclose(metrics.predictive_entropy(probs), total, atol=1e-5)
    np.testing.assert_allclose(metrics.expected_entropy(probs), aleatoric, atol=1e-5)
    np.testing.assert_allclose(metrics.mutual_information(probs), total - aleatoric, atol=1e-5)
    np.testing.assert_allclose(
        metrics.predictive_entropy(probs),
        metrics.expected_entropy(probs) + metrics.mutual_information(probs),
        atol=1e-6,
    )


# --------------------------------------------------------------------------------------------
# OOD detection.
# --------------------------------------------------------------------------------------------


def _check_against_sklearn(scores_in, scores_out):
    scores_in = np.asarray(scores_in, dtype=np.float32)
    scores_out = np.asarray(scores_out, dtype=np.float32)
    y_true = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
    y_score = np.r_[scores_in, scores_out]
    np.testing.assert_allclose(
        metrics.auroc(scores_in, scores_out), roc_auc_score(y_true, y_score), atol=1e-6
    )
    np.testing.assert_allclose(
        metrics.aupr(scores_in, scores_out), average_precision_score(y_true, y_score), atol=1e-6
    )


@settings(max_examples=40, deadline=None)
@given(
    # Fixed sizes (each new shape compiles again) and few distinct values (many ties).
    scores_in=st.lists(st.integers(0, 4), min_size=9, max_size=9),
    scores_out=st.lists(st.integers(0, 4), min_size=4, max_size=4),
)
def test_auroc_aupr_match_sklearn_with_ties(scores_in, scores_out):
    _check_against_sklearn(scores_in, scores_out)


def test_auroc_aupr_match_sklearn_on_larger_random_scores():
    rng = np.random.default_rng(11)
    scores_in = rng.normal(size=N)
    scores_out = rng.normal(0.7, 1.0, size=N_OUT)
    _check_against_sklearn(scores_in, scores_out)
    # Rounded scores: many ties within and across the two sets.
    _check_against_sklearn(np.round(scores_in, 1), np.round(scores_out, 1))


def test_auroc_aupr_edge_cases():
    # Shapes [9] and [4] as in the hypothesis test above, so nothing compiles again.
    low, high = np.arange(9.0, dtype=np.float32), np.arange(10.0, 14.0, dtype=np.float32)
    # Perfect detector.
    assert float(metrics.auroc(low, high)) == 1.0
    assert float(metrics.aupr(low, high)) == 1.0
    # Reversed: OOD scores are all lowest. The k-th highest OOD score is flagged with all
    # 9 in-distribution inputs, precision k / (k + 9).
    assert float(metrics.auroc(20.0 + low, high - 10.0)) == 0.0
    expected_ap = np.mean([k / (k + 9) for k in range(1, 5)])
    assert float(metrics.aupr(20.0 + low, high - 10.0)) == pytest.approx(expected_ap)
    # All scores tied: AUROC 1/2 and AP the positive fraction, 4/13.
    ones_in, ones_out = np.ones(9, np.float32), np.ones(4, np.float32)
    assert float(metrics.auroc(ones_in, ones_out)) == 0.5
    assert float(metrics.aupr(ones_in, ones_out)) == pytest.approx(4 / 13)
    # One score each.
    zero, one = np.zeros(1, np.float32), np.ones(1, np.float32)
    assert float(metrics.auroc(zero, one)) == 1.0
    assert float(metrics.aupr(one, zero)) == 0.5
    # A NaN score on either side has no rank (sorted last, it would count as the most OOD, and
    # a NaN OOD score would make a perfect detector of a diverged model): NaN, not a number.
    for scores_in, scores_out in ((low, np.where(high == 13.0, np.nan, high)), (high, low)):
        scores_in = np.where(scores_in == 13.0, np.nan, scores_in)
        assert np.isnan(float(metrics.auroc(scores_in, scores_out)))
        assert np.isnan(float(metrics.aupr(scores_in, scores_out)))


# --------------------------------------------------------------------------------------------
# Summaries and jit.
# --------------------------------------------------------------------------------------------


def test_classification_metrics_agree_with_the_individual_functions():
    probs, labels = _random_probs_samples(12)
    result = metrics.classification_metrics(probs, labels)
    assert set(result) == {
        "error",
        "nll",
        "brier",
        "ece",
        "adaptive_ece",
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
    }
    for value in result.values():
        chex.assert_shape(value, ())
    p64 = probs.astype(np.float64)
    predictive = p64.mean(axis=0)
    np.testing.assert_allclose(result["error"], np.mean(predictive.argmax(-1) != labels))
    np.testing.assert_allclose(
        result["nll"], -np.mean(np.log(predictive[np.arange(N), labels])), rtol=1e-5
    )
    np.testing.assert_allclose(result["ece"], _numpy_ece(predictive, labels, 15), atol=1e-5)
    one_hot = np.eye(C)[labels]  # [N, C]
    np.testing.assert_allclose(
        result["brier"], np.mean(np.sum((predictive - one_hot) ** 2, -1)), rtol=1e-5
    )
    np.testing.assert_allclose(
        result["adaptive_ece"], metrics.adaptive_calibration_error(predictive, labels), rtol=1e-6
    )
    assert abs(float(result["adaptive_ece"]) - float(result["ece"])) > 1e-3  # Not the same.
    total = _numpy_entropy(predictive)
    aleatoric = _numpy_entropy(p64).mean(axis=0)
    np.testing.assert_allclose(result["predictive_entropy"], total.mean(), rtol=1e-5)
    np.testing.assert_allclose(result["expected_entropy"], aleatoric.mean(), rtol=1e-5)
    np.testing.assert_allclose(result["mutual_information"], (total - aleatoric).mean(), rtol=1e-4)


def test_ood_metrics_detect_disagreeing_samples():
    # In-distribution: samples agree (MI = 0). Out: samples disagree (MI > 0).
    probs_in, _ = _random_probs_samples(13, k=1)
    probs_in = np.repeat(probs_in, K, axis=0)  # [K, N, C]
    probs_out, _ = _random_probs_samples(14, n=N_OUT, concentration=0.1)
    result = metrics.ood_metrics(probs_in, probs_out)
    assert set(result) == {
        "auroc_entropy",
        "aupr_entropy",
        "auroc_mutual_information",
        "aupr_mutual_information",
    }
    assert float(result["auroc_mutual_information"]) == pytest.approx(1.0)
    assert float(result["aupr_mutual_information"]) == pytest.approx(1.0)
    entropy_in = _numpy_entropy(probs_in.mean(axis=0))
    entropy_out = _numpy_entropy(probs_out.astype(np.float64).mean(axis=0))
    y_true = np.r_[np.zeros(N), np.ones(N_OUT)]
    entropies = np.r_[entropy_in, entropy_out]
    np.testing.assert_allclose(result["auroc_entropy"], roc_auc_score(y_true, entropies), atol=1e-4)
    np.testing.assert_allclose(
        result["aupr_entropy"], average_precision_score(y_true, entropies), atol=1e-4
    )
    # Entropy does not separate the sets fully, so AUROC and AP differ and a swap would show.
    assert abs(float(result["aupr_entropy"]) - float(result["auroc_entropy"])) > 1e-3


def test_ood_metrics_mutual_information_scores_match_sklearn():
    """Both sets with disagreeing samples, so the mutual information of each side matters and
    does not separate them fully: the scores against sklearn on the numpy mutual information."""
    probs_in, _ = _random_probs_samples(17)
    probs_out, _ = _random_probs_samples(18, n=N_OUT, concentration=0.3)
    result = metrics.ood_metrics(probs_in, probs_out)

    def numpy_mutual_information(p):
        p = p.astype(np.float64)
        return _numpy_entropy(p.mean(axis=0)) - _numpy_entropy(p).mean(axis=0)

    y_true = np.r_[np.zeros(N), np.ones(N_OUT)]
    scores = np.r_[numpy_mutual_information(probs_in), numpy_mutual_information(probs_out)]
    auroc = roc_auc_score(y_true, scores)
    assert 0.55 < auroc < 0.95  # Informative but not perfect.
    np.testing.assert_allclose(result["auroc_mutual_information"], auroc, atol=1e-4)
    np.testing.assert_allclose(
        result["aupr_mutual_information"], average_precision_score(y_true, scores), atol=1e-4
    )


def test_functions_give_the_same_result_with_and_without_jit():
    # The public functions are jitted (and classification_metrics calls them nested in its own
    # jit); `__wrapped__` is the plain Python function, whose operations run one by one, each
    # compiled on its own, so only a few functions are checked here.
    probs, labels = _random_probs_samples(15)
    calls = [
        (metrics.expected_calibration_error, (probs, labels)),
        (metrics.nll_from_log_probs, (np.log(probs), labels)),
    ]
    for function, args in calls:
        chex.assert_trees_all_close(function(*args), function.__wrapped__(*args), atol=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\[K, N, C\]"):
        metrics.predictive_mean(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="labels"):
        metrics.nll(np.full((3, 4), 0.25, np.float32), np.zeros(5, np.int32))


def test_ood_detection_without_scores_on_one_side_is_refused():
    scores = np.asarray([0.1, 0.5], np.float32)
    empty = np.zeros((0,), np.float32)
    for scores_in, scores_out in ((empty, scores), (scores, empty)):
        for area in (metrics.auroc, metrics.aupr):
            with pytest.raises(ValueError, match="scores on both sides"):
                area(scores_in, scores_out)
