"""Tests of bbb/benchmark.py and scripts/benchmark.py: the grid, the records, the JSON.

Nothing here asserts on a time: timings belong to the benchmark, not to the tests.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbb import benchmark
from bbb import posterior as posterior_lib
from bbb.errors import ConfigError
from bbb.models import DTYPES
from bbb.posterior import MeanFieldGaussian
from configs import mnist
from tests.conftest import REPO

RECORD_KEYS = {
    "model",
    "hidden",
    "num_samples",
    "estimator",
    "prior",
    "kl",
    "noise",
    "optimizer",
    "batch_size",
    "ms_per_step",
    "examples_per_s",
    "repeats",
}


def _key(record):
    return (record["hidden"], record["num_samples"], record["estimator"], record["prior"])


def test_default_grid_covers_every_configuration_once():
    cases = benchmark.benchmark_grid()
    # Per H: the floor, and 3 K × 3 estimators × 2 priors with each of the two generators.
    assert len(cases) == 2 * (1 + 3 * 3 * 2 * 2)
    assert len(set(cases)) == len(cases)
    assert cases[0] == benchmark.deterministic_case(400)
    assert [c for c in cases if c.is_deterministic] == [
        benchmark.deterministic_case(400),
        benchmark.deterministic_case(1200),
    ]
    bayesian = [c for c in cases if not c.is_deterministic]
    assert {(c.prior, c.kl) for c in bayesian} == {
        ("scale_mixture", "mc"),
        ("gaussian", "closed_form"),
    }
    assert {c.num_samples for c in bayesian} == {1, 2, 8}
    assert {c.estimator for c in bayesian} == {"reparam", "local_reparam", "flipout"}
    hashed = {(c.estimator, c.kl) for c in bayesian if c.noise == "hash"}
    assert hashed == {(e, kl) for e in benchmark.ESTIMATORS for kl in ("mc", "closed_form")}
    assert any(c.noise == "hash" and c.num_samples == 1 and c.estimator == "reparam" for c in cases)


def test_restricted_grid_follows_the_flags():
    cases = benchmark.benchmark_grid((16, 32), (2,), ("flipout",), ("gaussian",), ("jax",))
    assert [(c.hidden, c.num_samples, c.estimator, c.prior, c.kl, c.noise) for c in cases] == [
        (16, 1, "deterministic", "flat", "none", "none"),
        (16, 2, "flipout", "gaussian", "closed_form", "jax"),
        (32, 1, "deterministic", "flat", "none", "none"),
        (32, 2, "flipout", "gaussian", "closed_form", "jax"),
    ]


def test_dtypes_get_a_floor_each_and_ratios_to_their_own_floor():
    cases = benchmark.benchmark_grid((16,), (1,), ("reparam",), ("gaussian",), ("jax",), DTYPES)
    assert [(c.estimator, c.dtype) for c in cases] == [
        ("deterministic", "float32"),
        ("deterministic", "bfloat16"),
        ("reparam", "float32"),
        ("reparam", "bfloat16"),
    ]
    assert cases[3].config(mnist.get_config()).model.dtype == "bfloat16"
    records = [
        {**c.record(128), "ms_per_step": ms} for c, ms in zip(cases, [1, 2, 3, 8], strict=True)
    ]
    benchmark.add_ratios(records)
    assert [r["ratio_to_deterministic"] for r in records] == [1.0, 1.0, 3.0, 4.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dtypes": ("float16",)},
        {"dtypes": ()},
        {"estimators": ("bayes",)},
        {"priors": ("laplace",)},
        {"noises": ("philox",)},
        {"hidden": (0,)},
        {"num_samples": ()},
    ],
)
def test_grid_rejects_bad_choices(kwargs):
    with pytest.raises(ConfigError):
        benchmark.benchmark_grid(**kwargs)


def test_case_config_sets_the_fields_and_leaves_the_base_alone():
    base = mnist.get_config()
    case = benchmark.Case(1200, 8, "local_reparam", "gaussian", "closed_form", "hash")
    config = case.config(base, batch_size=64)
    assert config.model.hidden_sizes == (1200, 1200)
    assert config.objective.num_samples == 8
    assert (config.posterior.name, config.posterior.estimator) == ("mean_field", "local_reparam")
    assert (config.prior.name, config.objective.kl, config.posterior.noise) == (
        "gaussian",
        "closed_form",
        "hash",
    )
    assert (config.batch_size, config.optim.name) == (64, "adam")
    floor = benchmark.deterministic_case(400).config(base)
    assert (floor.posterior.name, floor.prior.name) == ("point", "flat")
    assert base.model.hidden_sizes == (400, 400) and base.posterior.name == "mean_field"


def test_script_lists_the_grid_that_its_flags_ask_for():
    def listed(*flags):
        result = subprocess.run(
            [sys.executable, "scripts/benchmark.py", "--list", *flags],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        return [json.loads(line) for line in result.stdout.splitlines()]

    quick = listed("--quick")
    assert {r["hidden"] for r in quick} == {400} and {r["num_samples"] for r in quick} == {1}
    # The floor, and 3 estimators × 2 priors with each of the two generators.
    assert len(quick) == 1 + 3 * 2 * 2
    chosen = listed("--hidden=400,1200", "--num_samples=2,8", "--estimators=reparam")
    assert {(r["hidden"], r["num_samples"]) for r in chosen if r["estimator"] == "reparam"} == {
        (400, 2),
        (400, 8),
        (1200, 2),
        (1200, 8),
    }
    assert len(chosen) == 2 * (1 + 2 * 2 * 2)
    bad = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--list", "--estimators=bayes"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "estimators" in bad.stderr


def test_smoke_run_returns_complete_records_and_writes_json(tmp_path, monkeypatch, fast_compile):
    monkeypatch.setattr(benchmark, "EPOCH_EXAMPLES", 256)  # 4 steps of 64.
    path = tmp_path / "bench.json"
    lines, rounds = [], []
    real = benchmark.time_interleaved

    def spy(run_onces, repeats, warmup, calls_per_round, after_call, **kwargs):
        rounds.append((len(run_onces), repeats, warmup, calls_per_round))
        return real(run_onces, repeats, warmup, calls_per_round, after_call, **kwargs)

    monkeypatch.setattr(benchmark, "time_interleaved", spy)
    records = benchmark.run(
        mnist.get_config(),
        hidden=(16, 8),
        num_samples=(1, 2),
        estimators=("reparam",),
        priors=("scale_mixture",),
        noises=("jax",),
        repeats=3,
        warmup=1,
        calls_per_round=2,
        epoch_repeats=2,
        batch_size=64,
        json_path=str(path),
        out=lines.append,
    )
    assert [_key(r) for r in records] == [
        (h, k, estimator, prior)
        for h in (16, 8)
        for k, estimator, prior in (
            (1, "deterministic", "flat"),
            (1, "reparam", "scale_mixture"),
            (2, "reparam", "scale_mixture"),
        )
    ]
    # The steps of each H (every K, and the floor) are timed together, in interleaved rounds.
    assert rounds == [(3, 3, 1, 2), (3, 3, 1, 2)]
    for r in records:
        assert RECORD_KEYS <= set(r)
        assert r["repeats"] == 3 and r["batch_size"] == 64 and r["epoch_steps"] == 4
        assert r["calls_per_round"] == 2 and r["timed_calls"] == 6
        fields = ("ms_per_step", "ms_per_step_first_call", "examples_per_s", "compile_s")
        for field in (*fields, "epoch_s", "epoch_compile_s", "temp_bytes"):
            assert r[field] > 0, field
        assert np.isfinite(r["host_overhead_pct"])
        floor = next(f for f in records if f["hidden"] == r["hidden"])
        assert r["ratio_to_deterministic"] == pytest.approx(r["ms_per_step"] / floor["ms_per_step"])
        assert r["machine"]["backend"] == "cpu"
    assert records[0]["ratio_to_deterministic"] == 1.0
    written = json.loads(path.read_text())
    assert isinstance(written, list) and written == json.loads(json.dumps(records))
    report = "\n".join(lines)
    assert "machine:" in report and "| bbb | 16 | 2 | reparam |" in report


# Made-up medians (ms) of the ablation's lines, for the breakdown's arithmetic.
LINE_MS = {
    "full": 10.0,
    "threefry_noise": 8.0,
    "flat_counter_noise": 7.5,
    "vmapped_one_sample": 11.0,
    "sigma_mean_in_step": 10.3,
    "vector_256": 10.5,
    "no_noise": 7.0,
    "no_prior": 9.0,
    "no_kl": 8.5,
    "grad_only": 9.5,
    "deterministic": 3.0,
    "deterministic_grad_only": 2.0,
    "deterministic_vector_256": 3.1,
    "local_full": 8.0,
    "local_no_kl": 7.0,
    "local_grad_only": 6.5,
    "local_likelihood": 5.0,
}


def test_breakdown_is_the_differences_of_the_lines():
    ms = LINE_MS
    parts = {p["formula"]: p["ms"] for p in benchmark.ablation_breakdown(ms)}
    assert parts["full − no_noise"] == 3.0
    assert parts["threefry_noise − no_noise"] == 1.0
    assert parts["flat_counter_noise − no_noise"] == 0.5
    assert parts["full − no_prior"] == 1.0
    assert parts["no_prior − no_kl"] == 0.5
    assert parts["full − grad_only"] == 0.5
    assert parts["deterministic_grad_only"] == 2.0
    # The rest closes the sum (the threefry and flat-counter lines are alternatives, not parts).
    alternatives = {"threefry_rng", "flat_counter_rng"}
    additive = [p for p in benchmark.ablation_breakdown(ms) if p["key"] not in alternatives]
    assert sum(p["ms"] for p in additive) == pytest.approx(ms["full"])
    assert {line.name for line in benchmark.ablation_lines(16)} == set(ms)


def test_local_breakdown_is_the_differences_of_its_own_lines():
    """local_reparam's parts come from its own lines and are shares of its own step, not of the
    paper's ("full")."""
    parts = {p["key"]: p for p in benchmark.local_breakdown(LINE_MS)}
    assert set(parts) == {"local_kl", "local_optimiser", "local_likelihood"}
    assert parts["local_kl"]["ms"] == pytest.approx(1.0)  # local_full − local_no_kl
    assert parts["local_optimiser"]["ms"] == pytest.approx(1.5)  # local_full − local_grad_only
    assert parts["local_likelihood"]["ms"] == pytest.approx(5.0)
    for part in parts.values():
        assert part["pct_of_full"] == pytest.approx(100 * part["ms"] / LINE_MS["local_full"])
    lines = {line.name: line for line in benchmark.ablation_lines(16)}
    # The step is the peer's work; the two no-KL lines drop the KL and nothing else.
    full = lines["local_full"].case
    assert (full.estimator, full.prior, full.kl, full.noise) == (
        "local_reparam",
        "gaussian",
        "closed_form",
        "hash",
    )
    for name in ("local_no_kl", "local_likelihood"):
        case = lines[name].case
        assert case == dataclasses.replace(full, prior="flat", kl="mc"), name
        assert lines[name].posterior_class is benchmark.NoLogQPosterior
    assert lines["local_grad_only"].case == full
    assert [lines[n].gradient_only for n in ("local_full", "local_no_kl")] == [False, False]
    assert [lines[n].gradient_only for n in ("local_grad_only", "local_likelihood")] == [True] * 2


def test_ablation_posteriors_remove_only_their_part():
    mu = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))}
    rho = jax.tree_util.tree_map(lambda m: jnp.full_like(m, -1.0), mu)
    key = jax.random.key(0)
    full = MeanFieldGaussian(mu, rho)
    w, log_q = benchmark.NoiselessPosterior(mu, rho).sample_and_log_prob(key)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), w, mu))
    assert np.isfinite(float(log_q))
    w_full, log_q_full = full.sample_and_log_prob(key)
    w_no_q, log_q_none = benchmark.NoLogQPosterior(mu, rho).sample_and_log_prob(key)
    np.testing.assert_allclose(w_no_q["kernel"], w_full["kernel"], rtol=1e-6)
    assert float(log_q_none) == 0.0 and float(log_q_full) != 0.0
    # The flat counter draws the hash's numbers (n = 3·3 + 2, odd: two rows and a last one).
    mu_odd = {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros((2,))}
    hashed = MeanFieldGaussian(mu_odd, mu_odd, "hash")
    flat = benchmark.FlatCounterPosterior(mu_odd, mu_odd, "hash")
    for a, b in zip(
        jax.tree_util.tree_leaves(flat.sample_noise(key)),
        jax.tree_util.tree_leaves(jax.jit(hashed.sample_noise)(key)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=3e-7, atol=1e-7)


def test_peer_is_skipped_with_a_message_when_missing(tmp_path, capsys):
    assert benchmark.run_peer(str(tmp_path / "no-python")) == []
    assert "venv" in capsys.readouterr().err


def test_a_peer_that_prints_no_json_is_skipped_not_fatal(tmp_path, capsys):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'warming up'\n")
    fake.chmod(0o755)
    assert benchmark.run_peer(str(fake), (8,), (1,), repeats=1) == []
    assert "printed no JSON line" in capsys.readouterr().err


def test_peer_output_becomes_records(tmp_path):
    canned = {
        "versions": {"torch": "2.13.0", "bayesian_torch": "0.5.0"},
        "records": [
            {"system": "torch", "hidden": 400, "num_samples": 1, "times_ms": [5.0, 6.0, 7.0]},
            {"system": "bayesian-torch", "hidden": 400, "num_samples": 1, "times_ms": [12.0] * 3},
        ],
    }
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho '{json.dumps(canned)}'\n")
    fake.chmod(0o755)
    records = benchmark.run_peer(str(fake), (400,), (1,), repeats=3)
    floor = {"kind": "grid", "system": "bbb", "hidden": 400, "estimator": "deterministic"}
    benchmark.add_ratios([{**floor, "ms_per_step": 2.0}, *records])
    torch_floor, peer = records
    assert (torch_floor["estimator"], peer["prior"], peer["kl"]) == (
        "deterministic",
        "gaussian",
        "closed_form",
    )
    assert peer["ms_per_step"] == 12.0 and peer["ratio_to_deterministic"] == 6.0
    assert peer["ratio_to_own_floor"] == 2.0
    assert RECORD_KEYS <= set(peer)
    assert peer["host_memory"] == "default"


def test_peer_runs_under_the_malloc_policy_asked_for(tmp_path, monkeypatch):
    # "kept" hands the peer this process's malloc policies through its environment; "default"
    # removes them even when this process's environment has them. The ratios pair each peer
    # with the torch floor of its own policy.
    canned = {
        "versions": {},
        "records": [
            {"system": "torch", "hidden": 8, "num_samples": 1, "times_ms": [4.0]},
            {"system": "bayesian-torch", "hidden": 8, "num_samples": 1, "times_ms": [12.0]},
        ],
    }
    seen = tmp_path / "seen"
    fake = tmp_path / "python"
    fake.write_text(
        f'#!/bin/sh\necho "$MALLOC_MMAP_MAX_:$MALLOC_TRIM_THRESHOLD_:$GLIBC_TUNABLES" >> {seen}\n'
        f"echo '{json.dumps(canned)}'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(benchmark.hostmem, "is_kept", lambda: True)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.nns=2:glibc.malloc.hugetlb=1")
    default = benchmark.run_peer(str(fake), (8,), (1,), repeats=1, host_memory="default")
    monkeypatch.delenv("MALLOC_MMAP_MAX_")
    kept = benchmark.run_peer(str(fake), (8,), (1,), repeats=1, host_memory="kept")
    # This process's own policies switched off (BBB_KEEP_FREED_MEMORY=0, BBB_HUGE_PAGES=0):
    # "kept" gives the peer none either.
    monkeypatch.setattr(benchmark.hostmem, "is_kept", lambda: False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.nns=2")
    benchmark.run_peer(str(fake), (8,), (1,), repeats=1, host_memory="kept")
    assert seen.read_text().splitlines() == [
        "::glibc.rtld.nns=2",
        "0:2147483647:glibc.rtld.nns=2:glibc.malloc.hugetlb=1",
        "::glibc.rtld.nns=2",
    ]
    assert {r["host_memory"] for r in default} == {"default"}
    assert {r["host_memory"] for r in kept} == {"kept"}
    kept[0]["ms_per_step"] = 3.0  # the kept torch floor: bayesian-torch (kept) is 4x it
    kept[1]["ms_per_step"] = 9.0
    ours = {
        "kind": "grid",
        "system": "bbb",
        "hidden": 8,
        "num_samples": 1,
        "estimator": "local_reparam",
        "prior": "gaussian",
        "kl": "closed_form",
        "noise": "hash",
        "examples_per_s": 1.0,
        **benchmark._summary([3.0]),
    }
    other_k = {**ours, "num_samples": 2}
    other_work = {**ours, "prior": "scale_mixture", "kl": "mc"}
    half_precision = {**ours, "dtype": "bfloat16"}  # The peer multiplies in float32.
    benchmark.add_ratios(default + kept + [ours, other_k, other_work, half_precision])
    assert "peer_speedup" not in half_precision
    assert [r["ratio_to_own_floor"] for r in default + kept] == [1.0, 3.0, 1.0, 3.0]
    # The peer's step at the same H and K over bbb's: 12 / 3 as shipped, 9 / 3 with bbb's malloc.
    assert ours["peer_speedup"] == {"default": 4.0, "kept": 3.0}
    assert other_k["peer_speedup"] == {} and "peer_speedup" not in other_work
    table = benchmark.format_table(default + kept + [ours])
    assert "bayesian-torch (malloc kept)" in table and "| 4.00× / 3.00× |" in table


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"batch_size": -1}, "--batch_size"),
        ({"hidden": (0,), "ablation": True}, "--hidden"),
        ({"num_samples": (0,)}, "--num_samples"),
        ({"epoch_examples": 100}, "--epoch_examples"),  # Fewer than one batch of 128.
    ],
)
def test_bad_sizes_are_named_before_any_timing(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        benchmark.run(mnist.get_config(), **kwargs)


def test_every_sample_count_of_a_width_is_timed_in_the_same_rounds(monkeypatch):
    """K = 1 and K = 8 of one H share the interleaved rounds (with the floor), so that their
    ratio is not the machine's drift between two groups."""
    calls = []
    real = benchmark.time_interleaved

    def spy(run_onces, *args, **kwargs):
        calls.append(len(run_onces))
        return real(run_onces, *args, **kwargs)

    monkeypatch.setattr(benchmark, "time_interleaved", spy)
    cases = benchmark.benchmark_grid((8,), (1, 2), ("local_reparam",), ("gaussian",), ("hash",))
    records = benchmark.run_grid(
        cases,
        mnist.get_config(),
        repeats=1,
        warmup=0,
        calls_per_round=1,
        epoch_repeats=0,
        batch_size=4,
    )
    assert len({c.num_samples for c in cases}) == 2
    assert calls == [len(cases)] and len(records) == len(cases)


def test_grid_shows_a_progress_bar_over_compilations_and_rounds(capsys):
    # Every case of a width is compiled before any is timed, so the finished-case lines come
    # late; the bar counts each compilation (step and epoch) and each round, with an ETA.
    cases = benchmark.benchmark_grid((8,), (1,), ("local_reparam",), ("gaussian",), ("jax",))
    lines = []
    benchmark.run_grid(
        cases,
        mnist.get_config(),
        repeats=2,
        warmup=1,
        calls_per_round=1,
        epoch_repeats=1,
        epoch_examples=8,
        batch_size=4,
        log=lines.append,
        progress=True,
    )
    total = 2 * len(cases) + 1 + 2  # Step and epoch compilations, then 3 rounds.
    err = capsys.readouterr().err
    assert f" {total}/{total} [" in err and f" 1/{total} [" in err
    # The bar names the task that runs, before it is counted.
    assert "compiling the epoch of H=8 K=1 local_reparam gaussian/closed_form noise=jax: " in err
    assert "H=8: warm-up round 1/1:" in err and "H=8: timed round 2/2:" in err
    assert len(lines) == len(cases) and lines[-1].startswith(f"[{len(cases)}/{len(cases)}]")
    # Off: no bar.
    benchmark.run_grid(
        cases[:1], mnist.get_config(), repeats=1, warmup=0, epoch_repeats=0, batch_size=4
    )
    assert "task" not in capsys.readouterr().err


def test_a_bad_peer_malloc_policy_fails_before_any_timing():
    with pytest.raises(ConfigError, match="peer_host_memory"):
        benchmark.run(mnist.get_config(), hidden=(8,), peer_host_memory=("kept", "bogus"))


def test_floors_count_the_mlp_and_divide_by_the_measured_rates():
    # 784·400 + 400 + 400·400 + 400 + 400·10 + 10 weights and biases.
    assert benchmark.mlp_weights(400) == 478_410
    # H = 2, B = 1: x·W costs 2·(1568 + 4 + 20) FLOPs forward, as many for the weight
    # gradients, and 2·(4 + 20) for the input gradients of layers 2 and 3.
    assert benchmark.mlp_matmul_flops(2, 1) == 2 * (2 * 1592 + 24)
    assert benchmark.mlp_matmul_flops(2, 3) == 3 * benchmark.mlp_matmul_flops(2, 1)
    ms = LINE_MS
    rates = {"gb_per_s": 10.0, "gflop_per_s": 100.0}
    parts = {
        p["key"]: p for p in benchmark.add_floors(benchmark.ablation_breakdown(ms), 2, 1, rates)
    }
    n = benchmark.mlp_weights(2)
    # 100 GFLOP/s is 1e8 FLOPs per ms; 10 GB/s is 1e7 bytes per ms.
    assert parts["matmuls"]["bound"] == "FLOPs"
    assert parts["matmuls"]["floor_ms"] == pytest.approx(benchmark.mlp_matmul_flops(2, 1) / 1e8)
    assert parts["optimiser"]["floor_ms"] == pytest.approx(64 * n / 1e7)
    for key in ("rng", "threefry_rng", "flat_counter_rng"):
        assert parts[key]["floor_ms"] == pytest.approx(4 * n / 1e7)
    for part in parts.values():
        assert part["x_floor"] == pytest.approx(part["ms"] / part["floor_ms"])
    # local_reparam's likelihood multiplies along two paths (x·μ and x²·σ², and their
    # gradients): twice the plain MLP's FLOPs.
    local = {p["key"]: p for p in benchmark.add_floors(benchmark.local_breakdown(ms), 2, 1, rates)}
    assert local["local_likelihood"]["bound"] == "FLOPs"
    assert local["local_likelihood"]["floor_ms"] == pytest.approx(
        2 * benchmark.mlp_matmul_flops(2, 1) / 1e8
    )
    assert local["local_optimiser"]["floor_ms"] == pytest.approx(64 * n / 1e7)
    measured = benchmark.measure_rates(4096, repeats=2)
    assert all(np.isfinite(v) and v > 0 for v in measured.values())


def test_ablation_runs_every_line_interleaved_and_breaks_the_step_down(monkeypatch):
    calls = []
    real = benchmark.time_interleaved

    def spy(run_onces, repeats, warmup, calls_per_round=0, after_call=None, **kwargs):
        calls.append((len(run_onces), repeats, warmup, calls_per_round))
        return real(run_onces, repeats, warmup, calls_per_round, after_call, **kwargs)

    monkeypatch.setattr(benchmark, "time_interleaved", spy)
    records = benchmark.run_ablation(
        mnist.get_config(), (8,), repeats=2, warmup=0, calls_per_round=1, batch_size=4
    )
    lines = [r for r in records if r["kind"] == "ablation"]
    parts = [r for r in records if r["kind"] == "breakdown"]
    # The lines in one set of rounds; then the two rate measurements (3 warm-up rounds).
    assert calls == [(len(benchmark.ablation_lines(8)), 2, 0, 1), (2, 2, 3, 0)]
    assert [r["ablation"] for r in lines] == [line.name for line in benchmark.ablation_lines(8)]
    assert all(r["repeats"] == 2 and r["ms_per_step"] > 0 for r in lines)
    assert {p["key"] for p in parts} == {
        "rng",
        "prior",
        "entropy",
        "optimiser",
        "matmuls",
        "rest",
        "threefry_rng",
        "flat_counter_rng",
        "local_kl",
        "local_optimiser",
        "local_likelihood",
    }
    assert all(p["floor_ms"] > 0 and p["gb_per_s"] > 0 for p in parts)
    assert "× floor" in benchmark.format_ablation(records)
    # Every record carries the fields; the gradient-only lines run no optimiser.
    gradient_only = {line.name for line in benchmark.ablation_lines(8) if line.gradient_only}
    assert gradient_only == {
        "grad_only",
        "deterministic_grad_only",
        "local_grad_only",
        "local_likelihood",
    }
    for r in lines:
        assert r["examples_per_s"] == pytest.approx(4 / (r["ms_per_step"] / 1e3))
        assert r["optimizer"] == ("none" if r["ablation"] in gradient_only else "adam")
    for p in parts:
        assert (p["model"], p["hidden"], p["num_samples"], p["batch_size"]) == ("mlp", 8, 1, 4)
        # Each part carries the fields of the step it is a part of.
        step = (
            ("local_reparam", "gaussian", "closed_form", "adam")
            if p["key"].startswith("local_")
            else ("reparam", "scale_mixture", "mc", "adam")
        )
        assert (p["estimator"], p["prior"], p["kl"], p["optimizer"]) == step


def test_interleaved_timing_calls_each_function_once_per_round():
    order = []
    times, first = benchmark.time_interleaved(
        [lambda: order.append("a"), lambda: order.append("b")], repeats=3, warmup=1
    )
    assert order == ["a", "b"] * 4
    assert [len(t) for t in times] == [3, 3] and first == times


def test_interleaved_timing_runs_warm_calls_back_to_back_and_times_them_apart(monkeypatch):
    order, epochs, now = [], [], [0.0]
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: now[0])

    def call(name, seconds):
        def run():
            order.append(name)
            now[0] += seconds if len(order) % 3 else 10 * seconds  # Every third call is slow.

        return run

    times, first = benchmark.time_interleaved(
        [call("a", 1.0), call("b", 2.0)],
        repeats=2,
        warmup=1,
        calls_per_round=2,
        after_call=lambda r, i: epochs.append((r, i)),
    )
    # Each round: a three times, then b three times; after each function's calls in a timed
    # round, the hook (where the benchmark times that case's epoch).
    assert order == (["a"] * 3 + ["b"] * 3) * 3
    assert epochs == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # The first call of each round apart, the two after it as the function's times.
    assert first == [[1e3, 1e3], [2e3, 2e3]]
    assert times == [[1e3, 10e3, 1e3, 10e3], [2e3, 20e3, 2e3, 20e3]]


def test_timing_settings_are_checked_before_any_compute(capsys):
    for kwargs, field in (
        ({"repeats": 0}, "repeats"),
        ({"calls_per_round": -1}, "calls_per_round"),
        ({"repeats": 2, "epoch_repeats": 3}, "epoch_repeats"),
    ):
        with pytest.raises(ConfigError, match=field):
            benchmark.run(mnist.get_config(), hidden=(8,), num_samples=(1,), **kwargs)
    assert "machine:" not in capsys.readouterr().out


def test_a_missing_peer_or_json_folder_fails_before_any_timing(tmp_path, capsys):
    for kwargs, field in (
        ({"peer_python": str(tmp_path / "no-python")}, "--peer_python"),
        ({"peer_python": sys.executable, "peer_threads": 0}, "--peer_threads"),
        ({"json_path": str(tmp_path / "missing" / "b.json")}, "--json"),
    ):
        with pytest.raises(ConfigError, match=field):
            benchmark.run(mnist.get_config(), hidden=(8,), num_samples=(1,), **kwargs)
    assert "machine:" not in capsys.readouterr().out


def test_epoch_rounds_are_distinct_and_spread_over_the_run():
    """One epoch per chosen round, every chosen round a timed one, and the epochs spread over
    the run: the j-th within a round of the middle of the j-th of `epoch_repeats` equal
    stretches of the rounds."""
    for repeats in range(1, 31):
        for epoch_repeats in range(1, repeats + 1):
            rounds = benchmark.epoch_rounds(repeats, epoch_repeats)
            assert len(rounds) == epoch_repeats and rounds == sorted(set(rounds))
            assert 0 <= rounds[0] and rounds[-1] < repeats
            for j, r in enumerate(rounds):
                assert abs(r - (j + 0.5) * repeats / epoch_repeats) < 1
    assert benchmark.epoch_rounds(20, 3) == [3, 10, 16]


def test_summary_and_host_overhead_by_hand():
    summary = benchmark._summary([1.0, 2.0, 3.0, 10.0], [7.0, 9.0], 2)
    assert summary["ms_per_step"] == 2.5 and summary["ms_per_step_min"] == 1.0
    assert summary["ms_per_step_q25"] == pytest.approx(1.75)
    assert summary["ms_per_step_q75"] == pytest.approx(4.75)
    assert summary["ms_per_step_first_call"] == 8.0
    assert (summary["repeats"], summary["timed_calls"], summary["calls_per_round"]) == (2, 4, 2)
    # Its steps as separate calls took 0.4 s: an epoch of 0.44 s has 10% overhead, one of
    # 0.36 s −10%.
    assert benchmark.host_overhead_pct(0.44, 0.4) == pytest.approx(10.0)
    assert benchmark.host_overhead_pct(0.36, 0.4) == pytest.approx(-10.0)


def test_peer_script_names_nothing_it_does_not_define(tmp_path):
    # The script runs in the peer's own Python, out of reach of the linter's view of this file.
    script = tmp_path / "peer.py"
    script.write_text(benchmark.PEER_SCRIPT)
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    result = subprocess.run(
        [ruff, "check", "--no-cache", "--isolated", "--select", "F821,F401", str(script)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def test_ablation_posteriors_have_treedefs_of_their_own():
    # JAX's treedef equality ignores a dataclass's class; equal treedefs with different hashes
    # let a colliding jit cache mistake one posterior for another (a rare, hash-seed-dependent
    # pytree structure error in the ablation test above, seen once in a `make test` run). The
    # general guard is MeanFieldGaussian.pytree_class (tests/test_posterior.py).
    mu = {"w": jnp.ones(3)}
    classes = (
        posterior_lib.MeanFieldGaussian,
        benchmark.NoiselessPosterior,
        benchmark.NoLogQPosterior,
        benchmark.FlatCounterPosterior,
    )
    treedefs = [jax.tree_util.tree_structure(cls(mu, mu, "hash")) for cls in classes]
    for i, a in enumerate(treedefs):
        for b in treedefs[i + 1 :]:
            assert a != b


def test_every_generator_list_times_threefry_first():
    """ "jax" (threefry) noise is always timed, first, whatever `noises` lists: the reference
    every other generator is compared with."""
    cases = benchmark.benchmark_grid((8,), (1,), ("reparam",), ("gaussian",), ("hash",))
    assert [c.noise for c in cases] == ["none", "jax", "hash"]
    cases = benchmark.benchmark_grid((8,), (1,), ("reparam",), ("gaussian",), ("hash", "jax"))
    assert [c.noise for c in cases] == ["none", "jax", "hash"]


def test_case_config_overrides_the_base_noise_and_dropout():
    """The case's noise generator and no dropout replace whatever the base config says (the
    MNIST config's own values, "hash" and 0.0, would hide a field left unset)."""
    base = mnist.get_config()
    base.model.dropout_rate = 0.5
    base.posterior.noise = "hash"
    case = benchmark.Case(8, 1, "reparam", "gaussian", "closed_form", "jax")
    assert case.config(base).posterior.noise == "jax"
    assert case.config(base).model.dropout_rate == 0.0
    assert benchmark.deterministic_case(8).config(base).model.dropout_rate == 0.0


def _fake_grid(monkeypatch, step_ms, epoch_s, steps_per_epoch):
    """Replaces the compilation of `run_grid` by fakes on a fake clock.

    Case i's step takes `step_ms[i]` (ms, one entry per call, in order); its epoch e returns
    `epoch_s[i][e]` seconds; its experiment has `steps_per_epoch` steps. Returns the list of
    (case index, epoch number) of the epochs run.
    """
    from types import SimpleNamespace

    now, epochs_run, count = [0.0], [], [0]
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: now[0])

    def prepare(case, base_config, batch, epoch_examples):
        index = count[0]
        count[0] += 1
        durations = iter(step_ms[index])

        def run_once():
            now[0] += next(durations) / 1e3

        record = {"kind": "grid", **case.record(batch[0].shape[0]), "compile_s": 0.5}
        experiment = SimpleNamespace(steps_per_epoch=steps_per_epoch, index=index)
        return benchmark.PreparedCase(record, experiment, {}, run_once, [None])

    def compile_epoch(experiment, box, data, keys):
        def run_epoch(epoch):
            epochs_run.append((experiment.index, epoch))
            return epoch_s[experiment.index][epoch]

        return 1.5, run_epoch

    monkeypatch.setattr(benchmark, "prepare_case", prepare)
    monkeypatch.setattr(benchmark, "compile_epoch_timer", compile_epoch)
    return epochs_run


def test_grid_records_by_hand_from_a_fake_clock(monkeypatch):
    """ms/step is the median of the warm calls, the first call the median of the rounds' cold
    ones, examples/s = B / step, the epoch the median of the epochs run in `epoch_repeats`
    rounds spread over the run (each its own permutation number) and the loop overhead the
    median of each epoch over as many step calls run right after it, all by hand from made-up
    times."""
    # 1 warm-up round and 4 timed rounds of 1 + 2 calls each; the first call of a round is cold.
    # Epochs follow timed rounds 0, 2 and 3 (`rounds[1]`, `[3]` and `[4]`: the warm-up comes
    # first), each followed by 7 step calls, of 100, 400 and 1000 ms, which are not step times.
    rounds = [(50, 1, 1), (40, 1, 2), (40, 3, 4), (60, 2, 9), (40, 1, 3)]
    after_epoch = {1: [100.0] * 7, 3: [400.0] * 7, 4: [1000.0] * 7}
    step_ms = [
        [1.0] * (15 + 21),
        [ms for i, r in enumerate(rounds) for ms in (*r, *after_epoch.get(i, ()))],
    ]
    epochs = [[0.1, 0.2, 0.3], [1.0, 2.0, 9.0]]
    epochs_run = _fake_grid(monkeypatch, step_ms, epochs, steps_per_epoch=7)
    cases = benchmark.benchmark_grid((8,), (1,), ("reparam",), ("gaussian",), ("jax",))
    records = benchmark.run_grid(
        cases,
        mnist.get_config(),
        repeats=4,
        warmup=1,
        calls_per_round=2,
        epoch_repeats=3,
        epoch_examples=64,
        batch_size=16,
    )
    floor, bayes = records
    # Warm calls 1, 2, 3, 4, 2, 9, 1, 3: median 2.5 (mean 3.125, min 1); cold: 40, 40, 60, 40.
    assert bayes["ms_per_step"] == pytest.approx(2.5)
    assert bayes["ms_per_step_first_call"] == pytest.approx(40.0)
    assert (bayes["repeats"], bayes["timed_calls"], bayes["calls_per_round"]) == (4, 8, 2)
    assert bayes["examples_per_s"] == pytest.approx(16 / 2.5e-3)
    # Three epochs per case, in timed rounds 0, 2 and 3 of 4 (`epoch_rounds`), as epochs
    # 0, 1, 2: median 2.0 s.
    assert benchmark.epoch_rounds(4, 3) == [0, 2, 3]
    assert epochs_run == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert bayes["epoch_s"] == 2.0 and bayes["epoch_steps"] == 7
    # Each epoch against the 7 calls after it: 1 s against 0.7 s, 2 s against 2.8 s and 9 s
    # against 7 s; the overhead is the median of the three (the third), not the median epoch
    # against steps × the median step (2 / (7 × 2.5 ms)).
    runs = [100 * (1.0 / 0.7 - 1), 100 * (2.0 / 2.8 - 1), 100 * (9.0 / 7.0 - 1)]
    assert bayes["host_overhead_pct_runs"] == pytest.approx(runs)
    assert bayes["host_overhead_pct"] == pytest.approx(runs[2])
    assert (bayes["compile_s"], bayes["epoch_compile_s"]) == (0.5, 1.5)
    assert floor["ms_per_step"] == pytest.approx(1.0) and floor["epoch_s"] == 0.2


def test_add_ratios_takes_no_floor_from_the_ablation():
    """The ablation's "deterministic" line (same system, H and dtype as the grid's floor) is
    not a floor: a mixed list keeps the grid's."""
    floor = {**benchmark.deterministic_case(8).record(4), "kind": "grid", "ms_per_step": 2.0}
    line = {**floor, "kind": "ablation", "ablation": "deterministic", "ms_per_step": 5.0}
    bayes = {
        **benchmark.Case(8, 1, "reparam", "scale_mixture", "mc", "jax").record(4),
        "kind": "grid",
        "ms_per_step": 6.0,
    }
    benchmark.add_ratios([floor, line, bayes])
    assert bayes["ratio_to_deterministic"] == 3.0 and line["ratio_to_deterministic"] == 2.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"repeats": 2, "epoch_repeats": 2},  # One epoch in every round.
        {"repeats": 1, "epoch_repeats": 5, "ablation": True},  # The ablation runs no epoch.
        {"epoch_examples": 128},  # Exactly one batch.
        {"epoch_examples": 100, "ablation": True},
        {"epoch_examples": 100, "epoch_repeats": 0},
        {"peer_python": "/no/such/python"},  # Listing times no peer...
        {"json_path": "/no/such/folder/b.json"},  # ...and writes no JSON.
    ],
)
def test_settings_that_listing_or_the_ablation_does_not_use_are_accepted(kwargs):
    """Limits that only the grid's epoch, the peer or the written records need do not stop a
    run that has none of them; the boundary values themselves are allowed."""
    records = benchmark.run(
        mnist.get_config(),
        hidden=(8,),
        num_samples=(1,),
        list_only=True,
        out=lambda _: None,
        **kwargs,
    )
    assert records


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epoch_repeats": -1}, "epoch_repeats"),
        ({"warmup": 1.5}, "warmup"),
        ({"warmup": -1}, "warmup"),
        ({"epoch_examples": 128.0}, "--epoch_examples"),
    ],
)
def test_more_bad_timing_settings_are_named(kwargs, field):
    """Negative epochs, fractional warm-up rounds and a float N are refused (checked even
    when only listing, so that a mistaken value here never starts a real run)."""
    with pytest.raises(ConfigError, match=field):
        benchmark.run(
            mnist.get_config(), hidden=(8,), num_samples=(1,), list_only=True, out=print, **kwargs
        )
    with pytest.raises(ConfigError, match="--peer_threads"):
        benchmark.check_peer(sys.executable, 1.5)


def test_listing_the_ablation_names_its_lines():
    """--list --ablation prints the ablation's lines, per H, not the grid."""
    lines = []
    records = benchmark.run(
        mnist.get_config(), hidden=(8, 16), ablation=True, list_only=True, out=lines.append
    )
    names = [line.name for line in benchmark.ablation_lines(8)]
    assert [(r["hidden"], r["ablation"]) for r in records] == [
        (h, name) for h in (8, 16) for name in names
    ]
    assert {r["kind"] for r in records} == {"ablation"}
    assert [json.loads(line) for line in lines] == records


def _fake_peer(tmp_path, canned, exit_code=0, stderr=""):
    """A peer python that appends its JSON arguments and thread settings to `seen`, prints
    `stderr` to stderr and `canned` as JSON, and exits with `exit_code`. Returns (path, seen)."""
    seen = tmp_path / "seen"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$OMP_NUM_THREADS $MKL_NUM_THREADS $3" >> {seen}\n'
        f"printf '{stderr}' >&2\n"
        f"echo '{json.dumps(canned)}'\n"
        f"exit {exit_code}\n"
    )
    fake.chmod(0o755)
    return str(fake), seen


PEER_OUTPUT = {
    "versions": {"torch": "2.13.0"},
    "records": [
        {"system": "torch", "hidden": 8, "num_samples": 1, "times_ms": [4.0, 5.0, 9.0]},
        {"system": "bayesian-torch", "hidden": 8, "num_samples": 1, "times_ms": [10.0, 12.0]},
    ],
}


def test_peer_gets_its_settings_and_its_records_their_fields(tmp_path):
    """The peer is told H, K, its timed and untimed steps, B, N (for KL / N) and its threads
    (also through OMP/MKL_NUM_THREADS); its records say torch's noise and examples/s."""
    fake, seen = _fake_peer(tmp_path, PEER_OUTPUT)
    records = benchmark.run_peer(
        fake, (8,), (1, 2), repeats=7, warmup=2, batch_size=32, threads=3, num_train=640
    )
    threads, mkl, arguments = seen.read_text().split(" ", 2)
    assert (threads, mkl) == ("3", "3")
    assert json.loads(arguments) == {
        "hidden": [8],
        "num_samples": [1, 2],
        "repeats": 7,
        "warmup": 2,
        "batch_size": 32,
        "threads": 3,
        "num_train": 640,
    }
    torch_floor, peer = records
    assert (torch_floor["noise"], peer["noise"]) == ("none", "torch")
    assert peer["ms_per_step"] == 11.0 and peer["examples_per_s"] == pytest.approx(32 / 11e-3)
    assert torch_floor["examples_per_s"] == pytest.approx(32 / 5e-3)
    assert peer["threads"] == 3 and peer["versions"] == {"torch": "2.13.0"}
    benchmark.run_peer(fake, (8,), (1,), repeats=1)  # N defaults to the paper's 50,000.
    assert json.loads(seen.read_text().splitlines()[-1].split(" ", 2)[2])["num_train"] == 50_000


def test_a_failing_or_hanging_peer_is_skipped_with_its_last_message(tmp_path, capsys):
    """A peer that exits non-zero gives no records, even with a JSON line printed, and its
    last stderr line (the exception, after the traceback) is shown; one past its time limit is
    skipped too."""
    fake, _ = _fake_peer(tmp_path, PEER_OUTPUT, exit_code=3, stderr="Traceback\\nImportError: x")
    assert benchmark.run_peer(fake, (8,), (1,), repeats=1) == []
    assert "failed (exit 3): ImportError: x" in capsys.readouterr().err
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nexec sleep 5\n")
    slow.chmod(0o755)
    assert benchmark.run_peer(str(slow), (8,), (1,), repeats=1, timeout_s=0.2) == []
    assert "could not run" in capsys.readouterr().err


def test_run_times_the_peer_as_long_as_the_grid_and_keeps_the_grid_first(tmp_path, monkeypatch):
    """With a peer, `run` gives it repeats × calls_per_round timed steps (as many as each grid
    case), the grid's warm-up and N, one run per malloc policy; the grid's records are written
    before the peer starts, so that a peer that crashes loses nothing of them."""
    grid = [
        {**case.record(16), "kind": "grid", **benchmark._summary([2.0]), "examples_per_s": 1.0}
        for case in benchmark.benchmark_grid((8,), (1,), ("reparam",), ("gaussian",), ("jax",))
    ]
    monkeypatch.setattr(benchmark, "run_grid", lambda *a, **k: [dict(r) for r in grid])
    fake, seen = _fake_peer(tmp_path, PEER_OUTPUT)
    path = tmp_path / "bench.json"
    lines = []
    records = benchmark.run(
        mnist.get_config(),
        hidden=(8,),
        num_samples=(1,),
        repeats=5,
        warmup=2,
        calls_per_round=3,
        epoch_examples=640,
        batch_size=16,
        peer_python=fake,
        peer_host_memory=("default", "kept"),
        json_path=str(path),
        out=lines.append,
    )
    sent = [json.loads(line.split(" ", 2)[2]) for line in seen.read_text().splitlines()]
    assert [(a["repeats"], a["warmup"], a["num_train"], a["batch_size"]) for a in sent] == [
        (15, 2, 640, 16)
    ] * 2
    assert [r.get("host_memory") for r in records] == [None, None, *["default"] * 2, *["kept"] * 2]
    assert records[1]["peer_speedup"] == {"default": 5.5, "kept": 5.5}
    assert json.loads(path.read_text()) == json.loads(json.dumps(records))

    def crash(*args, **kwargs):
        raise RuntimeError("peer crashed")

    monkeypatch.setattr(benchmark, "run_peer", crash)
    with pytest.raises(RuntimeError):
        benchmark.run(
            mnist.get_config(), hidden=(8,), peer_python=fake, json_path=str(path), out=print
        )
    written = json.loads(path.read_text())
    assert [r["estimator"] for r in written] == ["deterministic", "reparam"]
    assert all(r["machine"]["backend"] == "cpu" for r in written)


def test_run_without_json_still_gives_every_record_its_machine(monkeypatch):
    """The machine is in every returned record whether or not the records are written."""
    grid = [
        {**case.record(16), "kind": "grid", **benchmark._summary([2.0]), "examples_per_s": 1.0}
        for case in benchmark.benchmark_grid((8,), (1,), ("reparam",), ("gaussian",), ("jax",))
    ]
    monkeypatch.setattr(benchmark, "run_grid", lambda *a, **k: grid)
    records = benchmark.run(mnist.get_config(), hidden=(8,), num_samples=(1,), out=lambda _: None)
    assert len(records) == 2 and all(r["machine"]["backend"] == "cpu" for r in records)


def test_table_row_by_hand():
    """One whole row of the table, every cell from a made-up record: the ratios each in
    its own column, the loop overhead signed, a missing value as "–", the peer as shipped /
    malloc kept; and as many columns in every line as in the header."""
    record = {
        **benchmark.Case(400, 2, "flipout", "gaussian", "closed_form", "hash").record(128),
        "compile_s": 3.04,
        **benchmark._summary([1.0, 2.0, 3.0, 4.0], [9.0], 4),
        "examples_per_s": 51_200.0,
        "ratio_to_deterministic": 1.5,
        "ratio_to_own_floor": 2.5,
        "epoch_s": None,
        "host_overhead_pct": -4.0,
        "peer_speedup": {"kept": 3.0},
    }
    floor = {
        **benchmark.deterministic_case(400).record(128),
        **benchmark._summary([2.0]),
        "examples_per_s": 64_000.0,
        "host_overhead_pct": 4.0,
    }
    lines = benchmark.format_table([record, floor]).splitlines()
    assert lines[2] == (
        "| bbb | 400 | 2 | flipout | gaussian / closed_form | hash | float32 | 3.0 | 2.50 | "
        "[1.75, 3.25] | 9.00 | 51,200 | 1.50 | 2.50 | – | -4.0% | – / 3.00× |"
    )
    assert lines[3].endswith("| – | – | – | +4.0% | – |")
    assert {line.count("|") for line in lines} == {lines[0].count("|")}


# Runs scripts/benchmark.py's main with `bbb.benchmark.run` replaced by a function that prints
# the settings it is given, as JSON.
_SCRIPT_SETTINGS = """
import json, runpy, sys
sys.argv = ["scripts/benchmark.py", *json.loads(sys.argv[1])]
sys.path.insert(0, ".")
from bbb import benchmark
benchmark.run = lambda base_config, **kwargs: print(json.dumps(kwargs, default=str))
runpy.run_path("scripts/benchmark.py", run_name="__main__")
"""


def _script_settings(*flags):
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT_SETTINGS, json.dumps(flags)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "BBB_HUGE_PAGES": "0"},
    )
    if result.returncode:
        return result.returncode, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_script_hands_run_the_settings_its_flags_ask_for():
    """The defaults (the whole grid, 4 warm calls a round, one epoch, both peer policies, no
    peer without --peer); --quick's smaller grid without the epoch, where a flag given says
    otherwise (here K); and a width that is not an integer named with exit code 2."""
    default = _script_settings()
    assert (default["hidden"], default["num_samples"]) == ([400, 1200], [1, 2, 8])
    assert (default["repeats"], default["warmup"], default["calls_per_round"]) == (20, 3, 4)
    assert (default["epoch_repeats"], default["epoch_examples"]) == (1, 50_000)
    assert default["peer_python"] is None and default["peer_host_memory"] == ["kept", "default"]
    quick = _script_settings("--quick", "--num_samples=2", "--peer")
    assert (quick["hidden"], quick["num_samples"], quick["epoch_repeats"]) == ([400], [2], 0)
    assert quick["peer_python"] == ".venv-peer/bin/python"
    code, err = _script_settings("--hidden=4OO")
    assert code == 2 and "comma-separated integers" in err


def test_memory_floors_count_the_bytes_each_part_moves():
    """Each elementwise part's floor is its bytes per weight (the reads and writes counted in
    BYTES_PER_WEIGHT's comments: ε; w and ∂w; ε, ρ, ∂μ, ∂ρ; Adam's 7 arrays of 2n and the norm's
    read; the sampling's 9) × n at the memory rate."""
    rates = {"gb_per_s": 10.0, "gflop_per_s": 100.0}
    parts = {
        p["key"]: p
        for p in benchmark.add_floors(benchmark.ablation_breakdown(LINE_MS), 2, 1, rates)
    }
    n = benchmark.mlp_weights(2)
    floats = {"rng": 1, "prior": 2, "entropy": 4, "optimiser": 7 * 2 + 2, "rest": 9}
    for key, count in floats.items():
        assert parts[key]["bound"] == "memory"
        assert parts[key]["floor_ms"] == pytest.approx(4 * count * n / 1e7), key
    # local_reparam's closed-form KL reads μ and ρ and writes their two gradients.
    local = {
        p["key"]: p for p in benchmark.add_floors(benchmark.local_breakdown(LINE_MS), 2, 1, rates)
    }
    for key, count in {"local_kl": 4, "local_optimiser": 7 * 2 + 2}.items():
        assert local[key]["bound"] == "memory"
        assert local[key]["floor_ms"] == pytest.approx(4 * count * n / 1e7), key


def test_ablation_records_by_hand_from_a_fake_clock(monkeypatch):
    """Each line's ms/step is its warm median, `pct_of_full` 100 × it over the full step's,
    examples/s = B / step, and the breakdown the differences of those medians, each part
    with the step's identifying fields and the measured rates."""
    now = [0.0]
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: now[0])

    def compile_line(line, base_config, batch):
        def run_once():
            now[0] += LINE_MS[line.name] / 1e3

        record = {"kind": "ablation", **line.case.record(4), "ablation": line.name}
        record["measures"] = line.measures
        return {**record, "compile_s": 0.1}, run_once

    rates = {"gb_per_s": 10.0, "gflop_per_s": 100.0}
    monkeypatch.setattr(benchmark, "compile_ablation_line", compile_line)
    monkeypatch.setattr(benchmark, "measure_rates", lambda num_weights, repeats: rates)
    records = benchmark.run_ablation(
        mnist.get_config(), (8,), repeats=2, warmup=0, calls_per_round=1, batch_size=4
    )
    lines = {r["ablation"]: r for r in records if r["kind"] == "ablation"}
    for name, ms in LINE_MS.items():
        assert lines[name]["ms_per_step"] == pytest.approx(ms)
        assert lines[name]["pct_of_full"] == pytest.approx(100 * ms / LINE_MS["full"])
        assert lines[name]["examples_per_s"] == pytest.approx(4 / (ms / 1e3))
    parts = {r["key"]: r for r in records if r["kind"] == "breakdown"}
    assert parts["rng"]["ms"] == pytest.approx(3.0)
    assert parts["rng"]["pct_of_full"] == pytest.approx(30.0)
    assert parts["entropy"]["ms"] == pytest.approx(0.5)
    assert (parts["rest"]["hidden"], parts["rest"]["gb_per_s"]) == (8, 10.0)
    # local_reparam's parts: shares of its own step, with its fields.
    assert parts["local_kl"]["ms"] == pytest.approx(1.0)
    assert parts["local_kl"]["pct_of_full"] == pytest.approx(12.5)
    assert (parts["local_kl"]["estimator"], parts["local_kl"]["hidden"]) == ("local_reparam", 8)
    table = benchmark.format_ablation(records)
    assert "| no_kl | flat prior and log q = 0: no KL term at all | 8.50 | 85% |" in table


def _grid_record(hidden: int, estimator: str, temp_mib: float | None, **fields) -> dict:
    case = benchmark.Case(hidden, 1, estimator, "gaussian", "closed_form", "hash")
    temp = None if temp_mib is None else int(temp_mib * 2**20)
    return {"kind": "grid", **case.record(128), "temp_bytes": temp, **fields}


def test_large_temporaries_are_named_on_the_cpu_only():
    """glibc's per-thread arenas hold 64 MiB: the note names the bbb cases above it, with their
    size, and nothing else (docs/performance.md, "A worker thread's temporaries over 64 MiB")."""
    records = [
        _grid_record(1200, "reparam", 65.1),
        _grid_record(1200, "local_reparam", 34.9),
        _grid_record(1200, "flipout", 63.9),
        _grid_record(400, "reparam", None),  # The backend did not say.
        _grid_record(1200, "reparam", 900.0, system="torch / bayesian-torch"),
    ]
    note = benchmark.large_temporaries_note(records, "cpu")
    assert "H=1200 K=1 reparam gaussian/closed_form noise=hash (65.1 MiB)" in note
    assert "local_reparam" not in note and "flipout" not in note and "900" not in note
    assert "MALLOC_ARENA_MAX=1" in note
    assert benchmark.large_temporaries_note(records, "gpu") is None
    assert benchmark.large_temporaries_note(records[1:4], "cpu") is None


def test_temp_bytes_reads_the_memory_analysis():
    compiled = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T).lower(jnp.ones((256, 256))).compile()
    # Two 256 x 256 float32 intermediates at least, and no more than the whole program.
    assert 2**19 <= benchmark.temp_bytes(compiled) <= 2**22

    class NoAnalysis:
        def memory_analysis(self):
            return None

    class Unsupported:
        def memory_analysis(self):
            raise NotImplementedError

    assert benchmark.temp_bytes(NoAnalysis()) is None
    assert benchmark.temp_bytes(Unsupported()) is None
