"""Tests of the mushroom bandit (bbb/bandit.py) and its loader (bbb/data/mushroom.py).

Everything runs on data the tests make: a tiny mushroom file, and a synthetic bandit whose
contexts say outright whether a mushroom is poisonous.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import urllib.error

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbb import bandit
from bbb.data import DataError, mushroom
from bbb.errors import ConfigError
from bbb.workdir import WorkdirError, check_workdir, read_records
from configs import bandit_mushroom
from tests.conftest import REPO, report_on_fake_cpus, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = bandit.Rewards()


# Rewards and regret -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "poisonous, action, bad, reward, regret, expected_regret",
    [
        (0, bandit.EAT, False, 5.0, 0.0, 0.0),  # Edible, eaten: the oracle's choice.
        (0, bandit.PASS, False, 0.0, 5.0, 5.0),  # Edible, passed: 5 lost.
        (1, bandit.PASS, True, 0.0, 0.0, 0.0),  # Poisonous, passed: the oracle's choice.
        (1, bandit.EAT, True, -35.0, 35.0, 15.0),  # Poisonous, eaten, ill.
        (1, bandit.EAT, False, 5.0, -5.0, 15.0),  # Poisonous, eaten, lucky: realised regret < 0.
    ],
)
def test_step_rewards_by_hand(poisonous, action, bad, reward, regret, expected_regret):
    out = bandit.step_rewards(PAPER, jnp.int32(poisonous), jnp.int32(action), jnp.bool_(bad))
    assert float(out["reward"]) == reward
    assert float(out["regret"]) == regret
    assert float(out["expected_regret"]) == expected_regret
    assert float(out["oracle_reward"]) == (0.0 if poisonous else 5.0)


def test_poisonous_meal_is_minus_35_half_the_time():
    problem = bandit.Problem(contexts=jnp.zeros((4, 1)), poisonous=jnp.ones((4,), jnp.int32))
    steps = jnp.arange(20_000)
    draw = jax.jit(jax.vmap(lambda t: bandit.draw_mushroom(PAPER, problem, jax.random.key(3), t)))
    index, bad = draw(steps)
    out = bandit.step_rewards(PAPER, problem.poisonous[index], jnp.full_like(index, 1), bad)
    rewards = np.asarray(out["reward"])
    assert set(np.unique(rewards)) == {-35.0, 5.0}
    # Binomial(20000, 1/2): the standard error of the fraction is 0.0035.
    assert abs(np.mean(rewards == -35.0) - 0.5) < 0.015
    assert abs(rewards.mean() + 15.0) < 0.6  # E[r] = ½(−35) + ½(5) = −15.
    # The mushrooms are uniform over the rows.
    assert np.all(np.abs(np.bincount(np.asarray(index), minlength=4) / 20_000 - 0.25) < 0.015)


def test_the_bad_outcome_has_its_configured_probability():
    """Away from ½, p and 1 − p differ: the chance of −35, its expectation and the oracle."""
    rewards = bandit.Rewards(poisonous_bad_probability=0.25)
    assert rewards.expected_poisonous() == -5.0  # ¼(−35) + ¾(5)
    problem = bandit.Problem(contexts=jnp.zeros((4, 1)), poisonous=jnp.ones((4,), jnp.int32))
    draw = jax.jit(jax.vmap(lambda t: bandit.draw_mushroom(rewards, problem, jax.random.key(3), t)))
    index, bad = draw(jnp.arange(20_000))
    out = bandit.step_rewards(rewards, problem.poisonous[index], jnp.full_like(index, 1), bad)
    # Binomial(20000, 1/4): the standard error of the fraction is 0.0031.
    assert abs(np.mean(np.asarray(out["reward"]) == -35.0) - 0.25) < 0.015
    np.testing.assert_array_equal(np.asarray(out["expected_regret"]), 5.0)  # The oracle passes.
    # A poison that costs 1 when it goes badly is worth eating (½(−1) + ½(5) = 2): the oracle
    # eats it, so passing has expected regret 2 and, after a bad outcome, realised regret −1.
    mild = bandit.Rewards(poisonous_bad=-1.0)
    out = bandit.step_rewards(mild, jnp.int32(1), jnp.int32(bandit.PASS), jnp.bool_(True))
    assert float(out["oracle_reward"]) == -1.0
    assert float(out["regret"]) == -1.0
    assert float(out["expected_regret"]) == 2.0


@pytest.mark.parametrize(
    "rewards, poisonous, action, reward, oracle_reward, regret, expected_regret",
    [
        # ½(−5) + ½(5) = 0: a poisonous meal is worth nothing on average, so the oracle passes
        # and an ill-fated meal costs its −5 in full (realised regret 5, expected regret 0).
        (bandit.Rewards(poisonous_bad=-5.0), 1, bandit.EAT, -5.0, 0.0, 5.0, 0.0),
        (bandit.Rewards(poisonous_bad=-5.0), 1, bandit.PASS, 0.0, 0.0, 0.0, 0.0),
        # An edible mushroom worth −1 (a table `build` refuses, but `Rewards` takes): the
        # oracle passes it, so eating it has regret 1, realised and expected.
        (bandit.Rewards(edible=-1.0), 0, bandit.EAT, -1.0, 0.0, 1.0, 1.0),
    ],
)
def test_the_oracle_eats_only_where_the_expected_reward_is_positive(
    rewards, poisonous, action, reward, oracle_reward, regret, expected_regret
):
    """Not where it is 0 (a tie is a pass, as the agents' is), and by the table's numbers, not
    by the class alone: hand-worked, with the outcome of a poisonous meal the bad one."""
    out = bandit.step_rewards(rewards, jnp.int32(poisonous), jnp.int32(action), jnp.bool_(True))
    assert float(out["reward"]) == reward
    assert float(out["oracle_reward"]) == oracle_reward
    assert float(out["regret"]) == regret
    assert float(out["expected_regret"]) == expected_regret


# The buffer -------------------------------------------------------------------------------


def test_buffer_is_a_ring_of_the_last_interactions():
    buffer = bandit.Buffer.empty(3)
    assert int(buffer.size()) == 0
    assert np.all(np.asarray(buffer.sample(jax.random.key(0), 5)) == 0)
    for i in range(5):
        buffer = buffer.add(jnp.int32(10 + i), jnp.int32(i % 2), jnp.float32(i))
        assert int(buffer.size()) == min(i + 1, 3)
    assert int(buffer.count) == 5
    # Interaction c sits at slot c mod 3: slots hold interactions 3, 4, 2.
    np.testing.assert_array_equal(buffer.context_index, [13, 14, 12])
    np.testing.assert_array_equal(buffer.action, [1, 0, 0])
    np.testing.assert_array_equal(buffer.reward, [3.0, 4.0, 2.0])
    slots = np.asarray(buffer.sample(jax.random.key(1), 1000))
    assert slots.min() == 0 and slots.max() == 2


def test_buffer_samples_only_filled_slots():
    buffer = bandit.Buffer.empty(8).add(jnp.int32(1), jnp.int32(1), jnp.float32(5.0))
    buffer = buffer.add(jnp.int32(2), jnp.int32(0), jnp.float32(0.0))
    slots = np.asarray(buffer.sample(jax.random.key(0), 500))
    assert set(np.unique(slots)) == {0, 1}


# The loader -------------------------------------------------------------------------------

ROWS = [
    "p,x,s,n,t,p,f,c,n,k,e,e,s,s,w,w,p,w,o,p,k,s,u",
    "e,x,s,y,t,a,f,c,b,k,e,c,s,s,w,w,p,w,o,p,n,n,g",
    "e,b,s,w,t,l,f,c,b,n,e,?,s,s,w,w,p,w,o,p,n,n,m",
]


def _write(path, rows):
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_loader_one_hot_and_labels(tmp_path):
    data = mushroom.load_mushroom(_write(tmp_path / mushroom.FILENAME, ROWS), num_rows=3)
    # Distinct values per column: column 1 {x, b}, 3 {n, y, w}, 5 {p, a, l}, ... one block each.
    table = np.asarray([r.split(",") for r in ROWS])
    width = sum(len(set(table[:, j])) for j in range(1, 23))
    assert data.features.shape == (3, width) and data.features.dtype == np.float32
    assert np.all(data.features.sum(axis=1) == 22)  # One 1 per attribute.
    np.testing.assert_array_equal(data.poisonous, [1, 0, 0])
    assert data.categories[0] == ("b", "x")
    assert "?" in data.categories[10]  # A missing stalk-root is a category of its own.
    np.testing.assert_array_equal(data.features[:, :2], [[0, 1], [0, 1], [1, 0]])


def test_loader_finds_the_file_in_a_folder(tmp_path):
    _write(tmp_path / mushroom.FILENAME, ROWS)
    assert mushroom.resolve_path(str(tmp_path)) == str(tmp_path / mushroom.FILENAME)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape(f"folder {empty} holds no")):
        mushroom.resolve_path(str(empty))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([*ROWS[:2], "e,x,s"], "row 3: 3 columns, expected 23"),
        ([ROWS[0], "x" + ROWS[1][1:]], "row 2: class 'x', expected 'e' or 'p'"),
        ([], "is empty"),
    ],
)
def test_loader_rejects_bad_files(tmp_path, rows, message):
    path = _write(tmp_path / "bad.data", rows)
    with pytest.raises(DataError, match=message) as error:
        mushroom.load_mushroom(path, num_rows=None)
    assert path in str(error.value)


def test_loader_checks_the_row_count(tmp_path):
    path = _write(tmp_path / "short.data", ROWS)
    with pytest.raises(DataError, match=re.escape(f"{path} has 3 rows, expected 8124")):
        mushroom.load_mushroom(path)


def test_missing_file_and_offline_fetch_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        mushroom.resolve_path(str(tmp_path / "nope.data"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(mushroom.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=re.escape("--config.data.path")):
        mushroom.resolve_path("", cache_dir=str(tmp_path / "cache"))


# The agents -------------------------------------------------------------------------------


def small_config(**overrides):
    """The paper's config, shrunk to a synthetic problem that runs in seconds."""
    config = bandit_mushroom.get_config()
    config.num_seeds = 2
    config.num_steps = 240
    config.chunk_steps = 120
    config.buffer_size = 256
    config.num_updates = 8
    config.batch_size = 16
    config.model.hidden_sizes = (16,)
    config.prior.sigma = 0.3
    # Adam learns the tiny problems below in a few steps, and its state counts them; the
    # config's own optimiser is tested on its own (test_thompson_sampling_learns...).
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-2
    config.progress = False
    config.update_from_flattened_dict(overrides)
    return config


def synthetic_problem(num_rows: int = 40) -> bandit.Problem:
    """A bandit whose context shows the class: feature 0 for edible, feature 1 for poisonous."""
    poisonous = np.arange(num_rows) % 2
    contexts = np.eye(2, dtype=np.float32)[poisonous]
    return bandit.Problem(contexts=jnp.asarray(contexts), poisonous=jnp.asarray(poisonous))


# The config's own optimiser, KL weight and 64 steps per round (SGD at 10⁻² needs more steps
# than Adam on this problem, and diverges from 2·10⁻²). On this tiny problem either optimiser
# stalls on some streams (an early −35 and no sample that says eat again, as greedy does on
# mushrooms), so the test keeps to the config's seed 0, on which both learn.
_CONFIG = bandit_mushroom.get_config()
_CONFIG_UPDATE = {
    "optim.name": _CONFIG.optim.name,
    "objective.kl_data_size": _CONFIG.objective.kl_data_size,
    "num_updates": _CONFIG.num_updates,
}


@pytest.mark.parametrize("update", [{}, _CONFIG_UPDATE], ids=["adam", "the_configs"])
def test_thompson_sampling_learns_and_beats_uniform(tmp_path, update):
    # ε = 1: a uniformly random agent.
    config = small_config(**{"agents.epsilons": (1.0,), **update})
    results = bandit.bandit_experiment(config, str(tmp_path), problem=synthetic_problem())
    data = np.load(tmp_path / "regret.npz")
    names = list(data["names"])
    assert names == ["BBB (Thompson)", "ε-greedy 100%"]
    expected = data["expected_regret"]  # [A, S, T]
    assert expected.shape == (2, 2, 240)
    thompson_early = expected[0, :, :40].mean()
    thompson_late = expected[0, :, -80:].mean()
    uniform = expected[1].mean()
    # Uniform: ½ · 5 (pass an edible) + ½ · 15 (eat a poisonous) per step on average = 5.
    assert 3.5 < uniform < 6.5
    assert thompson_late < 0.5 * thompson_early
    assert thompson_late < 0.4 * uniform
    # The outputs the issue asks for.
    for name in ("results.json", "results.md", "config.json", "metrics.jsonl", "plots/regret.png"):
        assert os.path.exists(tmp_path / name), name
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    bbb = saved["agents"]["BBB (Thompson)"]
    assert bbb == results["agents"]["BBB (Thompson)"]
    per_seed = data["regret"][0].sum(axis=-1)
    assert bbb["cumulative_regret_per_seed"] == pytest.approx(per_seed.tolist())
    assert bbb["cumulative_regret_mean"] == pytest.approx(per_seed.mean())
    assert bbb["cumulative_regret_std"] == pytest.approx(per_seed.std())
    for i, name in enumerate(names):  # The share of EAT among the agent's actions.
        eaten = (data["action"][i] == bandit.EAT).mean()
        assert saved["agents"][name]["eat_fraction"] == pytest.approx(eaten)


def test_thompson_acts_on_a_posterior_sample_and_otherwise_on_the_mean():
    """Thompson: both actions' values from one w ~ q, the network of `posterior.sample(key)`;
    otherwise the network of the posterior mean."""
    experiment = bandit.build(small_config())
    learner = experiment.thompson
    state = bandit.init_agent(experiment, learner, jax.random.key(0), True, 2)
    features = jnp.asarray([1.0, 0.0])
    sampled = [
        np.asarray(learner.values(state.params, features, jax.random.key(k))) for k in (1, 2)
    ]
    assert not np.allclose(sampled[0], sampled[1])
    assert np.array_equal(sampled[0], learner.values(state.params, features, jax.random.key(1)))
    inputs = bandit.network_inputs(jnp.stack([features, features]), jnp.arange(2))
    weights = state.params["posterior"].sample(jax.random.key(1))  # One sample for both actions.
    np.testing.assert_allclose(
        sampled[0], learner.model.apply({"params": weights}, inputs)[:, 0], rtol=1e-6
    )
    on_mean = dataclasses.replace(learner, thompson=False)
    mean = [np.asarray(on_mean.values(state.params, features, jax.random.key(k))) for k in (1, 2)]
    np.testing.assert_array_equal(mean[0], mean[1])
    weights = state.params["posterior"].mean()
    np.testing.assert_allclose(mean[0], learner.model.apply({"params": weights}, inputs)[:, 0])


class _ReportKLWeight:
    """A free energy that reports the KL weight it was called with as its "kl" metric."""

    def __init__(self, free_energy):
        self.free_energy = free_energy

    def __call__(self, params, batch, key, kl_weight):
        loss, metrics = self.free_energy(params, batch, key, kl_weight)
        return loss, {**metrics, "kl": jnp.asarray(kl_weight, jnp.float32)}


@pytest.mark.parametrize(
    "kl_data_size, count, expected",
    [
        ("buffer", 300, 1 / 256),
        ("interactions", 300, 1 / 300),
        ("buffer", 100, 1 / 100),  # Not yet full: what it holds, not its capacity.
        ("interactions", 100, 1 / 100),
    ],
)
def test_kl_weight_is_one_over_the_buffer_or_the_interactions(kl_data_size, count, expected):
    """After `count` interactions in a buffer of 256: 1/N with N = min(count, 256) (the
    buffer's) or count."""
    experiment = bandit.build(small_config(**{"objective.kl_data_size": kl_data_size}))
    learner = experiment.thompson
    reporting = dataclasses.replace(learner, free_energy=_ReportKLWeight(learner.free_energy))
    state = bandit.init_agent(experiment, learner, jax.random.key(0), True, 2)
    assert state.buffer.capacity == 256
    state = state.replace(buffer=state.buffer.replace(count=jnp.int32(count)))
    contexts = synthetic_problem().contexts
    _, metrics = jax.jit(reporting.update)(state, contexts, jax.random.key(1))
    assert float(metrics["kl"]) == pytest.approx(expected, rel=1e-6)


def test_summary_per_seed_and_second_half_rate():
    # One agent, two seeds, five steps: totals 15 and 3; the second half is the last 3 steps.
    regret = np.array([[[1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 1.0, 1.0, 1.0]]], np.float32)
    expected = 2.0 * regret
    summary = bandit.summarize(["a"], regret, expected)["a"]
    assert summary["cumulative_regret_per_seed"] == [15.0, 3.0]
    assert summary["cumulative_regret_mean"] == 9.0
    assert summary["cumulative_regret_std"] == 6.0  # Over seeds, ddof 0.
    assert summary["cumulative_expected_regret_per_seed"] == [30.0, 6.0]
    assert summary["second_half_regret_per_step_per_seed"] == pytest.approx([4.0, 1.0])
    table = bandit.results_table({"a": summary}, 5, 2)
    assert "| a | 9 ± 6 | 18 ± 12 | 15, 3 | 4.000, 1.000 |\n" in table
    assert "wrong_meals_per_seed" not in summary and "wrong meals" not in table


def test_summary_counts_wrong_meals_and_wrong_passes_by_the_expected_regret():
    """A meal the oracle would pass (expected regret 15) is wrong even when it went well (its
    realised regret −5); a pass is wrong where the oracle eats (5); the oracle's own choices
    have expected regret 0. Seed 0 makes 2 wrong meals and 1 wrong pass, seed 1 the reverse."""
    eat, pass_ = bandit.EAT, bandit.PASS
    actions = np.array([[[eat, pass_, eat, pass_, eat], [pass_, pass_, eat, eat, pass_]]])
    expected = np.array([[[0, 5, 15, 0, 15], [5, 0, 0, 15, 5]]], np.float32)
    regret = np.array([[[0, 5, -5, 0, 35], [5, 0, 0, -5, 5]]], np.float32)
    summary = bandit.summarize(["a"], regret, expected, actions)["a"]
    assert summary["wrong_meals_per_seed"] == [2, 1]
    assert summary["wrong_passes_per_seed"] == [1, 2]
    assert summary["eat_fraction"] == 0.5
    table = bandit.results_table({"a": summary}, 5, 2)
    assert "| a | 20 ± 15 | 30 ± 5 | 35, 5 | 10.000, 0.000 | 2, 1 | 1, 2 |\n" in table


def test_eat_fraction_is_the_share_of_meals_over_seeds_and_steps():
    """3 meals of 4 on seed 0 and 2 of 4 on seed 1: 5/8 (not the passes' 3/8, which the
    balanced actions of the test above cannot tell apart)."""
    eat, pass_ = bandit.EAT, bandit.PASS
    actions = np.array([[[eat, eat, eat, pass_], [pass_, eat, pass_, eat]]])
    zeros = np.zeros(actions.shape, np.float32)
    assert bandit.summarize(["a"], zeros, zeros, actions)["a"]["eat_fraction"] == 5 / 8


def _finished_run(path, seed, names, totals, rho=-5.0, optim=None):
    """A finished run's config.json and regret.npz: agent a, seed s loses totals[a][s] in all,
    spread evenly over 4 interactions. Without `optim`, a run saved before its fields existed."""
    os.makedirs(path)
    config = {"seed": seed, "num_seeds": len(totals[0]), "posterior": {"init_rho": rho}}
    if optim is not None:
        config["optim"] = optim
    config["data"] = {"path": str(path)}  # Differs between runs, and is ignored.
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    regret = np.repeat(np.asarray(totals, np.float32)[..., None] / 4, 4, axis=-1)
    np.savez(
        os.path.join(path, "regret.npz"),
        names=np.asarray(names),
        regret=regret,
        expected_regret=regret,
    )
    return str(path)


def test_sign_test_matches_scipy():
    from scipy import stats

    for wins, losses in [(4, 0), (1, 3), (10, 2), (7, 7), (0, 1), (30, 12)]:
        expected = stats.binomtest(wins, wins + losses, 0.5).pvalue
        assert bandit.sign_test(wins, losses) == pytest.approx(expected, rel=1e-12)
    assert bandit.sign_test(0, 0) == 1.0


def test_pooled_runs_pair_agents_seed_by_seed(tmp_path):
    names = [bandit.REFERENCE_AGENT, "ε-greedy 1%"]
    first = _finished_run(tmp_path / "a", 0, names, [[10, 40], [20, 30]])
    second = _finished_run(tmp_path / "b", 1, names, [[12, 50], [11, 60]])
    # Another Bayes by Backprop on seed 1, beside the same ε-greedy agent.
    other = _finished_run(tmp_path / "c", 1, names, [[99, 99], [11, 60]], rho=-3.0)
    pooled = bandit.pool_runs([first, second, f"{other}:greedy"])
    ours, theirs = (pooled["agents"][n] for n in names)
    assert pooled["num_steps"] == 4
    assert {k: r["total"] for k, r in ours.items()} == {
        (0, 0): 10,
        (0, 1): 40,
        (1, 0): 12,
        (1, 1): 50,
    }
    assert theirs[(1, 1)]["total"] == 60  # Kept once: the two runs agree.
    assert pooled["differences"] == {"posterior.init_rho": [-5.0, -5.0, -3.0]}
    # The curves behind the plot: each agent's per-step regret on each seed, from its run.
    assert list(pooled["curves"][names[1]]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    np.testing.assert_array_equal(pooled["curves"][names[0]][(1, 1)][0], [12.5] * 4)
    np.testing.assert_array_equal(pooled["curves"][names[1]][(1, 1)][1], [15.0] * 4)
    table = bandit.pooled_table(pooled)
    # Lower on seeds 0/0, 1/1 (10 < 20, 50 < 60), higher on 0/1 and 1/0: 2 of 4, p = 1, and
    # the agent's regret exceeds ours by (10 - 10 - 1 + 10) / 4 = 2.25 on average.
    assert "| ε-greedy 1% | 4 | 2 of 4 | 1 | +2 |" in table
    assert f"| {bandit.REFERENCE_AGENT} | 4 | 28 ± 17 |" in table
    assert "`posterior.init_rho`: -5.0, -5.0, -3.0" in table
    # The whole of the third run would put two Bayes by Backprops on seed 1.
    with pytest.raises(ConfigError, match=r"regret 12 in .*/b and 99 in .*/c"):
        bandit.pool_runs([first, second, other])
    with pytest.raises(ConfigError, match="finished run"):
        bandit.pool_runs([first, str(tmp_path)])


def test_pooled_table_drops_ties_from_the_sign_test_and_compares_only_other_agents(tmp_path):
    """Five seeds; the agent's regret minus ours is 0, +5, +5, +5, −20: ours lower on 3, a tie,
    higher on 1. The sign test drops the tie (3 of 4, scipy's p), the counts still say "of 5",
    and the mean difference keeps it: (0 + 5 + 5 + 5 − 20) / 5 = −1. Ours is not compared
    with itself. The first table's last column is the mean over seeds of the regret per step
    over the second half: each run spreads its total over 4 steps, so (10 + … + 50) / 5 / 4."""
    from scipy import stats

    names = [bandit.REFERENCE_AGENT, "ε-greedy 1%"]
    run = _finished_run(tmp_path / "a", 0, names, [[10, 20, 30, 40, 50], [10, 25, 35, 45, 30]])
    table = bandit.pooled_table(bandit.pool_runs([run]))
    p = stats.binomtest(3, 4, 0.5).pvalue  # 0.625
    assert f"| ε-greedy 1% | 5 | 3 of 5 | {p:.3g} | -1 |" in table
    per_seed = "0/0: 10, 0/1: 20, 0/2: 30, 0/3: 40, 0/4: 50"
    std = np.std([10, 20, 30, 40, 50])  # ddof 0: √200 = 14.1
    assert f"| {bandit.REFERENCE_AGENT} | 5 | 30 ± {std:.0f} | {per_seed} | 7.500 |" in table
    comparison = table.split("on the seeds both ran:")[1].strip().splitlines()
    assert [line.split(" | ")[0] for line in comparison[2:]] == ["| ε-greedy 1%"]


def test_a_run_saved_before_a_field_existed_pools_and_resumes_as_its_old_value(tmp_path):
    """Runs made before `optim.name` existed used Adam: they pool with Adam runs as one
    configuration, not with SGD ones, and resume under the config that now says "adam"."""
    names = [bandit.REFERENCE_AGENT, "ε-greedy 1%"]
    old = _finished_run(tmp_path / "old", 0, names, [[1, 2], [3, 4]])
    adam = _finished_run(tmp_path / "adam", 1, names, [[1, 2], [3, 4]], optim=_optim("adam"))
    sgd = _finished_run(tmp_path / "sgd", 2, names, [[1, 2], [3, 4]], optim=_optim("sgd"))
    assert bandit.pool_runs([old, adam])["differences"] == {}
    assert bandit.pool_runs([old, sgd])["differences"] == {"optim.name": ["adam", "sgd"]}

    workdir = tmp_path / "resume"
    os.makedirs(workdir)
    saved = json.loads(small_config().to_json())
    del saved["optim"]["name"], saved["optim"]["momentum"]
    (workdir / "config.json").write_text(json.dumps(saved))
    (workdir / "metrics.jsonl").write_text('{"step": 120}\n')  # A run with results.
    check_workdir(str(workdir), small_config(), bandit.RESUMABLE_FIELDS, bandit.ADDED_FIELDS)
    with pytest.raises(WorkdirError, match=r"optim\.name: 'adam' -> 'sgd'"):
        bandit.bandit_experiment(
            small_config(**{"optim.name": "sgd"}), str(workdir), problem=synthetic_problem()
        )
    assert json.loads((workdir / "config.json").read_text()) == saved  # Left as it was.


def _optim(name):
    return {"name": name, "momentum": 0.9}


def test_pool_script_writes_the_table_and_names_a_bad_workdir(tmp_path):
    names = [bandit.REFERENCE_AGENT, "ε-greedy 0%"]
    runs = [_finished_run(tmp_path / f"r{s}", s, names, [[1, 2], [3, 4]]) for s in (0, 1)]
    out = tmp_path / "pooled"
    script = [sys.executable, os.path.join(ROOT, "scripts", "bandit_pool.py")]
    done = subprocess.run(
        [*script, f"--workdirs={','.join(runs)}", f"--out={out}"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| ε-greedy 0% | 4 | 4 of 4 | 0.125 | +2 |" in (out / "pooled.md").read_text()
    assert (out / "pooled.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "pooled.json").read_text())["agents"]["ε-greedy 0%"]["1/1"] == {
        "total": 4.0,
        "expected_total": 4.0,
        "second_half": 1.0,
    }
    bad = subprocess.run(
        [*script, f"--workdirs={runs[0]},{tmp_path / 'nothing'}"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "nothing" in bad.stderr and "finished run" in bad.stderr


def test_pooled_plot_averages_each_agent_over_the_seeds_it_ran(tmp_path, monkeypatch):
    """Bayes by Backprop alone on a third seed: its curve is the mean over three seeds, the
    other agent's over two, and the legend says so."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    names = [bandit.REFERENCE_AGENT, "ε-greedy 1%"]
    both = _finished_run(tmp_path / "a", 0, names, [[8, 16], [40, 80]])
    alone = _finished_run(tmp_path / "b", 1, names[:1], [[36]])
    bandit.plot_pooled(str(tmp_path / "p.png"), bandit.pool_runs([both, alone]))
    (figure,) = figures
    ours, theirs = figure.axes[0].lines
    # Per step 8/4, 16/4, 36/4 = 2, 4, 9 (mean 5); 10 and 20 (mean 15).
    np.testing.assert_allclose(ours.get_ydata(), [5, 10, 15, 20])
    np.testing.assert_allclose(theirs.get_ydata(), [15, 30, 45, 60])
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels == [f"{names[0]} (3 seeds)", f"{names[1]} (2 seeds)"]
    assert figure.axes[0].get_title() == "cumulative regret (mean ± std over seeds)"
    close(figure)


def test_agents_share_what_a_seed_fixes_and_nothing_else():
    """Three seeds, four agents: within a seed every agent has the same environment key (the
    same mushrooms) and the same initial weights; every agent and seed has its own acting
    key; each ε sits in its agent's rows (agent a of seed s at row a·S + s)."""
    experiment = bandit.build(small_config(num_seeds=3))
    thompson, greedy = bandit._families(experiment, synthetic_problem())
    seeds = 3
    assert greedy.names == ["ε-greedy 5%", "ε-greedy 1%", "ε-greedy 0%"]
    env = np.asarray(jax.random.key_data(greedy.env_keys))  # [3 · S, 2]
    np.testing.assert_array_equal(
        env, np.tile(np.asarray(jax.random.key_data(thompson.env_keys)), (3, 1))
    )
    assert len({tuple(row) for row in env[:seeds]}) == seeds
    np.testing.assert_allclose(np.asarray(greedy.epsilons), np.repeat([0.05, 0.01, 0.0], seeds))
    keys = np.concatenate(
        [np.asarray(jax.random.key_data(f.agent_keys)) for f in (thompson, greedy)]
    )
    assert len({tuple(row) for row in keys}) == 4 * seeds
    mu = thompson.states.params["posterior"].mu
    point = greedy.states.params["posterior"].mu
    for leaf_mu, leaf_point in zip(
        jax.tree_util.tree_leaves(mu), jax.tree_util.tree_leaves(point), strict=True
    ):
        for a in range(3):  # Every ε-greedy agent starts where BBB's μ starts, seed by seed.
            np.testing.assert_array_equal(leaf_point[a * seeds : (a + 1) * seeds], leaf_mu)
        if leaf_mu.ndim == 3:  # Kernels [S, in, out] (biases start at 0 on every seed).
            assert not np.array_equal(leaf_mu[0], leaf_mu[1])  # Seeds differ.


def bandit_on_two_devices(workdir: str) -> dict:
    """In a subprocess with 2 fake CPU devices: where each kind's agents are, and the small run's
    outputs in `workdir` (`test_the_agents_are_split_over_the_devices_with_the_same_results`)."""
    layouts = {}
    for name, overrides in {
        "split": {"agents.epsilons": (0.0, 0.5)},  # Stacks of 2 and 4: halves on each device.
        "whole": {"agents.epsilons": (0.0,), "num_seeds": 1},  # Stacks of 1: a device each.
    }.items():
        families = bandit._families(bandit.build(small_config(**overrides)), synthetic_problem())
        layouts[name] = [  # The distinct sets of devices the family's leaves are on.
            sorted(
                {
                    tuple(sorted(d.id for d in leaf.devices()))
                    for leaf in jax.tree_util.tree_leaves((f.states, f.env_keys, f.epsilons))
                }
            )
            for f in families
        ]
        layouts[name + "_rows"] = [
            sorted(
                {
                    len(shard.data)
                    for leaf in jax.tree_util.tree_leaves(f.states)
                    for shard in leaf.addressable_shards
                }
            )
            for f in families
        ]
    bandit.bandit_experiment(split_run_config(), workdir, problem=synthetic_problem())
    return layouts


def split_run_config():
    """48 interactions of 8 updates each, in 4 chunks: short enough that rounding (which differs
    with the number of agents each device's program holds) has not yet changed an action."""
    return small_config(**{"agents.epsilons": (0.0, 0.5), "num_steps": 48, "chunk_steps": 12})


def test_the_agents_are_split_over_the_devices_with_the_same_results(tmp_path):
    """With two devices (scripts/bandit.py asks for a CPU device per core) each kind's stack of
    agents is split over both, all at once; a stack that does not split evenly keeps a device of
    its own per kind. Every agent acts as on one device and its losses agree to rounding: no
    agent gets another's ε, keys or data. At once: an argument of a chunk left on another
    device would make it wait for that device's work, and the run loop turns such a copy into
    an error (a jnp `start` on the default device raised it here)."""
    report, _ = report_on_fake_cpus(
        "tests.test_bandit:bandit_on_two_devices", str(tmp_path / "two"), devices=2
    )
    assert report["split"] == [[[0, 1]], [[0, 1]]]  # Every leaf of both kinds on both devices:
    assert report["split_rows"] == [[1], [2]]  # one seed of BBB, two ε-greedy agents on each.
    assert report["whole"] == [[[0]], [[1]]]
    assert report["whole_rows"] == [[1], [1]]
    bandit.bandit_experiment(split_run_config(), str(tmp_path / "one"), problem=synthetic_problem())
    assert jax.device_count() == 1
    runs = {}
    for name in ("one", "two"):
        regret = np.load(tmp_path / name / "regret.npz")["regret"]
        records = read_records(str(tmp_path / name / "metrics.jsonl"))
        losses = [[v for k, v in r.items() if k.endswith("/loss")] for r in records]
        runs[name] = regret, np.asarray(losses)
    assert runs["one"][0].shape == (3, 2, 48)
    np.testing.assert_array_equal(runs["two"][0], runs["one"][0])
    assert runs["one"][1].shape == (4, 3)
    # Adam turns rounding-sized gradients into whole steps, so the losses drift apart by ~0.1%.
    np.testing.assert_allclose(runs["two"][1], runs["one"][1], rtol=1e-2)


@pytest.mark.parametrize(
    "env, setting, expected",
    [
        ({}, "cores=2", "2 2"),  # A device per core...
        ({}, "cores=8", "6 6"),  # ... at most one per agent of the largest stack (3 ε × 2 seeds),
        ({}, "cores=1", "1 1"),
        ({}, "cores=4; c.num_seeds = 1; c.agents.epsilons = ()", "1 1"),  # (one BBB agent).
        ({}, "cores=None", None),  # The cores this process may run on.
        ({"JAX_NUM_CPU_DEVICES": "3"}, "cores=2", "None 3"),  # The user's count is kept...
        (
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
            "cores=2",
            "None 4",
        ),  # ... either way.
    ],
)
def test_the_script_asks_for_a_cpu_device_per_core(env, setting, expected):
    code = (
        "import jax; from bbb import bandit; from configs import bandit_mushroom; "
        f"c = bandit_mushroom.get_config(); {setting}; "
        "n = bandit.request_cpu_devices(c, cores); print(n, jax.device_count())"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**clean, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    if expected is None:
        count = min(len(os.sched_getaffinity(0)), 6)
        expected = f"{count} {count}"
    assert result.stdout.split("\n")[-2] == expected


def test_asking_for_devices_after_jax_started_changes_nothing():
    jax.devices()  # The backend has started (as in this test process).
    assert bandit.request_cpu_devices(small_config()) is None
    assert jax.device_count() == 1


def test_thompson_draws_a_new_sample_at_every_interaction(monkeypatch):
    """`interact` asks the learner for values with a key of its own interaction t."""
    experiment = bandit.build(small_config())
    learner = experiment.thompson
    state = bandit.init_agent(experiment, learner, jax.random.key(0), True, 2)
    seen = []
    values = bandit.Learner.values

    def spy(self, params, features, key):
        seen.append(tuple(np.asarray(jax.random.key_data(key))))
        return values(self, params, features, key)

    monkeypatch.setattr(bandit.Learner, "values", spy)
    for t in range(3):
        bandit.interact(
            learner,
            experiment.rewards,
            synthetic_problem(),
            state,
            jnp.int32(t),
            jax.random.key(1),
            jax.random.key(2),
            jnp.float32(0.0),
        )
    assert len(seen) == 3 and len(set(seen)) == 3


def test_agents_of_one_seed_meet_the_same_mushrooms():
    problem = synthetic_problem(1000)
    draw = jax.vmap(lambda k, t: bandit.draw_mushroom(PAPER, problem, k, t), in_axes=(None, 0))
    a = draw(jax.random.fold_in(jax.random.key(0), 1), jnp.arange(50))
    b = draw(jax.random.fold_in(jax.random.key(0), 1), jnp.arange(50))
    c = draw(jax.random.fold_in(jax.random.key(0), 2), jnp.arange(50))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


# Bad configs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_updates", 0),
        ("buffer_size", -1),
        ("update_every", 7),  # 240 interactions are not a multiple of 7.
        ("chunk_steps", 100),  # Nor of 100.
        ("agents.epsilons", (0.1, 1.5)),
        ("rewards.poisonous_bad_probability", 2.0),
        ("model.num_outputs", 2),
        ("posterior.init_rho", 50.0),
        ("likelihood.noise_std", 0.0),
        ("prior.name", "nonsense"),
        ("optim.learning_rate", -1.0),
        ("optim.name", "rmsprop"),
        ("objective.kl_data_size", "everything"),
        ("seed", 2**32),  # JAX keys seeds by 32 bits: this would repeat seed 0.
        ("model.name", "lenet"),
        ("agents.epsilons", (0.0, 0.0)),  # One agent would vanish from the results.
    ],
)
def test_bad_config_names_the_field(field, value):
    config = small_config(**{field: value})
    with pytest.raises(ConfigError) as error:
        bandit.build(config)
    reported = error.value.field
    assert reported == field or reported.startswith(field)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.num_updates=0", "num_updates"),
        ("--config.data.path=/nonexistent/mushroom.data", "data.path"),
    ],
)
def test_script_exits_2_naming_the_problem(tmp_path, override, message):
    workdir = tmp_path / "run"
    result = run_script(
        "bandit.py", "--config=configs/bandit_mushroom.py", f"--workdir={workdir}", override
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert not workdir.exists()


# Checkpoints and resumption ---------------------------------------------------------------


def _outputs(workdir):
    data = np.load(os.path.join(workdir, "regret.npz"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = f.read()
    with open(os.path.join(workdir, "results.json")) as f:
        agents = json.load(f)["agents"]
    return {k: data[k] for k in data.files}, lines, agents


def test_an_interrupted_run_resumes_to_the_same_results(tmp_path):
    config = small_config(
        **{"chunk_steps": 40, "checkpoint_every_chunks": 2, "agents.epsilons": (0.0, 0.5)}
    )
    problem = synthetic_problem()
    straight = tmp_path / "straight"
    bandit.bandit_experiment(config, str(straight), problem=problem)
    resumed = tmp_path / "resumed"
    assert (
        bandit.bandit_experiment(config, str(resumed), problem=problem, stop_after_chunks=3) is None
    )
    assert sorted(os.listdir(resumed / "checkpoints")) == ["120", "80"]
    assert not (resumed / "results.json").exists()
    with open(resumed / "metrics.jsonl", "a") as f:  # A line written after the checkpoint.
        f.write(json.dumps({"step": 160, "BBB (Thompson)/cumulative_regret": -1.0}) + "\n")
    bandit.bandit_experiment(config, str(resumed), problem=problem)
    (arrays_a, lines_a, agents_a), (arrays_b, lines_b, agents_b) = (
        _outputs(straight),
        _outputs(resumed),
    )
    assert arrays_a["regret"].shape == (3, 2, 240)
    for key in arrays_a:
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)
    assert lines_a == lines_b
    assert agents_a == agents_b
    # Started again when finished: nothing is recomputed, the outputs stay the same.
    bandit.bandit_experiment(config, str(resumed), problem=problem)
    assert _outputs(resumed)[0]["regret"].tolist() == arrays_a["regret"].tolist()


def test_an_unreadable_checkpoint_leaves_the_workdir_as_it_was(tmp_path):
    from bbb.workdir import WorkdirError
    from tests.test_train import _digest

    config = small_config(**{"chunk_steps": 40, "agents.epsilons": (0.0,)})
    problem = synthetic_problem()
    workdir = tmp_path / "run"
    bandit.bandit_experiment(config, str(workdir), problem=problem, stop_after_chunks=1)
    victims = [
        os.path.join(root, name)
        for root, _, names in os.walk(workdir / "checkpoints")
        for name in names
        if os.path.getsize(os.path.join(root, name)) > 100
    ]
    assert victims
    for path in victims:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    before = _digest(str(workdir))
    config.num_steps = 480  # A field a resumed run may change: the failed start must not save it.
    with pytest.raises(WorkdirError):
        bandit.bandit_experiment(config, str(workdir), problem=problem)
    assert _digest(str(workdir)) == before
    assert json.loads((workdir / "config.json").read_text())["num_steps"] == 240


def test_a_finished_run_extends_like_a_longer_one(tmp_path):
    config = small_config(**{"chunk_steps": 60, "agents.epsilons": (0.0,)})
    problem = synthetic_problem()
    bandit.bandit_experiment(config, str(tmp_path / "a"), problem=problem)
    longer = small_config(**{"chunk_steps": 60, "agents.epsilons": (0.0,), "num_steps": 360})
    bandit.bandit_experiment(longer, str(tmp_path / "a"), problem=problem)
    bandit.bandit_experiment(longer, str(tmp_path / "b"), problem=problem)
    a, b = _outputs(tmp_path / "a"), _outputs(tmp_path / "b")
    np.testing.assert_array_equal(a[0]["regret"], b[0]["regret"])
    assert a[0]["regret"].shape == (2, 2, 360)
    assert a[1] == b[1]
    # Shortening it would drop interactions already made: refused, naming the field.
    with pytest.raises(ConfigError, match="num_steps"):
        bandit.bandit_experiment(config, str(tmp_path / "a"), problem=problem)


def test_workdir_of_another_config_or_an_old_run_is_left_alone(tmp_path):
    from bbb.workdir import WorkdirError

    config = small_config(**{"agents.epsilons": (0.0,)})
    problem = synthetic_problem()
    bandit.bandit_experiment(config, str(tmp_path / "run"), problem=problem)
    before = {p: (tmp_path / "run" / p).read_bytes() for p in ("metrics.jsonl", "regret.npz")}
    with pytest.raises(WorkdirError, match=r"prior\.sigma1"):
        other = small_config(**{"agents.epsilons": (0.0,), "prior.sigma1": 0.5})
        bandit.bandit_experiment(other, str(tmp_path / "run"), problem=problem)
    # A finished run from before checkpoints existed: results.json and no checkpoints/.
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text("{}")
    (old / "metrics.jsonl").write_text('{"step": 120}\n')
    with pytest.raises(WorkdirError, match="without checkpoints"):
        bandit.bandit_experiment(config, str(old), problem=problem)
    assert (old / "metrics.jsonl").read_text() == '{"step": 120}\n'
    assert sorted(os.listdir(old)) == ["metrics.jsonl", "results.json"]
    after = {p: (tmp_path / "run" / p).read_bytes() for p in before}
    assert after == before


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, monkeypatch, capsys):
    import signal

    from bbb import train

    class SignalledAtOnce(train.PreemptionWatcher):
        def __enter__(self):
            super().__enter__()
            os.kill(os.getpid(), signal.SIGTERM)  # Handled by the watcher, as a scheduler's.
            return self

    monkeypatch.setattr(train, "PreemptionWatcher", SignalledAtOnce)
    config = small_config(**{"chunk_steps": 60, "agents.epsilons": (0.0,)})
    problem = synthetic_problem()
    assert bandit.bandit_experiment(config, str(tmp_path), problem=problem) is None
    assert os.listdir(tmp_path / "checkpoints") == ["60"]
    assert "Pre-empted (SIGTERM) after 60 interactions" in capsys.readouterr().out
    monkeypatch.undo()
    results = bandit.bandit_experiment(config, str(tmp_path), problem=problem)
    assert results["num_steps"] == 240
    assert np.load(tmp_path / "regret.npz")["regret"].shape == (2, 2, 240)


# Acting, storing and updating, checked step by step ------------------------------------------


def _greedy_agent(epsilon_agents=(0.0,)):
    experiment = bandit.build(small_config(**{"agents.epsilons": epsilon_agents}))
    learner = experiment.greedy
    state = bandit.init_agent(experiment, learner, jax.random.key(0), False, 2)
    return experiment, learner, state


def _interact(experiment, learner, problem, state, t, epsilon):
    """`bandit.interact` at interaction t with the environment's key 1 and the agent's key 2."""
    return bandit.interact(
        learner,
        experiment.rewards,
        problem,
        state,
        t,
        jax.random.key(1),
        jax.random.key(2),
        jnp.float32(epsilon),
    )


def test_epsilon_greedy_explores_with_probability_epsilon_uniformly():
    """With probability ε the action is uniform over {PASS, EAT} (so it differs from the greedy
    one with probability ε/2), otherwise greedy: not 2ε, not always the other action."""
    experiment, learner, state = _greedy_agent()
    problem = synthetic_problem()
    env_key, agent_key = jax.random.key(1), jax.random.key(2)

    def one(t, epsilon):
        index, _ = bandit.draw_mushroom(experiment.rewards, problem, env_key, t)
        greedy = jnp.argmax(learner.values(state.params, problem.contexts[index], agent_key))
        _, out = bandit.interact(
            learner, experiment.rewards, problem, state, t, env_key, agent_key, epsilon
        )
        return greedy, out["action"]

    act = jax.jit(jax.vmap(one, in_axes=(0, None)))
    steps = jnp.arange(6000)
    greedy, action = (np.asarray(a) for a in act(steps, jnp.float32(0.0)))
    np.testing.assert_array_equal(action, greedy)
    greedy, action = (np.asarray(a) for a in act(steps, jnp.float32(0.2)))
    # Binomial(6000, 0.1): standard error 0.0039.
    assert abs(np.mean(action != greedy) - 0.1) < 0.02
    _, action = act(steps, jnp.float32(1.0))
    assert abs(np.mean(np.asarray(action) == bandit.EAT) - 0.5) < 0.03  # Standard error 0.0065.


def test_an_exact_tie_between_the_actions_is_a_pass():
    """A network whose output ignores the action (every weight 0, the output bias 3: both
    actions predict +3) makes a greedy agent pass, as the oracle, which eats only where the
    expected reward is positive, would; one action's value a float32 step higher decides."""
    experiment, learner, state = _greedy_agent()
    problem = synthetic_problem()
    posterior = state.params["posterior"]
    flat = jax.tree_util.tree_map(jnp.zeros_like, posterior.mu)
    last = sorted(flat)[-1]
    flat[last]["bias"] = jnp.full_like(flat[last]["bias"], 3.0)
    tied = dataclasses.replace(posterior, mu=flat)
    state = dataclasses.replace(state, params={**state.params, "posterior": tied})

    def act(state, t):
        return _interact(experiment, learner, problem, state, t, 0.0)[1]["action"]

    actions = jax.jit(jax.vmap(act, in_axes=(None, 0)))(state, jnp.arange(50))
    np.testing.assert_array_equal(np.asarray(actions), bandit.PASS)
    # The input unit that carries "EAT" (the last of F + 2) nudged up: every action is EAT.
    first = sorted(flat)[0]
    nudged = jax.tree_util.tree_map(lambda x: x, flat)
    kernel = np.zeros(flat[first]["kernel"].shape, np.float32)
    kernel[-1, :] = 1e-3
    nudged[first]["kernel"] = jnp.asarray(kernel)
    for layer in sorted(flat)[1:]:
        nudged[layer]["kernel"] = jnp.full_like(flat[layer]["kernel"], 1e-3)
    state = dataclasses.replace(
        state, params={**state.params, "posterior": dataclasses.replace(posterior, mu=nudged)}
    )
    actions = jax.jit(jax.vmap(act, in_axes=(None, 0)))(state, jnp.arange(50))
    np.testing.assert_array_equal(np.asarray(actions), bandit.EAT)


def test_the_buffer_stores_the_action_taken_and_its_reward():
    """An exploring agent's buffer holds the mushroom it met, the action it took (not the
    greedy one) and the reward it received (not the oracle's)."""
    experiment, learner, state = _greedy_agent()
    problem = synthetic_problem()
    step = jax.jit(lambda state, t: _interact(experiment, learner, problem, state, t, 1.0))
    actions, rewards, indices = [], [], []
    for t in range(12):
        state, out = step(state, jnp.int32(t))
        index, _ = bandit.draw_mushroom(experiment.rewards, problem, jax.random.key(1), t)
        actions.append(int(out["action"]))
        rewards.append(float(out["reward"]))
        indices.append(int(index))
    assert len(set(actions)) == 2  # Both actions, so some were not the greedy one.
    assert int(state.buffer.count) == 12
    np.testing.assert_array_equal(state.buffer.action[:12], actions)
    np.testing.assert_array_equal(state.buffer.reward[:12], rewards)
    np.testing.assert_array_equal(state.buffer.context_index[:12], indices)


class _RecordBatches:
    """A free energy that hands each minibatch's rewards to `seen` (from inside the loop)."""

    def __init__(self, free_energy, seen):
        self.free_energy, self.seen = free_energy, seen

    def __call__(self, params, batch, key, kl_weight):
        jax.debug.callback(lambda y: self.seen.append(np.asarray(y)[:, 0]), batch[1])
        return self.free_energy(params, batch, key, kl_weight)


@pytest.mark.parametrize(
    "name, steps",
    [
        ("adam", [-1.0, -1.0]),  # Adam's step is the learning rate whatever the gradient's scale.
        ("sgd", [-3.0, -3.0]),  # −lr · g.
        ("momentum", [-3.0, -3.0 * 1.5]),  # The velocity: g, then g + 0.5 g.
    ],
)
def test_every_agent_takes_the_configured_optimiser_steps(name, steps):
    """Both kinds of agent step with `optim.name` at `optim.learning_rate` (gradient 3 per
    weight, learning rate 0.01, momentum 0.5)."""
    config = small_config(
        **{"optim.name": name, "optim.momentum": 0.5, "optim.learning_rate": 0.01}
    )
    experiment = bandit.build(config)
    for learner in (experiment.thompson, experiment.greedy):
        params = {"w": jnp.zeros(3)}
        opt_state = learner.optimizer.init(params)
        grads = {"w": jnp.full(3, 3.0)}
        for expected in steps:
            updates, opt_state = learner.optimizer.update(grads, opt_state, params)
            np.testing.assert_allclose(updates["w"], 0.01 * expected, rtol=1e-4)


def test_momentum_outside_zero_to_one_names_the_field():
    config = small_config(**{"optim.name": "momentum", "optim.momentum": 1.0})
    with pytest.raises(ConfigError) as error:
        bandit.build(config)
    assert error.value.field == "optim.momentum"


def test_update_takes_num_updates_steps_on_fresh_minibatches_of_filled_slots():
    """`num_updates` Adam steps, each on its own minibatch drawn from the filled slots only."""
    _, learner, state = _greedy_agent()
    seen = []
    recording = dataclasses.replace(learner, free_energy=_RecordBatches(learner.free_energy, seen))
    capacity, filled = state.buffer.capacity, 100
    rewards = np.zeros(capacity, np.float32)
    rewards[:filled] = np.arange(1, filled + 1)  # Slot i holds reward i + 1; empty slots 0.
    buffer = state.buffer.replace(
        reward=jnp.asarray(rewards),
        context_index=jnp.arange(capacity, dtype=jnp.int32) % 2,
        count=jnp.int32(filled),
    )
    state = state.replace(buffer=buffer)
    new, _ = jax.jit(recording.update)(state, synthetic_problem().contexts, jax.random.key(1))
    jax.effects_barrier()
    assert int(new.opt_state[0].count) == learner.num_updates == 8
    assert len(seen) == 8 and all(y.shape == (learner.batch_size,) for y in seen)
    values = np.concatenate(seen)
    assert set(values) <= set(range(1, filled + 1))
    # 128 draws from 100 slots: about 72 distinct; one minibatch repeated would give ≤ 16.
    assert len(set(values)) > 40
    assert len({tuple(y) for y in seen}) == 8


def test_each_minibatch_row_pairs_a_slot_s_context_and_action_with_its_own_reward():
    """The rows the free energy sees are (features of the slot's mushroom, one-hot of the
    slot's action) → the slot's reward, all three from one slot. Slot i holds row i mod 40 of
    the synthetic problem (features one-hot of i mod 2), action ⌊i/2⌋ mod 2 and reward i + 1,
    so each reward names its slot, and numpy rebuilds the input it must come with."""
    _, learner, state = _greedy_agent()
    seen = []

    class Record:
        def __call__(self, params, batch, key, kl_weight):
            jax.debug.callback(lambda x, y: seen.append((np.asarray(x), np.asarray(y))), *batch)
            return learner.free_energy(params, batch, key, kl_weight)

    recording = dataclasses.replace(learner, free_energy=Record())
    capacity, filled = state.buffer.capacity, 100
    slots = np.arange(capacity)
    buffer = state.buffer.replace(
        context_index=jnp.asarray(slots % 40, jnp.int32),
        action=jnp.asarray(slots // 2 % 2, jnp.int32),
        reward=jnp.asarray(np.where(slots < filled, slots + 1, 0), jnp.float32),
        count=jnp.int32(filled),
    )
    jax.jit(recording.update)(
        state.replace(buffer=buffer), synthetic_problem().contexts, jax.random.key(1)
    )
    jax.effects_barrier()
    x = np.concatenate([x for x, _ in seen])  # [8 · 16, 4]
    slot = np.concatenate([y[:, 0] for _, y in seen]).astype(int) - 1
    assert len(set(slot)) > 40 and slot.min() >= 0 and slot.max() < filled
    eye = np.eye(2, dtype=np.float32)
    np.testing.assert_array_equal(x, np.concatenate([eye[slot % 2], eye[slot // 2 % 2]], 1))


def test_rounds_of_update_every_interactions_then_num_updates_steps():
    """With update_every = 4: a chunk of 12 interactions meets mushrooms t = start, ..., and
    reports them in order, per agent; it runs 3 rounds of `num_updates` steps, each round with
    its own update key."""
    experiment, learner, state = _greedy_agent()
    problem = synthetic_problem()
    keys_seen = []
    update = bandit.Learner.update

    def spy(self, state, contexts, key):
        jax.debug.callback(
            lambda k: keys_seen.append(tuple(np.asarray(k).ravel())), jax.random.key_data(key)
        )
        return update(self, state, contexts, key)

    states = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), state)  # Two agents.
    env_keys = jnp.stack([jax.random.key(1), jax.random.key(2)])
    agent_keys = jnp.stack([jax.random.key(3), jax.random.key(4)])
    start, length = 8, 12
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bandit.Learner, "update", spy)
        states, out = jax.jit(
            lambda s: bandit.run_chunk(
                learner,
                experiment.rewards,
                problem,
                s,
                jnp.int32(start),
                length,
                4,
                env_keys,
                agent_keys,
                jnp.zeros(2, jnp.float32),
            )
        )(states)
        jax.effects_barrier()
    assert out["action"].shape == (length, 2) and out["loss"].shape == (3, 2)
    draw = jax.vmap(
        jax.vmap(lambda k, t: bandit.draw_mushroom(experiment.rewards, problem, k, t), (None, 0)),
        (0, None),
    )
    index, bad = draw(env_keys, start + jnp.arange(length))  # [2, L]: agent a, interaction i.
    expected = bandit.step_rewards(
        experiment.rewards, problem.poisonous[index], out["action"].T, bad
    )
    np.testing.assert_array_equal(out["reward"].T, expected["reward"])
    np.testing.assert_array_equal(out["regret"].T, expected["regret"])
    np.testing.assert_array_equal(states.buffer.context_index[:, :length], index)
    np.testing.assert_array_equal(states.buffer.count, [length, length])
    np.testing.assert_array_equal(states.opt_state[0].count, [3 * 8, 3 * 8])
    assert len(keys_seen) == 3 * 2 and len(set(keys_seen)) == 6


def test_plot_shows_mean_and_std_over_seeds_of_the_cumulative_regret(tmp_path, monkeypatch):
    """Each agent's curve is the mean over seeds of its cumulative regret, its band ± the
    standard deviation over seeds (ddof 0), in both panels."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    rng = np.random.default_rng(0)
    regret = rng.integers(-5, 36, size=(2, 3, 7)).astype(np.float32)  # [A, S, T]
    expected = rng.uniform(0, 15, size=(2, 3, 7)).astype(np.float32)
    bandit.plot_regret(str(tmp_path / "r.png"), ["a", "b"], regret, expected)
    (figure,) = figures
    for ax, values in zip(figure.axes, (regret, expected), strict=True):
        for i in range(2):
            curves = np.cumsum(values[i].astype(np.float64), axis=1)
            mean, std = curves.mean(axis=0), curves.std(axis=0)
            np.testing.assert_array_equal(ax.lines[i].get_xdata(), np.arange(1, 8))
            np.testing.assert_allclose(ax.lines[i].get_ydata(), mean, rtol=1e-6)
            vertices = ax.collections[i].get_paths()[0].vertices
            for t in range(7):
                ys = vertices[vertices[:, 0] == t + 1, 1]
                assert ys.min() == pytest.approx(mean[t] - std[t], rel=1e-6, abs=1e-6)
                assert ys.max() == pytest.approx(mean[t] + std[t], rel=1e-6, abs=1e-6)
    close(figure)
