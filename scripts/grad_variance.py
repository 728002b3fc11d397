"""Gradient variance of each estimator at a run's checkpoint (Kingma et al. 2015, Table 1 style).

  python scripts/grad_variance.py --workdir=runs/mnist --num_draws=100

Writes workdir/grad_variance.md and workdir/grad_variance.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from absl import app, flags

from bbb import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (its latest checkpoint).")
_NUM_DRAWS = flags.DEFINE_integer("num_draws", 100, "Draws of (minibatch, noise).")
_ESTIMATORS = flags.DEFINE_list(
    "estimators", ["reparam", "per_example", "local_reparam", "flipout"], "Estimators."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from bbb import grad_variance, train

    def run():
        experiment, state = train.load_run(_WORKDIR.value)
        x, y = train.load_data(experiment.config)["train"]
        data = (jnp.asarray(x), jnp.asarray(y))
        results = {}
        for estimator in _ESTIMATORS.value:
            results[estimator] = grad_variance.gradient_variance(
                experiment.free_energy,
                state.params,
                data,
                jax.random.key(0),
                estimator=estimator,
                batch_size=experiment.config.batch_size,
                num_draws=_NUM_DRAWS.value,
            )
            print(estimator, results[estimator], flush=True)
        table = grad_variance.variance_table(results)
        header = (
            f"Var[dF/dmu] per layer (mean over its parameters), {_NUM_DRAWS.value} draws of "
            f"minibatch and noise, at step {int(state.step)} of {_WORKDIR.value}.\n\n"
        )
        with open(os.path.join(_WORKDIR.value, "grad_variance.md"), "w") as f:
            f.write(header + table)
        with open(os.path.join(_WORKDIR.value, "grad_variance.json"), "w") as f:
            json.dump({"step": int(state.step), "num_draws": _NUM_DRAWS.value, **results}, f)
        print(header + table)

    cli.run_or_exit(run)


if __name__ == "__main__":
    app.run(main)
