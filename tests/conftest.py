"""Shared pytest fixtures.

Flax's `model.init` and `bbb.posterior.init_posterior` compile their random initialisers, one
small XLA program per shape (slow on a small CPU). Tests that only need some parameters take the
shapes from `jax.eval_shape` and draw the values with numpy (`init_posterior` itself is tested
in test_posterior.py).
"""

import json
import os
import subprocess
import sys
import tempfile

# The tests run small programs a few times each: XLA's optimisation passes cost far more than
# they save. Set in the environment (before JAX is imported) so that the training subprocesses
# that some tests start compile the same way, and give bit-identical numbers.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The tests run on the CPU, on GPU and TPU hosts too: several check XLA:CPU's compiled code, and
# `pytest -n 2`'s workers (and the training subprocesses) would each claim the accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbb.posterior import MeanFieldGaussian


def numpy_params(model: nn.Module, x: jax.Array, seed: int = 0, scale: float = 0.5):
    """Parameters with the structure of `model.init(key, x)["params"]`, drawn with numpy.

    Kernels ~ N(0, scale² / fan_in), biases ~ N(0, (scale / 2)²), float32.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path[-1:])
        size = shape.shape
        if "kernel" in name and len(size) >= 2:
            fan_in = int(np.prod(size[:-1]))
            values = rng.normal(size=size) * scale / np.sqrt(fan_in)
        else:
            values = rng.normal(size=size) * scale / 2.0
        return jnp.asarray(values, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def numpy_posterior(params, rho, seed: int = 0) -> MeanFieldGaussian:
    """A mean-field posterior with μ = `params` and ρ a constant or ~ U(low, high), by numpy."""
    rng = np.random.default_rng(seed)

    def draw(p):
        shape = np.shape(p)
        values = np.full(shape, rho) if np.isscalar(rho) else rng.uniform(*rho, size=shape)
        return jnp.asarray(values, jnp.float32)

    mu = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params)
    return MeanFieldGaussian(mu=mu, rho=jax.tree_util.tree_map(draw, params))


def saved_run(workdir, config) -> str:
    """Makes `workdir` look like a run of `config` that got as far as one metrics line (a
    config.json beside no results is a failed start's, which any config may replace)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "epoch": 1}) + "\n")
    return str(workdir)


@pytest.fixture(scope="session", autouse=True)
def temp_dir_of_the_session(tmp_path_factory):
    """Points `tempfile` (and the subprocesses' TMPDIR) at a folder of the session's own.

    TFDS leaves an empty `tempfile.mkdtemp` folder behind each time a builder is made for data
    that is not prepared yet (`DatasetInfo.initialize_from_bucket`, with its GCS access off):
    the data tests left 19 in /tmp per run of the suite. Pytest removes its old folders.
    """
    path = str(tmp_path_factory.mktemp("tempfile"))
    with pytest.MonkeyPatch.context() as patch:  # Restores both at the end of the session.
        patch.setattr(tempfile, "tempdir", path)
        patch.setenv("TMPDIR", path)
        yield path


@pytest.fixture(scope="module")
def fast_compile():
    """Compiles with XLA's cheap settings (`jax_disable_most_optimizations`) for one module.

    The tests run tiny programs a few times each, so XLA's optimisation passes (several seconds
    per program on a small CPU) cost far more than they save. The computed values are the same.
    """
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, *flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python scripts/<script> <flags>` from the repository, its output captured as text."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", script), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def report_on_fake_cpus(function: str, workdir: str, devices: int, **env: str) -> tuple[dict, str]:
    """Runs `function(workdir)` ("tests.module:name") in a subprocess with `devices` fake CPU
    devices (`XLA_FLAGS` must be set before JAX starts, hence the subprocess).

    Args:
      function: "tests.module:name"; it returns a JSON-serialisable report.
      workdir: its one argument.
      devices: fake CPU devices of the subprocess.
      **env: further environment variables of the subprocess.

    Returns:
      (its report, the subprocess's stdout).
    """
    module, name = function.split(":")
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        **env,
    )
    code = (
        f"import json; from {module} import {name}; "
        f"print('REPORT' + json.dumps({name}({workdir!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT") :]), result.stdout


def all_equations(jaxpr):
    """Every equation of `jaxpr`, with those of its nested jaxprs (pjit, scan, custom_jvp, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from all_equations(inner)
