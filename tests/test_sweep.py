"""Sweeps (bbb/sweep.py, scripts/sweep.py): members equal to their one-by-one runs when
vectorised, sub-workdir names, job arrays, skipping, collecting, and bad sweep entries."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bbb import sweep, train
from bbb.errors import ConfigError
from bbb.priors import make_prior
from configs import mnist as mnist_config
from configs import regression as regression_config
from tests.conftest import REPO, numpy_posterior, report_on_fake_cpus
from tests.test_train import _digest, _read_metrics

# Every numeric hyperparameter that --vectorize varies, in one member against the base.
SWEEP = [
    {},
    {
        "seed": 1,
        "prior.sigma": 0.5,
        "optim.learning_rate": 3e-3,
        "objective.kl_temperature": 0.5,
    },
]


def _tiny_config():
    """configs/regression.py shrunk to seconds: 3 epochs of 2 steps, a 16×16 network."""
    config = regression_config.get_config()
    config.num_epochs = 3
    config.model.hidden_sizes = (16, 16)
    config.data.train_subset = 200
    config.data.eval_subset = 100
    config.eval.num_samples = 4
    config.eval.every_epochs = 1
    config.eval.batch_size = 100
    config.checkpoint_every_epochs = 1
    return config


# Vectorised against one by one -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SWEEP vectorised (stopped after 1 epoch, then resumed) and one member after another."""
    root = tmp_path_factory.mktemp("sweep")
    vectorized, sequential = str(root / "vectorized"), str(root / "sequential")
    sweep.run_sweep(_tiny_config(), SWEEP, vectorized, vectorize=True, stop_after_epochs=1)
    members = sweep.make_members(_tiny_config(), SWEEP, vectorized, build=False)
    interrupted = [(m.status, len(_read_metrics(m.workdir))) for m in members]
    sweep.run_sweep(_tiny_config(), SWEEP, vectorized, vectorize=True)
    sweep.run_sweep(_tiny_config(), SWEEP, sequential)
    return vectorized, sequential, interrupted, members


def test_vectorized_members_equal_their_one_by_one_runs(trained):
    vectorized, sequential, _, members = trained
    for member in members:
        one_by_one = _read_metrics(os.path.join(sequential, member.name))
        together = _read_metrics(os.path.join(vectorized, member.name))
        assert len(one_by_one) == len(together) == 3
        for expected, actual in zip(one_by_one, together, strict=True):
            assert expected.keys() == actual.keys()
            for key, value in expected.items():
                assert actual[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (member.name, key)
    # The members differ from each other: the hyperparameters did reach the program.
    first, second = (_read_metrics(m.workdir)[-1]["train/loss"] for m in members)
    assert abs(first - second) > 1e-3


def test_vectorized_run_resumed_into_ordinary_runs(trained):
    _, sequential, interrupted, members = trained
    assert interrupted == [("interrupted", 1), ("interrupted", 1)]
    for member in members:
        assert member.status == "finished"
        for name in ("config.json", "summary.json", "metrics.jsonl", "plots"):
            assert os.path.exists(os.path.join(member.workdir, name)), name
        with open(os.path.join(member.workdir, "config.json")) as f:
            assert json.load(f)["seed"] == member.config.seed
    # A vectorised member's checkpoint is an ordinary run's: load_run restores it.
    _, state = train.load_run(members[1].workdir)
    _, reference = train.load_run(os.path.join(sequential, members[1].name))
    assert int(state.step) == int(reference.step) == 6
    leaves = [jax.tree_util.tree_leaves(s) for s in (state, reference)]  # params, Adam, step
    assert len(leaves[0]) == len(leaves[1]) > 2
    for actual, expected in zip(*leaves, strict=True):
        np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-4, atol=1e-6)


def test_members_resumed_from_different_epochs_keep_their_learning_rates(trained, tmp_path):
    """Member 1 trained one epoch alone, then both vectorised: they resume from different
    steps, as two programs of one compiled group whose optimiser has member 0's rate."""
    _, sequential, _, members = trained
    workdir = str(tmp_path / "staggered")
    sweep.run_sweep(_tiny_config(), SWEEP, workdir, member=1, stop_after_epochs=1)
    assert len(_read_metrics(os.path.join(workdir, members[1].name))) == 1
    sweep.run_sweep(_tiny_config(), SWEEP, workdir, vectorize=True)
    for member in members:
        one_by_one = _read_metrics(os.path.join(sequential, member.name))
        together = _read_metrics(os.path.join(workdir, member.name))
        assert len(together) == 3
        for expected, actual in zip(one_by_one, together, strict=True):
            for key, value in expected.items():
                assert actual[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (member.name, key)


def test_results_table_lists_best_validation_first(trained):
    vectorized = trained[0]
    with open(os.path.join(vectorized, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    values = [float(r["best_val_nll"]) for r in rows]
    assert values == sorted(values)
    assert {"seed", "prior.sigma", "optim.learning_rate", "test_nll_at_best_val"} <= rows[0].keys()
    with open(os.path.join(vectorized, "results.md")) as f:
        assert "2 of 2 members finished." in f.read()
    assert os.path.getsize(os.path.join(vectorized, "results.png")) > 0


# A third member, so that 3 members on 2 devices need one padding copy.
THIRD = {"seed": 2, "prior.sigma": 2.0}


def _members_on_devices(workdir: str) -> dict:
    """SWEEP + [THIRD] vectorised in this process (run by the test with 2 CPU devices)."""
    sweep.run_sweep(_tiny_config(), [*SWEEP, THIRD], workdir, vectorize=True)
    members = sweep.make_members(_tiny_config(), [*SWEEP, THIRD], workdir, build=False)
    return {
        "devices": jax.local_device_count(),
        "metrics": [_read_metrics(m.workdir) for m in members],
    }


def test_vectorized_members_spread_over_the_devices(trained, tmp_path, tmp_path_factory):
    """On 2 devices, 3 members run 2 per device (one padding copy) with their one-by-one
    results; the copy's results are not written anywhere."""
    _, sequential, _, members = trained
    third_alone = str(tmp_path_factory.mktemp("third_alone"))
    sweep.run_sweep(_tiny_config(), [*SWEEP, THIRD], third_alone, member=2)
    third = sweep.make_members(_tiny_config(), [*SWEEP, THIRD], third_alone, build=False)[2]
    report, stdout = report_on_fake_cpus("tests.test_sweep:_members_on_devices", str(tmp_path), 2)
    assert "3 members (0, 1, 2) as one program over 2 devices, 2 each, padded with 1 copy" in (
        stdout
    )
    assert report["devices"] == 2
    alone = [os.path.join(sequential, m.name) for m in members] + [third.workdir]
    for workdir, together in zip(alone, report["metrics"], strict=True):
        one_by_one = _read_metrics(workdir)
        assert len(together) == len(one_by_one) == 3
        for expected, actual in zip(one_by_one, together, strict=True):
            for key, value in expected.items():
                assert actual[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (workdir, key)
    third_loss = report["metrics"][2][-1]["train/loss"]
    assert third_loss != report["metrics"][0][-1]["train/loss"]
    folders = [name for name in os.listdir(tmp_path) if os.path.isdir(tmp_path / name)]
    assert sorted(folders) == sorted(sweep.member_names([*SWEEP, THIRD]))


def test_member_layout_pads_to_whole_members_per_device():
    devices = ["d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7"]
    cases = {1: (None, 1), 3: (3, 3), 8: (8, 8), 9: (5, 10), 27: (7, 28), 32: (8, 32)}
    for members, (used, padded) in cases.items():
        layout = sweep._MemberLayout.make(members, devices)
        assert (layout.mesh.size if layout.mesh else None, layout.padded) == (used, padded)
    assert sweep._MemberLayout.make(5, ["d0"]).mesh is None


def _compare_priors(fixed, learnable):
    """A jitted comparison of `fixed` and its traced form, one compile per prior."""

    def traced(hyperparameters):
        return sweep.TracedPrior(learnable, hyperparameters)

    @jax.jit
    def compare(w, hyperparameters):
        return {
            "log_prob": (fixed.log_prob({}, w), traced(hyperparameters).log_prob({}, w)),
            "grad_w": (
                jax.grad(lambda v: fixed.log_prob({}, v))(w)["a"],
                jax.grad(lambda v: traced(hyperparameters).log_prob({}, v))(w)["a"],
            ),
            # Its hyperparameters get no gradient: fixed, as in the one-by-one run.
            "grad_hyperparameters": jax.grad(lambda h: traced(h).log_prob({}, w))(hyperparameters),
        }

    return compare


def test_traced_prior_is_the_fixed_prior_and_is_not_trained():
    """The vectorised program's prior: the fixed prior's log-density, KL and weight gradient."""
    rng = np.random.default_rng(0)
    w = {"a": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.float32(0.3)}
    posterior = numpy_posterior(w, (-4.0, -1.0))
    for fields in (
        {"name": "gaussian", "sigma": 0.5},
        {"name": "scale_mixture", "pi": 0.25, "sigma1": 1.0, "sigma2": math.exp(-7)},
    ):
        fixed = make_prior(fields)
        learnable = make_prior({**fields, "learnable": True})
        hyperparameters = learnable.init_params()

        result = _compare_priors(fixed, learnable)(w, hyperparameters)
        np.testing.assert_allclose(*result["log_prob"], rtol=1e-6)
        np.testing.assert_allclose(*result["grad_w"], rtol=1e-5)
        assert all(
            float(g) == 0.0 for g in jax.tree_util.tree_leaves(result["grad_hyperparameters"])
        )
        if fixed.has_closed_form_kl:
            traced = sweep.TracedPrior(learnable, hyperparameters)
            assert float(traced.kl({}, posterior)) == pytest.approx(float(fixed.kl({}, posterior)))


def test_member_experiment_scales_learning_rate_and_temperature():
    """Temperature T: the KL weight times T (the logged weight stays π_i); rate: updates × s."""
    calls = []

    def free_energy(params, batch, key, kl_weight):
        calls.append(kl_weight)
        return jnp.float32(0.0), {"kl_weight": jnp.float32(kl_weight)}

    free_energy.prior = make_prior({"name": "flat"})
    base = train.Experiment(None, None, free_energy, optax.sgd(0.1), 100, 10, (1,))
    hyperparameters = sweep.MemberHyperparameters(jnp.float32(0.5), jnp.float32(0.25), {})
    member = sweep.member_experiment(base, hyperparameters)
    _, metrics = member.free_energy({}, None, None, jnp.float32(0.2))
    assert float(calls[0]) == pytest.approx(0.05)
    assert float(metrics["kl_weight"]) == pytest.approx(0.2)
    params = {"w": jnp.ones(3)}
    updates, _ = member.optimizer.update({"w": jnp.ones(3)}, member.optimizer.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.05 * np.ones(3), rtol=1e-6)


def test_members_that_differ_in_structure_are_grouped(tmp_path):
    config = _tiny_config()
    members = sweep.make_members(
        config,
        [
            {"seed": 1},
            {"model.hidden_sizes": (8, 8)},
            {"prior.sigma": 0.3, "optim.learning_rate": 0.1},
            {"objective.num_samples": 2, "seed": 2},
        ],
        str(tmp_path / "sweep"),
        build=False,
    )
    groups = sweep.group_members(members)
    assert [[m.index for m in group] for group in groups] == [[0, 2], [1], [3]]


def test_one_abstract_trace_per_program_structure(tmp_path, monkeypatch):
    # Members that differ only in vectorisable numbers share a trace; every other member is
    # traced, so a layer/estimator mismatch in any structure is still caught before compute.
    traced = []
    real = train.trace_step
    monkeypatch.setattr(train, "trace_step", lambda e: traced.append(e) or real(e))
    entries = [{"seed": s, "prior.sigma": v} for s in (0, 1) for v in (0.5, 1.0)]
    sweep.make_members(_tiny_config(), entries, str(tmp_path / "a"))
    assert len(traced) == 1
    entries.append({"model.hidden_sizes": (8, 8)})
    sweep.make_members(_tiny_config(), entries, str(tmp_path / "b"))
    assert len(traced) == 3
    bad = [{"seed": 1}, {"model.name": "lenet"}]  # A CNN on 1-D inputs.
    with pytest.raises(ConfigError, match=r"sweep\[1\]\.model\.name='lenet'.*shape \(1,\)"):
        sweep.make_members(_tiny_config(), bad, str(tmp_path / "c"))


# Names, listing, job arrays, skipping and collecting -------------------------------------


def test_member_names_are_readable_safe_and_distinct():
    names = sweep.member_names(mnist_config.get_sweep())
    assert names[0] == "prior.pi=0.25,prior.sigma1=1,prior.sigma2=0.00248"
    assert names[1] == "prior.pi=0.25,prior.sigma1=1,prior.sigma2=0.000912"
    assert len(set(names)) == 27
    close = sweep.member_names([{"optim.learning_rate": 1e-3}, {"optim.learning_rate": 1.0001e-3}])
    assert close == ["optim.learning_rate=0.001", "optim.learning_rate=0.0010001"]
    odd = sweep.member_names([{}, {"prior.name": "../a/b:c"}, {"model.hidden_sizes": (8, 4)}])
    assert odd == ["base", "prior.name=.._a_b_c", "model.hidden_sizes=8x4"]
    long = sweep.member_names([{"data.data_dir": "x" * 300}])[0]
    assert len(long) <= 120 and "/" not in long


def test_list_prints_every_member_with_its_sub_workdir(tmp_path, capsys):
    workdir = str(tmp_path / "sweep")
    text = sweep.run_sweep(
        regression_config.get_config(), regression_config.get_sweep(), workdir, list_only=True
    )
    lines = text.splitlines()
    assert len(lines) == 8
    index, path, status = lines[2].split("\t")
    assert (index, status) == ("2", "new")
    assert path == os.path.join(workdir, "optim.learning_rate=0.01,prior.sigma=0.368,seed=0")
    assert not os.path.exists(workdir)  # Listing writes nothing.
    assert capsys.readouterr().out.strip() == text


@pytest.fixture
def fake_training(monkeypatch):
    """train_and_evaluate replaced by a stub that writes a finished run at once."""
    calls = []

    def fake(config, workdir, **kwargs):
        del kwargs
        calls.append(os.path.basename(workdir))
        os.makedirs(workdir, exist_ok=True)
        nll = 1.0 / config.prior.sigma + config.seed
        record = {"step": 2, "epoch": 1, "eval/val_nll": nll}
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps(record) + "\n")
        summary = {
            "best_val_error": nll,
            "test_error_at_best_val": nll + 0.1,
            "best_epoch": 1,
            "epochs": config.num_epochs,
        }
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f)
        return summary

    monkeypatch.setattr(train, "train_and_evaluate", fake)
    monkeypatch.delenv(sweep.SLURM_TASK_VARIABLE, raising=False)
    return calls


FAKE_SWEEP = [{"prior.sigma": 0.5}, {"prior.sigma": 2.0}, {"prior.sigma": 1.0, "seed": 3}]


def test_member_flag_and_slurm_task_run_one_member(tmp_path, fake_training, monkeypatch):
    workdir = str(tmp_path / "sweep")
    sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir, member=1)
    assert fake_training == ["prior.sigma=2"]
    monkeypatch.setenv(sweep.SLURM_TASK_VARIABLE, "2")
    sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir)
    assert fake_training == ["prior.sigma=2", "prior.sigma=1,seed=3"]
    sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir, member=0)  # The flag wins.
    assert fake_training[-1] == "prior.sigma=0.5"


def test_finished_members_are_skipped(tmp_path, fake_training):
    workdir = str(tmp_path / "sweep")
    sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir, member=2)
    sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir)
    assert sorted(fake_training) == sorted(sweep.member_names(FAKE_SWEEP))
    assert fake_training.count("prior.sigma=1,seed=3") == 1
    runs = [os.path.join(workdir, name) for name in sweep.member_names(FAKE_SWEEP)]
    before = [_digest(run) for run in runs]
    sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir, vectorize=True)
    # Nothing left to train, vectorised or not (a vectorised run would rewrite the members'
    # files; it does not call the stub).
    assert len(fake_training) == 3
    assert [_digest(run) for run in runs] == before


def test_a_summary_of_fewer_epochs_is_not_finished(tmp_path, fake_training):
    workdir = str(tmp_path / "sweep")
    sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir)
    longer = _tiny_config()
    longer.num_epochs += 2  # Resumable: the members' 3-epoch summaries are now stale.
    text = sweep.run_sweep(longer, FAKE_SWEEP, workdir, collect=True)
    assert "0 of 3 members finished" in text
    assert [m.finished for m in sweep.make_members(longer, FAKE_SWEEP, workdir, build=False)] == [
        False
    ] * 3


def test_members_keep_their_recorded_names_when_the_sweep_grows(tmp_path, fake_training):
    workdir = str(tmp_path / "sweep")
    grid = [{"optim.learning_rate": 0.0012345}, {"optim.learning_rate": 0.01}]
    sweep.run_sweep(_tiny_config(), grid, workdir)
    assert fake_training == ["optim.learning_rate=0.00123", "optim.learning_rate=0.01"]
    # Alone, the grown sweep would widen the first name to 0.001234; it keeps its folder.
    grown = [*grid, {"optim.learning_rate": 0.0012349}]
    assert sweep.member_names(grown)[0] == "optim.learning_rate=0.001234"
    sweep.run_sweep(_tiny_config(), grown, workdir)
    assert fake_training[2:] == ["optim.learning_rate=0.001235"]  # Only the new one trains.
    # A new member whose name a recorded member holds gets a suffix instead.
    clash = [*grid, {"optim.learning_rate": 0.00123}]
    names = [m.name for m in sweep.make_members(_tiny_config(), clash, workdir, build=False)]
    assert names[:2] == fake_training[:2]
    assert names[2].startswith("optim.learning_rate=0.00123-") and len(set(names)) == 3


def test_collect_tolerates_missing_and_unfinished_members(tmp_path, fake_training):
    workdir = str(tmp_path / "sweep")
    sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir, member=1)
    sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir, member=0)
    os.makedirs(os.path.join(workdir, "prior.sigma=1,seed=3", "checkpoints"))  # Interrupted.
    text = sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir, collect=True)
    assert "2 of 3 members finished; not finished: 2 (interrupted)." in text
    with open(os.path.join(workdir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["member"] for r in rows] == ["1", "0"]  # NLL 0.5 before NLL 2.
    assert float(rows[0]["test_nll_at_best_val"]) == pytest.approx(0.6)
    assert fake_training == ["prior.sigma=2", "prior.sigma=0.5"]  # Collecting trains nothing.


# Bad sweeps: exit 2, naming the member and field, the workdir untouched ------------------


@pytest.mark.parametrize(
    ("entries", "kwargs", "message"),
    [
        ([{"prior.sigma": 0.5}, {"prior.pie": 0.5}], {}, "sweep[1].prior.pie=0.5"),
        ([{"num_epochs": 2.5}], {}, "sweep[0].num_epochs=2.5"),
        ([{"prior.sigma": "wide"}], {}, "sweep[0].prior.sigma='wide'"),
        ([], {}, "sweep=[]"),
        ({"prior.sigma": 0.5}, {}, "sweep={'prior.sigma': 0.5} is invalid"),
        ([{"prior.sigma": 1}, {"prior.sigma": 1.0}], {}, "same config as sweep[0]"),
        ([{"seed": 0}, {}], {}, "sweep[1]={} is invalid: allowed is members that differ"),
        ([{"prng_impl": "rbg"}], {"vectorize": True}, "sweep[0].prng_impl='rbg'"),
        (["prior.sigma=0.5"], {}, "sweep[0]='prior.sigma=0.5'"),
        ([{"prior.sigma": 0.5}, {"prior.sigma": -1.0}], {}, "sweep[1].prior.sigma=-1.0"),
        ([{"batch_size": 5000}], {}, "sweep[0].batch_size=5000"),
        (FAKE_SWEEP, {"member": 3}, "--member=3"),
        (FAKE_SWEEP, {"member": 0, "vectorize": True}, "--vectorize"),
    ],
)
def test_bad_sweep_exits_2_naming_the_field(tmp_path, capsys, entries, kwargs, message):
    from bbb import cli

    workdir = tmp_path / "sweep"
    (workdir / "prior.sigma=0.5").mkdir(parents=True)
    (workdir / "prior.sigma=0.5" / "notes.txt").write_text("keep")
    before = _digest(str(workdir))
    with pytest.raises(SystemExit) as exit_info:
        cli.run_or_exit(lambda: sweep.run_sweep(_tiny_config(), entries, str(workdir), **kwargs))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert _digest(str(workdir)) == before


def test_slurm_task_that_is_not_an_integer_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv(sweep.SLURM_TASK_VARIABLE, "x")
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_ID='x'"):
        sweep.run_sweep(_tiny_config(), FAKE_SWEEP, str(tmp_path / "s"))


def _sweep_script(config_file, workdir, *flags) -> subprocess.CompletedProcess:
    """scripts/sweep.py with a config file, a workdir and `flags`, run from the repo."""
    return subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "sweep.py"),
            f"--config={config_file}",
            f"--workdir={workdir}",
            *flags,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )


def test_script_reads_get_sweep_and_exits_2_on_a_bad_one(tmp_path):
    config_file = tmp_path / "bad_sweep.py"
    config_file.write_text(
        "from configs.regression import get_config\n\n\n"
        "def get_sweep():\n    return [{'prior.sigma': 0.5}, {'optim.learning_rat': 1e-3}]\n"
    )
    result = _sweep_script(config_file, tmp_path / "sweep", "--list")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "sweep[1].optim.learning_rat" in result.stderr
    assert "did you mean 'optim.learning_rate'" in result.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--list"], "--list"),
        (["--collect"], "--collect"),
        (["--member=0"], "--member"),
        (["--benchmark_repeats=0"], "--benchmark_repeats"),
        # Refused before the one-by-one half trains every member.
        (["--config.prng_impl=rbg", "--config.num_epochs=1"], "sweep[0].prng_impl"),
    ],
)
def test_benchmark_refuses_flags_it_would_ignore(tmp_path, flags, named):
    """--benchmark trains every member both ways; --list (say) would have been ignored."""
    config_file = os.path.join(REPO, "configs", "regression.py")
    result = _sweep_script(config_file, tmp_path / "sweep", "--benchmark", *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    assert named in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_config_file_path_arg_and_missing_get_sweep():
    get_sweep = sweep.load_get_sweep(os.path.join(REPO, "configs", "regression.py:plain"))
    assert len(get_sweep()) == 8
    with pytest.raises(ConfigError, match="get_sweep"):
        sweep.load_get_sweep(os.path.join(REPO, "configs", "test.py"))


def test_vectorized_learnable_priors_start_from_each_members_own_values(tmp_path):
    """With a learned prior, each member's prior parameters start from its own σ and train
    as in its one-by-one run."""
    config = _tiny_config()
    config.num_epochs = 1
    config.prior.learnable = True
    grid = [{}, {"prior.sigma": 0.25}]
    vectorized, sequential = str(tmp_path / "vectorized"), str(tmp_path / "sequential")
    sweep.run_sweep(config, grid, vectorized, vectorize=True)
    sweep.run_sweep(config, grid, sequential)
    priors = []
    for name in sweep.member_names(grid):
        together, one_by_one = (
            train.load_run(os.path.join(root, name))[1].params["prior"]
            for root in (vectorized, sequential)
        )
        for actual, expected in zip(
            jax.tree_util.tree_leaves(together), jax.tree_util.tree_leaves(one_by_one), strict=True
        ):
            np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5)
        priors.append(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(together)]))
    assert priors[0].size and np.max(np.abs(priors[0] - priors[1])) > 0.5  # log 1 vs log ¼


def test_classification_results_are_in_percent(tmp_path):
    workdir = str(tmp_path / "sweep")
    members = sweep.make_members(_tiny_config(), FAKE_SWEEP, workdir, build=False)
    for member, error in zip(members, (0.015, 0.0125, 0.02), strict=True):
        os.makedirs(member.workdir)
        summary = {
            "test_error": error,
            "best_val_error": error,
            "test_error_at_best_val": error + 0.001,
            "best_epoch": 2,
            "epochs": member.config.num_epochs,
        }
        with open(os.path.join(member.workdir, "summary.json"), "w") as f:
            json.dump(summary, f)
    text = sweep.write_results(workdir, members)
    header, _, first, *_ = text.splitlines()
    assert "best_val_error (%)" in header and "test_error_at_best_val (%)" in header
    cells = [c.strip() for c in first.strip("|").split("|")]
    assert cells[0] == "1" and "1.25" in cells and "1.35" in cells  # Best first, × 100.
    with open(os.path.join(workdir, "results.csv")) as f:
        row = next(csv.DictReader(f))
    assert float(row["best_val_error"]) == 0.0125  # The CSV keeps fractions.


def test_a_regression_summary_names_its_choice_by_nll(trained):
    """Regression runs choose the epoch by validation NLL; the summary says so by name."""
    from bbb.workdir import summary_paragraph

    for member in trained[3]:
        summary = sweep.read_summary(member.workdir)
        evaluated = [r for r in _read_metrics(member.workdir) if "eval/val_nll" in r]
        best = min(evaluated, key=lambda r: r["eval/val_nll"])
        assert summary["best_val_nll"] == summary["best_val_error"] == best["eval/val_nll"]
        assert summary["test_nll_at_best_val"] == best["eval/test_nll"]
        assert summary["best_epoch"] == best["epoch"] and "test_rmse" in summary
        assert "best validation NLL" in summary_paragraph(summary, member.workdir)


# Added by the mutation audit -------------------------------------------------------------


def test_recorded_names_follow_the_overrides_when_a_member_is_inserted(tmp_path, fake_training):
    """A member inserted at the front of a grown sweep shifts the indices: the recorded
    names are matched by overrides, not by position, so every old member keeps its folder."""
    workdir = str(tmp_path / "sweep")
    grid = [{"optim.learning_rate": 0.0012345}, {"optim.learning_rate": 0.01}]
    sweep.run_sweep(_tiny_config(), grid, workdir)
    recorded = list(fake_training)
    assert recorded == ["optim.learning_rate=0.00123", "optim.learning_rate=0.01"]
    grown = [{"optim.learning_rate": 0.0012349}, *grid]
    names = [m.name for m in sweep.make_members(_tiny_config(), grown, workdir, build=False)]
    assert names == ["optim.learning_rate=0.001235", *recorded]


def test_a_summary_of_more_epochs_is_finished(tmp_path, fake_training):
    """Members whose summaries cover more epochs than num_epochs are finished, not retrained."""
    workdir = str(tmp_path / "sweep")
    sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir)
    shorter = _tiny_config()
    shorter.num_epochs -= 1
    members = sweep.make_members(shorter, FAKE_SWEEP, workdir, build=False)
    assert [m.finished for m in members] == [True] * 3
    assert "3 of 3 members finished." in sweep.run_sweep(shorter, FAKE_SWEEP, workdir, collect=True)


def test_a_member_folder_without_checkpoints_is_new(tmp_path):
    """Only a checkpoints folder makes a member "interrupted"; a bare sub-workdir is "new"."""
    workdir = str(tmp_path / "sweep")
    members = sweep.make_members(_tiny_config(), FAKE_SWEEP, workdir, build=False)
    os.makedirs(members[0].workdir)
    os.makedirs(os.path.join(members[1].workdir, "checkpoints"))
    assert [m.status for m in members] == ["new", "interrupted", "new"]


def _write_summaries(members, errors, *, classification):
    """A finished summary.json per member with best validation figure `errors[i]`."""
    for member, error in zip(members, errors, strict=True):
        os.makedirs(member.workdir)
        summary = {
            "best_val_error": error,
            "test_error_at_best_val": error + 0.1,
            "best_epoch": 1,
            "epochs": member.config.num_epochs,
        }
        if classification:
            summary["test_error"] = error
        with open(os.path.join(member.workdir, "summary.json"), "w") as f:
            json.dump(summary, f)


def test_results_table_lists_non_finite_members_last(tmp_path):
    """A member whose best validation figure is NaN goes after every finite one."""
    workdir = str(tmp_path / "sweep")
    members = sweep.make_members(_tiny_config(), FAKE_SWEEP, workdir, build=False)
    _write_summaries(members, (math.nan, 0.3, 0.2), classification=False)
    rows, unfinished = sweep.results_table(members)
    assert unfinished == []
    assert [r["member"] for r in rows] == [2, 1, 0]


def test_results_rows_hold_base_values_of_fields_a_member_does_not_override(tmp_path):
    """Every override of any member is a column; a member without it shows the base value."""
    workdir = str(tmp_path / "sweep")
    members = sweep.make_members(_tiny_config(), FAKE_SWEEP, workdir, build=False)
    _write_summaries(members, (0.3, 0.2, 0.1), classification=False)
    sweep.write_results(workdir, members)
    with open(os.path.join(workdir, "results.csv")) as f:
        rows = {r["member"]: r for r in csv.DictReader(f)}
    assert (rows["0"]["seed"], rows["0"]["prior.sigma"]) == ("0", "0.5")
    assert (rows["1"]["seed"], rows["1"]["prior.sigma"]) == ("0", "2.0")
    assert (rows["2"]["seed"], rows["2"]["prior.sigma"]) == ("3", "1.0")


def test_regression_results_are_not_in_percent(tmp_path):
    """NLLs are printed as they are (4 significant digits), with no "(%)" in the header."""
    workdir = str(tmp_path / "sweep")
    members = sweep.make_members(_tiny_config(), FAKE_SWEEP, workdir, build=False)
    _write_summaries(members, (0.5, 0.25, 1.0), classification=False)
    text = sweep.write_results(workdir, members)
    header, _, first, *_ = text.splitlines()
    assert "(%)" not in header
    cells = [c.strip() for c in first.strip("|").split("|")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert cells[columns.index("best_val_nll")] == "0.25"
    assert cells[columns.index("test_nll_at_best_val")] == "0.35"


def test_members_differing_in_any_vectorizable_field_share_one_group(tmp_path):
    """Each of VECTORIZABLE_FIELDS, varied alone, keeps the member in the base's program."""
    entries = [
        {},
        {"seed": 1},
        {"prior.sigma": 0.3},
        {"prior.pi": 0.5},
        {"prior.sigma1": 2.0},
        {"prior.sigma2": 0.01},
        {"optim.learning_rate": 0.1},
        {"objective.kl_temperature": 0.5},
    ]
    members = sweep.make_members(_tiny_config(), entries, str(tmp_path / "s"), build=False)
    assert [[m.index for m in g] for g in sweep.group_members(members)] == [list(range(8))]


def sigma_logistic_prior(sigma: float = 1.0):
    """A user prior (not traceable) that reads the vectorisable field prior.sigma."""
    from tests.custom_prior_module import Logistic

    return Logistic(scale=float(sigma))


def test_untraceable_priors_with_different_hyperparameters_are_not_grouped(tmp_path):
    """A prior the program cannot trace must be equal across a group: members whose user
    prior reads different prior.sigma values get programs of their own."""
    config = _tiny_config()
    config.prior.name = "tests.test_sweep:sigma_logistic_prior"
    entries = [{}, {"prior.sigma": 0.5}, {"seed": 1}]
    members = sweep.make_members(config, entries, str(tmp_path / "s"), build=False)
    assert [[m.index for m in g] for g in sweep.group_members(members)] == [[0, 2], [1]]


def test_collect_refuses_a_missing_sweep_folder(tmp_path):
    """--collect on a folder that does not exist is an error and creates nothing."""
    from bbb.workdir import WorkdirError

    workdir = str(tmp_path / "missing")
    with pytest.raises(WorkdirError, match="holds no sweep to collect"):
        sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir, collect=True)
    assert not os.path.exists(workdir)


def test_a_negative_member_index_is_refused(tmp_path, fake_training):
    """--member=-1 is out of range, not Python's "last member"; nothing trains."""
    with pytest.raises(ConfigError, match=r"--member=-1"):
        sweep.run_sweep(_tiny_config(), FAKE_SWEEP, str(tmp_path / "s"), member=-1)
    assert fake_training == []


def test_list_needs_no_usable_sweep_folder(tmp_path):
    """--list writes nothing, so a sweep folder whose parent does not exist yet is listed
    (all members "new") rather than refused."""
    workdir = str(tmp_path / "not" / "yet" / "sweep")
    text = sweep.run_sweep(_tiny_config(), FAKE_SWEEP, workdir, list_only=True)
    assert [line.split("\t")[2] for line in text.splitlines()] == ["new"] * 3
    assert not os.path.exists(tmp_path / "not")


def test_vectorized_members_evaluate_and_save_on_their_periods(tmp_path):
    """With eval.every_epochs=2 and checkpoint_every_epochs=2 over 3 epochs (2 steps each), a
    vectorised member is evaluated and checkpointed after epochs 2 and 3 (the last), as
    `train.train_and_evaluate` does; not after epoch 1."""
    config = _tiny_config()
    config.eval.every_epochs = 2
    config.checkpoint_every_epochs = 2
    workdir = str(tmp_path / "sweep")
    sweep.run_sweep(config, [{}, {"seed": 1}], workdir, vectorize=True)
    for member in sweep.make_members(config, [{}, {"seed": 1}], workdir, build=False):
        records = _read_metrics(member.workdir)
        assert [r["epoch"] for r in records] == [1, 2, 3]
        assert [r["epoch"] for r in records if "eval/val_nll" in r] == [2, 3]
        steps = sorted(int(s) for s in os.listdir(os.path.join(member.workdir, "checkpoints")))
        assert steps == [4, 6]
