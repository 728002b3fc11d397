"""Tests of the uncertainty evaluation (bbb/evaluation.py and scripts/evaluate.py).

The runs are trained on small random arrays (no TensorFlow import, no MNIST files): the tests
check the evaluation's plumbing and maths, not what a model learns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbb import cli, evaluation, train
from bbb import posterior as posterior_lib
from bbb.models import make_model
from configs import test as test_config
from tests.conftest import REPO

NUM_TRAIN, NUM_TEST = 256, 64

pytestmark = pytest.mark.usefixtures("fast_compile")


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.random((n, 28, 28, 1), dtype=np.float32)  # [N, 28, 28, 1]


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 10, n).astype(np.int32)  # [N]


def _fake_splits(config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stands in for `train.load_data`: random images of the sizes that `config` asks for."""
    rng = np.random.default_rng(0)
    sizes = {"train": config.data.train_subset, "validation": NUM_TEST, "test": NUM_TEST}
    return {name: (_images(rng, n), _labels(rng, n)) for name, n in sizes.items()}


def _fake_evaluation_data(config=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stands in for `evaluation.load_evaluation_data`."""
    rng = np.random.default_rng(1)
    return {
        "in_distribution": (_images(rng, NUM_TEST), _labels(rng, NUM_TEST)),
        "out_of_distribution": (_images(rng, NUM_TEST), _labels(rng, NUM_TEST)),
    }


def _tiny_config(kind: str = "bbb"):
    """configs/test.py for one epoch on NUM_TRAIN images, as BBB, SGD or dropout."""
    config = test_config.get_config()
    config.num_epochs = 1
    config.data.train_subset = NUM_TRAIN
    config.data.eval_subset = NUM_TEST
    config.eval.num_samples = 2
    if kind in ("sgd", "dropout"):
        config.posterior.name = "point"
        config.prior.name = "flat"
    if kind == "dropout":
        config.model.dropout_rate = 0.5
    return config


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A BBB run of one epoch, evaluated with K = 4 samples: (workdir, returned summary)."""
    workdir = str(tmp_path_factory.mktemp("eval") / "bbb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "load_data", _fake_splits)
        train.train_and_evaluate(_tiny_config(), workdir)
    summary = evaluation.evaluate_run(
        workdir, num_samples=4, data=_fake_evaluation_data(), progress=False
    )
    return workdir, summary


# End to end ---------------------------------------------------------------------------------


def test_eval_json_has_every_key(evaluated_run):
    workdir, summary = evaluated_run
    with open(os.path.join(workdir, evaluation.EVAL_FILE)) as f:
        on_disk = json.load(f)
    assert on_disk == summary
    for key in (
        "method workdir step seed num_samples posterior mc_dropout deterministic wall_time_s "
        "plots in_distribution out_of_distribution rotation sample_counts reliability_diagram"
    ).split():
        assert key in on_disk, key
    assert on_disk["method"] == "Bayes by Backprop"
    assert on_disk["num_samples"] == 4 and on_disk["step"] == NUM_TRAIN // 64
    in_distribution = on_disk["in_distribution"]
    for key in (
        "error nll brier ece adaptive_ece predictive_entropy expected_entropy "
        "mutual_information error_mean_weights"
    ).split():
        assert math.isfinite(in_distribution[key]), key
    assert in_distribution["num_examples"] == NUM_TEST
    ood = on_disk["out_of_distribution"]
    for key in (
        "auroc_entropy aupr_entropy auroc_mutual_information aupr_mutual_information "
        "predictive_entropy mutual_information"
    ).split():
        assert math.isfinite(ood[key]), key
    assert 0 <= ood["auroc_entropy"] <= 1 and 0 <= ood["auroc_mutual_information"] <= 1
    rotation = on_disk["rotation"]
    assert rotation["angles"] == [float(a) for a in range(0, 181, 15)]
    for name in ("error", "nll", "ece"):
        assert len(rotation[name]) == 13 and all(map(math.isfinite, rotation[name])), name
        # 0° is the unrotated test set with the same samples.
        assert rotation[name][0] == in_distribution[name]
    bins = on_disk["reliability_diagram"]
    assert sum(bins["count"]) == NUM_TEST and len(bins["accuracy"]) == evaluation.NUM_BINS


def test_ood_scores_and_rotation_use_the_right_sides_and_samples(evaluated_run):
    """AUROC and AP against scikit-learn on the returned per-example scores, Fashion-MNIST the
    positive class; every angle uses the first K samples (360° gives 0°'s metrics)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    experiment, state = train.load_run(evaluated_run[0])
    posterior = state.params["posterior"]
    data = _fake_evaluation_data()
    x_out, y_out = data["out_of_distribution"]
    data["out_of_distribution"] = (np.full_like(x_out, 0.05), y_out)  # Dim, unlike the digits.
    key = jax.random.key(7)
    summary, per_example = evaluation.evaluate(
        experiment, posterior, data, key, num_samples=4, angles=(0.0, 360.0), progress=False
    )
    ood = summary["out_of_distribution"]
    for name in ("entropy", "mutual_information"):
        scores_in, scores_out = per_example[f"{name}_in"], per_example[f"{name}_out"]
        labels = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
        scores = np.r_[scores_in, scores_out]
        assert ood[f"auroc_{name}"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
        assert ood[f"aupr_{name}"] == pytest.approx(
            average_precision_score(labels, scores), abs=1e-6
        )
        assert abs(ood[f"auroc_{name}"] - 0.5) > 0.1, name  # Swapping the sides would show.
    rotation = summary["rotation"]
    for name in ("error", "nll", "ece"):
        assert rotation[name][1] == pytest.approx(rotation[name][0], rel=1e-4, abs=1e-6), name
    # Power: other samples move the NLL by far more than that tolerance.
    other, _ = evaluation.evaluate(
        experiment, posterior, data, jax.random.key(8), num_samples=4, angles=(), progress=False
    )
    nll = summary["in_distribution"]["nll"]
    assert abs(other["in_distribution"]["nll"] - nll) > 1e-3 * nll


def test_sample_count_curve_has_the_requested_counts(evaluated_run):
    sweep = evaluated_run[1]["sample_counts"]
    assert sweep["num_samples"] == [1, 2, 4]  # SAMPLE_COUNTS below K = 4, then K.
    assert sweep["pool_size"] == 8  # Two independent halves of K samples.
    assert sweep["num_sets"] == [8, 4, 2]
    for name in evaluation.SAMPLE_COUNT_METRICS:
        for stat in ("mean", "std", "sem"):
            values = sweep[name][stat]
            assert len(values) == 3 and all(map(math.isfinite, values)), (name, stat)
        # BBB samples differ, so K = 1 evaluations differ from one another.
    assert sweep["nll"]["std"][0] > 0
    assert evaluation.sample_counts(100) == [1, 2, 5, 10, 20, 50, 100]
    assert evaluation.sample_counts(30) == [1, 2, 5, 10, 20, 30]


def test_every_plot_is_a_nontrivial_png(evaluated_run):
    import matplotlib.pyplot as plt

    workdir, summary = evaluated_run
    assert summary["plots"] == [os.path.join("plots", name) for name in evaluation.PLOT_FILES]
    for name in evaluation.PLOT_FILES:
        path = os.path.join(workdir, "plots", name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert os.path.getsize(path) > 10_000, name
        image = plt.imread(path)  # [H, W, 4]
        assert image.shape[0] > 200 and image.shape[1] > 300, name
        assert np.std(image[..., :3]) > 0.05, name  # Not a blank canvas.


def test_not_a_classification_run_exits_2(tmp_path, monkeypatch, capsys):
    config = _tiny_config()
    config.likelihood.name = "gaussian"
    config.model.num_outputs = 1
    experiment = train.build(config, NUM_TRAIN, (28, 28, 1))
    state = jax.eval_shape(lambda: train.init_state(experiment, jax.random.key(0)))
    monkeypatch.setattr(train, "load_run", lambda workdir: (experiment, state))
    with pytest.raises(SystemExit) as exit_info:
        cli.run_or_exit(lambda: evaluation.evaluate_run(str(tmp_path), progress=False))
    assert exit_info.value.code == 2
    assert "regression run" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # Nothing written.


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_cli_workdir_without_checkpoint_exits_2(evaluated_run, tmp_path):
    workdir = tmp_path / "no_checkpoint"
    workdir.mkdir()
    shutil.copy(os.path.join(evaluated_run[0], "config.json"), workdir)
    result = _cli(f"--workdir={workdir}", "--num_samples=2")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "holds no checkpoint" in result.stderr
    assert not os.path.exists(workdir / evaluation.EVAL_FILE)
    assert not os.path.exists(workdir / "plots")


@pytest.fixture(scope="module")
def point_runs(tmp_path_factory):
    """One-epoch MC-dropout and SGD runs: {"dropout": workdir, "sgd": workdir}."""
    root = tmp_path_factory.mktemp("point_runs")
    workdirs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "load_data", _fake_splits)
        for kind in ("dropout", "sgd"):
            workdirs[kind] = str(root / kind)
            train.train_and_evaluate(_tiny_config(kind), workdirs[kind])
    return workdirs


def test_dropout_runs_are_evaluated_as_mc_dropout_and_sgd_runs_once(point_runs):
    dropout, sgd = (
        evaluation.evaluate_run(
            point_runs[kind], num_samples=4, data=_fake_evaluation_data(), progress=False
        )
        for kind in ("dropout", "sgd")
    )
    assert dropout["mc_dropout"] and not dropout["deterministic"]
    assert dropout["num_samples"] == 4 and dropout["sample_counts"]["pool_size"] == 8
    # Different dropout masks disagree; one fixed network cannot.
    assert dropout["in_distribution"]["mutual_information"] > 1e-4
    assert dropout["sample_counts"]["nll"]["std"][0] > 0
    assert sgd["deterministic"] and not sgd["mc_dropout"]
    assert sgd["num_samples"] == 1 and sgd["sample_counts"]["pool_size"] == 1
    assert sgd["in_distribution"]["mutual_information"] == 0.0


def test_evaluate_splits_uses_mc_dropout_and_evaluates_a_fixed_network_once(
    point_runs, monkeypatch
):
    monkeypatch.setattr(train, "load_data", _fake_splits)
    one, many = (
        evaluation.evaluate_splits(point_runs["dropout"], num_samples=k, seed=3) for k in (1, 8)
    )
    assert many["num_samples"] == 8
    for split in ("validation", "test"):
        # More dropout masks change the predictive, not the network without dropout.
        assert one[split]["nll"] != many[split]["nll"], split
        assert one[split]["error_mean_weights"] == many[split]["error_mean_weights"], split
    sgd_one, sgd_many = (
        evaluation.evaluate_splits(point_runs["sgd"], num_samples=k, seed=3) for k in (1, 8)
    )
    assert sgd_many["num_samples"] == 1
    assert sgd_many["test"] == sgd_one["test"]


# Rotation -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(2)
    return rng.random((3, 28, 28, 2), dtype=np.float32)  # [N, H, W, C]


def test_rotation_by_0_degrees_is_the_identity(images):
    np.testing.assert_array_equal(np.asarray(evaluation.rotate_images(images, 0.0)), images)


def test_rotation_by_90_degrees_is_rot90(images):
    quarter = np.asarray(evaluation.rotate_images(images, 90.0))
    np.testing.assert_allclose(quarter, np.rot90(images, k=1, axes=(1, 2)), atol=1e-5)
    twice = np.asarray(evaluation.rotate_images(jnp.asarray(quarter), 90.0))
    half = np.asarray(evaluation.rotate_images(images, 180.0))
    np.testing.assert_allclose(twice, half, atol=1e-5)
    np.testing.assert_allclose(half, np.rot90(images, k=2, axes=(1, 2)), atol=1e-5)


@pytest.mark.parametrize("angle", [15.0, 37.5, 135.0])
def test_rotation_matches_scipy(images, angle):
    from scipy import ndimage

    expected = ndimage.rotate(
        images, angle, axes=(1, 2), reshape=False, order=1, mode="grid-constant"
    )
    actual = np.asarray(evaluation.rotate_images(images, angle))
    np.testing.assert_allclose(actual, expected, atol=1e-4)


# Sampling: BBB, MC dropout, point estimate --------------------------------------------------


def _numpy_params(model, x: jax.Array):
    """Parameters shaped as `model.init`'s, drawn with numpy (no initialiser to compile)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[0]), jnp.float32),
        shapes,
    )


def _samples(kind: str, num_samples: int = 4) -> np.ndarray:
    """K samples of an untrained network of `_tiny_config(kind)` on 16 images [K, N, C]."""
    config = _tiny_config(kind)
    model = make_model(config.model)
    x = jnp.asarray(_images(np.random.default_rng(3), 16))  # [N, 28, 28, 1]
    params = _numpy_params(model, x)
    if config.posterior.name == "point":
        posterior = posterior_lib.PointEstimate(mu=params)
    else:
        posterior = posterior_lib.init_posterior(jax.random.key(0), params, -3.0)
    predictor = evaluation.make_predictor(
        model, num_samples, mc_dropout=evaluation.uses_mc_dropout(config)
    )
    return np.asarray(predictor(posterior, x, jax.random.key(1)))  # [K, N, C]


def test_mc_dropout_samples_differ_and_point_samples_are_identical():
    dropout, point, bbb = _samples("dropout"), _samples("sgd"), _samples("bbb")
    assert dropout.shape == point.shape == bbb.shape == (4, 16, 10)
    np.testing.assert_allclose(dropout.sum(-1), 1.0, rtol=1e-5)
    for k in range(1, 4):
        assert np.max(np.abs(dropout[k] - dropout[0])) > 1e-3, k  # Different dropout masks.
        np.testing.assert_array_equal(point[k], point[0])  # The same network K times.
        assert np.max(np.abs(bbb[k] - bbb[0])) > 1e-3, k  # Different weight samples.


def test_run_kind_detection():
    bbb, sgd, dropout = (_tiny_config(kind) for kind in ("bbb", "sgd", "dropout"))
    assert [evaluation.uses_mc_dropout(c) for c in (bbb, sgd, dropout)] == [False, False, True]
    assert [evaluation.is_deterministic(c) for c in (bbb, sgd, dropout)] == [False, True, False]
    assert evaluation.method_name(sgd) == "SGD (point estimate)"
    assert evaluation.method_name(dropout) == "MC dropout (p=0.5)"


# Metrics against the number of samples; OOD detection ---------------------------------------


def _random_samples(seed: int, num_samples: int, n: int) -> jax.Array:
    logits = np.random.default_rng(seed).normal(size=(num_samples, n, 10)) * 2
    return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)  # [K, N, C]


def _entropy(probs: np.ndarray) -> np.ndarray:
    return -np.sum(probs * np.log(probs), axis=-1)


def _numpy_metrics(samples_in, samples_out, labels) -> dict[str, float]:
    """`SAMPLE_COUNT_METRICS` of samples [K, N, C] in float64 numpy and scikit-learn."""
    from sklearn.metrics import roc_auc_score

    samples_in, samples_out = (np.asarray(s, np.float64) for s in (samples_in, samples_out))
    predictive = samples_in.mean(0)  # [N, C]
    n, classes = predictive.shape
    confidence, correct = predictive.max(-1), predictive.argmax(-1) == labels  # [N], [N]
    bins = np.clip(np.ceil(confidence * evaluation.NUM_BINS).astype(int) - 1, 0, None)  # [N]
    gaps = np.bincount(bins, correct - confidence, evaluation.NUM_BINS)  # [M]
    values = {
        "error": np.mean(~correct),
        "nll": -np.mean(np.log(predictive[np.arange(n), labels])),
        "brier": np.mean(np.sum((predictive - np.eye(classes)[labels]) ** 2, -1)),
        "ece": np.sum(np.abs(gaps)) / n,
    }
    is_out = np.r_[np.zeros(n), np.ones(samples_out.shape[1])]
    pools = (samples_in, samples_out)
    entropy = [_entropy(s.mean(0)) for s in pools]  # [N_in], [N_out]
    information = [np.maximum(_entropy(s.mean(0)) - _entropy(s).mean(0), 0) for s in pools]
    values["auroc_entropy"] = roc_auc_score(is_out, np.concatenate(entropy))
    values["auroc_mutual_information"] = roc_auc_score(is_out, np.concatenate(information))
    return values


def test_sample_count_metrics_match_direct_computation():
    samples_in, samples_out = _random_samples(4, 6, 40), _random_samples(5, 6, 30)
    labels = _labels(np.random.default_rng(6), 40)
    sweep = evaluation.metrics_by_sample_count(
        samples_in, samples_out, jnp.asarray(labels), [1, 4, 6]
    )
    assert sweep["num_sets"] == [6, 1, 1]  # The incomplete second set of 4 is dropped.
    per_sample = [
        _numpy_metrics(samples_in[k : k + 1], samples_out[k : k + 1], labels) for k in range(6)
    ]
    first_four = _numpy_metrics(samples_in[:4], samples_out[:4], labels)
    everything = _numpy_metrics(samples_in, samples_out, labels)
    for name in evaluation.SAMPLE_COUNT_METRICS:
        values = [p[name] for p in per_sample]
        mean, std = sweep[name]["mean"], sweep[name]["std"]
        assert mean[0] == pytest.approx(np.mean(values), abs=1e-5), name
        assert std[0] == pytest.approx(np.std(values, ddof=1), abs=1e-5), name
        assert sweep[name]["sem"][0] == pytest.approx(std[0] / math.sqrt(6), abs=1e-6), name
        assert mean[1] == pytest.approx(first_four[name], abs=1e-5), name
        assert mean[2] == pytest.approx(everything[name], abs=1e-5), name
        assert std[1] == std[2] == 0.0, name
    assert np.std([p["nll"] for p in per_sample]) > 0.01  # The sets really differ.


def test_ood_detection_of_uniform_and_disagreeing_predictions():
    """Confident in-distribution predictions vs OOD ones that are uniform (entropy detects
    them) or that disagree across samples (mutual information detects them): AUROC ≈ 1."""
    num_samples, n, classes = 10, 50, 10
    labels = np.arange(n) % classes
    confident = np.full((num_samples, n, classes), 0.01 / (classes - 1), np.float32)
    confident[:, np.arange(n), labels] = 0.99  # [K, N, C], every sample agrees
    uniform = np.full((num_samples, n, classes), 1 / classes, np.float32)
    # Sample k puts 0.99 on class (k + n) mod C: each sample is confident, but they disagree.
    disagreeing = np.full((num_samples, n, classes), 0.01 / (classes - 1), np.float32)
    k, i = np.meshgrid(np.arange(num_samples), np.arange(n), indexing="ij")
    disagreeing[k, i, (k + i) % classes] = 0.99
    labels = jnp.asarray(labels, jnp.int32)
    by_entropy = evaluation.metrics_by_sample_count(
        jnp.asarray(confident), jnp.asarray(uniform), labels, [1, 10]
    )
    assert by_entropy["auroc_entropy"]["mean"] == pytest.approx([1.0, 1.0], abs=1e-6)
    by_information = evaluation.metrics_by_sample_count(
        jnp.asarray(confident), jnp.asarray(disagreeing), labels, [1, 10]
    )
    # One sample has no disagreement (MI = 0 everywhere: chance); ten samples separate fully.
    assert by_information["auroc_mutual_information"]["mean"] == pytest.approx([0.5, 1.0])
    assert by_information["auroc_entropy"]["mean"][1] == pytest.approx(1.0)


# Comparison ---------------------------------------------------------------------------------


def _fake_result(method: str, error: float, nll: float, ece: float, auroc_h: float, auroc_mi):
    return {
        "method": method,
        "num_samples": 100,
        "seed": 0,
        "in_distribution": {"error": error, "nll": nll, "ece": ece},
        "out_of_distribution": {"auroc_entropy": auroc_h, "auroc_mutual_information": auroc_mi},
    }


def _parse_table(table: str) -> list[list[str]]:
    rows = [line for line in table.strip().splitlines()]
    assert set(rows[1]) <= set("|:- ")  # The alignment row.
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[:1] + rows[2:]]


def test_comparison_table_columns_and_values(tmp_path):
    results = {
        "runs/a": _fake_result("Bayes by Backprop", 0.0152, 0.0481, 0.0031, 0.912, 0.874),
        "runs/b": _fake_result("SGD (point estimate)", 0.0187, 0.0912, 0.0102, 0.801, 0.5),
    }
    header, *rows = _parse_table(evaluation.comparison_table(results))
    assert header == [
        "method",
        "test error (%)",
        "NLL (nats)",
        "ECE (%)",
        "OOD AUROC (entropy)",
        "OOD AUROC (MI)",
    ]
    assert rows[0] == [
        "Bayes by Backprop, K=100 (`runs/a`)",
        "1.52",
        "0.0481",
        "0.31",
        "0.9120",
        "0.8740",
    ]
    assert rows[1][1:] == ["1.87", "0.0912", "1.02", "0.8010", "0.5000"]


def test_compare_reads_eval_json_files(tmp_path):
    workdirs = []
    for name, error in (("first", 0.02), ("second", 0.03)):
        workdir = tmp_path / name
        workdir.mkdir()
        result = _fake_result(name, error, 0.1, 0.01, 0.9, 0.8)
        (workdir / evaluation.EVAL_FILE).write_text(json.dumps(result))
        workdirs.append(str(workdir))
    out = tmp_path / "tables" / "compare.md"
    table = evaluation.compare_runs(workdirs, str(out))
    assert out.read_text() == table
    _, first, second = _parse_table(table)
    assert first[0].startswith("first") and first[1] == "2.00"
    assert second[0].startswith("second") and second[1] == "3.00"


def test_compare_evaluates_runs_without_eval_json(evaluated_run, tmp_path, monkeypatch):
    copy = str(tmp_path / "copy")
    shutil.copytree(evaluated_run[0], copy)
    os.remove(os.path.join(copy, evaluation.EVAL_FILE))
    monkeypatch.setattr(evaluation, "load_evaluation_data", _fake_evaluation_data)
    table = evaluation.compare_runs([copy], num_samples=4, progress=False)
    with open(os.path.join(copy, evaluation.EVAL_FILE)) as f:
        result = json.load(f)
    assert result["workdir"] == copy
    _, row = _parse_table(table)
    assert row[0] == f"Bayes by Backprop, K=4 (`{copy}`)"
    assert row[1] == f"{100 * result['in_distribution']['error']:.2f}"


def test_compare_reuses_eval_json_only_for_the_same_samples_and_checkpoint(
    evaluated_run, tmp_path, monkeypatch, capsys
):
    # A table asked for with K samples never shows figures that were measured with another K.
    copy = str(tmp_path / "copy")
    shutil.copytree(evaluated_run[0], copy)
    monkeypatch.setattr(evaluation, "load_evaluation_data", _fake_evaluation_data)
    calls = []
    real = evaluation.evaluate_run
    monkeypatch.setattr(
        evaluation, "evaluate_run", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    table = evaluation.compare_runs([copy], num_samples=4, progress=False)
    assert calls == [] and "K=4" in table  # eval.json was made with K=4 at the last step.
    table = evaluation.compare_runs([copy], num_samples=6, progress=False)
    assert [c["num_samples"] for c in calls] == [6] and "K=6" in table
    assert "num_samples=4, not 6" in capsys.readouterr().out
    with open(os.path.join(copy, evaluation.EVAL_FILE)) as f:
        stored = json.load(f)
    stored["step"] -= 1  # As if the run had trained on after it was evaluated.
    with open(os.path.join(copy, evaluation.EVAL_FILE), "w") as f:
        json.dump(stored, f)
    evaluation.compare_runs([copy], num_samples=6, progress=False)
    assert len(calls) == 2 and "the latest checkpoint is" in capsys.readouterr().out


def test_evaluate_splits_rescores_validation_and_test_with_k_samples(evaluated_run, monkeypatch):
    from tests.test_train import _digest

    workdir = evaluated_run[0]
    monkeypatch.setattr(train, "load_data", _fake_splits)
    before = _digest(workdir)
    one = evaluation.evaluate_splits(workdir, num_samples=1, seed=3)
    many = evaluation.evaluate_splits(workdir, num_samples=8, seed=3)
    assert _digest(workdir) == before  # Writes nothing.
    assert many["num_samples"] == 8 and many["step"] == one["step"] > 0
    # K reaches the predictive: the same call by hand, with K=8 and the test key, agrees...
    experiment, state = train.load_run(workdir)
    config = experiment.config.copy_and_resolve_references()
    config.eval.num_samples = 8
    test = tuple(jnp.asarray(a) for a in _fake_splits(config)["test"])
    key = jax.random.fold_in(jax.random.key(3, impl=config.prng_impl), 1)
    experiment = dataclasses.replace(experiment, config=config)
    by_hand = train.evaluate(experiment, state.params, test, key)
    assert many["test"]["nll"] == pytest.approx(float(by_hand["nll"]), rel=1e-6)
    # ... the posterior-mean error does not depend on K, the predictive's NLL does.
    for split in ("validation", "test"):
        assert one[split]["error_mean_weights"] == many[split]["error_mean_weights"]
        assert one[split]["nll"] != many[split]["nll"]
    line = evaluation.splits_line(many)
    assert "K=8" in line and f"test error {100 * many['test']['error']:.2f}%" in line


@pytest.mark.parametrize("labels", [[0, 1, 2, -1], [0, 1, 2, 3], [0.0, 1.0, 2.0, 1.0]])
def test_labels_outside_the_classes_are_refused(labels):
    """Inside jit, −1 would gather the last class for the NLL and 3 would give NaN, while the
    error counted both as wrong; they are refused first."""
    samples = _random_samples(0, 2, 4)[..., :3]  # [K, N, C = 3]
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        evaluation.metrics_by_sample_count(samples, samples, np.asarray(labels), [1])
    evaluation.metrics_by_sample_count(samples, samples, np.asarray([0, 1, 2, 1]), [1])


def test_sample_count_sets_are_capped_at_max_sets():
    """Every real K_max = 100 evaluation caps K = 1 and 2 at MAX_SETS sets: the mean is over
    the first `max_sets` sets, and its standard error divides by √max_sets."""
    samples_in, samples_out = _random_samples(4, 8, 40), _random_samples(5, 8, 30)
    labels = _labels(np.random.default_rng(6), 40)
    sweep = evaluation.metrics_by_sample_count(
        samples_in, samples_out, jnp.asarray(labels), [1, 2], max_sets=3
    )
    assert sweep["num_sets"] == [3, 3]
    for k, column in ((1, 0), (2, 1)):
        sets = [
            _numpy_metrics(
                samples_in[i * k : (i + 1) * k], samples_out[i * k : (i + 1) * k], labels
            )
            for i in range(3)
        ]
        for name in ("nll", "ece"):
            values = [s[name] for s in sets]
            std = np.std(values, ddof=1)
            assert sweep[name]["mean"][column] == pytest.approx(np.mean(values), abs=1e-5)
            assert sweep[name]["std"][column] == pytest.approx(std, abs=1e-5)
            assert sweep[name]["sem"][column] == pytest.approx(std / math.sqrt(3), abs=1e-6)


def test_ood_figures_are_of_fashion_mnist_from_the_first_k_samples(evaluated_run):
    """The OOD means are over the Fashion-MNIST examples, the per-example entropies those of
    the first K samples of the pool, the reliability diagram MNIST's, and the mean-weights
    error is that of the posterior-mean network, not of a sample."""
    from bbb import metrics
    from bbb import predict as predict_lib

    experiment, state = train.load_run(evaluated_run[0])
    posterior = state.params["posterior"]
    data = _fake_evaluation_data()
    x_out, y_out = data["out_of_distribution"]
    # Fewer, dim images, unlike the digits.
    data["out_of_distribution"] = (np.full_like(x_out[:48], 0.05), y_out[:48])
    # Labels that the posterior-mean network gets all right: its error is 0 exactly.
    images_in = jnp.asarray(data["in_distribution"][0])
    key = jax.random.key(7)
    mean_weights = predict_lib.predict(experiment.model, posterior, images_in, key, 1).mean_weights
    data["in_distribution"] = (data["in_distribution"][0], np.argmax(mean_weights, -1))
    summary, per_example = evaluation.evaluate(
        experiment, posterior, data, key, num_samples=4, angles=(), progress=False
    )
    ood, in_distribution = summary["out_of_distribution"], summary["in_distribution"]
    assert (ood["num_examples"], in_distribution["num_examples"]) == (48, NUM_TEST)
    for name in ("entropy", "mutual_information"):
        name_out = "predictive_entropy" if name == "entropy" else name
        assert ood[name_out] == pytest.approx(np.mean(per_example[f"{name}_out"]), rel=1e-6)
        assert abs(np.mean(per_example[f"{name}_out"]) - np.mean(per_example[f"{name}_in"])) > (
            1e-3 * np.mean(per_example[f"{name}_in"])
        ), name  # Power: the sides differ.
    first_half = jax.random.split(key, 2)[0]
    predictor = evaluation.make_predictor(experiment.model, 4, False)
    x_in, y_in = (jnp.asarray(a) for a in data["in_distribution"])
    for x, where in ((x_in, "in"), (jnp.asarray(data["out_of_distribution"][0]), "out")):
        samples = predictor(posterior, x, first_half)  # [K, N, C]
        np.testing.assert_allclose(
            per_example[f"entropy_{where}"],
            np.asarray(metrics.predictive_entropy(samples)),
            rtol=1e-5,
            atol=1e-6,
        )
    # The reliability diagram is MNIST's, from the same first K samples.
    expected = metrics.reliability_diagram_data(
        predictor(posterior, x_in, first_half), y_in, evaluation.NUM_BINS
    )
    for name, values in expected.items():
        np.testing.assert_allclose(
            summary["reliability_diagram"][name], np.asarray(values), rtol=1e-6, atol=1e-7
        )
    assert in_distribution["error_mean_weights"] == 0.0
    first_sample = predictor(posterior, x_in, first_half)[0]  # [N, C]
    assert np.mean(np.argmax(first_sample, -1) != y_in) > 0  # Power: a sample errs.


def test_compare_reuses_a_fixed_networks_eval_json_whatever_k_is_asked(tmp_path, monkeypatch):
    """A deterministic run is evaluated with K = 1 whatever K is asked: its eval.json is reused
    for a table of K = 100, not evaluated again (which would give the same figures)."""
    workdir = tmp_path / "sgd"
    workdir.mkdir()
    stored = {
        **_fake_result("SGD (point estimate)", 0.02, 0.1, 0.01, 0.9, 0.8),
        "num_samples": 1,
        "deterministic": True,
    }
    (workdir / evaluation.EVAL_FILE).write_text(json.dumps(stored))

    def evaluate_run(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(evaluation, "evaluate_run", evaluate_run)
    table = evaluation.compare_runs([str(workdir)], num_samples=100)
    assert "SGD (point estimate), K=1" in table
    stored["num_samples"] = 2  # A fixed network's eval.json with K = 2 is stale all the same.
    (workdir / evaluation.EVAL_FILE).write_text(json.dumps(stored))
    with pytest.raises(AssertionError, match="evaluated again"):
        evaluation.compare_runs([str(workdir)], num_samples=100)


def test_ood_scores_come_from_the_same_k_networks_as_the_in_distribution_ones(evaluated_run):
    """Common random numbers: with the MNIST images also as the OOD set, the per-example
    entropies and informations on both sides are bit-for-bit equal (other samples would
    differ, however little, at this run's small σ)."""
    from bbb import metrics

    experiment, state = train.load_run(evaluated_run[0])
    posterior = state.params["posterior"]
    data = _fake_evaluation_data()
    data["out_of_distribution"] = data["in_distribution"]
    key = jax.random.key(7)
    _, per_example = evaluation.evaluate(
        experiment, posterior, data, key, num_samples=4, angles=(), progress=False
    )
    for name in ("entropy", "mutual_information"):
        np.testing.assert_array_equal(per_example[f"{name}_out"], per_example[f"{name}_in"])
    # Power: the second half of the pool gives other entropies.
    predictor = evaluation.make_predictor(experiment.model, 4, False)
    images = jnp.asarray(data["in_distribution"][0])
    first, second = (predictor(posterior, images, k) for k in jax.random.split(key, 2))
    assert not np.array_equal(
        np.asarray(metrics.predictive_entropy(first)),
        np.asarray(metrics.predictive_entropy(second)),
    )


def test_rotated_mnist_turns_the_digits_counter_clockwise(evaluated_run):
    """The 90° entry of the rotation curve is the NLL and error of the first K samples on
    `np.rot90` of the images (counter-clockwise), computed in numpy; a clockwise turn (or an
    angle read in other units) gives other figures. The mean-weights error is that of the
    network at μ on the turned images too: labels that it gets all right there give 0."""
    experiment, state = train.load_run(evaluated_run[0])
    posterior = state.params["posterior"]
    data = _fake_evaluation_data()
    x_in = data["in_distribution"][0]
    turned = jnp.asarray(np.rot90(x_in, k=1, axes=(1, 2)).copy())
    at_mu = experiment.model.apply({"params": posterior.mu}, turned)  # [N, C] logits
    y_in = np.asarray(np.argmax(at_mu, -1), np.int32)
    data["in_distribution"] = (x_in, y_in)
    at_mu_unturned = experiment.model.apply({"params": posterior.mu}, jnp.asarray(x_in))
    assert np.mean(np.argmax(at_mu_unturned, -1) != y_in) > 0.1  # Power: unturned errs.
    key = jax.random.key(7)
    summary, _ = evaluation.evaluate(
        experiment, posterior, data, key, num_samples=4, angles=(90.0,), progress=False
    )
    rotation = summary["rotation"]
    assert rotation["error_mean_weights"] == [0.0]
    predictor = evaluation.make_predictor(experiment.model, 4, False)
    first_half = jax.random.split(key, 2)[0]
    figures = {}
    for turns in (1, -1):  # counter-clockwise, clockwise
        turned = jnp.asarray(np.rot90(x_in, k=turns, axes=(1, 2)).copy())
        samples = np.asarray(predictor(posterior, turned, first_half), np.float64)  # [K, N, C]
        predictive = samples.mean(0)  # [N, C]
        figures[turns] = (
            -np.mean(np.log(predictive[np.arange(len(y_in)), y_in])),
            np.mean(predictive.argmax(-1) != y_in),
        )
    nll, error = figures[1]
    assert rotation["nll"][0] == pytest.approx(nll, rel=1e-4)
    assert rotation["error"][0] == pytest.approx(error, abs=1e-9)
    assert abs(figures[-1][0] - nll) > 1e-3 * nll  # Power: the other direction differs.


def test_evaluation_data_are_the_runs_mnist_test_and_the_first_fashion_mnist_images(
    monkeypatch,
):
    """In-distribution: the run's own MNIST test split (as `train.load_data` cuts it);
    out-of-distribution: Fashion-MNIST's test split, read with the run's data_dir and
    pixel_scale and cut to its first eval_subset images (faked loaders, tagged examples)."""
    from bbb.data import mnist

    config = _tiny_config()
    config.data.eval_subset, config.data.pixel_scale = 40, 255.0
    config.data.data_dir = "/nowhere/tfds"
    rng = np.random.default_rng(9)
    splits = {name: (_images(rng, 60), _labels(rng, 60)) for name in ("train", "validation")}
    splits["test"] = (_images(rng, 40), _labels(rng, 40))
    monkeypatch.setattr(train, "load_data", lambda c: splits if c is config else None)
    calls = []

    def fake_fashion(**kwargs):
        calls.append(kwargs)
        images = np.arange(150, dtype=np.float32)[:, None, None, None] * np.ones((1, 28, 28, 1))
        return {
            "train": (np.zeros((5, 28, 28, 1), np.float32), np.zeros(5, np.int32)),
            "test": (images.astype(np.float32), np.arange(150, dtype=np.int32) % 10),
        }

    monkeypatch.setattr(mnist, "load_fashion_mnist", fake_fashion)
    data = evaluation.load_evaluation_data(config)
    assert data["in_distribution"] is splits["test"]
    assert calls == [{"data_dir": "/nowhere/tfds", "pixel_scale": 255.0}]
    images, labels = data["out_of_distribution"]
    assert images.shape == (40, 28, 28, 1) and labels.shape == (40,)
    np.testing.assert_array_equal(images[:, 0, 0, 0], np.arange(40))  # The first 40, in order.
    np.testing.assert_array_equal(labels, np.arange(40) % 10)
    config.data.eval_subset = 0  # 0: the whole split.
    assert len(evaluation.load_evaluation_data(config)["out_of_distribution"][1]) == 150


def test_each_sample_is_one_network_whatever_the_other_inputs():
    """Sample k is a whole network w_k ~ q (common random numbers across datasets): its
    output on an image does not depend on which other images share the call. Per-example
    noise (the local reparameterisation, flipout) would change with the batch."""
    config = _tiny_config()
    model = make_model(config.model)
    x = jnp.asarray(_images(np.random.default_rng(3), 16))  # [N, 28, 28, 1]
    posterior = posterior_lib.init_posterior(jax.random.key(0), _numpy_params(model, x), -3.0)
    predictor = evaluation.make_predictor(model, 4, mc_dropout=False)
    key = jax.random.key(1)
    together = np.asarray(predictor(posterior, x, key))  # [K, 16, C]
    first, rest = (np.asarray(predictor(posterior, part, key)) for part in (x[:5], x[5:]))
    np.testing.assert_allclose(np.concatenate([first, rest], 1), together, rtol=1e-5, atol=1e-7)
    alone = np.asarray(predictor(posterior, x[7:8], key))  # [K, 1, C]
    np.testing.assert_allclose(alone[:, 0], together[:, 7], rtol=1e-5, atol=1e-7)
    assert np.max(np.abs(together[1] - together[0])) > 1e-3  # Power: the samples differ.


def test_evaluate_run_draws_the_samples_from_its_seed(evaluated_run, tmp_path, monkeypatch):
    """`seed` is the key of the weight samples, jax.random.key(seed) with the run's PRNG (here
    "rbg", not the default), and eval.json records it (on a copy of the run: the shared
    eval.json stays as it was; the checkpoint holds no key, so the copy's PRNG may change)."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(evaluated_run[0], workdir)
    config_path = os.path.join(workdir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "prng_impl": "rbg"}, f)
    keys = []
    evaluate = evaluation.evaluate

    def spy(experiment, posterior, data, key, **kwargs):
        keys.append(np.asarray(jax.random.key_data(key)))
        return evaluate(experiment, posterior, data, key, **{**kwargs, "angles": ()})

    monkeypatch.setattr(evaluation, "evaluate", spy)
    monkeypatch.setattr(evaluation, "write_plots", lambda *args: [])
    summary = evaluation.evaluate_run(
        workdir, num_samples=2, seed=3, data=_fake_evaluation_data(), progress=False
    )
    impl = "rbg"
    (key,) = keys
    np.testing.assert_array_equal(
        key, np.asarray(jax.random.key_data(jax.random.key(3, impl=impl)))
    )
    assert not np.array_equal(key, np.asarray(jax.random.key_data(jax.random.key(0, impl=impl))))
    assert summary["seed"] == 3


def test_sample_count_sets_are_the_mnist_and_fashion_samples_of_both_halves(evaluated_run):
    """With K = 2 the pool is the 2 + 2 samples of the two halves' keys: the K = 1 and K = 2
    entries are the mean and std over the sets {0}, {1}, {2}, {3} and {0, 1}, {2, 3} of the
    MNIST samples (labelled) and the Fashion-MNIST ones (the positives), in numpy."""
    experiment, state = train.load_run(evaluated_run[0])
    posterior = state.params["posterior"]
    data = _fake_evaluation_data()  # Random images on both sides: every score is ranked.
    key = jax.random.key(11)
    summary, _ = evaluation.evaluate(
        experiment, posterior, data, key, num_samples=2, angles=(), progress=False
    )
    sweep = summary["sample_counts"]
    assert sweep["num_samples"] == [1, 2] and sweep["num_sets"] == [4, 2]
    predictor = evaluation.make_predictor(experiment.model, 2, False)
    x_in, labels = data["in_distribution"]
    pools = [
        np.concatenate(
            [np.asarray(predictor(posterior, jnp.asarray(x), k)) for k in jax.random.split(key, 2)]
        )  # [4, N, C]: the first half's two samples, then the second's
        for x in (x_in, data["out_of_distribution"][0])
    ]
    for column, sets in ((0, [[0], [1], [2], [3]]), (1, [[0, 1], [2, 3]])):
        per_set = [_numpy_metrics(pools[0][s], pools[1][s], labels) for s in sets]
        for name in evaluation.SAMPLE_COUNT_METRICS:
            # This run's σ is small: float32 rounding reorders a few pairs of the tiny
            # mutual informations (a pair is 1/4096 of the AUROC).
            tol = 2e-3 if name == "auroc_mutual_information" else 1e-5
            values = [p[name] for p in per_set]
            mean, std = np.mean(values), np.std(values, ddof=1)
            assert sweep[name]["mean"][column] == pytest.approx(mean, abs=tol), name
            assert sweep[name]["std"][column] == pytest.approx(std, abs=tol), name
    # Power: the halves differ on both sides.
    assert abs(per_set[0]["nll"] - per_set[1]["nll"]) > 1e-4
    assert per_set[0]["auroc_entropy"] != pytest.approx(per_set[1]["auroc_entropy"], abs=1e-3)
